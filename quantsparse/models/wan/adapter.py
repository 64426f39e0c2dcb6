"""Wan 2.1 / 2.2 as a model family (``models/base.py`` says what an adapter is).

Detection and tensor names follow ComfyUI's ``model_detection`` and ``comfy/ldm/wan/model.py``
(``dims.py``); which Linears are quantized is ``layers.py``; the torch model (``build_model``) is
``model.py``, equal to ComfyUI's ``WanModel`` in names, shapes and outputs.

Attention, as ComfyUI's Wan calls it: every block makes two calls (three for Wan 2.1 I2V) through
``optimized_attention`` with q, k, v flattened to ``[B, L, H * D]`` (``skip_reshape`` False, ``heads``
given): self-attention over the video tokens only (``(t, h, w)`` order, RoPE and the full-width QK
RMSNorm already applied) and cross-attention to the 512 text tokens (and, for Wan 2.1 I2V, to the 257
CLIP tokens). Self-attention runs sparse with no text rows (``txt_len`` 0, geometry from
``transformer_options["grid_sizes"]``, which Wan writes into the very dict the call receives);
cross-attention is dense by rule. Self- and cross-attention calls differ only in their key count, so a
model call whose video has exactly as many tokens as the text or the CLIP image stays dense
(``call_geometry``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ...sparse.config import HEAD_DIM as SPARSE_HEAD_DIM
from ..base import AttentionCall, ModelAdapter, Shapes
from .dims import PATCH, TRIGGER_KEY, WanDims, dims_from_state_dict, reference_state_shapes, variant_name
from .layers import ARCHITECTURE, SCHEME_LAYERS, WEIGHT_ONLY_LAYERS
from .rope import token_grid

BIAS_STD = 0.02
NORM_STD = 0.1


class WanAdapter(ModelAdapter):
    name = ARCHITECTURE
    title = "Wan 2.1 / 2.2"
    source_files = ("wan2.1_t2v_1.3B / 14B, wan2.1_i2v_480p / 720p_14B, wan2.2_t2v / i2v_high / low_noise_14B, "
                    "wan2.2_ti2v_5B (bf16, fp16, fp8_e4m3fn, fp8_scaled, int8)")
    scheme_layers, weight_only_layers = SCHEME_LAYERS, WEIGHT_ONLY_LAYERS
    text_encoders = "CLIPLoader (type wan: umt5_xxl)"
    identity_weights = ("patch_embedding", "self_attn.q.")  # the patch embedding and each block's first Linear

    # -- finding the family

    def claims(self, shapes: Shapes) -> bool:
        return TRIGGER_KEY in shapes and "blocks.0.self_attn.q.weight" in shapes

    def dims_from_shapes(self, shapes: Shapes) -> WanDims:
        return dims_from_state_dict(shapes)

    def dims_from_dict(self, data: Mapping[str, Any]) -> WanDims:
        return WanDims.from_dict(data)

    def variant(self, dims: WanDims) -> str:
        return variant_name(dims)

    def summary(self, dims: WanDims) -> str:
        d = dims
        return (f"{self.name} ({variant_name(d)})  dim {d.dim}, {d.num_heads} heads, {d.num_layers} blocks, "
                f"FFN {d.ffn_dim}, in/out channels {d.in_dim}/{d.out_dim}, text {d.text_dim}"
                + (", CLIP image tokens" if d.model_type == "i2v" else "")
                + (", per-token time modulation" if d.per_token_modulation else ""))

    # -- what the checkpoint holds

    def reference_shapes(self, dims: WanDims) -> dict[str, tuple[int, ...]]:
        return reference_state_shapes(dims)

    # -- tests and proxies

    def tiny_dims(self) -> WanDims:
        return WanDims.tiny()

    def random_state_dict(self, dims: WanDims, seed: int, dtype: torch.dtype = torch.bfloat16
                          ) -> dict[str, torch.Tensor]:
        """Weights ~ N(0, 1/fan_in); biases small; norm weights (the 1-D ``weight`` tensors) near 1, so that a
        tensor loaded under the wrong name changes the output."""
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for key, shape in reference_state_shapes(dims).items():
            noise = torch.randn(shape, generator=gen, dtype=torch.float32)
            if key.endswith(".bias"):
                value = noise * BIAS_STD
            elif key.endswith(".weight") and len(shape) == 1:
                value = 1.0 + noise * NORM_STD
            else:
                value = noise / math.sqrt(math.prod(shape[1:]))
            out[key] = value.to(dtype).contiguous()
        return out

    # -- the torch model (models/wan/model.py)

    def build_model(self, dims: WanDims, dtype: torch.dtype = torch.bfloat16, device=None) -> nn.Module:
        from .model import WanModel

        return WanModel(dims, dtype=dtype, device=device)

    # -- the ComfyUI side

    def call_geometry(self, diffusion_model, args: tuple, kwargs: dict) -> Optional[dict]:
        """``WanModel._forward(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kw)``.

        ``attention_call`` tells self- from cross-attention by the key count, so a latent of exactly as many
        tokens as the text (or the CLIP image) has keeps the whole model call dense."""
        x = args[0] if args else kwargs.get("x")
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            return {"dense": "unsupported layout"}
        if kwargs.get("reference_latent") is not None or kwargs.get("context_latents") is not None:
            return {"dense": "reference-latent tokens"}
        t = x.shape[2]
        tdc = args[4] if len(args) > 4 else kwargs.get("time_dim_concat")
        if isinstance(tdc, torch.Tensor):
            t += tdc.shape[2]
        grid = token_grid((t, *x.shape[3:]), PATCH)
        img_len = math.prod(grid)
        context = args[2] if len(args) > 2 else kwargs.get("context")
        clip_fea = args[3] if len(args) > 3 else kwargs.get("clip_fea")
        cross_lens = {c.shape[-2] for c in (context, clip_fea) if isinstance(c, torch.Tensor) and c.dim() >= 2}
        if img_len in cross_lens:
            return {"dense": "as many video tokens as text or image tokens (self- and cross-attention alike)"}
        return {"grid": grid, "img_len": img_len}

    def attention_call(self, args: tuple, kwargs: dict, options: dict, call: Optional[dict]) -> AttentionCall:
        if call is None or "dense" in call:
            return AttentionCall.dense((call or {}).get("dense", "no geometry for this call"))
        if len(args) < 3:
            return AttentionCall.dense("unsupported layout")
        q, k, v = args[:3]
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        if kwargs.get("skip_reshape") or q.dim() != 3 or not isinstance(heads, int) or q.shape[-1] % heads:
            return AttentionCall.dense("unsupported layout")
        if k.shape[1] != q.shape[1]:
            return AttentionCall.dense("cross-attention")
        if v.shape != k.shape or k.shape != q.shape:
            return AttentionCall.dense("unsupported layout")
        head_dim = q.shape[-1] // heads
        if head_dim != SPARSE_HEAD_DIM:
            return AttentionCall.dense(f"head size {head_dim} (the kernel takes {SPARSE_HEAD_DIM})")
        grid = tuple(int(g) for g in options.get("grid_sizes", call["grid"]))
        if q.shape[1] != math.prod(grid):
            return AttentionCall.dense("token count differs from the latent grid")
        b, n = q.shape[:2]
        as_bhld = lambda t: t.view(b, n, heads, head_dim).transpose(1, 2)  # noqa: E731  (a view, no copy)
        return AttentionCall(True, q=as_bhld(q), k=as_bhld(k), v=as_bhld(v), txt_len=0, grid=grid, heads=heads)
