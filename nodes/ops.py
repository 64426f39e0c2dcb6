"""ComfyUI operations whose Linear runs QuantSparse's quantized kernels.

The model is built by ComfyUI itself (``comfy.sd.load_diffusion_model_state_dict`` with
``custom_operations``), so detection, the HunyuanVideo classes, the samplers and memory
management stay ComfyUI's. Only ``Linear`` changes: a layer the checkpoint lists as quantized
loads its packed tensors and runs ``quantized_linear``; every other layer (embedders, final
layer) is the stock ``manual_cast.Linear``.

The quantized tensors are plain ``Parameter`` objects (no grad), so ``module.state_dict()``
reports their real, quantized sizes: that is what ComfyUI's memory accounting
(``module_size``) and its low-VRAM partial loader measure, and what it pins and moves.

Every quantized layer runs ``kernels``' fast path where one exists (the Triton kernels on a GPU: for
the weight-only W4A16 layers the INT4 GEMM that reads the packed weight, never a dequantized copy);
where it does not (no GPU, no Triton, ``QUANTSPARSE_KERNELS=reference``) the eager references
dequantize the weight at every call, and the log says so once per kind and device (``note_route``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import comfy.model_management
import comfy.ops
import torch

from .. import kernels
from ..quantsparse.core.qlinear import activation_qmax, nontrivial_smooth, quantized_gemm, quantized_linear
from ..quantsparse.core.quantizer import is_packed, kind_bits

log = logging.getLogger("quantsparse")

LORA_UNSUPPORTED = (
    "LoRA is not supported on QuantSparse quantized layers yet: apply the LoRA to the BF16 model "
    "before converting/calibrating, then load the new QuantSparse checkpoint (or try ComfyUI's experimental "
    "'Load LoRA (Bypass)' node, which adds the LoRA beside the quantized layers instead of patching them)"
)

_QUANT_TENSORS = ("weight", "weight_scale", "smooth", "bias")


def _to_device(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Low-VRAM mode keeps a layer's tensors on the host; bring them to the input per call.

    Host-to-device copies are issued non-blocking on the current stream (the kernels that
    read them are queued behind the copy); a copy towards the host is kept blocking so that
    nothing reads it before it lands.
    """
    if t is None or t.device == device:
        return t
    non_blocking = device.type != "cpu" and comfy.model_management.device_supports_non_blocking(device)
    return t.to(device, non_blocking=non_blocking)


def expected_quant_shapes(spec: Mapping[str, Any], in_features: int, out_features: int,
                          has_bias: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Shape and dtype of each tensor of a quantized Linear (dtype None: any float)."""
    kind, group_size = spec["kind"], int(spec.get("group_size", 0))
    _, abits = kind_bits(kind)
    width = in_features // 2 if is_packed(kind) else in_features
    out: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {
        "weight": ((out_features, width), torch.int8),
        "weight_scale": (((out_features, in_features // group_size), torch.float16) if group_size
                         else ((out_features,), torch.float32)),
    }
    if abits < 16:
        out["smooth"] = ((in_features,), torch.float32)
    if has_bias:
        out["bias"] = ((out_features,), None)
    return out


def kernel_route(kind: str, device) -> tuple[bool, str]:
    """(fast, what runs) for a quantized layer of ``kind`` on ``device``, by ``kernels``' dispatch rule.

    Fast: the Triton kernels (INT8 activation quantization and an integer GEMM for W4A8 / W8A8, the
    weight-only INT4 GEMM for W4A16, which reads the packed weight as it is). Otherwise the eager PyTorch
    references run, which unpack and dequantize the weight (to float64) at every call.
    """
    device = torch.device(device)
    mode = os.environ.get("QUANTSPARSE_KERNELS", "auto")
    key = (kind, str(device), mode)
    hit = _ROUTES.get(key)
    if hit is not None:
        return hit
    abits = kind_bits(kind)[1]
    if kernels.use_triton(torch.empty(0, device=device)):
        what = ("the Triton weight-only INT4 GEMM" if abits == 16
                else "Triton INT8 activation quantization + integer GEMM")
        route = (True, what + (" (interpreted on the CPU)" if device.type == "cpu" else ""))
    else:
        why = ("QUANTSPARSE_KERNELS=reference" if mode == "reference" else
               "Triton is not installed" if not kernels.HAS_TRITON else f"no Triton kernels on {device.type}")
        route = (False, f"the eager PyTorch references ({why}): the weight is unpacked and dequantized at every call")
    _ROUTES[key] = route
    return route


_ROUTES: dict = {}
_ROUTES_LOGGED: set = set()


def note_route(kind: str, device) -> None:
    """Logs, once per kind and device, a quantized layer that runs without the fast kernels (a warning on a
    GPU, where one exists; a note on the CPU, where none does)."""
    fast, what = kernel_route(kind, device)
    key = (kind, str(device), what)
    if fast or key in _ROUTES_LOGGED:
        return
    _ROUTES_LOGGED.add(key)
    level = logging.INFO if torch.device(device).type == "cpu" else logging.WARNING
    log.log(level, "QuantSparse: %s layers on %s run %s", kind, device, what)


class QuantSparseLinear(comfy.ops.manual_cast.Linear):
    """A Linear that is quantized when the checkpoint's metadata lists its name.

    ``layer_specs`` (module name -> {"kind", "group_size", "rotate", ...}) is set per
    checkpoint by :func:`quantsparse_ops`; ``quant_kind`` stays None for BF16 layers.
    """

    layer_specs: Mapping[str, Mapping[str, Any]] = {}
    quant_kind: str | None = None
    _route_noted = None  # the device note_route last ran for: the per-call cost is one comparison

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        # Placeholders of size 0 instead of a full [out, in] weight: most Linears are replaced
        # by packed tensors on load, and allocating (or, on Windows, committing) a BF16 copy of
        # the whole 13B model first would cost its full size in host memory for nothing.
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.nn.Parameter(torch.empty(0, device=device, dtype=dtype), requires_grad=False)
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(0, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.register_parameter("weight_scale", None)
        self.register_parameter("smooth", None)

    def reset_parameters(self):
        return None

    # -- loading -----------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        name = prefix[:-1]
        spec = self.layer_specs.get(name)
        if spec is None:
            if prefix + "weight_scale" in state_dict:
                error_msgs.append(
                    f"{prefix}weight_scale: the checkpoint holds quantized tensors for layer '{name}' but its "
                    "QuantSparse metadata does not list that layer; the file is inconsistent, convert it again"
                )
                return
            self._materialize_dense()
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
            return
        self._load_quantized(spec, state_dict, prefix, missing_keys, unexpected_keys, error_msgs)

    def _materialize_dense(self) -> None:
        """Give a BF16 layer its real-size weight so that the stock loader can copy into it."""
        if self.weight.numel() == 0:
            self.weight = torch.nn.Parameter(
                torch.empty((self.out_features, self.in_features), dtype=self.weight.dtype, device=self.weight.device),
                requires_grad=False)
        if self.bias is not None and self.bias.numel() == 0:
            self.bias = torch.nn.Parameter(
                torch.empty((self.out_features,), dtype=self.bias.dtype, device=self.bias.device), requires_grad=False)

    def _load_quantized(self, spec, state_dict, prefix, missing_keys, unexpected_keys, error_msgs) -> None:
        try:
            expected = expected_quant_shapes(spec, self.in_features, self.out_features, self.bias is not None)
        except (KeyError, ValueError) as e:
            error_msgs.append(f"{prefix[:-1]}: bad QuantSparse layer description {dict(spec)}: {e}")
            return
        loaded = {}
        for key, (shape, dtype) in expected.items():
            t = state_dict.get(prefix + key)
            if t is None:
                missing_keys.append(prefix + key)
                continue
            if tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype) or (
                    dtype is None and not t.is_floating_point()):
                want = f"{dtype} {shape}" if dtype is not None else f"float {shape}"
                error_msgs.append(
                    f"{prefix}{key}: expected {want} for a {spec['kind']} layer of this model "
                    f"({self.in_features} -> {self.out_features}), got {t.dtype} {tuple(t.shape)}; the checkpoint "
                    "was made for a different model or is damaged"
                )
                continue
            loaded[key] = t
        for k in state_dict:
            if k.startswith(prefix) and k[len(prefix):] not in expected:
                unexpected_keys.append(k)
        if len(loaded) != len(expected):
            return
        device = self.weight.device
        for key, t in loaded.items():
            setattr(self, key, torch.nn.Parameter(t.to(device).contiguous(), requires_grad=False))
        self.quant_kind = spec["kind"]
        self.quant_group_size = int(spec.get("group_size", 0))
        self.quant_rotate = bool(spec.get("rotate", False)) and kind_bits(self.quant_kind)[1] < 16

    # -- forward -----------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        if self.quant_kind is None:
            return super().forward(*args, **kwargs)
        comfy.ops.run_every_op()
        return self._forward_quantized(*args, **kwargs)

    def forward_comfy_cast_weights(self, input, *args, **kwargs):
        if self.quant_kind is None:
            return super().forward_comfy_cast_weights(input, *args, **kwargs)
        return self._forward_quantized(input)

    def _tensors(self, device):
        if len(self.weight_function) > 0:
            # A LoRA (or any weight patch) that reached the layer would be silently wrong on packed
            # integer codes; the patcher refuses it earlier, this catches any other route.
            raise RuntimeError(f"{LORA_UNSUPPORTED} (a weight patch reached a {self.quant_kind} layer)")
        bias = _to_device(self.bias, device)
        if bias is not None:
            for f in self.bias_function:
                bias = f(bias)
        return (_to_device(self.weight, device), _to_device(self.weight_scale, device),
                _to_device(self.smooth, device), bias)

    def _note_route(self, device: torch.device) -> None:
        if self._route_noted != device:
            note_route(self.quant_kind, device)
            self._route_noted = device

    def _forward_quantized(self, x: torch.Tensor) -> torch.Tensor:
        self._note_route(x.device)
        weight, scale, smooth, bias = self._tensors(x.device)
        return quantized_linear(x, weight, scale, smooth, bias, kind=self.quant_kind,
                                group_size=self.quant_group_size, rotate=self.quant_rotate)

    # -- the fused block forward (nodes/fused_blocks.py) ----------------------------------

    @property
    def takes_int8_input(self) -> bool:
        """Quantized with 8-bit (or fewer) activations: the block may hand it pre-quantized activations."""
        return self.quant_kind is not None and kind_bits(self.quant_kind)[1] < 16

    def activation_prologue(self, device):
        """(smooth or None, qmax, rotate): what the fused activation kernels apply for this layer."""
        smooth = nontrivial_smooth(_to_device(self.smooth, device))
        return smooth, activation_qmax(self.quant_kind), self.quant_rotate

    def forward_prequantized(self, x_q: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """[M, N] from INT8 activations made by one of ``kernels``' fused activation kernels."""
        comfy.ops.run_every_op()
        self._note_route(x_q.device)
        weight, scale, _, bias = self._tensors(x_q.device)
        return quantized_gemm(x_q, x_scale, weight, scale, bias, kind=self.quant_kind,
                              group_size=self.quant_group_size, out_dtype=out_dtype)

    def extra_repr(self) -> str:
        base = f"in_features={self.in_features}, out_features={self.out_features}"
        if self.quant_kind is None:
            return base
        g = f", group_size={self.quant_group_size}" if self.quant_group_size else ""
        return f"{base}, kind={self.quant_kind}{g}, rotate={self.quant_rotate}"


class QuantSparseOps(comfy.ops.manual_cast):
    """``manual_cast`` with the quantized Linear; the other layers cast per call as usual."""

    Linear = QuantSparseLinear


def quantsparse_ops(layer_specs: Mapping[str, Mapping[str, Any]]) -> type[QuantSparseOps]:
    """An operations class bound to one checkpoint's layer table.

    ComfyUI instantiates ``operations.Linear(...)`` without telling it its name or checkpoint,
    so the table travels as a class attribute of a fresh subclass (one per load: two models
    loaded side by side never share it).
    """
    specs = {str(k): dict(v) for k, v in layer_specs.items()}
    linear = type("QuantSparseLinear", (QuantSparseLinear,), {"layer_specs": specs})
    return type("QuantSparseOps", (QuantSparseOps,), {"Linear": linear})


def quantized_modules(model: torch.nn.Module) -> dict[str, QuantSparseLinear]:
    """Module name -> quantized Linear, for the patcher's refusals and the loader's checks."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantSparseLinear) and m.quant_kind is not None}
