"""The double-stream and single-stream transformer blocks, callable one at a time.

Block-wise calibration feeds each block captured inputs and compares outputs, so a block's
forward is a pure function of its arguments: it never modifies them in place (ComfyUI's
blocks do, which would corrupt a captured input reused across epochs).

Shared arguments of both block types:

- ``vec``: ``[B, hidden]`` conditioning vector (timestep + pooled text + guidance embeddings).
- ``pe``: RoPE rotations ``[1 or B, 1, L, 64, 2, 2]`` float32 for the joint sequence
  (text first), from ``attention.rope_freqs``.
- ``attn_mask``: additive ``[B, 1, 1, L]`` text padding mask from ``attention.joint_mask``, or None.
- ``attention``: an ``AttentionFn``; None means dense SDPA.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .attention import AttentionFn, apply_rope, sdpa_attention
from .dims import HunyuanVideoDims


class Modulation(nn.Module):
    """SiLU(vec) -> Linear -> chunks of (shift, scale, gate): 6 for a double block, 3 for a single one."""

    def __init__(self, dim: int, chunks: int, *, dtype=None, device=None):
        super().__init__()
        self.chunks = chunks
        self.lin = nn.Linear(dim, chunks * dim, bias=True, dtype=dtype, device=device)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(nn.functional.silu(vec[:, None, :])).chunk(self.chunks, dim=-1)


class QKNorm(nn.Module):
    """RMSNorm of q and k per head; eps=None means finfo(dtype).eps, as ComfyUI's RMSNorm."""

    def __init__(self, head_dim: int, *, dtype=None, device=None):
        super().__init__()
        self.query_norm = nn.RMSNorm(head_dim, eps=None, dtype=dtype, device=device)
        self.key_norm = nn.RMSNorm(head_dim, eps=None, dtype=dtype, device=device)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, head_dim: int, qkv_bias: bool, *, dtype=None, device=None):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, dtype=dtype, device=device)
        self.norm = QKNorm(head_dim, dtype=dtype, device=device)
        self.proj = nn.Linear(dim, dim, bias=True, dtype=dtype, device=device)


def _mlp(dim: int, hidden: int, *, dtype=None, device=None) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden, bias=True, dtype=dtype, device=device), nn.GELU(approximate="tanh"),
                         nn.Linear(hidden, dim, bias=True, dtype=dtype, device=device))


def _split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, L, 3*H*D] -> q, k, v each [B, H, L, D]."""
    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift, x, 1 + scale)


def _fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    """ComfyUI keeps fp16 runs finite after each block; same here so that fp16 numerics match."""
    if x.dtype == torch.float16:
        return torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
    return x


class DoubleStreamBlock(nn.Module):
    """Text and video streams with their own weights, joined only in attention.

    ``forward(img [B, Limg, hidden], txt [B, Ltxt, hidden], vec, pe, attn_mask=None, *, attention=None)
    -> (img, txt)``; attention is called with ``block_type="double"``, ``block_index=self.index``.
    """

    block_type = "double"

    def __init__(self, dims: HunyuanVideoDims, index: int, *, dtype=None, device=None):
        super().__init__()
        self.index = index
        self.num_heads = dims.num_heads
        h, kw = dims.hidden_size, {"dtype": dtype, "device": device}
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(h, 6, **kw))
            setattr(self, f"{stream}_norm1", nn.LayerNorm(h, elementwise_affine=False, eps=1e-6, **kw))
            setattr(self, f"{stream}_attn", SelfAttention(h, dims.head_dim, dims.qkv_bias, **kw))
            setattr(self, f"{stream}_norm2", nn.LayerNorm(h, elementwise_affine=False, eps=1e-6, **kw))
            setattr(self, f"{stream}_mlp", _mlp(h, dims.mlp_hidden_dim, **kw))

    def _qkv(self, stream: str, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
        attn = getattr(self, f"{stream}_attn")
        q, k, v = _split_heads(attn.qkv(_modulate(getattr(self, f"{stream}_norm1")(x), shift, scale)), self.num_heads)
        q, k = attn.norm(q, k, v)
        return q, k, v

    def _finish(self, stream: str, x: torch.Tensor, attn_out: torch.Tensor, mod: tuple[torch.Tensor, ...]):
        shift1, scale1, gate1, shift2, scale2, gate2 = mod
        x = x + getattr(self, f"{stream}_attn").proj(attn_out) * gate1
        mlp_in = _modulate(getattr(self, f"{stream}_norm2")(x), shift2, scale2)
        return x + getattr(self, f"{stream}_mlp")(mlp_in) * gate2

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor,
                attn_mask: Optional[torch.Tensor] = None, *,
                attention: Optional[AttentionFn] = None) -> tuple[torch.Tensor, torch.Tensor]:
        img_mod, txt_mod = self.img_mod(vec), self.txt_mod(vec)
        img_q, img_k, img_v = self._qkv("img", img, img_mod[0], img_mod[1])
        txt_q, txt_k, txt_v = self._qkv("txt", txt, txt_mod[0], txt_mod[1])
        q = apply_rope(torch.cat((txt_q, img_q), dim=2), pe)
        k = apply_rope(torch.cat((txt_k, img_k), dim=2), pe)
        v = torch.cat((txt_v, img_v), dim=2)
        out = (attention or sdpa_attention)(q, k, v, mask=attn_mask, block_type=self.block_type,
                                            block_index=self.index)
        n_txt = txt.shape[1]
        img = self._finish("img", img, out[:, n_txt:], img_mod)
        txt = _fp16_clamp(self._finish("txt", txt, out[:, :n_txt], txt_mod))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over the joint sequence; attention and MLP share ``linear1`` / ``linear2``.

    ``forward(x [B, Ltxt + Limg, hidden] (text first), vec, pe, attn_mask=None, *, attention=None) -> x``;
    attention is called with ``block_type="single"``, ``block_index=self.index``.
    """

    block_type = "single"

    def __init__(self, dims: HunyuanVideoDims, index: int, *, dtype=None, device=None):
        super().__init__()
        self.index = index
        self.num_heads = dims.num_heads
        self.hidden_size = h = dims.hidden_size
        self.mlp_hidden_dim = dims.mlp_hidden_dim
        kw = {"dtype": dtype, "device": device}
        self.linear1 = nn.Linear(h, 3 * h + self.mlp_hidden_dim, bias=True, **kw)
        self.linear2 = nn.Linear(h + self.mlp_hidden_dim, h, bias=True, **kw)
        self.norm = QKNorm(dims.head_dim, **kw)
        self.pre_norm = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6, **kw)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(h, 3, **kw)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                *, attention: Optional[AttentionFn] = None) -> torch.Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1(_modulate(self.pre_norm(x), shift, scale)),
                               [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = _split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        out = (attention or sdpa_attention)(apply_rope(q, pe), apply_rope(k, pe), v, mask=attn_mask,
                                            block_type=self.block_type, block_index=self.index)
        y = self.linear2(torch.cat((out, self.mlp_act(mlp)), dim=2))
        return _fp16_clamp(x + y * gate)
