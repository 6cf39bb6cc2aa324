"""bench/engines.py at its smallest setting: DDP, ZeRO-1 and ZeRO-2 × the two `mixed` schemes on 2 real gloo
ranks (`accelerate launch` with the shipped launcher configs), its JSON read back.

What the bytes must show (2 micro-batches per optimizer step): DDP and ZeRO-1 reduce the gradient once per
optimizer step under either scheme; ZeRO-2 reduces on every backward, so `combined` (one backward per
micro-batch) reduces it once per micro-batch and `reuse` (two backwards per micro-batch) twice.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ACCUM = 2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def figures() -> dict:
    command = [sys.executable, str(REPO / "bench" / "engines.py"), "--repeats", "1", "--steps", "1",
               "--accum", str(ACCUM), "--batch", "2", "--image-size", "32"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-2].startswith("zero2   combined"), proc.stdout  # the table precedes the JSON line
    return json.loads(lines[-1])


def test_every_engine_and_scheme_is_measured(figures):
    assert set(figures["engines"]) == {"ddp", "zero1", "zero2"}
    assert (figures["world_size"], figures["accum"], figures["deepspeed"][:5]) == (2, ACCUM, "0.19.")
    for engine, row in figures["engines"].items():
        for scheme in ("reuse", "combined"):
            cell = row[scheme]
            assert cell["steps_per_s"] > 0, (engine, scheme)
            assert cell["reduced_bytes_per_step"] > 0 and cell["reductions_per_step"] >= 1, (engine, scheme)


def _times_gradient(figures, engine: str, scheme: str) -> float:
    return figures["engines"][engine][scheme]["reduced_bytes_per_step"] / figures["gradient_bytes"]


def test_ddp_and_zero1_reduce_the_gradient_once_per_optimizer_step(figures):
    for scheme in ("reuse", "combined"):
        # DDP's buckets hold exactly the gradients; ZeRO-1 adds a few scalars (the gradient norm, overflow).
        assert figures["engines"]["ddp"][scheme]["reduced_bytes_per_step"] == figures["gradient_bytes"], scheme
        assert _times_gradient(figures, "zero1", scheme) == pytest.approx(1.0, rel=0.02), scheme


def test_zero2_reduces_on_every_backward_so_reuse_reduces_twice_as_much(figures):
    assert _times_gradient(figures, "zero2", "combined") == pytest.approx(ACCUM, rel=0.02)
    assert _times_gradient(figures, "zero2", "reuse") == pytest.approx(2 * ACCUM, rel=0.02)


def test_training_picks_the_scheme_that_reduces_least(figures):
    # The driver's choice (what advcap.train uses), read back from the launched engines.
    defaults = {engine: row["default_scheme"] for engine, row in figures["engines"].items()}
    assert defaults == {"ddp": "reuse", "zero1": "reuse", "zero2": "combined"}
