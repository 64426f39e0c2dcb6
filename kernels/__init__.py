"""Triton kernels, each beside an eager PyTorch reference with the same signature.

The public functions below pick the Triton kernel for CUDA tensors when Triton is present
and the reference otherwise (CPU works, slowly); on Hopper (sm_90) the INT8 GEMMs run the
warp-specialized Gluon kernels. Set QUANTSPARSE_KERNELS=reference to force the references
everywhere (debugging), or =triton to force Triton (tests under TRITON_INTERPRET=1 on the
CPU); QUANTSPARSE_GLUON=0 keeps the plain Triton GEMMs on Hopper.
"""

from __future__ import annotations

import os

import torch

from ._triton import HAS_TRITON
from .act_quant import act_quant_reference, act_quant_triton
from .act_quant_fused import (
    act_quant_gelu_cat_reference, act_quant_gelu_cat_triton, act_quant_ln_mod_reference, act_quant_ln_mod_triton,
)
from .hadamard import block_hadamard, hadamard_matrix
from .int4 import PACK_TILE, pack_int4, unpack_int4
from .qk_norm_rope import qk_norm_rope_reference, qk_norm_rope_triton
from .sparse_attention import block_sparse_attention_reference, block_sparse_attention_triton, merge_attention
from .sparse_attention_fp8 import block_sparse_attention_fp8_reference, block_sparse_attention_fp8_triton
from .svg_probe import svg_probe_reference, svg_probe_triton
from .wan_qk_norm_rope import wan_qk_norm_rope_reference, wan_qk_norm_rope_triton
from .w4a8 import w4a8_gemm_reference, w4a8_gemm_triton
from .w4a16 import w4a16_gemm_reference, w4a16_gemm_triton
from .w8a8 import w8a8_gemm_reference, w8a8_gemm_triton
from .w4a8_gluon import w4a8_gemm_gluon, w4a8_gluon_config
from .w8a8_gluon import HAS_GLUON, w8a8_gemm_gluon, w8a8_gluon_config
from .w4a8_gluon import _MAX_K as _W4A8_GLUON_MAX_K

__all__ = [
    "act_quant", "act_quant_ln_mod", "act_quant_gelu_cat", "qk_norm_rope", "w8a8_gemm", "w4a8_gemm", "w4a16_gemm", "use_triton", "use_gluon", "HAS_TRITON", "HAS_GLUON",
    "w8a8_gemm_gluon", "w4a8_gemm_gluon",
    "pack_int4", "unpack_int4", "PACK_TILE", "block_hadamard", "hadamard_matrix",
    "act_quant_reference", "act_quant_triton", "w8a8_gemm_reference", "w8a8_gemm_triton",
    "w4a8_gemm_reference", "w4a8_gemm_triton", "w4a16_gemm_reference", "w4a16_gemm_triton",
    "block_sparse_attention", "block_sparse_attention_reference", "block_sparse_attention_triton", "merge_attention",
    "block_sparse_attention_fp8_reference", "block_sparse_attention_fp8_triton", "ATTENTION_PRECISIONS",
    "svg_probe", "svg_probe_reference", "svg_probe_triton",
    "wan_qk_norm_rope", "wan_qk_norm_rope_reference", "wan_qk_norm_rope_triton",
]


def use_triton(t: torch.Tensor) -> bool:
    """The dispatch rule: Triton on CUDA tensors, the reference elsewhere (overridable by env)."""
    mode = os.environ.get("QUANTSPARSE_KERNELS", "auto")
    if mode == "reference" or not HAS_TRITON:
        return False
    if mode == "triton":
        return True
    return t.is_cuda


_CAPABILITY: dict[int, tuple[int, int]] = {}


def use_gluon(t: torch.Tensor, n: int, out_dtype: torch.dtype) -> bool:
    """The Gluon GEMMs: CUDA sm_90, N a multiple of 8 (TMA stores), FP16/BF16 output."""
    if not (HAS_GLUON and t.is_cuda and os.environ.get("QUANTSPARSE_GLUON", "1") != "0"):
        return False
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)
    return _CAPABILITY[idx] == (9, 0) and n % 8 == 0 and out_dtype in (torch.float16, torch.bfloat16)


def act_quant(x, smooth=None, qmax=127, rotate=True):
    return (act_quant_triton if use_triton(x) else act_quant_reference)(x, smooth, qmax, rotate)


def act_quant_ln_mod(x, shift, scale, smooth=None, qmax=127, rotate=True, *, rows_per_batch, eps=1e-6):
    fn = act_quant_ln_mod_triton if use_triton(x) else act_quant_ln_mod_reference
    return fn(x, shift, scale, smooth, qmax, rotate, rows_per_batch=rows_per_batch, eps=eps)


def act_quant_gelu_cat(a, b, smooth=None, qmax=127, rotate=True):
    fn = act_quant_gelu_cat_triton if use_triton(b) else act_quant_gelu_cat_reference
    return fn(a, b, smooth, qmax, rotate)


def qk_norm_rope(x, weight, eps, freqs, out=None):
    return (qk_norm_rope_triton if use_triton(x) else qk_norm_rope_reference)(x, weight, eps, freqs, out)


def wan_qk_norm_rope(x, weight, eps, freqs, heads, out=None):
    """Wan's full-width QK RMSNorm + RoPE (``kernels.wan_qk_norm_rope``); the reference for head sizes that
    are not a power of two (every Wan has 128)."""
    d = x.shape[-1] // heads if heads else 0
    fast = use_triton(x) and d > 0 and not d & (d - 1)
    return (wan_qk_norm_rope_triton if fast else wan_qk_norm_rope_reference)(x, weight, eps, freqs, heads, out)


def w8a8_gemm(x_q, x_scale, w_q, w_scale, bias=None, out_dtype=torch.bfloat16):
    if not use_triton(x_q):
        return w8a8_gemm_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    n, k = w_q.shape
    if use_gluon(x_q, n, out_dtype):
        return w8a8_gemm_gluon(x_q, x_scale, w_q, w_scale, bias, out_dtype, config=w8a8_gluon_config(k, n))
    return w8a8_gemm_triton(x_q, x_scale, w_q, w_scale, bias, out_dtype)


def w4a8_gemm(x_q, x_scale, w_packed, w_scale, bias=None, out_dtype=torch.bfloat16, group_size=0):
    if not use_triton(x_q):
        return w4a8_gemm_reference(x_q, x_scale, w_packed, w_scale, bias, out_dtype, group_size)
    n, k = w_packed.shape[0], w_packed.shape[1] * 2
    if group_size == 0 and k <= _W4A8_GLUON_MAX_K and use_gluon(x_q, n, out_dtype):
        return w4a8_gemm_gluon(x_q, x_scale, w_packed, w_scale, bias, out_dtype, 0, config=w4a8_gluon_config(k, n))
    return w4a8_gemm_triton(x_q, x_scale, w_packed, w_scale, bias, out_dtype, group_size)


def w4a16_gemm(x, w_packed, w_scale, bias=None, group_size=0):
    fn = w4a16_gemm_triton if use_triton(x) else w4a16_gemm_reference
    return fn(x, w_packed, w_scale, bias, group_size)


ATTENTION_PRECISIONS = ("bf16", "int8-fp8")


def block_sparse_attention(q, k, v, kv_blocks, kv_counts, *, txt_len, key_padding=None, sm_scale=None,
                           mode="sparse", block_q=128, block_k=64, return_lse=False, check_lists=True,
                           temporal=None, grid=None, precision="bf16"):
    """``precision``: "bf16" (16-bit products) or "int8-fp8" (INT8 Q K^T, FP8 P V; modes sparse, dense, refresh)."""
    if precision == "int8-fp8":
        fn = block_sparse_attention_fp8_triton if use_triton(q) else block_sparse_attention_fp8_reference
    elif precision == "bf16":
        fn = block_sparse_attention_triton if use_triton(q) else block_sparse_attention_reference
    else:
        raise ValueError(f"block_sparse_attention: precision={precision!r} must be one of {ATTENTION_PRECISIONS}")
    return fn(q, k, v, kv_blocks, kv_counts, txt_len=txt_len, key_padding=key_padding, sm_scale=sm_scale,
              mode=mode, block_q=block_q, block_k=block_k, return_lse=return_lse, check_lists=check_lists,
              temporal=temporal, grid=grid)


def svg_probe(q, k, v, rows, lo_spatial, lo_temporal, *, txt_len, grid, band_block, keep, key_padding=None,
              sm_scale=None):
    n = rows.numel()
    fn = svg_probe_triton if use_triton(q) and n >= 16 and not n & (n - 1) else svg_probe_reference
    return fn(q, k, v, rows, lo_spatial, lo_temporal, txt_len=txt_len, grid=grid, band_block=band_block, keep=keep,
              key_padding=key_padding, sm_scale=sm_scale)
