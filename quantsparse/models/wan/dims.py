"""Wan 2.1 / 2.2 dimensions, read from key shapes the way ComfyUI's ``model_detection`` reads them.

ComfyUI detects Wan by ``head.modulation`` and fixes the rest (head size 128, patch (1, 2, 2), frequency
dimension 256, QK norm, affine cross-attention norm). The variants users run differ only in these
numbers: T2V 1.3B (dim 1536) and 14B (5120), I2V 14B (input 36 channels, CLIP image tokens through
``img_emb``), the Wan 2.2 A14B experts (two files, each a 14B T2V- or I2V-shaped model without
``img_emb``), and TI2V-5B (dim 3072, 48 latent channels in and out, per-token time modulation).
Other Wan models ComfyUI knows (VACE, camera, S2V, HuMo, Animate, SCAIL, WanDancer) carry extra
modules and are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from ...core.config import JsonConfig
from ..base import Shapes, count_blocks, shape_of

HEAD_DIM = 128
TRIGGER_KEY = "head.modulation"
FREQ_DIM = 256
PATCH = (1, 2, 2)
CLIP_DIM = 1280  # CLIP ViT-H image features (Wan 2.1 I2V)
TEXT_DIM = 4096  # umT5-XXL; ComfyUI's detection does not read it, it builds every Wan with this width
# Keys of the Wan variants ComfyUI builds with other classes; none is supported yet.
OTHER_VARIANTS = {
    "vace_patch_embedding.weight": "Wan VACE",
    "control_adapter.conv.weight": "Wan camera control",
    "casual_audio_encoder.encoder.final_linear.weight": "Wan S2V",
    "audio_proj.audio_proj_glob_1.layer.bias": "Wan HuMo",
    "face_adapter.fuser_blocks.0.k_norm.weight": "Wan Animate",
    "patch_embedding_mask.weight": "Wan SCAIL",
    "patch_embedding_pose.weight": "Wan SCAIL",
    "patch_embedding_global.weight": "WanDancer",
    "ref_conv.weight": "Wan with a reference-image encoder (ref_conv)",
}


@dataclass(frozen=True)
class WanDims(JsonConfig):
    """The constructor arguments of ComfyUI's ``WanModel`` that vary between the files users run."""

    LABEL = "Wan dimension"
    architecture: ClassVar[str] = "wan"  # the family's adapter (models/registry.py)

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int
    out_dim: int
    text_dim: int = TEXT_DIM
    model_type: str = "t2v"  # "i2v": CLIP image tokens through img_emb (Wan 2.1 I2V / FLF2V)
    flf_tokens: Optional[int] = None  # img_emb.emb_pos length (first-last-frame models)

    def __post_init__(self) -> None:
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"WanDims.{name} must be an integer >= 1, got {v!r}")
        if self.model_type not in ("t2v", "i2v"):
            raise ValueError(f"WanDims.model_type must be 't2v' or 'i2v', got {self.model_type!r}")
        if self.dim != self.num_heads * HEAD_DIM:
            raise ValueError(f"WanDims: dim {self.dim} must be num_heads {self.num_heads} x {HEAD_DIM}")
        if self.flf_tokens is not None and (self.model_type != "i2v" or self.flf_tokens < 1):
            raise ValueError(f"WanDims.flf_tokens={self.flf_tokens!r} needs model_type 'i2v' and a count >= 1")

    @property
    def head_dim(self) -> int:
        return HEAD_DIM

    @property
    def per_token_modulation(self) -> bool:
        """Wan 2.2 TI2V-5B: the time embedding is per latent frame (the first is the clean image)."""
        return self.out_dim == 48

    # The files users run (models.md section 1.3), and the smallest shape tests build.

    @classmethod
    def t2v_1_3b(cls) -> "WanDims":
        return cls(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=16, out_dim=16)

    @classmethod
    def t2v_14b(cls) -> "WanDims":
        """Wan 2.1 T2V 14B, and each Wan 2.2 T2V A14B expert."""
        return cls(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=16, out_dim=16)

    @classmethod
    def i2v_14b(cls) -> "WanDims":
        """Wan 2.1 I2V 14B (480p and 720p): 36 input channels and the CLIP image branch."""
        return cls(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, out_dim=16, model_type="i2v")

    @classmethod
    def i2v_a14b(cls) -> "WanDims":
        """Each Wan 2.2 I2V A14B expert: 36 input channels, no CLIP branch."""
        return cls(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, out_dim=16)

    @classmethod
    def ti2v_5b(cls) -> "WanDims":
        return cls(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48)

    @classmethod
    def tiny(cls, model_type: str = "t2v", in_dim: int = 16, out_dim: int = 16) -> "WanDims":
        """Two heads, two blocks; the text width stays 4096 (ComfyUI builds every Wan with it)."""
        return cls(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=in_dim, out_dim=out_dim,
                   model_type=model_type)


def variant_name(d: WanDims) -> str:
    """What users call the model these dims are."""
    size = {1536: "1.3B", 3072: "5B", 5120: "14B"}.get(d.dim, f"dim {d.dim}")
    if d.per_token_modulation:
        return f"Wan 2.2 TI2V {size}"
    if d.model_type == "i2v":
        return f"Wan 2.1 {'FLF2V' if d.flf_tokens else 'I2V'} {size}"
    if d.in_dim == 36:
        return f"Wan 2.2 I2V A{size} expert"
    return f"Wan T2V {size}" + (" (2.1, or a 2.2 A14B expert)" if d.dim == 5120 else "")


def dims_from_state_dict(shapes: Shapes) -> WanDims:
    """``WanDims`` of a prefix-free state dict ``{key: shape}``, as ComfyUI would build the model; a
    ValueError says what does not fit (another Wan variant, odd shapes)."""
    keys = list(shapes)
    if TRIGGER_KEY not in shapes:
        raise ValueError(f"not a Wan checkpoint: the key {TRIGGER_KEY!r} that ComfyUI detects Wan by is missing "
                         f"(found {len(keys)} tensors, e.g. {sorted(keys)[:5]})")
    for key, what in OTHER_VARIANTS.items():
        if key in shapes:
            raise ValueError(f"this is {what} (it has {key}), which QuantSparse does not support yet; supported: "
                             "Wan 2.1 T2V / I2V, Wan 2.2 T2V / I2V A14B experts, Wan 2.2 TI2V-5B")
    dim = shape_of(shapes, TRIGGER_KEY, 3, "Wan")[-1]
    out_dim = shape_of(shapes, "head.head.weight", 2, "Wan")[0] // 4
    ffn = shape_of(shapes, "blocks.0.ffn.0.weight", 2, "Wan")[0]
    in_dim = shape_of(shapes, "patch_embedding.weight", 5, "Wan")[1]
    text_dim = shape_of(shapes, "text_embedding.0.weight", 2, "Wan")[1]
    if dim % HEAD_DIM:
        raise ValueError(f"head.modulation gives dim {dim}, not a multiple of the head size {HEAD_DIM}")
    if text_dim != TEXT_DIM:
        raise ValueError(f"text_embedding.0.weight takes {text_dim} inputs; ComfyUI builds every Wan with {TEXT_DIM} "
                         "(umT5-XXL), so it could not load this file")
    i2v = "img_emb.proj.0.bias" in shapes
    flf = shapes.get("img_emb.emb_pos")
    return WanDims(dim=dim, ffn_dim=ffn, num_heads=dim // HEAD_DIM, num_layers=count_blocks(keys, "blocks."),
                   in_dim=in_dim, out_dim=out_dim, text_dim=text_dim, model_type="i2v" if i2v else "t2v",
                   flf_tokens=int(tuple(flf)[1]) if flf is not None else None)


def reference_state_shapes(d: WanDims) -> dict[str, tuple[int, ...]]:
    """Every tensor of ComfyUI's ``WanModel`` of ``d``, in its ``state_dict`` order, with its shape."""
    D, F = d.dim, d.ffn_dim
    s: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (D, d.in_dim, *PATCH), "patch_embedding.bias": (D,),
        "text_embedding.0.weight": (D, d.text_dim), "text_embedding.0.bias": (D,),
        "text_embedding.2.weight": (D, D), "text_embedding.2.bias": (D,),
        "time_embedding.0.weight": (D, FREQ_DIM), "time_embedding.0.bias": (D,),
        "time_embedding.2.weight": (D, D), "time_embedding.2.bias": (D,),
        "time_projection.1.weight": (6 * D, D), "time_projection.1.bias": (6 * D,),
    }
    for i in range(d.num_layers):
        p = f"blocks.{i}."
        s[p + "modulation"] = (1, 6, D)  # a module's own parameters come before its submodules'
        for attn in ("self_attn", "norm3", "cross_attn"):
            if attn == "norm3":
                s[p + "norm3.weight"], s[p + "norm3.bias"] = (D,), (D,)
                continue
            for lin in ("q", "k", "v", "o"):
                s[f"{p}{attn}.{lin}.weight"], s[f"{p}{attn}.{lin}.bias"] = (D, D), (D,)
            s[f"{p}{attn}.norm_q.weight"], s[f"{p}{attn}.norm_k.weight"] = (D,), (D,)
            if attn == "cross_attn" and d.model_type == "i2v":
                for lin in ("k_img", "v_img"):
                    s[f"{p}cross_attn.{lin}.weight"], s[f"{p}cross_attn.{lin}.bias"] = (D, D), (D,)
                s[f"{p}cross_attn.norm_k_img.weight"] = (D,)
        s[p + "ffn.0.weight"], s[p + "ffn.0.bias"] = (F, D), (F,)
        s[p + "ffn.2.weight"], s[p + "ffn.2.bias"] = (D, F), (D,)
    s["head.modulation"] = (1, 2, D)
    s["head.head.weight"], s["head.head.bias"] = (d.out_dim * 4, D), (d.out_dim * 4,)
    if d.model_type == "i2v":
        if d.flf_tokens:
            s["img_emb.emb_pos"] = (1, d.flf_tokens, CLIP_DIM)
        s.update({"img_emb.proj.0.weight": (CLIP_DIM,), "img_emb.proj.0.bias": (CLIP_DIM,),
                  "img_emb.proj.1.weight": (CLIP_DIM, CLIP_DIM), "img_emb.proj.1.bias": (CLIP_DIM,),
                  "img_emb.proj.3.weight": (D, CLIP_DIM), "img_emb.proj.3.bias": (D,),
                  "img_emb.proj.4.weight": (D,), "img_emb.proj.4.bias": (D,)})
    return s
