"""A ModelPatcher that refuses weight patches (LoRA, merges) on quantized layers.

ComfyUI applies a LoRA by adding the low-rank delta to ``layer.weight`` (at load, or per call
in low-VRAM mode). On a quantized layer that weight is packed integer codes in a rotated,
smoothed basis: the sum would be silently wrong (or a shape error deep inside sampling).
So the patch is refused where it is added, with a message that says what to do instead.
ComfyUI's bypass LoRA (``load_bypass_lora_for_models``) is not refused: it wraps the layer's
forward and adds ``up(down(x))`` to whatever the layer returns, which is exact on our layers.
``ModelPatcher.clone`` builds ``self.__class__``, so every clone (LoRA loaders clone first)
keeps these refusals.
"""

from __future__ import annotations

from typing import Iterable

import comfy.model_patcher

from .ops import LORA_UNSUPPORTED, quantized_modules


def _patch_key(k) -> str:
    # add_patches accepts "key" or (key, offset[, function]).
    return k if isinstance(k, str) else k[0]


class QuantSparseModelPatcher(comfy.model_patcher.ModelPatcher):
    """ModelPatcher for a model whose Linears may be QuantSparse-quantized."""

    @classmethod
    def from_patcher(cls, patcher: comfy.model_patcher.ModelPatcher) -> "QuantSparseModelPatcher":
        """Re-wrap the freshly built model (nothing patched or loaded yet) in this class."""
        if patcher.is_dynamic():
            raise RuntimeError("QuantSparse models need a non-dynamic ModelPatcher (build with disable_dynamic=True)")
        return cls(patcher.model, load_device=patcher.load_device, offload_device=patcher.offload_device,
                   size=patcher.size, weight_inplace_update=patcher.weight_inplace_update)

    def quantized_targets(self, keys: Iterable) -> list[str]:
        """The patched keys that land on a quantized layer (any of its tensors)."""
        names = set(quantized_modules(self.model))
        return sorted({_patch_key(k) for k in keys if _patch_key(k).rsplit(".", 1)[0] in names})

    def _refuse_quantized(self, keys: Iterable, what: str) -> None:
        hits = self.quantized_targets(keys)
        if hits:
            layers = sorted({h.rsplit(".", 1)[0].removeprefix("diffusion_model.") for h in hits})
            shown = ", ".join(layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
            raise ValueError(f"{LORA_UNSUPPORTED}. The {what} targets {len(layers)} quantized layer(s): {shown}.")

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        self._refuse_quantized(patches.keys(), "LoRA/weight patch")
        return super().add_patches(patches, strength_patch, strength_model)

    def add_hook_patches(self, hook, patches, strength_patch=1.0, strength_model=1.0):
        self._refuse_quantized(patches.keys(), "LoRA hook")
        return super().add_hook_patches(hook, patches, strength_patch, strength_model)

    def add_weight_wrapper(self, name, function):
        self._refuse_quantized([name], "weight wrapper")
        return super().add_weight_wrapper(name, function)
