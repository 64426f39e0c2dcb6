"""Embedders and the output head of HunyuanVideo: the parts around the blocks, kept in BF16.

Module and parameter names follow ComfyUI (``img_in.proj``, ``time_in.in_layer`` ...), since
the state dict must load into ComfyUI unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0,
                       time_factor: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of ``time_factor * t``, ComfyUI's (flux) convention.

    The product ``time_factor * t`` is taken in ``t``'s dtype and the result cast back to it,
    because that rounding is part of the reference numerics (guidance arrives in the model dtype).
    """
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    if torch.is_floating_point(t):
        emb = emb.to(t)
    return emb


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (timestep, guidance, pooled text and the refiner's embedders)."""

    def __init__(self, in_dim: int, hidden_dim: int, *, dtype=None, device=None):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True, dtype=dtype, device=device)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class PatchEmbed(nn.Module):
    """Latent ``[B, C, T, H, W]`` -> tokens ``[B, T*H*W / patch, hidden]`` in (t, h, w) order."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden: int, *, dtype=None, device=None):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden, kernel_size=patch_size, stride=patch_size, bias=True,
                              dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class LastLayer(nn.Module):
    """adaLN (shift, scale from the conditioning vector) then a Linear to patch pixels."""

    def __init__(self, hidden: int, patch: int, out_channels: int, *, dtype=None, device=None):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6, dtype=dtype, device=device)
        self.linear = nn.Linear(hidden, patch * patch * out_channels, bias=True, dtype=dtype, device=device)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=True, dtype=dtype,
                                                                   device=device))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec[:, None, :]).chunk(2, dim=-1)
        return self.linear(torch.addcmul(shift, self.norm_final(x), 1 + scale))
