"""Round-to-nearest weight quantization with smoothing, rotation and clipping folded in.

Calibration (MSAD) learns the smoothing vector and the clipping factors; round-to-nearest
uses smoothing 1 and clipping 1. Either way the result is the same tensors: integer codes
(INT4 packed, or INT8 holding 6/8-bit codes), scales, and the smoothing vector that the
activation kernel applies online.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...kernels import block_hadamard, pack_int4, unpack_int4
from ...kernels.rounding import round_half_even
from .config import BIT_SCHEMES, WEIGHT_ONLY_SCHEME, qmax

SCALE_FLOOR = 1e-10
KINDS = (*BIT_SCHEMES, WEIGHT_ONLY_SCHEME)


def kind_bits(kind: str) -> tuple[int, int]:
    """(weight bits, activation bits) of a layer kind; activation bits 16 = not quantized."""
    if kind == WEIGHT_ONLY_SCHEME:
        return 4, 16
    if kind not in BIT_SCHEMES:
        raise ValueError(f"unknown layer kind {kind!r}; expected one of {list(KINDS)}")
    return BIT_SCHEMES[kind]


def is_packed(kind: str) -> bool:
    return kind_bits(kind)[0] == 4


@dataclass
class QuantizedWeight:
    kind: str
    weight: torch.Tensor  # int8: packed [N, K/2] for 4-bit, codes [N, K] otherwise
    scale: torch.Tensor  # float32 [N], or float16 [N, K/128] when grouped
    smooth: torch.Tensor | None  # float32 [K] for activation-quantized kinds
    group_size: int
    rotate: bool

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1] * (2 if is_packed(self.kind) else 1)


def transform_weight(w: torch.Tensor, smooth: torch.Tensor | None, rotate: bool) -> torch.Tensor:
    """Fold the inverse of the activation transform into W: W' = H(W / smooth), in float64."""
    wf = w.to(torch.float64)
    if smooth is not None:
        wf = wf / smooth.to(torch.float64)[None, :]
    if rotate:
        wf = block_hadamard(wf)
    return wf


def quantize_weight(w: torch.Tensor, kind: str, *, group_size: int = 0, smooth: torch.Tensor | None = None,
                    clip: torch.Tensor | None = None, rotate: bool = True) -> QuantizedWeight:
    """Quantize a Linear weight [N, K] symmetrically.

    ``smooth`` [K] (>0) and ``rotate`` apply to activation-quantized kinds only; ``clip`` in
    (0, 1] scales each output channel's (or group's) range, [N] or [N, K/group].
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_weight expects [N, K], got {tuple(w.shape)}")
    wbits, abits = kind_bits(kind)
    n, k = w.shape
    act_quantized = abits < 16
    if not act_quantized:
        smooth, rotate = None, False
    elif smooth is None:
        smooth = torch.ones(k, dtype=torch.float32)
    if smooth is not None and (smooth.shape != (k,) or bool((smooth <= 0).any())):
        raise ValueError(f"smoothing vector must be positive with shape ({k},)")
    if group_size and wbits != 4:
        raise ValueError("grouped scales are only supported for 4-bit weights")
    wf = transform_weight(w, smooth, rotate)
    g = group_size or k
    grouped = wf.reshape(n, k // g, g)
    amax = grouped.abs().amax(dim=-1)
    if clip is not None:
        amax = amax * clip.to(torch.float64).reshape(n, -1)
    qm = qmax(wbits)
    # Round the scale to its storage dtype first, so that the codes are chosen for the scale the
    # kernels will multiply by (FP16 group scales would otherwise add up to |code| * 2**-11 of a step).
    scale_t = (amax / qm).clamp_min(SCALE_FLOOR).to(torch.float16 if group_size else torch.float32)
    scale = scale_t.to(torch.float64)
    codes = round_half_even(grouped / scale[..., None]).clamp(-qm, qm).to(torch.int8).reshape(n, k)
    packed = pack_int4(codes) if wbits == 4 else codes
    if not group_size:
        scale_t = scale_t.reshape(n)
    return QuantizedWeight(kind, packed.contiguous(), scale_t.contiguous(),
                           None if smooth is None else smooth.to(torch.float32).contiguous(), group_size, rotate)


def dequantize_weight(qw: QuantizedWeight) -> torch.Tensor:
    """The float64 weight the kernels effectively multiply by, in the rotated/smoothed basis."""
    codes = unpack_int4(qw.weight) if is_packed(qw.kind) else qw.weight
    n, k = codes.shape
    g = qw.group_size or k
    s = qw.scale.to(torch.float64).reshape(n, k // g, 1)
    return (codes.to(torch.float64).reshape(n, k // g, g) * s).reshape(n, k)


def effective_weight(qw: QuantizedWeight) -> torch.Tensor:
    """The dequantized weight mapped back to the original basis (for error measurements)."""
    w = dequantize_weight(qw)
    if qw.rotate:
        w = block_hadamard(w)  # the normalized Sylvester matrix is its own inverse
    if qw.smooth is not None:
        w = w * qw.smooth.to(torch.float64)[None, :]
    return w
