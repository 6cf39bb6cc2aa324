"""TensorBoard logging of a training run (main process only): scalars, the clean | adversarial |
amplified-difference image grid, caption text, and the hyperparameters."""

from __future__ import annotations

from pathlib import Path

import torch

from advcap.config import Config, config_to_dict


def amplified_difference(clean: torch.Tensor, adv: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Map a perturbation in [-ε, ε] onto [0,1] (grey = unchanged), so an ε of 2/255 is visible."""
    return (0.5 + (adv - clean) / (2 * max(epsilon, 1e-12))).clamp(0, 1)


def attack_grid(clean: torch.Tensor, adv: torch.Tensor, epsilon: float, rows: int = 4) -> torch.Tensor:
    """(3, rows·S, 3·S) image: each row is clean | adversarial | amplified difference."""
    clean, adv = clean[:rows].detach().float().cpu(), adv[:rows].detach().float().cpu()
    panels = torch.cat([clean, adv, amplified_difference(clean, adv, epsilon)], dim=3)  # (R,3,S,3S)
    return torch.cat(list(panels), dim=1)  # (3, R·S, 3S)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class TrainLogger:
    """Writes TensorBoard events into `log_dir` (the run's tensorboard/); a no-op on non-main ranks."""

    def __init__(self, log_dir: Path, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))

    def hyperparameters(self, cfg: Config, extra: dict) -> None:
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        values = {**_flat(config_to_dict(cfg)), **extra}
        values = {k: v for k, v in values.items() if v is not None}
        for summary in hparams(values, {"train/clean_loss": float("nan")}):
            self.writer.file_writer.add_summary(summary)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(name, value, step)

    def attack_examples(self, step: int, clean, adv, epsilon: float, captions: list[tuple[str, str, str]]) -> None:
        """The image grid and a table of (reference, clean caption, adversarial caption)."""
        if self.writer is None:
            return
        self.writer.add_image("attack/clean|adversarial|difference", attack_grid(clean, adv, epsilon), step)
        if captions:
            rows = "\n".join(f"| {r} | {c} | {a} |" for r, c, a in captions)
            self.writer.add_text("attack/captions", "| reference | clean | adversarial |\n|---|---|---|\n" + rows, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
