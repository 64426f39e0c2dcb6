"""ComfyUI's flow-matching noise schedule, for the samplers that run without ComfyUI (calibration capture
on the command line, the proxy's demo and benchmark): one definition, so they sample what ComfyUI does."""

from __future__ import annotations

import torch


def time_snr_shift(shift: float, t: torch.Tensor) -> torch.Tensor:
    """ComfyUI's sigma warp of ``ModelSamplingDiscreteFlow``: ``shift * t / (1 + (shift - 1) * t)``."""
    return shift * t / (1 + (shift - 1) * t)


def simple_sigmas(steps: int, shift: float) -> torch.Tensor:
    """ComfyUI's "simple" scheduler over ``ModelSamplingDiscreteFlow(shift)``: ``steps + 1`` sigmas ending at 0,
    taken from its table of 1000 shifted sigmas as ComfyUI takes them."""
    if steps < 1:
        raise ValueError(f"need at least one step, got {steps}")
    table = time_snr_shift(shift, torch.arange(1, 1001, dtype=torch.float64) / 1000)
    stride = len(table) / steps
    sig = [float(table[-(1 + int(i * stride))]) for i in range(steps)] + [0.0]
    return torch.tensor(sig, dtype=torch.float32)
