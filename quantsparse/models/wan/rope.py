"""Wan's 3-D RoPE and its time embedding, computed as ComfyUI computes them.

RoPE is ComfyUI's ``EmbedND(dim=d, theta=10000, axes_dim=[d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)])``
([44, 42, 42] for d = 128) over the ``(t, h, w)`` token grid, with the positions of
``WanModel.rope_encode`` without ``rope_options`` (no scale or shift) and without reference latents:
integer steps from 0, built in the model's dtype (as ComfyUI builds them in the latent's), angles in
float64, rotations stored float32. The rotations are ``[1, L, 1, d/2, 2, 2]`` and apply to q, k
``[B, L, H, d]`` (``apply_rope``), adjacent pairs ``(2i, 2i+1)`` rotated, in float32.
"""

from __future__ import annotations

import torch

THETA = 10000.0


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Head-dimension split between the t, h and w axes: (44, 42, 42) for 128."""
    d = head_dim
    return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)


def token_grid(size: tuple[int, int, int], patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """Tokens per axis of a latent ``(T, H, W)``: ComfyUI pads each axis up to the patch, so this is the
    ceiling (``rope_encode``'s ``(n + p // 2) // p`` is the same for patch sizes 1 and 2)."""
    return tuple(-(-int(n) // int(p)) for n, p in zip(size, patch))


def positions(size: tuple[int, int, int], patch: tuple[int, int, int], dtype: torch.dtype, device=None
              ) -> torch.Tensor:
    """``[1, T*H*W, 3]`` (t, h, w) positions of the tokens in ``(t, h, w)`` order, as ``rope_encode``."""
    lens = [(int(n) + p // 2) // p for n, p in zip(size, patch)]
    ids = torch.zeros((*lens, 3), device=device, dtype=dtype)
    for axis, n in enumerate(lens):
        shape = [1, 1, 1]
        shape[axis] = -1
        ids[..., axis] = ids[..., axis] + torch.linspace(0, n - 1, steps=n, device=device, dtype=dtype).reshape(shape)
    return ids.reshape(1, -1, 3)


def _axis_rotations(pos: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """``[..., L]`` positions -> ``[..., L, dim/2, 2, 2]`` float32 rotations (flux ``math.rope``)."""
    device = pos.device if pos.device.type != "mps" else torch.device("cpu")  # no float64 there
    scale = torch.linspace(0, (dim - 2) / dim, steps=dim // 2, dtype=torch.float64, device=device)
    omega = 1.0 / (theta ** scale)
    angle = pos.to(dtype=torch.float32, device=device).to(torch.float64)[..., None] * omega
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([cos, -sin, sin, cos], dim=-1).reshape(*angle.shape, 2, 2)
    return rot.to(dtype=torch.float32, device=pos.device)


def rope_freqs(size: tuple[int, int, int], patch: tuple[int, int, int], head_dim: int, dtype: torch.dtype,
               device=None, theta: float = THETA) -> torch.Tensor:
    """Rotations ``[1, L, 1, head_dim/2, 2, 2]`` float32 for a latent of ``size`` (T, H, W) before padding."""
    ids = positions(size, patch, dtype, device)
    rot = torch.cat([_axis_rotations(ids[..., i], n, theta) for i, n in enumerate(rope_axes(head_dim))], dim=-3)
    return rot.unsqueeze(2)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, L, H, d]`` rotated by ``freqs`` ``[1, L, 1, d/2, 2, 2]``; float32 math, result in x's dtype."""
    pairs = x.to(freqs.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs[..., 0] * pairs[..., 0]
    out.addcmul_(freqs[..., 1], pairs[..., 1])
    return out.reshape(*x.shape).type_as(x)


def sinusoidal_embedding(dim: int, position: torch.Tensor) -> torch.Tensor:
    """``[N]`` timesteps -> ``[N, dim]`` float32 ``[cos | sin]`` (Wan's ``sinusoidal_embedding_1d``)."""
    half = dim // 2
    position = position.type(torch.float32)
    sinusoid = torch.outer(position, torch.pow(10000, -torch.arange(half).to(position).div(half)))
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)
