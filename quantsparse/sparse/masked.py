"""Run the block-sparse kernel under a ``SparseMask``.

The one place that turns a mask into kernel arguments, so that the override, the SSAR refresh and the
benchmarks all run a mask the same way. svg's temporal heads need no copies: their lists refer to
the frame-major layout and the kernel reads and writes through that permutation by index arithmetic.
"""

from __future__ import annotations

from typing import Optional

import torch

from ...kernels import block_sparse_attention
from .masks import SparseMask


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: SparseMask, *,
                     grid: tuple[int, int, int], txt_len: int, key_padding: Optional[torch.Tensor] = None,
                     mode: str = "sparse", return_lse: bool = False):
    """``[B, H, L, D]`` output of ``mode`` ("sparse", "complement", "dense", "refresh") under ``mask``,
    in (t, h, w) token order whatever the heads' layouts; with ``return_lse`` also the float32
    log-sum-exp ``[B, H, L]``. "refresh" returns ``(dense output, float32 residual dense - sparse of the
    video rows [B, H, L_img, D])`` (plus the lse). ``key_padding`` bool ``[B, L]``, True = a real token."""
    temporal = mask.temporal
    if temporal is not None and not bool(temporal.any()):
        temporal = None
    return block_sparse_attention(q, k, v, mask.kv_blocks, mask.kv_counts, txt_len=txt_len, key_padding=key_padding,
                                  mode=mode, block_q=mask.block_q, block_k=mask.block_k, return_lse=return_lse,
                                  check_lists=False, temporal=temporal, grid=tuple(grid) if temporal is not None else None)
