"""Single images with a trained captioner: load a run's (or an export's) model, caption an image, attack it
and draw the figure (`advcap caption`, `advcap attack`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from advcap.conditions import BatchCaptioner, Generation, caption_labels
from advcap.errors import AdvcapError
from advcap.rundir import RunDir

if TYPE_CHECKING:
    import torch

    from advcap.model import Captioner


def hf_dir(model: str | os.PathLike[str]) -> Path:
    """The `hf/` export of a run directory, or `model` itself when it is an export."""
    path = Path(model)
    if (RunDir(path).export_dir / "config.json").is_file():
        return RunDir(path).export_dir
    if (path / "config.json").is_file():
        return path
    raise AdvcapError(f"{path} is neither a finished run (no hf/ export) nor an exported captioner (no config.json)")


def load_model(model: str | os.PathLike[str], device: Any = "cpu") -> tuple[Captioner, Any]:
    """(captioner, tokenizer) from a run directory's `hf/` export or an export directory.

    The captioner is in eval() mode with every parameter frozen (attacks need only ∂loss/∂pixels);
    its image size is the exported ViT's, its normalisation the exported image processor's.
    """
    from advcap.config import ModelConfig
    from advcap.model import build_captioner
    from advcap.tokenizer import load_tokenizer

    export = hf_dir(model)
    tokenizer = load_tokenizer(export)
    try:
        image_size = int(json.loads((export / "config.json").read_text())["encoder"]["image_size"])
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
        raise AdvcapError(f"{export}/config.json is not a VisionEncoderDecoder config ({err!r})") from None
    captioner = build_captioner(ModelConfig(preset="custom", init_from=str(export)), image_size, tokenizer)
    captioner.eval().requires_grad_(False)
    return captioner.to(device), tokenizer


def load_image(path: str | os.PathLike[str], image_size: int) -> torch.Tensor:
    """An image file → (1,3,S,S) float pixels in [0,1], preprocessed as the loader does (RGB, bilinear S×S)."""
    import torch

    from advcap.data.images import BadImage, to_square_pixels

    try:
        pixels = to_square_pixels(Path(path).read_bytes(), image_size)
    except (OSError, BadImage) as err:
        raise AdvcapError(f"cannot read image {path}: {err}") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).unsqueeze(0).float().div(255.0)


def _inference_model(model: str | os.PathLike[str]) -> tuple[Captioner, Any, Generation, float]:
    """(captioner, tokenizer, generation settings, default ε) for a run dir (its config) or a bare export."""
    from advcap.config import AttackConfig
    from advcap.model import DEFAULT_MAX_NEW_TOKENS

    captioner, tokenizer = load_model(model)
    rundir = RunDir(model)
    if rundir.export_dir.is_dir() and rundir.exists():
        cfg = rundir.config()
        return captioner, tokenizer, Generation(cfg.eval.max_new_tokens, cfg.eval.num_beams), cfg.attack.epsilon
    return captioner, tokenizer, Generation(DEFAULT_MAX_NEW_TOKENS), AttackConfig().epsilon


def caption_image(image: str | os.PathLike[str], model: str | os.PathLike[str]) -> str:
    """Caption one image file with a run's (or an export's) captioner, with the run's generation settings."""
    from advcap.model import decode_captions

    captioner, tokenizer, generation, _ = _inference_model(model)
    pixels = load_image(image, captioner.image_size)
    return decode_captions(tokenizer, BatchCaptioner(captioner, tokenizer, generation).generate(pixels))[0]


def attack_image(
    image: str | os.PathLike[str], model: str | os.PathLike[str], out: str | os.PathLike[str], epsilon: Optional[float] = None
) -> tuple[str, str]:
    """FGSM on one image, targeting the model's own clean caption; writes the figure `out`.

    The figure is original | adversarial | amplified difference (grey = unchanged), with the clean and the
    adversarial caption under the first two. ε defaults to the run's `attack.epsilon`.
    Returns (clean caption, adversarial caption).
    """
    from advcap.attacks import fgsm
    from advcap.model import decode_captions

    captioner, tokenizer, generation, default_epsilon = _inference_model(model)
    epsilon = default_epsilon if epsilon is None else epsilon
    if not 0 <= epsilon <= 1:
        raise AdvcapError(f"--epsilon {epsilon} is not allowed; expected a number in [0, 1] (pixel units)")
    pixels = load_image(image, captioner.image_size)
    batch_captioner = BatchCaptioner(captioner, tokenizer, generation)
    clean_ids = batch_captioner.generate(pixels)
    target = caption_labels(clean_ids, tokenizer.eos_token_id)
    adversarial = fgsm(lambda x: captioner(x, target), pixels, epsilon)
    clean_caption = decode_captions(tokenizer, clean_ids)[0]
    adv_caption = decode_captions(tokenizer, batch_captioner.generate(adversarial))[0]
    save_attack_figure(out, pixels[0], adversarial[0], epsilon, clean_caption, adv_caption)
    return clean_caption, adv_caption


FIGURE_INCHES = (9.0, 3.9)  # three square panels side by side, captions below
FIGURE_DPI = 100


def save_attack_figure(
    out: str | os.PathLike[str], clean: torch.Tensor, adversarial: torch.Tensor, epsilon: float,
    clean_caption: str, adv_caption: str,
) -> Path:
    """Write a PNG (900×390 px): clean | adversarial | amplified difference, captions under the panels.

    Args:
        clean, adversarial: (3,S,S) pixels in [0,1].
    """
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from advcap.attack_images import amplified_difference

    panels = [clean, adversarial, amplified_difference(clean, adversarial, epsilon)]
    titles = ["original", f"adversarial (FGSM, ε={epsilon:g} = {epsilon * 255:.3g}/255)", "difference (amplified, grey = 0)"]
    texts = [f"clean: {clean_caption}", f"adversarial: {adv_caption}", f"|x' - x| ≤ {epsilon:g} in [0,1] pixel units"]
    figure = Figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI)
    FigureCanvasAgg(figure)
    width, height = FIGURE_INCHES
    side = 0.9 * width / 3  # inches per panel
    for i, (panel, title, text) in enumerate(zip(panels, titles, texts)):
        ax = figure.add_axes([(i + 0.05) / 3, 1 - (0.35 + side) / height, side / width, side / height])
        ax.imshow(panel.detach().float().cpu().permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(title, fontsize=9)
        ax.text(0.5, -0.04, textwrap.fill(text, 42), transform=ax.transAxes, ha="center", va="top", fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(str(out), dpi=FIGURE_DPI)
    return out
