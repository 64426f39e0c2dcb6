"""The Gluon (Hopper-only) W8A8 and W4A8 kernels against their eager references.

They cannot run under the Triton interpreter, so the numerical tests are marked `gpu` and
skip on the CPU and on GPUs other than sm_90; the argument and platform checks run anywhere.
Shapes are ragged on purpose (M and N not multiples of the tiles, K with an odd number of
K-steps) and include one with more output tiles than SMs, so the persistent loop and the
pipeline's wrap-around across tiles are exercised.
"""

from __future__ import annotations

import pytest
import torch

from comfyui_quantsparse.kernels import pack_int4, w4a8_gemm_reference, w8a8_gemm_reference
from comfyui_quantsparse.kernels.w4a8_gluon import W4A8_GLUON_CONFIG, w4a8_gemm_gluon
from comfyui_quantsparse.kernels.w8a8_gluon import HAS_GLUON, W8A8_GLUON_CONFIG, w8a8_gemm_gluon

# (M, K, N): K=384 has an odd number of 128-deep K-steps; 4099 x 3072 makes 396 (W8A8) or
# 408 (W4A8) output tiles, three per SM on an H100.
SHAPES = [(1, 256, 384), (45, 384, 256), (130, 512, 136), (4099, 384, 3072)]


def _hopper() -> bool:
    return HAS_GLUON and torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


needs_hopper = pytest.mark.skipif(not _hopper(), reason="the Gluon kernels need an sm_90 GPU")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "kernel output has non-finite values"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def operands(m, n, k, gen, w_max=127):
    x_q = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    x_s = (torch.rand(m, generator=gen) + 0.5) / 127
    w_q = torch.randint(-w_max, w_max + 1, (n, k), generator=gen, dtype=torch.int8)
    w_s = (torch.rand(n, generator=gen) + 0.5) / w_max / k ** 0.5
    bias = torch.randn(n, generator=gen)
    return x_q, x_s, w_q, w_s, bias


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("config", [None, {"a_regs": False}, {"a_regs": False, "split": True},
                                    {"bk": 64, "stages": 8}])
def test_w8a8_gluon_matches_reference(m, k, n, config):
    gen = torch.Generator().manual_seed(3 * m + n)
    x_q, x_s, w_q, w_s, bias = operands(m, n, k, gen)
    for b, out_dtype in ((bias, torch.bfloat16), (None, torch.float16), (bias.to(torch.bfloat16), torch.bfloat16)):
        ref = w8a8_gemm_reference(x_q, x_s, w_q, w_s, b, torch.float64)
        dev = [None if t is None else t.cuda() for t in (x_q, x_s, w_q, w_s, b)]
        out = w8a8_gemm_gluon(*dev, out_dtype, config=config)
        assert out.shape == (m, n) and out.dtype == out_dtype
        assert rel_err(out.cpu(), ref) < 4e-3, (config, out_dtype)  # output rounding only


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("config", [None, {"bm": 128, "stages": 6}])
def test_w4a8_gluon_matches_reference(m, k, n, config):
    gen = torch.Generator().manual_seed(5 * m + n)
    x_q, x_s, _, w_s, bias = operands(m, n, k, gen, w_max=7)
    codes = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)  # the full range, -8 included
    packed = pack_int4(codes)
    for b, out_dtype in ((bias, torch.bfloat16), (None, torch.float16)):
        ref = w4a8_gemm_reference(x_q, x_s, packed, w_s, b, torch.float64)
        dev = [None if t is None else t.cuda() for t in (x_q, x_s, packed, w_s, b)]
        out = w4a8_gemm_gluon(*dev, out_dtype, 0, config=config)
        assert out.shape == (m, n) and out.dtype == out_dtype
        assert rel_err(out.cpu(), ref) < 4e-3, (config, out_dtype)


@pytest.mark.gpu
@needs_hopper
def test_gluon_empty_batch():
    gen = torch.Generator().manual_seed(0)
    x_q, x_s, w_q, w_s, bias = (t.cuda() for t in operands(0, 256, 256, gen))
    assert w8a8_gemm_gluon(x_q, x_s, w_q, w_s, bias).shape == (0, 256)
    assert w4a8_gemm_gluon(x_q, x_s, pack_int4(w_q.clamp(-8, 7)), w_s, bias).shape == (0, 256)


def test_gluon_launchers_reject_what_they_cannot_run():
    gen = torch.Generator().manual_seed(0)
    x_q, x_s, w_q, w_s, bias = operands(4, 256, 256, gen)
    packed = pack_int4(w_q.clamp(-8, 7))
    # shape errors are the shared ones, raised before anything platform-specific
    with pytest.raises(ValueError, match="does not match K"):
        w8a8_gemm_gluon(x_q, x_s, w_q[:, :128], w_s)
    with pytest.raises(ValueError, match="group_size"):
        w4a8_gemm_gluon(x_q, x_s, packed, w_s.repeat(2, 1).T.contiguous(), group_size=128)
    if not _hopper():
        # CPU tensors (or a GPU that is not sm_90): a clear RuntimeError, not a Triton crash
        with pytest.raises(RuntimeError, match="sm_90|CUDA|Gluon"):
            w8a8_gemm_gluon(x_q, x_s, w_q, w_s, bias)
        with pytest.raises(RuntimeError, match="sm_90|CUDA|Gluon"):
            w4a8_gemm_gluon(x_q, x_s, packed, w_s, bias)
        return
    x_q, x_s, w_q, w_s, packed = (t.cuda() for t in (x_q, x_s, w_q, w_s, packed))
    with pytest.raises(ValueError, match="multiple of 8"):
        w8a8_gemm_gluon(x_q, x_s, w_q[:252], w_s[:252])
    with pytest.raises(ValueError, match="serializes|a_regs"):
        w8a8_gemm_gluon(x_q, x_s, w_q, w_s, config={"a_regs": True, "split": True})
    with pytest.raises(ValueError, match="shared memory"):
        w8a8_gemm_gluon(x_q, x_s, w_q, w_s, config={"stages": 6})
    with pytest.raises(ValueError, match="unsupported config"):
        w4a8_gemm_gluon(x_q, x_s, packed, w_s, config={"bn": 256})


def test_default_configs_fit_shared_memory():
    from comfyui_quantsparse.kernels.w4a8_gluon import w4a8_smem_bytes
    from comfyui_quantsparse.kernels.w8a8_gluon import _SMEM_LIMIT, smem_bytes

    assert smem_bytes(W8A8_GLUON_CONFIG) <= _SMEM_LIMIT
    assert w4a8_smem_bytes(W4A8_GLUON_CONFIG) <= _SMEM_LIMIT
