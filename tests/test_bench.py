"""The benchmarks a user runs where they train: bench/gpu.sh end to end on the CPU (its figures recomputed
from the step rates it prints), bench/step.py's bf16 path and its refusals on a machine without CUDA."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from advcap.config import load_config
from advcap.demo import PAPER_PHASES

BENCH = Path(__file__).resolve().parents[1] / "bench"
VARIANTS = {"baseline": "clean", "adversarial": "adversarial", "adv_train": "mixed",
            "freeze_vit": "mixed_freeze_vit", "freeze_gpt": "mixed_freeze_gpt"}


def run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # One thread: the machine's two cores are shared, and oversubscribed threads make timings crawl.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}  # gpu.sh runs this interpreter
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, timeout=timeout)


def bench_step_module():
    """bench/step.py imported as a module (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_step", BENCH / "step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_benchmark_runs_on_the_cpu_end_to_end():
    done = run(BENCH / "gpu.sh", "--device", "cpu", "--arch", "small", "--precision", "fp32", "--repeats", "1",
               "--batch", "2", "--image-size", "32", "--peak-tflops", "1", "--loader-images", "32",
               "--loader-batches", "6", "--seeds", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    step = out["step"]
    assert (out["device"], out["precision"], out["arch"], out["batch"], out["seeds"]) == ("cpu", "fp32", "small", 2, 3)
    assert step["device"] == "cpu" and step["precision"] == "fp32" and step["attn_implementation"] == "sdpa"
    assert out["loader_img_per_s"] > 0 and out["peak_memory_bytes"] > 0 and out["peak_tflops"] == 1.0

    expected_total = 0.0
    assert list(out["phases"]) == list(PAPER_PHASES)
    for phase, figures in out["phases"].items():
        cfg = load_config(phase)
        variant = VARIANTS[phase]
        rate = step[f"{variant}_samples_per_s"]
        assert figures["variant"] == variant and figures["samples_per_s"] == rate > 0
        assert (figures["steps"], figures["global_batch_size"]) == (cfg.train.steps, cfg.train.global_batch_size)
        # Recomputed from the printed rate: the study's samples of this phase over its rate.
        hours = 3 * cfg.train.steps * cfg.train.global_batch_size / rate / 3600
        assert figures["gpu_hours"] == pytest.approx(hours, abs=1e-3)
        assert figures["loader_headroom"] == pytest.approx(out["loader_img_per_s"] / rate, abs=0.01)
        expected_total += hours
    assert out["gpu_hours"] == pytest.approx(expected_total, abs=5e-3)

    for variant in ("clean", "adversarial", "mixed", "mixed_freeze_vit", "mixed_freeze_gpt", "mixed_combined"):
        seconds, gflop = step[f"{variant}_s"], step[f"{variant}_gflop"]
        assert seconds > 0 and gflop > 0
        assert step[f"{variant}_samples_per_s"] == pytest.approx(2 / seconds, rel=2e-3)
        # MFU = counted FLOPs / time / peak (1 TFLOP/s here); the printed GFLOP are rounded to 0.1.
        assert step[f"{variant}_mfu"] == pytest.approx(gflop * 1e9 / seconds / 1e12, rel=0.05, abs=1e-4)
    assert step["mixed_gflop"] == pytest.approx(2 * step["clean_gflop"], rel=0.05)  # its floor, 2× clean
    assert "GPU-hours" in done.stdout and "validation" in done.stdout  # the table says what it leaves out


def test_step_benchmark_without_a_gpu_refuses_in_words():
    for argv, says in ((["--device", "cuda"], "sees no CUDA device"), (["--precision", "tf32"], "CUDA GPUs only")):
        done = run(sys.executable, BENCH / "step.py", *argv, timeout=60)
        assert done.returncode != 0 and says in done.stderr and "Traceback" not in done.stderr


def test_bf16_runs_the_forward_under_autocast_with_fp32_loss_and_weights():
    bench = bench_step_module()
    arch, vocab = bench.ARCHS["small"]
    model = bench.build(arch, 32, vocab)
    bench.set_precision(model, "cpu", "bf16")
    seen = []
    model.model.decoder.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    pixels, labels = torch.rand(2, 3, 32, 32), torch.randint(1, vocab, (2, 6))
    loss = model(pixels, labels)
    loss.backward()
    assert seen == [torch.bfloat16] and loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32) for p in model.parameters())


def test_flop_count_includes_the_cpu_attention_kernels():
    from torch.utils.flop_counter import FlopCounterMode

    bench = bench_step_module()
    arch, vocab = bench.ARCHS["small"]
    model = bench.build(arch, 32, vocab)
    pixels, labels = torch.rand(2, 3, 32, 32), torch.randint(1, vocab, (2, 6))
    settings = bench.StepSettings(mode="clean", clean_weight=0.5, epsilon=0.05)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-9)
    counted = bench.count_flops(model, optimizer, pixels, labels, settings)
    with FlopCounterMode(display=False) as torch_count:  # torch's table: no CPU SDPA kernel in it
        bench.step(model, optimizer, pixels, labels, settings)
    # ViT: 4 layers × (fwd QKᵀ and AV 4·n²·d + bwd twice that) with n = 5 tokens (4 patches + CLS), d = 256.
    vit_attention = 4 * 2 * (4 * 5 * 5 * 256) * 3
    assert counted - torch_count.get_total_flops() >= vit_attention
