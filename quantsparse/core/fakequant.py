"""Fake-quantized Linear for calibration: the deployed arithmetic, differentiable in what is learned.

What the checkpoint will hold is exactly ``quantize_weight(W, kind, smooth=s, clip=c, rotate=...)``:
weights ``H(W / s)``, symmetric per output channel (or group) with range ``c * max|row|``; activations
``H(x * s)`` quantized per token with a dynamic absmax scale. Here both are simulated in floating point
with a straight-through estimator for the rounding, so gradients reach:

- ``log_smooth`` [K]: the per-input-channel smoothing vector ``s = exp(log_smooth)`` (lr 5e-3);
- ``clip_logit`` [N] or [N, K/group]: clipping factors ``c = sigmoid(clip_logit)`` (lr 5e-2),
  FlatQuant's learnable weight clipping.

The original weight is a frozen buffer; nothing of the model is trained.
"""

from __future__ import annotations

import torch
from torch import nn

from ...kernels import block_hadamard
from .config import qmax
from .quantizer import SCALE_FLOOR, kind_bits

ACT_AMAX_FLOOR = 1e-8  # the activation kernel's floor
CLIP_INIT_LOGIT = 4.0  # sigmoid(4) = 0.982, FlatQuant's LWC initialisation (paper notes section 9, item 2)
SMOOTH_ALPHA = 0.5  # SmoothQuant migration strength of the alternative initialisation


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (ties to even, as the kernels) forward; identity backward."""
    return x + (torch.round(x) - x).detach()


def fake_quant_rows(x: torch.Tensor, qm: int, amax: torch.Tensor) -> torch.Tensor:
    """Symmetric quantize-dequantize of ``x`` with one range per row (``amax`` broadcast on the last dim)."""
    scale = (amax / qm).clamp_min(SCALE_FLOOR)
    return round_ste(x / scale).clamp(-qm, qm) * scale


class FakeQuantLinear(nn.Module):
    """Simulates the ``QuantizedLinear`` of ``kind`` that calibration will export for ``linear``."""

    def __init__(self, linear: nn.Linear, kind: str, *, group_size: int = 0, rotate: bool = True):
        super().__init__()
        self.kind = kind
        self.wbits, self.abits = kind_bits(kind)
        self.act_quantized = self.abits < 16
        self.rotate = rotate and self.act_quantized
        self.group_size = group_size
        n, k = linear.weight.shape
        self.in_features, self.out_features = k, n
        self.register_buffer("weight", linear.weight.detach())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        groups = k // group_size if group_size else 1
        dev = linear.weight.device
        self.clip_logit = nn.Parameter(torch.full((n, groups), CLIP_INIT_LOGIT, dtype=torch.float32, device=dev))
        self.log_smooth = (nn.Parameter(torch.zeros(k, dtype=torch.float32, device=dev))
                           if self.act_quantized else None)
        self.quantize = True  # False: plain Linear (the full-precision reference)
        self.rtn = False  # True: round-to-nearest (smoothing 1, clipping 1), the baseline calibration must beat

    # -------------------------------------------------------------------------- learned values

    @property
    def smooth(self) -> torch.Tensor | None:
        return None if self.log_smooth is None else self.log_smooth.exp()

    @property
    def clip(self) -> torch.Tensor:
        return torch.sigmoid(self.clip_logit)

    def exported(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(smooth [K] or None, clip [N] or [N, G]) float32 on the CPU, as ``quantize_weight`` takes them."""
        smooth = None if self.smooth is None else self.smooth.detach().float().cpu()
        clip = self.clip.detach().float().cpu()
        return smooth, (clip[:, 0].contiguous() if clip.shape[1] == 1 else clip.contiguous())

    def load_learned(self, smooth: torch.Tensor | None, clip: torch.Tensor) -> None:
        with torch.no_grad():
            if self.log_smooth is not None and smooth is not None:
                self.log_smooth.copy_(smooth.to(self.log_smooth).log())
            c = clip.reshape(self.clip_logit.shape).to(self.clip_logit).clamp(1e-6, 1 - 1e-6)
            self.clip_logit.copy_(torch.log(c) - torch.log1p(-c))

    def init_smoothquant(self, act_absmax: torch.Tensor, alpha: float = SMOOTH_ALPHA) -> None:
        """SmoothQuant initialisation ``s_j = max|W_j|^(1-a) / max|X_j|^a`` (our ``s`` multiplies the
        activations), normalised to geometric mean 1 so that the weight range stays put."""
        if self.log_smooth is None:
            return
        w = self.weight.float().abs().amax(dim=0).clamp_min(1e-5)
        a = act_absmax.to(w).clamp_min(1e-5)
        log_s = (1 - alpha) * w.log() - alpha * a.log()
        with torch.no_grad():
            self.log_smooth.copy_(log_s - log_s.mean())

    def reset_identity(self) -> None:
        with torch.no_grad():
            if self.log_smooth is not None:
                self.log_smooth.zero_()
            self.clip_logit.fill_(CLIP_INIT_LOGIT)

    # -------------------------------------------------------------------------- forward

    def quantized_weight(self) -> torch.Tensor:
        """Dequantized ``H(W / s)`` in float32, in the rotated basis (activations are rotated too)."""
        w = self.weight.float()
        s = None if self.rtn else self.smooth
        if s is not None:
            w = w / s[None, :]
        if self.rotate:
            w = block_hadamard(w)
        n, k = w.shape
        g = self.group_size or k
        grouped = w.reshape(n, k // g, g)
        amax = grouped.abs().amax(dim=-1, keepdim=True).detach()
        if not self.rtn:
            amax = amax * self.clip[..., None]
        return fake_quant_rows(grouped, (1 << (self.wbits - 1)) - 1, amax).reshape(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize:
            return nn.functional.linear(x, self.weight, self.bias)
        dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
        w = self.quantized_weight().to(dtype)
        if self.act_quantized:
            smooth = torch.ones_like(self.log_smooth) if self.rtn else self.smooth
            xq = ActFakeQuant.apply(x.to(dtype), smooth, self.rotate, qmax(self.abits))
        else:
            xq = x.to(dtype)
        out = nn.functional.linear(xq, w)
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        return out.to(x.dtype)


class ActFakeQuant(torch.autograd.Function):
    """``fq(H(x * s))``, per-token symmetric with a dynamic absmax range, straight-through backward.

    Written out because autograd would keep three float32 copies of every Linear input (at 14k tokens
    an MLP input is 700 MB each); this keeps only ``x`` and ``s``. The range is the row's own absmax,
    so no value is clipped and the straight-through gradient is the identity on ``H(x * s)``; ``H``
    (orthonormal, symmetric blocks) maps it back.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, smooth: torch.Tensor, rotate: bool, qm: int) -> torch.Tensor:
        ctx.save_for_backward(x, smooth)
        ctx.rotate = rotate
        y = (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x) * smooth
        if rotate:
            y = block_hadamard(y)
        scale = y.abs().amax(dim=-1, keepdim=True).clamp_min(ACT_AMAX_FLOOR) / qm
        return (torch.round(y / scale).clamp_(-qm, qm) * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, smooth = ctx.saved_tensors
        g = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad
        if ctx.rotate:
            g = block_hadamard(g)
        grad_x = (g * smooth).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_s = (g * x.to(g.dtype)).reshape(-1, x.shape[-1]).sum(0).to(smooth.dtype) \
            if ctx.needs_input_grad[1] else None
        return grad_x, grad_s, None, None


def wrap_linears(module: nn.Module, kinds: dict[str, tuple[str, int, bool]]) -> dict[str, FakeQuantLinear]:
    """Replace, in place, the ``nn.Linear`` children named in ``kinds`` ({name: (kind, group, rotate)},
    names relative to ``module``) by FakeQuantLinears; returns them by name."""
    out = {}
    for name, (kind, group_size, rotate) in kinds.items():
        linear = module.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear")
        fq = FakeQuantLinear(linear, kind, group_size=group_size, rotate=rotate)
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, fq)
        out[name] = fq
    return out
