"""Activation quantization fused with the elementwise work that precedes a Linear in a DiT block.

Two prologues in front of :mod:`.act_quant` (smoothing, block-Hadamard rotation, per-row INT8), so that
the block's intermediate activations are read once and never written in 16-bit:

- ``act_quant_ln_mod(x, shift, scale, ...)``: ``y = LayerNorm(x) * (1 + scale) + shift`` (no affine,
  eps), the adaLN modulation of HunyuanVideo / Flux blocks before qkv, fc1 and linear1. ``shift`` and
  ``scale`` are ``[B, K]`` (one row per batch item), row r of ``x`` [M, K] belonging to batch item
  ``r // rows_per_batch``.
- ``act_quant_gelu_cat(a, b, ...)``: ``y = [a | gelu_tanh(b)]``, the single blocks' linear2 input
  (attention output beside the activated MLP half of linear1) without the cat, and with ``a`` of width
  0 the double blocks' fc2 input.

The arithmetic is float32 throughout (ComfyUI rounds to BF16 after the norm, the modulation, the GELU
and the cat); the references below state it exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, interpreting, next_pow2, tl, triton
from .act_quant import AMAX_FLOOR, act_quant_reference
from .hadamard import BLOCK, hadamard_matrix
from .rounding import RINT_MAGIC

if HAS_TRITON:
    from .act_quant import _chunks, _quantize_rows, _rotate_prescaled

GELU_C = math.sqrt(2.0 / math.pi)


def _check_rows(name, x, k_total):
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name}: expected floating-point [M, K] activations, got {x.dtype} {tuple(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got strides {x.stride()}")
    if k_total % BLOCK:
        raise ValueError(f"{name}: K={k_total} must be a multiple of {BLOCK}")


def _check_ln_mod(x, shift, scale, rows_per_batch):
    _check_rows("act_quant_ln_mod", x, x.shape[1])
    if not isinstance(rows_per_batch, int) or rows_per_batch < 1 or x.shape[0] % rows_per_batch:
        raise ValueError(f"act_quant_ln_mod: rows_per_batch={rows_per_batch!r} must divide M={x.shape[0]}")
    nb = x.shape[0] // rows_per_batch
    for t, n in ((shift, "shift"), (scale, "scale")):
        if t.dim() != 2 or tuple(t.shape) != (nb, x.shape[1]) or t.stride(-1) != 1:
            raise ValueError(f"act_quant_ln_mod: {n} must be [B, K] = [{nb}, {x.shape[1]}] with a contiguous last "
                             f"dimension, got {tuple(t.shape)} strides {t.stride()}")
    if nb > 1 and shift.stride(0) != scale.stride(0):
        raise ValueError("act_quant_ln_mod: shift and scale must share their row stride (chunks of one modulation "
                         f"output), got {shift.stride(0)} and {scale.stride(0)}")


def ln_mod(x, shift, scale, rows_per_batch, eps):
    """float64 ``LayerNorm(x) * (1 + scale) + shift`` of the reference."""
    y = F.layer_norm(x.double(), (x.shape[1],), eps=eps)
    rep = lambda t: t.double().repeat_interleave(rows_per_batch, 0)  # noqa: E731
    return y * (1 + rep(scale)) + rep(shift)


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(GELU_C * (x + 0.044715 * x ** 3)))


def act_quant_ln_mod_reference(x, shift, scale, smooth=None, qmax=127, rotate=True, *, rows_per_batch, eps=1e-6):
    _check_ln_mod(x, shift, scale, rows_per_batch)
    return act_quant_reference(ln_mod(x, shift, scale, rows_per_batch, eps), smooth, qmax, rotate)


def act_quant_gelu_cat_reference(a, b, smooth=None, qmax=127, rotate=True):
    _check_rows("act_quant_gelu_cat", b, a.shape[1] + b.shape[1])
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"act_quant_gelu_cat: a and b have {a.shape[0]} and {b.shape[0]} rows")
    return act_quant_reference(torch.cat([a.double(), gelu_tanh(b.double())], 1), smooth, qmax, rotate)


if HAS_TRITON:

    @triton.jit
    def _act_quant_fused_kernel(a_ptr, b_ptr, sh_ptr, sc_ptr, smooth_ptr, h_ptr, q_ptr, scale_ptr, M, K, KA,
                                stride_a, stride_b, stride_mod, stride_qm, rows_per_batch, eps,
                                BM: tl.constexpr, NB: tl.constexpr, HB: tl.constexpr, QMAX: tl.constexpr,
                                PROLOGUE: tl.constexpr, HAS_SMOOTH: tl.constexpr, ROTATE: tl.constexpr,
                                INV_SQRT_HB: tl.constexpr, AMAX_MIN: tl.constexpr, RINT: tl.constexpr,
                                GC: tl.constexpr):
        # As _act_quant_kernel (persistent, a tile of BM whole rows seen as R = BM * NB chunks of HB
        # channels). PROLOGUE 1: LayerNorm + modulation of a; 2: [a | gelu(b)], a's first KA channels.
        R: tl.constexpr = BM * NB
        r, col, kcol, col_ok, h, s = _chunks(h_ptr, smooth_ptr, K, NB, HB, R, ROTATE, HAS_SMOOTH)
        num_tiles = tl.cdiv(M, BM)
        for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            row = tile * BM + r // NB
            ok = ((row < M) & col_ok)[:, None]
            row64 = row.to(tl.int64)
            if PROLOGUE == 1:
                x = tl.load(a_ptr + row64[:, None] * stride_a + kcol[:, None] + col[None, :], mask=ok,
                            other=0.0).to(tl.float32)
                mean = tl.sum(tl.reshape(tl.sum(x, 1), (BM, NB)), 1) / K
                mean_r = tl.reshape(tl.broadcast_to(mean[:, None], (BM, NB)), (R,))
                d = tl.where(ok, x - mean_r[:, None], 0.0)
                var = tl.sum(tl.reshape(tl.sum(d * d, 1), (BM, NB)), 1) / K
                rstd_r = tl.reshape(tl.broadcast_to((1.0 / tl.sqrt(var + eps))[:, None], (BM, NB)), (R,))
                mod = (row // rows_per_batch).to(tl.int64)[:, None] * stride_mod + kcol[:, None] + col[None, :]
                sh = tl.load(sh_ptr + mod, mask=ok, other=0.0).to(tl.float32)
                sc = tl.load(sc_ptr + mod, mask=ok, other=0.0).to(tl.float32)
                x = tl.where(ok, d * rstd_r[:, None] * (1.0 + sc) + sh, 0.0)
            else:
                in_a = (kcol < KA)[:, None]
                xa = tl.load(a_ptr + row64[:, None] * stride_a + kcol[:, None] + col[None, :], mask=ok & in_a,
                             other=0.0).to(tl.float32)
                xb = tl.load(b_ptr + row64[:, None] * stride_b + (kcol - KA)[:, None] + col[None, :],
                             mask=ok & (kcol >= KA)[:, None], other=0.0).to(tl.float32)
                t = GC * (xb + 0.044715 * xb * xb * xb)
                xb = 0.5 * xb * (1.0 + (2.0 * tl.sigmoid(2.0 * t) - 1.0))  # tanh(t) = 2 sigmoid(2t) - 1
                x = tl.where(in_a, xa, xb)
            if HAS_SMOOTH:
                x = x * s
            if ROTATE:
                y = _rotate_prescaled(x, h, AMAX_MIN, INV_SQRT_HB)
            else:
                y = x
            v, row_amax = _quantize_rows(y, BM, NB, QMAX, AMAX_MIN, RINT)
            tl.store(q_ptr + row64[:, None] * stride_qm + kcol[:, None] + col[None, :], v, mask=ok)
            rows = tile * BM + tl.arange(0, BM)
            tl.store(scale_ptr + rows, row_amax / QMAX, mask=rows < M)


def default_config(nb: int) -> tuple:
    """(chunks of 128 channels per tile, warps, programs per SM); small under the interpreter. Not 128
    chunks for rows of up to 32 chunks: the LayerNorm's reductions would need 256 KB of shared memory
    on the H100 (232 KB available)."""
    if interpreting():
        return (16, 4, 1)
    return (64, 4, 4)  # the H100 sweep (act_fused_h100.json): 0.29 ms LayerNorm rows, 1.56 ms GELU + cat rows


def _launch(prologue, a, b, shift, scale, m, k, ka, smooth, qmax, rotate, rows_per_batch, eps, config=None):
    dev = a.device
    q = torch.empty((m, k), dtype=torch.int8, device=dev)
    out_scale = torch.empty((m,), dtype=torch.float32, device=dev)
    if m == 0:
        return q, out_scale
    nb = next_pow2(triton.cdiv(k, BLOCK))
    chunks, warps, per_sm = config or default_config(nb)
    bm = max(1, chunks // nb)
    if bm * nb < 16:  # the tensor-core product needs at least 16 rows
        bm = 16 // nb
    tiles = triton.cdiv(m, bm)
    programs = min(tiles, 3 if dev.type != "cuda" else per_sm * torch.cuda.get_device_properties(dev).multi_processor_count)
    h = hadamard_matrix(BLOCK, dtype=torch.float16, device=dev, normalized=False) if rotate else out_scale
    sm = smooth.to(device=dev, dtype=torch.float32).contiguous() if smooth is not None else out_scale
    _act_quant_fused_kernel[(programs,)](
        a, b if b is not None else a, shift if shift is not None else a, scale if scale is not None else a, sm, h, q,
        out_scale, m, k, ka, a.stride(0), b.stride(0) if b is not None else 0,
        shift.stride(0) if shift is not None else 0, q.stride(0), rows_per_batch, eps,
        BM=bm, NB=nb, HB=BLOCK, QMAX=qmax, PROLOGUE=prologue, HAS_SMOOTH=smooth is not None, ROTATE=rotate,
        INV_SQRT_HB=1.0 / math.sqrt(BLOCK), AMAX_MIN=AMAX_FLOOR, RINT=RINT_MAGIC, GC=GELU_C,
        num_warps=warps, num_stages=1)
    return q, out_scale


def act_quant_ln_mod_triton(x, shift, scale, smooth=None, qmax=127, rotate=True, *, rows_per_batch, eps=1e-6,
                            config=None):
    """Triton kernel, same contract as :func:`act_quant_ln_mod_reference`; ``config`` as :func:`default_config`."""
    _check_ln_mod(x, shift, scale, rows_per_batch)
    return _launch(1, x, None, shift, scale, x.shape[0], x.shape[1], 0, smooth, qmax, rotate, rows_per_batch, eps,
                   config)


def act_quant_gelu_cat_triton(a, b, smooth=None, qmax=127, rotate=True, config=None):
    """Triton kernel, same contract as :func:`act_quant_gelu_cat_reference`; ``config`` as :func:`default_config`."""
    _check_rows("act_quant_gelu_cat", b, a.shape[1] + b.shape[1])
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"act_quant_gelu_cat: a and b have {a.shape[0]} and {b.shape[0]} rows")
    if a.shape[1] and a.stride(-1) != 1:
        raise ValueError("act_quant_gelu_cat: a's last dimension must be contiguous")
    if a.shape[1] % BLOCK:
        raise ValueError(f"act_quant_gelu_cat: a's width {a.shape[1]} must be a multiple of {BLOCK}")
    return _launch(2, a if a.shape[1] else b, b, None, None, b.shape[0], a.shape[1] + b.shape[1], a.shape[1], smooth,
                   qmax, rotate, 1, 0.0, config)
