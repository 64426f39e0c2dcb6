"""A torch-only Wan 2.1 / 2.2 diffusion transformer with ComfyUI's state-dict names, shapes and numerics.

Every variant the adapter supports: T2V (1.3B, 14B, and each Wan 2.2 T2V A14B expert), Wan 2.1 I2V 14B
(``img_emb`` and the 257 CLIP tokens in cross-attention, ``emb_pos`` for first-last-frame files), each
Wan 2.2 I2V A14B expert (36 input channels, no CLIP branch) and TI2V-5B (48 channels, per-token time
modulation). Calibration, proxies and the CPU tests need it without ComfyUI; equality with
``comfy.ldm.wan.model.WanModel`` (keys, shapes, outputs) is checked by ``tests/test_wan_vs_comfyui.py``
against a real ComfyUI checkout, and its tensor table equals ``dims.reference_state_shapes`` (what the
checkpoint format and the converter use) by ``tests/test_wan_adapter.py``.

The forward is split so that calibration can run it a piece at a time::

    inp = model.prepare(x, timestep, context, clip_fea)     # padding, embedders, RoPE: what every block needs
    h = inp.x
    for block in model.blocks:
        h = block(h, inp.e0, inp.freqs, inp.context, inp.context_img_len, attention=fn)
    out = model.head(h, inp)                                # -> [B, out_dim, T, H, W]

Inputs follow ``WanModel.forward``: ``x`` ``[B, in_dim, T, H, W]`` (for the 36-channel models, the noise
latent with ComfyUI's ``concat_cond`` mask and image channels already concatenated); ``timestep``
``[B]`` sigma * 1000, or ``[B, N]`` per-frame timesteps (TI2V-5B: ``WAN22.process_timestep`` makes them
from the denoise mask, the clean first frame at 0); ``context`` ``[B, Ltxt, text_dim]`` umT5 states;
``clip_fea`` ``[B, 257, 1280]`` CLIP-H penultimate states (Wan 2.1 I2V; 514 for first-last-frame).
A latent whose H or W is odd is padded to the patch size as ComfyUI pads it (circularly), and the
output is cut back to the latent's size. ComfyUI's optional extras (``time_dim_concat``, reference and
in-context latents, ``rope_options``, block patches) belong to other nodes and are not modelled.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import AttentionFn, WanBlock, repeat_e, sdpa_attention
from .dims import CLIP_DIM, FREQ_DIM, HEAD_DIM, PATCH, WanDims
from .rope import rope_freqs, sinusoidal_embedding, token_grid


@dataclass
class WanInputs:
    """What every block and the head need, computed once per forward by ``WanModel.prepare``."""

    x: torch.Tensor  # [B, L, D] video tokens, (t, h, w) order
    e: torch.Tensor  # [B, T', D] time embedding (the head's modulation); T' = 1 or one per timestep given
    e0: torch.Tensor  # [B, T', 6, D] time projection (every block's modulation)
    context: torch.Tensor  # [B, Lctx, D] embedded text, the CLIP tokens first for Wan 2.1 I2V
    context_img_len: Optional[int]  # CLIP tokens at the start of context (None without clip_fea)
    freqs: torch.Tensor  # [1, L, 1, 64, 2, 2] float32 RoPE rotations
    grid: tuple[int, int, int]  # token grid (T, ceil(H/2), ceil(W/2))
    size: tuple[int, int, int]  # the latent's (T, H, W) before padding: the output's size

    @property
    def img_len(self) -> int:
        return self.x.shape[1]


class MLPProj(nn.Module):
    """CLIP image features -> context tokens (``img_emb``): LayerNorm, Linear, GELU, Linear, LayerNorm (eps 1e-5,
    affine); first-last-frame models add a learned position embedding ``emb_pos`` first."""

    def __init__(self, in_dim: int, out_dim: int, flf_tokens: Optional[int], *, dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.proj = nn.Sequential(nn.LayerNorm(in_dim, **kw), nn.Linear(in_dim, in_dim, **kw), nn.GELU(),
                                  nn.Linear(in_dim, out_dim, **kw), nn.LayerNorm(out_dim, **kw))
        self.emb_pos = nn.Parameter(torch.empty(1, flf_tokens, in_dim, **kw)) if flf_tokens else None

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        if self.emb_pos is not None:
            n = self.emb_pos.shape[1]
            image_embeds = image_embeds[:, :n] + self.emb_pos[:, :image_embeds.shape[1]].to(image_embeds)
        return self.proj(image_embeds)


class Head(nn.Module):
    """``head``: modulation (1, 2, D) + the time embedding -> shift, scale; LayerNorm (no affine); Linear to
    the patch values; then unpatchified to ``[B, out_dim, T, H, W]`` and cut to the latent's size."""

    def __init__(self, dim: int, out_dim: int, *, dtype=None, device=None):
        super().__init__()
        self.out_dim = out_dim
        kw = {"dtype": dtype, "device": device}
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False, **kw)
        self.head = nn.Linear(dim, out_dim * math.prod(PATCH), **kw)
        self.modulation = nn.Parameter(torch.empty(1, 2, dim, **kw))

    def project(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, L, D]``, time embedding ``[B, T', D]`` -> patch values ``[B, L, out_dim * 4]``."""
        mod = self.modulation.to(dtype=x.dtype, device=x.device).unsqueeze(0) + e.unsqueeze(2)
        shift, scale = mod.unbind(2)
        return self.head(torch.addcmul(repeat_e(shift, x), self.norm(x), 1 + repeat_e(scale, x)))

    def forward(self, x: torch.Tensor, inp: WanInputs) -> torch.Tensor:
        """Video tokens ``[B, L, D]`` -> velocity ``[B, out_dim, T, H, W]`` (the latent's size)."""
        u = self.project(x, inp.e)
        b, c, grid = u.shape[0], self.out_dim, inp.grid
        u = u[:, :math.prod(grid)].view(b, *grid, *PATCH, c)
        u = torch.einsum("bfhwpqrc->bcfphqwr", u)
        u = u.reshape(b, c, *(g * p for g, p in zip(grid, PATCH)))
        t, h, w = inp.size
        return u[:, :, :t, :h, :w]


class WanModel(nn.Module):
    """Wan diffusion transformer (flow matching; predicts velocity), ComfyUI's ``WanModel`` for ``dims``.

    ``attention`` (attribute) is the ``AttentionFn`` used when ``forward`` gets none; it sees every attention
    call (``blocks.py`` says which). ``patch_embedding`` is float32 whatever ``dtype`` is, as in ComfyUI,
    which runs it in float32.
    """

    def __init__(self, dims: WanDims, dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        self.dims = dims
        self.dtype = dtype
        self.attention: AttentionFn = sdpa_attention
        d, kw = dims.dim, {"dtype": dtype, "device": device}
        self.patch_embedding = nn.Conv3d(dims.in_dim, d, kernel_size=PATCH, stride=PATCH, dtype=torch.float32,
                                         device=device)
        self.text_embedding = nn.Sequential(nn.Linear(dims.text_dim, d, **kw), nn.GELU(approximate="tanh"),
                                            nn.Linear(d, d, **kw))
        self.time_embedding = nn.Sequential(nn.Linear(FREQ_DIM, d, **kw), nn.SiLU(), nn.Linear(d, d, **kw))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d, **kw))
        self.blocks = nn.ModuleList(WanBlock(dims, i, **kw) for i in range(dims.num_layers))
        self.head = Head(d, dims.out_dim, **kw)
        self.img_emb = MLPProj(CLIP_DIM, d, dims.flf_tokens, **kw) if dims.model_type == "i2v" else None

    def _check_inputs(self, x, timestep, context, clip_fea) -> None:
        d = self.dims
        if x.dim() != 5 or x.shape[1] != d.in_dim:
            raise ValueError(f"latent must be [B, {d.in_dim}, T, H, W], got {list(x.shape)}")
        b = x.shape[0]
        if context.dim() != 3 or context.shape[0] != b or context.shape[2] != d.text_dim:
            raise ValueError(f"context must be [B={b}, Ltxt, {d.text_dim}], got {list(context.shape)}")
        if timestep.dim() not in (1, 2) or timestep.shape[0] != b or timestep.numel() == 0:
            raise ValueError(f"timestep must be [B={b}] or [B={b}, N] (per-frame), got {list(timestep.shape)}")
        if clip_fea is not None and (clip_fea.dim() != 3 or clip_fea.shape[0] != b or clip_fea.shape[2] != CLIP_DIM):
            raise ValueError(f"clip_fea must be [B={b}, Nclip, {CLIP_DIM}] or None, got {list(clip_fea.shape)}")

    def prepare(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                clip_fea: Optional[torch.Tensor] = None) -> WanInputs:
        """Everything before the first block: padding, patch / time / text / image embedders and RoPE.

        Inputs are cast as ComfyUI's ``BaseModel._apply_model`` casts them: latent, context and clip_fea to the
        model dtype, the timestep to float32.
        """
        self._check_inputs(x, timestep, context, clip_fea)
        x, context = x.to(self.dtype), context.to(self.dtype)
        timestep = timestep.float()
        b, _, t, h, w = x.shape
        pad = []
        for size, p in zip(reversed(x.shape[2:]), reversed(PATCH)):
            pad += [0, (p - size % p) % p]
        x = F.pad(x, pad, mode="circular")
        freqs = rope_freqs((t, h, w), PATCH, HEAD_DIM, dtype=x.dtype, device=x.device)

        tokens = self.patch_embedding(x.float()).to(x.dtype)
        grid = tuple(int(s) for s in tokens.shape[2:])
        assert grid == token_grid((t, h, w), PATCH)
        tokens = tokens.flatten(2).transpose(1, 2)

        e = self.time_embedding(sinusoidal_embedding(FREQ_DIM, timestep.flatten()).to(dtype=x.dtype))
        e = e.reshape(b, -1, e.shape[-1])
        e0 = self.time_projection(e).unflatten(2, (6, self.dims.dim))

        context = self.text_embedding(context)
        context_img_len = None
        if clip_fea is not None:
            if self.img_emb is not None:
                context = torch.cat([self.img_emb(clip_fea.to(self.dtype)), context], dim=1)
            context_img_len = clip_fea.shape[-2]
        return WanInputs(x=tokens, e=e, e0=e0, context=context, context_img_len=context_img_len, freqs=freqs,
                         grid=grid, size=(t, h, w))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                clip_fea: Optional[torch.Tensor] = None, *, attention: Optional[AttentionFn] = None) -> torch.Tensor:
        """Velocity ``[B, out_dim, T, H, W]`` for latent ``x`` (the module docstring lists the inputs)."""
        attention = attention or self.attention
        inp = self.prepare(x, timestep, context, clip_fea)
        h = inp.x
        for block in self.blocks:
            h = block(h, inp.e0, inp.freqs, inp.context, inp.context_img_len, attention=attention)
        return self.head(h, inp)


@functools.lru_cache(maxsize=16)
def _state_shapes(dims: WanDims) -> tuple[tuple[str, tuple[int, ...]], ...]:
    model = WanModel(dims, device="meta")
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def model_state_shapes(dims: WanDims) -> dict[str, tuple[int, ...]]:
    """Every tensor of this module for ``dims``, in ``state_dict`` order (built on meta, cached); equal to
    ``dims.reference_state_shapes(dims)``, the table the checkpoint format uses."""
    return dict(_state_shapes(dims))
