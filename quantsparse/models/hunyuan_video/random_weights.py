"""Deterministic random HunyuanVideo weights for tests and timing (real weights cannot be fetched here).

Scales are chosen so that activations stay O(1) through the blocks and every path matters:
weights ~ N(0, 1/fan_in), so that modulation gates and the final layer are not near zero and
quantization error in any block shows at the output; biases and norm weights are small
perturbations of 0 and 1 rather than exact values, so that a bias or a norm weight loaded
under the wrong name changes the output (which is what the ComfyUI comparison relies on).
"""

from __future__ import annotations

import math

import torch

from .dims import HunyuanVideoDims
from .model import reference_state_shapes

BIAS_STD = 0.02
NORM_STD = 0.1


def iter_random_state(dims: HunyuanVideoDims, seed: int, dtype: torch.dtype = torch.bfloat16):
    """(key, tensor) pairs of :func:`make_random_state_dict`, one at a time: the full 13B model
    (25.6 GB) can be streamed to disk on a machine with less memory than that."""
    gen = torch.Generator().manual_seed(seed)
    for key, shape in reference_state_shapes(dims).items():
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        if key.endswith(".bias"):
            value = noise * BIAS_STD
        elif "norm" in key.rsplit(".", 2)[-2] and len(shape) == 1:
            value = 1.0 + noise * NORM_STD
        else:
            fan_in = math.prod(shape[1:])
            value = noise / math.sqrt(fan_in)
        yield key, value.to(dtype).contiguous()


def make_random_state_dict(dims: HunyuanVideoDims, seed: int,
                           dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """ComfyUI-named state dict of ``dims`` with random values; equal seeds give equal tensors on any machine."""
    return dict(iter_random_state(dims, seed, dtype))
