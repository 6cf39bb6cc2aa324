"""Benchmark: the two `mixed` schemes under DDP, ZeRO-1 and ZeRO-2, measured side by side in one run.

    .venv/bin/python bench/engines.py [--repeats 3] [--steps 6] [--accum 2] [--batch 4] [--arch tiny|small]
                                      [--image-size 64]

Each engine runs on 2 gloo ranks on the CPU, started as the tests start them: `accelerate launch --config_file
configs/accelerate/{ddp,zero1,zero2}.yaml` (the shipped launcher configs and DeepSpeed JSONs), one rank per core
(OMP_NUM_THREADS=1). Inside a launch the loop's own pieces run: `make_accelerator`, `configure_deepspeed`, the
engine's driver and `train_micro_step`, for `mixed` training (α = ½, FGSM) with `--accum` micro-batches per
optimizer step, under each scheme of advcap.step:
  reuse      the clean backward off the sync / accumulation boundary yields ∂L/∂x; then the adversarial backward
  combined   autograd.grad(retain_graph) for ∂L/∂x, then one backward of the combined loss
Per engine × scheme it reports
  steps/s         optimizer steps per second on rank 0 (micro-batches + the driver's step; the loop's bookkeeping,
                  the same for every variant, is left out): the median over repeats of each repeat's steps/s;
                  "vs reuse": the median over repeats of combined/reuse steps/s within one launch
  reduced bytes   bytes one rank hands to gradient reductions per optimizer step. DDP: the sizes of the buckets
                  its communication hook all-reduces (a counting wrapper around torch's `allreduce_hook`).
                  DeepSpeed: the message sizes deepspeed.comm's comms logger records for reduction ops
                  (all_reduce, reduce, reduce_scatter, ...). Also shown as a multiple of the trainable
                  gradient's bytes ("× grad": 1 = one reduction of the whole gradient per step)
  gathered bytes  the other collectives' bytes per optimizer step (DeepSpeed: the all-gather of the updated
                  partitions)
Bytes are counted on one optimizer step per scheme, after a warm-up step; timing runs without the counters'
cost (DeepSpeed's logger off). Repeats are interleaved: each repeat launches DDP, ZeRO-1 and ZeRO-2 in turn,
and within a launch the schemes alternate step by step (in alternating order), so machine-load drift hits
all variants alike. `default` marks the scheme training picks for the engine (advcap.distributed). The last
line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINES = {"ddp": "ddp.yaml", "zero1": "zero1.yaml", "zero2": "zero2.yaml"}
SCHEMES = ("reuse", "combined")
REDUCTIONS = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_reduce_coalesced",
              "inference_all_reduce")


# ---------------------------------------------------------------- the parent: launches, repeats, the table

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(engine: str, args: argparse.Namespace, out: Path) -> dict:
    """One `accelerate launch` of the worker under `engine`'s launcher config; what rank 0 wrote."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "SLURM_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch",
        "--config_file", str(REPO / "configs" / "accelerate" / ENGINES[engine]),
        "--num_processes", "2", "--main_process_port", str(_free_port()),
        str(Path(__file__).resolve()), "--worker", "--out", str(out),
        "--steps", str(args.steps), "--accum", str(args.accum), "--batch", str(args.batch),
        "--arch", args.arch, "--image-size", str(args.image_size),
    ]
    # From the project root: the launcher configs name their DeepSpeed JSON relative to it.
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0 or not out.exists():
        sys.exit(f"bench/engines.py: the {engine} launch failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def summarise(runs: dict[str, list[dict]], args: argparse.Namespace) -> dict:
    """Medians over repeats per engine × scheme, and each engine's cheaper scheme."""
    engines = {}
    for engine, repeats in runs.items():
        first = repeats[0]
        engines[engine] = {"default_scheme": first["default_scheme"]}
        for scheme in SCHEMES:
            rates = [len(r["times_s"][scheme]) / sum(r["times_s"][scheme]) for r in repeats]
            engines[engine][scheme] = {
                "steps_per_s": round(statistics.median(rates), 4),
                "steps_per_s_each_repeat": [round(x, 4) for x in rates],
                **first["bytes"][scheme],
            }
        # The ratio within each launch (same processes, alternating steps), then its median over repeats.
        ratios = [a / b for a, b in zip(engines[engine]["combined"]["steps_per_s_each_repeat"],
                                        engines[engine]["reuse"]["steps_per_s_each_repeat"])]
        engines[engine]["combined_over_reuse"] = round(statistics.median(ratios), 3)
        engines[engine]["combined_over_reuse_each_repeat"] = [round(x, 3) for x in ratios]
        engines[engine]["faster_scheme"] = "combined" if engines[engine]["combined_over_reuse"] > 1 else "reuse"
    first = next(iter(runs.values()))[0]
    return {
        "arch": args.arch, "image_size": args.image_size, "batch_per_rank": args.batch, "accum": args.accum,
        "world_size": first["world_size"], "steps": args.steps, "repeats": args.repeats,
        "parameters_m": first["parameters_m"], "gradient_bytes": first["gradient_bytes"],
        "torch": first["versions"]["torch"], "deepspeed": first["versions"]["deepspeed"],
        "accelerate": first["versions"]["accelerate"], "engines": engines,
    }


def print_table(figures: dict) -> None:
    grad = figures["gradient_bytes"]
    print(f"{figures['arch']}: {figures['parameters_m']} M parameters ({grad / 1e6:.2f} MB of fp32 gradient), "
          f"{figures['world_size']} gloo ranks × batch {figures['batch_per_rank']} × {figures['accum']} micro-batches, "
          f"{figures['image_size']} px, median of {figures['repeats']} repeat(s) × {figures['steps']} steps")
    print(f"{'engine':7s} {'scheme':9s} {'steps/s':>8s} {'vs reuse':>9s} {'MB reduced':>11s} {'× grad':>7s} "
          f"{'reductions':>10s} {'MB gathered':>12s}")
    for engine, row in figures["engines"].items():
        for scheme in SCHEMES:
            cell = row[scheme]
            mark = " default" if scheme == row["default_scheme"] else ""
            ratio = 1.0 if scheme == "reuse" else row["combined_over_reuse"]
            print(f"{engine:7s} {scheme:9s} {cell['steps_per_s']:8.3f} {ratio:8.2f}× "
                  f"{cell['reduced_bytes_per_step'] / 1e6:11.2f} {cell['reduced_bytes_per_step'] / grad:7.2f} "
                  f"{cell['reductions_per_step']:10.1f} {cell['gathered_bytes_per_step'] / 1e6:12.2f}{mark}")
    print(json.dumps(figures))


def parent(args: argparse.Namespace) -> None:
    runs: dict[str, list[dict]] = {engine: [] for engine in ENGINES}
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        for repeat in range(args.repeats):
            for engine in ENGINES:
                started = time.perf_counter()
                runs[engine].append(launch(engine, args, Path(tmp) / f"{engine}-{repeat}.json"))
                print(f"repeat {repeat + 1}/{args.repeats} {engine}: {time.perf_counter() - started:.0f} s",
                      file=sys.stderr, flush=True)
    print_table(summarise(runs, args))


# ---------------------------------------------------------------- the worker: one engine, both schemes

class ReductionCounter:
    """Bytes and number of collectives one rank issues, while `on` (DDP: a comm hook; DeepSpeed: its logger)."""

    def __init__(self, model, deepspeed: bool):
        self.deepspeed, self.on = deepspeed, False
        self.reduced = self.gathered = self.reductions = 0
        if not deepspeed:
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def counting_allreduce(state, bucket):
                if self.on:
                    buffer = bucket.buffer()
                    self.reduced += buffer.numel() * buffer.element_size()
                    self.reductions += 1
                return allreduce_hook(state, bucket)

            model.register_comm_hook(None, counting_allreduce)  # None: the default (world) process group

    def start(self) -> None:
        self.reduced = self.gathered = self.reductions = 0
        self.on = True
        if self.deepspeed:
            import deepspeed.comm as dist
            from deepspeed.comm.comm import comms_logger

            comms_logger.reset_data()
            dist.configure(enabled=True, prof_all=True, verbose=False)

    def stop(self) -> None:
        self.on = False
        if self.deepspeed:
            import deepspeed.comm as dist
            from deepspeed.comm.comm import comms_logger

            dist.configure(enabled=False)
            # {op name: {message bytes: [count, latencies, algbw, busbw]}}
            for name, sizes in comms_logger.get_raw_data().items():
                count = sum(v[0] for v in sizes.values())
                total = sum(size * v[0] for size, v in sizes.items())
                if name in REDUCTIONS:
                    self.reduced += total
                    self.reductions += count
                else:
                    self.gathered += total


def _batches(args, world: int, rank: int, vocab: int):
    """This rank's micro-batches (pixels in [0,1], labels of mixed lengths) and the loss scale of the loop."""
    import torch

    g = torch.Generator().manual_seed(0)
    n = world * args.accum * args.batch
    pixels = torch.rand(n, 3, args.image_size, args.image_size, generator=g)
    labels = torch.randint(1, vocab, (n, 24), generator=g)
    labels[::2, 16:] = -100
    loss_scale = world / int((labels != -100).sum())  # world / global target tokens, as advcap.train
    mine = slice(rank * args.accum * args.batch, (rank + 1) * args.accum * args.batch)
    pixels, labels = pixels[mine], labels[mine]
    return [(pixels[i::args.accum], labels[i::args.accum]) for i in range(args.accum)], loss_scale


def worker(args: argparse.Namespace) -> None:
    import accelerate
    import deepspeed
    import torch
    from accelerate.utils import DistributedType

    from advcap.distributed import configure_deepspeed, make_accelerator, make_driver
    from advcap.step import StepSettings, train_micro_step
    from advcap.model import PRESET_ARCHS
    from step import ARCHS, build  # bench/step.py's benchmark model (this script's folder is on sys.path)

    accelerator = make_accelerator("fp32")
    world, rank = accelerator.num_processes, accelerator.process_index
    is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    arch, vocab = {"tiny": (PRESET_ARCHS["tiny"], 300), **ARCHS}[args.arch]
    torch.manual_seed(0)
    captioner = build(arch, args.image_size, vocab)
    optimizer = torch.optim.AdamW(captioner.parameters(), lr=1e-9)  # the weights barely move: cost only
    if is_deepspeed:
        configure_deepspeed(accelerator, world * args.batch * args.accum, args.batch, args.accum, 1.0)
    model, optimizer = accelerator.prepare(captioner, optimizer)
    driver = make_driver(accelerator, model, optimizer, 1.0)
    attack_model = accelerator.unwrap_model(model)
    counter = ReductionCounter(model, is_deepspeed)
    micro, loss_scale = _batches(args, world, rank, vocab)
    settings = {s: StepSettings(mode="mixed", clean_weight=0.5, epsilon=0.05, scheme=s) for s in SCHEMES}

    def optimizer_step(scheme: str) -> None:
        for i, (pixels, labels) in enumerate(micro):
            last = i == args.accum - 1
            backward, no_sync = driver.micro_batch(last=last)
            train_micro_step(model, attack_model, pixels, labels, settings[scheme], loss_scale, backward, no_sync,
                             sync=last)
        driver.step(skip=False, grad_norm=driver.grad_norm())

    counted = {}
    for scheme in SCHEMES:
        optimizer_step(scheme)  # warm-up
        counter.start()
        optimizer_step(scheme)
        counter.stop()
        counted[scheme] = {"reduced_bytes_per_step": counter.reduced, "reductions_per_step": counter.reductions,
                           "gathered_bytes_per_step": counter.gathered}
    times = {scheme: [] for scheme in SCHEMES}
    for step in range(args.steps):
        for scheme in SCHEMES if step % 2 == 0 else SCHEMES[::-1]:
            torch.distributed.barrier()
            started = time.perf_counter()
            optimizer_step(scheme)
            times[scheme].append(time.perf_counter() - started)
    if accelerator.is_main_process:
        trainable = [p for p in captioner.parameters() if p.requires_grad]
        Path(args.out).write_text(json.dumps({
            "engine": "zero%d" % accelerator.state.deepspeed_plugin.zero_stage if is_deepspeed else "ddp",
            "world_size": world, "default_scheme": driver.mixed_scheme, "times_s": times, "bytes": counted,
            "parameters_m": round(sum(p.numel() for p in captioner.parameters()) / 1e6, 2),
            "gradient_bytes": sum(p.numel() * p.element_size() for p in trainable),
            "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                         "accelerate": accelerate.__version__},
        }))
    accelerator.wait_for_everyone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="launches per engine, interleaved")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per scheme and launch")
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--batch", type=int, default=4, help="samples per micro-batch and rank")
    parser.add_argument("--arch", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per launch")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.accum < 2:
        parser.error("--accum must be at least 2: the schemes differ on micro-batches off the boundary")
    worker(args) if args.worker else parent(args)


if __name__ == "__main__":
    main()
