"""advcap report on hand-written run directories: the numbers are checked against hand-computed values."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest

from advcap.cli import main
from advcap.config import load_config, save_config
from advcap.rundir import run_path
from advcap.errors import AdvcapError
from advcap.report import EPSILON_CONVENTION, build_report, write_report


def make_run(root: Path, phase: str, seed: int, test: dict | None, train: dict | None = None,
             provenance: dict | None = None, overrides: tuple[str, ...] = ()) -> Path:
    """A run dir under root (= runs/<dataset>) as train + evaluate leave it; `test`/`train`: condition → BLEU-4."""
    cfg = load_config(phase, [*overrides, f"train.seed={seed}", f"run.out={root.parent}", f"run.dataset={root.name}"])
    out = run_path(cfg)
    save_config(cfg, out / "config.yaml")
    if provenance is not None:
        (out / "provenance.json").write_text(json.dumps(provenance))
    if test is not None:
        metrics = {}
        for split, scores in (("test", test), ("train", train)):
            if scores is not None:
                metrics[split] = {c: {"bleu1": 0.9, "bleu2": 0.8, "bleu3": 0.7, "bleu4": v, "images": 6}
                                  for c, v in scores.items()}
        record = {"metrics": metrics, "settings": dataclasses.asdict(cfg.eval), "partial": False,
                  "images": {split: {"evaluated": 6, "expected": 6} for split in metrics},
                  "model_sha256": (provenance or {}).get("weights_sha256")}
        (out / "metrics.json").write_text(json.dumps(record))
    return out


def prov(trainable: int, frozen: int, wall: float, rate: float) -> dict:
    total = {"trainable": trainable, "frozen": frozen}
    return {"world_size": 1, "parameters": {"total": total}, "wall_time_s": wall, "train_samples_per_s": rate}


def rows(path: Path, **match) -> list[dict]:
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if all(r[k] == str(v) for k, v in match.items())]


def one(path: Path, **match) -> dict:
    found = rows(path, **match)
    assert len(found) == 1, (match, found)
    return found[0]


@pytest.fixture
def ablation_dir(tmp_path):
    """baseline × 3 seeds, adv_train × 3, freeze_vit × 2 evaluated + seed 2 trained but not evaluated."""
    root = tmp_path / "runs" / "toy"
    # test: clean, fgsm, blind; train: clean, fgsm. Values chosen so means/stds are easy by hand.
    make_run(root, "baseline", 0, {"clean": 0.50, "fgsm": 0.10, "blind": 0.02}, {"clean": 0.60, "fgsm": 0.20},
             prov(1000, 0, 10.0, 40.0))
    make_run(root, "baseline", 1, {"clean": 0.60, "fgsm": 0.20, "blind": 0.04}, {"clean": 0.70, "fgsm": 0.30},
             prov(1000, 0, 12.0, 38.0))
    make_run(root, "baseline", 2, {"clean": 0.70, "fgsm": 0.30, "blind": 0.06}, {"clean": 0.80, "fgsm": 0.40},
             prov(1000, 0, 14.0, 36.0))
    make_run(root, "adv_train", 0, {"clean": 0.45, "fgsm": 0.40, "blind": 0.02}, {"clean": 0.5, "fgsm": 0.5},
             prov(1000, 0, 20.0, 20.0))
    make_run(root, "adv_train", 1, {"clean": 0.55, "fgsm": 0.42, "blind": 0.02}, {"clean": 0.5, "fgsm": 0.5},
             prov(1000, 0, 22.0, 18.0))
    make_run(root, "adv_train", 2, {"clean": 0.50, "fgsm": 0.44, "blind": 0.08}, {"clean": 0.5, "fgsm": 0.5},
             prov(1000, 0, 24.0, 16.0))
    make_run(root, "freeze_vit", 0, {"clean": 0.40, "fgsm": 0.30, "blind": 0.04}, {"clean": 0.4, "fgsm": 0.3},
             prov(600, 400, 15.0, 30.0))
    make_run(root, "freeze_vit", 1, {"clean": 0.50, "fgsm": 0.36, "blind": 0.04}, {"clean": 0.4, "fgsm": 0.3},
             prov(600, 400, 17.0, 28.0))
    make_run(root, "freeze_vit", 2, None, provenance=prov(600, 400, 16.0, 29.0))  # trained, not evaluated
    return root


def test_report_numbers_match_hand_computed_values(ablation_dir, tmp_path):
    out = tmp_path / "report"
    report = write_report(ablation_dir, out)
    csv_path = out / "report.csv"

    # baseline test clean: 0.5, 0.6, 0.7 → mean 0.6, sample std 0.1.
    row = one(csv_path, table="summary", phase="baseline", split="test", condition="clean", quantity="bleu4")
    assert (int(row["n"]), float(row["mean"]), float(row["std"])) == (3, pytest.approx(0.6), pytest.approx(0.1))
    # adv_train test fgsm: 0.40, 0.42, 0.44 → 0.42 ± 0.02.
    row = one(csv_path, table="summary", phase="adv_train", split="test", condition="fgsm", quantity="bleu4")
    assert (int(row["n"]), float(row["mean"]), float(row["std"])) == (3, pytest.approx(0.42), pytest.approx(0.02))
    # freeze_vit averages its two evaluated seeds only: fgsm 0.30, 0.36 → 0.33 ± sqrt(0.0018).
    row = one(csv_path, table="summary", phase="freeze_vit", split="test", condition="fgsm", quantity="bleu4")
    assert (int(row["n"]), float(row["mean"]), float(row["std"])) == (2, pytest.approx(0.33), pytest.approx(0.0018 ** 0.5))
    # Constant values: std 0.
    row = one(csv_path, table="summary", phase="adv_train", split="train", condition="clean", quantity="bleu4")
    assert float(row["std"]) == pytest.approx(0.0)
    # Per-seed values are the metrics.json values.
    per_seed = {int(r["seed"]): float(r["value"]) for r in
                rows(csv_path, table="per_seed", phase="baseline", split="train", condition="fgsm", quantity="bleu4")}
    assert per_seed == {0: pytest.approx(0.2), 1: pytest.approx(0.3), 2: pytest.approx(0.4)}
    # Blind: per split, over all 8 evaluated runs: (0.02+0.04+0.06+0.02+0.02+0.08+0.04+0.04)/8 = 0.04.
    row = one(csv_path, table="blind", split="test")
    assert (int(row["n"]), float(row["mean"])) == (8, pytest.approx(0.04))
    assert rows(csv_path, table="blind", split="train") == []  # no train blind scores were written

    # Paired differences over common seeds 0, 1: adv_train − freeze_vit on test fgsm: 0.10, 0.06 → 0.08 ± sqrt(0.0008).
    row = one(csv_path, table="difference", phase="adv_train - freeze_vit", split="test", condition="fgsm")
    assert (int(row["n"]), float(row["mean"]), float(row["std"])) == (2, pytest.approx(0.08), pytest.approx(0.0008 ** 0.5))
    # adv_train − baseline on test fgsm over seeds 0..2: 0.30, 0.22, 0.14 → 0.22 ± 0.08.
    row = one(csv_path, table="difference", phase="adv_train - baseline", split="test", condition="fgsm")
    assert (int(row["n"]), float(row["mean"]), float(row["std"])) == (3, pytest.approx(0.22), pytest.approx(0.08))
    assert rows(csv_path, table="difference", phase="adv_train - freeze_gpt") == []  # no freeze_gpt runs

    # Cost from provenance.json, mean over seeds (freeze_vit seed 2 trained, so it counts here).
    assert float(one(csv_path, table="cost", phase="freeze_vit", quantity="trainable_parameters")["mean"]) == 600
    assert float(one(csv_path, table="cost", phase="freeze_vit", quantity="wall_time_s")["mean"]) == pytest.approx(16.0)
    assert float(one(csv_path, table="cost", phase="adv_train", quantity="train_samples_per_s")["mean"]) == pytest.approx(18.0)

    # The run without metrics is listed as missing, not averaged.
    missing = rows(csv_path, table="missing")
    assert len(missing) == 1 and "freeze_vit seed2" in missing[0]["value"] and "not evaluated" in missing[0]["value"]

    md = (out / "report.md").read_text()
    assert EPSILON_CONVENTION in md
    assert "ε in [0,1] pixel units; the paper's 0.1 on ViT's [-1,1] inputs is 0.05 here" in md
    assert "freeze_vit seed2: no metrics.json" in md
    assert "0.600 ± 0.100" in report.main_table  # baseline test clean
    freeze_vit_row = [c.strip() for c in report.main_table.splitlines()[4].split("|")[1:-1]]
    # Two of the three seeds asked for: the table and every mean say so.
    assert freeze_vit_row[:2] == ["freeze_vit", "2 of 3"] and freeze_vit_row[-1] == "0.330 ± 0.042 (n=2)"  # test fgsm
    assert "+0.080 ± 0.028" in md  # adv_train − freeze_vit, test fgsm
    # The paper's phase order, then others.
    table = report.main_table.splitlines()
    names = [line.split("|")[1].strip() for line in table[2:]]
    assert names == ["baseline", "adv_train", "freeze_vit", "blind (zeroed images)"]
    for png in ("bleu4_clean_vs_attacked.png", "bleu4_vs_epsilon.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({png})" in md


def test_report_refuses_to_average_runs_that_differ_beyond_the_seed(tmp_path):
    root = tmp_path / "runs" / "toy"
    make_run(root, "adv_train", 0, {"clean": 0.5, "fgsm": 0.4})
    make_run(root, "adv_train", 1, {"clean": 0.5, "fgsm": 0.4}, overrides=("train.lr=0.0001",))
    with pytest.raises(AdvcapError, match=r"adv_train runs.*train\.lr: 5e-5 != 0\.0001"):
        build_report(root)


def test_transfer_source_of_each_seed_is_not_a_difference(tmp_path):
    """An ablation points each seed's transfer-fgsm at that seed's baseline: the same setting for every seed."""
    root = tmp_path / "runs" / "toy"
    for seed, value in ((0, 0.3), (1, 0.5)):
        source = f"eval.transfer_from={root / 'baseline' / f'seed{seed}'}"
        make_run(root, "adv_train", seed, {"clean": 0.6, "transfer-fgsm": value},
                 overrides=("eval.conditions=[clean,transfer-fgsm]", source))
    report = build_report(root)
    assert report.scores[("adv_train", "test", "transfer-fgsm", "bleu4")].mean == pytest.approx(0.4)
    # A transfer source that is not the run's own seed is a real difference.
    make_run(root, "adv_train", 2, {"clean": 0.6, "transfer-fgsm": 0.1},
             overrides=("eval.conditions=[clean,transfer-fgsm]", f"eval.transfer_from={root / 'baseline' / 'seed0'}"))
    with pytest.raises(AdvcapError, match="eval.transfer_from"):
        build_report(root)


def test_epsilon_sweep_and_phase_missing_a_seed(tmp_path):
    root = tmp_path / "runs" / "toy"
    sweep = "eval.conditions=[clean,fgsm,fgsm@0.1,fgsm@0.02]"
    for seed in (0, 1):
        make_run(root, "baseline", seed, {"clean": 0.6, "fgsm": 0.3, "fgsm@0.02": 0.5, "fgsm@0.1": 0.1 + seed / 10},
                 overrides=(sweep,))
    make_run(root, "freeze_gpt", 0, {"clean": 0.1, "fgsm": 0.05, "fgsm@0.02": 0.08, "fgsm@0.1": 0.02},
             overrides=(sweep,))
    report = write_report(root, tmp_path / "rep")
    assert report.sweep_conditions == ["fgsm@0.02", "fgsm@0.1"]  # ordered by ε
    assert report.scores[("baseline", "test", "fgsm@0.1", "bleu4")].mean == pytest.approx(0.15)
    assert report.missing == ["freeze_gpt seed1: no run directory"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "BLEU-4 vs ε" in md and "ε=0.02" in md
    assert (tmp_path / "rep" / "bleu4_vs_epsilon.png").stat().st_size > 5000


def test_cli_prints_the_main_table(ablation_dir, capsys):
    main(["report", str(ablation_dir)])
    printed = capsys.readouterr().out
    assert "test clean" in printed and "0.600 ± 0.100" in printed
    assert (ablation_dir / "report" / "report.md").is_file()


def test_cli_error_without_runs(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path / "runs")])
    assert exc.value.code == 2
    assert "no runs under" in capsys.readouterr().err
