"""8-bit block-sparse attention (INT8 Q K^T, FP8 P V): the Triton kernels against their eager references,
and the accuracy budget against float32 attention.

On the CPU the kernels run under TRITON_INTERPRET=1 (FP16 inputs; the kernel pre-rounds to the e4m3
grid there, because the interpreter's float -> e4m3 cast is wrong); the `gpu` tests repeat the checks
compiled, in BF16, on ComfyUI-like strided views at a few thousand tokens.
"""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_quantsparse.kernels._triton import HAS_TRITON, interpreting
from comfyui_quantsparse.kernels.sparse_attention import block_sparse_attention_reference
from comfyui_quantsparse.kernels.sparse_attention_fp8 import (
    block_sparse_attention_fp8_reference, block_sparse_attention_fp8_triton, quantize_qkv_fp8_reference,
    quantize_qkv_fp8_triton, text_pad,
)

from .test_sparse_attention import kernel_dtype, make_qkv, random_lists

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _device():
    if not torch.cuda.is_available() and not interpreting():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1) or a GPU")
    return "cuda" if torch.cuda.is_available() else "cpu"


def _case(device, seed, txt, grid, temporal_heads, pad):
    q, k, v = make_qkv(2, 3, txt, math.prod(grid), kernel_dtype(device), device, seed)
    k = k + 0.5 * torch.randn(1, 3, 1, 128, generator=torch.Generator().manual_seed(seed)).to(k)  # a shared bias
    temporal = torch.tensor([[True, False, True], [False, True, True]], device=device) if temporal_heads else None
    key_padding = None
    if pad:
        key_padding = torch.ones(2, q.shape[2], dtype=torch.bool, device=device)
        key_padding[1, 2:txt] = False
        key_padding[0, txt + 5] = False
    return q, k, v, temporal, key_padding


def test_quantize_matches_reference():
    device = _device()
    q, k, v, temporal, _ = _case(device, 3, 7, (3, 4, 5), True, False)
    kw = dict(txt_len=7, sm_scale=0.088, temporal=temporal, grid=(3, 4, 5))
    got, ref = quantize_qkv_fp8_triton(q, k, v, **kw), quantize_qkv_fp8_reference(q, k, v, **kw)
    assert got.q.dtype == torch.int8 and got.vt.dtype == torch.float8_e4m3fn
    assert got.q.shape == (2, 3, text_pad(7) + 60, 128) and got.vt.shape[-1] % 16 == 0
    for name in ("q", "k"):  # ties may round apart after a last-bit difference of the scale product
        diff = (getattr(got, name).int() - getattr(ref, name).int()).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3, name
    assert float((got.vt.float() != ref.vt.float()).float().mean()) < 1e-3
    for name in ("q_scale", "k_scale", "v_scale", "k_mean"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-6, atol=0, msg=name)


@pytest.mark.parametrize("mode", ["sparse", "dense", "refresh"])
@pytest.mark.parametrize("txt,grid,temporal,pad,desc", [
    (7, (3, 4, 5), True, True, True),  # temporal heads, padding, TMA descriptors (emulated)
    (7, (3, 4, 5), True, True, False),  # the same by pointers
    (16, (2, 5, 7), False, False, True),  # text already 16-aligned, no temporal heads
    (0, (2, 4, 8), False, False, False),  # no text
])
def test_kernel_matches_reference_and_float32(mode, txt, grid, temporal, pad, desc):
    """Against its 8-bit reference (which rounds P relative to the row's final maximum, the kernel
    relative to the running one): closer to it than the reference is to float32 attention, and no less
    accurate than it against float32 attention."""
    device = _device()
    q, k, v, tmp, key_padding = _case(device, 11 + txt, txt, grid, temporal, pad)
    blocks, counts = random_lists(2, 3, math.prod(grid), 16, 16, 0.4, device, seed=5 + txt)
    kw = dict(txt_len=txt, block_q=16, block_k=16, mode=mode, return_lse=True, key_padding=key_padding,
              temporal=tmp, grid=grid if temporal else None)
    got = block_sparse_attention_fp8_triton(q, k, v, blocks, counts, config={"use_desc": desc}, **kw)
    ref8 = block_sparse_attention_fp8_reference(q, k, v, blocks, counts, **kw)
    exact = block_sparse_attention_reference(q, k, v, blocks, counts, **kw)  # float32 inside
    assert got[0].dtype == q.dtype and got[0].shape == q.shape and torch.isfinite(got[0]).all()
    assert rel(got[0], ref8[0]) < rel(ref8[0], exact[0])
    assert rel(got[0], exact[0]) < 1.25 * rel(ref8[0], exact[0]) + 1e-3
    assert rel(got[0], exact[0]) < 0.05  # the accuracy budget on these inputs (peaky, biased keys)
    fin = torch.isfinite(exact[-1])
    assert torch.equal(torch.isneginf(got[-1]), torch.isneginf(exact[-1]))
    assert float((got[-1][fin] - exact[-1][fin]).abs().max()) < 0.05  # lse: the smoothing shift added back
    if mode == "refresh":
        assert got[1].dtype == torch.float32 and got[1].shape == (2, 3, math.prod(grid), 128)
        assert rel(got[1], ref8[1]) < 0.05
        assert rel(got[1], exact[1]) < 0.1


def test_unsupported_mode_rejected():
    q, k, v = make_qkv(1, 1, 4, 32, torch.float16, "cpu", 0)
    with pytest.raises(ValueError, match="mode='complement' must be one of"):
        block_sparse_attention_fp8_reference(q, k, v, None, None, txt_len=4, mode="complement")


def _gpu_views(seed, txt=256 - 13, l_img=4160, heads=3):
    """q, k, v as ComfyUI's single blocks hand them: [B, H, L, D] views of one fused [B, L, 3, H, D] tensor."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    fused = torch.randn(2, txt + l_img, 3, heads, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
    q, k, v = (fused[:, :, i].transpose(1, 2) for i in range(3))
    return q * 1.5, k + 0.3, v


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["sparse", "dense", "refresh"])
def test_gpu_kernel_matches_reference(mode):
    txt, grid = 256 - 13, (5, 26, 32)
    l_img = math.prod(grid)
    q, k, v = _gpu_views(7, txt, l_img)
    blocks, counts = random_lists(2, 3, l_img, 128, 128, 0.15, "cuda", seed=8)
    temporal = torch.tensor([[True, False, False], [False, False, True]], device="cuda")
    kw = dict(txt_len=txt, block_q=128, block_k=128, mode=mode, return_lse=True, temporal=temporal, grid=grid)
    got = block_sparse_attention_fp8_triton(q, k, v, blocks, counts, **kw)
    ref8 = block_sparse_attention_fp8_reference(q, k, v, blocks, counts, **kw)
    exact = block_sparse_attention_reference(q, k, v, blocks, counts, **kw)
    assert rel(got[0], ref8[0]) < rel(ref8[0], exact[0])
    assert rel(got[0], exact[0]) < 1.25 * rel(ref8[0], exact[0]) + 1e-3
    assert rel(got[0], exact[0]) < 0.05
    if mode == "refresh":
        assert rel(got[1], ref8[1]) < 0.05
