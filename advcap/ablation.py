"""The ablation: phases × seeds trained and evaluated locally, in sequence, into runs/<dataset>/<phase>/seed<k>/.

The paired design: within a seed every phase starts from the same initialisation and sees the same data
order and number of steps (both are functions of the config's data/train settings and train.seed), so
the phase configs may differ only in PAIRED_KEYS; anything else is refused before any run starts.

A run counts as done only if its resolved config matches the one asked for. Before running, each run dir
is classified (`RunState`): new, resumable (checkpoints of an unfinished run), to evaluate (trained, no
fresh metrics.json), finished (skipped), or conflict (its config.yaml differs: refused, never reused).
A failed or refused run is logged and reported; the rest goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from advcap import faults
from advcap.errors import AdvcapError
from advcap.stopping import Stopped

log = logging.getLogger(__name__)

PAIRED_KEYS = ("train.mode", "train.clean_weight", "freeze", "attack", "run.phase")
# Set by the ablation itself from --seeds / --out and the phase configs: never as overrides.
OWN_KEYS = ("train.seed", "run.out", "run.dataset", "run.phase")
TRANSFER = "transfer-fgsm"
TRANSFER_SOURCE_PHASE = "baseline"


class RunState:
    """What a run directory holds relative to the config asked for (see classify)."""

    NEW = "new"  # nothing there (or a config but neither checkpoints nor a finished run): train
    RESUME = "resume"  # the same config, checkpoints of an unfinished run: continue from the latest
    EVALUATE = "evaluate"  # trained with the same config; metrics missing, older than the model or of other eval settings
    FINISHED = "finished"  # trained and evaluated with the same config: skipped
    CONFLICT = "conflict"  # config.yaml differs from the one asked for outside `eval`: refused


@dataclass(frozen=True)
class PlannedRun:
    """One phase × seed of the ablation: the resolved config, its run dir and what it holds."""

    phase: str
    seed: int
    config: Any  # advcap.config.Config
    run_dir: Path
    state: str  # a RunState value
    detail: str = ""  # for CONFLICT: the differing keys


@dataclass(frozen=True)
class RunResult:
    """The outcome of one planned run."""

    phase: str
    seed: int
    run_dir: Path
    status: str  # "done" (trained + evaluated) | "evaluated" | "skipped" | "refused" | "failed" | "stopped"
    wall_time_s: float
    error: str = ""
    progress: bool = False  # it left something durable this time: a checkpoint, a trained model, metrics

    @property
    def ok(self) -> bool:
        return self.status in ("done", "evaluated", "skipped")


# ---------------------------------------------------------------- planning


def phase_configs(
    phases: Sequence[str], seed: int, out: str | Path, overrides: Sequence[str] = (), config_dir: str | Path | None = None
) -> list[Any]:
    """The resolved config of each phase for one seed, with its run dir at `out/<phase>/seed<seed>`.

    `out` is runs/<dataset>: run.out becomes its parent and run.dataset its name. A phase is a config
    name or path; with `config_dir`, `config_dir/<phase>.yaml` is preferred when it exists.
    """
    from advcap.config import load_config

    out = Path(out)
    if not out.name or out.name in (".", ".."):
        raise AdvcapError(f"--out {out} must name a dataset folder, e.g. runs/demo")
    own = [f"train.seed={seed}", f"run.out={out.parent}", f"run.dataset={out.name}"]
    configs = []
    for phase in phases:
        source: str | Path = phase
        if config_dir is not None and (Path(config_dir) / f"{phase}.yaml").is_file():
            source = Path(config_dir) / f"{phase}.yaml"
        configs.append(load_config(source, [*overrides, *own]))
    return configs


def check_paired(configs: Sequence[Any], phases: Sequence[str]) -> None:
    """Raise AdvcapError unless the configs of one seed differ only in PAIRED_KEYS (and have distinct phases)."""
    from advcap.config import diff_configs

    names = [c.run.phase for c in configs]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise AdvcapError(
                f"phases {phases[names.index(name)]!r} and {phases[i]!r} both set run.phase={name}: "
                "they would share a run directory"
            )
    first = configs[0]
    for phase, cfg in zip(phases[1:], configs[1:]):
        diffs = diff_configs(first, cfg, ignore=("train.seed", *PAIRED_KEYS))
        if diffs:
            raise AdvcapError(
                f"phases {phases[0]!r} and {phase!r} differ in {'; '.join(diffs)}: a paired ablation needs every "
                f"phase of a seed to share data, model and training settings; only {', '.join(PAIRED_KEYS)} "
                "(freeze.* and attack.* whole) may differ between phases"
            )


def _with_transfer(cfg: Any, baseline_dir: Optional[Path]) -> Any:
    """Point transfer-fgsm at the same seed's baseline; the baseline itself has no transfer source.

    An explicit eval.transfer_from (an override) is kept for every phase.
    """
    if TRANSFER not in cfg.eval.conditions or cfg.eval.transfer_from is not None:
        return cfg
    if cfg.run.phase == TRANSFER_SOURCE_PHASE:
        conditions = [c for c in cfg.eval.conditions if c != TRANSFER]
        return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, conditions=conditions))
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, transfer_from=str(baseline_dir)))


def plan_ablation(
    phases: Sequence[str],
    seeds: Sequence[int],
    out: str | Path,
    overrides: Sequence[str] = (),
    config_dir: str | Path | None = None,
) -> list[PlannedRun]:
    """Resolve and validate every phase × seed config and classify its run dir; nothing is written.

    Order: seed by seed; within a seed the phases as given, except that the baseline goes first when
    transfer-fgsm needs it. Raises AdvcapError for a bad phase list, a forbidden override, or phase
    configs that break the paired design.
    """
    from advcap.rundir import run_path

    if not phases:
        raise AdvcapError("--phases needs at least one phase")
    if not seeds:
        raise AdvcapError("--seeds needs at least one seed")
    if len(set(phases)) != len(phases):
        raise AdvcapError(f"--phases lists a phase twice: {' '.join(phases)}")
    if len(set(seeds)) != len(seeds):
        raise AdvcapError(f"--seeds lists a seed twice: {' '.join(map(str, seeds))}")
    for item in overrides:
        key = item.partition("=")[0]
        if key in OWN_KEYS:
            raise AdvcapError(
                f"override {item!r} is set by the ablation itself: use --seeds for train.seed, "
                "--out runs/<dataset> for run.out/run.dataset, and the phase configs for run.phase"
            )

    plan = []
    for seed in seeds:
        configs = phase_configs(phases, seed, out, overrides, config_dir)
        check_paired(configs, phases)
        needs_baseline = any(TRANSFER in c.eval.conditions and c.eval.transfer_from is None for c in configs)
        baseline = next((c for c in configs if c.run.phase == TRANSFER_SOURCE_PHASE), None)
        if needs_baseline and baseline is None:
            raise AdvcapError(
                f"eval.conditions has {TRANSFER}, whose images the ablation crafts on the same seed's baseline: "
                f"add {TRANSFER_SOURCE_PHASE} to --phases, or set eval.transfer_from to a run directory"
            )
        if needs_baseline:
            configs = [baseline] + [c for c in configs if c is not baseline]
        baseline_dir = run_path(baseline) if baseline is not None else None
        for cfg in configs:
            cfg = _with_transfer(cfg, baseline_dir)
            state, detail = classify(cfg)
            plan.append(PlannedRun(cfg.run.phase, seed, cfg, run_path(cfg), state, detail))
    return plan


def classify(cfg: Any) -> tuple[str, str]:
    """(RunState, detail) of the run dir of `cfg`; detail names the differing keys of a CONFLICT, or why a
    trained run is to be evaluated (not yet, new eval settings, a changed model: never a retraining)."""
    from advcap.config import UNTRAINED
    from advcap.rundir import RunDir

    rundir = RunDir.of(cfg)
    if not rundir.exists():
        return RunState.NEW, ""
    diffs = rundir.conflicts_with(cfg, ignore=UNTRAINED)
    if diffs:
        return RunState.CONFLICT, f"{rundir} holds a run with a different config ({'; '.join(diffs)})"
    if not rundir.training_finished():
        return (RunState.RESUME, "") if rundir.has_checkpoints() else (RunState.NEW, "")
    problem = rundir.evaluation_problem(cfg)
    return (RunState.FINISHED, "") if problem is None else (RunState.EVALUATE, problem)


def format_plan(plan: Sequence[PlannedRun]) -> str:
    """The plan as text: one line per run with what will happen to it."""
    action = {
        RunState.NEW: "train + evaluate",
        RunState.RESUME: "resume training from the latest checkpoint + evaluate",
        RunState.EVALUATE: "evaluate (already trained)",
        RunState.FINISHED: "skip (finished with this config)",
        RunState.CONFLICT: "refuse",
    }
    lines = []
    if plan:
        cfg = plan[0].config
        conditions = list(dict.fromkeys(c for p in plan for c in p.config.eval.conditions))
        lines.append(
            f"ablation into {Path(cfg.run.out) / cfg.run.dataset}: {len({p.phase for p in plan})} phases × "
            f"{len({p.seed for p in plan})} seeds, {cfg.train.steps} steps of global batch "
            f"{cfg.train.global_batch_size} each, eval conditions {', '.join(conditions)}"
        )
    width = max((len(p.phase) for p in plan), default=0)
    for i, p in enumerate(plan, 1):
        line = f"[{i}/{len(plan)}] {p.phase:<{width}} seed {p.seed}  {p.run_dir}: {action[p.state]}"
        if p.detail:
            line += f": {p.detail}"
        lines.append(line)
    return "\n".join(lines)


# ---------------------------------------------------------------- running


def run_plan(plan: Sequence[PlannedRun], parallel: int = 1) -> list[RunResult]:
    """Train and evaluate the planned runs; a failed or refused run never stops the others.

    parallel > 1 runs that many at a time, each in its own process with its share of the CPU threads:
    on a CPU host, small models use cores better as separate runs than as threads of one run.

    Under a distributed launcher every rank runs the plan together. A failure the ranks agreed on
    (advcap.distributed.RankFailure: every rank reached the same point and knows) fails that run on all
    ranks, and all go on with the next. Any other failure on one rank cannot be known by the others,
    which may be waiting in a collective it will never reach: that rank ends the job (the launcher stops
    the others) rather than let the ranks fall out of step; running the same command again goes on
    where it stopped.

    Logs the plan first; raises AdvcapError for a `parallel` that does not suit this process (check_parallel).
    """
    check_parallel(parallel)
    log.info("%s", format_plan(plan))
    if parallel > 1:
        return _run_parallel(plan, parallel)
    if plan:
        from advcap.distributed import make_accelerator

        # The process group first (under a launcher): the ranks agree on every run from the start. The phases
        # of a paired ablation share the precision and the timeout.
        make_accelerator(plan[0].config.train.precision, plan[0].config.dist.timeout_s)
    results: list[RunResult] = []
    failed_dirs: set[Path] = set()
    for i, planned in enumerate(plan, 1):
        result = _run_and_time(planned, failed_dirs)
        if not result.ok:
            failed_dirs.add(planned.run_dir)
        results.append(result)
        _log_result(i, len(plan), result)
        if result.status == "stopped":
            # A stop request is a preemption or time limit: the job must end now, not start the next run.
            log.warning("stopping the ablation; run it again to resume where it stopped")
            break
    return results


def _run_and_time(planned: PlannedRun, failed_dirs: set[Path]) -> RunResult:
    from advcap.distributed import RankFailure, launch_rank, launch_world_size

    started = time.perf_counter()
    progress = False
    try:
        status, error, progress = _run_one(planned, failed_dirs)
    except Stopped as err:
        status, error = "stopped", str(err)
    except RankFailure as err:
        status, error = "failed", str(err)
    except Exception as err:  # noqa: BLE001 — alone, any failure of one run is reported and the rest goes on
        if launch_world_size() > 1:
            log.error("rank %d: %s seed %d failed where the other ranks cannot know it (%s): ending the job so that "
                      "the ranks do not fall out of step; run the same command again to go on",
                      launch_rank(), planned.phase, planned.seed, err)
            raise
        status, error = "failed", str(err) or type(err).__name__
        if not isinstance(err, AdvcapError):
            log.exception("%s seed %d failed", planned.phase, planned.seed)
    return RunResult(planned.phase, planned.seed, planned.run_dir, status, time.perf_counter() - started, error,
                     progress)


def _log_result(i: int, n: int, result: RunResult) -> None:
    line = f"[{i}/{n}] {result.phase} seed {result.seed}: {result.status} in {result.wall_time_s:.1f} s"
    if result.error:
        log.error("%s: %s", line, result.error)
    else:
        log.info("%s", line)


def init_worker(threads: int, level: int) -> None:
    """A spawned worker process's set-up: its torch threads, and the parent's logging level and quiet."""
    import torch

    from advcap.logs import setup_logging

    torch.set_num_threads(threads)
    # A spawned process starts with no logging set up: the parent's level, and its quiet, apply here too.
    setup_logging(level, tag="[%(processName)s] ")


def _worker_main(conn: Any, threads: int, level: int) -> None:
    """A worker process of `_run_parallel`: runs the planned runs it is sent, one at a time."""
    init_worker(threads, level)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        conn.send(_run_and_time(*task))


class _Worker:
    """One spawned worker process and the run it is busy with."""

    def __init__(self, context: Any, threads: int, level: int):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, threads, level))
        self.process.start()
        child.close()
        self.task: Optional[PlannedRun] = None
        self.started = 0.0

    def start(self, planned: PlannedRun, failed: set[Path]) -> None:
        self.task, self.started = planned, time.perf_counter()
        self.conn.send((planned, failed))

    def died(self) -> RunResult:
        """The result of the run this worker was busy with when its process ended."""
        code = self.process.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit status {code}"
        planned = self.task
        return RunResult(planned.phase, planned.seed, planned.run_dir, "failed", time.perf_counter() - self.started,
                         f"its worker process died ({how}); run the ablation again to resume it")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def _run_parallel(plan: Sequence[PlannedRun], parallel: int) -> list[RunResult]:
    """`parallel` runs at a time in spawned worker processes (a forked child of a process that has used
    OpenMP threads can hang), results in plan order. A run whose transfer-fgsm needs another planned run's
    model starts once that run has ended; among the runs free to start, the sources of others go first,
    then the costliest (advcap.ablation.expected_cost), so that no core idles while runs wait and the
    short runs fill the end. A worker that dies (killed, out of memory) fails only the run it was busy
    with; a new worker takes its place and the others go on."""
    import multiprocessing
    from multiprocessing.connection import wait

    threads = max(1, (os.cpu_count() or 1) // parallel)
    log.info("running %d runs at a time, %d torch thread(s) each", parallel, threads)
    context = multiprocessing.get_context("spawn")
    level = logging.getLogger().getEffectiveLevel()
    waiting_on = _transfer_sources(plan)
    queue = start_order(plan, waiting_on)
    done: dict[Path, RunResult] = {}
    workers: list[_Worker] = []
    stopped = False
    try:
        while (queue and not stopped) or any(w.task for w in workers):
            while not stopped and len([w for w in workers if w.task]) < parallel:
                ready = next_ready(queue, waiting_on, done.keys())
                if ready is None:
                    break
                queue.remove(ready)
                idle = next((w for w in workers if w.task is None), None)
                if idle is None:
                    idle = _Worker(context, threads, level)
                    workers.append(idle)
                idle.start(ready, {d for d, r in done.items() if not r.ok})
            busy = [w for w in workers if w.task is not None]
            wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
            for worker in busy:
                if not worker.conn.poll() and worker.process.is_alive():
                    continue
                try:
                    result = worker.conn.recv()
                except (EOFError, OSError):  # the worker's end closed: it died
                    worker.process.join(timeout=10)
                    result = worker.died()
                    workers.remove(worker)
                worker.task = None
                done[result.run_dir] = result
                _log_result(len(done), len(plan), result)
                if result.status == "stopped" and not stopped:
                    log.warning("stopping the ablation after the runs in progress; run it again to resume")
                    stopped = True
    finally:
        for worker in workers:
            worker.close()
    return [done[p.run_dir] for p in plan if p.run_dir in done]


def start_order(plan: Sequence[PlannedRun], waiting_on: dict[Path, set[Path]]) -> list[PlannedRun]:
    """The order runs are offered to free workers: sources of other runs' transfer-fgsm first, then by
    expected cost, costliest first (longest-first leaves the short runs to even out the end)."""
    sources = set().union(*waiting_on.values()) if waiting_on else set()
    return sorted(plan, key=lambda p: (p.run_dir not in sources, -expected_cost(p)))


def next_ready(queue: Sequence[PlannedRun], waiting_on: dict[Path, set[Path]], ended: Any) -> Optional[PlannedRun]:
    """The first queued run whose transfer sources have all ended (done or failed), or None."""
    return next((p for p in queue if waiting_on[p.run_dir] <= ended), None)


def _transfer_sources(plan: Sequence[PlannedRun]) -> dict[Path, set[Path]]:
    """For each planned run, the planned runs whose model its transfer-fgsm needs (none if not planned)."""
    planned = {p.run_dir.resolve(): p.run_dir for p in plan}
    sources = {}
    for p in plan:
        source = p.config.eval.transfer_from if TRANSFER in p.config.eval.conditions else None
        resolved = Path(source).resolve() if source else None
        sources[p.run_dir] = {planned[resolved]} if resolved in planned and planned[resolved] != p.run_dir else set()
    return sources


# Forward/backward passes per training step, by train.mode: the attack's input-gradient pass costs one.
_PASSES = {"clean": 2, "adversarial": 4, "mixed": 4}


def expected_cost(planned: PlannedRun) -> float:
    """A relative estimate of what a run still costs, to order runs by: nothing when it is skipped, little
    when only its evaluation is due, else its training's steps × batch × passes per step."""
    if planned.state in (RunState.FINISHED, RunState.CONFLICT):
        return 0.0
    if planned.state == RunState.EVALUATE:
        return 1.0
    train = planned.config.train
    return float(train.steps * train.global_batch_size * _PASSES[train.mode])


def _run_one(planned: PlannedRun, failed_dirs: set[Path]) -> tuple[str, str, bool]:
    """Train (if needed) and evaluate one planned run, holding its run directory throughout.
    Returns (status, error, progress: whether this left anything durable: a checkpoint, a model, metrics)."""
    from advcap.evaluate import evaluate
    from advcap.rundir import RunDir
    from advcap.train import STOPPED, STOPPED_NO_PROGRESS, train

    cfg = planned.config
    if planned.state == RunState.CONFLICT:
        return "refused", planned.detail + "; it is never reused: choose another --out or remove that run", False
    source = cfg.eval.transfer_from
    if TRANSFER in cfg.eval.conditions and source and Path(source) in failed_dirs:
        return "refused", f"not evaluated: {TRANSFER} needs the model of {source}, which failed", False
    rundir = RunDir(planned.run_dir)
    trained = False
    with rundir.held():
        if planned.state == RunState.FINISHED:
            _record_eval_settings(rundir, cfg)  # a kill may have come between the metrics and config.yaml
            return "skipped", "", False
        if planned.state in (RunState.NEW, RunState.RESUME):
            outcome = train(cfg, resume="auto")
            if outcome == STOPPED:
                return "stopped", "training stopped on request (a checkpoint was saved)", True
            if outcome == STOPPED_NO_PROGRESS:
                return "stopped", "training stopped on request before its first step", False
            trained = True
        # Evaluation settings may have changed since training (they do not touch the model). Every rank
        # evaluates with `cfg.eval` as given; config.yaml records them only once the metrics that answer
        # to them are written.
        try:
            evaluate(planned.run_dir, settings=cfg.eval, data=cfg.data)
        except Stopped as err:
            return "stopped", f"{err} (the trained model is kept and evaluated next time)", trained
        faults.point("ablation.evaluated")
        _record_eval_settings(rundir, cfg)
    return ("done" if planned.state != RunState.EVALUATE else "evaluated"), "", True


def _record_eval_settings(rundir: Any, cfg: Any) -> None:
    from advcap.distributed import agree

    agree(f"recording the eval settings in {rundir.config_file}", lambda: rundir.record_eval_settings(cfg),
          main_only=True)


def format_results(results: Sequence[RunResult]) -> str:
    """A summary table of the outcomes, failed runs with their errors."""
    width = max((len(r.phase) for r in results), default=0)
    lines = [f"{r.phase:<{width}} seed {r.seed}  {r.status:<9} {r.wall_time_s:8.1f} s  {r.run_dir}" for r in results]
    bad = [r for r in results if not r.ok]
    if bad:
        lines.append(f"{len(bad)} of {len(results)} runs not done:")
        lines += [f"  {r.phase} seed {r.seed} ({r.status}): {r.error}" for r in bad]
    return "\n".join(lines)


def ablation(
    phases: Sequence[str],
    seeds: Sequence[int],
    out: str | Path,
    overrides: Sequence[str] = (),
    config_dir: str | Path | None = None,
    parallel: int = 1,
) -> list[RunResult]:
    """Plan (validating the paired design) and run every phase × seed into `out/<phase>/seed<k>/`.

    Args:
        phases: config names or paths, e.g. ["baseline", "adversarial", "adv_train", "freeze_vit", "freeze_gpt"].
        seeds: train.seed values; every phase is run with each.
        out: runs/<dataset>; run.out is its parent, run.dataset its name.
        overrides: dotted overrides applied to every phase (not train.seed / run.*).
        config_dir: folder searched first for `<phase>.yaml`.
        parallel: runs at a time, each in its own process (see run_plan).
    Returns one RunResult per run; check `.ok`. Raises AdvcapError only for a bad plan (nothing run).
    """
    return run_plan(plan_ablation(phases, seeds, out, overrides, config_dir), parallel)


def check_parallel(parallel: int) -> None:
    """Raise AdvcapError unless `parallel` (runs at a time) suits this process: ≥ 1, and 1 under a launcher."""
    from advcap.distributed import launch_world_size

    if parallel < 1:
        raise AdvcapError(f"--parallel {parallel}: expected a number of runs at a time ≥ 1")
    if parallel > 1 and launch_world_size() > 1:
        raise AdvcapError("--parallel is for one process on a CPU host; under a distributed launcher the ranks share each run")


def check_shards(plan: Sequence[PlannedRun]) -> None:
    """Raise AdvcapError unless every shard set the plan reads is complete (a dry run checks this now, not in
    every run)."""
    from advcap.data.manifest import data_manifest, require_complete_shards

    for data in {p.config.data for p in plan}:
        require_complete_shards(data_manifest(data))


def raise_for_results(plan: Sequence[PlannedRun], results: Sequence[RunResult]) -> None:
    """Turn an ablation's outcome into the process's: nothing if every planned run is done; Stopped if a stop
    request ended it (preemption or a time limit: EXIT_STOPPED lets a SLURM task requeue itself, unless nothing
    durable came of this start, when a requeue would only repeat it); else AdvcapError naming the runs not done."""
    bad = [r for r in results if not r.ok]
    not_started = len(plan) - len(results)
    if any(r.status == "stopped" for r in results):
        raise Stopped(f"stopped on request with {not_started + len(bad)} of {len(plan)} runs not done",
                      progress=any(r.progress for r in results))
    if bad or not_started:
        names = ", ".join(f"{r.phase}/seed{r.seed} ({r.status})" for r in bad)
        more = f"; {not_started} not started" if not_started else ""
        raise AdvcapError(f"{len(bad)} of {len(plan)} runs not done: {names}{more}")
