"""Argument checks shared by the GEMM entry points, so every path rejects the same bad input."""

from __future__ import annotations

import torch

from .int4 import PACK_TILE


def check_scaled_gemm(name: str, x_q, x_scale, w, w_scale, bias, *, packed: bool, group_size: int) -> tuple[int, int, int]:
    if x_q.dtype != torch.int8 or x_q.dim() != 2:
        raise ValueError(f"{name}: activations must be int8 [M, K], got {x_q.dtype} {tuple(x_q.shape)}")
    if w.dtype != torch.int8 or w.dim() != 2:
        raise ValueError(f"{name}: weights must be int8 [N, K{' // 2' if packed else ''}], got {w.dtype} {tuple(w.shape)}")
    m, k = x_q.shape
    n = w.shape[0]
    if w.shape[1] * (2 if packed else 1) != k:
        raise ValueError(f"{name}: weight shape {tuple(w.shape)} does not match K={k}")
    if k % PACK_TILE:
        raise ValueError(f"{name}: K={k} must be a multiple of {PACK_TILE}")
    if x_scale.shape != (m,) or x_scale.dtype != torch.float32:
        raise ValueError(f"{name}: x_scale must be float32 [{m}], got {x_scale.dtype} {tuple(x_scale.shape)}")
    check_weight_scale(name, w_scale, n, k, group_size)
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"{name}: bias has shape {tuple(bias.shape)}, expected ({n},)")
    return m, n, k


def check_weight_scale(name: str, w_scale, n: int, k: int, group_size: int) -> None:
    if group_size == 0:
        if w_scale.shape != (n,) or w_scale.dtype != torch.float32:
            raise ValueError(f"{name}: per-channel w_scale must be float32 [{n}], got {w_scale.dtype} {tuple(w_scale.shape)}")
    elif group_size == PACK_TILE:
        if w_scale.shape != (n, k // group_size) or not w_scale.is_floating_point():
            raise ValueError(f"{name}: grouped w_scale must be float [{n}, {k // group_size}], got {tuple(w_scale.shape)}")
    else:
        raise ValueError(f"{name}: group_size={group_size} is not supported (0 or {PACK_TILE})")


def expand_group_scale(w_scale: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """[N] or [N, K/G] scales -> [N, K] float64, for the references."""
    s = w_scale.to(torch.float64)
    if group_size == 0:
        return s[:, None].expand(-1, k)
    return s.repeat_interleave(group_size, dim=1)
