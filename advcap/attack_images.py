"""Pictures of an attack: the amplified perturbation and the clean | adversarial | difference grid that training
logs (advcap.tracking) and `advcap attack` draws (advcap.inference)."""

from __future__ import annotations

import torch


def amplified_difference(clean: torch.Tensor, adv: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Map a perturbation in [-ε, ε] onto [0,1] (grey = unchanged), so an ε of 2/255 is visible."""
    return (0.5 + (adv - clean) / (2 * max(epsilon, 1e-12))).clamp(0, 1)


def attack_grid(clean: torch.Tensor, adv: torch.Tensor, epsilon: float, rows: int = 4) -> torch.Tensor:
    """(3, rows·S, 3·S) image in [0,1]: each row is clean | adversarial | amplified difference.

    clean, adv: (B,3,S,S) pixels in [0,1]; the first `rows` images are drawn.
    """
    clean, adv = clean[:rows].detach().float().cpu(), adv[:rows].detach().float().cpu()
    panels = torch.cat([clean, adv, amplified_difference(clean, adv, epsilon)], dim=3)  # (R,3,S,3S)
    return torch.cat(list(panels), dim=1)  # (3, R·S, 3S)
