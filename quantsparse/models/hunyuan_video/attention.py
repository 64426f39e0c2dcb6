"""The single attention entry point of the HunyuanVideo model, RoPE, and the text padding masks.

Every attention call of the model (token refiner, double blocks, single blocks) goes through
one function with the signature of ``AttentionFn``, so that sparse attention, SSAR and the
calibration probes can replace it without touching the blocks. It sees exactly what a ComfyUI
``optimized_attention_override`` sees: q, k, v ``[B, H, L, 128]`` after QK-norm and RoPE,
text tokens first, and an additive mask (or None).
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.nn.functional as F


class AttentionFn(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: Optional[torch.Tensor],
                 block_type: str, block_index: int) -> torch.Tensor:
        """q, k, v ``[B, H, L, D]``; ``mask`` additive, broadcastable to ``[B, H, L, L]``; returns ``[B, L, H*D]``.

        ``block_type`` is "refiner", "double" or "single"; ``block_index`` counts within that type.
        """
        ...


BLOCK_TYPES = ("refiner", "double", "single")


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
                   block_type: str = "", block_index: int = 0) -> torch.Tensor:
    """Dense attention (torch SDPA), the default for every call."""
    if mask is not None and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of the head dimension; computed in float32 like ComfyUI.

    ``freqs`` is ``[1 or B, 1, L, D/2, 2, 2]`` rotation matrices from ``rope_freqs``.
    """
    pairs = x.to(freqs.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs[..., 0] * pairs[..., 0]
    out.addcmul_(freqs[..., 1], pairs[..., 1])
    return out.reshape(*x.shape).type_as(x)


def _axis_rotations(pos: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    """[..., L] positions -> [..., L, dim/2, 2, 2] rotation matrices; angles in float64 as ComfyUI's EmbedND."""
    exponent = torch.linspace(0, (dim - 2) / dim, steps=dim // 2, dtype=torch.float64, device=pos.device)
    omega = 1.0 / (theta ** exponent)
    angle = pos.to(torch.float64)[..., None] * omega
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([cos, -sin, sin, cos], dim=-1).reshape(*angle.shape, 2, 2)
    return rot.to(torch.float32)


def rope_freqs(grid: tuple[int, int, int], txt_len: int, axes_dim: tuple[int, ...], theta: int,
               device=None) -> torch.Tensor:
    """RoPE rotations for ``txt_len`` text tokens (position 0 on every axis: no rotation) then the video grid.

    Video tokens are in (t, h, w) row-major order. Returns ``[1, 1, txt_len + T*H*W, head_dim/2, 2, 2]``
    float32; the batch dimension broadcasts (every sample shares the positions).
    """
    t, h, w = grid
    tt, hh, ww = torch.meshgrid(torch.arange(t, device=device), torch.arange(h, device=device),
                                torch.arange(w, device=device), indexing="ij")
    img_ids = torch.stack([tt, hh, ww], dim=-1).reshape(-1, 3)
    ids = torch.cat([torch.zeros(txt_len, 3, dtype=img_ids.dtype, device=device), img_ids], dim=0)
    rot = torch.cat([_axis_rotations(ids[:, i], axes_dim[i], theta) for i in range(len(axes_dim))], dim=-3)
    return rot[None, None]


def additive_text_mask(txt_mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """ComfyUI's convention: a bool/integer mask is 1 = keep, 0 = padding; a float mask is already additive.

    Padding becomes ``-finfo(dtype).max`` (not -inf, so that a fully padded row stays finite).
    """
    if txt_mask is None:
        return None
    if torch.is_floating_point(txt_mask):
        return txt_mask
    return (txt_mask.to(torch.int64) - 1).to(dtype) * torch.finfo(dtype).max


def refiner_mask(txt_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``[B, Ltxt]`` additive -> ``[B, 1, Ltxt, Ltxt]`` masking padded keys and padded queries, as ComfyUI."""
    if txt_mask is None:
        return None
    b, n = txt_mask.shape
    m = txt_mask.view(b, 1, 1, n).expand(b, 1, n, n)
    return m + m.transpose(2, 3)


def joint_mask(txt_mask: Optional[torch.Tensor], img_len: int) -> Optional[torch.Tensor]:
    """``[B, Ltxt]`` additive -> ``[B, 1, 1, Ltxt + Limg]``: padded text keys hidden from every query.

    ComfyUI builds ``[1, 1, L]`` (one mask for the batch); this is the same for B = 1 and also
    correct for a batch whose samples pad differently.
    """
    if txt_mask is None:
        return None
    b = txt_mask.shape[0]
    img = torch.zeros(b, img_len, dtype=txt_mask.dtype, device=txt_mask.device)
    return torch.cat([txt_mask, img], dim=1).view(b, 1, 1, -1)
