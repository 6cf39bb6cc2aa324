"""Benchmark: size the study on one GPU — step rates, the loader against them, and the GPU-hours.

    bench/gpu.sh                                  # on a CUDA GPU: paper sizes, bf16
    bench/gpu.sh --device cpu --arch small --precision fp32 --repeats 1 --batch 2 --image-size 32

Runs, each in its own process (so peak memory and thread settings are each one's own):
  1. bench/step.py at the given sizes and precision: samples/s of every step variant;
  2. bench/loader.py --train-stream: images/s of the training input path with `--workers` processes;
then reads the shipped phase configs (the paper's five phases; `train.steps`, `train.global_batch_size`,
`train.mode`, `freeze.modules`, `attack.random_start`) and computes, per phase, the variant its step runs,
the loader's headroom (loader images/s ÷ the step's samples/s: below 1 the GPU waits for data) and
the GPU-hours of its `--seeds` runs: seeds × steps × global batch ÷ samples/s ÷ 3600. The figure covers the
training steps only: validation while training and the evaluation are not in it (their size is printed).
The micro-batch defaults to what one GPU runs (`per_rank_batch_size(cfg, 1)`); a smaller `--batch` stands
for accumulation, whose extra optimizer steps the rate slightly overstates. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from advcap.config import Config, load_config, per_rank_batch_size
from advcap.demo import PAPER_PHASES
from step import check_device  # bench/ is the script's directory, first on sys.path

HERE = Path(__file__).resolve().parent


def phase_variant(cfg: Config) -> str:
    """The bench/step.py variant a phase's training step runs (its mode, freeze policy and attack start)."""
    freeze = cfg.freeze
    if freeze.keep_trainable or freeze.also_freeze:
        raise SystemExit(f"phase {cfg.run.phase}: freeze patterns have no step variant in bench/step.py")
    if cfg.train.mode != "mixed":
        if freeze.modules != "none":
            raise SystemExit(f"phase {cfg.run.phase}: mode {cfg.train.mode} with freeze {freeze.modules} is not benchmarked")
        return cfg.train.mode  # clean | adversarial
    if cfg.attack.random_start:
        return "mixed_combined"  # random-start FGSM needs the combined scheme (advcap.step)
    return {"none": "mixed", "encoder": "mixed_freeze_vit", "decoder": "mixed_freeze_gpt"}[freeze.modules]


def run_json(argv: list[str]) -> dict:
    """Run a benchmark script, echo its report, return its last line parsed as JSON (exit on failure)."""
    done = subprocess.run([sys.executable, *argv], stdout=subprocess.PIPE, text=True)
    lines = done.stdout.strip().splitlines()
    for line in lines[:-1]:
        print(f"  {line}")
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(argv)} failed (exit {done.returncode})")
    return json.loads(lines[-1])


def study_cost(configs: dict[str, Config], step: dict, loader_rate: float, seeds: int) -> dict[str, dict]:
    """Per phase: its variant, the step's samples/s, the loader's headroom and the GPU-hours of `seeds` runs."""
    phases = {}
    for phase, cfg in configs.items():
        variant = phase_variant(cfg)
        rate = step[f"{variant}_samples_per_s"]
        samples = seeds * cfg.train.steps * cfg.train.global_batch_size
        phases[phase] = {
            "variant": variant, "steps": cfg.train.steps, "global_batch_size": cfg.train.global_batch_size,
            "samples_per_s": rate, "loader_headroom": round(loader_rate / rate, 2),
            "gpu_hours": round(samples / rate / 3600, 3),
        }
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--precision", choices=("fp32", "bf16", "tf32"), default="bf16")
    parser.add_argument("--arch", choices=("small", "paper"), default="paper")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch (default: the config's on one GPU)")
    parser.add_argument("--image-size", type=int, default=None, help="px (default: the config's data.image_size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--workers", type=int, default=None, help="loader processes (default: data.workers)")
    parser.add_argument("--loader-images", type=int, default=256)
    parser.add_argument("--loader-batches", type=int, default=40, help="batches per loader worker")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    check_device(args.device, args.precision)

    configs = {phase: load_config(phase) for phase in PAPER_PHASES}
    base = configs[PAPER_PHASES[0]]
    batch = args.batch or per_rank_batch_size(base, 1)
    image_size = args.image_size or base.data.image_size
    workers = base.data.workers if args.workers is None else args.workers

    step_argv = [str(HERE / "step.py"), "--device", args.device, "--precision", args.precision, "--arch", args.arch,
                 "--batch", str(batch), "--image-size", str(image_size), "--repeats", str(args.repeats)]
    if args.peak_tflops:
        step_argv += ["--peak-tflops", str(args.peak_tflops)]
    print(f"step: {' '.join(step_argv[1:])}")
    step = run_json(step_argv)
    loader_argv = [str(HERE / "loader.py"), "--train-stream", "--workers", str(workers), "--batch", str(batch),
                   "--image-size", str(image_size), "--images", str(args.loader_images),
                   "--batches", str(args.loader_batches), "--repeats", "1"]
    print(f"loader: {' '.join(loader_argv[1:])}")
    loader = run_json(loader_argv)
    loader_rate = loader["train_stream_img_per_s"]
    phases = study_cost(configs, step, loader_rate, args.seeds)
    total = round(sum(p["gpu_hours"] for p in phases.values()), 3)

    print(f"\nthe study on one {step['device_name']} ({args.precision}, {args.arch}, micro-batch {batch}, "
          f"{image_size} px): {len(phases)} phases × {args.seeds} seeds")
    print(f"{'phase':12s} {'step variant':18s} {'samples/s':>10s} {'MFU':>6s} {'loader ×':>9s} {'steps × batch':>14s} {'GPU-hours':>10s}")
    for phase, p in phases.items():
        mfu = step[f"{p['variant']}_mfu"]
        print(f"{phase:12s} {p['variant']:18s} {p['samples_per_s']:10.3f} {'-' if mfu is None else f'{mfu:.0%}':>6s} "
              f"{p['loader_headroom']:9.2f} {p['steps']:>7d} × {p['global_batch_size']:<4d} {p['gpu_hours']:10.2f}")
    print(f"total: {total:.2f} GPU-hours (training steps only; validation every {base.train.val_every_steps} steps on "
          f"{base.train.val_images} images and the evaluation of {base.eval.splits} are not included)")
    print(f"loader: {loader_rate} img/s with {workers} workers; peak memory {step['peak_memory_bytes'] / 2**30:.2f} GiB")
    slow = [phase for phase, p in phases.items() if p["loader_headroom"] < 1]
    if slow:
        print(f"the loader is slower than the step in {', '.join(slow)}: raise data.workers or the GPU waits")
    print(json.dumps({
        "device": step["device"], "device_name": step["device_name"], "precision": args.precision, "arch": args.arch,
        "batch": batch, "image_size": image_size, "seeds": args.seeds, "loader_workers": workers,
        "loader_img_per_s": loader_rate, "peak_memory_bytes": step["peak_memory_bytes"],
        "peak_tflops": step["peak_tflops"], "phases": phases, "gpu_hours": total,
        "not_included": "validation while training and evaluation", "step": step,
    }))


if __name__ == "__main__":
    main()
