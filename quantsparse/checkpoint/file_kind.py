"""What a safetensors file probably is, from its tensor names and shapes alone.

Users hand the wrong file to a command more often than a broken one: a VAE, a LoRA, a text encoder, or
a model of a family the pack does not support yet. Saying which ("it looks like a Wan 2.x model")
turns a refusal into a fix; advice to `quantsparse convert` is only given for a file convert takes.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from ..models.hunyuan_video.dims import dims_from_state_dict

_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
SUPPORTED = "HunyuanVideo T2V (13B, ComfyUI's hunyuan_video_t2v_720p_bf16.safetensors)"


def _strip(shapes: Mapping[str, Sequence[int]]) -> dict[str, Sequence[int]]:
    """The diffusion model's tensors without ComfyUI's key prefix (an all-in-one file keeps only those)."""
    for p in _PREFIXES:
        if any(k.startswith(p) for k in shapes):
            return {k[len(p):]: v for k, v in shapes.items() if k.startswith(p)}
    return dict(shapes)


def describe(shapes: Mapping[str, Sequence[int]]) -> str:
    """A short noun phrase: 'a Wan 2.x model', 'a LoRA', 'a plain HunyuanVideo model', ..."""
    stripped = _strip(shapes)
    keys = list(stripped)
    has = lambda *subs: any(any(s in k for s in subs) for k in keys)  # noqa: E731
    starts = lambda *pre: any(k.startswith(pre) for k in keys)  # noqa: E731
    if not keys:
        return "an empty file (no tensors)"
    if has("lora_up", "lora_down", "lora_A.", "lora_B.", ".lokr_", ".hada_"):
        return "a LoRA (apply it to the model in ComfyUI; it is not a model itself)"
    if starts("blocks.0.self_attn.") or starts("blocks.0.cross_attn."):
        return "a Wan 2.x model (not supported yet)"
    if starts("double_blocks.") and has("vision_in.", "byt5_in.", "cond_type_embedding."):
        return "a HunyuanVideo 1.5 model (not supported yet)"
    if starts("double_blocks.") and not has("txt_in.individual_token_refiner."):
        return "a Flux-style image model (not supported)"
    if starts("encoder.", "decoder.") and has("conv", "quant_conv", "down_blocks", "up_blocks", "mid"):
        return "a VAE (it belongs in ComfyUI's models/vae folder)"
    if starts("text_model.", "model.layers.", "encoder.block.", "shared.", "transformer.", "language_model."):
        return "a text encoder (it belongs in ComfyUI's models/text_encoders folder)"
    try:
        dims_from_state_dict({k: tuple(v) for k, v in stripped.items()})
        return "a plain HunyuanVideo model"
    except ValueError:
        pass
    sample = ", ".join(sorted(keys)[:3])
    return f"an unrecognised model ({len(keys)} tensors, e.g. {sample})"
