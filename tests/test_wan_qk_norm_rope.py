"""Wan's full-width QK RMSNorm + RoPE kernel: the reference against ComfyUI's formula (torch's rms_norm over
all heads, then flux's interleaved rotation as comfy-kitchen's eager ``apply_rope1`` writes it), the kernel
against the reference (FP16 under the CPU interpreter, BF16 on the GPU) on the layouts the fused Wan block
hands it: a GEMM output written in place, a column slice of a wider buffer, batch-shared and per-batch
tables, head counts that are not a power of two and rows wider than one chunk of heads."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_quantsparse.kernels._triton import HAS_TRITON
from comfyui_quantsparse.kernels.wan_qk_norm_rope import wan_qk_norm_rope_reference, wan_qk_norm_rope_triton

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")

D = 128


def wan_freqs(b, n, d, seed):
    """Rotation matrices in WanModel.rope_encode's layout [B, L, 1, D/2, 2, 2] (cos, -sin, sin, cos)."""
    ang = torch.rand(b, n, 1, d // 2, generator=torch.Generator().manual_seed(seed)) * 2 * math.pi
    return torch.stack([ang.cos(), -ang.sin(), ang.sin(), ang.cos()], -1).reshape(b, n, 1, d // 2, 2, 2)


def comfy_formula(x, weight, eps, freqs, heads):
    """``norm_q`` (torch.nn.functional.rms_norm over the whole width, weight in x's dtype as manual_cast
    casts it) then ``apply_rope1`` on the [B, L, heads, D] view, as comfy-kitchen's eager backend does it."""
    b, n, c = x.shape
    w = weight.to(x.dtype) if weight is not None else None
    y = torch.nn.functional.rms_norm(x, (c,), w, eps).view(b, n, heads, c // heads)
    y_ = y.to(freqs.dtype).reshape(*y.shape[:-1], -1, 1, 2)
    out = freqs[..., 0] * y_[..., 0]
    out.addcmul_(freqs[..., 1], y_[..., 1])
    return out.reshape(*y.shape).type_as(y).view(b, n, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_is_comfyuis_norm_then_rope(dtype):
    g = torch.Generator().manual_seed(0)
    heads = 3
    x = (torch.randn(2, 10, heads * D, generator=g) * 4).to(dtype)
    w = (torch.rand(heads * D, generator=g) + 0.5).to(dtype)
    f = wan_freqs(1, 10, D, 1)
    torch.testing.assert_close(wan_qk_norm_rope_reference(x, w, 1e-6, f, heads), comfy_formula(x, w, 1e-6, f, heads),
                               rtol=0, atol=0)


def test_norm_spans_all_heads():
    """One head scaled up changes every head's output (HunyuanVideo's per-head norm would not)."""
    x = torch.randn(1, 4, 2 * D, generator=torch.Generator().manual_seed(2))
    f = wan_freqs(1, 4, D, 3)
    a = wan_qk_norm_rope_reference(x, None, 1e-6, f, 2)
    x2 = x.clone()
    x2[..., D:] *= 3
    b = wan_qk_norm_rope_reference(x2, None, 1e-6, f, 2)
    assert (a[..., :D] - b[..., :D]).abs().max() > 1e-2


def _agree(got, ref):
    # one rounding of the output apart (the kernel sums the float32 squares in another order)
    torch.testing.assert_close(got.cpu().float(), ref.float(), rtol=1e-2, atol=2e-2)
    assert float((got.cpu().float() - ref.float()).abs().mean()) < 2e-3


def _dtype(device):
    return torch.float16 if device == "cpu" else torch.bfloat16


@pytest.mark.parametrize("heads,batch_freqs", [(2, 1), (3, 2), (10, 1)], ids=["2heads", "3heads_per_batch_table",
                                                                           "10heads_two_chunks"])
def test_kernel_in_place_on_a_gemm_output(kernel_device, heads, batch_freqs):
    dt = _dtype(kernel_device)
    g = torch.Generator().manual_seed(heads)
    b, n, c = 2, 37, heads * D
    x = (torch.randn(b * n, c, generator=g) * 3).to(kernel_device, dt).view(b, n, c)  # as forward_prequantized returns
    w = (torch.rand(c, generator=g) + 0.5).to(kernel_device, dt)
    f = wan_freqs(batch_freqs, n, D, 7).to(kernel_device)
    ref = wan_qk_norm_rope_reference(x.cpu(), w.cpu(), 1e-6, f.cpu(), heads)
    ptr = x.data_ptr()
    got = wan_qk_norm_rope_triton(x, w, 1e-6, f, heads, out=x)
    assert got.data_ptr() == ptr
    _agree(got, ref)


def test_kernel_reads_a_column_slice_and_writes_another_buffer(kernel_device):
    """q as the first third of a [M, 3C] projection, written into a fresh tensor; no weight."""
    dt = _dtype(kernel_device)
    g = torch.Generator().manual_seed(5)
    heads, b, n = 3, 1, 29
    c = heads * D
    qkv = (torch.randn(b, n, 3 * c, generator=g) * 2).to(kernel_device, dt)
    x = qkv[..., :c]
    f = wan_freqs(1, n, D, 9).to(kernel_device)
    got = wan_qk_norm_rope_triton(x, None, 1e-5, f, heads)
    _agree(got, wan_qk_norm_rope_reference(x.cpu(), None, 1e-5, f.cpu(), heads))
    assert torch.equal(qkv[..., :c].cpu(), x.cpu())  # the input is left as it was


def test_kernel_takes_wans_movedim_table_view(kernel_device):
    """WanModel.rope_encode's table is EmbedND's [1, 1, L, ...] output moved to [1, L, 1, ...] (a view)."""
    dt = _dtype(kernel_device)
    n, heads = 21, 2
    table = wan_freqs(1, n, D, 4).reshape(1, 1, n, D // 2, 2, 2).movedim(1, 2).to(kernel_device)
    assert table.stride(2) == n * 4 * D // 2 and table.shape[2] == 1  # a view, strides of the [1, 1, L] layout
    x = torch.randn(1, n, heads * D, generator=torch.Generator().manual_seed(8)).to(kernel_device, dt)
    _agree(wan_qk_norm_rope_triton(x, None, 1e-6, table, heads),
           wan_qk_norm_rope_reference(x.cpu(), None, 1e-6, table.cpu(), heads))


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [12, 24, 40], ids=["1.3B", "5B", "14B"])
def test_kernel_at_wan_widths_bf16(heads):
    g = torch.Generator().manual_seed(heads)
    b, n, c = 2, 1560, heads * D
    x = (torch.randn(b, n, c, generator=g) * 3).to("cuda", torch.bfloat16)
    w = (torch.rand(c, generator=g) + 0.5).to("cuda", torch.bfloat16)
    f = wan_freqs(1, n, D, 1).cuda()
    ref = wan_qk_norm_rope_reference(x, w, 1e-6, f, heads)
    _agree(comfy_formula(x, w, 1e-6, f, heads), ref.cpu())  # torch's CUDA rms_norm: at most one rounding apart
    got = wan_qk_norm_rope_triton(x, w, 1e-6, f, heads)
    _agree(got, ref.cpu())
    inplace = x.clone()
    wan_qk_norm_rope_triton(inplace, w, 1e-6, f, heads, out=inplace)
    assert torch.equal(inplace, got)


def test_bad_inputs_rejected():
    x = torch.randn(1, 4, 2 * D)
    f = wan_freqs(1, 4, D, 0)
    with pytest.raises(ValueError, match="freqs must be float32"):
        wan_qk_norm_rope_reference(x, None, 1e-6, f[:, :3], 2)
    with pytest.raises(ValueError, match="freqs must be float32"):
        wan_qk_norm_rope_reference(x, None, 1e-6, f.double(), 2)
    with pytest.raises(ValueError, match="weight must be"):
        wan_qk_norm_rope_reference(x, torch.ones(D), 1e-6, f, 2)
    with pytest.raises(ValueError, match="heads=3"):
        wan_qk_norm_rope_reference(x, None, 1e-6, f, 3)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        wan_qk_norm_rope_reference(x.transpose(1, 2).contiguous().transpose(1, 2), None, 1e-6, f, 2)
