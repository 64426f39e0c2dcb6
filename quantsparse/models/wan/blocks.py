"""Wan's transformer block, callable one at a time, and the attention entry point every call goes through.

A block (ComfyUI's ``WanAttentionBlock``) is self-attention over the video tokens, cross-attention to
the text (and, for Wan 2.1 I2V, to the CLIP image tokens), and an FFN, with gated residuals:

    e = modulation (1, 6, D) + e0                 (shift, scale, gate) x 2, per sample or per token
    x = x + self_attn(norm1(x) * (1 + scale0) + shift0) * gate0     norm1: LayerNorm, no affine
    x = x + cross_attn(norm3(x), context)                           norm3: LayerNorm, affine; no gate
    x = x + ffn(norm2(x) * (1 + scale1) + shift1) * gate1           ffn: Linear, GELU(tanh), Linear

q and k are normalised by an RMSNorm over the full width D (all heads together, eps 1e-6, affine),
before the heads are split; self-attention then rotates them (RoPE, ``rope.py``).

Every attention call goes through one function of the signature ``AttentionFn``, so that calibration
probes and sparse attention can replace it without touching the blocks. It receives q, k, v
``[B, H, L, 128]`` and returns ``[B, Lq, H * 128]``; ``block_type`` says which call it is:
``"self"`` (video tokens attending to each other, post norm and RoPE: the only call that may run
sparse), ``"cross"`` (video queries, the text keys) or ``"cross_img"`` (video queries, the 257 CLIP
image keys of Wan 2.1 I2V; made before ``"cross"``, as ComfyUI makes it). ``block_index`` is the
block's index. The keyword names are HunyuanVideo's (``models/hunyuan_video/attention.py``), so the same
functions plug into either family.

A block is a pure function of its arguments (it never changes them in place), so calibration can
feed it one captured input many times.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .dims import WanDims
from .rope import apply_rope

SELF, CROSS, CROSS_IMG = "self", "cross", "cross_img"
EPS = 1e-6


class AttentionFn(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: Optional[torch.Tensor],
                 block_type: str, block_index: int) -> torch.Tensor:
        """q ``[B, H, Lq, D]``, k and v ``[B, H, Lk, D]``; ``mask`` is always None for Wan; returns ``[B, Lq, H*D]``.

        ``block_type`` is "self", "cross" or "cross_img"; ``block_index`` the block's index.
        """
        ...


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
                   block_type: str = SELF, block_index: int = 0) -> torch.Tensor:
    """Dense attention (torch SDPA), the default for every call."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype))
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def repeat_e(e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A modulation ``[B, T', D]`` stretched over the tokens of ``x`` ``[B, L, D]`` (ComfyUI's ``repeat_e``):
    one entry broadcasts; T' entries (TI2V-5B: one per latent frame) each cover L / T' consecutive tokens,
    the last ones cut when T' does not divide L."""
    repeats = x.size(1) // e.size(1) if e.size(1) > 1 else 1
    if repeats == 1:
        return e
    if repeats * e.size(1) == x.size(1):
        return torch.repeat_interleave(e, repeats, dim=1)
    return torch.repeat_interleave(e, repeats + 1, dim=1)[:, :x.size(1)]


def _linear(d_in: int, d_out: int, kw: dict) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=True, **kw)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, L, H*D]`` -> ``[B, L, H, D]`` (a view)."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1)


class SelfAttention(nn.Module):
    """``q``, ``k``, ``v``, ``o`` Linears (D x D, with bias) and the full-width QK RMSNorm."""

    def __init__(self, dim: int, num_heads: int, *, dtype=None, device=None):
        super().__init__()
        self.num_heads = num_heads
        kw = {"dtype": dtype, "device": device}
        self.q, self.k, self.v, self.o = (_linear(dim, dim, kw) for _ in range(4))
        self.norm_q = nn.RMSNorm(dim, eps=EPS, elementwise_affine=True, **kw)
        self.norm_k = nn.RMSNorm(dim, eps=EPS, elementwise_affine=True, **kw)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, *, attention: AttentionFn, block_index: int
                ) -> torch.Tensor:
        h = self.num_heads
        q = apply_rope(_heads(self.norm_q(self.q(x)), h), freqs).transpose(1, 2)
        k = apply_rope(_heads(self.norm_k(self.k(x)), h), freqs).transpose(1, 2)
        v = _heads(self.v(x), h).transpose(1, 2)
        return self.o(attention(q, k, v, mask=None, block_type=SELF, block_index=block_index))


class CrossAttention(SelfAttention):
    """Video queries, text keys (ComfyUI's ``WanT2VCrossAttention``); with ``image`` also the CLIP image keys
    through ``k_img`` / ``v_img`` / ``norm_k_img``, the two outputs summed before ``o``
    (``WanI2VCrossAttention``)."""

    def __init__(self, dim: int, num_heads: int, image: bool, *, dtype=None, device=None):
        super().__init__(dim, num_heads, dtype=dtype, device=device)
        self.image = image
        if image:
            kw = {"dtype": dtype, "device": device}
            self.k_img = _linear(dim, dim, kw)
            self.v_img = _linear(dim, dim, kw)
            self.norm_k_img = nn.RMSNorm(dim, eps=EPS, elementwise_affine=True, **kw)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_img_len: Optional[int] = None, *,
                attention: AttentionFn, block_index: int) -> torch.Tensor:
        """``context`` is ``[B, Limg + Ltxt, D]`` with the image tokens first for the image variant, where the
        first ``context_img_len`` are the image's (None: ComfyUI then uses the whole context for both)."""
        h = self.num_heads
        q = _heads(self.norm_q(self.q(x)), h).transpose(1, 2)
        if self.image:
            context_img, context = context[:, :context_img_len], context[:, context_img_len:]
            k_img = _heads(self.norm_k_img(self.k_img(context_img)), h).transpose(1, 2)
            v_img = _heads(self.v_img(context_img), h).transpose(1, 2)
            img_out = attention(q, k_img, v_img, mask=None, block_type=CROSS_IMG, block_index=block_index)
        k = _heads(self.norm_k(self.k(context)), h).transpose(1, 2)
        v = _heads(self.v(context), h).transpose(1, 2)
        out = attention(q, k, v, mask=None, block_type=CROSS, block_index=block_index)
        if self.image:
            out = out + img_out
        return self.o(out)


class WanBlock(nn.Module):
    """One ``blocks.{i}`` of ComfyUI's ``WanModel``.

    ``forward(x [B, L, D], e0 [B, T', 6, D], freqs, context [B, Lctx, D], context_img_len=None, *,
    attention=None) -> x``. ``e0`` is the time projection (``WanInputs.e0``): T' is 1, or one entry per
    latent frame for TI2V-5B's per-token timesteps.
    """

    def __init__(self, dims: WanDims, index: int, *, dtype=None, device=None):
        super().__init__()
        self.index = index
        d, kw = dims.dim, {"dtype": dtype, "device": device}
        self.norm1 = nn.LayerNorm(d, eps=EPS, elementwise_affine=False, **kw)
        self.self_attn = SelfAttention(d, dims.num_heads, **kw)
        self.norm3 = nn.LayerNorm(d, eps=EPS, elementwise_affine=True, **kw)
        self.cross_attn = CrossAttention(d, dims.num_heads, dims.model_type == "i2v", **kw)
        self.norm2 = nn.LayerNorm(d, eps=EPS, elementwise_affine=False, **kw)
        self.ffn = nn.Sequential(_linear(d, dims.ffn_dim, kw), nn.GELU(approximate="tanh"),
                                 _linear(dims.ffn_dim, d, kw))
        self.modulation = nn.Parameter(torch.empty(1, 6, d, **kw))

    def forward(self, x: torch.Tensor, e0: torch.Tensor, freqs: torch.Tensor, context: torch.Tensor,
                context_img_len: Optional[int] = None, *, attention: Optional[AttentionFn] = None) -> torch.Tensor:
        attention = attention or sdpa_attention
        mod = self.modulation.to(dtype=x.dtype, device=x.device).unsqueeze(0) + e0
        shift1, scale1, gate1, shift2, scale2, gate2 = (repeat_e(m, x) for m in mod.unbind(2))
        x = x.contiguous()
        y = self.self_attn(torch.addcmul(shift1, self.norm1(x), 1 + scale1), freqs, attention=attention,
                           block_index=self.index)
        x = torch.addcmul(x, y, gate1)
        x = x + self.cross_attn(self.norm3(x), context, context_img_len, attention=attention, block_index=self.index)
        y = self.ffn(torch.addcmul(shift2, self.norm2(x), 1 + scale2))
        return torch.addcmul(x, y, gate2)

