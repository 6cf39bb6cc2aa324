"""Corpus BLEU-1…4 of generated captions against all reference captions of each image.

The paper's metric, computed with `nltk.translate.bleu_score.corpus_bleu`: n-gram counts are pooled
over the whole corpus (not averaged per sentence), every reference of an image counts (clipping and
the closest reference length use all of them), BLEU-n weighs the 1…n-gram precisions 1/n each, and
there is no smoothing. BLEU-4 is what the paper calls "BLEU score".

Tokenisation, the same for hypotheses and references: lower-case, then the words matched by
`[a-z0-9]+`, so punctuation is dropped ("A dog." and "a dog" are the same caption).
"""

from __future__ import annotations

import re
import warnings
from typing import Sequence

ORDERS = (1, 2, 3, 4)
_WORD = re.compile(r"[a-z0-9]+")
# nltk's unsmoothed BLEU warns once per corpus for each n-gram order without a single match.
_ZERO_COUNTS_WARNING = r"\s*The hypothesis contains 0 counts of"


def tokenize(caption: str) -> list[str]:
    """Lower-cased words `[a-z0-9]+` of a caption; punctuation and other characters are dropped."""
    return _WORD.findall(caption.lower())


def corpus_bleu_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-1…4 of captions against their references.

    Args:
        hypotheses: one generated caption per image. An empty caption is allowed: it matches nothing, adds its
            closest reference's length to the brevity penalty and (nltk divides by max(1, k-gram count))
            one unmatched k-gram of every order.
        references: for each image, all its reference captions (at least one).
    Returns:
        {"bleu1": …, "bleu2": …, "bleu3": …, "bleu4": …}, floats in [0, 1]. BLEU-n is exactly 0.0 when
        some order k ≤ n has no matching k-gram in the whole corpus (the geometric mean has a zero factor;
        nltk itself would return a float_min-based 1e-77 and warn).
    Raises:
        ValueError: no hypotheses, a length mismatch, or an image without references.
    """
    from nltk.translate.bleu_score import corpus_bleu, modified_precision

    if len(hypotheses) == 0:
        raise ValueError("BLEU of an empty set of captions is undefined: no hypotheses given")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    hyps = [tokenize(h) for h in hypotheses]
    refs = []
    for index, image_refs in enumerate(references):
        if isinstance(image_refs, str) or len(image_refs) == 0:
            raise ValueError(f"image {index} needs a list of at least one reference caption, got {image_refs!r}")
        refs.append([tokenize(r) for r in image_refs])

    # Orders with no match anywhere make every BLEU-n with n >= that order exactly 0.
    matched = {n: any(modified_precision(r, h, n).numerator for r, h in zip(refs, hyps)) for n in ORDERS}
    weights = [tuple([1.0 / n] * n) for n in ORDERS]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ZERO_COUNTS_WARNING, category=UserWarning)
        scores = corpus_bleu(refs, hyps, weights=weights)
    return {
        f"bleu{n}": float(score) if all(matched[k] for k in range(1, n + 1)) else 0.0
        for n, score in zip(ORDERS, scores)
    }
