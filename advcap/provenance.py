"""Provenance of a run: how, where and on what it ran (written beside the resolved config)."""

from __future__ import annotations

import importlib.metadata
import platform
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("advcap", "torch", "transformers", "accelerate", "deepspeed", "webdataset", "tokenizers", "nltk",
            "pycocoevalcap")


def git_commit() -> str | None:
    """The commit of the advcap checkout, if it runs from one (an installed wheel has none)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def zero_stage(accelerator) -> int | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def collect(accelerator, **extra) -> dict:
    from advcap.distributed import launcher, slurm_info, slurm_job_id

    return {
        "launcher": launcher(),
        "command": " ".join(shlex.quote(arg) for arg in [Path(sys.argv[0]).name, *sys.argv[1:]]),
        "distributed_type": accelerator.distributed_type.value,  # e.g. MULTI_CPU, DEEPSPEED
        "zero_stage": zero_stage(accelerator),
        "mixed_precision": accelerator.mixed_precision,
        "world_size": accelerator.num_processes,
        "device": str(accelerator.device),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "packages": package_versions(),
        "slurm_job_id": slurm_job_id(),
        "slurm": slurm_info(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
