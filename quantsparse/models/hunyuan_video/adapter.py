"""HunyuanVideo (v1, T2V 13B) as a model family: the first adapter (``models/base.py`` says what one is).

Detection, dimensions and tensor names follow ComfyUI's ``model_detection`` and its HunyuanVideo class
(``dims.py``, ``model.py``); which Linears are quantized is ``layers.py``; the attention calls are
ComfyUI's ``flux.math.attention``: post-RoPE ``[B, H, L, 128]`` with ``skip_reshape``, text first,
then the video tokens in ``(t, h, w)`` order; the two text-refiner calls per forward have no
``block_type`` and stay dense.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ...sparse.config import HEAD_DIM as SPARSE_HEAD_DIM
from ..base import AttentionCall, BlockRef, ModelAdapter, SamplingDefaults, Shapes
from .dims import V15_MARKERS, TRIGGER_KEY, HunyuanVideoDims, dims_from_state_dict
from .layers import ARCHITECTURE, SCHEME_LAYERS, WEIGHT_ONLY_LAYERS


class HunyuanVideoAdapter(ModelAdapter):
    name = ARCHITECTURE
    title = "HunyuanVideo T2V"
    source_files = "hunyuan_video_t2v_720p_bf16.safetensors"
    text_encoders = "DualCLIPLoader (type hunyuan_video)"
    calibration_supported = True
    scheme_layers, weight_only_layers = SCHEME_LAYERS, WEIGHT_ONLY_LAYERS
    identity_weights = ("img_in", "qkv", "linear1")  # each block's first Linear and the patch embedding
    sampling = SamplingDefaults(latent_channels=16, shift=7.0, guidance=6.0)  # ComfyUI's sampling_settings

    # -- finding the family

    def claims(self, shapes: Shapes) -> bool:
        return TRIGGER_KEY in shapes and not any(k.startswith(V15_MARKERS) for k in shapes)

    def dims_from_shapes(self, shapes: Shapes) -> HunyuanVideoDims:
        return dims_from_state_dict(shapes)

    def dims_from_dict(self, data: Mapping[str, Any]) -> HunyuanVideoDims:
        return HunyuanVideoDims.from_dict(data)

    def variant(self, dims: HunyuanVideoDims) -> str:
        return "HunyuanVideo T2V 13B" if dims == HunyuanVideoDims.full() else "HunyuanVideo T2V"

    def summary(self, dims: HunyuanVideoDims) -> str:
        d = dims
        return (f"{self.name}  hidden {d.hidden_size}, {d.num_heads} heads, {d.depth} double + "
                f"{d.depth_single_blocks} single blocks, in/out channels {d.in_channels}/{d.out_channels}, "
                f"context {d.context_in_dim}, guidance {'yes' if d.guidance_embed else 'no'}")

    # -- what the checkpoint holds

    def reference_shapes(self, dims: HunyuanVideoDims) -> dict[str, tuple[int, ...]]:
        from .model import reference_state_shapes

        return reference_state_shapes(dims)

    # -- tests and proxies

    def tiny_dims(self) -> HunyuanVideoDims:
        return HunyuanVideoDims.tiny()

    def random_state_dict(self, dims, seed: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        from .random_weights import make_random_state_dict

        return make_random_state_dict(dims, seed, dtype)

    # -- calibration: the torch model, its blocks and how their inputs flow

    def build_model(self, dims: HunyuanVideoDims, dtype: torch.dtype = torch.bfloat16, device=None) -> nn.Module:
        from .model import HunyuanVideo

        return HunyuanVideo(dims, dtype=dtype, device=device)

    def denoise(self, model, sample, attention=None) -> torch.Tensor:
        return model(sample["x"], sample["timestep"], sample["context"], sample["y"], sample.get("guidance"),
                     sample.get("txt_mask"), attention=attention)

    def calib_blocks(self, model) -> list[BlockRef]:
        return ([BlockRef(f"double_{i:02d}", f"double_blocks.{i}", "double", i, b)
                 for i, b in enumerate(model.double_blocks)]
                + [BlockRef(f"single_{i:02d}", f"single_blocks.{i}", "single", i, b)
                   for i, b in enumerate(model.single_blocks)])

    def calib_embedders(self, model) -> list[nn.Module]:
        return [m for m in (model.img_in, model.time_in, model.vector_in, model.guidance_in, model.txt_in)
                if m is not None]

    def calib_first_inputs(self, model, s: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
        """A model-level sample -> the first block's inputs, through the embedders and the text refiner."""
        inp = model.prepare(s["x"].to(device), s["timestep"].to(device), s["context"].to(device),
                            s["y"].to(device), s["guidance"].to(device) if "guidance" in s else None,
                            s["txt_mask"].to(device) if "txt_mask" in s else None)
        out = {"img": inp.img, "txt": inp.txt, "vec": inp.vec, "grid": torch.tensor(inp.grid)}
        if inp.attn_mask is not None:
            out["mask"] = inp.attn_mask
        return out

    def calib_next_inputs(self, ref: BlockRef, last_of_kind: bool, sample_in: dict, outputs: dict) -> dict:
        """The next block's inputs from a block's outputs: the joint sequence (text first) after the last
        double block."""
        keep = {k: v for k, v in sample_in.items() if k in ("vec", "grid", "mask", "txt_len")}
        if ref.kind == "double" and last_of_kind:
            outputs = {"x": torch.cat((outputs["txt"], outputs["img"]), dim=1)}
        if "img" in outputs:
            keep.update(outputs)
            return keep
        keep["x"] = outputs["x"]
        if "txt_len" not in keep:
            keep["txt_len"] = torch.tensor(sample_in["txt"].shape[1])
        return keep

    def calib_run_block(self, ref: BlockRef, block: nn.Module, sample: dict, pe, attention) -> dict:
        """The block's outputs in its input format ({"img", "txt"} or {"x"})."""
        mask = sample.get("mask")
        if ref.kind == "double":
            img, txt = block(sample["img"], sample["txt"], sample["vec"], pe, mask, attention=attention)
            return {"img": img, "txt": txt}
        return {"x": block(sample["x"], sample["vec"], pe, mask, attention=attention)}

    def calib_geometry(self, sample: dict) -> tuple[tuple[int, int, int], int]:
        grid = tuple(int(v) for v in sample["grid"].tolist())
        txt_len = sample["txt"].shape[1] if "txt" in sample else int(sample["txt_len"])
        return grid, txt_len

    def calib_rope(self, dims: HunyuanVideoDims, grid, txt_len: int, device):
        from .attention import rope_freqs

        return rope_freqs(grid, txt_len, dims.axes_dim, dims.theta, device=device)

    # -- the ComfyUI side

    def call_geometry(self, diffusion_model, args: tuple, kwargs: dict) -> Optional[dict]:
        x = args[0] if args else kwargs.get("x")
        patch_size = getattr(diffusion_model, "patch_size", None)
        ref_latent = kwargs.get("ref_latent", args[9] if len(args) > 10 else None)
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or patch_size is None or len(patch_size) != 3:
            return {"dense": "unsupported layout"}
        if ref_latent is not None:
            return {"dense": "reference-latent tokens (image-to-video)"}
        grid = tuple(int(s) // int(p) for s, p in zip(x.shape[2:], patch_size))
        return {"grid": grid, "img_len": math.prod(grid)}

    def attention_call(self, args: tuple, kwargs: dict, options: dict, call: Optional[dict]) -> AttentionCall:
        if "block_type" not in options:
            return AttentionCall.dense("text refiner")
        if call is None or "dense" in call:
            return AttentionCall.dense((call or {}).get("dense", "no geometry for this call"))
        if len(args) < 4:
            return AttentionCall.dense("unsupported layout")
        q, k, v = args[:3]
        if not kwargs.get("skip_reshape") or q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
            return AttentionCall.dense("unsupported layout")
        if q.shape[-1] != SPARSE_HEAD_DIM:
            return AttentionCall.dense(f"head size {q.shape[-1]} (the kernel takes {SPARSE_HEAD_DIM})")
        seq = q.shape[2]
        if seq <= call["img_len"]:
            return AttentionCall.dense("no text before the video tokens")
        return AttentionCall(True, q=q, k=k, v=v, txt_len=seq - call["img_len"], grid=call["grid"],
                             heads=q.shape[1])
