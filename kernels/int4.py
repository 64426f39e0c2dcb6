"""INT4 weight packing, laid out for a cheap unpack inside the GEMM loop.

Each row is cut into tiles of 128 input channels. Byte ``j`` of a tile (0 <= j < 64)
holds channel ``j`` in its low nibble and channel ``j + 64`` in its high nibble. A kernel
that loads 64 bytes gets two ready [*, 64] operands with two shifts and no shuffle:
``lo = (b << 4) >> 4`` and ``hi = b >> 4`` (arithmetic shifts sign-extend), then runs one
dot per half. Codes are signed, in [-8, 7] (symmetric quantization uses [-7, 7]).
"""

from __future__ import annotations

import torch

PACK_TILE = 128
HALF = PACK_TILE // 2


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] int8 codes in [-8, 7] -> [N, K // 2] int8 packed bytes (K a multiple of 128)."""
    if q.dim() != 2:
        raise ValueError(f"pack_int4 expects a 2-D tensor, got shape {tuple(q.shape)}")
    n, k = q.shape
    if k % PACK_TILE:
        raise ValueError(f"pack_int4: K={k} is not a multiple of {PACK_TILE}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4: codes must lie in [-8, 7]")
    tiles = q.to(torch.int16).reshape(n, k // PACK_TILE, 2, HALF)
    lo = tiles[:, :, 0, :] & 0xF
    hi = tiles[:, :, 1, :] & 0xF
    byte = lo | (hi << 4)
    byte = torch.where(byte >= 128, byte - 256, byte)
    return byte.to(torch.int8).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: [N, K // 2] int8 -> [N, K] int8 codes."""
    if packed.dim() != 2 or packed.dtype != torch.int8:
        raise ValueError(f"unpack_int4 expects a 2-D int8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    n, kh = packed.shape
    if kh % HALF:
        raise ValueError(f"unpack_int4: packed width {kh} is not a multiple of {HALF}")
    b = packed.reshape(n, kh // HALF, HALF)
    lo = torch.bitwise_right_shift(torch.bitwise_left_shift(b, 4), 4)
    hi = torch.bitwise_right_shift(b, 4)
    return torch.stack([lo, hi], dim=2).reshape(n, kh * 2)
