"""Block-sparse attention: the Triton kernel against the eager reference, the modes against each other
and against torch SDPA, and the input checks.

On the CPU the kernel runs under TRITON_INTERPRET=1 with FP16 operands (the interpreter's tl.dot is
wrong on BF16) and small blocks; the `gpu` tests repeat the checks compiled, in BF16, at the default
128x64 blocks and a few thousand tokens. Lengths are ragged on purpose: txt_len and L_img multiples
of no block; every (batch, head) has its own lists.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from comfyui_quantsparse.kernels import block_sparse_attention, merge_attention
from comfyui_quantsparse.kernels._triton import HAS_TRITON, interpreting
from comfyui_quantsparse.kernels.sparse_attention import (
    _launch, block_sparse_attention_reference, block_sparse_attention_triton, complement_lists, complement_weight,
    dense_and_residual, temporal_order,
)

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")

CASES = [(0, 64), (5, 100), (17, 257)]  # (txt_len, L_img)


def make_qkv(b, h, txt, l_img, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, txt + l_img, 128, generator=gen) for _ in range(3))
    q = q * 1.5  # peakier softmax than unit scores: masking mistakes show up more
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


def random_lists(b, h, l_img, block_q, block_k, density, device, seed, maxk_extra=2):
    """Per-(batch, head, query block) lists of distinct video key blocks in random order, counts drawn
    around the density (some 0), padded with garbage past the count (it must be ignored)."""
    gen = torch.Generator().manual_seed(seed)
    nqb, nkb = -(-l_img // block_q), -(-l_img // block_k)
    maxk = min(nkb, max(1, round(density * nkb)) + maxk_extra)
    blocks = torch.stack([torch.randperm(nkb, generator=gen)[:maxk] for _ in range(b * h * nqb)])
    counts = torch.randint(0, maxk + 1, (b * h * nqb,), generator=gen)
    blocks = torch.where(torch.arange(maxk) < counts[:, None], blocks, torch.randint(-5, 10 ** 6, blocks.shape,
                                                                                      generator=gen))
    return (blocks.reshape(b, h, nqb, maxk).int().to(device), counts.reshape(b, h, nqb).int().to(device))


def kernel_dtype(device):
    return torch.float16 if device == "cpu" else torch.bfloat16


def close(out, ref, dtype):
    """Max abs error bound for unit-variance V: one rounding of the output, plus FP16/BF16 P in P @ V."""
    tol = 4e-3 if dtype == torch.float16 else 3e-2
    assert torch.isfinite(out).all()
    err = float((out.float() - ref.float()).abs().max())
    assert err < tol, f"max abs error {err} >= {tol}"


def check_lse(lse, ref_lse):
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert not torch.isnan(lse).any()
    fin = torch.isfinite(ref_lse)
    if fin.any():
        assert float((lse[fin] - ref_lse[fin]).abs().max()) < 1e-3


@pytest.mark.parametrize("txt,l_img", CASES)
@pytest.mark.parametrize("mode", ["sparse", "complement"])
def test_triton_matches_reference(kernel_device, txt, l_img, mode):
    dtype = kernel_dtype(kernel_device)
    bq, bk = (32, 16) if l_img != 257 else (32, 32)
    q, k, v = make_qkv(2, 2, txt, l_img, dtype, kernel_device, seed=txt + l_img)
    blocks, counts = random_lists(2, 2, l_img, bq, bk, 0.3, kernel_device, seed=l_img)
    kw = dict(txt_len=txt, mode=mode, block_q=bq, block_k=bk, return_lse=True)
    out, lse = block_sparse_attention_triton(q, k, v, blocks, counts, **kw)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, blocks, counts, **kw)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    close(out, ref, dtype)
    check_lse(lse, ref_lse)
    if mode == "complement":  # text rows compute nothing
        assert torch.equal(out[:, :, :txt].float().abs().sum(), torch.tensor(0.0, device=out.device))
        assert torch.isneginf(lse[:, :, :txt]).all()


@pytest.mark.parametrize("txt,l_img", [(0, 100), (17, 257)])
def test_dense_matches_sdpa(kernel_device, txt, l_img):
    dtype = kernel_dtype(kernel_device)
    q, k, v = make_qkv(2, 2, txt, l_img, dtype, kernel_device, seed=3)
    out = block_sparse_attention_triton(q, k, v, None, None, txt_len=txt, mode="dense", block_q=32, block_k=32)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    close(out, ref, dtype)


@pytest.mark.parametrize("txt,l_img", [(5, 100), (17, 257)])
def test_sparse_plus_complement_is_dense(kernel_device, txt, l_img):
    """The refresh-step identity SSAR relies on: the two partial passes merged are dense attention, and
    w_c * (O_c - O_s) is the dense-minus-sparse residual."""
    dtype = kernel_dtype(kernel_device)
    bq, bk = 32, 16
    q, k, v = make_qkv(2, 2, txt, l_img, dtype, kernel_device, seed=11)
    blocks, counts = random_lists(2, 2, l_img, bq, bk, 0.25, kernel_device, seed=12)
    kw = dict(txt_len=txt, block_q=bq, block_k=bk, return_lse=True)
    o_s, l_s = block_sparse_attention_triton(q, k, v, blocks, counts, mode="sparse", **kw)
    o_c, l_c = block_sparse_attention_triton(q, k, v, blocks, counts, mode="complement", **kw)
    o_d, l_d = block_sparse_attention_triton(q, k, v, blocks, counts, mode="dense", **kw)
    merged, l_m = merge_attention(o_s, l_s, o_c, l_c)
    assert float((l_m - l_d).abs().max()) < 1e-5
    # The outputs are not bit-equal: each pass rounds its probabilities to FP16 for P @ V against its
    # own running maximum. Both are as close to float32 dense attention as the kernel ever is (the
    # merge itself is exact to float32 rounding: test_merge_attention_is_exact_in_float32).
    dense32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    close(merged, dense32, dtype)
    close(o_d, dense32, dtype)
    close(merged, o_d, dtype)
    _, rl_d = block_sparse_attention_reference(q, k, v, blocks, counts, mode="dense", **kw)
    assert float((l_d - rl_d).abs().max()) < 1e-4
    d_out, resid = dense_and_residual(o_s, l_s, o_c, l_c)
    assert torch.equal(d_out, merged)
    close(resid, dense32 - o_s.float(), dtype)  # the residual is as exact as the merged dense output
    w = complement_weight(l_c, l_d)
    assert bool((w[:, :, :txt] == 0).all()) and (w >= 0).all() and (w <= 1 + 1e-6).all()


def _temporal_case(device, dtype, seed, grid=(3, 4, 5), txt=7, b=2, h=3):
    q, k, v = make_qkv(b, h, txt, math.prod(grid), dtype, device, seed)
    temporal = torch.tensor([[True, False, True], [False, True, True]][:b], device=device)[:, :h]
    return q, k, v, temporal, grid, txt


@pytest.mark.parametrize("mode", ["sparse", "complement", "refresh"])
def test_temporal_heads_by_index_arithmetic(kernel_device, mode):
    """Temporal heads' lists address the frame-major layout: the kernel (index arithmetic, no copies)
    equals permuting q, k, v of those heads, running the plain kernel, and permuting the output back."""
    dtype = kernel_dtype(kernel_device)
    q, k, v, temporal, grid, txt = _temporal_case(kernel_device, dtype, seed=21)
    bq, bk = 16, 16
    blocks, counts = random_lists(2, 3, math.prod(grid), bq, bk, 0.4, kernel_device, seed=22)
    kw = dict(txt_len=txt, block_q=bq, block_k=bk, mode=mode, return_lse=True)
    got = block_sparse_attention_triton(q, k, v, blocks, counts, temporal=temporal, grid=grid, **kw)
    ref = block_sparse_attention_reference(q, k, v, blocks, counts, temporal=temporal, grid=grid, **kw)
    perm, inverse = temporal_order(grid, q.device)

    def permute(x, order):
        out = x.clone()
        for bi, hi in temporal.nonzero().tolist():
            out[bi, hi, txt:] = x[bi, hi, txt + order]
        return out
    plain = block_sparse_attention_reference(*(permute(x, perm) for x in (q, k, v)), blocks, counts, **kw)
    if mode == "refresh":
        (out, res, lse), (r_out, r_res, r_lse) = got, ref
        p_out, p_res = permute(plain[0].float(), inverse), permute(torch.cat([plain[0][:, :, :txt].float() * 0,
                                                                               plain[1]], 2), inverse)[:, :, txt:]
        assert float((res - r_res).abs().max()) < (4e-3 if dtype == torch.float16 else 3e-2)
        assert float((r_res - p_res).abs().max()) < 1e-5
    else:
        (out, lse), (r_out, r_lse) = got, ref
        p_out = permute(plain[0].float(), inverse)
    close(out, r_out, dtype)
    check_lse(lse, r_lse)
    assert float((r_out.float() - p_out).abs().max()) < 1e-2
    assert not torch.equal(out, block_sparse_attention_triton(q, k, v, blocks, counts, **kw)[0])  # layouts differ


def _temporal_lists_case(seed):
    """Mixed-head inputs and random block lists on the GPU, or on the CPU under the interpreter (else skip)."""
    if not torch.cuda.is_available() and not interpreting():
        pytest.skip("needs the Triton interpreter or a GPU")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, temporal, grid, txt = _temporal_case(device, kernel_dtype(device), seed=seed)
    blocks, counts = random_lists(2, 3, math.prod(grid), 16, 16, 0.4, device, seed=seed + 1)
    return device, q, k, v, temporal, grid, txt, blocks, counts


@pytest.mark.parametrize("mode", ["sparse", "dense", "complement", "refresh"])
def test_tma_descriptor_path_matches_reference(mode):
    """The Hopper path (K/V of (t, h, w)-order heads through TMA descriptors, temporal heads by pointers
    in the same launch), forced on under the interpreter: ragged lengths, padding, mixed head kinds."""
    device, q, k, v, temporal, grid, txt, blocks, counts = _temporal_lists_case(31)
    dtype = q.dtype
    pad = torch.ones(2, q.shape[2], dtype=torch.bool, device=device)
    pad[1, 2:txt] = False
    kw = dict(txt_len=txt, block_q=16, block_k=16, mode=mode, return_lse=True, key_padding=pad, temporal=temporal,
              grid=grid)
    got = block_sparse_attention_triton(q, k, v, blocks, counts, config={"use_desc": True}, **kw)
    ref = block_sparse_attention_reference(q, k, v, blocks, counts, **kw)
    close(got[0], ref[0], dtype)
    check_lse(got[-1], ref[-1])
    if mode == "refresh":
        assert float((got[1] - ref[1]).abs().max()) < (4e-3 if dtype == torch.float16 else 3e-2)


@pytest.mark.parametrize("txt,l_img", CASES)
def test_refresh_is_dense_and_residual_in_one_pass(kernel_device, txt, l_img):
    """Refresh mode returns the dense output and the float32 dense - sparse residual of the video rows,
    from unsorted lists with garbage past the counts, and with a padding mask."""
    dtype = kernel_dtype(kernel_device)
    bq, bk = 32, 16
    q, k, v = make_qkv(2, 2, txt, l_img, dtype, kernel_device, seed=23)
    blocks, counts = random_lists(2, 2, l_img, bq, bk, 0.3, kernel_device, seed=24)
    pad = torch.ones(2, txt + l_img, dtype=torch.bool, device=kernel_device)
    pad[1, : txt // 2] = False
    kw = dict(txt_len=txt, key_padding=pad, block_q=bq, block_k=bk)
    out, res, lse = block_sparse_attention_triton(q, k, v, blocks, counts, mode="refresh", return_lse=True, **kw)
    assert res.dtype == torch.float32 and res.shape == (2, 2, l_img, 128)
    dense, d_lse = block_sparse_attention_reference(q, k, v, blocks, counts, mode="dense", return_lse=True, **kw)
    sparse = block_sparse_attention_reference(q, k, v, blocks, counts, mode="sparse", **kw)
    close(out, dense, dtype)
    check_lse(lse, d_lse)
    r_out, r_res = block_sparse_attention_reference(q, k, v, blocks, counts, mode="refresh", **kw)
    assert float((res - r_res).abs().max()) < (4e-3 if dtype == torch.float16 else 3e-2)
    # the residual is dense - sparse (up to the two outputs' own rounding)
    rounding = 2e-3 if dtype == torch.float16 else 1.6e-2  # two outputs rounded to 16 bits, |x| < 2
    assert float((r_res - (dense.float() - sparse.float())[:, :, txt:]).abs().max()) < rounding


def test_merge_attention_is_exact_in_float32():
    """Softmax attention over disjoint key sets, merged, equals attention over their union to float32
    rounding (any partition, here one per row)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    part = torch.rand(2, 3, 40, 40, generator=gen) < 0.3
    s = q @ k.transpose(-1, -2) * 0.5

    def attend(keep):
        t = s.masked_fill(~keep, float("-inf"))
        lse = torch.logsumexp(t, -1)
        return (torch.softmax(t, -1).nan_to_num(0.0) @ v).float(), lse.float()

    out, lse = merge_attention(*attend(part), *attend(~part))
    dense, dense_lse = attend(torch.ones_like(part))
    torch.testing.assert_close(out, dense, rtol=4e-6, atol=2e-6)  # a few float32 ulps
    torch.testing.assert_close(lse, dense_lse, rtol=4e-6, atol=2e-6)


def test_merge_attention_empty_sides():
    out = torch.randn(1, 1, 3, 4)
    lse = torch.tensor([[[0.5, float("-inf"), float("-inf")]]])
    other = torch.randn(1, 1, 3, 4)
    lse_o = torch.tensor([[[float("-inf"), 1.0, float("-inf")]]])
    m, ml = merge_attention(out, lse, other, lse_o)
    assert torch.allclose(m[0, 0, 0], out[0, 0, 0]) and torch.allclose(m[0, 0, 1], other[0, 0, 1])
    assert torch.equal(m[0, 0, 2], torch.zeros(4)) and torch.isneginf(ml[0, 0, 2])
    assert not torch.isnan(m).any() and torch.allclose(ml[0, 0, :2], torch.tensor([0.5, 1.0]))


def test_key_padding_honoured(kernel_device):
    """Padded text keys: changing their values changes nothing, and the result matches the reference."""
    dtype = kernel_dtype(kernel_device)
    txt, l_img, bq, bk = 17, 100, 32, 16
    q, k, v = make_qkv(2, 2, txt, l_img, dtype, kernel_device, seed=5)
    blocks, counts = random_lists(2, 2, l_img, bq, bk, 0.3, kernel_device, seed=6)
    pad = torch.ones(2, txt + l_img, dtype=torch.bool)
    pad[0, 9:txt] = False  # sample 0 has 9 real text tokens, sample 1 all 17
    pad[1, txt + 3] = False  # and one masked video key, to exercise the video path too
    pad = pad.to(kernel_device)
    kw = dict(txt_len=txt, key_padding=pad, block_q=bq, block_k=bk, return_lse=True)
    for mode in ("sparse", "dense", "complement"):
        out, lse = block_sparse_attention_triton(q, k, v, blocks, counts, mode=mode, **kw)
        ref, ref_lse = block_sparse_attention_reference(q, k, v, blocks, counts, mode=mode, **kw)
        close(out, ref, dtype)
        check_lse(lse, ref_lse)
        k2, v2 = k.clone(), v.clone()
        k2[0, :, 9:txt] = 50.0
        v2[0, :, 9:txt] = -50.0
        k2[1, :, txt + 3] = 50.0
        out2, lse2 = block_sparse_attention_triton(q, k2, v2, blocks, counts, mode=mode, **kw)
        assert torch.equal(out2, out) and torch.equal(lse2, lse)


def test_fully_masked_rows_give_zero(kernel_device):
    """Rows with no key at all (all text padded, no video block listed) output 0 and lse -inf, no NaN."""
    dtype = kernel_dtype(kernel_device)
    txt, l_img, bq, bk = 5, 64, 32, 16
    q, k, v = make_qkv(1, 2, txt, l_img, dtype, kernel_device, seed=8)
    pad = torch.ones(1, txt + l_img, dtype=torch.bool)
    pad[0, :txt] = False
    blocks = torch.zeros(1, 2, 2, 2, dtype=torch.int32)
    counts = torch.tensor([[[0, 2], [1, 0]]], dtype=torch.int32)
    blocks[0, 0, 1] = torch.tensor([3, 1])
    blocks[0, 1, 0, 0] = 2
    pad, blocks, counts = pad.to(kernel_device), blocks.to(kernel_device), counts.to(kernel_device)
    out, lse = block_sparse_attention_triton(q, k, v, blocks, counts, txt_len=txt, key_padding=pad,
                                             block_q=bq, block_k=bk, return_lse=True)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, blocks, counts, txt_len=txt, key_padding=pad,
                                                    block_q=bq, block_k=bk, return_lse=True)
    empty = [(0, slice(txt, txt + bq)), (1, slice(txt + bq, txt + 2 * bq))]
    for h, rows in empty:
        assert torch.equal(out[0, h, rows].float(), torch.zeros_like(out[0, h, rows].float()))
        assert torch.isneginf(lse[0, h, rows]).all()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    close(out, ref, dtype)
    check_lse(lse, ref_lse)


def test_lse_is_logsumexp_of_scores(kernel_device):
    dtype = kernel_dtype(kernel_device)
    txt, l_img = 17, 100
    q, k, v = make_qkv(2, 2, txt, l_img, dtype, kernel_device, seed=9)
    scale = 0.07
    _, lse = block_sparse_attention_triton(q, k, v, None, None, txt_len=txt, mode="dense", sm_scale=scale,
                                           block_q=32, block_k=16, return_lse=True)
    expect = torch.logsumexp((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)
    assert float((lse - expect).abs().max()) < 1e-4


def test_poisoned_buffers_fully_written(kernel_device):
    """Every output element and lse entry is written, in every mode (rows past each block masked)."""
    dtype = kernel_dtype(kernel_device)
    txt, l_img, bq, bk = 5, 100, 32, 16
    q, k, v = make_qkv(1, 2, txt, l_img, dtype, kernel_device, seed=10)
    blocks, counts = random_lists(1, 2, l_img, bq, bk, 0.3, kernel_device, seed=10)
    nqb, nkb = -(-l_img // bq), -(-l_img // bk)
    comp = complement_lists(blocks, counts, nkb)
    lists = {"sparse": (blocks, counts, blocks.shape[3]), "dense": (None, None, 0), "complement": (*comp, nkb)}
    for mode, (blk, cnt, maxk) in lists.items():
        out = torch.full_like(q, float("nan"))
        lse = torch.full(q.shape[:3], float("nan"), device=q.device)
        _launch(q, k, v, out, lse, blk, cnt, maxk, txt, None, 1 / math.sqrt(128), mode, bq, bk, nqb, nkb, None)
        assert not torch.isnan(out).any() and not torch.isnan(lse).any(), mode
        ref = block_sparse_attention_reference(q, k, v, blocks, counts, txt_len=txt, mode=mode, block_q=bq,
                                               block_k=bk)
        close(out, ref, dtype)
    out = torch.full_like(q, float("nan"))
    res = torch.full((1, 2, l_img, 128), float("nan"), device=q.device)
    _launch(q, k, v, out, None, blocks, counts, blocks.shape[3], txt, None, 1 / math.sqrt(128), "refresh", bq, bk,
            nqb, nkb, None, res, comp=comp)
    assert not torch.isnan(out).any() and not torch.isnan(res).any()


def test_complement_lists():
    blocks = torch.tensor([[[[3, 0, 7], [5, 9, 9]]]], dtype=torch.int32)  # second row: count 1, rest garbage
    counts = torch.tensor([[[2, 1]]], dtype=torch.int32)
    comp, ccounts = complement_lists(blocks, counts, 6, rows_per_chunk=1)
    assert ccounts.tolist() == [[[4, 5]]]
    assert comp[0, 0, 0, :4].tolist() == [1, 2, 4, 5]
    assert comp[0, 0, 1, :5].tolist() == [0, 1, 2, 3, 4]


def test_complement_lists_of_one_shared_band():
    """svg's lists are one band expanded over (batch, head): built once, same result as row by row."""
    band = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32)
    shared = band.expand(2, 3, 3, 2)
    counts = torch.full((2, 3, 3), 2, dtype=torch.int32)
    comp, ccounts = complement_lists(shared, counts, 7)
    full, fcounts = complement_lists(shared.contiguous(), counts, 7)
    assert torch.equal(comp, full) and torch.equal(ccounts, fcounts) and comp.is_contiguous()
    assert comp[1, 2, 1, :5].tolist() == [0, 1, 4, 5, 6]


def test_dispatch_on_cpu_uses_reference(monkeypatch):
    monkeypatch.setenv("QUANTSPARSE_KERNELS", "auto")
    q, k, v = make_qkv(1, 1, 3, 40, torch.float16, "cpu", seed=1)
    blocks, counts = random_lists(1, 1, 40, 32, 16, 0.5, "cpu", seed=1)
    out = block_sparse_attention(q, k, v, blocks, counts, txt_len=3, block_q=32, block_k=16)
    ref = block_sparse_attention_reference(q, k, v, blocks, counts, txt_len=3, block_q=32, block_k=16)
    assert torch.equal(out, ref)


def test_bad_inputs_rejected():
    q, k, v = make_qkv(1, 2, 5, 64, torch.float16, "cpu", seed=2)
    blocks, counts = random_lists(1, 2, 64, 32, 16, 0.5, "cpu", seed=2)
    kw = dict(txt_len=5, block_q=32, block_k=16)
    for fn in (block_sparse_attention_triton, block_sparse_attention_reference):
        with pytest.raises(ValueError, match="shapes differ"):
            fn(q, k[:, :, :-1], v, blocks, counts, **kw)
        with pytest.raises(ValueError, match=r"\[B, H, L, D\]"):
            fn(q[0], k[0], v[0], blocks, counts, **kw)
        with pytest.raises(ValueError, match="head dim 64"):
            fn(q[..., :64], k[..., :64], v[..., :64], blocks, counts, **kw)
        with pytest.raises(ValueError, match="dtypes differ"):
            fn(q, k.float(), v, blocks, counts, **kw)
        with pytest.raises(ValueError, match="float16 or bfloat16"):
            fn(q.float(), k.float(), v.float(), blocks, counts, **kw)
        with pytest.raises(ValueError, match="txt_len"):
            fn(q, k, v, blocks, counts, txt_len=70, block_q=32, block_k=16)
        with pytest.raises(ValueError, match="mode"):
            fn(q, k, v, blocks, counts, mode="window", **kw)
        with pytest.raises(ValueError, match="block_k"):
            fn(q, k, v, blocks, counts, txt_len=5, block_q=32, block_k=24)
        with pytest.raises(ValueError, match="NQB"):
            fn(q, k, v, blocks[:, :, :1], counts, **kw)
        with pytest.raises(ValueError, match="int32"):
            fn(q, k, v, blocks.long(), counts, **kw)
        with pytest.raises(ValueError, match="kv_counts"):
            fn(q, k, v, blocks, counts[..., :1], **kw)
        bad = blocks.clone()
        bad[0, 1, 1, 0] = 4  # NKB = 4: one past the last block
        c1 = counts.clone()
        c1[0, 1, 1] = max(1, int(c1[0, 1, 1]))
        with pytest.raises(ValueError, match="outside"):
            fn(q, k, v, bad, c1, **kw)
        with pytest.raises(ValueError, match="MAXK"):
            fn(q, k, v, blocks, counts + blocks.shape[3] + 1, **kw)
        dup = torch.tensor([1, 1, 2, 3], dtype=torch.int32).expand(1, 2, 2, 4).contiguous()
        with pytest.raises(ValueError, match="twice"):
            fn(q, k, v, dup, torch.full((1, 2, 2), 2, dtype=torch.int32), **kw)
        with pytest.raises(ValueError, match="key_padding"):
            fn(q, k, v, blocks, counts, key_padding=torch.ones(1, 69, dtype=torch.int64), **kw)


# ---------------------------------------------------------------- compiled, on the GPU


def _gpu_case(seed, l_img=4096 + 37, txt=256 - 13, b=2, h=3, density=0.15):
    q, k, v = make_qkv(b, h, txt, l_img, torch.bfloat16, "cuda", seed)
    blocks, counts = random_lists(b, h, l_img, 128, 64, density, "cuda", seed)
    pad = torch.ones(b, txt + l_img, dtype=torch.bool, device="cuda")
    pad[1, txt - 40:txt] = False
    return q, k, v, blocks, counts, txt, pad


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["sparse", "dense", "complement"])
def test_gpu_matches_reference(mode):
    q, k, v, blocks, counts, txt, pad = _gpu_case(seed=1)
    kw = dict(txt_len=txt, key_padding=pad, mode=mode, return_lse=True)
    out, lse = block_sparse_attention_triton(q, k, v, blocks, counts, **kw)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, blocks, counts, **kw)
    close(out, ref, torch.bfloat16)
    check_lse(lse, ref_lse)


@pytest.mark.gpu
def test_gpu_sparse_plus_complement_is_dense():
    q, k, v, blocks, counts, txt, pad = _gpu_case(seed=2, density=0.4)
    kw = dict(txt_len=txt, key_padding=pad, return_lse=True)
    o_s, l_s = block_sparse_attention_triton(q, k, v, blocks, counts, mode="sparse", **kw)
    o_c, l_c = block_sparse_attention_triton(q, k, v, blocks, counts, mode="complement", **kw)
    o_d, l_d = block_sparse_attention_triton(q, k, v, blocks, counts, mode="dense", **kw)
    merged, l_m = merge_attention(o_s, l_s, o_c, l_c)
    assert float((l_m - l_d).abs().max()) < 1e-3
    close(merged, o_d, torch.bfloat16)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=pad[:, None, None, :])
    close(o_d, sdpa, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_refresh_and_temporal_match_reference():
    q, k, v, blocks, counts, txt, pad = _gpu_case(seed=4, l_img=5 * 16 * 24, txt=200)
    grid = (5, 16, 24)
    temporal = torch.tensor([[True, False, True], [False, True, False]], device="cuda")
    kw = dict(txt_len=txt, key_padding=pad, temporal=temporal, grid=grid)
    for mode in ("sparse", "refresh"):
        got = block_sparse_attention_triton(q, k, v, blocks, counts, mode=mode, return_lse=True, **kw)
        ref = block_sparse_attention_reference(q, k, v, blocks, counts, mode=mode, return_lse=True, **kw)
        close(got[0], ref[0], torch.bfloat16)
        check_lse(got[-1], ref[-1])
        if mode == "refresh":
            assert float((got[1] - ref[1]).abs().max()) < 3e-2


@pytest.mark.gpu
def test_gpu_dispatch_and_strided_input():
    """ComfyUI hands q, k, v as [B, L, H, D] views transposed to [B, H, L, D]: no copy needed."""
    q, k, v, blocks, counts, txt, _ = _gpu_case(seed=3, l_img=1000, txt=77)
    qs, ks, vs = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    out = block_sparse_attention(qs, ks, vs, blocks, counts, txt_len=txt)
    ref = block_sparse_attention_reference(q, k, v, blocks, counts, txt_len=txt)
    close(out, ref, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_720p_strided_views_all_modes():
    """HunyuanVideo 720p as ComfyUI's single blocks hand it: 24 heads, 256 text + 118,800 video tokens,
    q/k/v as views of one fused [B, L, 21504] linear output (row stride 21,504: token x stride
    overflows int32); svg selection, then every mode. Same results as on contiguous copies (the
    strides only change addressing), and nothing out of bounds."""
    from comfyui_quantsparse.quantsparse.sparse.masks import build_mask
    from comfyui_quantsparse.quantsparse.sparse.masked import masked_attention
    grid, txt = (33, 45, 80), 256
    seq = txt + math.prod(grid)
    gen = torch.Generator(device="cuda").manual_seed(5)
    fused = torch.randn(1, seq, 3 * 3072 + 12288, device="cuda", dtype=torch.bfloat16, generator=gen)
    q, k, v = (fused[..., i * 3072:(i + 1) * 3072].view(1, seq, 24, 128).transpose(1, 2) for i in range(3))
    mask = build_mask(q, k, v, mode="svg", grid=grid, txt_len=txt, density=0.15, block_q=128, block_k=128)
    contiguous = [x.contiguous() for x in (q, k, v)]
    for mode in ("sparse", "refresh", "dense"):
        got = masked_attention(q, k, v, mask, grid=grid, txt_len=txt, mode=mode)
        torch.cuda.synchronize()
        ref = masked_attention(*contiguous, mask, grid=grid, txt_len=txt, mode=mode)
        got, ref = (got[0], ref[0]) if mode == "refresh" else (got, ref)
        assert torch.isfinite(got).all() and torch.equal(got, ref), mode


@pytest.mark.gpu
def test_gpu_wan_720p_views_without_text_all_modes():
    """Wan 14B self-attention at 1280x720x81 as ComfyUI's Wan hands it: 40 heads, no text, 75,600 video
    tokens, q/k/v [B, L, H * D] viewed as [B, H, L, D], uncond and cond batched; svg selection, then every
    mode: the same results as on contiguous copies, and nothing out of bounds."""
    from comfyui_quantsparse.quantsparse.sparse.masks import build_mask
    from comfyui_quantsparse.quantsparse.sparse.masked import masked_attention
    grid = (21, 45, 80)
    seq = math.prod(grid)
    gen = torch.Generator(device="cuda").manual_seed(6)
    q, k, v = (torch.randn(2, seq, 40 * 128, device="cuda", dtype=torch.bfloat16, generator=gen)
               .view(2, seq, 40, 128).transpose(1, 2) for _ in range(3))
    mask = build_mask(q, k, v, mode="svg", grid=grid, txt_len=0, density=0.15, block_q=128, block_k=128)
    contiguous = [x.contiguous() for x in (q, k, v)]
    for mode in ("sparse", "refresh", "dense"):
        got = masked_attention(q, k, v, mask, grid=grid, txt_len=0, mode=mode)
        torch.cuda.synchronize()
        ref = masked_attention(*contiguous, mask, grid=grid, txt_len=0, mode=mode)
        got, ref = (got[0], ref[0]) if mode == "refresh" else (got, ref)
        assert torch.isfinite(got).all() and torch.equal(got, ref), mode
    dense = masked_attention(q, k, v, mask, grid=grid, txt_len=0, mode="dense")
    close(dense[:, :, :4096], F.scaled_dot_product_attention(*contiguous)[:, :, :4096], torch.bfloat16)


@pytest.mark.parametrize("mode", ["sparse", "refresh"])
def test_int64_offsets_path_matches_reference(mode, monkeypatch):
    """The int64-offset specialisation (taken when tokens x row stride pass 2^31) computes the same:
    forced on here by a fake 2^31 threshold."""
    import comfyui_quantsparse.kernels.sparse_attention as sa
    device, q, k, v, temporal, grid, txt, blocks, counts = _temporal_lists_case(41)
    kw = dict(txt_len=txt, block_q=16, block_k=16, mode=mode, temporal=temporal, grid=grid)
    plain = block_sparse_attention_triton(q, k, v, blocks, counts, **kw)
    calls = []
    real = sa._sparse_attn_kernel

    class Spy:
        def __getitem__(self, launch_grid):
            def launch(*args, **kwargs):
                calls.append(kwargs["I64"])
                kwargs["I64"] = True
                return real[launch_grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(sa, "_sparse_attn_kernel", Spy())
    wide = block_sparse_attention_triton(q, k, v, blocks, counts, **kw)
    assert calls == [False]
    for a, b in zip(plain if mode == "refresh" else [plain], wide if mode == "refresh" else [wide]):
        assert torch.equal(a, b)
