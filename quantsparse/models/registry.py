"""The model families QuantSparse supports, found from a state dict's key shapes as ComfyUI finds them.

``detect`` returns the adapter of the family a file holds, or refuses with what was found and the
families supported; ``by_name`` gives the adapter a checkpoint's ``architecture`` names; ``describe``
says what a file that is no supported model probably is (a LoRA, a VAE, a text encoder, a family not
supported yet), so that a refusal carries its fix.
"""

from __future__ import annotations

import functools
from typing import Sequence

from ..core.errors import QuantSparseError, public
from .base import ModelAdapter, Shapes
from .hunyuan_video.dims import V15_MARKERS

PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # ComfyUI strips these when it loads a file


@public
class UnknownModelError(QuantSparseError):
    """A file of no supported family, or a checkpoint naming an architecture this version does not know."""


@functools.lru_cache(maxsize=1)
def adapters() -> tuple[ModelAdapter, ...]:
    """One adapter per family (stateless, built once: ``by_name`` runs on every sampling step of the proxy)."""
    from .hunyuan_video.adapter import HunyuanVideoAdapter
    from .wan.adapter import WanAdapter

    return (HunyuanVideoAdapter(), WanAdapter())


def supported_text() -> str:
    return "; ".join(f"{a.title} ({a.source_files})" for a in adapters())


def split_prefix(shapes: Shapes) -> tuple[str, dict[str, Sequence[int]]]:
    """(prefix, the diffusion model's tensors without it): an all-in-one file keeps only those."""
    for p in PREFIXES:
        if any(k.startswith(p) for k in shapes):
            return p, {k[len(p):]: v for k, v in shapes.items() if k.startswith(p)}
    return "", dict(shapes)


def by_name(name: str) -> ModelAdapter:
    for a in adapters():
        if a.name == name:
            return a
    known = [a.name for a in adapters()]
    raise UnknownModelError(f"architecture {name!r} is not one this version of QuantSparse supports ({known}); "
                            "update comfyui-quantsparse, or use a checkpoint of a supported model")


def adapter_for(dims) -> ModelAdapter:
    """The adapter of a family's dimensions object (each dims class names its ``architecture``)."""
    return by_name(type(dims).architecture)


def detect(shapes: Shapes) -> ModelAdapter:
    """The adapter whose family these (prefix-free) shapes are; UnknownModelError says what they are instead."""
    for a in adapters():
        if a.claims(shapes):
            return a
    raise UnknownModelError(f"not a model QuantSparse supports: it looks like {describe(shapes)}. Supported: "
                            f"{supported_text()}.")


def identify(shapes: Shapes) -> tuple[ModelAdapter, object]:
    """(adapter, dims) of these (prefix-free) shapes. A family's key that its adapter cannot build dims from
    (another variant ComfyUI builds with its own class, such as Wan VACE, or odd shapes) is a ValueError that
    says which: such a model must not pass for the family (its extra blocks would share the family's
    attention-call keys)."""
    adapter = detect(shapes)
    return adapter, adapter.dims_from_shapes(shapes)


def describe(shapes: Shapes) -> str:
    """A short noun phrase for what a file holds: 'a Wan 2.1 T2V 1.3B model', 'a LoRA', 'a VAE', ..."""
    _, stripped = split_prefix(shapes)
    keys = list(stripped)
    has = lambda *subs: any(any(s in k for s in subs) for k in keys)  # noqa: E731
    starts = lambda *pre: any(k.startswith(pre) for k in keys)  # noqa: E731
    if not keys:
        return "an empty file (no tensors)"
    if has("lora_up", "lora_down", "lora_A.", "lora_B.", ".lokr_", ".hada_"):
        return "a LoRA (apply it to the model in ComfyUI; it is not a model itself)"
    for a in adapters():
        if a.claims(stripped):
            try:
                return f"a {a.variant(a.dims_from_shapes(stripped))} model"
            except ValueError:
                return f"a {a.title} model with unexpected shapes"
    if starts("double_blocks.") and starts(*V15_MARKERS):
        return "a HunyuanVideo 1.5 model (not supported yet)"
    if starts("double_blocks.") and not has("txt_in.individual_token_refiner."):
        return "a Flux-style image model (not supported)"
    if starts("blocks.0.self_attn.") or starts("blocks.0.cross_attn."):
        return "a Wan-style model that is not a supported Wan variant"
    if starts("encoder.", "decoder.") and has("conv", "quant_conv", "down_blocks", "up_blocks", "mid"):
        return "a VAE (it belongs in ComfyUI's models/vae folder)"
    if starts("text_model.", "model.layers.", "encoder.block.", "shared.", "transformer.", "language_model."):
        return "a text encoder (it belongs in ComfyUI's models/text_encoders folder)"
    sample = ", ".join(sorted(keys)[:3])
    return f"an unrecognised model ({len(keys)} tensors, e.g. {sample})"
