"""Caption metrics in two dialects, side by side, never mixed.

**The paper's** (the headline, unchanged): corpus BLEU-1…4 with `nltk.translate.bleu_score.corpus_bleu`:
n-gram counts pooled over the whole corpus, every reference of an image counts, BLEU-n weighs the 1…n-gram
precisions 1/n each, no smoothing. Tokens: lower-case, then the words matched by `[a-z0-9]+` (punctuation
dropped). Keys `bleu1`…`bleu4`.

**The field's** (the COCO caption evaluation, `pycocoevalcap`, as LAVIS, BLIP and the robust-VLM literature
report it): Stanford's PTB tokenizer (lower-cased, punctuation removed), then BLEU-1…4 (its own BLEU, with
"closest" reference lengths), METEOR 1.5, ROUGE-L and CIDEr-D, and SPICE where its Stanford CoreNLP models
are present (otherwise it is named as unavailable, never silently left out). Keys `coco_bleu1`…`coco_bleu4`,
`meteor`, `rouge_l`, `cider`, `spice`; CIDEr is on the usual ×100 scale in tables, stored as computed (×1).

The tokenizer and METEOR run in Java: `coco_scores` starts the tokenizer once for all caption sets of an
evaluation, and one METEOR process serves a whole Python process (it takes seconds to start). The tokenizer is run here with the same command and
post-processing as pycocoevalcap's `PTBTokenizer` (which writes its temporary file into its own package
folder, read-only on many clusters); the tests check that the scores equal pycocoevalcap run directly on
the COCO-format files an evaluation writes.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence

from advcap.errors import AdvcapError

log = logging.getLogger(__name__)

ORDERS = (1, 2, 3, 4)
_WORD = re.compile(r"[a-z0-9]+")
# nltk's unsmoothed BLEU warns once per corpus for each n-gram order without a single match.
_ZERO_COUNTS_WARNING = r"\s*The hypothesis contains 0 counts of"

# pycocoevalcap's names → the keys of metrics.json (beside the paper's bleu1…bleu4).
COCO_KEYS = {"Bleu_1": "coco_bleu1", "Bleu_2": "coco_bleu2", "Bleu_3": "coco_bleu3", "Bleu_4": "coco_bleu4",
             "METEOR": "meteor", "ROUGE_L": "rouge_l", "CIDEr": "cider", "SPICE": "spice"}
PAPER_TOKENS = "nltk corpus_bleu on lower-cased [a-z0-9]+ words (the paper's BLEU)"
COCO_TOKENS = "pycocoevalcap: Stanford PTB tokenizer, lower-cased, punctuation removed (the COCO caption evaluation)"
JAVA_HINT = ("install a Java runtime (8 or newer, e.g. `apt-get install default-jre-headless`), or set "
             "eval.coco_metrics=false to score with the paper's BLEU only")


# ---------------------------------------------------------------- the paper's BLEU


def tokenize(caption: str) -> list[str]:
    """Lower-cased words `[a-z0-9]+` of a caption; punctuation and other characters are dropped."""
    return _WORD.findall(caption.lower())


def corpus_bleu_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-1…4 of captions against their references (the paper's metric).

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


# Per image, the counts nltk's corpus BLEU-4 pools over a corpus: matched and total k-grams for k = 1…4,
# then the caption's length and its closest reference's length (columns in that order).
BLEU4_STATISTICS = 10


def bleu4_statistics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> "np.ndarray":
    """(N, BLEU4_STATISTICS) int64: what each image adds to the corpus BLEU-4 of `corpus_bleu_scores`.

    Any subset of the rows, summed and given to `bleu4_from_statistics`, is the corpus BLEU-4 of those images:
    what a bootstrap over images needs without re-tokenising and re-counting for every resample."""
    import numpy as np
    from nltk.translate.bleu_score import closest_ref_length, modified_precision

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    rows = []
    for hypothesis, image_refs in zip(hypotheses, references):
        hyp, refs = tokenize(hypothesis), [tokenize(r) for r in image_refs]
        row = []
        for n in ORDERS:
            precision = modified_precision(refs, hyp, n)
            row += [precision.numerator, precision.denominator]
        rows.append(row + [len(hyp), closest_ref_length(refs, len(hyp))])
    return np.array(rows, dtype=np.int64).reshape(len(rows), BLEU4_STATISTICS)


def bleu4_from_statistics(totals: "np.ndarray") -> "np.ndarray":
    """Corpus BLEU-4 from `bleu4_statistics` rows summed over images: (..., BLEU4_STATISTICS) → (...).

    The same formula as nltk's corpus_bleu without smoothing (and 0.0 when an order has no match, as
    `corpus_bleu_scores` says): the geometric mean of the four pooled precisions times the brevity penalty."""
    import numpy as np

    totals = np.asarray(totals, dtype=np.float64)
    matched, counted = totals[..., 0:8:2], totals[..., 1:8:2]
    hyp_len, ref_len = totals[..., 8], totals[..., 9]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_precision = np.log(matched / np.maximum(counted, 1)).mean(axis=-1)  # a zero count: -inf, a score of 0
        penalty = np.where(hyp_len > ref_len, 1.0, np.exp(1 - ref_len / np.maximum(hyp_len, 1)))
        score = penalty * np.exp(log_precision)
    return np.where((hyp_len == 0) | (matched.min(axis=-1) == 0), 0.0, score)


# ---------------------------------------------------------------- the COCO caption evaluation


def spice_unavailable() -> Optional[str]:
    """None if SPICE can run here, else why not (its Stanford CoreNLP 3.6.0 jars are a separate download)."""
    try:
        from pycocoevalcap.spice import spice
    except ImportError as err:
        return f"pycocoevalcap is not installed ({err})"
    lib = Path(spice.__file__).parent / "lib"
    missing = [name for name in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
               if not (lib / name).is_file()]
    if missing:
        return (f"unavailable: its Stanford CoreNLP models ({', '.join(missing)}) are not in {lib}; "
                "pycocoevalcap downloads them with `python -m pycocoevalcap.spice.get_stanford_models`")
    return None


def check_coco_ready() -> None:
    """Raise AdvcapError naming what to install if the COCO caption metrics cannot run here."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise AdvcapError("the COCO caption metrics need pycocoevalcap: pip install pycocoevalcap, or set "
                          "eval.coco_metrics=false") from None
    if shutil.which("java") is None:
        raise AdvcapError(f"the COCO caption metrics run Stanford's tokenizer and METEOR in Java, and there is "
                          f"no `java` on PATH: {JAVA_HINT}")


def coco_scores(candidates: Mapping[str, Sequence[str]], references: Sequence[Sequence[str]]) -> dict[str, dict]:
    """{name: {coco_bleu1…4, meteor, rouge_l, cider[, spice]}} for each caption set `candidates[name]` (one
    caption per image) against `references` (all references of each image): one tokenizer run for all."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    check_coco_ready()
    names = list(candidates)
    n = len(references)
    if any(len(candidates[name]) != n for name in names):
        raise ValueError("every caption set needs one caption per image")
    texts = [ref for refs in references for ref in refs] + [c for name in names for c in candidates[name]]
    tokens = ptb_tokenize(texts)
    gts, at = {}, 0
    for i, refs in enumerate(references):
        gts[i], at = tokens[at: at + len(refs)], at + len(refs)
    spice_note = spice_unavailable()
    scores = {}
    for name in names:
        res = {i: [tokens[at + i]] for i in range(n)}
        at += n
        out: dict[str, float] = {}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap prints as it goes
            bleu, _ = Bleu(4).compute_score(gts, res)
        out.update({COCO_KEYS[f"Bleu_{k}"]: float(b) for k, b in zip(ORDERS, bleu)})
        out["meteor"] = float(_meteor().compute_score(gts, res)[0])
        out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
        out["cider"] = float(Cider().compute_score(gts, res)[0])
        if spice_note is None:
            from pycocoevalcap.spice.spice import Spice

            with contextlib.redirect_stdout(io.StringIO()):
                out["spice"] = float(Spice().compute_score(gts, res)[0])
        scores[name] = out
    return scores


# One METEOR process per Python process, started on first use and stopped at exit: it takes seconds to load its
# paraphrase table, and an ablation evaluates run after run.
_METEOR: list = []


def _meteor():
    from pycocoevalcap.meteor.meteor import Meteor

    if _METEOR and _METEOR[0].meteor_p.poll() is not None:  # it died: start another
        _METEOR.clear()
    if not _METEOR:
        _METEOR.append(Meteor())
        atexit.register(_stop_meteor)
    return _METEOR[0]


def _stop_meteor() -> None:
    while _METEOR:
        process = _METEOR.pop().meteor_p
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            process.stdin.close()
            process.kill()
            process.wait(timeout=30)


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """Stanford's PTB tokenizer as pycocoevalcap runs it (-preserveLines -lowerCase, then its punctuation
    list removed), one Java start for all `texts`; the temporary file goes to the system's temp folder."""
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    jar = Path(ptb.__file__).parent / ptb.STANFORD_CORENLP_3_4_1_JAR
    with tempfile.TemporaryDirectory(prefix="advcap-ptb-") as folder:
        source = Path(folder) / "captions.txt"
        source.write_bytes("\n".join(t.replace("\n", " ") for t in texts).encode())
        try:
            done = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                                   "-lowerCase", str(source)], capture_output=True, check=True, timeout=600)
        except FileNotFoundError:
            raise AdvcapError(f"the COCO caption metrics need Java for Stanford's tokenizer: {JAVA_HINT}") from None
        except subprocess.CalledProcessError as err:
            raise AdvcapError(f"Stanford's PTB tokenizer failed ({err.stderr.decode(errors='replace')[-500:]})") from None
    lines = done.stdout.decode().split("\n")
    if len(lines) < len(texts):
        raise AdvcapError(f"Stanford's PTB tokenizer returned {len(lines)} lines for {len(texts)} captions")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS) for line in lines[: len(texts)]]


# ---------------------------------------------------------------- COCO-format files


def coco_image_id(image_id: str) -> int | str:
    """COCO's tools and its evaluation server use integer ids: a numeric id becomes an int, others stay strings."""
    return int(image_id) if image_id.isdigit() else image_id


def coco_references(image_ids: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """A COCO caption annotation file of the references (loads with pycocotools' COCO)."""
    images, annotations = [], []
    for image_id, refs in zip(image_ids, references):
        images.append({"id": coco_image_id(image_id)})
        annotations += [{"image_id": coco_image_id(image_id), "id": len(annotations) + k + 1, "caption": ref}
                        for k, ref in enumerate(refs)]
    return {"info": {"description": "advcap references"}, "licenses": [], "type": "captions", "images": images,
            "annotations": annotations}


def coco_results(image_ids: Sequence[str], captions: Sequence[str]) -> list[dict]:
    """Captions in the COCO results format: [{"image_id", "caption"}]."""
    return [{"image_id": coco_image_id(i), "caption": c} for i, c in zip(image_ids, captions)]
