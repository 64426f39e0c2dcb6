"""Weight-only INT4 GEMM for the Linears that see one vector (modulation) or a few text
tokens (the text refiner) per sample: memory-bound on the weight, so only the weight is
quantized. Same packing as :mod:`.int4`; the codes convert exactly to the activation dtype
and the scales are applied in FP32."""

from __future__ import annotations

import torch

from ._checks import check_weight_scale, expand_group_scale
from ._triton import HAS_TRITON, interpreting, tl, triton
from .int4 import HALF, PACK_TILE, unpack_int4


def _check(x, w_packed, w_scale, bias, group_size):
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"w4a16_gemm: x must be a floating [M, K] tensor, got {x.dtype} {tuple(x.shape)}")
    if w_packed.dtype != torch.int8 or w_packed.dim() != 2 or w_packed.shape[1] * 2 != x.shape[1]:
        raise ValueError(f"w4a16_gemm: packed weight {w_packed.dtype} {tuple(w_packed.shape)} does not match K={x.shape[1]}")
    if x.shape[1] % PACK_TILE:
        raise ValueError(f"w4a16_gemm: K={x.shape[1]} must be a multiple of {PACK_TILE}")
    n = w_packed.shape[0]
    check_weight_scale("w4a16_gemm", w_scale, n, x.shape[1], group_size)
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"w4a16_gemm: bias has shape {tuple(bias.shape)}, expected ({n},)")
    return x.shape[0], n, x.shape[1]


def w4a16_gemm_reference(x, w_packed, w_scale, bias=None, group_size=0):
    """out = x @ (unpack_int4(w_packed) * w_scale).T + bias, in x's dtype."""
    m, n, k = _check(x, w_packed, w_scale, bias, group_size)
    w = unpack_int4(w_packed).to(torch.float64) * expand_group_scale(w_scale, k, group_size)
    out = x.to(torch.float64) @ w.T
    if bias is not None:
        out = out + bias.to(torch.float64)
    return out.to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _w4a16_kernel(x_ptr, w_ptr, ws_ptr, b_ptr, o_ptr, M, N, K, stride_xm, stride_wn, stride_om, stride_wsn,
                      GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      HALF_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_m = (pid_m * BM + tl.arange(0, BM)) % M
        offs_n = (pid_n * BN + tl.arange(0, BN)) % N
        offs_j = tl.arange(0, HALF_K)
        w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_j[:, None]
        x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_j[None, :]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kt in range(0, K // (2 * HALF_K)):
            packed = tl.load(w_ptrs)
            w_lo = ((packed << 4) >> 4).to(x_ptr.dtype.element_ty)
            w_hi = (packed >> 4).to(x_ptr.dtype.element_ty)
            x_lo = tl.load(x_ptrs)
            x_hi = tl.load(x_ptrs + HALF_K)
            part = tl.dot(x_lo, w_lo)
            part = tl.dot(x_hi, w_hi, part)
            if GROUPED:
                gs = tl.load(ws_ptr + offs_n * stride_wsn + kt).to(tl.float32)
                acc += part * gs[None, :]
            else:
                acc += part
            w_ptrs += HALF_K
            x_ptrs += 2 * HALF_K
        if not GROUPED:
            acc = acc * tl.load(ws_ptr + offs_n)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n).to(tl.float32)[None, :]
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        o_ptrs = o_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
        tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def w4a16_gemm_triton(x, w_packed, w_scale, bias=None, group_size=0):
    """Triton kernel, same contract as :func:`w4a16_gemm_reference`."""
    m, n, k = _check(x, w_packed, w_scale, bias, group_size)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    x, w_packed, w_scale = x.contiguous(), w_packed.contiguous(), w_scale.contiguous()
    bm = 16 if m <= 16 else (32 if interpreting() else 64)
    bn = 32 if interpreting() else 64
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    _w4a16_kernel[grid](
        x, w_packed, w_scale, bias if bias is not None else w_scale, out, m, n, k,
        x.stride(0), w_packed.stride(0), out.stride(0), w_scale.stride(0) if group_size else 0,
        GROUPED=group_size != 0, HAS_BIAS=bias is not None, BM=bm, BN=bn, HALF_K=HALF,
        num_warps=4, num_stages=1 if interpreting() else 3,
    )
    return out
