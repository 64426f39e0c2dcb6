"""Masks: density reached, diagonal kept, svg head choice on synthetic patterns, permutation round trip."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_quantsparse.kernels.svg_probe import svg_probe_reference
from comfyui_quantsparse.quantsparse.sparse.masks import (
    band_blocks, block_density, build_mask, diagonal_blocks, num_blocks, permute_heads, sample_rows,
    svg_mask, temporal_permutation, token_mask, topk_mask, unpermute_heads,
)
from comfyui_quantsparse.quantsparse.sparse.masked import masked_attention
from comfyui_quantsparse.quantsparse.sparse.config import SparseConfig


def dense_mask_attention(q, k, v, mask, *, grid, txt_len, complement=False):
    """Output and lse in float32; complement = the unlisted video blocks only (no text columns or rows)."""
    temporal = mask.temporal if mask.temporal is not None else torch.zeros(q.shape[:2], dtype=torch.bool)
    qp, kp, vp = (permute_heads(x.float(), temporal, grid, txt_len) for x in (q, k, v))
    keep = token_mask(mask, txt_len)
    if complement:
        keep = ~keep
        keep[:, :, :, :txt_len] = False
    logits = (qp @ kp.transpose(-1, -2)) * q.shape[-1] ** -0.5
    logits = logits.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(logits, -1)
    out = torch.nan_to_num(torch.softmax(logits, -1)) @ vp
    return (unpermute_heads(out, temporal, grid, txt_len),
            unpermute_heads(lse[..., None], temporal, grid, txt_len)[..., 0])


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def qkv(b, h, txt, grid, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    n = txt + grid[0] * grid[1] * grid[2]
    return [torch.randn(b, h, n, 128, generator=g).to(device) for _ in range(3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["svg", "topk"])
@pytest.mark.parametrize("density", [0.1, 0.15, 0.25, 0.4, 1.0])
@pytest.mark.parametrize("grid,bq,bk", [((5, 6, 10), 32, 16), ((3, 7, 9), 64, 16), ((4, 8, 8), 128, 64)])
def test_masks_reach_the_requested_density(device, mode, density, grid, bq, bk):
    txt = 13
    q, k, v = qkv(2, 3, txt, grid, device=device)
    img = grid[0] * grid[1] * grid[2]
    m = build_mask(q, k, v, mode=mode, grid=grid, txt_len=txt, density=density, block_q=bq, block_k=bk)
    nqb, nkb = num_blocks(img, bq), num_blocks(img, bk)
    assert m.kv_blocks.dtype == torch.int32 and m.kv_counts.dtype == torch.int32
    assert m.kv_counts.shape == (2, 3, nqb) and m.kv_blocks.shape[:3] == (2, 3, nqb)
    assert m.kv_blocks.device.type == device
    diag_max = int(diagonal_blocks(img, bq, bk).sum(1).max())
    achieved = m.density()
    assert achieved >= density - 1e-9, (achieved, density)
    # Within one block per row, except that topk keeps the whole diagonal even when the budget is smaller.
    slack = 1.0 / nkb if mode == "svg" or math.ceil(density * nkb) >= diag_max else diag_max / nkb
    assert achieved < density + slack + 1e-9, (achieved, density, slack)
    # Every listed block is a distinct, legal video key block.
    for row, cnt in zip(m.kv_blocks.reshape(-1, m.kv_blocks.shape[-1]).tolist(), m.kv_counts.reshape(-1).tolist()):
        listed = row[:cnt]
        assert len(set(listed)) == cnt and all(0 <= x < nkb for x in listed)
    # The token-level mask agrees with the block count.
    tm = token_mask(m, txt)[:, :, txt:, txt:]
    assert tm.any(-1).all(), "every video query keeps some video key"
    assert block_density(m.kv_counts, nkb) == pytest.approx(achieved)


@pytest.mark.parametrize("bq,bk", [(32, 16), (64, 16), (128, 64)])
def test_topk_keeps_the_diagonal_even_against_the_scores(bq, bk):
    grid, txt = (4, 8, 8), 5
    q, k, _ = qkv(1, 2, txt, grid, seed=3)
    img = 4 * 8 * 8
    # Make the diagonal the worst-scoring blocks: keys near each query point away from it.
    k[:, :, txt:] = -q[:, :, txt:] * 5
    m = topk_mask(q, k, txt_len=txt, density=0.2, block_q=bq, block_k=bk)
    diag = diagonal_blocks(img, bq, bk)
    kept = torch.zeros(1, 2, *diag.shape, dtype=torch.bool)
    kept.scatter_(-1, m.kv_blocks.long(), True)
    assert kept[..., diag].all()


def test_topk_picks_the_highest_pooled_scores():
    grid, txt, bq, bk = (2, 8, 8), 0, 32, 16
    q, k, _ = qkv(1, 1, txt, grid, seed=1)
    d = torch.zeros(128)
    d[0] = 1.0
    q[..., :] = d * 3
    k[..., :] = 0
    k[0, 0, 7 * 16:8 * 16] = d * 10  # key block 7 has by far the best score for every query
    m = topk_mask(q, k, txt_len=txt, density=0.2, block_q=bq, block_k=bk)  # 2 diagonal + block 7
    assert m.kv_counts.unique().tolist() == [2]  # ceil(0.2*8) = 2 = the diagonal count
    m = topk_mask(q, k, txt_len=txt, density=0.3, block_q=bq, block_k=bk)
    assert m.kv_counts.unique().tolist() == [3]
    assert (m.kv_blocks == 7).any(-1).all()


def patterned_qkv(grid, txt, pattern, seed=0):
    """One head whose attention is strictly spatial (same frame) or temporal (same place, all frames)."""
    t, h, w = grid
    n = t * h * w
    g = torch.Generator().manual_seed(seed)
    tt = torch.arange(n) // (h * w)
    ss = torch.arange(n) % (h * w)
    label = tt if pattern == "spatial" else ss
    emb = torch.zeros(n, 128)
    emb[torch.arange(n), label] = 1.0
    q = torch.cat([torch.randn(txt, 128, generator=g) * 0.1, emb * 12], 0)
    k = torch.cat([torch.randn(txt, 128, generator=g) * 0.1, emb * 12], 0)
    v = torch.randn(txt + n, 128, generator=g)
    return q, k, v


def test_svg_picks_temporal_and_spatial_heads():
    grid, txt = (8, 4, 8), 7  # 32 tokens a frame; a band of 4 x 16 = 64 tokens is 2 frames or 8 frames x 8 places
    heads = [patterned_qkv(grid, txt, p, seed=i) for i, p in enumerate(["spatial", "temporal", "temporal", "spatial"])]
    q, k, v = (torch.stack([hd[i] for hd in heads])[None].half() for i in range(3))
    m = svg_mask(q, k, v, grid=grid, txt_len=txt, density=0.25, block_q=32, block_k=16, sample_rows_count=16)
    assert m.temporal.tolist() == [[False, True, True, False]]
    # And the chosen layout makes the sparse output close to dense (the pattern lies inside the band).
    dense = torch.softmax(q.float() @ k.float().transpose(-1, -2) / 128 ** 0.5, -1) @ v.float()
    sparse = masked_attention(q, k, v, m, grid=grid, txt_len=txt).float()
    err = ((sparse - dense)[:, :, txt:].norm(dim=(-1, -2)) / dense[:, :, txt:].norm(dim=(-1, -2)))
    assert err.max() < 1e-2, err


@pytest.mark.parametrize("mode", ["svg", "topk"])
def test_the_kernel_runs_a_mask_as_the_dense_mask_reference(mode):
    """Kernel (through masked_attention, temporal heads permuted) == an L x L boolean-mask softmax."""
    grid, txt = (3, 6, 8), 11  # 144 video tokens: neither 32 nor 16 divide the text length
    q, k, v = (x.half() for x in qkv(2, 4, txt, grid, seed=5))
    m = build_mask(q, k, v, mode=mode, grid=grid, txt_len=txt, density=0.3, block_q=32, block_k=16)
    if mode == "svg":
        m = type(m)(**{**m.__dict__, "temporal": torch.tensor([[True, False, True, False], [False, True, True, False]])})
    for complement in (False, True):
        out, lse = masked_attention(q, k, v, m, grid=grid, txt_len=txt, return_lse=True,
                                    mode="complement" if complement else "sparse")
        ref_out, ref_lse = dense_mask_attention(q, k, v, m, grid=grid, txt_len=txt, complement=complement)
        assert torch.allclose(out.float(), ref_out, atol=2e-3), complement
        live = torch.isfinite(ref_lse)
        assert torch.equal(live, torch.isfinite(lse))
        assert torch.allclose(lse[live], ref_lse[live], atol=1e-3)


def test_svg_honours_the_text_padding_mask():
    """The padding reaches the probe: the choice is the probe's on the padded keys."""
    grid, txt = (4, 4, 4), 8
    q, k, v = qkv(1, 2, txt, grid, seed=2)
    pad = torch.ones(1, txt + 64, dtype=torch.bool)
    pad[:, 4:txt] = False
    m = svg_mask(q, k, v, grid=grid, txt_len=txt, density=0.3, block_q=16, block_k=16, key_padding=pad)
    band = band_blocks(64, 16, 16, m.kv_counts.max().item())
    rows = sample_rows(64, 64)
    _, inverse = temporal_permutation(grid)
    err = svg_probe_reference(q, k, v, rows, band[rows // 16, 0], band[inverse[rows] // 16, 0], txt_len=txt,
                              grid=grid, band_block=16, keep=int(m.kv_counts.max()), key_padding=pad)
    assert torch.equal(m.temporal, err[1] < err[0])


@pytest.mark.parametrize("device", DEVICES)
def test_permutation_round_trip(device):
    grid, txt = (3, 4, 5), 6
    perm, inv = temporal_permutation(grid, device=device)
    n = 60
    assert torch.equal(perm[inv], torch.arange(n, device=device))
    assert torch.equal(inv[perm], torch.arange(n, device=device))
    # Frame-major: the first 3 permuted tokens are spatial position 0 in frames 0, 1, 2.
    assert perm[:3].tolist() == [0, 20, 40]
    x = torch.randn(2, 3, txt + n, 8, device=device)
    heads = torch.tensor([[True, False, True], [False, True, False]], device=device)
    y = permute_heads(x, heads, grid, txt)
    assert torch.equal(y[~heads], x[~heads])
    assert torch.equal(y[:, :, :txt], x[:, :, :txt])
    assert torch.equal(y[0, 0, txt:], x[0, 0, txt + perm])
    assert torch.equal(unpermute_heads(y, heads, grid, txt), x)


def test_bad_inputs_fail_clearly():
    q, k, v = qkv(1, 1, 4, (2, 2, 2))
    with pytest.raises(ValueError, match="latent grid"):
        svg_mask(q, k, v, grid=(2, 2, 3), txt_len=4, density=0.5, block_q=16, block_k=16)
    with pytest.raises(ValueError, match="mask mode"):
        build_mask(q, k, v, mode="band", grid=(2, 2, 2), txt_len=4, density=0.5)
    with pytest.raises(ValueError, match="density"):
        topk_mask(q, k, txt_len=4, density=0.0, block_q=16, block_k=16)


def test_sparse_config_validates_and_round_trips():
    c = SparseConfig()
    assert (c.density, c.mask_mode, c.refresh_interval, c.rank, c.ssar_order) == (0.15, "svg", 5, 16, 1)
    assert SparseConfig.from_dict(c.to_dict()) == c
    assert SparseConfig.from_dict({"density": 0.25}).density == 0.25
    for bad, match in [({"density": 0}, "density"), ({"density": 1.5}, "density"), ({"density": True}, "density"),
                       ({"mask_mode": "x"}, "mask_mode"), ({"dense_warmup": -0.1}, "dense_warmup"),
                       ({"refresh_interval": 0}, "refresh_interval"), ({"rank": 0}, "rank"),
                       ({"rank": 129}, "rank"), ({"ssar_order": 3}, "ssar_order"), ({"block_q": 100}, "block_q"),
                       ({"block_k": 8}, "block_k"), ({"svg_sample_rows": 0}, "svg_sample_rows")]:
        with pytest.raises(ValueError, match=match):
            SparseConfig(**bad)
    with pytest.raises(ValueError, match="unknown sparse config fields"):
        SparseConfig.from_dict({"densty": 0.2})
    with pytest.raises(ValueError, match="JSON object"):
        SparseConfig.from_dict([0.2])
