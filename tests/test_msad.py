"""MSAD losses against brute force, chunked saliency against the dense one, the calibration's sparse mask
against the kernel's, and the fake-quantized Linear against the exported (real) one."""

from __future__ import annotations

import pytest
import torch

from comfyui_quantsparse.quantsparse.calib import msad
from comfyui_quantsparse.quantsparse.calib.attention import CalibAttention, band_token_mask
from comfyui_quantsparse.quantsparse.core.fakequant import ActFakeQuant, FakeQuantLinear
from comfyui_quantsparse.quantsparse.sparse.masks import SparseMask, band_blocks, block_budget, num_blocks, token_mask
from comfyui_quantsparse.quantsparse.core.qlinear import QuantizedLinear
from comfyui_quantsparse.quantsparse.core.quantizer import quantize_weight


def _qk(b=2, h=3, n=37, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) * 2,
            torch.randn(b, h, n, d, generator=g, dtype=torch.float64) * 2)


def _padding_bias(b, n, padded):
    bias = torch.zeros(b, 1, 1, n, dtype=torch.float64)
    bias[0, ..., padded] = -torch.finfo(torch.float32).max
    return bias


def _full_attention(q, k, bias=None):
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if bias is not None:
        logits = logits + bias
    return torch.softmax(logits, dim=-1)


def test_global_loss_equals_brute_force_pooling_with_a_partial_last_window():
    q, k = _qk(n=37)
    q2, k2 = q + 0.1 * torch.randn_like(q), k + 0.1 * torch.randn_like(k)
    s = 8  # 37 tokens -> windows of 8, 8, 8, 8, 5 (ceil mode)

    def pool(x):
        wins = [x[:, :, i:i + s].mean(dim=2) for i in range(0, x.shape[2], s)]
        return torch.stack(wins, dim=2)

    def gmap(q_, k_):
        return torch.softmax(pool(q_) @ pool(k_).transpose(-1, -2) / q_.shape[-1] ** 0.5, dim=-1)

    expected = ((gmap(q, k) - gmap(q2, k2)) ** 2).mean()
    target = msad.pooled_attention(q, k, s)
    assert target.shape == (2, 3, 5, 5)
    got = msad.global_loss(target, q2, k2, s)
    assert float(got) > 0
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)


def test_local_loss_equals_the_salient_rows_of_the_full_attention():
    q, k = _qk(n=41)
    q2, k2 = q + 0.2 * torch.randn_like(q), k + 0.2 * torch.randn_like(k)
    bias = _padding_bias(2, 41, [3, 4])
    full = _full_attention(q, k, bias)
    sal = full.sum(dim=(1, 2))  # attention received by each key, over heads and queries
    idx = sal.topk(7, dim=-1).indices.sort(dim=-1).values
    rows_fp = torch.stack([full[b][:, idx[b]] for b in range(2)])
    full2 = _full_attention(q2, k2, bias)
    rows_q = torch.stack([full2[b][:, idx[b]] for b in range(2)])
    expected = ((rows_fp - rows_q) ** 2).mean()

    got_idx = msad.salient_indices(msad.saliency(q, k, bias), 7)
    assert torch.equal(got_idx, idx)
    assert not set(got_idx[0].tolist()) & {3, 4}  # padded keys receive no attention
    target = msad.local_attention(q, k, got_idx, bias)
    torch.testing.assert_close(target.double(), rows_fp, rtol=1e-5, atol=1e-7)
    got = msad.local_loss(target, q2, k2, got_idx, bias)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("chunk_elems", [1, 3 * 50, 3 * 50 * 7, 1 << 30])
def test_chunked_saliency_equals_the_dense_column_sums(chunk_elems):
    q, k = _qk(b=2, h=3, n=50, seed=3)
    bias = _padding_bias(2, 50, [0, 9])
    dense = _full_attention(q, k, bias).sum(dim=(1, 2)).float()
    got = msad.saliency(q, k, bias, chunk_elems=chunk_elems)
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)
    assert torch.allclose(got.sum(-1), torch.full((2,), 3.0 * 50, dtype=torch.float32), rtol=1e-5)


def test_normalised_lambdas_bring_each_term_to_the_output_loss():
    lg, ll = msad.normalised_lambdas(0.02, 4e-6, 1e-7)
    assert lg * 4e-6 == pytest.approx(0.02) and ll * 1e-7 == pytest.approx(0.02)


def test_calibration_mask_is_the_kernels_svg_band():
    grid, txt, bq, bk, density = (3, 4, 8), 5, 16, 16, 0.4
    img = 3 * 4 * 8
    mask = band_token_mask(grid, txt, density, bq, bk)
    nkb = num_blocks(img, bk)
    band = band_blocks(img, bq, bk, block_budget(density, nkb))
    sm = SparseMask(band[None, None].to(torch.int32), torch.full((1, 1, band.shape[0]), band.shape[1],
                                                                 dtype=torch.int32), nkb, img, bq, bk)
    assert torch.equal(mask, token_mask(sm, txt)[0, 0])
    assert mask[:txt].all() and mask[:, :txt].all()


def test_calibration_attention_dense_and_sparse():
    g = torch.Generator().manual_seed(0)
    grid, txt = (2, 4, 4), 3
    n = txt + 32
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for _ in range(3))
    dense = CalibAttention(grid=grid, txt_len=txt)(q, k, v)
    ref = torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v
    torch.testing.assert_close(dense, ref.transpose(1, 2).reshape(1, n, 32), rtol=1e-5, atol=1e-5)
    mask = band_token_mask(grid, txt, 0.5, 16, 16)
    temporal = torch.tensor([[False, True]])
    sparse = CalibAttention(grid=grid, txt_len=txt, token_mask=mask, temporal=temporal)(q, k, v)
    # head 0: spatial band in (t, h, w) order; head 1: the band in the frame-major layout
    from comfyui_quantsparse.quantsparse.sparse.masks import temporal_permutation
    perm, inv = temporal_permutation(grid)
    full_perm = torch.cat([torch.arange(txt), txt + perm])
    logits = q @ k.transpose(-1, -2) / 4
    out0 = torch.softmax(logits[0, 0].masked_fill(~mask, float("-inf")), -1) @ v[0, 0]
    lp = logits[0, 1][full_perm][:, full_perm]
    out1p = torch.softmax(lp.masked_fill(~mask, float("-inf")), -1) @ v[0, 1][full_perm]
    out1 = torch.empty_like(out1p)
    out1[full_perm] = out1p
    expected = torch.stack([out0, out1])[None].transpose(1, 2).reshape(1, n, 32)
    torch.testing.assert_close(sparse, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sparse, dense, atol=1e-3)


@pytest.mark.parametrize("kind", ["w4a8", "w8a8", "w6a6", "w4a16"])
def test_fake_quant_linear_matches_the_exported_quantized_linear(kind):
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(256, 64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 256, generator=g) / 16)
        lin.weight[:, 7] *= 8  # an outlier input channel
    fq = FakeQuantLinear(lin, kind, rotate=True)
    with torch.no_grad():
        if fq.log_smooth is not None:
            fq.log_smooth.copy_(torch.randn(256, generator=g) * 0.3)
        fq.clip_logit.copy_(torch.randn(64, 1, generator=g) + 2.0)
    x = torch.randn(5, 256, generator=g)
    x[:, 7] *= 10
    smooth, clip = fq.exported()
    qw = quantize_weight(lin.weight.detach(), kind, smooth=smooth, clip=clip, rotate=True)
    real = QuantizedLinear.from_quantized(qw, lin.bias.detach().float())
    got, want = fq(x), real(x)
    ref_err = (lin(x) - want).square().mean()
    assert (got - want).square().mean() < 1e-3 * ref_err + 1e-10, (got - want).abs().max()


def test_activation_fake_quant_straight_through_gradient():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 256, generator=g, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(256, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    w = torch.randn(256, generator=g, dtype=torch.float64)
    (ActFakeQuant.apply(x, s, True, 127) * w).sum().backward()
    from comfyui_quantsparse.kernels import block_hadamard
    x2, s2 = x.detach().clone().requires_grad_(True), s.detach().clone().requires_grad_(True)
    (block_hadamard(x2 * s2) * w).sum().backward()  # straight through: the rounding is the identity
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(s.grad, s2.grad)
