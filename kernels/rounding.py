"""The one rounding rule shared by the references and the kernels: to nearest, ties to even.

Kernels get it from two FP32 adds of 1.5 * 2**23 (exact for |v| < 2**22, and available in
the Triton interpreter, unlike libdevice.rint); the references use torch.round.
"""

from __future__ import annotations

import torch

RINT_MAGIC = 12582912.0  # 1.5 * 2**23


def round_half_even(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x)
