"""A torch-only HunyuanVideo (T2V) transformer with ComfyUI's state-dict names, shapes and numerics.

Calibration, the proxy model and the CPU tests need HunyuanVideo without ComfyUI installed,
and the checkpoint validator needs the list of tensors ComfyUI will ask for. Equality with
``comfy.ldm.hunyuan_video.model.HunyuanVideo`` (keys, shapes, outputs) is checked by
``tests/test_hunyuan_vs_comfyui.py`` against a real ComfyUI checkout.

The forward is split so that calibration can run it a piece at a time::

    inp = model.prepare(x, timestep, context, y, guidance, txt_mask)     # embedders + text refiner
    img, txt = model.double_blocks[i](inp.img, inp.txt, inp.vec, inp.pe, inp.attn_mask)
    x = torch.cat((txt, img), 1)                                          # text first
    x = model.single_blocks[i](x, inp.vec, inp.pe, inp.attn_mask)
    out = model.head(x[:, inp.txt_len:], inp.vec, inp.grid)              # -> [B, C, T, H, W]
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .attention import AttentionFn, additive_text_mask, joint_mask, rope_freqs, sdpa_attention
from .blocks import DoubleStreamBlock, SingleStreamBlock
from .dims import HunyuanVideoDims
from .embed import LastLayer, MLPEmbedder, PatchEmbed, timestep_embedding
from .refiner import TokenRefiner


@dataclass
class BlockInputs:
    """What every block needs, computed once per forward by ``HunyuanVideo.prepare``."""

    img: torch.Tensor  # [B, Limg, hidden] video tokens, (t, h, w) order
    txt: torch.Tensor  # [B, Ltxt, hidden] refined text tokens
    vec: torch.Tensor  # [B, hidden] conditioning vector
    pe: torch.Tensor  # [1, 1, Ltxt + Limg, 64, 2, 2] float32 RoPE rotations
    attn_mask: Optional[torch.Tensor]  # [B, 1, 1, Ltxt + Limg] additive, or None
    grid: tuple[int, int, int]  # video token grid (T, H/2, W/2)

    @property
    def txt_len(self) -> int:
        return self.txt.shape[1]

    @property
    def img_len(self) -> int:
        return self.img.shape[1]


class HunyuanVideo(nn.Module):
    """HunyuanVideo T2V diffusion transformer (flow matching; predicts velocity).

    ``attention`` (attribute) is the ``AttentionFn`` used when ``forward`` gets none; it sees every
    attention call of the model, refiner included.
    """

    def __init__(self, dims: HunyuanVideoDims, dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        self.dims = dims
        self.dtype = dtype
        self.attention: AttentionFn = sdpa_attention
        h, kw = dims.hidden_size, {"dtype": dtype, "device": device}
        self.img_in = PatchEmbed(dims.patch_size, dims.in_channels, h, **kw)
        self.time_in = MLPEmbedder(256, h, **kw)
        self.vector_in = MLPEmbedder(dims.vec_in_dim, h, **kw)
        # ComfyUI puts an nn.Identity here without guidance: no keys either way.
        self.guidance_in = MLPEmbedder(256, h, **kw) if dims.guidance_embed else None
        self.txt_in = TokenRefiner(dims.context_in_dim, h, dims.num_heads, **kw)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(dims, i, **kw) for i in range(dims.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(dims, i, **kw) for i in range(dims.depth_single_blocks))
        self.final_layer = LastLayer(h, dims.patch_size[-1], dims.out_channels, **kw)

    def _check_inputs(self, x, timestep, context, y, guidance, txt_mask) -> None:
        d = self.dims
        if x.dim() != 5 or x.shape[1] != d.in_channels:
            raise ValueError(f"latent must be [B, {d.in_channels}, T, H, W], got {list(x.shape)}")
        b = x.shape[0]
        for size, p in zip(x.shape[2:], d.patch_size):
            if size % p:
                raise ValueError(f"latent T, H, W {list(x.shape[2:])} must be multiples of the patch {d.patch_size}")
        if context.dim() != 3 or context.shape[0] != b or context.shape[2] != d.context_in_dim:
            raise ValueError(f"context must be [B={b}, Ltxt, {d.context_in_dim}], got {list(context.shape)}")
        if y.dim() != 2 or y.shape[0] != b or y.shape[1] < d.vec_in_dim:
            raise ValueError(f"y (pooled text) must be [B={b}, {d.vec_in_dim}], got {list(y.shape)}")
        if timestep.shape != (b,):
            raise ValueError(f"timestep must be [B={b}], got {list(timestep.shape)}")
        if guidance is not None and guidance.shape != (b,):
            raise ValueError(f"guidance must be [B={b}] or None, got {list(guidance.shape)}")
        if txt_mask is not None and tuple(txt_mask.shape) != tuple(context.shape[:2]):
            raise ValueError(f"txt_mask must be [B, Ltxt] = {list(context.shape[:2])}, got {list(txt_mask.shape)}")

    def prepare(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, y: torch.Tensor,
                guidance: Optional[torch.Tensor] = None, txt_mask: Optional[torch.Tensor] = None, *,
                attention: Optional[AttentionFn] = None) -> BlockInputs:
        """Embed the latent and conditioning and refine the text: everything before the first block.

        Inputs are cast as ComfyUI's ``BaseModel._apply_model`` casts them: latent, context, y and
        guidance to the model dtype, the timestep to float32.
        """
        self._check_inputs(x, timestep, context, y, guidance, txt_mask)
        attention = attention or self.attention
        x, context, y = x.to(self.dtype), context.to(self.dtype), y.to(self.dtype)
        timestep = timestep.float()
        grid = tuple(s // p for s, p in zip(x.shape[2:], self.dims.patch_size))
        img = self.img_in(x)
        vec = self.time_in(timestep_embedding(timestep, 256, time_factor=1.0).to(img.dtype))
        vec = vec + self.vector_in(y[:, :self.dims.vec_in_dim])
        if self.guidance_in is not None and guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance.to(self.dtype), 256).to(img.dtype))
        add_mask = additive_text_mask(txt_mask, img.dtype)
        txt = self.txt_in(context, timestep, add_mask, attention=attention)
        pe = rope_freqs(grid, txt.shape[1], self.dims.axes_dim, self.dims.theta, device=img.device)
        mask = None if add_mask is None else joint_mask(add_mask.to(img.dtype), img.shape[1])
        return BlockInputs(img=img, txt=txt, vec=vec, pe=pe, attn_mask=mask, grid=grid)

    def head(self, img: torch.Tensor, vec: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Video tokens ``[B, Limg, hidden]`` -> velocity ``[B, out_channels, T, H, W]``."""
        out = self.final_layer(img, vec)
        b, (t, h, w), (pt, ph, pw) = img.shape[0], grid, self.dims.patch_size
        c = self.dims.out_channels
        out = out.reshape(b, t, h, w, c, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return out.reshape(b, c, t * pt, h * ph, w * pw)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, y: torch.Tensor,
                guidance: Optional[torch.Tensor] = None, txt_mask: Optional[torch.Tensor] = None,
                attention: Optional[AttentionFn] = None) -> torch.Tensor:
        """Velocity for latent ``x`` ``[B, 16, T, H, W]``.

        ``timestep`` ``[B]`` is sigma * 1000; ``context`` ``[B, Ltxt, context_in_dim]`` the text-encoder
        hidden states; ``y`` ``[B, 768]`` the pooled CLIP-L output; ``guidance`` ``[B]`` the embedded
        guidance scale (ignored when the model has no guidance embedder); ``txt_mask`` ``[B, Ltxt]``
        with ComfyUI's convention (bool/int: 1 = token, 0 = padding; float: additive).
        """
        attention = attention or self.attention
        inp = self.prepare(x, timestep, context, y, guidance, txt_mask, attention=attention)
        img, txt = inp.img, inp.txt
        for block in self.double_blocks:
            img, txt = block(img, txt, inp.vec, inp.pe, inp.attn_mask, attention=attention)
        joint = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            joint = block(joint, inp.vec, inp.pe, inp.attn_mask, attention=attention)
        return self.head(joint[:, inp.txt_len:], inp.vec, inp.grid)


@functools.lru_cache(maxsize=8)
def _state_shapes(dims: HunyuanVideoDims) -> tuple[tuple[str, tuple[int, ...]], ...]:
    model = HunyuanVideo(dims, device="meta")
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def reference_state_shapes(dims: HunyuanVideoDims) -> dict[str, tuple[int, ...]]:
    """Every tensor ComfyUI's HunyuanVideo of ``dims`` holds in BF16, with its shape (built on meta, cached)."""
    return dict(_state_shapes(dims))


def reference_state_dtypes(dims: HunyuanVideoDims, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.dtype]:
    """Dtype of every tensor of an unquantized checkpoint stored in ``dtype`` (all of them: no buffers)."""
    return {k: dtype for k in reference_state_shapes(dims)}
