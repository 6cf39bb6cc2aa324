"""Shared by the fault suite: tiny shards, the tiny preset's overrides, and real processes to break.

Every fault here happens for real: a process killed with SIGKILL at a failpoint (advcap.faults) or by pid,
a rank frozen with SIGSTOP, a full tmpfs, a malicious pickle. What the tests assert is what a user sees:
exit status, the message, the files on disk, and the weights a resumed run ends with.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_shards

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the virtualenv's console scripts: advcap, accelerate


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SimpleNamespace:
    """30 images (12 train, 6 restval, 6 val, 6 test) in one shard per split, and a tokenizer."""
    root = make_tiny_shards(tmp_path_factory.mktemp("fault_data"))
    return SimpleNamespace(root=root, shards=root / "shards", tokenizer=root / "tok")


def tiny(data: SimpleNamespace, *extra: str) -> list[str]:
    """The tiny preset, a few steps, a checkpoint every 2 steps, cheap evaluation."""
    return [
        "model.preset=tiny", "data.image_size=32", "data.workers=0", "data.shuffle_buffer=16",
        f"data.shards={data.shards}", f"data.tokenizer={data.tokenizer}", "train.steps=6", "train.global_batch_size=8",
        "train.warmup_steps=1", "train.lr=1e-3", "train.log_every_steps=1", "train.checkpoint_every_steps=2",
        "train.keep_checkpoints=2", "eval.splits=[test]", "eval.batch_size=8", "eval.max_new_tokens=6",
        "eval.conditions=[clean,fgsm]", "eval.coco_metrics=false", "eval.audit=false", *extra,
    ]


def env(**variables: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "SLURM_", "ADVCAP_"))}
    base.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    base.update(variables)
    return base


def advcap(*args: str, faults: str = "", timeout: float = 180, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`advcap ARGS` in a process of its own, with failpoints `faults` armed."""
    extra = {"ADVCAP_FAULTS": faults} if faults else {}
    return subprocess.run([str(BIN / "advcap"), *args], cwd=cwd, env=env(**extra), capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(launcher: list[str], *args: str, faults: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    """`accelerate launch` with 2 CPU ranks: `launcher` is the flags (a config file or --multi_gpu), `args` what
    follows (a script and its arguments, or -m advcap.cli ...)."""
    cmd = [str(BIN / "accelerate"), "launch", *launcher, "--num_processes", "2", "--main_process_port", str(free_port()),
           *args]
    extra = {"ADVCAP_FAULTS": faults} if faults else {}
    return subprocess.run(cmd, cwd=REPO, env=env(**extra), capture_output=True, text=True, timeout=timeout)


DDP = ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def engine(name: str) -> list[str]:
    """Launcher flags for ddp, zero1 or zero2 (the shipped launcher configs)."""
    return ["--config_file", str(REPO / "configs" / "accelerate" / f"{name}.yaml")]


def digest(run: Path) -> str:
    """The final weights' digest that training recorded (every rank agreed on it)."""
    return json.loads((run / "provenance.json").read_text())["weights_sha256"]


def leftovers(run: Path) -> list[str]:
    """Temporary files and folders a killed writer could have left in the run directory."""
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.name.startswith((".tmp-", ".old-"))
                  or ".tmp-" in p.name)


class Payload:
    """What an attacker pickles: unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(checkpoint: Path, name: str, marker: Path, update_manifest: bool) -> None:
    """Replace the checkpoint's file `name` by a malicious pickle (and, as a careful attacker would, fix the
    checkpoint's manifest to match it)."""
    path = checkpoint / name
    torch.save({"state": Payload(marker)}, path)
    if update_manifest:
        manifest = json.loads((checkpoint / "checkpoint.json").read_text())
        manifest["files"][name] = {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        (checkpoint / "checkpoint.json").write_text(json.dumps(manifest))
