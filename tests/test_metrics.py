"""Corpus BLEU-1…4 against literal values derived by hand from the definition (Papineni et al. 2002):

    BLEU-n = BP · (p1 · … · pn)^(1/n),   BP = 1 if c > r else exp(1 - r/c)

p_k = Σ clipped matching k-grams / Σ hypothesis k-grams over the corpus (a k-gram's count is clipped to
its largest count in any one reference of the image), c = Σ hypothesis lengths, r = Σ for each image
the reference length closest to its hypothesis length (ties: the shorter). Words are lower-cased
[a-z0-9]+ runs, so punctuation and case never matter.
"""

from __future__ import annotations

import warnings

import pytest

from advcap.metrics import bleu4_from_statistics, bleu4_statistics, corpus_bleu_scores, tokenize

# Hypothesis "a red circle" (c = 3) against "A red circle, on the left!" (6 words: r = 6).
#   p1 = 3/3, p2 = 2/2, p3 = 1/1; a 3-word caption has no 4-gram, so p4 = 0/0 counts as no match.
#   BP = exp(1 - 6/3) = e^-1 = 0.36787944117144233.
SHORT = ("a red circle", ["A red circle, on the left!"])

# Hypothesis "The the red square" (c = 4; tokens the the red square) against two references,
# "The red square." (3 words) and "a red square on the left" (6 words):
#   unigrams: "the" twice in the hypothesis, at most once in any one reference → clipped to 1;
#             red 1, square 1 → p1 = 3/4
#   bigrams:  (the the) ✗, (the red) ✓ first ref, (red square) ✓ → p2 = 2/3
#   trigrams: (the the red) ✗, (the red square) ✓ first ref → p3 = 1/2
#   4-gram:   (the the red square) ✗ → p4 = 0/1
#   closest reference length to 4: |3-4| = 1 < |6-4| = 2 → r = 3 < c, so BP = 1.
CLIPPED = ("The the red square", ["The red square.", "a red square on the left"])

# Hypothesis "a red circle left of a blue square" (c = 8) against
#   "a red circle left of the blue square" (8 words) and "A red circle is left of a blue square!" (9 words):
#   unigrams: "a" twice, and twice in the second reference → 8/8
#   bigrams:  a-red, red-circle, circle-left, left-of (first ref), of-a, a-blue (second), blue-square → 7/7
#   trigrams: a-red-circle, red-circle-left, circle-left-of (first), left-of-a, of-a-blue, a-blue-square
#             (second) → 6/6
#   4-grams:  a-red-circle-left ✓, red-circle-left-of ✓ (first), circle-left-of-a ✗ (the first has
#             "of the", the second "circle is left"), left-of-a-blue ✓, of-a-blue-square ✓ (second) → 4/5
#   closest reference length: 8 (exact) → BP = exp(1 - 8/8) = 1.
#   BLEU-1..3 = 1, BLEU-4 = (4/5)^(1/4) = 0.9457416090031758.
FOUR_GRAMS = (
    "a red circle left of a blue square",
    ["a red circle left of the blue square", "A red circle is left of a blue square!"],
)


def bleu(*pairs):
    return corpus_bleu_scores([h for h, _ in pairs], [r for _, r in pairs])


def test_tokenisation_lower_cases_and_drops_punctuation():
    assert tokenize("Two shapes: a RED circle, left of 3 squares!") == [
        "two", "shapes", "a", "red", "circle", "left", "of", "3", "squares"
    ]
    assert tokenize("  ...  ") == []


def test_identical_captions_up_to_case_and_punctuation_score_one():
    scores = bleu(("A red circle, left of the square.", ["a red circle left of the square"]))
    assert scores == pytest.approx({"bleu1": 1.0, "bleu2": 1.0, "bleu3": 1.0, "bleu4": 1.0}, abs=1e-12)


def test_brevity_penalty_and_an_order_without_matches_is_exactly_zero():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nltk's "0 counts of 4-gram overlaps" must not escape
        scores = bleu(SHORT)
    # BLEU-1..3 = e^-1 · 1 (every precision is 1); BLEU-4 has p4 = 0.
    assert scores["bleu1"] == pytest.approx(0.36787944117144233, abs=1e-12)
    assert scores["bleu2"] == pytest.approx(0.36787944117144233, abs=1e-12)
    assert scores["bleu3"] == pytest.approx(0.36787944117144233, abs=1e-12)
    assert scores["bleu4"] == 0.0


def test_several_references_clip_counts_and_choose_the_closest_length():
    scores = bleu(CLIPPED)
    # BLEU-1 = 3/4; BLEU-2 = (3/4 · 2/3)^(1/2) = 0.5^(1/2); BLEU-3 = (3/4 · 2/3 · 1/2)^(1/3) = 0.25^(1/3).
    assert scores["bleu1"] == pytest.approx(0.75, abs=1e-12)
    assert scores["bleu2"] == pytest.approx(0.7071067811865476, abs=1e-12)
    assert scores["bleu3"] == pytest.approx(0.6299605249474366, abs=1e-12)
    assert scores["bleu4"] == 0.0


def test_four_gram_precision_over_several_references():
    scores = bleu(FOUR_GRAMS)
    assert scores["bleu1"] == pytest.approx(1.0, abs=1e-12)
    assert scores["bleu2"] == pytest.approx(1.0, abs=1e-12)
    assert scores["bleu3"] == pytest.approx(1.0, abs=1e-12)
    assert scores["bleu4"] == pytest.approx(0.9457416090031758, abs=1e-12)


def test_counts_are_pooled_over_the_corpus_not_averaged_per_caption():
    # SHORT + CLIPPED as one corpus: p1 = (3+3)/(3+4) = 6/7, p2 = (2+2)/(2+3) = 4/5, p3 = (1+1)/(1+2) = 2/3,
    # p4 = (0+0)/(0+1) = 0; c = 3 + 4 = 7, r = 6 + 3 = 9 → BP = exp(1 - 9/7) = exp(-2/7) = 0.751477293075286.
    #   BLEU-1 = BP · 6/7                      = 0.6441233940645308
    #   BLEU-2 = BP · (6/7 · 4/5)^(1/2)        = BP · (24/35)^(1/2) = 0.6222823182948906
    #   BLEU-3 = BP · (6/7 · 4/5 · 2/3)^(1/3)  = BP · (16/35)^(1/3) = 0.5788950576235704
    scores = bleu(SHORT, CLIPPED)
    assert scores["bleu1"] == pytest.approx(0.6441233940645308, abs=1e-12)
    assert scores["bleu2"] == pytest.approx(0.6222823182948906, abs=1e-12)
    assert scores["bleu3"] == pytest.approx(0.5788950576235704, abs=1e-12)
    assert scores["bleu4"] == 0.0
    # The mean of the per-caption scores would be different: pooling is what is computed.
    assert scores["bleu1"] != pytest.approx((bleu(SHORT)["bleu1"] + bleu(CLIPPED)["bleu1"]) / 2)


def test_a_caption_without_any_matching_word_scores_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bleu(("purple", ["a red circle"]), ("", ["a blue square"])) == {
            "bleu1": 0.0, "bleu2": 0.0, "bleu3": 0.0, "bleu4": 0.0
        }


def test_an_empty_caption_counts_in_the_brevity_penalty_and_as_one_unmatched_ngram():
    # FOUR_GRAMS plus an empty hypothesis whose closest (only) reference has 3 words: c = 8 + 0, r = 8 + 3,
    # BP = exp(1 - 11/8) = exp(-3/8). nltk's modified precision divides by max(1, number of k-grams), so an
    # empty caption adds one unmatched k-gram of every order: p1 = 8/9, p2 = 7/8, p3 = 6/7, p4 = 4/6.
    #   BLEU-1 = BP · 8/9                      = 0.610923803369753
    #   BLEU-2 = BP · (8/9 · 7/8)^(1/2)        = BP · (7/9)^(1/2) = 0.6061321701472839
    #   BLEU-3 = BP · (8/9 · 7/8 · 6/7)^(1/3)  = BP · (2/3)^(1/3) = 0.6004024875744932
    #   BLEU-4 = BP · (… · 4/6)^(1/4)          = BP · (4/9)^(1/4) = 0.5611693462411115
    scores = bleu(FOUR_GRAMS, ("", ["a green star"]))
    assert scores["bleu1"] == pytest.approx(0.610923803369753, abs=1e-12)
    assert scores["bleu2"] == pytest.approx(0.6061321701472839, abs=1e-12)
    assert scores["bleu3"] == pytest.approx(0.6004024875744932, abs=1e-12)
    assert scores["bleu4"] == pytest.approx(0.5611693462411115, abs=1e-12)


def test_per_image_statistics_summed_over_any_subset_give_that_subsets_corpus_bleu4():
    """What the audit's bootstrap resamples: BLEU-4 from summed per-image counts equals nltk's corpus BLEU-4 of
    the same images, repeats included (a bootstrap draws an image more than once), on the worked examples and
    on random captions over a small vocabulary (many partial matches, some without any 4-gram)."""
    import random

    pairs = [SHORT, CLIPPED, FOUR_GRAMS, ("", ["a green star"]), ("purple", ["a red circle"])]
    rng = random.Random(0)
    words = "a red blue green square circle star big small left of the right above".split()
    for _ in range(40):
        pairs.append((" ".join(rng.choice(words) for _ in range(rng.randint(0, 9))),
                      [" ".join(rng.choice(words) for _ in range(rng.randint(1, 9))) for _ in range(rng.randint(1, 4))]))
    stats = bleu4_statistics([h for h, _ in pairs], [r for _, r in pairs])
    assert stats.shape == (len(pairs), 10)
    assert bleu4_from_statistics(stats[2]) == pytest.approx(0.9457416090031758, abs=1e-12)  # FOUR_GRAMS alone
    subsets = [list(range(len(pairs))), [2, 3], [0], [2, 2, 5, 9, 9, 9]] + [
        [rng.randrange(len(pairs)) for _ in range(20)] for _ in range(30)]
    nonzero = 0
    for subset in subsets:
        expected = bleu(*[pairs[i] for i in subset])["bleu4"]
        assert float(bleu4_from_statistics(stats[subset].sum(axis=0))) == pytest.approx(expected, abs=1e-12), subset
        nonzero += expected > 0
    assert nonzero >= 10  # not only the zero case
    # Many subsets at once: the leading axes are kept.
    picks = [[0, 1, 2], [2, 4, 4]]
    assert bleu4_from_statistics(stats[picks].sum(axis=1)).shape == (2,)


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="empty"):
        corpus_bleu_scores([], [])
    with pytest.raises(ValueError, match="1 hypotheses but 2"):
        corpus_bleu_scores(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="at least one reference"):
        corpus_bleu_scores(["a"], [[]])
    with pytest.raises(ValueError, match="at least one reference"):
        corpus_bleu_scores(["a"], ["a red circle"])  # a string, not a list of references


def test_without_java_the_coco_metrics_say_what_to_install(monkeypatch, tmp_path):
    """A PATH with no `java`: a clear error naming the package and the switch, before any work."""
    from advcap.errors import AdvcapError
    from advcap.metrics import check_coco_ready, coco_scores

    monkeypatch.setenv("PATH", str(tmp_path))
    for call in (check_coco_ready, lambda: coco_scores(["a red square"], [["a red square"]])):
        with pytest.raises(AdvcapError, match="no `java` on PATH.*default-jre-headless.*eval.coco_metrics=false"):
            call()
