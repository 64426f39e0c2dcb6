"""The fused activation-quantization kernels (LayerNorm + modulation, GELU + concatenation) against their
references, with the same acceptance as the plain activation kernel (tests/test_kernels.py): scales to
FP16 precision, codes equal except one step where the exact value sits on a rounding boundary."""

from __future__ import annotations

import pytest
import torch

from comfyui_quantsparse.kernels._triton import HAS_TRITON
from comfyui_quantsparse.kernels.act_quant_fused import (
    act_quant_gelu_cat_reference, act_quant_gelu_cat_triton, act_quant_ln_mod_reference, act_quant_ln_mod_triton,
    gelu_tanh, ln_mod,
)
from comfyui_quantsparse.kernels.hadamard import block_hadamard

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")


def _agree(q, s, qr, sr, exact, rot, qmax=127):
    q, s = q.cpu(), s.cpu()
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and int(q.abs().max()) <= qmax
    assert float(((s - sr) / sr).abs().max()) < 2e-3
    diff = (q.int() - qr.int()).abs()
    assert int(diff.max()) <= 1
    y = (block_hadamard(exact) if rot else exact) / sr.double()[:, None]
    off_boundary = ((y.abs() - y.abs().floor()) - 0.5).abs() > 0.05
    assert not bool((diff.bool() & off_boundary & (y.abs() < qmax)).any())


def _dtype(device):
    return torch.float16 if device == "cpu" else torch.bfloat16


@pytest.mark.parametrize("batch,tokens,k", [(1, 33, 256), (2, 37, 384), (3, 5, 128)])
def test_ln_mod_matches_reference(kernel_device, batch, tokens, k):
    g = torch.Generator().manual_seed(batch * 100 + k)
    dt = _dtype(kernel_device)
    x = (torch.randn(batch * tokens, k, generator=g) * 3 + 1).to(kernel_device, dt)
    x[:, 5] *= 20  # an outlier channel
    mod = torch.randn(batch, 1, 3 * k, generator=g).to(kernel_device, dt)  # chunks of one modulation output
    shift, scale = mod[:, 0, :k], mod[:, 0, k:2 * k]
    smooth = (torch.rand(k, generator=g) + 0.5).to(kernel_device)
    for sm, rot in ((None, True), (smooth, True), (smooth, False)):
        q, s = act_quant_ln_mod_triton(x, shift, scale, sm, 127, rot, rows_per_batch=tokens)
        args = [t.cpu() for t in (x, shift, scale)]
        qr, sr = act_quant_ln_mod_reference(*args, None if sm is None else sm.cpu(), 127, rot, rows_per_batch=tokens)
        exact = ln_mod(*args, tokens, 1e-6) * (sm.cpu().double() if sm is not None else 1.0)
        _agree(q, s, qr, sr, exact, rot)


def test_ln_mod_reference_is_layernorm_then_modulation():
    g = torch.Generator().manual_seed(0)
    x, shift, scale = torch.randn(6, 128, generator=g), torch.randn(2, 128, generator=g), torch.randn(2, 128, generator=g)
    want = torch.nn.functional.layer_norm(x, (128,), eps=1e-6) * (1 + scale.repeat_interleave(3, 0)) \
        + shift.repeat_interleave(3, 0)
    torch.testing.assert_close(ln_mod(x, shift, scale, 3, 1e-6).float(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ka", [0, 256])
def test_gelu_cat_matches_reference(kernel_device, ka):
    g = torch.Generator().manual_seed(ka)
    dt = _dtype(kernel_device)
    fused = (torch.randn(45, 3 * 128 + 512, generator=g) * 2).to(kernel_device, dt)  # linear1's output
    h = fused[:, 3 * 128:]  # a strided view, as the single blocks' MLP half
    a = (torch.randn(45, ka, generator=g)).to(kernel_device, dt)
    smooth = (torch.rand(ka + 512, generator=g) + 0.5).to(kernel_device)
    for sm in (None, smooth):
        q, s = act_quant_gelu_cat_triton(a, h, sm, 127, True)
        qr, sr = act_quant_gelu_cat_reference(a.cpu(), h.cpu(), None if sm is None else sm.cpu(), 127, True)
        exact = torch.cat([a.cpu().double(), gelu_tanh(h.cpu().double())], 1)
        _agree(q, s, qr, sr, exact * (sm.cpu().double() if sm is not None else 1.0), True)
    torch.testing.assert_close(gelu_tanh(h.cpu().float()),
                               torch.nn.functional.gelu(h.cpu().float(), approximate="tanh"), rtol=1e-5, atol=1e-6)


def test_bad_inputs_rejected():
    x = torch.randn(8, 128)
    with pytest.raises(ValueError, match="rows_per_batch"):
        act_quant_ln_mod_reference(x, torch.zeros(3, 128), torch.zeros(3, 128), rows_per_batch=3)
    with pytest.raises(ValueError, match=r"shift must be \[B, K\]"):
        act_quant_ln_mod_reference(x, torch.zeros(2, 64), torch.zeros(2, 128), rows_per_batch=4)
    with pytest.raises(ValueError, match="multiple of 128"):
        act_quant_gelu_cat_reference(torch.zeros(8, 0), torch.zeros(8, 100))
