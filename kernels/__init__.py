"""Triton kernels, each beside an eager PyTorch reference with the same signature.

The public functions below pick the Triton kernel for CUDA tensors when Triton is present
and the reference otherwise (CPU works, slowly). Set QUANTSPARSE_KERNELS=reference to force
the references everywhere (debugging), or =triton to force Triton (tests under
TRITON_INTERPRET=1 on the CPU).
"""

from __future__ import annotations

import os

import torch

from ._triton import HAS_TRITON
from .act_quant import act_quant_reference, act_quant_triton
from .hadamard import block_hadamard, hadamard_matrix
from .int4 import PACK_TILE, pack_int4, unpack_int4
from .w4a8 import w4a8_gemm_reference, w4a8_gemm_triton
from .w4a16 import w4a16_gemm_reference, w4a16_gemm_triton
from .w8a8 import w8a8_gemm_reference, w8a8_gemm_triton

__all__ = [
    "act_quant", "w8a8_gemm", "w4a8_gemm", "w4a16_gemm", "use_triton", "HAS_TRITON",
    "pack_int4", "unpack_int4", "PACK_TILE", "block_hadamard", "hadamard_matrix",
    "act_quant_reference", "act_quant_triton", "w8a8_gemm_reference", "w8a8_gemm_triton",
    "w4a8_gemm_reference", "w4a8_gemm_triton", "w4a16_gemm_reference", "w4a16_gemm_triton",
]


def use_triton(t: torch.Tensor) -> bool:
    """The dispatch rule: Triton on CUDA tensors, the reference elsewhere (overridable by env)."""
    mode = os.environ.get("QUANTSPARSE_KERNELS", "auto")
    if mode == "reference" or not HAS_TRITON:
        return False
    if mode == "triton":
        return True
    return t.is_cuda


def act_quant(x, smooth=None, qmax=127, rotate=True):
    return (act_quant_triton if use_triton(x) else act_quant_reference)(x, smooth, qmax, rotate)


def w8a8_gemm(x_q, x_scale, w_q, w_scale, bias=None, out_dtype=torch.bfloat16):
    fn = w8a8_gemm_triton if use_triton(x_q) else w8a8_gemm_reference
    return fn(x_q, x_scale, w_q, w_scale, bias, out_dtype)


def w4a8_gemm(x_q, x_scale, w_packed, w_scale, bias=None, out_dtype=torch.bfloat16, group_size=0):
    fn = w4a8_gemm_triton if use_triton(x_q) else w4a8_gemm_reference
    return fn(x_q, x_scale, w_packed, w_scale, bias, out_dtype, group_size)


def w4a16_gemm(x, w_packed, w_scale, bias=None, group_size=0):
    fn = w4a16_gemm_triton if use_triton(x) else w4a16_gemm_reference
    return fn(x, w_packed, w_scale, bias, group_size)
