"""`advcap demo` end to end at micro scale: demo set → shards → tokenizer → pretrained stand-ins → phases ×
seeds, run two at a time in worker processes (as `make demo` does) → report; a second call redoes nothing."""

from __future__ import annotations


import pytest
from conftest import metrics_of

from advcap.cli import main

pytestmark = pytest.mark.slow

MICRO = ["--phases", "baseline", "adv_train", "--seeds", "0", "1", "--steps", "3"]


def test_micro_demo_runs_every_stage_and_resumes_as_a_no_op(tmp_path, capsys, monkeypatch):
    import advcap.demo as demo

    # Micro settings for the stages before training (the command line sets only the step count).
    monkeypatch.setitem(demo.DEMO_SETTINGS, "images", 40)
    monkeypatch.setitem(demo.DEMO_SETTINGS, "vit_pretrain_steps", 4)
    monkeypatch.setitem(demo.DEMO_SETTINGS, "gpt2_pretrain_steps", 4)
    monkeypatch.setitem(demo.DEMO_SETTINGS, "global_batch_size", 8)
    out = tmp_path / "demo"
    main(["demo", "--out", str(out), *MICRO, "eval.train_subset_images=8", "eval.pgd_steps=1", "eval.audit_images=8"])
    table = capsys.readouterr().out
    assert "| baseline" in table and "| adv_train" in table and "blind" in table

    runs = sorted(p.relative_to(out / "runs").as_posix() for p in (out / "runs").glob("*/seed*"))
    assert runs == ["adv_train/seed0", "adv_train/seed1", "baseline/seed0", "baseline/seed1"]
    conditions = {"clean", "fgsm", "pgd", "targeted", "blind", "fgsm@0.05", "fgsm@0.2"}
    for run in runs:
        metrics = metrics_of(out / "runs" / run)
        # transfer-fgsm: images crafted on the same seed's baseline (trained first), for the other phases
        assert set(metrics["test"]) == conditions | ({"transfer-fgsm"} if run.startswith("adv_train") else set())
    assert (out / "report" / "report.md").is_file() and (out / "report" / "report.csv").is_file()

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")}
    main(["demo", "--out", str(out), *MICRO, "eval.train_subset_images=8", "eval.pgd_steps=1", "eval.audit_images=8"])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")} == stamps  # nothing retrained
