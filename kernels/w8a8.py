"""W8A8 GEMM: INT8 activations x INT8 weights on the integer tensor cores, INT32 accumulation,
per-token and per-channel scales, bias and the output cast fused in the epilogue.
Also serves W6A6 (6-bit codes stored in int8)."""

from __future__ import annotations

import torch

from ._checks import check_scaled_gemm
from ._triton import HAS_TRITON, has_tma, interpreting, tl, triton

if HAS_TRITON:
    from ._triton import grouped_tile


def w8a8_gemm_reference(x_q, x_scale, w_q, w_scale, bias=None, out_dtype=torch.bfloat16):
    """out[m, n] = (sum_k x_q[m, k] w_q[n, k]) * x_scale[m] * w_scale[n] + bias[n]."""
    check_scaled_gemm("w8a8_gemm", x_q, x_scale, w_q, w_scale, bias, packed=False, group_size=0)
    acc = x_q.to(torch.float64) @ w_q.to(torch.float64).T  # exact: |sum| < 2**53
    out = acc * x_scale.to(torch.float64)[:, None] * w_scale.to(torch.float64)[None, :]
    if bias is not None:
        out = out + bias.to(torch.float64)
    return out.to(out_dtype)


if HAS_TRITON:

    @triton.jit
    def _w8a8_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, o_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                     HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     GROUP_M: tl.constexpr):
        pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)

        offs_m = (pid_m * BM + tl.arange(0, BM)) % M
        offs_n = (pid_n * BN + tl.arange(0, BN)) % N
        offs_k = tl.arange(0, BK)
        a_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
        b_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        acc = tl.zeros((BM, BN), dtype=tl.int32)
        for _ in range(0, K, BK):
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            a_ptrs += BK
            b_ptrs += BK

        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        xs = tl.load(xs_ptr + offs_m)
        ws = tl.load(ws_ptr + offs_n)
        out = acc.to(tl.float32) * xs[:, None] * ws[None, :]
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n).to(tl.float32)[None, :]
        o_ptrs = o_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


    @triton.jit
    def _w8a8_tma_kernel(x_desc, w_desc, xs_ptr, ws_ptr, b_ptr, o_ptr, M, N, K, stride_om,
                         HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         GROUP_M: tl.constexpr):
        pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
        acc = tl.zeros((BM, BN), dtype=tl.int32)
        for k in range(0, K, BK):
            a = x_desc.load([pid_m * BM, k])
            b = w_desc.load([pid_n * BN, k])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
        ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
        out = acc.to(tl.float32) * xs[:, None] * ws[None, :]
        if HAS_BIAS:
            out += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        o_ptrs = o_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


# (impl, BM, BN, BK, GROUP_M, num_warps, num_stages); impl "ptr" loads through pointers,
# "tma" through Hopper's tensor-memory accelerator. Tuned on the H100 by benchmarks/bench_linear.py.
W8A8_CONFIG = ("tma", 128, 256, 128, 8, 8, 4)
W8A8_CONFIG_LARGE_K = ("tma", 256, 128, 128, 8, 8, 3)  # K >= 8192: the MLP-out and single-block out layers
W8A8_CONFIG_NO_TMA = ("ptr", 128, 256, 128, 8, 8, 3)  # GPUs before Hopper
_INTERPRET_CONFIG = ("ptr", 32, 32, 128, 4, 4, 1)


def w8a8_gemm_triton(x_q, x_scale, w_q, w_scale, bias=None, out_dtype=torch.bfloat16, config=None):
    """Triton kernel, same contract as :func:`w8a8_gemm_reference`."""
    m, n, k = check_scaled_gemm("w8a8_gemm", x_q, x_scale, w_q, w_scale, bias, packed=False, group_size=0)
    out = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    if m == 0:
        return out
    if config is None:
        if interpreting():
            config = _INTERPRET_CONFIG
        elif not has_tma(x_q.device):
            config = W8A8_CONFIG_NO_TMA
        else:
            config = W8A8_CONFIG_LARGE_K if k >= 8192 else W8A8_CONFIG
    impl, bm, bn, bk, gm, warps, stages = config
    x_q, w_q = x_q.contiguous(), w_q.contiguous()
    b = bias if bias is not None else w_scale
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    meta = dict(HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk, GROUP_M=gm, num_warps=warps, num_stages=stages)
    if impl == "tma":
        from triton.tools.tensor_descriptor import TensorDescriptor

        x_desc = TensorDescriptor.from_tensor(x_q, [bm, bk])
        w_desc = TensorDescriptor.from_tensor(w_q, [bn, bk])
        _w8a8_tma_kernel[grid](x_desc, w_desc, x_scale, w_scale, b, out, m, n, k, out.stride(0), **meta)
    else:
        _w8a8_kernel[grid](x_q, x_scale, w_q, w_scale, b, out, m, n, k, x_q.stride(0), w_q.stride(0),
                           out.stride(0), **meta)
    return out
