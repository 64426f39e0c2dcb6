"""Every Triton kernel against its eager reference on fresh random inputs.

On the CPU the kernels run under TRITON_INTERPRET=1 with FP16 operands (the interpreter's
tl.dot is wrong on BF16); on the GPU (`-m gpu`) the same checks run compiled, BF16 included.
Shapes are ragged on purpose: M not a multiple of any tile, N and K multiples of 128 as in
HunyuanVideo, text and video tokens of two samples stacked in one batch.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from comfyui_quantsparse.kernels import (
    act_quant_reference, act_quant_triton, pack_int4, unpack_int4, w4a8_gemm_reference, w4a8_gemm_triton,
    w4a16_gemm_reference, w4a16_gemm_triton, w8a8_gemm_reference, w8a8_gemm_triton,
)
from comfyui_quantsparse.kernels._triton import HAS_TRITON
from comfyui_quantsparse.kernels.hadamard import block_hadamard

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")

# (M, K, N): M ragged; batch of 2 samples x (text 7 + video 30) tokens = 74 rows
SHAPES = [(74, 256, 128), (45, 384, 256), (1, 128, 128), (130, 512, 384)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "kernel output has non-finite values"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def activations(m, k, device, dtype, gen):
    """Video-like activations: a few outlier channels, as HunyuanVideo has."""
    x = torch.randn(m, k, generator=gen, dtype=torch.float32)
    x[:, torch.randint(0, k, (max(1, k // 64),), generator=gen)] *= 20
    return x.to(device=device, dtype=dtype)




@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("qmax", [127, 31])
def test_act_quant_matches_reference(kernel_device, m, k, n, qmax):
    gen = torch.Generator().manual_seed(m * 1000 + k + qmax)
    dtype = torch.float16 if kernel_device == "cpu" else torch.bfloat16
    x = activations(m, k, kernel_device, dtype, gen)
    smooth = (torch.rand(k, generator=gen) + 0.5).to(kernel_device)
    cfgs = [("ptr", 16, 4, 1, 1), ("tma", 16, 4, 1, 1)] if kernel_device == "cpu" else [None, ("ptr", 32, 4, 8, 2)]
    for (sm, rot), cfg in itertools.product([(smooth, True), (None, True), (smooth, False)], cfgs):
        q, s = act_quant_triton(x, sm, qmax, rot, config=cfg)
        qr, sr = act_quant_reference(x.cpu(), None if sm is None else sm.cpu(), qmax, rot)
        q, s = q.cpu(), s.cpu()
        assert q.dtype == torch.int8 and s.dtype == torch.float32
        assert int(q.abs().max()) <= qmax
        # The kernel rotates in FP16 on the tensor cores: scales agree to FP16 precision and a
        # code may flip by one step where the value sits on a rounding boundary.
        assert float(((s - sr) / sr).abs().max()) < 2e-3
        diff = (q.int() - qr.int()).abs()
        assert int(diff.max()) <= 1
        # ... and only where the exact value lies within 0.05 of a step from a rounding boundary
        y = x.cpu().double() * (sm.cpu().double() if sm is not None else 1.0)
        y = (block_hadamard(y) if rot else y) / sr.double()[:, None]
        off_boundary = ((y.abs() - y.abs().floor()) - 0.5).abs() > 0.05
        assert not bool((diff.bool() & off_boundary & (y.abs() < qmax)).any())
        # dequantized values agree with the exact transform to within one quantization step
        assert rel_err(q.double() * s.double()[:, None], qr.double() * sr.double()[:, None]) < 0.01


def test_act_quant_zero_row_and_empty(kernel_device):
    x = torch.zeros(3, 128, device=kernel_device, dtype=torch.float16)
    q, s = act_quant_triton(x, None, 127, True)
    assert int(q.abs().max()) == 0 and torch.isfinite(s).all()
    q, s = act_quant_triton(x[:0], None, 127, True)
    assert q.shape == (0, 128) and s.shape == (0,)


def test_pack_unpack_round_trip():
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (37, 512), generator=gen, dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.shape == (37, 256) and packed.dtype == torch.int8
    assert torch.equal(unpack_int4(packed), q)
    # the layout: byte j of a 128-wide tile holds channels j (low nibble) and j+64 (high)
    b = int(packed[3, 5]) & 0xFF
    lo, hi = b & 0xF, b >> 4
    assert (lo - 16 if lo > 7 else lo) == int(q[3, 5]) and (hi - 16 if hi > 7 else hi) == int(q[3, 69])
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.full((1, 128), 9, dtype=torch.int8))
    with pytest.raises(ValueError, match="multiple of 128"):
        pack_int4(torch.zeros(1, 100, dtype=torch.int8))


def int8_operands(m, n, k, device, gen, wq_max=127):
    x_q = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    x_s = (torch.rand(m, generator=gen) + 0.5) / 127
    w_q = torch.randint(-wq_max, wq_max + 1, (n, k), generator=gen, dtype=torch.int8)
    w_s = (torch.rand(n, generator=gen) + 0.5) / max(wq_max, 1) / k ** 0.5
    bias = torch.randn(n, generator=gen)
    return [t.to(device) for t in (x_q, x_s, w_q, w_s, bias)]


def configs(kind: str, device: str):
    if device == "cpu":
        return [None, ("tma", 32, 32, 128, 4, 4, 1)] if kind == "w8a8" else [None, ("ptr", 16, 32, 4, 4, 1)]
    if kind == "w8a8":
        return [None, ("ptr", 128, 128, 128, 8, 4, 3), ("tma", 128, 256, 128, 8, 8, 3)]
    return [None, ("ptr", 128, 128, 8, 4, 3), ("ptr", 256, 128, 8, 8, 3)]


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_w8a8_gemm_matches_reference(kernel_device, m, k, n):
    gen = torch.Generator().manual_seed(7 * m + n)
    x_q, x_s, w_q, w_s, bias = int8_operands(m, n, k, kernel_device, gen)
    out_dtype = torch.float16 if kernel_device == "cpu" else torch.bfloat16
    ref = w8a8_gemm_reference(x_q.cpu(), x_s.cpu(), w_q.cpu(), w_s.cpu(), bias.cpu(), torch.float64)
    for cfg in configs("w8a8", kernel_device):
        for b in (bias, None):
            out = w8a8_gemm_triton(x_q, x_s, w_q, w_s, b, out_dtype, config=cfg)
            assert out.shape == (m, n) and out.dtype == out_dtype
            expect = ref if b is not None else ref - bias.cpu().double()
            assert rel_err(out.cpu(), expect) < 4e-3, cfg  # FP16/BF16 output rounding only


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("group_size", [0, 128])
def test_w4a8_gemm_matches_reference(kernel_device, m, k, n, group_size):
    gen = torch.Generator().manual_seed(11 * m + n + group_size)
    x_q, x_s, _, w_s, bias = int8_operands(m, n, k, kernel_device, gen)
    w4 = torch.randint(-7, 8, (n, k), generator=gen, dtype=torch.int8)
    packed = pack_int4(w4).to(kernel_device)
    if group_size:
        w_s = ((torch.rand(n, k // group_size, generator=gen) + 0.5) / 7 / k ** 0.5).to(torch.float16).to(kernel_device)
    out_dtype = torch.float16 if kernel_device == "cpu" else torch.bfloat16
    ref = w4a8_gemm_reference(x_q.cpu(), x_s.cpu(), packed.cpu(), w_s.cpu(), bias.cpu(), torch.float64, group_size)
    for cfg in configs("w4a8", kernel_device):
        out = w4a8_gemm_triton(x_q, x_s, packed, w_s, bias, out_dtype, group_size, config=cfg)
        assert out.shape == (m, n)
        assert rel_err(out.cpu(), ref) < 4e-3, cfg


@pytest.mark.parametrize("m,k,n", [(1, 256, 384), (2, 128, 256), (37, 384, 128)])
@pytest.mark.parametrize("group_size", [0, 128])
def test_w4a16_gemm_matches_reference(kernel_device, m, k, n, group_size):
    gen = torch.Generator().manual_seed(13 * m + n + group_size)
    dtype = torch.float16 if kernel_device == "cpu" else torch.bfloat16
    x = torch.randn(m, k, generator=gen).to(kernel_device, dtype)
    packed = pack_int4(torch.randint(-7, 8, (n, k), generator=gen, dtype=torch.int8)).to(kernel_device)
    shape = (n, k // group_size) if group_size else (n,)
    w_s = ((torch.rand(shape, generator=gen) + 0.5) / 7 / k ** 0.5).to(torch.float16 if group_size else torch.float32)
    w_s = w_s.to(kernel_device)
    bias = torch.randn(n, generator=gen).to(kernel_device, dtype)
    out = w4a16_gemm_triton(x, packed, w_s, bias, group_size)
    ref = w4a16_gemm_reference(x.cpu().double(), packed.cpu(), w_s.cpu(), bias.cpu().double(), group_size)
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out.cpu(), ref) < 1e-2  # FP16/BF16 operands and output


def test_unpack_int4_kernel_matches_reference(kernel_device):
    from comfyui_quantsparse.kernels.w4a8 import unpack_int4_triton

    gen = torch.Generator().manual_seed(3)
    q = torch.randint(-8, 8, (70, 384), generator=gen, dtype=torch.int8)
    packed = pack_int4(q).to(kernel_device)
    assert torch.equal(unpack_int4_triton(packed).cpu(), q)


def test_w4a8_unpack_path_matches_reference(kernel_device):
    gen = torch.Generator().manual_seed(4)
    x_q, x_s, _, w_s, bias = int8_operands(45, 256, 384, kernel_device, gen)
    packed = pack_int4(torch.randint(-7, 8, (256, 384), generator=gen, dtype=torch.int8)).to(kernel_device)
    out_dtype = torch.float16 if kernel_device == "cpu" else torch.bfloat16
    out = w4a8_gemm_triton(x_q, x_s, packed, w_s, bias, out_dtype, 0, config=("unpack",))
    ref = w4a8_gemm_reference(x_q.cpu(), x_s.cpu(), packed.cpu(), w_s.cpu(), bias.cpu(), torch.float64)
    assert rel_err(out.cpu(), ref) < 4e-3
    with pytest.raises(ValueError, match="per-channel"):
        w4a8_gemm_triton(x_q, x_s, packed, w_s[:, None].expand(-1, 3).contiguous().half(), bias, out_dtype, 128,
                         config=("unpack",))


def test_gemm_rejects_bad_input():
    x_q = torch.zeros(4, 128, dtype=torch.int8)
    x_s = torch.ones(4)
    with pytest.raises(ValueError, match="does not match K"):
        w8a8_gemm_reference(x_q, x_s, torch.zeros(8, 256, dtype=torch.int8), torch.ones(8))
    with pytest.raises(ValueError, match="float32"):
        w8a8_gemm_reference(x_q, x_s.double(), torch.zeros(8, 128, dtype=torch.int8), torch.ones(8))
    with pytest.raises(ValueError, match="multiple of 128"):
        w4a8_gemm_reference(torch.zeros(4, 64, dtype=torch.int8), x_s, torch.zeros(8, 32, dtype=torch.int8), torch.ones(8))
    with pytest.raises(ValueError, match="group_size"):
        w4a8_gemm_reference(x_q, x_s, torch.zeros(8, 64, dtype=torch.int8), torch.ones(8), group_size=64)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["w4a8", "w8a8", "w6a6", "w4a16"])
def test_quantized_linear_gpu_matches_cpu_reference(kind):
    """The whole layer (activation quantization + GEMM) compiled on the GPU, BF16, against the CPU reference path."""
    from comfyui_quantsparse.quantsparse.core.qlinear import QuantizedLinear

    gen = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(3072, 1024).to(torch.bfloat16)
    q = QuantizedLinear.from_linear(lin, kind)
    x = torch.randn(30210 // 8, 3072, generator=gen).to(torch.bfloat16)
    ref = q(x)
    out = q.cuda()(x.cuda()).cpu()
    assert rel_err(out, ref) < 1e-2


def test_identity_smoothing_is_skipped_also_under_inference_mode():
    """ComfyUI samples under torch.inference_mode(), whose tensors have no version counter."""
    from comfyui_quantsparse.quantsparse.core.qlinear import nontrivial_smooth

    with torch.inference_mode():
        ones = torch.ones(128)
        assert nontrivial_smooth(ones) is None
        other = torch.full((128,), 2.0)
        assert nontrivial_smooth(other) is other
    trained = torch.ones(128)
    assert nontrivial_smooth(trained) is None
    trained[3] = 0.5  # an in-place update (calibration) is seen
    assert nontrivial_smooth(trained) is trained
