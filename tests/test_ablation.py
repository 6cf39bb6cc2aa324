"""advcap ablation: the plan, the paired-design check, and a micro end-to-end ablation (train → eval → report)."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
from conftest import make_tiny_shards, metrics_of

from advcap.ablation import RunState, _transfer_sources, expected_cost, next_ready, plan_ablation, run_plan, start_order
from advcap.cli import main
from advcap.errors import AdvcapError

PHASES = ["baseline", "adv_train"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A tiny shard set (30 images: 12 train, 6 restval, 6 val, 6 test) and a tokenizer trained on it."""
    return make_tiny_shards(tmp_path_factory.mktemp("abl_data"))


def tiny(data: Path, conditions: str = "[clean,fgsm,blind]") -> list[str]:
    return [
        "model.preset=tiny", "data.image_size=32", "data.workers=0", "data.shuffle_buffer=16",
        f"data.shards={data / 'shards'}", f"data.tokenizer={data / 'tok'}",
        "train.steps=3", "train.global_batch_size=8", "train.warmup_steps=1", "train.log_every_steps=1",
        "train.checkpoint_every_steps=3", "eval.train_subset_images=8", "eval.batch_size=8",
        "eval.max_new_tokens=6", f"eval.conditions={conditions}", "eval.audit=false",
    ]


def test_dry_run_prints_the_plan_and_writes_nothing(data, tmp_path, capsys):
    out = tmp_path / "runs" / "toy"
    main(["ablation", "--phases", *PHASES, "--seeds", "0", "1", "--out", str(out), "--dry-run", *tiny(data)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert "2 phases × 2 seeds, 3 steps of global batch 8" in lines[0]
    runs = [line.split("]")[1].split()[:3] for line in lines[1:]]
    assert runs == [["baseline", "seed", "0"], ["adv_train", "seed", "0"], ["baseline", "seed", "1"], ["adv_train", "seed", "1"]]
    assert all(line.endswith("train + evaluate") for line in lines[1:])
    assert str(out / "adv_train" / "seed1") in lines[4]
    assert not out.exists()


def test_phases_that_break_the_paired_design_are_refused(data, tmp_path, capsys):
    odd = tmp_path / "odd.yaml"
    odd.write_text("parent: adv_train\ntrain:\n  lr: 1.0e-4\nrun:\n  phase: odd\n")
    with pytest.raises(AdvcapError, match=r"'baseline' and .*odd\.yaml' differ in train\.lr: 5e-5 != 0\.0001"):
        plan_ablation(["baseline", str(odd)], [0], tmp_path / "runs" / "toy", tiny(data))
    # Through the CLI: one line, exit status 2, nothing written.
    with pytest.raises(SystemExit) as exc:
        main(["ablation", "--phases", "baseline", str(odd), "--seeds", "0", "--out", str(tmp_path / "r" / "t"), *tiny(data)])
    assert exc.value.code == 2 and "train.lr" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    # Phase settings may differ (freeze.*, train.mode, attack.*), and a --config-dir file is found by name.
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "eps.yaml").write_text("parent: freeze_gpt\nattack:\n  epsilon: 0.1\nrun:\n  phase: eps\n")
    plan = plan_ablation(["baseline", "eps"], [0], tmp_path / "runs" / "toy", tiny(data), config_dir=tmp_path / "cfgs")
    assert [p.config.attack.epsilon for p in plan] == [0.05, 0.1]
    # The ablation owns the seed and the run location.
    with pytest.raises(AdvcapError, match="--seeds"):
        plan_ablation(PHASES, [0], tmp_path / "runs" / "toy", [*tiny(data), "train.seed=3"])


def test_transfer_condition_uses_the_same_seeds_baseline(data, tmp_path):
    out = tmp_path / "runs" / "toy"
    overrides = tiny(data, "[clean,transfer-fgsm]")
    plan = plan_ablation(["freeze_vit", "baseline"], [0, 4], out, overrides)
    assert [(p.phase, p.seed) for p in plan] == [("baseline", 0), ("freeze_vit", 0), ("baseline", 4), ("freeze_vit", 4)]
    assert plan[1].config.eval.transfer_from == str(out / "baseline" / "seed0")
    assert plan[3].config.eval.transfer_from == str(out / "baseline" / "seed4")
    assert plan[0].config.eval.conditions == ["clean"] and plan[0].config.eval.transfer_from is None
    with pytest.raises(AdvcapError, match="add baseline to --phases"):
        plan_ablation(["freeze_vit"], [0], out, overrides)


def _mtimes(out: Path, name: str) -> dict[Path, float]:
    return {p: p.stat().st_mtime_ns for p in sorted(out.glob(f"*/seed*/{name}"))}


@pytest.mark.slow
def test_micro_ablation_end_to_end(data, tmp_path, capsys):
    """2 phases × 2 seeds trained and evaluated; the report's numbers are the runs' metrics.json;
    a second call skips everything; a changed override is refused for every run, not skipped."""
    out = tmp_path / "runs" / "toy"
    args = ["ablation", "--phases", *PHASES, "--seeds", "0", "1", "--out", str(out),
            *tiny(data, "[clean,fgsm,blind,transfer-fgsm]")]
    main(args)
    run_dirs = sorted(out.glob("*/seed*"))
    assert [p.relative_to(out).as_posix() for p in run_dirs] == [
        "adv_train/seed0", "adv_train/seed1", "baseline/seed0", "baseline/seed1"]
    for run in run_dirs:
        for name in ("config.yaml", "provenance.json", "metrics.json", "predictions.jsonl", "hf/model.safetensors"):
            assert (run / name).is_file(), run / name
        assert json.loads((run / "trainer_state.json").read_text())["finished"] is True
    capsys.readouterr()

    main(["report", str(out)])
    assert "baseline" in capsys.readouterr().out
    with open(out / "report" / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for phase in PHASES:
        metrics = [metrics_of(out / phase / f"seed{s}") for s in (0, 1)]
        for split in ("train", "test"):
            for cond in ("clean", "fgsm", "blind"):
                values = [m[split][cond]["bleu4"] for m in metrics]
                (row,) = [r for r in rows if (r["table"], r["phase"], r["split"], r["condition"], r["quantity"])
                          == ("summary", phase, split, cond, "bleu4")]
                assert int(row["n"]) == 2
                assert float(row["mean"]) == pytest.approx(sum(values) / 2, abs=1e-9)
                assert float(row["std"]) == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5, abs=1e-9)
    # transfer-fgsm: adv_train attacked with images crafted on the same seed's baseline; none for the baseline.
    for seed in (0, 1):
        assert "transfer-fgsm" not in metrics_of(out / "baseline" / f"seed{seed}")["test"]
        adv = metrics_of(out / "adv_train" / f"seed{seed}")
        assert adv["test"]["transfer-fgsm"]["images"] == 6
        info = json.loads((out / "adv_train" / f"seed{seed}" / "metrics.json").read_text())
        assert info["transfer_from"] == str(out / "baseline" / f"seed{seed}")
    assert {r["phase"] for r in rows if r["table"] == "summary" and r["condition"] == "transfer-fgsm"} == {"adv_train"}
    (diff_row,) = [r for r in rows if (r["table"], r["phase"], r["split"], r["condition"])
                   == ("difference", "adv_train - baseline", "test", "fgsm")]
    per_seed = [metrics_of(out / "adv_train" / f"seed{s}")["test"]["fgsm"]["bleu4"]
                - metrics_of(out / "baseline" / f"seed{s}")["test"]["fgsm"]["bleu4"]
                for s in (0, 1)]
    assert float(diff_row["mean"]) == pytest.approx(sum(per_seed) / 2, abs=1e-9)
    assert (out / "report" / "bleu4_clean_vs_attacked.png").is_file()

    # Paired design: within a seed both phases trained the same steps on the same global batch.
    prov = {p: json.loads((out / p / "seed0" / "provenance.json").read_text()) for p in PHASES}
    assert prov["baseline"]["global_batch_size"] == prov["adv_train"]["global_batch_size"] == 8

    # Again: everything is finished with this config, so nothing is retrained or re-evaluated.
    states, metrics_times = _mtimes(out, "trainer_state.json"), _mtimes(out, "metrics.json")
    started = time.perf_counter()
    main(args)
    assert time.perf_counter() - started < 10
    assert capsys.readouterr().out.count("skipped") == 4
    assert _mtimes(out, "trainer_state.json") == states and _mtimes(out, "metrics.json") == metrics_times

    # A changed override: every run dir holds another config, so every run is refused, none reused.
    configs = _mtimes(out, "config.yaml")
    with pytest.raises(SystemExit) as exc:
        main([*args, "train.lr=1e-4"])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out.count("refused") >= 4
    assert "4 of 4 runs not done" in captured.err
    assert "train.lr: 5e-5 != 0.0001" in captured.out
    assert _mtimes(out, "config.yaml") == configs and _mtimes(out, "metrics.json") == metrics_times

    # Changed eval settings do not touch the models: every run is evaluated again, none retrained.
    new_eval = ["ablation", "--phases", *PHASES, "--seeds", "0", "1", "--out", str(out), *tiny(data, "[clean,fgsm@0.2]")]
    main([*new_eval, "--dry-run"])
    assert capsys.readouterr().out.count("evaluate (already trained): new eval settings (eval.conditions:") == 4
    main(new_eval)
    assert capsys.readouterr().out.count("evaluated") == 4
    assert _mtimes(out, "trainer_state.json") == states
    for run in run_dirs:
        assert set(metrics_of(run)["test"]) == {"clean", "fgsm@0.2"}
        assert "- fgsm@0.2" in (run / "config.yaml").read_text()  # the record of what the metrics answer to
    main(new_eval)
    assert capsys.readouterr().out.count("skipped") == 4


@pytest.mark.slow
def test_failed_run_is_reported_and_the_rest_goes_on(data, tmp_path, capsys):
    """A phase whose freeze policy leaves nothing to train fails; the other phase, interrupted before
    (as if preempted), is resumed from its checkpoint, finished and evaluated."""
    from advcap.train import STOPPED, train

    broken = tmp_path / "broken.yaml"
    broken.write_text("parent: baseline\nfreeze:\n  modules: encoder\n  also_freeze: ['.']\nrun:\n  phase: broken\n")
    out = tmp_path / "runs" / "toy"
    (baseline,) = [p for p in plan_ablation([str(broken), "baseline"], [0], out, tiny(data, "[clean]")) if p.phase == "baseline"]
    assert train(baseline.config, stop_at_step=1) == STOPPED
    (baseline,) = [p for p in plan_ablation([str(broken), "baseline"], [0], out, tiny(data, "[clean]")) if p.phase == "baseline"]
    assert baseline.state == RunState.RESUME
    with pytest.raises(SystemExit) as exc:
        main(["ablation", "--phases", str(broken), "baseline", "--seeds", "0", "--out", str(out), *tiny(data, "[clean]")])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert "1 of 2 runs not done: broken/seed0 (failed)" in captured.err
    assert "no trainable parameter" in captured.out
    assert (out / "baseline" / "seed0" / "metrics.json").is_file()
    assert json.loads((out / "baseline" / "seed0" / "provenance.json").read_text())["resumed_at_step"] == 1
    assert json.loads((out / "baseline" / "seed0" / "trainer_state.json").read_text())["step"] == 3
    assert not (out / "broken" / "seed0" / "metrics.json").exists()
    # The plan now shows what each run dir holds.
    main(["ablation", "--phases", str(broken), "baseline", "--seeds", "0", "--out", str(out), "--dry-run", *tiny(data, "[clean]")])
    plan = capsys.readouterr().out
    assert "baseline seed 0" in plan and "skip (finished with this config)" in plan
    states = {p.phase: p.state for p in plan_ablation([str(broken), "baseline"], [0], out, tiny(data, "[clean]"))}
    assert states == {"broken": RunState.NEW, "baseline": RunState.FINISHED}


def test_a_stop_during_evaluation_keeps_the_model_and_the_next_call_evaluates(data, tmp_path, monkeypatch, capsys):
    """A stop request (the SLURM scripts' stop file) while a trained run is being evaluated: the model kept,
    nothing half-written; the next call evaluates it. Nothing durable came of the stopped call (the model was
    trained before it), so it exits 76, not 75, and says so beside the stop file: a SLURM task is not requeued
    into the same stop again."""
    from advcap.stopping import EXIT_NO_PROGRESS
    from advcap.train import FINISHED, train

    out = tmp_path / "runs" / "toy"
    args = ["ablation", "--phases", "baseline", "--seeds", "0", "--out", str(out), *tiny(data, "[clean]")]
    (planned,) = plan_ablation(["baseline"], [0], out, tiny(data, "[clean]"))
    assert train(planned.config) == FINISHED
    run = out / "baseline" / "seed0"
    model = (run / "hf" / "model.safetensors").read_bytes()
    stop_file = tmp_path / "stop"
    stop_file.touch()
    monkeypatch.setenv("ADVCAP_STOP_FILE", str(stop_file))
    for command in (args, ["eval", str(run)]):
        with pytest.raises(SystemExit) as exc:
            main(command)
        assert exc.value.code == EXIT_NO_PROGRESS
        err = capsys.readouterr().err
        assert "stopped on request" in err and "running it again the same way would only repeat this" in err
        assert (tmp_path / "stop.outcome").read_text() == "no-progress\n"
    assert not (run / "metrics.json").exists() and not (run / "predictions.jsonl").exists()
    assert (run / "hf" / "model.safetensors").read_bytes() == model

    stop_file.unlink()
    main(args)
    assert "baseline seed 0  evaluated" in capsys.readouterr().out
    assert set(metrics_of(run)["test"]) == {"clean"}


@pytest.mark.slow
def test_parallel_runs_give_the_results_of_sequential_ones(data, tmp_path, capsys):
    """--parallel 2: two spawned workers, one torch thread each (as the tests' own process has)."""
    results = {}
    for parallel in (1, 2):
        out = tmp_path / f"p{parallel}" / "toy"
        main(["ablation", "--phases", *PHASES, "--seeds", "0", "--out", str(out), "--parallel", str(parallel), *tiny(data)])
        results[parallel] = {
            phase: (metrics_of(out / phase / "seed0"),
                    json.loads((out / phase / "seed0" / "provenance.json").read_text())["weights_sha256"])
            for phase in PHASES
        }
    assert results[1] == results[2]
    assert capsys.readouterr().out.count(" done ") == 4


def simulate(plan, waiting_on, workers: int) -> tuple[list[tuple[str, int, float]], float]:
    """(phase, seed, start time) of each run and the end time, with each run taking its expected cost."""
    queue, running, ended, starts, now = start_order(plan, waiting_on), [], set(), [], 0.0
    while queue or running:
        while len(running) < workers and (run := next_ready(queue, waiting_on, ended)) is not None:
            queue.remove(run)
            running.append((now + expected_cost(run), run))
            starts.append((run.phase, run.seed, now))
        running.sort(key=lambda r: r[0])
        now, finished = running.pop(0)
        ended.add(finished.run_dir)
    return starts, now


def test_parallel_scheduling_waits_only_for_the_transfer_source_and_keeps_cores_busy(data, tmp_path):
    phases = ["baseline", "adversarial", "adv_train", "freeze_vit", "freeze_gpt"]
    plan = plan_ablation(phases, [0, 1, 2], tmp_path / "runs", tiny(data, "[clean,transfer-fgsm]"))
    waiting_on = _transfer_sources(plan)
    for run in plan:
        expected = set() if run.phase == "baseline" else {tmp_path / "runs" / "baseline" / f"seed{run.seed}"}
        assert waiting_on[run.run_dir] == expected
    starts, end = simulate(plan, waiting_on, workers=2)
    assert [(p, s) for p, s, _ in starts[:3]] == [("baseline", 0), ("baseline", 1), ("baseline", 2)]
    started = {(p, s): t for p, s, t in starts}
    baseline_end = {s: started[("baseline", s)] + expected_cost(next(r for r in plan if (r.phase, r.seed) == ("baseline", s)))
                    for s in range(3)}
    assert all(t >= baseline_end[s] for (p, s), t in started.items() if p != "baseline")
    # No core idles while a run could start: the end is within one run of perfect packing.
    total = sum(expected_cost(r) for r in plan)
    assert end <= total / 2 + max(expected_cost(r) for r in plan) / 2
    # Phase-by-phase waves (all baselines, then the rest) left a core idle through the third baseline: here
    # a run whose baseline has ended starts beside it.
    assert min(t for (p, _), t in started.items() if p != "baseline") < baseline_end[2]


@pytest.mark.slow
def test_parallel_runs_train_the_transfer_source_first(data, tmp_path):
    """transfer-fgsm needs the same seed's baseline model: with --parallel a run starts once its baseline ended."""
    out = tmp_path / "runs" / "toy"
    results = run_plan(plan_ablation(PHASES, [0, 1], out, tiny(data, "[clean,transfer-fgsm]")), parallel=2)
    assert [r.status for r in results] == ["done"] * 4
    for seed in (0, 1):
        metrics = metrics_of(out / "adv_train" / f"seed{seed}")
        assert metrics["test"]["transfer-fgsm"]["images"] == 6
