"""The command line's output: `advcap train` and `advcap eval`, run as a user runs them, print advcap's progress
and results only (no third-party notices), and `--verbose` shows the debug logging and those notices again."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_shards

from advcap.evaluate import format_metrics
from advcap.logs import KNOWN_NOTICES, _DropMessages

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ADVCAP = Path(sys.executable).parent / "advcap"
# Each third-party notice this project has met (advcap.logs names why each is expected), as it is printed.
NOISE = (
    "Setting accelerator to CPU",  # DeepSpeed, at import on a CPU host
    "The attention mask is not set",  # transformers' generate: pad token = EOS token
    "attention_mask",  # GPT-2 seeing its pad token in the decoder input without a mask
    "requires torchvision",  # transformers' ViTImageProcessor falling back to the PIL backend
    "Loading weights",  # transformers' progress bar in from_pretrained
    "Writing model shards",  # transformers' progress bar in save_pretrained
    "loss_type",  # transformers: GPT2LMHeadModel's loss type not recognised from its class name
)
ADVCAP_LOG = re.compile(r"\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) advcap\.[\w.]+: ")
ADVCAP_PROGRESS = re.compile(r"eval (train|val|test): +\d+%\|")  # evaluate's own progress bar, one per split


def _run(*args: str) -> subprocess.CompletedProcess:
    # The user's environment, not the test suite's: no TOKENIZERS_PARALLELISM, no TRANSFORMERS_VERBOSITY.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "SLURM_", "TRANSFORMERS_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("TOKENIZERS_PARALLELISM", None)
    return subprocess.run([str(ADVCAP), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _train_args(data: Path, out: Path) -> list[str]:
    """A tiny adv_train run that also validates, logs example captions and uses DataLoader workers: every path
    of `advcap train` that generates captions or loads data."""
    return [
        "train", "--config", "adv_train", "model.preset=tiny", "data.image_size=32", "data.workers=2",
        "train.steps=2", "train.global_batch_size=4", "train.warmup_steps=1", "train.log_every_steps=1",
        "train.val_every_steps=2", "train.val_images=8", "train.image_log_every_steps=2", "eval.batch_size=4",
        f"run.out={out}", f"data.shards={data / 'shards'}", f"data.tokenizer={data / 'tok'}",
    ]


def _foreign_lines(text: str) -> list[str]:
    """The pieces of `text` (split at newlines and the carriage returns of progress bars) that are neither an
    advcap log line nor advcap's progress bar."""
    pieces = [p for line in text.splitlines() for p in line.split("\r") if p.strip()]
    return [p for p in pieces if not ADVCAP_LOG.match(p) and not ADVCAP_PROGRESS.match(p)]


def _noise(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(n in line for n in NOISE)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_tiny_shards(tmp_path_factory.mktemp("cli-data"))


def test_train_and_eval_print_advcaps_progress_and_results_only(data, tmp_path):
    train = _run(*_train_args(data, tmp_path))
    assert train.returncode == 0, train.stderr[-3000:]
    run = tmp_path / "demo" / "adv_train" / "seed0"
    evaluation = _run("eval", str(run), "--conditions", "clean", "fgsm", "--splits", "test", "eval.audit=false")
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]

    for proc in (train, evaluation):
        assert _noise(proc.stdout + proc.stderr) == []
        assert _foreign_lines(proc.stderr) == []
    assert train.stdout == ""
    # stdout is the result and nothing else: the metrics table of the record eval wrote.
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    assert evaluation.stdout == format_metrics(metrics) + "\n"
    assert "INFO advcap.train: finished" in train.stderr and "INFO advcap.evaluate: wrote" in evaluation.stderr


def test_verbose_shows_debug_logging_and_the_third_party_notices(data, tmp_path):
    proc = _run("--verbose", *_train_args(data, tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"DEBUG advcap\.model: exported the captioner to ", proc.stderr)
    # Nothing is hidden: transformers' progress bar and DeepSpeed's notice (this is a CPU host) are back.
    assert "Writing model shards" in proc.stderr
    assert "Setting accelerator to CPU" in proc.stdout + proc.stderr


def test_the_filters_drop_the_known_notices_and_nothing_else(caplog):
    """Each filter is scoped to the logger and the message it names: that library's other warnings still show."""
    for name, start in KNOWN_NOTICES:
        logger = logging.getLogger(f"advcap-test.{name}")  # a stand-in: the real loggers belong to the libraries
        logger.addFilter(_DropMessages(tuple(s for n, s in KNOWN_NOTICES if n == name)))
        with caplog.at_level(logging.WARNING, logger=logger.name):
            logger.warning(start + " and the rest of the notice")
            logger.warning("any other warning of %s", name)
        assert [r.getMessage() for r in caplog.records] == [f"any other warning of {name}"]
        caplog.clear()
