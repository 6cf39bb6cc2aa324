"""transformers 4.x beside this venv's 5.x, for checking that a run's `hf/` export loads in 4.x.

A 4.x release and the tokenizers / huggingface-hub releases it requires are pip-installed with `--target`
into a folder of pytest's cache (once; later runs reuse it). A subprocess with that folder first on
PYTHONPATH imports them instead of the venv's; everything else (torch, numpy, Pillow, safetensors) comes
from the venv. The subprocess imports no advcap: it is what a 4.x user runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Each tested 4.x release with the tokenizers and huggingface-hub releases it accepts (its own pins:
# 4.45 wants tokenizers <0.21, 4.57 tokenizers <=0.23; both huggingface-hub <1.0). The oldest 4.x advcap
# ever claimed and the last 4.x release.
RELEASES = {
    "4.45.2": ("tokenizers==0.20.3", "huggingface-hub==0.25.2"),
    "4.57.6": ("tokenizers==0.22.1", "huggingface-hub==0.36.0"),
}
INSTALL_TIMEOUT_S = 600
RUN_TIMEOUT_S = 300

# Run by the 4.x interpreter: caption each image through the model classes and through the README's
# snippet; print one JSON line.
CAPTION_SCRIPT = r"""
import contextlib, io, json, sys
import transformers
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

hf, snippet, images, max_new_tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
model = VisionEncoderDecoderModel.from_pretrained(hf)
processor, tokenizer = AutoImageProcessor.from_pretrained(hf), AutoTokenizer.from_pretrained(hf)
generated, snippet_out = [], []
for image in images:
    inputs = processor(Image.open(image).convert("RGB"), return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    generated.append(tokenizer.decode(ids[0], skip_special_tokens=True))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(snippet.replace('"photo.jpg"', repr(image)), {})
    snippet_out.append(printed.getvalue())
print(json.dumps({"version": transformers.__version__, "generate": generated, "snippet": snippet_out}))
"""


def install(version: str, cache_dir: Path) -> Path:
    """The folder holding transformers `version` (+ its tokenizers and huggingface-hub), installed if absent.

    Installed into a temporary folder and renamed into place, so an interrupted install is never reused.
    """
    target = cache_dir / f"transformers-{version}"
    if (target / "transformers").is_dir():
        return target
    partial = cache_dir / f"transformers-{version}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    # --no-deps: only these three; torch and the rest come from the venv (pip must never pull torch here).
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--target", str(partial), f"transformers=={version}", *RELEASES[version]],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"pip could not install transformers {version}: {proc.stderr[-2000:]}")
    partial.rename(target)
    return target


def caption(target: Path, hf_dir: Path, snippet: str, images: list[Path], max_new_tokens: int) -> dict:
    """Run CAPTION_SCRIPT with `target`'s transformers: {"version", "generate": [caption per image],
    "snippet": [what the snippet printed per image]}."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(target), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-c", CAPTION_SCRIPT, str(hf_dir), snippet, json.dumps([str(p) for p in images]),
         str(max_new_tokens)],
        env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
