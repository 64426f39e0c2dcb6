"""HunyuanVideo dimensions, and how to read them back from a checkpoint the way ComfyUI does.

ComfyUI never stores the architecture: ``comfy/model_detection.py`` infers it from tensor
shapes and key names, and fixes the rest (head size 128, theta 256, MLP ratio 4, QKV bias).
A checkpoint we write must therefore be one that this inference turns back into the same
dimensions, and the checkpoint validator needs the same inference to know which tensors to
expect. Only tensors that stay BF16 in our quantized checkpoints are read here: a packed INT4
weight is [N, K/2], so the shape of a quantized Linear says nothing reliable about K.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

from ...core.config import JsonConfig, is_int, is_number
from ..base import count_blocks, shape_of

HEAD_DIM = 128  # ComfyUI derives num_heads = hidden // 128, so no other head size survives a reload
TRIGGER_KEY = "txt_in.individual_token_refiner.blocks.0.norm1.weight"
# Keys that only HunyuanVideo 1.5 (or its distilled / super-resolution variants) carries.
V15_MARKERS = ("vision_in.", "cond_type_embedding.", "time_r_in.", "byt5_in.")
_COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")


@dataclass(frozen=True)
class HunyuanVideoDims(JsonConfig):
    """The constructor arguments of ComfyUI's HunyuanVideo (T2V) transformer that vary by size."""

    LABEL = "HunyuanVideo dimension"
    architecture: ClassVar[str] = "hunyuan_video"  # the family's adapter (models/registry.py)

    hidden_size: int
    num_heads: int
    depth: int
    depth_single_blocks: int
    in_channels: int
    out_channels: int
    context_in_dim: int
    vec_in_dim: int
    mlp_ratio: float
    patch_size: tuple[int, ...]
    axes_dim: tuple[int, ...]
    theta: int
    qkv_bias: bool
    guidance_embed: bool

    def __post_init__(self) -> None:
        # Lists from JSON become tuples so that the dataclass stays hashable and comparable.
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        object.__setattr__(self, "axes_dim", tuple(self.axes_dim))
        for name in ("hidden_size", "num_heads", "in_channels", "out_channels", "context_in_dim", "vec_in_dim",
                     "theta"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("depth", "depth_single_blocks"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("qkv_bias", "guidance_embed"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"HunyuanVideoDims.{name} must be a bool, got {getattr(self, name)!r}")
        if not is_number(self.mlp_ratio) or self.mlp_ratio <= 0:
            raise ValueError(f"HunyuanVideoDims.mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        object.__setattr__(self, "mlp_ratio", float(self.mlp_ratio))
        if len(self.patch_size) != 3:
            raise ValueError(f"HunyuanVideoDims.patch_size must have 3 entries (t, h, w), got {self.patch_size!r}")
        for p in self.patch_size:
            _check_int("patch_size", p, minimum=1)
        if self.patch_size[0] != 1 or self.patch_size[1] != self.patch_size[2]:
            # ComfyUI sizes the final layer by patch_size[-1] squared but unpatchifies by the full patch volume.
            raise ValueError(f"HunyuanVideoDims.patch_size must be (1, p, p), got {self.patch_size!r}")
        if len(self.axes_dim) != 3:
            raise ValueError(f"HunyuanVideoDims.axes_dim must have 3 entries (t, h, w), got {self.axes_dim!r}")
        for a in self.axes_dim:
            _check_int("axes_dim", a, minimum=2)
            if a % 2:
                raise ValueError(f"HunyuanVideoDims.axes_dim entries must be even (RoPE pairs), got {self.axes_dim!r}")
        if self.hidden_size != self.num_heads * HEAD_DIM:
            raise ValueError(
                f"HunyuanVideoDims.num_heads={self.num_heads} with hidden_size={self.hidden_size} gives a head size "
                f"other than {HEAD_DIM}; ComfyUI infers num_heads = hidden_size // {HEAD_DIM}")
        if sum(self.axes_dim) != HEAD_DIM:
            raise ValueError(f"HunyuanVideoDims.axes_dim={self.axes_dim} must sum to the head size {HEAD_DIM}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples become lists); the inverse of ``from_dict``."""
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        d["axes_dim"] = list(self.axes_dim)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "HunyuanVideoDims":
        """Read dimensions from checkpoint metadata; every problem is a ValueError naming the field."""
        for name in ("patch_size", "axes_dim"):
            if isinstance(data, Mapping) and name in data and not isinstance(data[name], (list, tuple)):
                raise ValueError(f"HunyuanVideoDims.{name} must be a list, got {data[name]!r}")
        return super().from_dict(data)

    @classmethod
    def full(cls) -> "HunyuanVideoDims":
        """HunyuanVideo 13B T2V (720p), as ComfyUI detects it from the released weights."""
        return cls(hidden_size=3072, num_heads=24, depth=20, depth_single_blocks=40, in_channels=16, out_channels=16,
                   context_in_dim=4096, vec_in_dim=768, mlp_ratio=4.0, patch_size=(1, 2, 2), axes_dim=(16, 56, 56),
                   theta=256, qkv_bias=True, guidance_embed=True)

    @classmethod
    def tiny(cls) -> "HunyuanVideoDims":
        """The smallest shape that still exercises two heads and both block types (tests, proxy model)."""
        return cls(hidden_size=256, num_heads=2, depth=2, depth_single_blocks=4, in_channels=16, out_channels=16,
                   context_in_dim=64, vec_in_dim=768, mlp_ratio=4.0, patch_size=(1, 2, 2), axes_dim=(16, 56, 56),
                   theta=256, qkv_bias=True, guidance_embed=True)


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if not is_int(value) or value < minimum:
        raise ValueError(f"HunyuanVideoDims.{name} must be an integer >= {minimum}, got {value!r}")


def dims_from_state_dict(shapes: Mapping[str, Sequence[int]]) -> HunyuanVideoDims:
    """Infer the dimensions of a HunyuanVideo T2V state dict from ``{key: shape}``, as ComfyUI would.

    Keys are ComfyUI's, without a prefix; values are shapes (tensors are accepted too). Raises ValueError when ComfyUI would not load the
    tensors as HunyuanVideo T2V (another model, HunyuanVideo 1.5, Hunyuan Image 2.1), saying
    what was found instead.
    """
    keys = list(shapes)
    if TRIGGER_KEY not in shapes:
        prefixed = [p for p in _COMFY_PREFIXES if p + TRIGGER_KEY in shapes]
        hint = (f"; its keys carry the prefix {prefixed[0]!r}, strip it first" if prefixed else "")
        sample = sorted(keys)[:5]
        raise ValueError(
            f"not a HunyuanVideo T2V checkpoint: the key {TRIGGER_KEY!r} that ComfyUI detects HunyuanVideo by is "
            f"missing (found {len(keys)} tensors, e.g. {sample}){hint}")
    v15 = sorted({m.rstrip('.') for m in V15_MARKERS for k in keys if k.startswith(m)})
    if v15:
        raise ValueError(
            f"this looks like HunyuanVideo 1.5 (it has {v15} tensors), which is not supported; "
            f"only HunyuanVideo (13B T2V) checkpoints are")
    if not any(k.startswith("vector_in.") for k in keys):
        raise ValueError(
            "not a HunyuanVideo T2V checkpoint: it has no vector_in.* tensors, so ComfyUI would detect it as "
            "Hunyuan Image 2.1, which is not supported")
    in_w = shape_of(shapes, "img_in.proj.weight", 5, "HunyuanVideo")
    hidden, in_channels, patch = in_w[0], in_w[1], in_w[2:]
    out_w = shape_of(shapes, "final_layer.linear.weight", 2, "HunyuanVideo")
    ctx_w = shape_of(shapes, "txt_in.input_embedder.weight", 2, "HunyuanVideo")
    vec_w = shape_of(shapes, "vector_in.in_layer.weight", 2, "HunyuanVideo")
    if out_w[0] % math.prod(patch):
        raise ValueError(f"final_layer.linear.weight has {out_w[0]} outputs, not a multiple of the patch volume "
                         f"{math.prod(patch)} of img_in.proj.weight {list(in_w)}")
    if hidden % HEAD_DIM:
        raise ValueError(f"img_in.proj.weight gives hidden_size {hidden}, not a multiple of the head size {HEAD_DIM}")
    if vec_w[1] != 768:
        raise ValueError(f"vector_in.in_layer.weight takes {vec_w[1]} inputs; ComfyUI always builds HunyuanVideo "
                         f"with vec_in_dim 768 (CLIP-L pooled)")
    for name, w in (("final_layer.linear.weight", out_w[1]), ("txt_in.input_embedder.weight", ctx_w[0]),
                    ("vector_in.in_layer.weight", vec_w[0])):
        if w != hidden:
            raise ValueError(f"{name} has width {w}, but img_in.proj.weight gives hidden_size {hidden}")
    return HunyuanVideoDims(
        hidden_size=hidden, num_heads=hidden // HEAD_DIM,
        depth=count_blocks(keys, "double_blocks."), depth_single_blocks=count_blocks(keys, "single_blocks."),
        in_channels=in_channels, out_channels=out_w[0] // math.prod(patch), context_in_dim=ctx_w[1],
        vec_in_dim=vec_w[1], mlp_ratio=4.0, patch_size=patch, axes_dim=(16, 56, 56), theta=256, qkv_bias=True,
        guidance_embed=any(k.startswith("guidance_in.") for k in keys))
