"""Per-token symmetric activation quantization with smoothing and block-Hadamard rotation fused.

``q, scale = act_quant(x, smooth, qmax, rotate)`` computes, per row of ``x`` [M, K]:
``y = H128(x * smooth)``; ``scale = max|y| / qmax``; ``q = round(y * qmax / max|y|)`` as int8
(round to nearest, ties to even).
The Triton kernel keeps whole rows in registers: one read of ``x``, one write of ``q``
and ``scale``. The rotation runs on the tensor cores in FP16 after dividing each 128-chunk
by its own maximum (so FP16 cannot overflow; entries of H are exactly +-1).
"""

from __future__ import annotations

import functools
import math

import torch

from ._triton import HAS_TRITON, has_tma, interpreting, next_pow2, tl, triton
from .hadamard import BLOCK, block_hadamard, hadamard_matrix
from .rounding import RINT_MAGIC, round_half_even

AMAX_FLOOR = 1e-8  # an all-zero row gets scale AMAX_FLOOR / qmax and codes 0


def _check(x: torch.Tensor, smooth, qmax: int, rotate: bool) -> None:
    if x.dim() != 2:
        raise ValueError(f"act_quant expects [M, K] activations, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"act_quant expects floating-point activations, got {x.dtype}")
    if rotate and x.shape[1] % BLOCK:
        raise ValueError(f"act_quant: K={x.shape[1]} must be a multiple of {BLOCK} to rotate")
    if smooth is not None and smooth.shape != (x.shape[1],):
        raise ValueError(f"act_quant: smooth has shape {tuple(smooth.shape)}, expected ({x.shape[1]},)")
    if not 1 <= qmax <= 127:
        raise ValueError(f"act_quant: qmax={qmax} must lie in [1, 127]")


def act_quant_reference(x: torch.Tensor, smooth: torch.Tensor | None = None, qmax: int = 127,
                        rotate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager reference: returns int8 codes [M, K] and float32 scales [M]."""
    _check(x, smooth, qmax, rotate)
    y = x.to(torch.float64)
    if smooth is not None:
        y = y * smooth.to(torch.float64)
    if rotate:
        y = block_hadamard(y)
    amax = y.abs().amax(dim=1).clamp_min(AMAX_FLOOR)
    scale = (amax / qmax).to(torch.float32)
    q = round_half_even(y * (qmax / amax)[:, None]).clamp(-qmax, qmax)
    return q.to(torch.int8), scale


if HAS_TRITON:

    @triton.jit
    def _rotate_prescaled(x, h, AMAX_MIN: tl.constexpr, INV_SQRT_HB: tl.constexpr):
        """x [R, HB] (FP32) times the +-1 Hadamard in FP16, each chunk first divided by its own
        maximum so that FP16 cannot overflow, then scaled back and normalized."""
        cmax = tl.maximum(tl.max(tl.abs(x), axis=1), AMAX_MIN)
        y = tl.dot((x * (1.0 / cmax)[:, None]).to(tl.float16), h, out_dtype=tl.float32)
        return y * (cmax * INV_SQRT_HB)[:, None]

    @triton.jit
    def _quantize_rows(y, BM: tl.constexpr, NB: tl.constexpr, QMAX: tl.constexpr, AMAX_MIN: tl.constexpr,
                       RINT: tl.constexpr):
        """Symmetric INT8 codes of y [BM * NB, HB], whose chunk r is block r % NB of row r // NB, with one
        scale per row: returns (codes as int8, row maxima)."""
        R: tl.constexpr = BM * NB
        chunk_amax = tl.max(tl.abs(y), axis=1)
        row_amax = tl.maximum(tl.max(tl.reshape(chunk_amax, (BM, NB)), axis=1), AMAX_MIN)
        chunk_inv = tl.reshape(tl.broadcast_to((QMAX / row_amax)[:, None], (BM, NB)), (R,))
        v = y * chunk_inv[:, None]
        v = (v + RINT) - RINT  # round to nearest even
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
        return v.to(tl.int8), row_amax

    @triton.jit
    def _chunks(h_ptr, smooth_ptr, K, NB: tl.constexpr, HB: tl.constexpr, R: tl.constexpr, ROTATE: tl.constexpr,
                HAS_SMOOTH: tl.constexpr):
        """A tile of whole rows as R chunks of HB channels (chunk r is block r % NB of row r // NB): the chunk
        and column indices, which chunks lie inside K, the Hadamard matrix and the smoothing (0 when off)."""
        r = tl.arange(0, R)
        col = tl.arange(0, HB)
        kcol = (r % NB) * HB
        col_ok = kcol < K
        h = 0.0
        s = 0.0
        if ROTATE:
            h = tl.load(h_ptr + col[:, None] * HB + col[None, :])
        if HAS_SMOOTH:
            s = tl.load(smooth_ptr + kcol[:, None] + col[None, :], mask=col_ok[:, None], other=0.0)
        return r, col, kcol, col_ok, h, s

    @triton.jit
    def _act_quant_kernel(x_ptr, smooth_ptr, h_ptr, q_ptr, scale_ptr, M, K, stride_xm, stride_qm,
                          BM: tl.constexpr, NB: tl.constexpr, HB: tl.constexpr, QMAX: tl.constexpr,
                          HAS_SMOOTH: tl.constexpr, ROTATE: tl.constexpr, INV_SQRT_HB: tl.constexpr,
                          AMAX_MIN: tl.constexpr, RINT: tl.constexpr, STAGES: tl.constexpr):
        # Persistent: a program loads H (and the smoothing vector) once, then walks tiles of BM whole
        # rows. A tile is seen as R = BM * NB chunks of HB channels (chunk r is block r % NB of row
        # r // NB), so the rotation is one [R, HB] x [HB, HB] tensor-core product.
        R: tl.constexpr = BM * NB
        r, col, kcol, col_ok, h, s = _chunks(h_ptr, smooth_ptr, K, NB, HB, R, ROTATE, HAS_SMOOTH)
        num_tiles = tl.cdiv(M, BM)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), num_stages=STAGES):
            row = tile * BM + r // NB
            mask = ((row < M) & col_ok)[:, None]
            x_offs = row.to(tl.int64)[:, None] * stride_xm + kcol[:, None] + col[None, :]
            x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SMOOTH:
                x = x * s
            if ROTATE:
                y = _rotate_prescaled(x, h, AMAX_MIN, INV_SQRT_HB)
            else:
                y = x
            v, row_amax = _quantize_rows(y, BM, NB, QMAX, AMAX_MIN, RINT)
            q_offs = row.to(tl.int64)[:, None] * stride_qm + kcol[:, None] + col[None, :]
            tl.store(q_ptr + q_offs, v, mask=mask)
            rows = tile * BM + tl.arange(0, BM)
            tl.store(scale_ptr + rows, row_amax / QMAX, mask=rows < M)

    @triton.jit
    def _act_quant_tma_kernel(x_desc, q_desc, smooth_ptr, h_ptr, scale_ptr, M, K,
                              BM: tl.constexpr, NB: tl.constexpr, HB: tl.constexpr, QMAX: tl.constexpr,
                              HAS_SMOOTH: tl.constexpr, ROTATE: tl.constexpr, INV_SQRT_HB: tl.constexpr,
                              AMAX_MIN: tl.constexpr, RINT: tl.constexpr, STAGES: tl.constexpr,
                              DIRECT: tl.constexpr):
        # Same computation as _act_quant_kernel, with x and q seen as [M, K / HB, HB] and moved by
        # the tensor-memory accelerator in [BM, NB, HB] boxes: no per-element pointers in registers,
        # and chunks past K or M are zero-filled on load and dropped on store by the hardware.
        R: tl.constexpr = BM * NB
        col = tl.arange(0, HB)
        blk = tl.arange(0, NB)
        if ROTATE:
            h = tl.load(h_ptr + col[:, None] * HB + col[None, :])
        if HAS_SMOOTH:
            s = tl.load(smooth_ptr + (blk * HB)[:, None] + col[None, :], mask=(blk * HB < K)[:, None], other=0.0)
        num_tiles = tl.cdiv(M, BM)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), num_stages=STAGES):
            x3 = x_desc.load([tile * BM, 0, 0])
            if ROTATE and DIRECT:
                # No smoothing: x goes from the TMA buffer to the tensor cores as it is (BF16 or FP16
                # times +-1 is exact, the sum is FP32), never through an FP32 copy in registers.
                y = tl.dot(tl.reshape(x3, (R, HB)), h.to(x3.dtype), out_dtype=tl.float32) * INV_SQRT_HB
            else:
                x3 = x3.to(tl.float32)
                if HAS_SMOOTH:
                    x3 = x3 * s[None, :, :]
                x = tl.reshape(x3, (R, HB))
                if ROTATE:
                    y = _rotate_prescaled(x, h, AMAX_MIN, INV_SQRT_HB)
                else:
                    y = x
            v, row_amax = _quantize_rows(y, BM, NB, QMAX, AMAX_MIN, RINT)
            q_desc.store([tile * BM, 0, 0], tl.reshape(v, (BM, NB, HB)))
            rows = tile * BM + tl.arange(0, BM)
            tl.store(scale_ptr + rows, row_amax / QMAX, mask=rows < M)

def default_config(nb: int, tma: bool = True) -> tuple:
    """(impl, chunks of 128 channels per tile, warps, programs per SM, pipeline stages), from the
    H100 sweep of benchmarks/bench_linear.py; pointer loads on GPUs without TMA (before Hopper)."""
    if not tma:
        return ("ptr", 32, 4, 8, 2) if nb <= 32 else ("ptr", 128, 8, 2, 2)
    return ("tma", 128, 8, 2, 2) if nb <= 32 else ("tma", 64, 4, 4, 3)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def act_quant_triton(x: torch.Tensor, smooth: torch.Tensor | None = None, qmax: int = 127,
                     rotate: bool = True, config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton kernel, same contract as :func:`act_quant_reference`."""
    _check(x, smooth, qmax, rotate)
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    nb = next_pow2(triton.cdiv(k, BLOCK))
    impl, chunks, warps, per_sm, stages = config or (
        ("ptr", 16, 4, 1, 1) if interpreting() else default_config(nb, has_tma(x.device)))
    bm = max(1, chunks // nb)
    if bm * nb < 16:  # the tensor-core product needs at least 16 rows
        bm = 16 // nb
    h = hadamard_matrix(BLOCK, dtype=torch.float16, device=x.device, normalized=False) if rotate else x
    sm = smooth.to(device=x.device, dtype=torch.float32).contiguous() if smooth is not None else x
    tiles = triton.cdiv(m, bm)
    programs = min(tiles, 3 if x.device.type != "cuda" else per_sm * _sm_count(x.device.index or 0))
    meta = dict(BM=bm, NB=nb, HB=BLOCK, QMAX=qmax, HAS_SMOOTH=smooth is not None, ROTATE=rotate,
                INV_SQRT_HB=1.0 / math.sqrt(BLOCK), AMAX_MIN=AMAX_FLOOR, RINT=RINT_MAGIC, STAGES=stages,
                num_warps=warps)
    if impl == "tma":
        from triton.tools.tensor_descriptor import TensorDescriptor

        kb = k // BLOCK
        x_desc = TensorDescriptor(x, [m, kb, BLOCK], [x.stride(0), BLOCK, 1], [bm, nb, BLOCK])
        q_desc = TensorDescriptor(q, [m, kb, BLOCK], [q.stride(0), BLOCK, 1], [bm, nb, BLOCK])
        direct = smooth is None and x.dtype in (torch.float16, torch.bfloat16)  # FP32 would run as TF32
        _act_quant_tma_kernel[(programs,)](x_desc, q_desc, sm, h, scale, m, k, DIRECT=direct, **meta)
    else:
        _act_quant_kernel[(programs,)](x, sm, h, q, scale, m, k, x.stride(0), q.stride(0), **meta)
    return q, scale
