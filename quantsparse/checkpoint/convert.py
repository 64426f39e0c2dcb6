"""A model file (any supported family, in the forms users download) -> QuantSparse checkpoint, one tensor at a time.

Sources: BF16 / FP16 / FP32, fp8_e4m3fn, legacy fp8_scaled, and ComfyUI comfy_quant int8_tensorwise (ConvRot
rotated or not) / float8, with or without the ``model.diffusion_model.`` prefix; ``sources.py`` tells the
forms apart from the header and reads each tensor back at full precision (scaled forms dequantized exactly,
as float32). 4-bit sources (NVFP4, W4A8, ConvRot W4A4, GGUF, ...) are refused: quantizing an already 4-bit
model compounds the two errors; the message says to convert the BF16/FP16 file instead.

The released model is 25.6 GB and many users have 24 GB of RAM, so the converter never holds
the model: it plans the output from the source header alone (every output shape and dtype is
known without data), writes the header, then loads one source tensor (with its scale, if it has one),
dequantizes it if it is stored quantized, quantizes or casts it, writes it at its offset and drops it.
Peak memory is about one tensor: the stored tensor, its float32 value when it was dequantized, and float64
temporaries of a few rows during (de)quantization. Tensors are read
with ``pread`` (:class:`TensorFile`), not ``safetensors.safe_open``: that maps the whole file
privately, which Linux refuses for a file larger than RAM + swap (the 25.6 GB model on a
24 GB machine), and a map keeps every page it touched resident.

Round-to-nearest here; the calibration node passes its learned smoothing and clipping through
the same function.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ..core.config import QuantSparseConfig
from ..core.errors import QuantSparseError, public
from ..core.paths import PathError, clean_stale_partials, input_file, output_file
from ..core.quantizer import QuantizedWeight, quantize_weight
from ..core.safetensors_io import SafetensorsError, SafetensorsHeader, SafetensorsWriter, read_header
from ..models import registry
from .sources import CHUNK_ELEMENTS, SourceFormError, SourceLayout, SourceReader, read_layout, refuse_other_formats
from .format import (
    FLOAT_DTYPE,
    METADATA_KEY,
    CheckpointMeta,
    LayerSpec,
    checkpoint_plan,
    checkpoint_replaceable,
    quantized_layers,
)

_LIST_FIRST = 5


@public
class ConvertError(QuantSparseError):
    """A source that cannot be converted, or a destination that cannot be written; says what to do."""


@dataclass(frozen=True)
class Progress:
    tensors_done: int
    tensors_total: int
    bytes_done: int  # source bytes processed
    bytes_total: int
    name: str  # the source tensor just finished (ComfyUI name)


@dataclass(frozen=True)
class SourcePlan:
    """What the source header says, checked: its key naming, dimensions, tensors and the form they are stored in."""

    path: str
    header: SafetensorsHeader
    prefix: str  # "" or the prefix ComfyUI strips (registry.PREFIXES)
    dims: Any  # the family's dims
    ignored: int  # tensors outside the diffusion model (VAE, text encoders of an all-in-one file)
    layout: SourceLayout  # each model tensor's stored form (bf16, fp8_scaled, int8_tensorwise, ...)

    @property
    def names(self) -> list[str]:
        """The model tensors (ComfyUI names, auxiliary scales and markers left out), in file order."""
        return list(self.layout.tensors)

    @property
    def form(self) -> str:
        """The source form: "bf16", "fp16", "fp8_e4m3fn", "fp8_scaled", "int8_tensorwise (ConvRot)", ..."""
        return self.layout.form

    def open(self) -> SourceReader:
        """A reader of the model tensors at full precision, one at a time (``with plan.open() as r: r.get(name)``)."""
        return SourceReader(self.layout)

    def load_model(self, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
        """The family's torch model holding these weights in ``dtype`` (scaled forms dequantized), on the host."""
        model = registry.adapter_for(self.dims).build_model(self.dims, dtype=dtype, device="meta")
        with self.open() as reader:
            state = {name: reader.get(name).to(dtype) for name in self.names}
        model.load_state_dict(state, assign=True)
        return model


@dataclass(frozen=True)
class ConvertResult:
    src: str
    dst: str
    src_bytes: int
    dst_bytes: int
    tensors: int
    seconds: float
    dims: Any
    config: QuantSparseConfig
    source_form: str = ""  # the form the source was stored in: "bf16", "fp8_scaled", "int8_tensorwise", ...
    source_summary: str = ""  # that form with its tensor counts and how each was read (the command prints it)

    @property
    def ratio(self) -> float:
        return self.src_bytes / self.dst_bytes


def _names(names) -> str:
    names = sorted(names)
    more = f" (and {len(names) - _LIST_FIRST} more)" if len(names) > _LIST_FIRST else ""
    return ", ".join(names[:_LIST_FIRST]) + more


def inspect_source(src: str | os.PathLike) -> SourcePlan:
    """Check that ``src`` is a model of a supported family in a form the converter reads, from its header alone
    (and the few bytes of its comfy_quant declarations).

    Read: BF16 / FP16 / FP32, fp8_e4m3fn, legacy fp8_scaled, comfy_quant int8_tensorwise (ConvRot or not) and
    float8 (``sources.py``); the adapter's reference shapes are checked on the model tensors as dequantized (the
    scales, declarations and markers are not model tensors). Refused, saying which file to convert instead: a
    QuantSparse checkpoint, 4-bit sources (NVFP4, W4A8, ConvRot W4A4, GGUF, ...), MXFP8, unknown formats and
    files whose scales do not fit their weights.
    """
    try:
        p = str(input_file(src, "the source model"))
        refuse_other_formats(p)
        header = read_header(p)
    except (SafetensorsError, PathError, SourceFormError) as e:
        raise ConvertError(str(e)) from None
    except OSError as e:
        raise ConvertError(f"{src}: cannot be read ({e.strerror or e}); check the file.") from None
    if METADATA_KEY in (header.metadata or {}):
        raise ConvertError(f"{p} is already a QuantSparse checkpoint; convert the original BF16 (or FP16) model file "
                           f"instead ({registry.supported_text()}).")
    try:
        layout = read_layout(header)
    except (SourceFormError, SafetensorsError) as e:
        raise ConvertError(str(e)) from None
    shapes = layout.shapes
    try:
        adapter, dims = registry.identify(shapes)
    except ValueError as e:
        raise ConvertError(f"{p} is not a model that can be converted: {e}") from None
    ref = adapter.reference_shapes(dims)
    problems = []
    if set(ref) - set(shapes):
        problems.append(f"missing tensors: {_names(set(ref) - set(shapes))}")
    if set(shapes) - set(ref):
        problems.append(f"unexpected tensors: {_names(set(shapes) - set(ref))}")
    bad = [k for k in ref if k in shapes and tuple(shapes[k]) != tuple(ref[k])]
    if bad:
        problems.append("wrong shapes: " + "; ".join(f"{k} expected {list(ref[k])} found {list(shapes[k])}"
                                                      for k in bad[:_LIST_FIRST]))
    if problems:
        raise ConvertError(f"{p} does not match the {adapter.variant(dims)} model its shapes describe: "
                           + "; ".join(problems) + f". Use an unmodified {adapter.title} file in ComfyUI naming.")
    return SourcePlan(p, header, layout.prefix, dims, layout.ignored, layout)


def convert_file(src: str | os.PathLike, dst: str | os.PathLike,
                 config: QuantSparseConfig | None = None, *, overwrite: bool = False,
                 progress: Callable[[Progress], None] | None = None,
                 calibration: dict[str, Any] | None = None,
                 smooth: Mapping[str, torch.Tensor] | None = None,
                 clip: Mapping[str, torch.Tensor] | None = None,
                 log: Callable[[str], None] | None = None) -> ConvertResult:
    """Convert a model file (a supported family, in any form :func:`inspect_source` reads: BF16/FP16/FP32, fp8,
    fp8_scaled, comfy_quant int8/float8) into a QuantSparse checkpoint at ``dst``.

    A quantized source is dequantized one tensor at a time, exactly, so the result equals converting the
    dequantized model; ``log`` is told the source form, and the result carries it (``source_form``).
    ``smooth`` and ``clip`` (by layer prefix) carry calibrated values; absent layers get
    round-to-nearest. ``dst`` appears complete or not at all; it is never the source, and with
    ``overwrite`` it replaces only a QuantSparse checkpoint. A partial file an interrupted conversion
    left beside ``dst`` is removed first (and ``log`` told).
    """
    config = config or QuantSparseConfig()
    start = time.perf_counter()
    source = inspect_source(src)
    try:
        dst_path = output_file(dst, "the output checkpoint", inputs=[source.path], overwrite=overwrite,
                               replaceable=checkpoint_replaceable)
        clean_stale_partials(dst_path, log)
    except PathError as e:
        raise ConvertError(str(e)) from None

    meta = CheckpointMeta(source.dims, config, calibration)
    layers = quantized_layers(source.dims, config)
    plan = checkpoint_plan(source.dims, config)
    if log is not None:
        log(f"source: {source.layout.summary()}")
    # Read in file order: sequential reads, and the page cache does the rest. A tensor's bytes include its scales.
    order = source.names
    total_bytes = sum(source.layout.tensors[n].nbytes for n in order)
    done_bytes = 0
    try:
        with source.open() as reader, \
                SafetensorsWriter(dst_path, plan, {METADATA_KEY: meta.to_json()}, overwrite=overwrite) as writer:
            for i, name in enumerate(order):
                t = reader.get(name)
                for out_name, out in _convert_tensor(name, t, layers, smooth, clip):
                    writer.write(out_name, out)
                del t
                done_bytes += source.layout.tensors[name].nbytes
                if progress is not None:
                    progress(Progress(i + 1, len(order), done_bytes, total_bytes, name))
    except (SafetensorsError, SourceFormError) as e:
        raise ConvertError(str(e)) from None
    return ConvertResult(source.path, str(dst_path), os.path.getsize(source.path), os.path.getsize(dst_path),
                         len(plan), time.perf_counter() - start, source.dims, config, source.form,
                         source.layout.summary())


def _convert_tensor(name: str, t: torch.Tensor, layers: Mapping[str, LayerSpec],
                    smooth: Mapping[str, torch.Tensor] | None, clip: Mapping[str, torch.Tensor] | None):
    prefix = name[: -len(".weight")] if name.endswith(".weight") else None
    layer = layers.get(prefix) if prefix is not None else None
    if layer is None:
        yield name, t.to(FLOAT_DTYPE)
        return
    qw = quantize_rows(t, layer, smooth=(smooth or {}).get(prefix), clip=(clip or {}).get(prefix))
    yield f"{prefix}.weight", qw.weight
    yield f"{prefix}.weight_scale", qw.scale
    if qw.smooth is not None:
        yield f"{prefix}.smooth", qw.smooth


def quantize_rows(w: torch.Tensor, layer: LayerSpec, *, smooth: torch.Tensor | None = None,
                  clip: torch.Tensor | None = None, chunk_elements: int = CHUNK_ELEMENTS) -> QuantizedWeight:
    """``quantize_weight`` a few rows at a time: the same result (rows are quantized independently),
    ~5x faster on a CPU (the float64 temporaries stay in cache) and a fraction of the memory."""
    n, k = w.shape
    rows = max(1, chunk_elements // k)
    if rows >= n:
        return quantize_weight(w, layer.kind, group_size=layer.group_size, rotate=layer.rotate, smooth=smooth,
                               clip=clip)
    clip_rows = None if clip is None else clip.reshape(n, -1)
    weight = scale = out_smooth = None
    for i in range(0, n, rows):
        part = quantize_weight(w[i:i + rows], layer.kind, group_size=layer.group_size, rotate=layer.rotate,
                               smooth=smooth, clip=None if clip_rows is None else clip_rows[i:i + rows])
        if weight is None:
            weight = torch.empty((n, *part.weight.shape[1:]), dtype=part.weight.dtype)
            scale = torch.empty((n, *part.scale.shape[1:]), dtype=part.scale.dtype)
            out_smooth = part.smooth
        weight[i:i + rows] = part.weight
        scale[i:i + rows] = part.scale
    return QuantizedWeight(layer.kind, weight, scale, out_smooth, layer.group_size, layer.rotate)
