"""W4A8 GEMM: INT8 activations x packed INT4 weights on the INT8 tensor cores.

The weight is operand A of the tensor-core product, kept in registers: the kernel computes
the output tile transposed, ``out^T[n, m] = W[n, :] . X[m, :]``, so the nibbles unpacked in
registers feed the MMA directly while the activation tile streams through shared memory.
With the packing of :mod:`.int4` each 128-channel tile unpacks into two [BN, 64] operands
by two shifts, and each gets its own dot. One scale per output channel (INT32 accumulation
over all of K), or one per group of 128 (the group partial sums are scaled in FP32).
"""

from __future__ import annotations

import torch

from ._checks import check_scaled_gemm, expand_group_scale
from ._triton import HAS_TRITON, interpreting, tl, triton

if HAS_TRITON:
    from ._triton import grouped_tile
from .int4 import HALF, PACK_TILE, unpack_int4


def w4a8_gemm_reference(x_q, x_scale, w_packed, w_scale, bias=None, out_dtype=torch.bfloat16, group_size=0):
    """out[m, n] = sum_k x_q[m, k] w[n, k] s_w[n, k] * x_scale[m] + bias[n], w = unpack_int4(w_packed)."""
    m, n, k = check_scaled_gemm("w4a8_gemm", x_q, x_scale, w_packed, w_scale, bias, packed=True, group_size=group_size)
    w = unpack_int4(w_packed).to(torch.float64) * expand_group_scale(w_scale, k, group_size)
    out = (x_q.to(torch.float64) @ w.T) * x_scale.to(torch.float64)[:, None]
    if bias is not None:
        out = out + bias.to(torch.float64)
    return out.to(out_dtype)


if HAS_TRITON:

    @triton.jit
    def _w4a8_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, o_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                     stride_wsn, GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, GROUP_M: tl.constexpr, HALF_K: tl.constexpr):
        pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)

        offs_m = (pid_m * BM + tl.arange(0, BM)) % M
        offs_n = (pid_n * BN + tl.arange(0, BN)) % N
        offs_j = tl.arange(0, HALF_K)
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_j[None, :]
        x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + offs_j[:, None]
        acc = tl.zeros((BN, BM), dtype=tl.int32)
        facc = tl.zeros((BN, BM), dtype=tl.float32)
        for kt in range(0, K // (2 * HALF_K)):
            packed = tl.load(w_ptrs)
            w_lo = (packed << 4) >> 4
            w_hi = packed >> 4
            x_lo = tl.load(x_ptrs)
            x_hi = tl.load(x_ptrs + HALF_K)
            if GROUPED:
                part = tl.dot(w_lo, x_lo, out_dtype=tl.int32)
                part = tl.dot(w_hi, x_hi, part, out_dtype=tl.int32)
                gs = tl.load(ws_ptr + offs_n * stride_wsn + kt).to(tl.float32)
                facc += part.to(tl.float32) * gs[:, None]
            else:
                acc = tl.dot(w_lo, x_lo, acc, out_dtype=tl.int32)
                acc = tl.dot(w_hi, x_hi, acc, out_dtype=tl.int32)
            w_ptrs += HALF_K
            x_ptrs += 2 * HALF_K

        xs = tl.load(xs_ptr + offs_m)
        if GROUPED:
            out_t = facc * xs[None, :]
        else:
            ws = tl.load(ws_ptr + offs_n)
            out_t = acc.to(tl.float32) * ws[:, None] * xs[None, :]
        if HAS_BIAS:
            out_t += tl.load(b_ptr + offs_n).to(tl.float32)[:, None]
        out = tl.trans(out_t.to(o_ptr.dtype.element_ty))
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        o_ptrs = o_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
        tl.store(o_ptrs, out, mask=(rm[:, None] < M) & (rn[None, :] < N))


    @triton.jit
    def _unpack_int4_kernel(p_ptr, o_ptr, N, KH, BN: tl.constexpr, HALF_K: tl.constexpr):
        pid_n = tl.program_id(0)
        kt = tl.program_id(1)
        rn = pid_n * BN + tl.arange(0, BN)
        j = tl.arange(0, HALF_K)
        mask = (rn < N)[:, None]
        packed = tl.load(p_ptr + rn.to(tl.int64)[:, None] * KH + kt * HALF_K + j[None, :], mask=mask, other=0)
        base = o_ptr + rn.to(tl.int64)[:, None] * (2 * KH) + kt * 2 * HALF_K + j[None, :]
        tl.store(base, (packed << 4) >> 4, mask=mask)
        tl.store(base + HALF_K, packed >> 4, mask=mask)


# (impl, BM, BN, GROUP_M, num_warps, num_stages); BM is the token tile, BN the weight tile.
# This kernel serves the GPUs without the Gluon kernel (before Hopper) and grouped scales; on
# the H100 the Triton variants (TMA loads, the weight as operand A or B) all stayed at
# 0.5-0.75 POPS, see benchmarks/results/NOTES_linear.md.
W4A8_CONFIG = ("ptr", 256, 128, 8, 8, 3)
_INTERPRET_CONFIG = ("ptr", 32, 32, 4, 4, 1)
# From this many tokens on, a per-channel W4A8 layer unpacks its weight to an INT8 scratch
# buffer (one layer's worth, freed after the call) and runs the W8A8 kernel: Triton 3.6 keeps
# a wgmma or mma whose operand A sits in registers synchronous, which held the in-loop kernel
# near 700 TOPS on the H100 against 1.2 POPS for W8A8, while the unpack costs under 1% of the
# GEMM at this size.
UNPACK_MIN_TOKENS = 2048


def unpack_int4_triton(packed: torch.Tensor) -> torch.Tensor:
    """Triton kernel, same contract as :func:`.int4.unpack_int4` (its reference)."""
    n, kh = packed.shape
    out = torch.empty((n, kh * 2), dtype=torch.int8, device=packed.device)
    bn = 32 if interpreting() else 64
    _unpack_int4_kernel[(triton.cdiv(n, bn), kh // HALF)](packed.contiguous(), out, n, kh, BN=bn, HALF_K=HALF)
    return out


def w4a8_gemm_triton(x_q, x_scale, w_packed, w_scale, bias=None, out_dtype=torch.bfloat16, group_size=0, config=None):
    """Triton kernel, same contract as :func:`w4a8_gemm_reference`."""
    m, n, k = check_scaled_gemm("w4a8_gemm", x_q, x_scale, w_packed, w_scale, bias, packed=True, group_size=group_size)
    out = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    if m == 0:
        return out
    if config is None and group_size == 0 and m >= UNPACK_MIN_TOKENS:
        config = ("unpack",)
    if config is not None and config[0] == "unpack":
        from .w8a8 import w8a8_gemm_triton

        if group_size:
            raise ValueError("w4a8_gemm: the unpack path needs per-channel scales (group_size=0)")
        return w8a8_gemm_triton(x_q, x_scale, unpack_int4_triton(w_packed), w_scale, bias, out_dtype)
    impl, bm, bn, gm, warps, stages = config or (_INTERPRET_CONFIG if interpreting() else W4A8_CONFIG)
    x_q, w_packed = x_q.contiguous(), w_packed.contiguous()
    w_scale = w_scale.contiguous()
    b = bias if bias is not None else x_scale
    wsn = w_scale.stride(0) if group_size else 0
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    meta = dict(GROUPED=group_size != 0, HAS_BIAS=bias is not None, BM=bm, BN=bn, GROUP_M=gm, HALF_K=HALF,
                num_warps=warps, num_stages=stages)
    if impl != "ptr":
        raise ValueError(f"w4a8_gemm_triton: unknown implementation {impl!r} (ptr or unpack)")
    _w4a8_kernel[grid](x_q, x_scale, w_packed, w_scale, b, out, m, n, k, x_q.stride(0), w_packed.stride(0),
                       out.stride(0), wsn, **meta)
    return out


assert PACK_TILE == 2 * HALF
