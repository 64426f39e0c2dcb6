"""Build a ComfyUI MODEL from a QuantSparse checkpoint, the way ComfyUI-GGUF does.

``comfy.sd.load_diffusion_model_state_dict`` detects the architecture from the BF16 tensors
the checkpoint keeps (``img_in``, ``final_layer``, ``txt_in.input_embedder``, ``vector_in``,
block counts; never a quantized Linear's shape) and builds ComfyUI's own HunyuanVideo with our
operations class. ``disable_dynamic=True`` keeps the classic ModelPatcher: the dynamic-VRAM one
(NVIDIA, torch >= 2.8) loads with ``assign`` into a virtual VRAM arena and casts through
``cast_bias_weight``'s vbar path, which knows nothing of packed weights. The blocks run the fused
forward of ``fused_blocks`` (``QUANTSPARSE_FUSED=0`` in the environment keeps ComfyUI's own).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import comfy.sd

from ..quantsparse.checkpoint.format import load_checkpoint
from .fused_blocks import install_fused_blocks
from .ops import QuantSparseLinear, quantized_modules, quantsparse_ops
from .patcher import QuantSparseModelPatcher


@dataclass(frozen=True)
class LoadSummary:
    bits: str
    quantized_layers: int
    kinds: dict[str, int]
    file_bytes: int
    model_bytes: int
    bf16_bytes: int

    def text(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.kinds.items()))
        ratio = self.bf16_bytes / self.model_bytes if self.model_bytes else 0.0
        return (f"QuantSparse {self.bits}: {self.quantized_layers} quantized Linears ({kinds}); "
                f"{self.model_bytes / 2**20:.1f} MiB in memory ({ratio:.2f}x smaller than BF16), "
                f"file {self.file_bytes / 2**20:.1f} MiB")


def load_quantsparse_model(path: str) -> tuple[QuantSparseModelPatcher, LoadSummary]:
    """Validate, load and build; every failure is an exception whose text names the problem.

    ``load_checkpoint`` runs ``validate_checkpoint`` (header only) before reading any tensor, so a
    wrong or damaged file fails in milliseconds, before ComfyUI allocates a model.
    """
    sd, info = load_checkpoint(path, device="cpu")
    layers = dict(info.layers)
    ops = quantsparse_ops(layers)
    base = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"custom_operations": ops},
                                                    disable_dynamic=True)
    if base is None:
        raise ValueError(f"{path}: ComfyUI did not recognise the model in this checkpoint (its BF16 embedders and "
                         "final layer decide the architecture); the file is not a HunyuanVideo QuantSparse checkpoint")
    patcher = QuantSparseModelPatcher.from_patcher(base)
    patcher.cached_patcher_init = (_reload, (path,))
    _check_complete(path, patcher, layers)
    if os.environ.get("QUANTSPARSE_FUSED", "1") != "0":  # 0: ComfyUI's own block forward (debugging)
        install_fused_blocks(patcher)
    return patcher, summarize(path, patcher, info.quant.bits)


def _reload(path: str, disable_dynamic: bool = True) -> QuantSparseModelPatcher:
    # ComfyUI rebuilds a model from this when it needs an independent copy (clone(force_deepcopy=True)).
    return load_quantsparse_model(path)[0]


def _check_complete(path: str, patcher, layers: dict) -> None:
    """ComfyUI only logs missing keys; a layer left unloaded would fail (or be garbage) mid-sampling."""
    loaded = {n.removeprefix("diffusion_model.") for n in quantized_modules(patcher.model)}
    missing = sorted(set(layers) - loaded)
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} layer(s) listed as quantized in the checkpoint's metadata were not loaded "
            f"(e.g. {missing[:3]}): their tensors are missing or the names do not match ComfyUI's HunyuanVideo; "
            "convert the model again")
    empty = sorted(n for n, m in patcher.model.named_modules()
                   if isinstance(m, QuantSparseLinear) and m.quant_kind is None and m.weight.numel() == 0)
    if empty:
        raise ValueError(f"{path}: the checkpoint has no weights for {len(empty)} Linear layer(s) "
                         f"(e.g. {[e.removeprefix('diffusion_model.') for e in empty[:3]]}); the file is incomplete")


def summarize(path: str, patcher, bits: str) -> LoadSummary:
    kinds: dict[str, int] = {}
    bf16 = 0
    quantized = quantized_modules(patcher.model)
    for m in quantized.values():
        kinds[m.quant_kind] = kinds.get(m.quant_kind, 0) + 1
        bf16 += 2 * m.in_features * m.out_features + (2 * m.out_features if m.bias is not None else 0)
    skip = {f"{n}.{p}" for n in quantized for p in ("weight", "weight_scale", "smooth", "bias")}
    for name, t in patcher.model.state_dict().items():
        if name not in skip:
            bf16 += 2 * t.numel()
    return LoadSummary(bits=bits, quantized_layers=len(quantized), kinds=kinds, file_bytes=os.path.getsize(path),
                       model_bytes=patcher.model_size(), bf16_bytes=bf16)
