"""The report: per phase, mean ± std over seeds of BLEU-4 on clean and attacked images, plus cost.

`advcap report runs/<dataset>` reads only files of the run directories `runs/<dataset>/<phase>/seed<k>/`
(config.yaml, provenance.json, and the evaluation record metrics.json), so it works on runs made
anywhere (locally, SLURM arrays). It writes report.md (the paper's Table 2/3 with n and std), report.csv
(every number, tidy: one row per value), and two PNG plots. Runs of one phase are averaged only if their
configs and the eval settings their metrics answer to agree except for the seed and run.* (where the run
lives); otherwise it refuses, naming the key, because such an average would mix two experiments.

Nothing is left out silently. A run whose metrics answer to other weights than the run's (retrained
after its evaluation) is not averaged; a partial evaluation, image counts that differ between the runs
averaged, a config.yaml that lags its metrics' settings, and every phase × seed that was asked for
(`--phases`, `--seeds`; by default the grid of the phases and seeds present) but is missing or
unfinished are listed under Warnings, and every mean says its n.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from advcap.audit import checks as audit_checks
from advcap.metrics import COCO_TOKENS, PAPER_TOKENS
from advcap.config import PAPER_PHASES, epsilon_text
from advcap.errors import AdvcapError

log = logging.getLogger(__name__)

MAIN_CONDITIONS = ("clean", "fgsm", "pgd", "targeted", "transfer-fgsm")
# Every number averaged: the paper's BLEU (nltk, [a-z0-9]+ tokens), the COCO caption metrics (pycocoevalcap, PTB
# tokenizer), and the targeted attack's own figures.
QUANTITIES = ("bleu1", "bleu2", "bleu3", "bleu4", "coco_bleu4", "meteor", "rouge_l", "cider", "spice",
              "target_success", "target_bleu4")
METRIC_TITLES = {"bleu4": "BLEU-4", "cider": "CIDEr-D (×100)"}
SPLIT_ORDER = ("train", "test", "val")
# Paired differences (a − b) computed whenever both phases have runs; the first four are the paper's questions.
DIFFERENCE_PAIRS = (
    ("adv_train", "freeze_vit"),
    ("adv_train", "freeze_gpt"),
    ("freeze_vit", "freeze_gpt"),
    ("adv_train", "baseline"),
    ("adversarial", "baseline"),
    ("adv_train", "adversarial"),
    ("freeze_gpt_xattn", "freeze_gpt"),
)
# Keys in which the phases of one ablation legitimately differ (see advcap.ablation).
PHASE_KEYS = ("train.mode", "train.clean_weight", "freeze", "attack", "run.phase")
EPSILON_CONVENTION = "ε in [0,1] pixel units; the paper's 0.1 on ViT's [-1,1] inputs is 0.05 here"
BAR_PLOT = "bleu4_clean_vs_attacked.png"
EPSILON_PLOT = "bleu4_vs_epsilon.png"
CSV_FIELDS = ("table", "phase", "split", "condition", "quantity", "n", "mean", "std", "seed", "value")


@dataclass(frozen=True)
class Run:
    """One run directory as the report sees it."""

    path: Path
    phase: str
    seed: int
    config: Any  # advcap.config.Config
    record: Optional[dict]  # the evaluation record (metrics.json); None if not evaluated
    provenance: Optional[dict]  # None if training did not finish

    @property
    def metrics(self) -> Optional[dict]:
        """{split: {condition: {"bleu1".."bleu4", "images"}}}, or None if not evaluated."""
        return None if self.record is None else self.record["metrics"]

    def predictions(self) -> Optional[list[dict]]:
        """The per-image captions the evaluation record answers for, or None (advcap.rundir.RunDir.predictions)."""
        from advcap.rundir import RunDir

        return None if self.record is None else RunDir(self.path).predictions(self.record)


@dataclass(frozen=True)
class Stat:
    """Mean ± sample std (ddof=1; nan for n < 2) of `values`, keyed by seed."""

    values: dict[int, float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values.values()) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values.values()) if self.n >= 2 else math.nan

    def scaled(self, factor: float) -> "Stat":
        return Stat({k: v * factor for k, v in self.values.items()})

    def text(self, n_expected: Optional[int] = None, digits: int = 3) -> str:
        if not self.values:
            return "—"
        out = f"{self.mean:.{digits}f}"
        if self.n >= 2:
            out += f" ± {self.std:.{digits}f}"
        if n_expected is not None and self.n != n_expected:
            out += f" (n={self.n})"
        return out


@dataclass
class Report:
    """Everything the report shows; `main_table` is the markdown table also printed to stdout."""

    root: Path
    phases: list[str]
    splits: list[str]
    conditions: list[str]  # main conditions present, in MAIN_CONDITIONS order
    sweep_conditions: list[str]  # fgsm@<eps> present, by ε
    runs: dict[str, list[Run]]  # phase → its evaluated runs, by seed
    missing: list[str]  # "<phase> seed<k>: why" for runs not averaged
    n_expected: int = 0  # seeds asked for per phase: a mean over fewer says its n
    warnings: list[str] = field(default_factory=list)
    scores: dict[tuple[str, str, str, str], Stat] = field(default_factory=dict)  # (phase, split, cond, quantity)
    blind: dict[str, Stat] = field(default_factory=dict)  # split → over all runs, keyed by run index
    differences: dict[tuple[str, str, str], Stat] = field(default_factory=dict)  # ("a - b", split, cond)
    cost: dict[tuple[str, str], Stat] = field(default_factory=dict)  # (phase, quantity)
    epsilons: dict[str, float] = field(default_factory=dict)  # phase → attack.epsilon
    audit: dict[str, list[dict]] = field(default_factory=dict)  # phase → advcap.audit.checks
    spice_note: str = ""  # why SPICE is missing, if it is
    main_table: str = ""  # BLEU-4, the paper's
    cider_table: str = ""  # CIDEr-D, the field's (empty when no run scored it)


# ---------------------------------------------------------------- reading run directories


def find_runs(root: str | Path, none_ok: bool = False) -> tuple[list[Run], list[str]]:
    """Every run dir `root/<phase>/seed<k>/` with a config.yaml; plus the runs that cannot be used.

    Returns (runs, problems). A run without an evaluation record is returned with record=None.
    Raises AdvcapError if `root` holds no run at all (unless `none_ok`: the caller knows what was asked).
    """
    from advcap.rundir import RunDir

    root = Path(root)
    if not root.is_dir() and not none_ok:
        raise AdvcapError(f"{root} is not a directory; expected runs/<dataset> holding <phase>/seed<k>/ run dirs")
    runs, problems = [], []
    for rundir in RunDir.discover(root):
        try:
            cfg = rundir.config()
        except AdvcapError as err:
            raise AdvcapError(f"cannot read the config of run {rundir}: {err}") from None
        if cfg.run.phase != rundir.path.parent.name or f"seed{cfg.train.seed}" != rundir.path.name:
            problems.append(
                f"{rundir}: its config says phase {cfg.run.phase} seed {cfg.train.seed}, not where it lies: not used"
            )
            continue
        try:
            record = rundir.evaluation()
        except AdvcapError as err:
            problems.append(f"{cfg.run.phase} seed{cfg.train.seed}: {err}: not used")
            continue
        provenance = rundir.provenance()
        if record is not None and provenance is not None and record.get("model_sha256") != provenance.get("weights_sha256"):
            problems.append(f"{cfg.run.phase} seed{cfg.train.seed}: its metrics.json answers to other weights than the "
                            f"run's (trained again after its evaluation) in {rundir}: not used; evaluate it again")
            record = None
        runs.append(Run(rundir.path, cfg.run.phase, cfg.train.seed, cfg, record, provenance))
    if not runs and not problems and not none_ok:
        raise AdvcapError(
            f"no runs under {root}: expected {root}/<phase>/seed<k>/config.yaml (point at runs/<dataset>, not runs/)"
        )
    return runs, problems


def comparable_config(cfg: Any) -> dict:
    """The config as a dict in which `eval.transfer_from` pointing at the run's own seed reads `.../seed<k>`.

    An ablation sets each seed's transfer source to the same seed's baseline, which is the same
    setting for every seed; without this, it would count as a difference between seeds.
    """
    from advcap.config import config_to_dict

    data = config_to_dict(cfg)
    source = data["eval"]["transfer_from"]
    if source and Path(source).name == f"seed{cfg.train.seed}":
        data["eval"]["transfer_from"] = str(Path(source).parent / "seed<k>")
    return data


def _answered_config(run: Run) -> dict:
    """The run's config with `eval` replaced by the settings its metrics answer to (the record's)."""
    import dataclasses

    from advcap.config import EvalConfig

    cfg = run.config
    if run.record is not None:
        cfg = dataclasses.replace(cfg, eval=EvalConfig(**run.record["settings"]))
    return comparable_config(cfg)


def check_same_experiment(runs: Sequence[Run]) -> None:
    """Raise AdvcapError unless the runs (of one phase) differ only in train.seed and run.* keys."""
    from advcap.config import diff_configs

    if not runs:
        return
    first = runs[0]
    reference = _answered_config(first)
    for run in runs[1:]:
        diffs = diff_configs(reference, _answered_config(run), ignore=("train.seed", "run", "log"))
        if diffs:
            raise AdvcapError(
                f"refusing to average the {run.phase} runs: {first.path} and {run.path} differ in "
                f"{'; '.join(diffs)} (only train.seed may differ between seeds of a phase). "
                "Move one of them to another runs/<dataset> folder, or rerun it with the same config."
            )


# ---------------------------------------------------------------- the numbers


def build_report(root: str | Path, asked_phases: Optional[Sequence[str]] = None,
                 asked_seeds: Optional[Sequence[int]] = None) -> Report:
    """Read every run under `root` (= runs/<dataset>) and compute the report's numbers (no files written).

    `asked_phases` / `asked_seeds`: the grid the study asked for (e.g. a SLURM array's lists); every cell
    without an evaluated run is listed as missing. By default, the phases and seeds present.
    """
    runs, problems = find_runs(root, none_ok=bool(asked_phases and asked_seeds))
    by_phase: dict[str, list[Run]] = {}
    for run in sorted(runs, key=lambda r: r.seed):
        by_phase.setdefault(run.phase, []).append(run)
    names = list(dict.fromkeys([*(asked_phases or []), *by_phase]))
    phases = [p for p in PAPER_PHASES if p in names] + [p for p in names if p not in PAPER_PHASES]

    missing = list(problems)
    unusable = {line.split(":")[0] for line in problems}
    evaluated: dict[str, list[Run]] = {}
    seeds = sorted(set(asked_seeds)) if asked_seeds else sorted({r.seed for r in runs})
    for phase in phases:
        have = {r.seed: r for r in by_phase.get(phase, [])}
        for seed in seeds:
            run = have.get(seed)
            if f"{phase} seed{seed}" in unusable:
                continue
            if run is None:
                missing.append(f"{phase} seed{seed}: no run directory")
            elif run.metrics is None:
                why = "training not finished" if run.provenance is None else "not evaluated"
                missing.append(f"{phase} seed{seed}: no metrics.json ({why}) in {run.path}")
        evaluated[phase] = [r for r in by_phase.get(phase, []) if r.metrics is not None]
        check_same_experiment(evaluated[phase])

    scored = [r for phase in phases for r in evaluated[phase]]
    splits_present = {s for r in scored for s in r.metrics}
    splits = [s for s in SPLIT_ORDER if s in splits_present] + sorted(splits_present - set(SPLIT_ORDER))
    conds_present = {c for r in scored for split in r.metrics.values() for c in split}
    conditions = [c for c in MAIN_CONDITIONS if c in conds_present]
    sweep = sorted((c for c in conds_present if c.startswith("fgsm@")), key=_sweep_epsilon)

    report = Report(Path(root), phases, splits, conditions, sweep, evaluated, missing, n_expected=len(seeds))
    if missing:
        asked = len(phases) * len(seeds)
        report.warnings.append(f"{len(missing)} of the {asked} runs asked for ({len(phases)} phases × {len(seeds)} seeds) "
                               "are missing, unfinished or unusable, and not averaged: see Missing runs below")
    report.warnings += _record_warnings(evaluated)
    report.warnings += _cross_phase_warnings(evaluated)
    for phase in phases:
        runs_here = evaluated[phase]
        if runs_here:
            report.epsilons[phase] = runs_here[0].config.attack.epsilon
        for split in splits:
            for cond in [*conditions, *sweep, "blind"]:
                for quantity in QUANTITIES:
                    values = {r.seed: v for r in runs_here if (v := _score(r, split, cond, quantity)) is not None}
                    if values:
                        report.scores[(phase, split, cond, quantity)] = Stat(values)
        for quantity, values in _cost_values(by_phase.get(phase, [])).items():
            report.cost[(phase, quantity)] = Stat(values)
    for split in splits:
        values = {i: v for i, r in enumerate(scored) if (v := _score(r, split, "blind", "bleu4")) is not None}
        if values:
            report.blind[split] = Stat(values)
    for a, b in DIFFERENCE_PAIRS:
        if a not in phases or b not in phases:
            continue
        for split in splits:
            for cond in conditions:
                sa = report.scores.get((a, split, cond, "bleu4"))
                sb = report.scores.get((b, split, cond, "bleu4"))
                if sa and sb:
                    common = sorted(set(sa.values) & set(sb.values))
                    if common:
                        report.differences[(f"{a} - {b}", split, cond)] = Stat(
                            {s: sa.values[s] - sb.values[s] for s in common}
                        )
    for phase in phases:
        if evaluated[phase]:
            report.audit[phase] = audit_checks([r.record for r in evaluated[phase]], report.epsilons[phase],
                                               [r.predictions() for r in evaluated[phase]])
    notes = {(r.record.get("metric_notes") or {}).get("spice") for phase in phases for r in evaluated[phase]}
    report.spice_note = "; ".join(sorted(n for n in notes if n and n != "scored"))
    report.main_table = _main_table(report)
    if any(q == "cider" for (_, _, _, q) in report.scores):
        report.cider_table = _main_table(report, "cider", 100.0)
    return report


def _score(run: Run, split: str, condition: str, quantity: str) -> Optional[float]:
    """The run's number, None where it has none (a metric not scored, a condition not evaluated)."""
    entry = run.metrics.get(split, {}).get(condition)
    if entry is None or entry.get(quantity) is None:
        return None
    try:
        return float(entry[quantity])
    except (TypeError, ValueError):
        raise AdvcapError(
            f"{run.path / 'metrics.json'}: {split}/{condition}/{quantity} is {entry[quantity]!r}, not a number"
        ) from None


def _sweep_epsilon(condition: str) -> float:
    from advcap.config import parse_condition

    return parse_condition(condition)[1]


def _cost_values(runs: Iterable[Run]) -> dict[str, dict[int, float]]:
    """Trainable/frozen parameters, wall time and samples/s of training, by seed, from provenance.json."""
    out: dict[str, dict[int, float]] = {}
    for run in runs:
        prov = run.provenance
        if prov is None:
            continue
        total = (prov.get("parameters") or {}).get("total") or {}
        for quantity, value in (
            ("trainable_parameters", total.get("trainable")),
            ("frozen_parameters", total.get("frozen")),
            ("wall_time_s", prov.get("wall_time_s")),
            ("train_samples_per_s", prov.get("train_samples_per_s")),
        ):
            if isinstance(value, (int, float)):
                out.setdefault(quantity, {})[run.seed] = float(value)
    return out


def _record_warnings(evaluated: Mapping[str, list[Run]]) -> list[str]:
    """What the evaluation records say that a reader of the averages must know."""
    from advcap.config import config_to_dict, diff_configs

    warnings = []
    for phase, runs in evaluated.items():
        counts: dict[str, dict[int, int]] = {}
        for run in runs:
            for split, images in run.record["images"].items():
                counts.setdefault(split, {})[run.seed] = images["evaluated"]
                if images["evaluated"] != images["expected"]:
                    warnings.append(f"{run.path}: {split} scored {images['evaluated']} of the {images['expected']} "
                                    "images its shards list (a partial evaluation, eval.allow_partial)")
            lag = diff_configs({"eval": config_to_dict(run.config)["eval"]}, {"eval": run.record["settings"]}, ignore=())
            if lag:
                warnings.append(f"{run.path}: config.yaml's eval settings are not those its metrics answer to "
                                f"({'; '.join(lag)}); the numbers are those of the settings in metrics.json")
            warnings += _training_warnings(run)
        for split, by_seed in counts.items():
            if len(set(by_seed.values())) > 1:
                shown = ", ".join(f"seed {seed}: {n}" for seed, n in sorted(by_seed.items()))
                warnings.append(f"{phase}: the runs averaged scored different numbers of {split} images ({shown})")
    return warnings


def _training_warnings(run: Run) -> list[str]:
    """What validation while training saw (advcap.validation): catastrophic-overfitting alarms, an early stop."""
    prov = run.provenance or {}
    warnings = []
    alarms = prov.get("overfit_alarms") or []
    if alarms:
        warnings.append(f"{run.path}: ⚠ catastrophic-overfitting alarm at {len(alarms)} validation(s), first "
                        f"{alarms[0].get('message', alarms[0])}")
    stopped = prov.get("stopped_early")
    if stopped:
        what = "finished with checkpoints/best" if stopped.get("action") == "rollback" else "finished there"
        warnings.append(f"{run.path}: training stopped early at step {stopped.get('step')} of "
                        f"{run.config.train.steps} (train.overfit_guard={stopped.get('action')}; {what})")
    return warnings


def _cross_phase_warnings(evaluated: Mapping[str, list[Run]]) -> list[str]:
    """Phases of a paired ablation differ only in their phase settings; say so when they do not."""
    from advcap.config import diff_configs

    firsts = [(phase, runs[0]) for phase, runs in evaluated.items() if runs]
    if len(firsts) < 2:
        return []
    (ref_phase, ref), warnings = firsts[0], []
    ignore = (*PHASE_KEYS, "train.seed", "run", "log", "eval.transfer_from", "eval.conditions")
    for phase, run in firsts[1:]:
        diffs = diff_configs(_answered_config(ref), _answered_config(run), ignore=ignore)
        if diffs:
            warnings.append(
                f"{ref_phase} and {phase} differ beyond their phase settings ({'; '.join(diffs)}): "
                "their differences are not those of a paired design"
            )
    return warnings


# ---------------------------------------------------------------- writing


def write_report(root: str | Path, out: str | Path | None = None, asked_phases: Optional[Sequence[str]] = None,
                 asked_seeds: Optional[Sequence[int]] = None) -> Report:
    """Build the report of `root` (= runs/<dataset>) and write report.md, report.csv and the PNG plots (BLEU-4,
    and CIDEr-D where scored: bleu4_clean_vs_attacked.png, cider_vs_epsilon.png, ...).

    `out` defaults to `root/report`. Returns the Report (its `main_table` is what the CLI prints).
    """
    from advcap import atomic

    report = build_report(root, asked_phases, asked_seeds)
    out = report_dir(root, out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(out / "report.csv") as tmp:
        _write_csv(report, tmp)
    plots = []
    for quantity in ("bleu4", "cider"):
        for draw, name in ((_bar_plot, BAR_PLOT), (_epsilon_plot, EPSILON_PLOT)):
            name = name.replace("bleu4", quantity)
            image = io.BytesIO()
            if draw(report, image, quantity):
                atomic.write_bytes(out / name, image.getvalue())
                plots.append(out / name)
    atomic.write_text(out / "report.md", _markdown(report, plots))
    log.info("wrote %s/report.md, report.csv and %d plots", out, len(plots))
    return report


def report_dir(root: str | Path, out: str | Path | None = None) -> Path:
    """Where the report of `root` (= runs/<dataset>) is written: `out`, by default `root/report`."""
    return Path(out) if out is not None else Path(root) / "report"


def summary(report: Report, out: str | Path) -> str:
    """The text `advcap report` prints: the BLEU-4 table (and CIDEr-D's), failed attack audits, the warnings,
    the count of runs not averaged, and where the files are (`out`: the report directory)."""
    out = Path(out)
    parts = [report.main_table]
    if report.cider_table:
        parts.append("\nCIDEr-D ×100 (COCO caption evaluation, PTB tokenizer):\n" + report.cider_table)
    parts += [f"attack audit: {phase}: ✗ {check['check']}: {check['detail']}"
              for phase, found in report.audit.items() for check in found if check["ok"] is False]
    parts += [f"warning: {warning}" for warning in report.warnings]
    if report.missing:
        parts.append(f"\nmissing (not averaged): {len(report.missing)} runs; see {out / 'report.md'}")
    parts.append(f"\nwrote {out / 'report.md'}, {out / 'report.csv'} and plots")
    return "\n".join(parts)


def _fmt_num(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.12g}"


def _write_csv(report: Report, path: Path) -> None:
    rows: list[dict] = []

    def stat_row(table: str, phase: str, split: str, cond: str, quantity: str, stat: Stat) -> None:
        rows.append(dict(table=table, phase=phase, split=split, condition=cond, quantity=quantity,
                         n=stat.n, mean=_fmt_num(stat.mean), std=_fmt_num(stat.std)))

    for (phase, split, cond, quantity), stat in report.scores.items():
        stat_row("summary", phase, split, cond, quantity, stat)
    for (phase, split, cond, quantity), stat in report.scores.items():
        for seed, value in stat.values.items():
            rows.append(dict(table="per_seed", phase=phase, split=split, condition=cond, quantity=quantity,
                             seed=seed, value=_fmt_num(value)))
    for split, stat in report.blind.items():
        stat_row("blind", "all", split, "blind", "bleu4", stat)
    for (pair, split, cond), stat in report.differences.items():
        stat_row("difference", pair, split, cond, "bleu4", stat)
        for seed, value in stat.values.items():
            rows.append(dict(table="difference_per_seed", phase=pair, split=split, condition=cond,
                             quantity="bleu4", seed=seed, value=_fmt_num(value)))
    for (phase, quantity), stat in report.cost.items():
        stat_row("cost", phase, "", "", quantity, stat)
    for line in report.missing:
        rows.append(dict(table="missing", phase=line.split(" ")[0], value=line))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table padded to aligned columns (it is printed to a terminal too)."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _main_table(report: Report, quantity: str = "bleu4", scale: float = 1.0) -> str:
    """Phase rows × split/condition columns of `quantity` mean ± std over seeds (× `scale`), then the blind row.
    A phase that fails an attack-audit check is marked ⚠."""
    columns = _main_columns(report, quantity)
    header = ["phase", "n"] + [f"{split} {cond}" for split, cond in columns]
    rows = []
    for phase in report.phases:
        n = len(report.runs[phase])
        flagged = any(c["ok"] is False for c in report.audit.get(phase, []))
        cells = [phase + (" ⚠" if flagged else ""), str(n) if n == report.n_expected else f"{n} of {report.n_expected}"]
        for split, cond in columns:
            stat = report.scores.get((phase, split, cond, quantity))
            cells.append(stat.scaled(scale).text(report.n_expected, digits=1 if scale != 1 else 3) if stat else "—")
        rows.append(cells)
    blind = {split: s for split in report.splits if (s := _blind(report, split, quantity))}
    if blind:
        n_runs = sum(len(r) for r in report.runs.values())
        cells = ["blind (zeroed images)", str(n_runs)]
        for split, cond in columns:
            stat = blind.get(split) if cond == "clean" else None
            cells.append(stat.scaled(scale).text(n_runs, digits=1 if scale != 1 else 3) if stat else "")
        rows.append(cells)
    return _md_table(header, rows)


def _blind(report: Report, split: str, quantity: str) -> Optional[Stat]:
    """`quantity` of blind captions over all runs (keyed by run), or None."""
    runs = [r for phase in report.phases for r in report.runs[phase]]
    values = {i: v for i, r in enumerate(runs) if (v := _score(r, split, "blind", quantity)) is not None}
    return Stat(values) if values else None


def _main_columns(report: Report, quantity: str = "bleu4") -> list[tuple[str, str]]:
    """(split, condition) pairs of the main conditions that some phase has a score for."""
    return [(s, c) for s in report.splits for c in report.conditions
            if any((p, s, c, quantity) in report.scores for p in report.phases)]


def _markdown(report: Report, plots: Sequence[Path]) -> str:
    n_runs = sum(len(r) for r in report.runs.values())
    parts = [
        f"# advcap report: {report.root}",
        "",
        f"Mean ± sample std (ddof=1) over seeds; n = seeds averaged ({n_runs} evaluated runs). {EPSILON_CONVENTION}; "
        f"{_epsilons_text(report)}. fgsm is FGSM at each phase's attack.epsilon; pgd is PGD at the same ε from random "
        "starts (the restart that hurts each image most by the attack loss is kept); targeted is PGD that makes the "
        "model say another caption; transfer-fgsm feeds each run FGSM images crafted on another checkpoint (in an "
        "ablation: the same seed's baseline). A phase marked ⚠ failed an attack-audit check (see Attack audit).",
        "",
        "## BLEU-4 per phase, clean and attacked (the paper's metric)",
        "",
        f"Tokens: {PAPER_TOKENS}. What the paper calls \"BLEU score\"; not comparable with a COCO-tokenised BLEU.",
        "",
        report.main_table,
        "",
        "The blind row captions zeroed images (the model does not look), averaged over all runs: read every other "
        "number against it.",
    ]
    if report.cider_table:
        parts += ["", "## CIDEr-D per phase, clean and attacked (the COCO caption evaluation)", "",
                  f"Tokens: {COCO_TOKENS}; CIDEr-D ×100, as the field reports it (LAVIS, BLIP). METEOR, ROUGE-L and "
                  "the COCO BLEU-4 are in report.csv" + (f"; SPICE: {report.spice_note}" if report.spice_note else "")
                  + ".", "", report.cider_table]
    targeted = _targeted_table(report)
    if targeted:
        parts += ["", "## Targeted attack: does the model say the attacker's caption?", "",
                  "Success: share of images whose caption becomes the target word for word (images whose target is "
                  "one of their own references are left out); BLEU-4 to the target.", "", targeted]
    if report.audit:
        parts += ["", "## Attack audit", "", _audit_text(report)]
    if report.sweep_conditions:
        parts += ["", "## BLEU-4 vs ε (FGSM sweep)", "", _sweep_table(report)]
    parts += ["", "## Per-seed BLEU-4", "", _per_seed_table(report)]
    if report.differences:
        parts += [
            "",
            "## Paired differences (BLEU-4, a − b over the seeds both phases have)",
            "",
            "Within a seed the phases share initialisation, data order and step count, so per-seed differences "
            "remove the seed's own variation: mean ± std of the per-seed differences, n = common seeds.",
            "",
            _difference_table(report),
        ]
    parts += ["", "## Cost of training (mean over seeds)", "", _cost_table(report)]
    if plots:
        parts += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    if report.warnings:
        parts += ["", "## Warnings", ""] + [f"- {w}" for w in report.warnings]
    parts += ["", "## Missing runs (not averaged)", ""]
    parts += [f"- {m}" for m in report.missing] if report.missing else ["none"]
    return "\n".join(parts) + "\n"


def _epsilons_text(report: Report) -> str:
    values = sorted(set(report.epsilons.values()))
    if len(values) == 1:
        return epsilon_text(values[0])
    return "; ".join(f"{p}: {epsilon_text(e)}" for p, e in report.epsilons.items())


def _targeted_table(report: Report) -> str:
    rows = []
    for phase in report.phases:
        for split in report.splits:
            success = report.scores.get((phase, split, "targeted", "target_success"))
            bleu = report.scores.get((phase, split, "targeted", "target_bleu4"))
            if success or bleu:
                rows.append([phase, split, success.scaled(100).text(report.n_expected, digits=1) + " %" if success else "—",
                             bleu.text(report.n_expected) if bleu else "—"])
    return _md_table(["phase", "split", "success", "BLEU-4 to the target"], rows) if rows else ""


def _audit_text(report: Report) -> str:
    """Per phase: each check, ✓ or ✗, with its numbers (advcap.audit)."""
    from advcap.audit import NOISE_SDS, TOLERANCE

    lines = [f"Checks a robustness reviewer would make (BLEU-4, means over seeds, a tolerance of {TOLERANCE} for noise, "
             f"or, where two conditions are compared on the same images, {NOISE_SDS:g} standard deviations of "
             "their difference by a paired bootstrap over those images when that is larger); ✗ marks what would "
             "make one suspect too weak an attack or gradient masking.", ""]
    for phase, found in report.audit.items():
        if not found:
            lines.append(f"- **{phase}**: nothing to check (no attack conditions or audit in its records)")
            continue
        failed = [c for c in found if c["ok"] is False]
        lines.append(f"- **{phase}**: " + ("all checks pass" if not failed else f"{len(failed)} check(s) fail ⚠"))
        lines += [f"  - {'✓' if c['ok'] else '✗'} {c['check']}: {c['detail']}" for c in found]
    return "\n".join(lines)


def _sweep_table(report: Report) -> str:
    curves = {(p, s): _epsilon_curve(report, p, s) for p in report.phases for s in report.splits}
    epsilons = sorted({eps for curve in curves.values() for eps in curve})
    header = ["phase", "split"] + [f"ε={eps:g}" + (" (clean)" if eps == 0 else "") for eps in epsilons]
    rows = [[p, s] + [curve[eps].text() if eps in curve else "—" for eps in epsilons]
            for (p, s), curve in curves.items() if curve]
    return _md_table(header, rows)


def _epsilon_curve(report: Report, phase: str, split: str, quantity: str = "bleu4") -> dict[float, Stat]:
    """ε → `quantity` of a phase: clean at ε=0, fgsm at the phase's attack.epsilon, and the fgsm@ε sweep."""
    curve = {}
    for cond, eps in [("clean", 0.0), ("fgsm", report.epsilons.get(phase)),
                      *((c, _sweep_epsilon(c)) for c in report.sweep_conditions)]:
        stat = report.scores.get((phase, split, cond, quantity))
        if stat and eps is not None:
            curve.setdefault(eps, stat)  # fgsm@ε equal to attack.epsilon is the same attack: shown once
    return dict(sorted(curve.items()))


def _per_seed_table(report: Report) -> str:
    conds = [*report.conditions, *report.sweep_conditions, "blind"]
    columns = [(s, c) for s in report.splits for c in conds
               if any((p, s, c, "bleu4") in report.scores for p in report.phases)]
    header = ["phase", "seed"] + [f"{s} {c}" for s, c in columns]
    rows = []
    for phase in report.phases:
        for run in report.runs[phase]:
            cells = [phase, str(run.seed)]
            for split, cond in columns:
                value = _score(run, split, cond, "bleu4")
                cells.append("—" if value is None else f"{value:.3f}")
            rows.append(cells)
    return _md_table(header, rows)


def _difference_table(report: Report) -> str:
    pairs = list(dict.fromkeys(pair for pair, _, _ in report.differences))
    columns = [(s, c) for s in report.splits for c in report.conditions
               if any((p, s, c) in report.differences for p in pairs)]
    header = ["a − b", "n"] + [f"{s} {c}" for s, c in columns]
    rows = []
    for pair in pairs:
        stats = [report.differences.get((pair, s, c)) for s, c in columns]
        n = max(s.n for s in stats if s)
        rows.append([pair.replace(" - ", " − "), str(n)] + [_signed(s, n) for s in stats])
    return _md_table(header, rows)


def _signed(stat: Optional[Stat], n: int) -> str:
    if stat is None:
        return "—"
    text = f"{stat.mean:+.3f}"
    if stat.n >= 2:
        text += f" ± {stat.std:.3f}"
    return text + (f" (n={stat.n})" if stat.n != n else "")


def _cost_table(report: Report) -> str:
    header = ["phase", "n", "trainable params", "frozen params", "wall time (s)", "train samples/s"]
    rows = []
    for phase in report.phases:
        stats = [report.cost.get((phase, q)) for q in
                 ("trainable_parameters", "frozen_parameters", "wall_time_s", "train_samples_per_s")]
        n = max((s.n for s in stats if s), default=0)
        rows.append([
            phase,
            str(n),
            *(f"{s.mean:,.0f}" if s else "—" for s in stats[:2]),
            *(f"{s.mean:.1f}" if s else "—" for s in stats[2:]),
        ])
    return _md_table(header, rows)


# ---------------------------------------------------------------- plots


def _figure(n_panels: int):
    # The object API with no pyplot: renders through Agg without touching matplotlib's global backend.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, 5.5 * n_panels), 4.2), layout="constrained")
    return fig, fig.subplots(1, n_panels, squeeze=False)[0]


def _bar_plot(report: Report, path: Any, quantity: str = "bleu4") -> Any:
    """Grouped bars: per phase, `quantity` clean and under each attack (std error bars), one panel per split."""
    title = METRIC_TITLES[quantity]
    scale = 100.0 if quantity == "cider" else 1.0
    if not report.splits or not report.conditions or not any(q == quantity for (_, _, _, q) in report.scores):
        return None
    fig, axes = _figure(len(report.splits))
    width = 0.8 / len(report.conditions)
    for ax, split in zip(axes, report.splits):
        for i, cond in enumerate(report.conditions):
            stats = [s.scaled(scale) if (s := report.scores.get((p, split, cond, quantity))) else None
                     for p in report.phases]
            xs = [k + (i - (len(report.conditions) - 1) / 2) * width for k in range(len(report.phases))]
            means = [s.mean if s else math.nan for s in stats]  # nan: no bar
            errs = [s.std if s and s.n >= 2 else 0.0 for s in stats]
            ax.bar(xs, means, width, yerr=errs, capsize=3, label=cond)
        blind = _blind(report, split, quantity)
        if blind:
            ax.axhline(blind.mean * scale, color="gray", linestyle="--", linewidth=1, label="blind")
        ax.set_xticks(range(len(report.phases)), report.phases, rotation=20)
        ax.set_title(f"{split}: {title}, mean ± std over seeds")
        ax.set_ylabel(title)
        top = max((scale * (s.mean + (s.std if s.n >= 2 else 0.0)) for (_, sp, _, q), s in report.scores.items()
                   if sp == split and q == quantity), default=1.0)
        ax.set_ylim(0, max(top, 1e-3) * 1.3)  # headroom for the legend
        ax.legend(fontsize="small", ncols=len(report.conditions) + 1, loc="upper center")
    fig.savefig(path, dpi=110, format="png")
    return path


def _epsilon_plot(report: Report, path: Any, quantity: str = "bleu4") -> Any:
    """`quantity` vs FGSM ε per phase: clean at ε=0, fgsm at attack.epsilon, fgsm@ε of the sweep."""
    title = METRIC_TITLES[quantity]
    scale = 100.0 if quantity == "cider" else 1.0
    if not report.splits:
        return None
    fig, axes = _figure(len(report.splits))
    drawn = False
    for ax, split in zip(axes, report.splits):
        for phase in report.phases:
            curve = _epsilon_curve(report, phase, split, quantity)
            if curve:
                errors = [scale * s.std if s.n >= 2 else 0.0 for s in curve.values()]
                ax.errorbar(list(curve), [scale * s.mean for s in curve.values()], yerr=errors, marker="o", capsize=3,
                            label=phase)
                drawn = True
        blind = _blind(report, split, quantity)
        if blind:
            ax.axhline(scale * blind.mean, color="gray", linestyle="--", linewidth=1, label="blind")
        ax.set_xlabel("FGSM ε ([0,1] pixel units; ×255 for /255)")
        ax.set_ylabel(title)
        ax.set_title(f"{split}: {title} vs ε")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    if not drawn:
        return None
    fig.savefig(path, dpi=110, format="png")
    return path
