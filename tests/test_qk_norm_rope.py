"""QK RMSNorm + RoPE in one kernel: against its reference, and the reference against ComfyUI's formula
(torch's rms_norm, then flux's rotation) on the same inputs."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_quantsparse.kernels._triton import HAS_TRITON
from comfyui_quantsparse.kernels.qk_norm_rope import qk_norm_rope_reference, qk_norm_rope_triton

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")


def freqs_for(b, n, d, seed):
    """Rotation matrices in flux's layout [B, 1, L, D/2, 2, 2] (cos, -sin, sin, cos)."""
    ang = torch.rand(b, 1, n, d // 2, generator=torch.Generator().manual_seed(seed)) * 2 * math.pi
    return torch.stack([ang.cos(), -ang.sin(), ang.sin(), ang.cos()], -1).reshape(b, 1, n, d // 2, 2, 2)


def comfy_formula(x, weight, eps, freqs):
    y = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)
    y_ = y.float().reshape(*y.shape[:-1], -1, 1, 2)
    return (freqs[..., 0] * y_[..., 0] + freqs[..., 1] * y_[..., 1]).reshape(y.shape).to(x.dtype)


def test_reference_is_comfyuis_norm_then_rope():
    x = torch.randn(2, 3, 10, 128, dtype=torch.bfloat16)
    w = torch.rand(128) + 0.5
    f = freqs_for(2, 10, 128, 0)
    torch.testing.assert_close(qk_norm_rope_reference(x, w, 1e-6, f), comfy_formula(x, w, 1e-6, f), rtol=0, atol=0)


@pytest.mark.parametrize("batch_freqs", [1, 2])
def test_kernel_matches_reference_on_strided_views_into_a_joint_buffer(kernel_device, batch_freqs):
    dt = torch.float16 if kernel_device == "cpu" else torch.bfloat16
    g = torch.Generator().manual_seed(batch_freqs)
    b, h, n, d, txt = 2, 3, 37, 128, 5
    qkv = (torch.randn(b, n, 3, h, d, generator=g) * 3).to(kernel_device, dt)
    x = qkv.permute(2, 0, 3, 1, 4)[0]  # q as a view of the fused projection, as the blocks split it
    w = (torch.rand(d, generator=g) + 0.5).to(kernel_device, dt)
    f = freqs_for(batch_freqs, n, d, 7).to(kernel_device)
    joint = torch.full((b, h, txt + n, d), float("nan"), dtype=dt, device=kernel_device)
    got = qk_norm_rope_triton(x, w, 1e-6, f, out=joint[:, :, txt:])
    ref = qk_norm_rope_reference(x.cpu(), w.cpu(), 1e-6, f.cpu())
    assert got.data_ptr() == joint[:, :, txt:].data_ptr() and torch.isnan(joint[:, :, :txt]).all()
    # one rounding of the output apart (the kernel and torch order the float32 sums differently)
    torch.testing.assert_close(got.cpu().float(), ref.float(), rtol=1e-2, atol=2e-2)
    assert float((got.cpu().float() - ref.float()).abs().mean()) < 2e-3


def test_bad_inputs_rejected():
    x = torch.randn(1, 2, 4, 128)
    with pytest.raises(ValueError, match="freqs must be float32"):
        qk_norm_rope_reference(x, None, 1e-6, torch.zeros(1, 1, 5, 64, 2, 2))
    with pytest.raises(ValueError, match="weight must be"):
        qk_norm_rope_reference(x, torch.ones(64), 1e-6, freqs_for(1, 4, 128, 0))
