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

Each check allows `TOLERANCE` BLEU-4 points of noise (a few dozen images).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

TOLERANCE = 0.01
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


def checks(records: Sequence[Mapping[str, Any]], epsilon: float) -> list[dict]:
    """The audit's checks for one phase from its runs' evaluation records: [{check, ok, detail}] (ok None: not
    measured). Means over the runs; BLEU-4 of the paper's BLEU."""
    out = []

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
        bad = [f"{s}: PGD {p:.3f} vs FGSM {f:.3f}" for s, p, f in weaker if p > f + TOLERANCE]
        out.append({"check": "PGD at least as strong as FGSM", "ok": not bad,
                    "detail": "; ".join(bad) if bad else ", ".join(f"{s}: PGD {p:.3f} ≤ FGSM {f:.3f}"
                                                                    for s, p, f in weaker)})
    audit = [r.get("audit") for r in records]
    if all(isinstance(a, Mapping) for a in audit) and audit:
        bleu = lambda name: mean_of(["audit", "bleu4", name])  # noqa: E731
        base, more_steps, one_start = bleu("pgd"), bleu("pgd-2x-steps"), bleu("pgd-1-start")
        if None not in (base, more_steps, one_start):
            bad = []
            if more_steps > base + TOLERANCE:
                bad.append(f"twice the steps {more_steps:.3f} > {base:.3f}")
            if base > one_start + TOLERANCE:
                bad.append(f"restarts {base:.3f} > one start {one_start:.3f}")
            out.append({"check": "more PGD steps and restarts at least as strong", "ok": not bad,
                        "detail": "; ".join(bad) or f"steps ×2: {more_steps:.3f} ≤ {base:.3f}; "
                                                    f"restarts: {base:.3f} ≤ one start {one_start:.3f}"})
        sweep = sorted((float(name.split("@")[1]), value) for name in (audit[0].get("bleu4") or {})
                       if name.startswith("fgsm@") and (value := bleu(name)) is not None)
        if len(sweep) >= 2:
            rises = [f"ε {a:g}→{b:g}: {va:.3f}→{vb:.3f}" for (a, va), (b, vb) in zip(sweep, sweep[1:]) if vb > va + TOLERANCE]
            out.append({"check": "BLEU falls as FGSM's ε grows", "ok": not rises,
                        "detail": "; ".join(rises) or " > ".join(f"{v:.3f}" for _, v in sweep) + " (ε " +
                        ", ".join(f"{e:g}" for e, _ in sweep) + ")"})
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
        bad = [f"{s}: transfer {t:.3f} < white-box {f:.3f}" for s, t, f in transfer if t < f - TOLERANCE]
        out.append({"check": "transfer no stronger than white-box FGSM", "ok": not bad,
                    "detail": "; ".join(bad) or ", ".join(f"{s}: transfer {t:.3f} ≥ white-box {f:.3f}" for s, t, f in transfer)})
    return out
