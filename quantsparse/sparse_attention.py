"""Run the block-sparse kernel under a ``SparseMask``: temporal heads in their permuted layout.

The kernel knows nothing of svg's layouts; this is the one place that permutes q, k, v of the temporal
heads before it and puts the output (and the log-sum-exp) back in (t, h, w) order after it, so that
the override, the SSAR refresh and the benchmarks all run a mask the same way.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..kernels import block_sparse_attention
from .masks import SparseMask, permute_heads, unpermute_heads


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: SparseMask, *,
                     grid: tuple[int, int, int], txt_len: int, key_padding: Optional[torch.Tensor] = None,
                     mode: str = "sparse", return_lse: bool = False):
    """``[B, H, L, D]`` output (and float32 lse ``[B, H, L]``) of ``mode`` ("sparse", "complement",
    "dense") under ``mask``; ``key_padding`` bool ``[B, L]``, True = a real token (kernel contract)."""
    temporal = mask.temporal
    permuted = temporal is not None and bool(temporal.any())
    if permuted:
        q, k, v = (permute_heads(x, temporal, grid, txt_len) for x in (q, k, v))
    res = block_sparse_attention(q, k, v, mask.kv_blocks, mask.kv_counts, txt_len=txt_len, key_padding=key_padding,
                                 mode=mode, block_q=mask.block_q, block_k=mask.block_k, return_lse=return_lse,
                                 check_lists=False)
    if not permuted:
        return res
    if not return_lse:
        return unpermute_heads(res, temporal, grid, txt_len)
    out, lse = res
    return (unpermute_heads(out, temporal, grid, txt_len),
            unpermute_heads(lse[..., None], temporal, grid, txt_len)[..., 0])
