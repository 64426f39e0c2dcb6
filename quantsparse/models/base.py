"""The adapter protocol: everything QuantSparse must know about one model family, in one object.

ComfyUI keeps a family in ``comfy/ldm/<family>/`` plus one entry in ``supported_models.py``, and finds
it from a state dict's key shapes; the pack does the same. Quantization, the checkpoint format, the
converter, sparse attention, SSAR and calibration never name a family: they ask the adapter found by
``registry.detect`` (or named by a checkpoint's ``architecture``) for

- the family's dimensions, read from key shapes and written to and read from checkpoint metadata;
- every tensor ComfyUI's model of those dimensions holds (names, shapes), and each Linear's kind;
- the head size, tiny dimensions and random weights (tests, proxy models), its torch model
  (``build_model``) and that model's Linears quantized (``quantize_model``);
- for calibration, when the family supports it (``calibration_supported``): a torch model, its blocks in
  order (``BlockRef``), how a model-level sample becomes the first block's inputs, how a block runs on
  its inputs and how its outputs become the next block's inputs, its geometry and RoPE (the ``calib_*``
  methods), its sampling settings (``sampling``) and one call of its torch model on a recorded
  model-level sample (``denoise``);
- for the ComfyUI side, pure functions over ComfyUI's call arguments: what an attention call is, and
  whether it may run sparse and why not (``attention_call``).
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from ..core.config import WEIGHT_ONLY_SCHEME, QuantSparseConfig
from ..core.quantize_model import Learned, quantize_linears

Shapes = Mapping[str, Sequence[int]]


@dataclass(frozen=True)
class BlockRef:
    """One transformer block in calibration order: its key in work folders and records ("double_00"), its
    ComfyUI prefix ("double_blocks.0"), its kind within the family ("double", "single", "block"), index."""

    key: str
    prefix: str
    kind: str
    index: int
    module: Any  # the torch block


@dataclass(frozen=True)
class SamplingDefaults:
    """How ComfyUI samples a family: what calibration captures with and the proxy trains and samples with."""

    latent_channels: int
    shift: float  # ModelSamplingDiscreteFlow's shift
    guidance: Optional[float] = None  # embedded guidance (FluxGuidance's value); None: the family has none
    spatial: int = 8  # the VAE's compression per side (x the patch 2: the pixels per token side)
    temporal: int = 4  # frames per latent frame after the first


@dataclass(frozen=True)
class AttentionCall:
    """One attention call as the sparse patch sees it, normalised to ``[B, H, L, D]`` with the text first.

    ``sparse`` False carries ``reason``, the word the run's report counts it under ("cross-attention",
    "text refiner", "too few tokens", "unsupported layout", ...)."""

    sparse: bool
    reason: str = ""
    q: Optional[torch.Tensor] = None
    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None
    txt_len: int = 0
    grid: tuple[int, int, int] = (0, 0, 0)
    heads: int = 0

    @staticmethod
    def dense(reason: str) -> "AttentionCall":
        return AttentionCall(False, reason)

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """The sparse result ``[B, H, L, D]`` as ComfyUI's attention returns it for every input layout:
        ``[B, L, H * D]``."""
        b, h, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d)


class ModelAdapter(abc.ABC):
    """One model family. Subclasses set the class attributes and implement the abstract methods."""

    name: str = ""  # the checkpoint metadata's "architecture"
    title: str = ""  # what messages call it, e.g. "HunyuanVideo T2V"
    source_files: str = ""  # the files users download that convert / calibrate take
    text_encoders: str = ""  # how ComfyUI loads the family's text encoders (node hints)
    calibration_supported: bool = False
    sampling: Optional[SamplingDefaults] = None  # set by families that calibrate or have a proxy
    scheme_layers: Optional[re.Pattern] = None  # Linears (full ComfyUI names) that get the configured scheme
    weight_only_layers: Optional[re.Pattern] = None  # Linears that get weight-only INT4
    identity_weights: tuple[str, ...] = ()  # name parts of the weights whose checksums identify a model cheaply

    # -- finding the family ----------------------------------------------------------------------

    @abc.abstractmethod
    def claims(self, shapes: Shapes) -> bool:
        """Whether these (prefix-free) keys are this family's, by the keys ComfyUI detects it by."""

    @abc.abstractmethod
    def dims_from_shapes(self, shapes: Shapes) -> Any:
        """The dimensions ComfyUI would build from these shapes; a ValueError says what does not fit."""

    @abc.abstractmethod
    def dims_from_dict(self, data: Mapping[str, Any]) -> Any:
        """Dimensions from checkpoint metadata (``dims.to_dict()`` written by this adapter)."""

    def variant(self, dims) -> str:
        """A short name of the model these dims are (e.g. "Wan 2.1 T2V 14B"), for messages and inspect."""
        return self.title

    def summary(self, dims) -> str:
        """The architecture line ``quantsparse inspect`` prints."""
        return f"{self.variant(dims)}: " + ", ".join(f"{k} {v}" for k, v in dims.to_dict().items())

    # -- what the checkpoint holds ---------------------------------------------------------------

    @abc.abstractmethod
    def reference_shapes(self, dims) -> dict[str, tuple[int, ...]]:
        """Every tensor ComfyUI's model of ``dims`` holds at full precision, by ComfyUI name (no prefix)."""

    def layer_kind(self, module_name: str, config: QuantSparseConfig) -> Optional[str]:
        """Quantization kind of the Linear ``module_name`` (ComfyUI name), or None to keep it BF16: the
        configured scheme for ``scheme_layers``, weight-only INT4 for ``weight_only_layers``."""
        if self.scheme_layers is not None and self.scheme_layers.match(module_name):
            return config.bits
        if self.weight_only_layers is not None and self.weight_only_layers.match(module_name):
            return WEIGHT_ONLY_SCHEME
        return None

    # -- tests and proxies -----------------------------------------------------------------------

    @abc.abstractmethod
    def tiny_dims(self) -> Any:
        """The smallest dimensions ComfyUI still detects as this family (tests, proxy models)."""

    @abc.abstractmethod
    def random_state_dict(self, dims, seed: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        """Deterministic random weights of ``dims`` in ComfyUI naming."""

    # -- the torch model (calibration, proxies, tests) ------------------------------------------------

    @abc.abstractmethod
    def build_model(self, dims, dtype: torch.dtype = torch.bfloat16, device=None) -> torch.nn.Module:
        """The family's torch model of ``dims`` (ComfyUI key names), unquantized."""

    def quantize_model(self, model: torch.nn.Module, config: QuantSparseConfig, *, select=None,
                       learned: Optional[Learned] = None) -> torch.nn.Module:
        """``model``'s Linears quantized in place by this family's layer table (see ``quantize_linears``)."""
        return quantize_linears(model, config, self.layer_kind, select=select, learned=learned)

    def denoise(self, model: torch.nn.Module, sample: Mapping[str, torch.Tensor], attention=None) -> torch.Tensor:
        """The model's output on one model-level sample (the keys ``calib.capture.record`` writes)."""
        raise NotImplementedError(f"{self.title}: sampling its torch model is not supported yet")

    # -- the ComfyUI side (pure functions over ComfyUI's call arguments) ------------------------------

    def attention_call(self, args: tuple, kwargs: dict, options: dict, call: Optional[dict]) -> AttentionCall:
        """What one ``optimized_attention`` call is, and whether it may run sparse (see ``AttentionCall``).

        ``call`` is what the diffusion-model wrapper recorded for this model call (``call_geometry``)."""
        return AttentionCall.dense("unsupported model")

    def call_geometry(self, diffusion_model, args: tuple, kwargs: dict) -> Optional[dict]:
        """Per model call, from the diffusion model's forward arguments: ``{"grid", "img_len"}`` of the video
        tokens, or None when this call cannot be masked (its reason in ``{"dense": reason}``)."""
        return None


def count_blocks(keys: Sequence[str], prefix: str) -> int:
    """Blocks 0..n-1 present, counted as ComfyUI does (stops at the first missing index)."""
    present = set()
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    for k in keys:
        m = pattern.match(k)
        if m:
            present.add(int(m.group(1)))
    n = 0
    while n in present:
        n += 1
    return n


def shape_of(shapes: Shapes, key: str, ndim: int, family: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ValueError(f"{family} checkpoint lacks the tensor {key!r}, needed to read the model dimensions")
    value = shapes[key]
    shape = tuple(int(s) for s in getattr(value, "shape", value))  # a tensor is taken for its shape
    if len(shape) != ndim:
        raise ValueError(f"{family} tensor {key!r} has shape {list(shape)}; expected {ndim} dimensions")
    return shape
