"""Build a ComfyUI MODEL from a QuantSparse checkpoint, the way ComfyUI-GGUF does.

``comfy.sd.load_diffusion_model_state_dict`` detects the architecture from the BF16 tensors
the checkpoint keeps (HunyuanVideo: ``img_in``, ``final_layer``, ``txt_in.input_embedder``,
``vector_in``, block counts; Wan: ``head.modulation``, ``patch_embedding``, ``blocks.0.ffn.0``,
``img_emb``; never a quantized Linear's packed shape) and builds ComfyUI's own model class with our
operations class. ``disable_dynamic=True`` keeps the classic ModelPatcher: the dynamic-VRAM one
(NVIDIA, torch >= 2.8) loads with ``assign`` into a virtual VRAM arena and casts through
``cast_bias_weight``'s vbar path, which knows nothing of packed weights. The blocks run a fused
forward (``fused_blocks`` for HunyuanVideo, ``fused_wan`` for Wan; ``QUANTSPARSE_FUSED=0`` in the
environment keeps ComfyUI's own).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import comfy.sd
import torch

from ..quantsparse.checkpoint.format import load_checkpoint
from .fused_blocks import install_fused_blocks
from .fused_wan import install_fused_wan
from .ops import QuantSparseLinear, kernel_route, quantized_modules, quantsparse_ops
from .patcher import QuantSparseModelPatcher

log = logging.getLogger("quantsparse")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class LoadSummary:
    """What the loader built, for the node's text.

    ComfyUI holds the tensors that stay unquantized (embedders, norms, modulation, head; for Wan the
    4096-wide text embedding and, for I2V, the CLIP projection) in the dtype it picks per device: BF16 on
    a GPU for these models, float32 on the CPU. A whole-model ratio against a BF16 count of them read
    0.77x "smaller" (larger) for the tiny Wan I2V model on the CPU, where those tensors are most of its
    bytes and are float32. So the quantized Linears are compared with the same Linears in BF16 (what
    quantization saves), and the whole model with the same model unquantized in ComfyUI's dtype.
    """

    bits: str
    quantized_layers: int
    kinds: dict[str, int]
    file_bytes: int
    model_bytes: int  # every tensor as held in memory (ComfyUI's model_size)
    quantized_bytes: int  # the quantized Linears' tensors (codes, scales, smoothing, bias)
    quantized_bf16_bytes: int  # the same Linears' weights and biases in BF16
    dense_bytes: int  # the model unquantized: those Linears at the dtype ComfyUI holds the rest in, plus the rest
    dtype: str = "bfloat16"  # ComfyUI's dtype for the tensors that stay unquantized
    device: str = "cpu"  # where ComfyUI will run the model
    kernels: str = ""  # what the quantized Linears run there
    fused: str = ""  # the fused block forward: how many blocks, or why none
    info: Any = None  # the CheckpointInfo the load validated (provenance, settings): no second header read

    def text(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.kinds.items()))
        q_ratio = self.quantized_bf16_bytes / self.quantized_bytes if self.quantized_bytes else 0.0
        ratio = self.dense_bytes / self.model_bytes if self.model_bytes else 0.0
        rest = self.model_bytes - self.quantized_bytes
        lines = [
            f"QuantSparse {self.bits}: {self.quantized_layers} quantized Linears ({kinds}), {_mib(self.quantized_bytes)} "
            f"in memory against {_mib(self.quantized_bf16_bytes)} in BF16 ({q_ratio:.2f}x smaller); model "
            f"{_mib(self.model_bytes)} in memory ({ratio:.2f}x smaller than unquantized; the other tensors, "
            f"{_mib(rest)}, stay {self.dtype} as ComfyUI holds them on {self.device}), file {_mib(self.file_bytes)}",
        ]
        if self.kernels:
            lines.append(f"kernels on {self.device}: {self.kernels}")
        if self.fused:
            lines.append(f"block forward: {self.fused}")
        return "\n".join(lines)


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
        raise ValueError(f"{path}: ComfyUI did not recognise the model in this checkpoint (its BF16 embedders, "
                         f"head and block layout decide the architecture; the checkpoint's metadata says "
                         f"{type(info.dims).__name__}); this ComfyUI may not know the model, or the file is damaged")
    patcher = QuantSparseModelPatcher.from_patcher(base)
    patcher.cached_patcher_init = (_reload, (path,))
    _check_complete(path, patcher, layers)
    fused = install_fused(patcher)
    return patcher, summarize(path, patcher, info, fused)


def install_fused(patcher) -> str:
    """Registers the fused block forward of the model's family; returns what the summary says about it."""
    dm = getattr(patcher.model, "diffusion_model", None)
    total = len(getattr(dm, "double_blocks", None) or []) + len(getattr(dm, "single_blocks", None) or []) + len(
        getattr(dm, "blocks", None) or [])
    if os.environ.get("QUANTSPARSE_FUSED", "1") == "0":  # ComfyUI's own block forward (debugging)
        log.info("QuantSparse: QUANTSPARSE_FUSED=0, the blocks run ComfyUI's own forward")
        return "ComfyUI's own (QUANTSPARSE_FUSED=0)"
    covered = install_fused_blocks(patcher)
    wan, why = install_fused_wan(patcher)
    covered += wan
    text = f"fused in {covered} of {total} blocks"
    if covered < total:
        text += f", ComfyUI's own in the others{': ' + why if why else ''}"
        log.warning("QuantSparse: %s", text)
    return text


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
            f"(e.g. {missing[:3]}): their tensors are missing or the names do not match ComfyUI's "
            f"{type(getattr(patcher.model, 'diffusion_model', None)).__name__}; convert the model again")
    empty = sorted(n for n, m in patcher.model.named_modules()
                   if isinstance(m, QuantSparseLinear) and m.quant_kind is None and m.weight.numel() == 0)
    if empty:
        raise ValueError(f"{path}: the checkpoint has no weights for {len(empty)} Linear layer(s) "
                         f"(e.g. {[e.removeprefix('diffusion_model.') for e in empty[:3]]}); the file is incomplete")


def summarize(path: str, patcher, info, fused: str = "") -> LoadSummary:
    kinds: dict[str, int] = {}
    q_bytes = q_bf16 = q_params = 0
    quantized = quantized_modules(patcher.model)
    for m in quantized.values():
        kinds[m.quant_kind] = kinds.get(m.quant_kind, 0) + 1
        params = m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
        q_params += params
        q_bf16 += 2 * params
        q_bytes += sum(t.nbytes for t in (m.weight, m.weight_scale, m.smooth, m.bias) if t is not None)
    dtype = patcher.model_dtype() or torch.bfloat16
    total = patcher.model_size()
    device = patcher.load_device
    by_route: dict[tuple[bool, str], list[str]] = {}
    for k in sorted(kinds):
        by_route.setdefault(kernel_route(k, device), []).append(k)
    kern = "; ".join(f"{', '.join(ks)}: {what}" for (_, what), ks in by_route.items())
    if device.type != "cpu" and not all(fast for fast, _ in by_route):
        log.warning("QuantSparse: the quantized Linears on %s will not all run the fast kernels (%s)", device, kern)
    return LoadSummary(bits=info.quant.bits, quantized_layers=len(quantized), kinds=kinds, file_bytes=os.path.getsize(path),
                       model_bytes=total, quantized_bytes=q_bytes, quantized_bf16_bytes=q_bf16,
                       dense_bytes=total - q_bytes + q_params * torch.empty(0, dtype=dtype).element_size(),
                       dtype=str(dtype).removeprefix("torch."), device=str(device), kernels=kern, fused=fused,
                       info=info)
