"""The attack audit: would a robustness reviewer suspect that the attacks are too weak, or that a model
masks its gradients? (Athalye et al. 2018, Carlini et al. 2019 list the symptoms.)

At evaluation (`eval.audit`), on the first `eval.audit_images` images of the first eval split, the paper's
BLEU-4 under: clean and blind images; PGD as configured, with twice its steps (the same total travel), and
with a single start; FGSM at ε/4, ε/2, ε, 2ε and 4ε (ε = attack.epsilon); and PGD at a large ε (0.5: half
the pixel range). The numbers go into the evaluation record under "audit". The audit rides on the evaluation's
pass over those images: a condition the evaluation also has (clean, blind, its PGD, FGSM at the same ε) is
the evaluation's own captions, not a second attack.

The report then checks each phase (means over its seeds) and marks, in plain words with the numbers:

1. PGD weaker than FGSM (the evaluation's own pgd and fgsm, every split);
2. more PGD steps, or more restarts, not stronger;
3. BLEU not falling monotonically as FGSM's ε grows;
4. a large ε not driving BLEU toward the blind score;
5. a transfer attack stronger than the white-box one (transfer-fgsm below fgsm).

Checks 1, 2, 3 and 5 compare two conditions on the same images, where BLEU-4 moves from image sample to
image sample by more than a fixed margin on a few dozen or hundred images. Each allows `NOISE_SDS` standard
deviations of the difference (of the phase's mean over seeds), by a paired bootstrap over those images, or
`TOLERANCE` BLEU-4 points when that is larger, so that a difference within the noise of the sample is not called
an attack's weakness. The bootstrap needs the captions: the audit's own are in its record, the evaluation's in
predictions.jsonl; without them (older evaluations, a missing or altered file) the allowance is `TOLERANCE`.
Check 4 compares with a threshold.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

TOLERANCE = 0.01
NOISE_SDS = 2.0  # a paired difference is noise up to this many bootstrap standard deviations
BOOTSTRAP_RESAMPLES = 1000
RESAMPLES_AT_ONCE = 100
LARGE_EPSILON = 0.5
EPSILON_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


def audit_conditions(epsilon: float, pgd_steps: int, pgd_restarts: int) -> dict[str, dict]:
    """The audit's image conditions: name → {kind, epsilon, steps, restarts}."""
    out = {
        "clean": {"kind": "clean"},
        "blind": {"kind": "blind"},
        "pgd": {"kind": "pgd", "epsilon": epsilon, "steps": pgd_steps, "restarts": pgd_restarts},
        "pgd-2x-steps": {"kind": "pgd", "epsilon": epsilon, "steps": 2 * pgd_steps, "restarts": pgd_restarts},
        "pgd-1-start": {"kind": "pgd", "epsilon": epsilon, "steps": pgd_steps, "restarts": 1},
        f"pgd@{LARGE_EPSILON:g}": {"kind": "pgd", "epsilon": LARGE_EPSILON, "steps": pgd_steps, "restarts": pgd_restarts},
    }
    for factor in EPSILON_FACTORS:
        eps = min(1.0, factor * epsilon)
        out[f"fgsm@{eps:g}"] = {"kind": "fgsm", "epsilon": eps}
    return out


def shared_with_evaluation(conditions: Mapping[str, dict], evaluated: Sequence[Any], pgd: Any) -> dict[str, str]:
    """{audit condition: evaluation condition} for the audit conditions whose images the evaluation makes
    anyway on the same batch (`evaluated`: advcap.conditions.Condition; `pgd`: its PGDSettings): clean, blind,
    FGSM at an ε the evaluation also uses, and PGD as configured when it ascends the reference caption's loss.
    The audit takes those captions as they are instead of attacking the images again."""
    shared = {}
    for name, c in conditions.items():
        for e in evaluated:
            same = (c["kind"] == e.kind and c.get("epsilon") == e.epsilon
                    and (c["kind"] != "pgd" or (pgd.target == "reference" and c["steps"] == pgd.steps
                                                and c["restarts"] == pgd.restarts)))
            if same:
                shared[name] = e.name
                break
    return shared


def caption_audit_batch(batch_captioner: Any, pixels: Any, labels: Any, conditions: Mapping[str, dict],
                        batch_index: int, known: Optional[Mapping[str, list[str]]] = None) -> dict[str, list[str]]:
    """Captions of one batch under every audit condition (no collectives); `known` gives the captions of
    conditions already captioned on these images (see shared_with_evaluation), taken as they are."""
    from advcap.attacks import fgsm, input_gradient
    from advcap.model import decode_captions

    bc, captions, gradient = batch_captioner, dict(known or {}), None
    for name, c in conditions.items():
        if name in captions:
            continue
        if c["kind"] == "clean":
            images = pixels
        elif c["kind"] == "blind":
            images = pixels.new_zeros(pixels.shape)
        elif c["kind"] == "fgsm":
            if gradient is None:  # the ε sweep steps along one gradient
                _, gradient = input_gradient(lambda x: bc.captioner(x, labels), pixels)
            images = fgsm(None, pixels, c["epsilon"], grad=gradient)
        else:
            images = bc.attack_pgd(pixels, labels, c["epsilon"], ("audit", batch_index, name), c["steps"],
                                   c["restarts"] if bc.pgd.random_start else 1)
        captions[name] = decode_captions(bc.tokenizer, bc.generate(images))
    return {name: captions[name] for name in conditions}


# ---------------------------------------------------------------- the verdict (the report)


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def checks(records: Sequence[Mapping[str, Any]], epsilon: float,
           predictions: Optional[Sequence[Optional[Sequence[Mapping[str, Any]]]]] = None) -> list[dict]:
    """The audit's checks for one phase from its runs' evaluation records: [{check, ok, detail}] (ok None: not
    measured). Means over the runs; BLEU-4 of the paper's BLEU. `predictions`: per record, the captions it
    answers for (predictions.jsonl), which give checks 1 and 5 their noise allowance; without them, TOLERANCE."""
    out = []

    noise_of_split: dict[str, PairedNoise] = {}  # checks 1 and 5 both resample a split's FGSM captions: once

    def split_noise(split: str) -> "PairedNoise":
        if split not in noise_of_split:
            found = list(predictions) if predictions is not None and len(predictions) == len(records) else []
            usable = found and all(p is not None for p in found)
            noise_of_split[split] = PairedNoise([_split_captions(lines, split) for lines in found] if usable
                                                else [{}] * len(records))
        return noise_of_split[split]

    def mean_of(path: Sequence[str]) -> Optional[float]:
        values = []
        for record in records:
            node: Any = record
            for key in path:
                node = node.get(key) if isinstance(node, Mapping) else None
            if isinstance(node, (int, float)):
                values.append(float(node))
        return _mean(values) if len(values) == len(records) else None

    splits = list(records[0]["metrics"]) if records else []
    weaker = [(s, p, f) for s in splits
              if (p := mean_of(["metrics", s, "pgd", "bleu4"])) is not None
              and (f := mean_of(["metrics", s, "fgsm", "bleu4"])) is not None]
    if weaker:
        compared = [(s, _at_most(p, f, split_noise(s).allowance("pgd", "fgsm"))) for s, p, f in weaker]
        out.append({"check": "PGD at least as strong as FGSM", "ok": all(ok for _, (ok, _) in compared),
                    "detail": ", ".join(f"{s}: PGD vs FGSM {text}" for s, (_, text) in compared)})
    audit = [r.get("audit") for r in records]
    if all(isinstance(a, Mapping) for a in audit) and audit:
        bleu = lambda name: mean_of(["audit", "bleu4", name])  # noqa: E731
        noise = PairedNoise(audit)
        base, more_steps, one_start = bleu("pgd"), bleu("pgd-2x-steps"), bleu("pgd-1-start")
        if None not in (base, more_steps, one_start):
            steps = _at_most(more_steps, base, noise.allowance("pgd-2x-steps", "pgd"))
            starts = _at_most(base, one_start, noise.allowance("pgd", "pgd-1-start"))
            out.append({"check": "more PGD steps and restarts at least as strong", "ok": steps[0] and starts[0],
                        "detail": f"twice the steps vs as configured: {steps[1]}; restarts vs one start: {starts[1]}"})
        sweep = sorted((float(name.split("@")[1]), name, value) for name in (audit[0].get("bleu4") or {})
                       if name.startswith("fgsm@") and (value := bleu(name)) is not None)
        if len(sweep) >= 2:
            pairs = [(f"ε {a:g}→{b:g}", vb > va, _at_most(vb, va, noise.allowance(nb, na)))
                     for (a, na, va), (b, nb, vb) in zip(sweep, sweep[1:])]
            rises = [f"{where}: {text}" for where, rose, (_, text) in pairs if rose]
            out.append({"check": "BLEU falls as FGSM's ε grows", "ok": all(ok for _, _, (ok, _) in pairs),
                        "detail": ", ".join(f"{v:.3f}" for _, _, v in sweep) + " at ε "
                        + ", ".join(f"{e:g}" for e, _, _ in sweep) + ("; rises " + "; ".join(rises) if rises else "")})
        clean, blind, large = bleu("clean"), bleu("blind"), bleu(f"pgd@{LARGE_EPSILON:g}")
        if None not in (clean, blind, large):
            limit = blind + max(TOLERANCE, 0.25 * max(clean - blind, 0.0))
            out.append({"check": f"a large ε ({LARGE_EPSILON:g}) drives BLEU toward blind", "ok": large <= limit,
                        "detail": f"PGD@{LARGE_EPSILON:g} {large:.3f}, blind {blind:.3f}, clean {clean:.3f}"
                                  + ("" if large <= limit else f" (above {limit:.3f})")})
    transfer = [(s, t, f) for s in splits
                if (t := mean_of(["metrics", s, "transfer-fgsm", "bleu4"])) is not None
                and (f := mean_of(["metrics", s, "fgsm", "bleu4"])) is not None]
    if transfer:
        # Transfer stronger means lower BLEU under it: the white-box score must not exceed the transfer one.
        compared = [(s, _at_most(f, t, split_noise(s).allowance("fgsm", "transfer-fgsm"))) for s, t, f in transfer]
        out.append({"check": "transfer no stronger than white-box FGSM", "ok": all(ok for _, (ok, _) in compared),
                    "detail": ", ".join(f"{s}: white-box vs transfer {text}" for s, (_, text) in compared)})
    return out


def _at_most(value: float, bound: float, allowed: float) -> tuple[bool, str]:
    """Is `value` ≤ `bound` up to `allowed` of noise, and that in words: "0.31 ≤ 0.33", "0.31 > 0.30 (within
    the noise, ±0.025)" or "0.35 > 0.30 (beyond the noise, ±0.025)"."""
    if value <= bound:
        return True, f"{value:.3f} ≤ {bound:.3f}"
    ok = value <= bound + allowed
    return ok, f"{value:.3f} > {bound:.3f} ({'within' if ok else 'beyond'} the noise, ±{allowed:.3f})"


def _split_captions(lines: Sequence[Mapping[str, Any]], split: str) -> dict:
    """One split's references and captions per condition from predictions.jsonl lines, in the form of an audit
    record (what PairedNoise reads)."""
    rows = [line for line in lines if line.get("split") == split and isinstance(line.get("captions"), Mapping)]
    names = set().union(*(row["captions"] for row in rows)) if rows else set()
    return {"references": [row.get("references") for row in rows],
            "captions": {name: [row["captions"].get(name) for row in rows] for name in names}}


class PairedNoise:
    """How far BLEU-4 under one audit condition may rise above another's by chance alone, for a phase.

    Per run, a paired bootstrap over its audited images (the same resampled images for both conditions) gives
    the standard deviation of BLEU-4(a) − BLEU-4(b); the phase compares means over its runs, whose standard
    deviation is sqrt(Σ sd²) / runs. The allowance is NOISE_SDS of those, or TOLERANCE when that is larger or
    when a run's record has no audit captions to resample."""

    def __init__(self, audits: Sequence[Mapping[str, Any]]):
        self.audits = audits
        self._statistics: dict[tuple[int, str], Any] = {}

    def allowance(self, a: str, b: str) -> float:
        sds = [self._run_sd(i, a, b) for i in range(len(self.audits))]
        if not sds or any(sd is None for sd in sds):
            return TOLERANCE
        return max(TOLERANCE, NOISE_SDS * math.sqrt(sum(sd * sd for sd in sds)) / len(sds))

    def _run_sd(self, run: int, a: str, b: str) -> Optional[float]:
        import numpy as np

        from advcap.metrics import bleu4_from_statistics

        stats_a, stats_b = self._stats(run, a), self._stats(run, b)
        if stats_a is None or stats_b is None or len(stats_a) < 2:
            return None
        # Seeded by the run's place and the pair, so that a report is the same every time it is made.
        rng = np.random.default_rng([run, len(stats_a), *map(ord, a + "|" + b)])
        images = len(stats_a)
        differences = []
        for start in range(0, BOOTSTRAP_RESAMPLES, RESAMPLES_AT_ONCE):  # bounded memory on a 5,000-image split
            picks = rng.integers(0, images, size=(min(RESAMPLES_AT_ONCE, BOOTSTRAP_RESAMPLES - start), images))
            drawn = np.stack([np.bincount(row, minlength=images) for row in picks])  # times each image is drawn
            differences.append(bleu4_from_statistics(drawn @ stats_a) - bleu4_from_statistics(drawn @ stats_b))
        return float(np.concatenate(differences).std(ddof=1))

    def _stats(self, run: int, name: str) -> Any:
        if (run, name) not in self._statistics:
            from advcap.metrics import bleu4_statistics

            audit = self.audits[run]
            captions, references = (audit.get("captions") or {}).get(name), audit.get("references")
            # Whatever a hand-edited record holds, a malformed one means no allowance, never a crash.
            usable = (isinstance(captions, list) and isinstance(references, list)
                      and len(captions) == len(references) and all(isinstance(c, str) for c in captions)
                      and all(isinstance(r, list) and r and all(isinstance(t, str) for t in r) for r in references))
            self._statistics[run, name] = bleu4_statistics(captions, references) if usable else None
        return self._statistics[run, name]
