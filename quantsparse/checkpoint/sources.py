"""The forms a diffusion model is downloaded in, told apart from the file header, and read back at full precision.

Users download Wan and HunyuanVideo diffusion models in several forms (``research/models.md`` 1.6 and 3;
ComfyUI reads them in ``comfy/utils.py convert_old_quants`` and ``comfy/ops.py``). This module decides, per
tensor, which form it is stored in, and :class:`SourceReader` returns any model tensor as the full-precision
value ComfyUI's model holds, one tensor at a time (``pread`` through :class:`TensorFile`, never the whole
file). Forms read:

- **bf16 / fp16 / fp32** (Comfy-Org repackaged): the stored tensor, unchanged.
- **fp8_e4m3fn / fp8_e5m2, unscaled**: an F8 tensor with no scale; its value is the fp8 number (returned as
  BF16, which holds every fp8 number exactly).
- **fp8_scaled, legacy**: a marker tensor ``scaled_fp8`` (empty, 1 or 2 elements; 2 asks ComfyUI for a
  full-precision matmul, which does not change the weights) and per layer ``<layer>.scale_weight`` (a scalar):
  weight = fp8 weight x scale_weight. ``<layer>.scale_input`` is ComfyUI's static activation scale for its fp8
  matmul; it says nothing about the weight, and QuantSparse chooses its own activation scales, so it is read
  past (consumed, ignored).
- **comfy_quant** (per layer ``<layer>.comfy_quant``, uint8 JSON bytes, and/or the header metadata
  ``_quantization_metadata`` = ``{"layers": {"<layer>": {...}}}``, which wins where both name a layer, as in
  ComfyUI): format ``int8_tensorwise`` (``weight`` int8, ``weight_scale`` float32 per row ``[out, 1]`` or a
  scalar: weight = int8 x scale) and ``float8_e4m3fn`` / ``float8_e5m2`` (the form ComfyUI turns the legacy
  one into: fp8 x ``weight_scale``; ``input_scale`` ignored as above). An int8 weight the JSON marks
  ``convrot`` was stored rotated, W_rot = W H per group of ``convrot_groupsize`` inputs, H the normalised
  regular Hadamard matrix ComfyUI's comfy-kitchen builds (Kronecker powers of a symmetric 4 x 4 one, so
  H = H^T = H^-1); it is rotated back exactly: the integer codes times the +-1 matrix are exact integers, the
  scale and 1/sqrt(group) (a power of two) multiply them exactly in float64, and one rounding gives float32.

Scaled forms are returned as float32: the exact product rounded once (rounding to BF16 instead would add an
error of 2^-9 before the 4-bit quantization). Memory stays at about one tensor: the stored tensor, its float32
value and float64 temporaries of a few rows.

Refused, with one message naming the form found, why, and what to download instead: 4-bit sources (NVFP4,
ConvRot W4A4, W4A8 / ``asym_w4a8_int8``, SVDQuant, AWQ and other 4-bit comfy_quant formats; quantizing an
already 4-bit model compounds the two errors), MXFP8 (block scales in the tensor-core tiled layout), GGUF
files, an unknown comfy_quant format, a ConvRot rotation that cannot be undone exactly, and a file whose
auxiliary tensors do not fit together (a scale without its weight, ...), naming the tensor.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..core.errors import QuantSparseError, public
from ..core.safetensors_io import SafetensorsHeader, TensorFile, dtype_name
from ..models import registry

# Stored forms
STORED = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
FP8 = {torch.float8_e4m3fn: "fp8_e4m3fn", torch.float8_e5m2: "fp8_e5m2"}
FP8_SCALED = "fp8_scaled"  # legacy: scaled_fp8 marker + scale_weight
COMFY_FP8 = "comfy_quant float8"  # comfy_quant float8_e4m3fn / float8_e5m2 + weight_scale
INT8 = "int8_tensorwise"
INT8_CONVROT = "int8_tensorwise (ConvRot)"
QUANTIZED_FORMS = (FP8_SCALED, COMFY_FP8, INT8, INT8_CONVROT) + tuple(FP8.values())

MARKER = "scaled_fp8"
METADATA_QUANT = "_quantization_metadata"
_COMFY_AUX = (".weight_scale", ".input_scale")
_DECLARATION = ".comfy_quant"
_COMFY_FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
CHUNK_ELEMENTS = 1 << 20  # elements per chunk of a (de)quantized weight: 8 MB of float64 temporaries

# comfy_quant formats refused, with what they are. 4-bit ones share one reason; MXFP8 has its own.
_FOUR_BIT = {
    "nvfp4": "NVFP4 (4-bit floating point, a scale per 16 weights)",
    "mxfp4": "MXFP4 (4-bit floating point, a scale per 32 weights)",
    "convrot_w4a4": "ConvRot W4A4 (4-bit integer weights)",
    "asym_w4a8_int8": "W4A8 (4-bit integer weights on a 16-level codebook, asym_w4a8_int8)",
    "w4a8_int8": "W4A8 (4-bit integer weights)",
    "svdquant_w4a4": "SVDQuant W4A4 (4-bit weights and a low-rank branch)",
    "awq_w4a16": "AWQ W4A16 (4-bit integer weights)",
}
_FOUR_BIT_NAME = re.compile(r"fp4|int4|nf4|w4a|w4_|q4|4bit", re.IGNORECASE)
_MXFP8 = ("MXFP8 (8-bit floats with a power-of-two scale per 32 weights, padded to 32 x 32 and stored in the "
          "tensor-core tiled scale layout of Blackwell GPUs)")
_READ_TEXT = "bf16, fp16, fp32, fp8_e4m3fn, fp8_scaled and comfy_quant int8_tensorwise / float8"


@public
class SourceFormError(QuantSparseError):
    """A source model stored in a form the converter does not read, or whose tensors do not fit together."""


@dataclass(frozen=True)
class SourceTensor:
    """One model tensor and how to read its full-precision value."""

    name: str  # ComfyUI name, without the prefix
    key: str  # the stored tensor holding its data
    form: str  # STORED / FP8 values, FP8_SCALED, COMFY_FP8, INT8, INT8_CONVROT
    dtype: torch.dtype  # stored dtype of ``key``
    shape: tuple[int, ...]
    nbytes: int  # source bytes read for it: its data and the auxiliary tensors it consumes
    scale: Optional[str] = None  # the scale tensor's key (scale_weight / weight_scale)
    fp8_dtype: Optional[torch.dtype] = None  # fp8 stored as uint8 (comfy_quant float8): view it as this
    convrot_group: int = 0  # > 0: rotated back in groups of this many inputs


@dataclass(frozen=True)
class SourceLayout:
    """What a source file holds, tensor by tensor, decided from its header (and the few bytes of its
    ``comfy_quant`` declarations)."""

    header: SafetensorsHeader
    prefix: str  # "" or the prefix ComfyUI strips (registry.PREFIXES)
    tensors: dict[str, SourceTensor]  # model tensors by ComfyUI name, in file order
    ignored: int  # tensors outside the diffusion model (VAE, text encoders of an all-in-one file)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: t.shape for n, t in self.tensors.items()}

    @property
    def counts(self) -> Counter:
        return Counter(t.form for t in self.tensors.values())

    @property
    def form(self) -> str:
        """The file's form in a word or two: its quantized forms, else its float dtypes ("fp8_scaled", "bf16")."""
        counts = self.counts
        quantized = [f for f, _ in counts.most_common() if f in QUANTIZED_FORMS]
        if quantized:
            return " + ".join(quantized)
        return " + ".join(f for f, _ in counts.most_common()) or "empty"

    def summary(self) -> str:
        """The form with its tensor counts and how each is read, for the command line."""
        how = {FP8_SCALED: "fp8 x scale_weight, dequantized exactly to float32",
               COMFY_FP8: "fp8 x weight_scale, dequantized exactly to float32",
               INT8: "int8 x weight_scale, dequantized exactly to float32",
               INT8_CONVROT: "int8 x weight_scale rotated back, dequantized exactly to float32"}
        counts = self.counts
        if len(counts) == 1 and self.form in STORED.values():
            return f"{self.form} ({sum(counts.values())} tensors, read as stored)"
        parts = []
        for f, n in sorted(counts.most_common(), key=lambda fn: fn[0] not in QUANTIZED_FORMS):  # quantized first
            if f in how:
                parts.append(f"{n} {f}: {how[f]}")
            elif f in FP8.values():
                parts.append(f"{n} {f}: unscaled fp8, read exactly")
            else:
                parts.append(f"{n} {f}")
        return f"{self.form} ({'; '.join(parts)})"


# ---------------------------------------------------------------------------------------------- refusals

def _download(adapter) -> str:
    model = f"the same {adapter.title} model's" if adapter is not None else "the same model's"
    return (f"Download {model} bf16 or fp16 file instead (ComfyUI's *_bf16.safetensors / *_fp16.safetensors, e.g. "
            "from Comfy-Org's repackaged repositories) and convert that.")


def _adapter_of(shapes) -> Any:
    """The family these keys are, for a refusal's download hint; None when they are none (or are damaged)."""
    try:
        return registry.detect(shapes)
    except ValueError:
        return None


def refuse_other_formats(path: str) -> None:
    """A GGUF file (city96's ComfyUI-GGUF quantizations) is refused for what it is, before it is read as
    safetensors (which would only say "not a safetensors file")."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        raise SourceFormError(
            f"{path} is a GGUF model (block-quantized weights as ComfyUI-GGUF loads them, Q2 to Q8, most of them 4 "
            "to 6 bits). QuantSparse does not convert GGUF models: their weights are already quantized, and "
            "quantizing them again to 4 bits compounds the two errors (this converter also reads safetensors only). "
            + _download(None))


# ---------------------------------------------------------------------------------------------- the layout

def _declarations(header: SafetensorsHeader, prefix: str, local: dict[str, str], path: str
                  ) -> dict[str, tuple[dict, str]]:
    """Every comfy_quant declaration, by layer (prefix-free): (the JSON object, where it was found)."""
    out: dict[str, tuple[dict, str]] = {}
    cq = [n for n in local if n.endswith(_DECLARATION)]
    if cq:
        with TensorFile(header) as f:
            for n in cq:
                key = local[n]
                e = header.tensors[key]
                if e.dtype not in (torch.uint8, torch.int8) or len(e.shape) != 1:
                    raise SourceFormError(
                        f"{path}: {key} is {dtype_name(e.dtype)} {list(e.shape)}, not the 1-D uint8 JSON a comfy_quant "
                        "declaration is; the file is damaged or was edited. " + _download(None))
                conf = _parse_json(bytes(f.get(key).numpy().tobytes()), key, path)
                out[n[: -len(_DECLARATION)]] = (conf, key)
    raw = (header.metadata or {}).get(METADATA_QUANT)
    if raw is not None:
        where = f"the header metadata {METADATA_QUANT}"
        doc = _parse_json(raw.encode("utf-8"), where, path)
        layers = doc.get("layers")
        if not isinstance(layers, dict):
            raise SourceFormError(f"{path}: {where} has no \"layers\" object; the file is damaged or was edited. "
                                  + _download(None))
        for layer, conf in layers.items():
            if prefix and not layer.startswith(prefix) and f"{layer}.weight" in header.tensors:
                continue  # a layer outside the diffusion model (a text encoder of an all-in-one file)
            name = layer[len(prefix):] if prefix and layer.startswith(prefix) else layer
            if not isinstance(conf, dict):
                raise SourceFormError(f"{path}: {where} entry {layer!r} is not a JSON object; the file is damaged "
                                      "or was edited. " + _download(None))
            out[name] = (conf, f"{where} entry {layer!r}")  # the metadata wins, as in ComfyUI
    return out


def _parse_json(raw: bytes, where: str, path: str) -> dict:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceFormError(f"{path}: {where} is not valid JSON ({e}); the file is damaged. "
                              + _download(None)) from None
    if not isinstance(doc, dict):
        raise SourceFormError(f"{path}: {where} is a JSON {type(doc).__name__}, not an object; the file is damaged. "
                              + _download(None))
    return doc


def _conf_value(conf: dict, key: str, default):
    """A comfy_quant field, top level first, then under "params" (as ComfyUI reads it)."""
    params = conf.get("params")
    params = params if isinstance(params, dict) else {}
    return conf.get(key, params.get(key, default))


def _refuse_formats(decl: dict[str, tuple[dict, str]], adapter, path: str) -> None:
    """The whole file is refused when any layer is in a format that is not read (4-bit first: the usual case)."""
    by_format: dict[str, list[str]] = {}
    for layer, (conf, where) in decl.items():
        fmt = conf.get("format")
        if not isinstance(fmt, str) or not fmt:
            raise SourceFormError(f"{path}: {where} declares no quantization format ({json.dumps(conf)[:120]}); "
                                  "the file is damaged or was edited. " + _download(adapter))
        by_format.setdefault(fmt, []).append(where)
    for fmt, wheres in sorted(by_format.items(), key=lambda kv: -len(kv[1])):
        if fmt in _FOUR_BIT or _FOUR_BIT_NAME.search(fmt):
            what = _FOUR_BIT.get(fmt, f"comfy_quant format {fmt!r}")
            raise SourceFormError(
                f"{path} is a 4-bit model, {what}: {len(wheres)} layer(s) are stored as {fmt!r} (e.g. {wheres[0]}). "
                "QuantSparse does not convert 4-bit sources: the weights have already lost the precision a 4-bit "
                "conversion starts from, and quantizing them again compounds the two errors. " + _download(adapter))
    for fmt, wheres in by_format.items():
        if fmt == "mxfp8":
            raise SourceFormError(
                f"{path} is an {_MXFP8} model: {len(wheres)} layer(s) are stored as 'mxfp8' (e.g. {wheres[0]}). "
                "This converter does not read that block-scale layout. " + _download(adapter))
    for fmt, wheres in by_format.items():
        if fmt not in _COMFY_FP8_FORMATS and fmt != INT8:
            raise SourceFormError(
                f"{path}: {wheres[0]} declares the quantization format {fmt!r}, which this converter does not know "
                f"(it reads {_READ_TEXT}). " + _download(adapter))


def read_layout(header: SafetensorsHeader) -> SourceLayout:
    """Decide every tensor's source form from the header; SourceFormError says why a file cannot be read."""
    path = header.path
    prefix, _ = registry.split_prefix(header.shapes)
    local = {k[len(prefix):]: k for k in header.tensors if k.startswith(prefix)}  # file order
    outside = [k for k in header.tensors if not k.startswith(prefix)]
    markers = [k for k in dict.fromkeys((prefix + MARKER, MARKER)) if k in header.tensors]
    guess = _adapter_of({n: header.tensors[k].shape for n, k in local.items()})

    decl = _declarations(header, prefix, local, path)
    _refuse_formats(decl, guess, path)

    def bad(msg: str) -> SourceFormError:
        return SourceFormError(f"{path}: {msg}; the file is damaged, edited or mixes forms that do not fit together. "
                               + _download(guess))

    consumed: set[str] = {MARKER} if markers and (prefix + MARKER) in header.tensors else set()
    plan: dict[str, dict[str, Any]] = {}  # weight name -> how to read it

    # comfy_quant layers
    for layer, (conf, where) in decl.items():
        fmt = conf["format"]
        wname = f"{layer}.weight"
        if wname not in local:
            raise bad(f"{where} declares the layer {layer!r} as {fmt!r}, but the file has no {prefix}{wname}")
        w = header.tensors[local[wname]]
        sname = f"{layer}.weight_scale"
        if sname not in local:
            raise bad(f"{prefix}{wname} is declared {fmt!r} (by {where}) but the file has no {prefix}{sname}")
        _check_scale(header, local[sname], w, bad)
        if f"{layer}.scale_weight" in local:
            raise bad(f"the layer {layer!r} has both a comfy_quant declaration ({where}) and a legacy "
                      f"{prefix}{layer}.scale_weight")
        if fmt == INT8:
            if w.dtype != torch.int8:
                raise bad(f"{prefix}{wname} is declared int8_tensorwise but is stored as {dtype_name(w.dtype)}")
            group = _convrot_group(conf, layer, where, w.shape, path, guess)
            plan[wname] = dict(form=INT8_CONVROT if group else INT8, scale=local[sname], convrot_group=group)
        else:  # float8_e4m3fn / float8_e5m2 (ComfyUI reads fp8 stored as uint8 by viewing it)
            want = _COMFY_FP8_FORMATS[fmt]
            if w.dtype not in (want, torch.uint8):
                raise bad(f"{prefix}{wname} is declared {fmt!r} but is stored as {dtype_name(w.dtype)}")
            plan[wname] = dict(form=COMFY_FP8, scale=local[sname],
                               fp8_dtype=want if w.dtype == torch.uint8 else None)
        consumed |= {f"{layer}{_DECLARATION}", sname}
        if f"{layer}.input_scale" in local:
            consumed.add(f"{layer}.input_scale")  # ComfyUI's static activation scale: not part of the weight

    # legacy fp8_scaled layers
    for n in local:
        if not n.endswith(".scale_weight"):
            continue
        layer = n[: -len(".scale_weight")]
        wname = f"{layer}.weight"
        if not markers:
            raise bad(f"{prefix}{n} is a legacy fp8_scaled weight scale, but the file has no {MARKER} marker "
                      "(ComfyUI would ignore the scale)")
        if wname not in local:
            raise bad(f"{prefix}{n} is a weight scale without its weight {prefix}{wname}")
        w = header.tensors[local[wname]]
        if w.dtype not in FP8:
            raise bad(f"{prefix}{n} scales {prefix}{wname}, which is {dtype_name(w.dtype)}, not fp8")
        _check_scale(header, local[n], w, bad)
        plan[wname] = dict(form=FP8_SCALED, scale=local[n])
        consumed.add(n)
    for n in local:
        if n.endswith(".scale_input"):
            layer = n[: -len(".scale_input")]
            if not markers:
                raise bad(f"{prefix}{n} is a legacy fp8_scaled input scale, but the file has no {MARKER} marker")
            if f"{layer}.weight" not in local:
                raise bad(f"{prefix}{n} is an input scale without its weight {prefix}{layer}.weight")
            consumed.add(n)  # ComfyUI's static activation scale for its fp8 matmul: not part of the weight

    # auxiliary tensors nothing accounted for
    for n in local:
        if n in consumed:
            continue
        for suffix in _COMFY_AUX + (_DECLARATION,):
            if n.endswith(suffix):
                layer = n[: -len(suffix)]
                raise bad(f"{prefix}{n} belongs to the quantized layer {layer!r}, but no {prefix}{layer}{_DECLARATION} "
                          f"or {METADATA_QUANT} entry declares that layer's format")

    tensors: dict[str, SourceTensor] = {}
    extra = sum(header.tensors[k].nbytes for k in markers)  # counted with the first tensor: every byte once
    for n, key in local.items():
        if n in consumed:
            continue
        e = header.tensors[key]
        how = plan.get(n)
        if how is None:
            if e.dtype in STORED:
                how = dict(form=STORED[e.dtype])
            elif e.dtype in FP8:
                how = dict(form=FP8[e.dtype])
            else:
                raise SourceFormError(
                    f"{path}: {key} is stored as {dtype_name(e.dtype)} and nothing in the file (a comfy_quant declaration, "
                    f"a scale) says how to read it as a weight; this converter reads {_READ_TEXT}. "
                    + _download(guess))
        aux = [how["scale"]] if how.get("scale") else []
        layer = n[: -len(".weight")] if n.endswith(".weight") else None
        if layer is not None:
            aux += [local[a] for a in (f"{layer}{_DECLARATION}", f"{layer}.scale_input", f"{layer}.input_scale")
                    if a in local and a in consumed]
        nbytes = e.nbytes + sum(header.tensors[k].nbytes for k in aux) + extra
        extra = 0
        tensors[n] = SourceTensor(n, key, how["form"], e.dtype, tuple(e.shape), nbytes, how.get("scale"),
                                  how.get("fp8_dtype"), how.get("convrot_group", 0))
    ignored = len([k for k in outside if k not in markers])
    return SourceLayout(header, prefix, tensors, ignored)


def _check_scale(header: SafetensorsHeader, key: str, weight, bad) -> None:
    s = header.tensors[key]
    if s.dtype not in _SCALE_DTYPES:
        raise bad(f"{key} is {dtype_name(s.dtype)}; a weight scale is a float")
    per_row = len(weight.shape) >= 2 and tuple(s.shape) == (weight.shape[0], 1)
    if math.prod(s.shape) != 1 and not per_row:
        raise bad(f"{key} has shape {list(s.shape)}; a weight scale is a scalar or one per output row "
                  f"[{weight.shape[0] if weight.shape else 1}, 1] for {weight.name} {list(weight.shape)}")


def _convrot_group(conf: dict, layer: str, where: str, shape, path: str, adapter) -> int:
    """0 when the weight is not rotated; else the rotation's group, checked to be undoable exactly."""
    if not _conf_value(conf, "convrot", False):
        return 0
    raw = _conf_value(conf, "convrot_groupsize", 256)
    try:
        group = int(raw)
    except (TypeError, ValueError):
        group, why = 0, f"its group size {raw!r} is not a number"
    else:
        why = None
        if group < 4 or 4 ** round(math.log(group, 4)) != group:
            why = f"its group size {group} is not a power of 4 (the rotation ComfyUI builds has no other sizes)"
        elif len(shape) != 2:
            why = f"the weight has shape {list(shape)}, not [out, in]"
        elif shape[1] % group:
            why = f"the weight's {shape[1]} inputs are not a multiple of the group size {group}"
    if why is not None:
        raise SourceFormError(
            f"{path}: {where} says the int8 weight {layer}.weight was ConvRot-rotated, but {why}; the rotation "
            "cannot be undone exactly from what the file stores, so it cannot be converted. " + _download(adapter))
    return group



# ---------------------------------------------------------------------------------------------- reading

class SourceReader:
    """Reads model tensors of a :class:`SourceLayout` one at a time, each at full precision.

    Stored floats come back unchanged, unscaled fp8 as BF16 (exact), scaled forms as float32 (the exact
    product, rounded once). Use as a context manager.
    """

    def __init__(self, layout: SourceLayout):
        self.layout = layout
        self._file = TensorFile(layout.header)

    def __enter__(self) -> "SourceReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def get(self, name: str) -> torch.Tensor:
        t = self.layout.tensors[name]
        data = self._file.get(t.key)
        if t.form in STORED.values():
            return data
        if t.fp8_dtype is not None:
            data = data.view(t.fp8_dtype)
        if t.scale is None:  # unscaled fp8: every fp8 number is a BF16 number
            return data.to(torch.bfloat16)
        scale = self._file.get(t.scale).to(torch.float64)
        if not bool(torch.isfinite(scale).all()):
            raise SourceFormError(f"{self.layout.header.path}: the weight scale {t.scale} is not finite (NaN or "
                                  "infinite); the file is damaged. Download it again, or the model's bf16 / fp16 file.")
        return dequantize(data, scale, t.convrot_group)


def dequantize(data: torch.Tensor, scale: torch.Tensor, convrot_group: int = 0,
               chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """``data`` (fp8 or int8) x ``scale`` (a scalar or one per row), rotated back from ConvRot when
    ``convrot_group``, as float32: computed exactly in float64 a few rows at a time, then rounded once."""
    shape = data.shape
    rows_of = data.reshape(shape[0] if data.dim() else 1, -1)
    n, k = rows_of.shape
    scale = scale.to(torch.float64)
    per_row = scale.numel() != 1
    scale = scale.reshape(-1, 1) if per_row else scale.reshape(1, 1)
    if convrot_group:
        scale = scale / math.sqrt(convrot_group)  # a power of two: exact
    out = torch.empty((n, k), dtype=torch.float32)
    step = max(1, chunk_elements // max(k, 1))
    for i in range(0, n, step):
        x = rows_of[i:i + step].to(torch.float64)
        if convrot_group:
            x = hadamard_groups(x, convrot_group)
        out[i:i + step] = (x * (scale[i:i + step] if per_row else scale)).to(torch.float32)
    return out.reshape(shape)


_H4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float64)


def hadamard_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """``x`` [rows, K] times the unnormalised regular Hadamard matrix of order ``group`` (a power of 4, the
    Kronecker power of ``_H4``) on each group of ``group`` columns: one 4 x 4 product per base-4 digit of the
    column index, so K log4(group) work instead of K group. Integer inputs give exact integers in float64."""
    rows, k = x.shape
    digits = round(math.log(group, 4))
    y = x.reshape(rows, k // group, *([4] * digits))
    h = _H4.to(x.dtype)
    for axis in range(2, 2 + digits):
        y = torch.movedim(torch.movedim(y, axis, -1) @ h, -1, axis)
    return y.reshape(rows, k)
