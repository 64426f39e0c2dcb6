"""Block-diagonal Walsh-Hadamard rotation (blocks of 128).

Rotating activations before per-token INT8 quantization spreads outlier channels over
their block, so one scale per token loses less; the inverse rotation is folded into the
weights offline. Orthonormal, so ``rotate(x) @ rotate(w).T == x @ w.T``.
"""

from __future__ import annotations

import functools
import math

import torch

BLOCK = 128


@functools.lru_cache(maxsize=8)
def _sylvester(n: int) -> torch.Tensor:
    if n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(n: int = BLOCK, *, dtype=torch.float32, device=None, normalized: bool = True) -> torch.Tensor:
    """Symmetric Sylvester Hadamard matrix; entries +-1, or +-1/sqrt(n) when normalized.

    Cached per (size, dtype, device, normalization) and shared: treat it as read-only. A fresh
    copy per call would be a pageable host-to-device copy, which waits for every kernel already
    queued and so stalls the GPU pipeline once per layer.
    """
    return _cached(n, dtype, torch.device(device) if device is not None else torch.device("cpu"), normalized)


@functools.lru_cache(maxsize=32)
def _cached(n: int, dtype: torch.dtype, device: torch.device, normalized: bool) -> torch.Tensor:
    h = _sylvester(n)
    if normalized:
        h = h / math.sqrt(n)
    return h.to(dtype=dtype, device=device)


def block_hadamard(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Rotate the last dimension of ``x`` block by block (its size must be a multiple of ``block``)."""
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"last dimension {k} is not a multiple of the Hadamard block {block}")
    h = hadamard_matrix(block, dtype=x.dtype, device=x.device)
    return (x.reshape(*x.shape[:-1], k // block, block) @ h).reshape(x.shape)
