"""The one rounding rule shared by the references and the kernels: half away from zero."""

from __future__ import annotations

import torch


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.floor(x.abs() + 0.5)
