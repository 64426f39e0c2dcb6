"""The quantized Linear: activation quantization (smoothing + rotation fused) then an integer GEMM."""

from __future__ import annotations

import torch
from torch import nn

from ... import kernels
from .config import qmax
from .quantizer import QuantizedWeight, is_packed, kind_bits, quantize_weight


def nontrivial_smooth(smooth: torch.Tensor | None) -> torch.Tensor | None:
    """``smooth``, or None when it is all ones (round-to-nearest checkpoints), so that the
    activation kernel can feed the tensor cores straight from memory. Checked once per tensor
    version, not per call."""
    if smooth is None:
        return None
    try:
        version = smooth._version
    except RuntimeError:  # an inference-mode tensor (ComfyUI samples under inference_mode): no version counter
        version = -1
    seen = getattr(smooth, "_quantsparse_identity", None)
    if seen is None or seen[0] != version:
        seen = (version, bool((smooth == 1).all()))
        smooth._quantsparse_identity = seen
    return None if seen[1] else smooth


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, smooth: torch.Tensor | None,
                     bias: torch.Tensor | None, *, kind: str, group_size: int, rotate: bool) -> torch.Tensor:
    """y = x W^T + b for a quantized W; ``x`` is [..., K] in its compute dtype, ``y`` has the same dtype."""
    wbits, abits = kind_bits(kind)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if abits == 16:
        out = kernels.w4a16_gemm(x2, weight, weight_scale, bias, group_size)
    else:
        x_q, x_scale = kernels.act_quant(x2, nontrivial_smooth(smooth), qmax(abits), rotate)
        out = quantized_gemm(x_q, x_scale, weight, weight_scale, bias, kind=kind, group_size=group_size,
                             out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def quantized_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None, *, kind: str, group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    """[M, N] from activations already quantized (``kernels.act_quant`` or one of its fused forms)."""
    if kind_bits(kind)[0] == 4:
        return kernels.w4a8_gemm(x_q, x_scale, weight, weight_scale, bias, out_dtype, group_size)
    return kernels.w8a8_gemm(x_q, x_scale, weight, weight_scale, bias, out_dtype)


def activation_qmax(kind: str) -> int:
    """The INT code range of a layer kind's activations (e.g. 127 for W4A8)."""
    return qmax(kind_bits(kind)[1])


class QuantizedLinear(nn.Module):
    """Drop-in for ``nn.Linear`` holding quantized tensors as buffers (they are not trained)."""

    def __init__(self, in_features: int, out_features: int, *, kind: str, bias: bool = True, group_size: int = 0,
                 rotate: bool = True, bias_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        wbits, abits = kind_bits(kind)
        self.in_features, self.out_features = in_features, out_features
        self.kind, self.group_size = kind, group_size
        self.rotate = rotate and abits < 16
        width = in_features // 2 if is_packed(kind) else in_features
        self.register_buffer("weight", torch.zeros(out_features, width, dtype=torch.int8, device=device))
        scale_shape = (out_features, in_features // group_size) if group_size else (out_features,)
        scale_dtype = torch.float16 if group_size else torch.float32
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=scale_dtype, device=device))
        self.register_buffer("smooth", torch.ones(in_features, dtype=torch.float32, device=device) if abits < 16 else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None) -> "QuantizedLinear":
        m = cls(qw.in_features, qw.out_features, kind=qw.kind, bias=bias is not None, group_size=qw.group_size,
                rotate=qw.rotate, bias_dtype=bias.dtype if bias is not None else torch.bfloat16)
        m.weight.copy_(qw.weight)
        m.weight_scale.copy_(qw.scale)
        if qw.smooth is not None:
            m.smooth.copy_(qw.smooth)
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str, *, group_size: int = 0, rotate: bool = True,
                    smooth: torch.Tensor | None = None, clip: torch.Tensor | None = None) -> "QuantizedLinear":
        qw = quantize_weight(linear.weight.detach().float().cpu(), kind, group_size=group_size, smooth=smooth,
                             clip=clip, rotate=rotate)
        bias = None if linear.bias is None else linear.bias.detach().cpu()
        return cls.from_quantized(qw, bias).to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight, self.weight_scale, self.smooth, self.bias, kind=self.kind,
                                group_size=self.group_size, rotate=self.rotate)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}{g}"
