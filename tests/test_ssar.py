"""SSAR: schedule, refresh = dense, sparse + cached correction between, rank-r = SVD, order 1 vs 2, resets."""

from __future__ import annotations

import pytest
import torch

from comfyui_quantsparse.quantsparse.sparse.masks import svg_mask, topk_mask
from comfyui_quantsparse.quantsparse.sparse.masked import masked_attention
from comfyui_quantsparse.quantsparse.sparse.config import SparseConfig
from comfyui_quantsparse.quantsparse.sparse.ssar import (
    DENSE, EXACT_LAYOUT, REFRESH, SPARSE, CacheLayout, SSARState, cache_bytes_for, correction_error,
    extrapolation_weight, gram_matrix,
    merged_residual, rank_projection, step_kind, warmup_steps,
)

GRID, TXT = (4, 4, 8), 6
KEY = ("double", 3, 0)


def attention_pair(seed, mode="svg", density=0.25):
    """(dense, sparse) outputs [1, 2, L, 128] of one attention call under a real mask."""
    g = torch.Generator().manual_seed(seed)
    n = TXT + GRID[0] * GRID[1] * GRID[2]
    # FP16 operands (what the kernel takes); outputs in float32 so that the SSAR algebra is checked exactly.
    q, k, v = (torch.randn(1, 2, n, 128, generator=g).half() for _ in range(3))
    if mode == "svg":
        m = svg_mask(q, k, v, grid=GRID, txt_len=TXT, density=density, block_q=32, block_k=16)
    else:
        m = topk_mask(q, k, txt_len=TXT, density=density, block_q=32, block_k=16)
    dense = torch.softmax(q.float() @ k.float().transpose(-1, -2) / 128 ** 0.5, -1) @ v.float()
    sparse = masked_attention(q, k, v, m, grid=GRID, txt_len=TXT).float()
    return dense, sparse, (q, k, v, m)


# ------------------------------------------------------------------------------ schedule

def test_schedule_warmup_then_refresh_every_interval():
    cfg = SparseConfig(dense_warmup=0.2, refresh_interval=5)
    kinds = [step_kind(s, 20, cfg) for s in range(20)]
    assert warmup_steps(cfg, 20) == 4
    # Steps 0-2 dense; the last warm-up step (3) is a refresh, then every 5 steps.
    assert kinds[:3] == [DENSE] * 3
    assert [s for s, k in enumerate(kinds) if k == REFRESH] == [3, 8, 13, 18]
    assert all(k == SPARSE for s, k in enumerate(kinds) if s > 3 and (s - 3) % 5)
    # No warm-up: the first step refreshes (there is no cache yet).
    assert step_kind(0, 10, SparseConfig(dense_warmup=0.0)) == REFRESH
    # SSAR off: warm-up then plain sparse, never a refresh.
    off = [step_kind(s, 20, SparseConfig(dense_warmup=0.2, ssar_order=0)) for s in range(20)]
    assert off == [DENSE] * 4 + [SPARSE] * 16
    assert {step_kind(s, 7, SparseConfig(density=1.0)) for s in range(7)} == {DENSE}
    with pytest.raises(ValueError, match="sampling step"):
        step_kind(-1, 10, cfg)


# ------------------------------------------------------------------------------ rank-r projection

@pytest.mark.parametrize("rank", [1, 4, 16, 64])
def test_rank_projection_equals_svd_truncation(rank):
    g = torch.Generator().manual_seed(rank)
    # A decaying spectrum (distinct singular values), batched over [B, H].
    x = torch.randn(2, 3, 500, 128, generator=g, dtype=torch.float64)
    x = x * torch.logspace(0, -2, 128, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    truth = (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]
    got = rank_projection(x.float(), rank).double()
    assert (got - truth).norm() / truth.norm() < 2e-4
    assert torch.allclose(rank_projection(x.float(), 128).double(), x, atol=1e-4)


def test_extrapolation_weight_is_the_window_mean_of_a_linear_change():
    """Step j of a window of tau needs j / tau of the last interval's change; one cached tensor gets the mean."""
    for tau in (1, 2, 5, 10):
        sparse_steps = range(1, tau)
        want = sum(j / tau for j in sparse_steps) / len(sparse_steps) if tau > 1 else 0.0
        assert extrapolation_weight(tau) == pytest.approx(want)
    assert extrapolation_weight(1) == 0.0  # every step refreshes: nothing to extrapolate


@pytest.mark.parametrize("rows", [100, 2048, 5000])
def test_chunked_gram_matrix_equals_the_float64_product(rows):
    x = torch.randn(1, 3, rows, 128, generator=torch.Generator().manual_seed(rows))
    want = x.double().transpose(-1, -2) @ x.double()
    got = gram_matrix(x)
    assert got.dtype == torch.float64 and float((got - want).abs().max() / want.abs().max()) < 1e-6


def test_rank_projection_of_zero_and_low_rank_matrices():
    """A zero residual (nothing dropped) and one of rank below the requested rank project exactly."""
    zero = torch.zeros(1, 2, 64, 128)
    assert torch.equal(rank_projection(zero, 16), zero)
    g = torch.Generator().manual_seed(3)
    low = torch.randn(1, 2, 64, 3, generator=g) @ torch.randn(1, 2, 3, 128, generator=g)
    assert torch.allclose(rank_projection(low, 16), low, atol=1e-4)


# ------------------------------------------------------------------------------ refresh / between

@pytest.mark.parametrize("mode", ["svg", "topk"])
def test_refresh_returns_dense_and_between_is_sparse_plus_exact_correction(mode):
    cfg = SparseConfig(rank=4, ssar_order=2)
    st = SSARState(cfg, total_steps=20, layout=EXACT_LAYOUT)
    d1, s1, _ = attention_pair(1, mode)
    d2, s2, _ = attention_pair(2, mode)
    s3 = attention_pair(3, mode)[1]

    out = st.refresh(KEY, d1, s1, txt_len=TXT)
    assert torch.equal(out, d1)
    D1 = (d1 - s1)[:, :, TXT:]
    assert (d1 - s1)[:, :, :TXT].abs().max() < 2e-3, "text rows are dense in the sparse pass too (FP16 output)"
    # First refresh: no D_prev yet, so C = D.
    between = st.correct(KEY, s2, txt_len=TXT)
    assert torch.allclose(between[:, :, TXT:], s2[:, :, TXT:] + D1, atol=1e-6)
    assert torch.equal(between[:, :, :TXT], s2[:, :, :TXT])

    out = st.refresh(KEY, d2, s2, txt_len=TXT)
    assert torch.equal(out, d2)
    D2 = (d2 - s2)[:, :, TXT:]
    C2 = D2 + extrapolation_weight(cfg.refresh_interval) * rank_projection(D2 - D1, 4)
    assert torch.allclose(st.correction(KEY), C2, atol=1e-5)
    between = st.correct(KEY, s3, txt_len=TXT)
    assert torch.allclose(between[:, :, TXT:], s3[:, :, TXT:] + C2, atol=1e-5)
    # The second-order term is really there.
    assert (C2 - D2).norm() > 1e-2 * D2.norm()
    assert st.stats == {"refreshes": 2, "corrections": 2, "misses": 0}


def test_order_1_caches_the_residual_and_order_0_caches_nothing():
    d1, s1, _ = attention_pair(1)
    d2, s2, _ = attention_pair(2)
    s3 = attention_pair(3)[1]
    first = SSARState(SparseConfig(ssar_order=1), 10, EXACT_LAYOUT)
    first.refresh(KEY, d1, s1, txt_len=TXT)
    first.refresh(KEY, d2, s2, txt_len=TXT)
    assert torch.allclose(first.correction(KEY), (d2 - s2)[:, :, TXT:], atol=1e-6)
    assert first.entries[KEY].d_prev is None, "first order needs no D_prev"
    got = first.correct(KEY, s3, txt_len=TXT)
    assert torch.allclose(got[:, :, TXT:], (s3 + (d2 - s2))[:, :, TXT:], atol=1e-5)
    assert torch.equal(got[:, :, :TXT], s3[:, :, :TXT])

    off = SSARState(SparseConfig(ssar_order=0), 10, EXACT_LAYOUT)
    assert torch.equal(off.refresh(KEY, d1, s1, txt_len=TXT), d1)
    assert off.cache_bytes() == 0 and not off.entries
    assert torch.equal(off.correct(KEY, s3, txt_len=TXT), s3)

    # Order 2 differs from order 1 only from the second refresh on.
    second = SSARState(SparseConfig(ssar_order=2, rank=8), 10, EXACT_LAYOUT)
    second.refresh(KEY, d1, s1, txt_len=TXT)
    assert torch.allclose(second.correction(KEY), (d1 - s1)[:, :, TXT:], atol=1e-6)
    second.refresh(KEY, d2, s2, txt_len=TXT)
    assert not torch.allclose(second.correction(KEY), first.correction(KEY), atol=1e-3)


def test_merged_refresh_equals_dense_for_one_dense_pass():
    """Sparse + complement passes of the kernel (one dense pass of work) give O_d and D exactly."""
    dense, sparse, (q, k, v, m) = attention_pair(4)
    o_s, lse_s = masked_attention(q, k, v, m, grid=GRID, txt_len=TXT, return_lse=True)
    o_c, lse_c = masked_attention(q, k, v, m, grid=GRID, txt_len=TXT, mode="complement", return_lse=True)
    assert torch.isinf(lse_c[:, :, :TXT]).all()
    o_c[:, :, :TXT] = float("nan")  # whatever a kernel leaves in empty rows must not leak
    merged, resid = merged_residual(o_s, lse_s, o_c, lse_c)
    assert merged.dtype == torch.float16 and resid.dtype == torch.float32
    assert torch.allclose(merged.float(), dense, atol=2e-3)  # FP16 output rounding
    assert torch.allclose(resid, dense - o_s.float(), atol=2e-3)
    assert resid[:, :, :TXT].abs().max() == 0

    st = SSARState(SparseConfig(), 10, EXACT_LAYOUT)
    out = st.refresh_merged(KEY, o_s, lse_s, o_c, lse_c, txt_len=TXT)
    assert torch.equal(out, merged)
    assert torch.allclose(st.correction(KEY).float(), resid[:, :, TXT:], atol=1e-3)  # stored in the output dtype


def test_compact_layout_adds_exactly_what_it_stores_and_reports_its_size():
    lay = CacheLayout(c_rank=8, d_rank=4, fp8=True, offload_d_prev=True)
    cfg = SparseConfig(rank=4, ssar_order=2)
    st = SSARState(cfg, 10, lay)
    d1, s1, _ = attention_pair(1)
    d2, s2, _ = attention_pair(2)
    st.refresh(KEY, d1, s1, txt_len=TXT)
    st.refresh(KEY, d2, s2, txt_len=TXT)
    stored = st.correction(KEY)
    out = st.correct(KEY, s2, txt_len=TXT)
    assert torch.allclose(out[:, :, TXT:], s2[:, :, TXT:] + stored, atol=1e-5)
    n = GRID[0] * GRID[1] * GRID[2]
    assert st.cache_bytes() == cache_bytes_for(lay, 2, tokens=n, heads=2, blocks=1, dtype_bytes=4)
    assert st.host_bytes() == st.entries[KEY].d_prev.nbytes > 0
    assert st.cache_bytes() < 0.2 * cache_bytes_for(EXACT_LAYOUT, 2, tokens=n, heads=2, blocks=1, dtype_bytes=4)
    # The stored correction is the best rank-8 one up to FP8 rounding (D_prev compression aside).
    err = correction_error((d1 - s1)[:, :, TXT:], (d2 - s2)[:, :, TXT:], rank=4, layout=lay)
    assert 0 < err["rel_error"] < 1
    assert correction_error((d1 - s1), (d2 - s2), rank=4, layout=EXACT_LAYOUT)["rel_error"] < 1e-6
    assert correction_error((d1 - s1), (d2 - s2), rank=4, layout=CacheLayout(None, None, fp8=True))["rel_error"] < 0.05


def test_full_size_figures():
    # 60 blocks x 118,800 tokens x 24 heads x 128: a full BF16 C is 0.73 GB a block, 44 GB in all.
    full = cache_bytes_for(EXACT_LAYOUT, 1, tokens=118_800, heads=24, blocks=60)
    assert full == 60 * 118_800 * 24 * 128 * 2
    assert cache_bytes_for(CacheLayout(), 2, tokens=118_800, heads=24, blocks=60) <= 4e9


# ------------------------------------------------------------------------------ per-run state

def test_state_resets_between_runs():
    d1, s1, _ = attention_pair(1)
    s2 = attention_pair(2)[1]
    st = SSARState(SparseConfig(), 10, EXACT_LAYOUT)
    st.refresh(KEY, d1, s1, txt_len=TXT)
    assert st.cache_bytes() > 0
    st.reset()
    assert st.cache_bytes() == 0 and st.stats["refreshes"] == 0
    assert torch.equal(st.correct(KEY, s2, txt_len=TXT), s2)  # nothing cached: plain sparse, counted
    assert st.stats["misses"] == 1


def test_a_second_run_with_other_settings_does_not_reuse_the_first_runs_cache():
    d1, s1, _ = attention_pair(1)
    s2 = attention_pair(2)[1]
    st = SSARState(SparseConfig(density=0.25, rank=4), 10, EXACT_LAYOUT)
    st.refresh(KEY, d1, s1, txt_len=TXT)
    assert not torch.equal(st.correct(KEY, s2, txt_len=TXT), s2)

    # The same object, started for another run with other settings, holds nothing of the first.
    st.begin_run(SparseConfig(density=0.4, rank=8, ssar_order=1), total_steps=30)
    assert st.config.density == 0.4 and st.total_steps == 30 and st.cache_bytes() == 0
    assert torch.equal(st.correct(KEY, s2, txt_len=TXT), s2)

    # A fresh state per run (what the override does) is empty too.
    fresh = SSARState(SparseConfig(density=0.4), 30)
    assert fresh.cache_bytes() == 0 and torch.equal(fresh.correct(KEY, s2, txt_len=TXT), s2)

    # A state wrongly kept across a resolution change fails loudly instead of adding a stale correction.
    st.refresh(KEY, d1, s1, txt_len=TXT)
    bigger = torch.zeros(1, 2, TXT + 2 * GRID[0] * GRID[1] * GRID[2], 128)
    with pytest.raises(ValueError, match="fresh SSARState"):
        st.correct(KEY, bigger, txt_len=TXT)
    with pytest.raises(ValueError, match="fresh SSARState"):
        st.refresh(KEY, bigger, bigger, txt_len=TXT)


def test_keys_are_independent():
    d1, s1, _ = attention_pair(1)
    d2, s2, _ = attention_pair(2)
    st = SSARState(SparseConfig(), 10, EXACT_LAYOUT)
    st.refresh(("double", 0, 0), d1, s1, txt_len=TXT)
    st.refresh(("double", 0, 1), d2, s2, txt_len=TXT)  # uncond row of the same block
    assert torch.allclose(st.correction(("double", 0, 0)), (d1 - s1)[:, :, TXT:], atol=1e-6)
    assert torch.allclose(st.correction(("double", 0, 1)), (d2 - s2)[:, :, TXT:], atol=1e-6)
    assert st.correction(("single", 0, 0)) is None


def test_bad_state_inputs():
    with pytest.raises(ValueError, match="SparseConfig"):
        SSARState({"density": 0.1}, 10)
    with pytest.raises(ValueError, match="total_steps"):
        SSARState(SparseConfig(), 0)
    with pytest.raises(ValueError, match="c_rank"):
        CacheLayout(c_rank=0)
