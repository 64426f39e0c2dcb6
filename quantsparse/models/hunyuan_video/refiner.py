"""The text token refiner (``txt_in``): two small transformer blocks over the text tokens alone.

It has no RoPE and no QK-norm, and its gates come from the timestep plus the mean text token.
Its attention goes through the same ``AttentionFn`` as the main blocks (``block_type="refiner"``)
so that a replacement sees every call, as ComfyUI's override does; sparse attention passes
these through dense.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .attention import AttentionFn, refiner_mask, sdpa_attention
from .embed import MLPEmbedder, timestep_embedding

REFINER_BLOCKS = 2


class _RefinerAttention(nn.Module):
    def __init__(self, dim: int, *, dtype=None, device=None):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=True, dtype=dtype, device=device)
        self.proj = nn.Linear(dim, dim, bias=True, dtype=dtype, device=device)


class TokenRefinerBlock(nn.Module):
    """``forward(x [B, Ltxt, hidden], c [B, hidden], mask [B, 1, Ltxt, Ltxt] additive or None, *, attention)``."""

    def __init__(self, hidden: int, heads: int, index: int, *, dtype=None, device=None):
        super().__init__()
        self.heads, self.index = heads, index
        kw = {"dtype": dtype, "device": device}
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=True, **kw))
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=True, eps=1e-6, **kw)
        self.self_attn = _RefinerAttention(hidden, **kw)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=True, eps=1e-6, **kw)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden, bias=True, **kw), nn.SiLU(),
                                 nn.Linear(4 * hidden, hidden, bias=True, **kw))

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: Optional[torch.Tensor], *,
                attention: Optional[AttentionFn] = None) -> torch.Tensor:
        gate_attn, gate_mlp = self.adaLN_modulation(c).chunk(2, dim=1)
        qkv = self.self_attn.qkv(self.norm1(x))
        b, n, _ = qkv.shape
        q, k, v = qkv.reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = (attention or sdpa_attention)(q, k, v, mask=mask, block_type="refiner", block_index=self.index)
        x = x + self.self_attn.proj(out) * gate_attn[:, None]
        return x + self.mlp(self.norm2(x)) * gate_mlp[:, None]


class _IndividualTokenRefiner(nn.Module):
    def __init__(self, hidden: int, heads: int, *, dtype=None, device=None):
        super().__init__()
        self.blocks = nn.ModuleList(TokenRefinerBlock(hidden, heads, i, dtype=dtype, device=device)
                                    for i in range(REFINER_BLOCKS))


class TokenRefiner(nn.Module):
    """``forward(context [B, Ltxt, ctx], timesteps [B] float32, txt_mask [B, Ltxt] additive or None) -> [B, Ltxt, hidden]``."""

    def __init__(self, context_dim: int, hidden: int, heads: int, *, dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.input_embedder = nn.Linear(context_dim, hidden, bias=True, **kw)
        self.t_embedder = MLPEmbedder(256, hidden, **kw)
        self.c_embedder = MLPEmbedder(context_dim, hidden, **kw)
        self.individual_token_refiner = _IndividualTokenRefiner(hidden, heads, **kw)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, txt_mask: Optional[torch.Tensor], *,
                attention: Optional[AttentionFn] = None) -> torch.Tensor:
        t = self.t_embedder(timestep_embedding(timesteps, 256, time_factor=1.0).to(x.dtype))
        # ComfyUI pools over all tokens, padding included (the original masked mean is a TODO there);
        # matching it matters more than the original here, since ComfyUI is what runs the checkpoint.
        pooled = x.float().sum(dim=1) / x.shape[1] if x.dtype == torch.float16 else x.sum(dim=1) / x.shape[1]
        c = t + self.c_embedder(pooled.to(x.dtype))
        x = self.input_embedder(x)
        mask = refiner_mask(txt_mask)
        for block in self.individual_token_refiner.blocks:
            x = block(x, c, mask, attention=attention)
        return x
