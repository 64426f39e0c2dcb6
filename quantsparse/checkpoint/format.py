"""The QuantSparse checkpoint: one safetensors file users share, checked in full before anything is built.

Keys are ComfyUI's (no ``model.diffusion_model.`` prefix), so ComfyUI's own model detection
and LoRA key maps keep working. A quantized Linear at prefix P stores ``P.weight`` (int8:
packed INT4 [N, K/2], or 6/8-bit codes [N, K]), ``P.weight_scale`` (float32 [N], or float16
[N, K/128] when grouped), ``P.smooth`` (float32 [K], activation-quantized kinds only) and its
bias; every other tensor is BF16. The metadata entry ``quantsparse`` (JSON) carries what is
needed to check and rebuild the model: format version, architecture, dimensions, the
quantization config, the per-layer table, how it was calibrated, default sparse settings.

A checkpoint that passes :func:`validate_checkpoint` builds: every tensor the model needs is
present with the expected dtype and shape, and nothing else is. Checks use the header only,
so a bad 6 GB file is rejected in milliseconds with a message that says what to do.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from ..core.config import QuantSparseConfig
from ..core.errors import QuantSparseError, public
from ..core.quantizer import QuantizedWeight, is_packed, kind_bits
from ..core.safetensors_io import (
    SafetensorsError,
    TensorEntry,
    TensorSpec,
    dtype_name,
    read_header,
    write_safetensors,
)
from ..core.version import __version__
from ..core.config import is_int, kind_group_size, kind_rotate
from ..models import registry
from ..models.base import ModelAdapter

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
METADATA_KEY = "quantsparse"
COMFY_PREFIX = "model.diffusion_model."
FLOAT_DTYPE = torch.bfloat16  # every tensor that is not part of a quantized Linear
TOOL_NAME = "comfyui-quantsparse"
CONVERT_HINT = "this is not a QuantSparse checkpoint; convert it with `quantsparse convert`"
_LIST_FIRST = 5


@public
class CheckpointError(QuantSparseError):
    """A checkpoint that cannot be used; the message names the file, the problem and the fix."""


def _error(path: str, problem: str, fix: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}. {fix}.")


# ---------------------------------------------------------------------------- the layer table

_LAYER_FIELDS = ("kind", "in_features", "out_features", "group_size", "rotate")


@dataclass(frozen=True)
class LayerSpec(Mapping):
    """How one Linear is stored; the loader builds its QuantizedLinear from this alone.

    Also a read-only mapping (``spec["kind"]``, ``dict(spec)``), the shape the JSON has, so
    code that handles the metadata as plain data works on it unchanged.
    """

    kind: str
    in_features: int
    out_features: int
    group_size: int
    rotate: bool

    def tensor_specs(self, prefix: str) -> list[TensorSpec]:
        n, k = self.out_features, self.in_features
        width = k // 2 if is_packed(self.kind) else k
        specs = [TensorSpec(f"{prefix}.weight", torch.int8, (n, width))]
        if self.group_size:
            specs.append(TensorSpec(f"{prefix}.weight_scale", torch.float16, (n, k // self.group_size)))
        else:
            specs.append(TensorSpec(f"{prefix}.weight_scale", torch.float32, (n,)))
        if kind_bits(self.kind)[1] < 16:
            specs.append(TensorSpec(f"{prefix}.smooth", torch.float32, (k,)))
        return specs

    def __getitem__(self, key: str) -> Any:
        if key not in _LAYER_FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(_LAYER_FIELDS)

    def __len__(self) -> int:
        return len(_LAYER_FIELDS)

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in _LAYER_FIELDS}

    @classmethod
    def from_dict(cls, data: Any) -> "LayerSpec":
        if not isinstance(data, Mapping) or set(data) != set(_LAYER_FIELDS):
            raise ValueError(f"a layer entry must be an object with exactly the fields {list(_LAYER_FIELDS)}, "
                             f"got {data!r}")
        spec = cls(**{f: data[f] for f in _LAYER_FIELDS})
        kind_bits(spec.kind)  # unknown kinds are a ValueError here, not a KeyError later
        for f in ("in_features", "out_features", "group_size"):
            v = getattr(spec, f)
            if not is_int(v) or v < 0:
                raise ValueError(f"layer field {f} must be a non-negative integer, got {v!r}")
        if not isinstance(spec.rotate, bool):
            raise ValueError(f"layer field rotate must be a bool, got {spec.rotate!r}")
        return spec


def quantized_layers(dims, config: QuantSparseConfig) -> dict[str, LayerSpec]:
    """Every Linear that ``config`` quantizes in a model of ``dims`` (any family's), by ComfyUI prefix."""
    adapter = registry.adapter_for(dims)
    layers = {}
    for name, shape in adapter.reference_shapes(dims).items():
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        prefix = name[: -len(".weight")]
        kind = adapter.layer_kind(prefix, config)
        if kind is None:
            continue
        n, k = shape
        layers[prefix] = LayerSpec(kind, k, n, kind_group_size(kind, config), kind_rotate(kind, config))
    return layers


def checkpoint_plan(dims, config: QuantSparseConfig) -> list[TensorSpec]:
    """Every tensor of the checkpoint of ``dims`` quantized by ``config``: known before any data is read."""
    layers = quantized_layers(dims, config)
    plan = []
    for name, shape in registry.adapter_for(dims).reference_shapes(dims).items():
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix in layers:
            plan.extend(layers[prefix].tensor_specs(prefix))
        else:
            plan.append(TensorSpec(name, FLOAT_DTYPE, tuple(shape)))
    return plan


# ---------------------------------------------------------------------------- metadata

@dataclass(frozen=True)
class CheckpointMeta:
    """What a writer decides; the layer table and the tool stamp are derived from it."""

    dims: Any  # the family's dims (HunyuanVideoDims, WanDims, ...)
    config: QuantSparseConfig
    calibration: dict[str, Any] | None = None  # None = round-to-nearest, no calibration
    sparse_defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> dict[str, LayerSpec]:
        return quantized_layers(self.dims, self.config)

    def to_json(self) -> str:
        doc = {
            "format_version": FORMAT_VERSION,
            "architecture": registry.adapter_for(self.dims).name,
            "dims": self.dims.to_dict(),
            "quant": self.config.to_dict(),
            "layers": {p: spec.to_dict() for p, spec in self.layers.items()},
            "calibration": self.calibration,
            "sparse_defaults": dict(self.sparse_defaults),
            "created_by": {"tool": TOOL_NAME, "version": __version__},
        }
        try:
            return json.dumps(doc, sort_keys=False, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"checkpoint calibration/sparse_defaults must be plain JSON data: {e}") from None


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint's validated metadata and tensor table; no tensor data."""

    path: str
    format_version: int
    dims: Any
    config: QuantSparseConfig
    layers: dict[str, LayerSpec]
    calibration: dict[str, Any] | None
    sparse_defaults: dict[str, Any]
    created_by: dict[str, Any]
    tensors: dict[str, TensorEntry]
    file_size: int

    @property
    def quant(self) -> QuantSparseConfig:
        return self.config

    @property
    def adapter(self) -> ModelAdapter:
        return registry.adapter_for(self.dims)

    @property
    def meta(self) -> CheckpointMeta:
        return CheckpointMeta(self.dims, self.config, self.calibration, dict(self.sparse_defaults))


def write_checkpoint(path: str | os.PathLike,
                     tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                     meta: CheckpointMeta, *, overwrite: bool = False,
                     progress: Callable[[int, int, str], None] | None = None) -> int:
    """Write a checkpoint atomically; returns its size in bytes.

    The plan comes from ``meta``, so ``tensors`` may be a lazy mapping or an iterator of
    (name, tensor) pairs in any order; a tensor that is missing, extra, or of the wrong dtype or
    shape aborts the write and leaves ``path`` untouched. Non-quantized tensors must already be
    BF16 (casting here would hide a caller's mistake).
    """
    plan = checkpoint_plan(meta.dims, meta.config)
    if isinstance(tensors, Mapping):
        _check_names(str(path), {s.name for s in plan}, set(tensors))
    metadata = {METADATA_KEY: meta.to_json()}
    try:
        return write_safetensors(path, tensors, metadata, specs=plan, overwrite=overwrite, progress=progress)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from None


def _check_names(path: str, expected: set[str], found: set[str]) -> None:
    problems = _name_problems(expected, found)
    if problems:
        raise _error(path, "; ".join(problems), "Pass exactly the tensors of checkpoint_plan(dims, config)")


def _name_list(names: Iterable[str]) -> str:
    names = sorted(names)
    more = f" (and {len(names) - _LIST_FIRST} more)" if len(names) > _LIST_FIRST else ""
    return ", ".join(names[:_LIST_FIRST]) + more


def _name_problems(expected: set[str], found: set[str]) -> list[str]:
    problems = []
    missing, extra = expected - found, found - expected
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_name_list(missing)}")
    if extra:
        problems.append(f"{len(extra)} extra tensor(s): {_name_list(extra)}")
    return problems


# ---------------------------------------------------------------------------- reading and validation

def read_checkpoint_header(path: str | os.PathLike) -> CheckpointInfo:
    """Read and check the metadata (format, architecture, dimensions, config, layer table).

    Tensor shapes and dtypes are only parsed here; :func:`validate_checkpoint` checks them.
    """
    p = str(path)
    try:
        header = read_header(p)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from None
    raw = (header.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise CheckpointError(_describe_foreign(p, header))
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise _error(p, f"its 'quantsparse' metadata is not valid JSON ({e})",
                     "The file is damaged; re-create it with `quantsparse convert`") from None
    if not isinstance(doc, dict):
        raise _error(p, "its 'quantsparse' metadata is not a JSON object",
                     "The file is damaged; re-create it with `quantsparse convert`")
    version = doc.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        newer = is_int(version) and version > max(SUPPORTED_FORMAT_VERSIONS)
        fix = ("Update comfyui-quantsparse to a version that reads it" if newer
               else "Re-create it with this version's `quantsparse convert`")
        raise _error(p, f"its checkpoint format version is {version!r}, but this comfyui-quantsparse "
                        f"({__version__}) reads format version(s) {list(SUPPORTED_FORMAT_VERSIONS)}", fix)
    arch = doc.get("architecture")
    try:
        adapter = registry.by_name(arch)
    except registry.UnknownModelError as e:
        raise CheckpointError(f"{p}: it is a QuantSparse checkpoint for architecture {arch!r}: {e}.") from None
    missing = [k for k in ("dims", "quant", "layers", "calibration", "sparse_defaults", "created_by") if k not in doc]
    if missing:
        raise _error(p, f"its 'quantsparse' metadata lacks the fields {missing}",
                     "The file is damaged; re-create it with `quantsparse convert`")
    try:
        dims = adapter.dims_from_dict(doc["dims"])
    except (TypeError, ValueError) as e:
        raise _error(p, f"its stored dimensions are invalid ({e})",
                     "The file is damaged; re-create it with `quantsparse convert`") from None
    try:
        config = QuantSparseConfig.from_dict(doc["quant"])
    except (TypeError, ValueError) as e:
        raise _error(p, f"its stored quantization config is invalid ({e})",
                     "Re-create it with this version's `quantsparse convert`") from None
    if not isinstance(doc["layers"], dict):
        raise _error(p, "its layer table is not a JSON object", "Re-create it with `quantsparse convert`")
    try:
        layers = {str(k): LayerSpec.from_dict(v) for k, v in doc["layers"].items()}
    except ValueError as e:
        raise _error(p, f"its layer table is malformed ({e})", "Re-create it with `quantsparse convert`") from None
    calibration, sparse = doc["calibration"], doc["sparse_defaults"]
    if calibration is not None and not isinstance(calibration, dict):
        raise _error(p, "its calibration record is not a JSON object or null", "Re-create it")
    if not isinstance(sparse, dict):
        raise _error(p, "its sparse_defaults are not a JSON object", "Re-create it")
    created_by = doc["created_by"] if isinstance(doc["created_by"], dict) else {}
    return CheckpointInfo(p, version, dims, config, layers, calibration, sparse, created_by, header.tensors,
                          header.file_size)


def checkpoint_replaceable(path: str | os.PathLike) -> str | None:
    """Why ``path`` must not be replaced by a new checkpoint even with overwrite; None when it is one of
    ours (a command replaces what a command wrote, never a user's model)."""
    try:
        header = read_header(path)
    except SafetensorsError:
        return "not a QuantSparse checkpoint (not even a readable safetensors file)"
    if METADATA_KEY not in (header.metadata or {}):
        return "not a QuantSparse checkpoint (a model or another safetensors file)"
    return None


def _describe_foreign(path: str, header) -> str:
    """Say what a file without our metadata is, so the fix is obvious (convert is offered only for a
    file that convert takes)."""
    _, shapes = registry.split_prefix(header.shapes)
    try:
        adapter, dims = registry.identify(shapes)
    except ValueError:
        return (f"{path} is not a QuantSparse checkpoint: it looks like {registry.describe(header.shapes)}. "
                "QuantSparse loads the checkpoints that `quantsparse convert` or the Calibrate node make from: "
                f"{registry.supported_text()}.")
    dtypes = sorted({dtype_name(e.dtype) for e in header.tensors.values()})
    return (f"{path}: it is a plain {adapter.variant(dims)} model ({', '.join(dtypes)}) without 'quantsparse' "
            f"metadata; {CONVERT_HINT} (quantsparse convert {os.path.basename(path)} OUT.safetensors --bits w4a8).")


def expected_tensors(dims, config: QuantSparseConfig) -> dict[str, TensorSpec]:
    return {s.name: s for s in checkpoint_plan(dims, config)}


def validate_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Check everything a model build relies on, from the header alone; raise CheckpointError otherwise."""
    info = read_checkpoint_header(path)
    p = info.path
    shapes = {name: e.shape for name, e in info.tensors.items()}
    try:
        found_dims = info.adapter.dims_from_shapes(shapes)
        dims_problem = None
    except ValueError as e:
        found_dims, dims_problem = None, str(e)
    if found_dims is not None and found_dims != info.dims:
        diffs = {f: (getattr(info.dims, f), getattr(found_dims, f)) for f in info.dims.to_dict()
                 if getattr(info.dims, f) != getattr(found_dims, f)}
        desc = ", ".join(f"{f}: metadata {a!r} vs tensors {b!r}" for f, a, b in ((f, *v) for f, v in diffs.items()))
        raise _error(p, f"the dimensions in its metadata disagree with its tensors ({desc})",
                     "The file was edited or damaged; re-create it with `quantsparse convert`")

    expected = expected_tensors(info.dims, info.config)
    problems = _name_problems(set(expected), set(info.tensors))
    wrong_shape = [(n, expected[n].shape, e.shape) for n, e in info.tensors.items()
                   if n in expected and expected[n].shape != e.shape]
    wrong_dtype = [(n, expected[n].dtype, e.dtype) for n, e in info.tensors.items()
                   if n in expected and expected[n].dtype != e.dtype]
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} tensor(s) of the wrong shape: " + "; ".join(
            f"{n} expected {list(a)} found {list(b)}" for n, a, b in wrong_shape[:_LIST_FIRST]))
    if wrong_dtype:
        problems.append(f"{len(wrong_dtype)} tensor(s) of the wrong dtype: " + "; ".join(
            f"{n} expected {dtype_name(a)} found {dtype_name(b)}" for n, a, b in wrong_dtype[:_LIST_FIRST]))
    if problems:
        raise _error(p, "its tensors do not match its metadata (" + f"{info.config.bits}, "
                        f"{info.adapter.variant(info.dims)}): " + "; ".join(problems),
                     "The file is incomplete, edited or damaged; re-create it with `quantsparse convert`")
    if dims_problem is not None:
        raise _error(p, f"its tensors do not describe a {info.adapter.title} model ({dims_problem})",
                     "Re-create it with `quantsparse convert`")

    layers_expected = quantized_layers(info.dims, info.config)
    if info.layers != layers_expected:
        miss = set(layers_expected) - set(info.layers)
        extra = set(info.layers) - set(layers_expected)
        differ = [k for k in set(info.layers) & set(layers_expected) if info.layers[k] != layers_expected[k]]
        parts = []
        if miss:
            parts.append(f"layers missing from the table: {_name_list(miss)}")
        if extra:
            parts.append(f"layers the config does not quantize: {_name_list(extra)}")
        if differ:
            k = sorted(differ)[0]
            parts.append(f"{len(differ)} layers stored differently than the config says, e.g. {k}: "
                         f"table {info.layers[k].to_dict()} vs config {layers_expected[k].to_dict()}")
        raise _error(p, "its layer table disagrees with its quantization config (" + "; ".join(parts) + ")",
                     "The file was written by an incompatible tool; re-create it with `quantsparse convert`")
    return info



def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Validate, then read every tensor (safetensors only; nothing is unpickled)."""
    from safetensors import safe_open

    info = validate_checkpoint(path)
    state = {}
    with safe_open(info.path, framework="pt", device=str(torch.device(device))) as f:
        for name in info.tensors:
            state[name] = f.get_tensor(name)
    return state, info


def quantized_weight(state: Mapping[str, torch.Tensor], prefix: str, layer: LayerSpec) -> QuantizedWeight:
    """The stored tensors of the Linear at ``prefix`` as the quantizer's own record."""
    smooth = state.get(f"{prefix}.smooth") if kind_bits(layer.kind)[1] < 16 else None
    return QuantizedWeight(layer.kind, state[f"{prefix}.weight"], state[f"{prefix}.weight_scale"], smooth,
                           layer.group_size, layer.rotate)
