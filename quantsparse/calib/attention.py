"""Attention inside a block being calibrated: the svg sparse mask at the target density, differentiable.

The inference kernel (kernels/sparse_attention.py) has no backward, so calibration runs the same
pattern through torch SDPA with a boolean token mask: text rows and columns always kept, video
queries see the band of ``ceil(density * NKB)`` key blocks that ``masks.band_blocks`` gives, in
(t, h, w) order for spatial heads and in the frame-major layout for temporal heads (which are
permuted around the call, as at inference). svg uses one band for every head, so one ``[L, L]``
mask serves all heads; the per-head choice (spatial or temporal) is made once per sample from the
full model's q, k, v (``masks.svg_mask``), as inference makes it from the model it runs.

The calls also record q and k (post QK-norm and RoPE, what the MSAD losses compare).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..sparse.masks import band_blocks, block_budget, num_blocks, permute_heads, svg_mask, unpermute_heads


def band_token_mask(grid: tuple[int, int, int], txt_len: int, density: float, block_q: int, block_k: int,
                    device=None) -> torch.Tensor:
    """bool ``[L, L]`` (True = computed) of the svg band at ``density``; text rows and columns all True."""
    t, h, w = grid
    img_len = t * h * w
    nkb = num_blocks(img_len, block_k)
    band = band_blocks(img_len, block_q, block_k, block_budget(density, nkb), device=device)
    keep = torch.zeros(band.shape[0], nkb, dtype=torch.bool, device=device)
    keep.scatter_(1, band.long(), True)
    pos = torch.arange(img_len, device=device)
    video = keep[pos // block_q][:, pos // block_k]
    seq = txt_len + img_len
    mask = torch.ones(seq, seq, dtype=torch.bool, device=device)
    mask[txt_len:, txt_len:] = video
    return mask


def temporal_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid, txt_len: int, density: float,
                   block_q: int, block_k: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bool ``[B, H]``: heads svg runs frame-major, chosen from these (full-model) q, k, v."""
    padding = None
    if bias is not None:
        padding = (bias.float().reshape(bias.shape[0], q.shape[2]) > -1.0).expand(q.shape[0], -1)  # True = real key
    m = svg_mask(q, k, v, grid=grid, txt_len=txt_len, density=density, block_q=block_q, block_k=block_k,
                 key_padding=padding)
    return m.temporal


class CalibAttention:
    """An ``AttentionFn`` for one block call: dense or svg-sparse SDPA; keeps the q and k it saw.

    ``token_mask`` None runs dense; a bool mask (True = computed) or its additive float form ``[L, L]``. ``temporal`` (bool ``[B, H]``) selects the heads whose video tokens are
    permuted frame-major around the masked call.
    """

    def __init__(self, *, grid, txt_len: int, token_mask: Optional[torch.Tensor] = None,
                 temporal: Optional[torch.Tensor] = None, record: bool = True):
        self.grid, self.txt_len = grid, txt_len
        self.token_mask, self.temporal = token_mask, temporal
        self.record = record
        self.q: Optional[torch.Tensor] = None
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    def __call__(self, q, k, v, *, mask=None, block_type="", block_index=0):
        if self.record:
            self.q, self.k, self.v = q, k, v
        bias = None if mask is None else mask.to(q.dtype)
        permuted = self.token_mask is not None and self.temporal is not None and bool(self.temporal.any())
        if self.token_mask is not None:
            sparse = self.token_mask
            if sparse.dtype == torch.bool:
                sparse = torch.zeros(sparse.shape, dtype=q.dtype, device=q.device).masked_fill_(~sparse, float("-inf"))
            sparse = sparse.to(q.dtype)
            bias = sparse if bias is None else bias + sparse
        if permuted:
            q, k, v = (permute_heads(x, self.temporal, self.grid, self.txt_len) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        if permuted:
            out = unpermute_heads(out, self.temporal, self.grid, self.txt_len)
        b, h, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d)
