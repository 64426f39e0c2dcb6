"""The attention override's per-run logic (CPU, eager kernel reference): which calls run dense, what a
refresh returns, what the steps between refreshes return, cond/uncond keys, run isolation, stats."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from comfyui_quantsparse.quantsparse.sparse.override import (SparseRun, format_summary, key_padding_from_mask,
                                                               sparse_attention_call, step_index)
from comfyui_quantsparse.quantsparse.models.hunyuan_video.dims import HunyuanVideoDims
from comfyui_quantsparse.quantsparse.models.hunyuan_video.model import HunyuanVideo
from comfyui_quantsparse.quantsparse.models.hunyuan_video.random_weights import make_random_state_dict
from comfyui_quantsparse.quantsparse.sparse.masks import build_mask
from comfyui_quantsparse.quantsparse.sparse.masked import masked_attention
from comfyui_quantsparse.quantsparse.sparse.config import SparseConfig
from comfyui_quantsparse.quantsparse.sparse.ssar import DENSE, EXACT_LAYOUT, REFRESH, SPARSE, step_kind

GRID = (2, 4, 8)  # 64 video tokens: 4 query and 4 key blocks of 16
TXT = 8
SEQ = TXT + 64


def qkv(seed, b=1, h=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, SEQ, 128, generator=g).to(torch.bfloat16) for _ in range(3)]


def dense_ref(q, k, v, key_padding=None):
    bias = None
    if key_padding is not None:
        bias = torch.where(key_padding, 0.0, float("-inf"))[:, None, None, :]
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias)


def cfg(**kw):
    base = dict(density=0.5, mask_mode="topk", dense_warmup=0.25, refresh_interval=2, ssar_order=1,
                block_q=16, block_k=16)
    base.update(kw)
    return SparseConfig(**base)


def sigmas(n):
    return torch.linspace(1.0, 0.0, n + 1)


def call(run, q, k, v, step, **kw):
    kw.setdefault("block_type", "double")
    kw.setdefault("block_index", 0)
    return sparse_attention_call(run, q, k, v, step=step, grid=GRID, txt_len=TXT, **kw)


def kinds(config, n):
    return [step_kind(s, n, config) for s in range(n)]


# ---------------------------------------------------------------------------- step index

def test_step_index_finds_position_and_survives_repeats():
    sched = torch.tensor([1.0, 0.5, 0.5, 0.2, 0.0])
    assert step_index(sched, torch.tensor([1.0])) == 0
    assert step_index(sched, torch.tensor([0.5])) == 1
    assert step_index(sched, torch.tensor([0.5]), after=2) == 2  # the repeat is the later step
    assert step_index(sched, torch.tensor([0.2, 0.2])) == 3
    assert step_index(sched, torch.tensor([0.35])) == 2  # a midpoint belongs to the interval it lies in


def test_run_step_of_is_monotonic_through_a_repeated_sigma():
    run = SparseRun(cfg(), torch.tensor([1.0, 0.5, 0.5, 0.0]))
    assert [run.step_of(torch.tensor([s])) for s in (1.0, 0.5, 0.5)] == [0, 1, 1]
    run.last_step = 2
    assert run.step_of(torch.tensor([0.5])) == 2


# ---------------------------------------------------------------------------- per-call behaviour

def test_warmup_steps_use_the_callers_dense_attention():
    config = cfg(dense_warmup=0.5)
    run = SparseRun(config, sigmas(8))
    assert run.kind(0) == DENSE
    q, k, v = qkv(0)
    sentinel = torch.full_like(q, 3.0)
    assert torch.equal(call(run, q, k, v, 0, dense=lambda: sentinel), sentinel)
    # without a dense callable the kernel's dense mode runs: it is dense attention
    out = call(run, q, k, v, 0)
    torch.testing.assert_close(out.float(), dense_ref(q, k, v), atol=2e-2, rtol=2e-2)
    assert run.summary()["dense_steps"] == 1 and run.ssar.entries == {}


def test_refresh_returns_dense_and_sparse_steps_add_the_cached_residual():
    config = cfg(dense_warmup=0.0, refresh_interval=3)
    run = SparseRun(config, sigmas(6), layout=EXACT_LAYOUT)
    assert [run.kind(s) for s in range(3)] == [REFRESH, SPARSE, SPARSE]
    q, k, v = qkv(1)
    out0 = call(run, q, k, v, 0)
    torch.testing.assert_close(out0.float(), dense_ref(q, k, v), atol=2e-2, rtol=2e-2)

    mask = build_mask(q, k, v, mode="topk", grid=GRID, txt_len=TXT, density=0.5, block_q=16, block_k=16)
    assert mask.density() < 1.0
    sparse0 = masked_attention(q, k, v, mask, grid=GRID, txt_len=TXT).float()
    resid = dense_ref(q, k, v)[:, :, TXT:] - sparse0[:, :, TXT:]
    assert resid.abs().max() > 0.05  # the mask really drops something

    # same q, k: same mask; new v: the output is the new sparse output plus the step-0 residual
    v2 = qkv(2)[2]
    out1 = call(run, q, k, v2, 1).float()
    sparse1 = masked_attention(q, k, v2, mask, grid=GRID, txt_len=TXT).float()
    torch.testing.assert_close(out1[:, :, :TXT], sparse1[:, :, :TXT], atol=1e-2, rtol=0)  # text rows: dense
    torch.testing.assert_close(out1[:, :, TXT:], sparse1[:, :, TXT:] + resid, atol=2e-2, rtol=2e-2)
    assert not torch.allclose(out1[:, :, TXT:], sparse1[:, :, TXT:], atol=2e-2)
    s = run.summary()
    assert (s["refresh_steps"], s["sparse_steps"], s["ssar"]["corrections"]) == (1, 1, 1)


def test_refresh_with_the_callers_dense_pass_returns_it_and_caches_dense_minus_sparse():
    """With a dense callable (ComfyUI's attention) a refresh returns that output and caches O_d - O_s of the
    video rows; the next sparse step adds exactly that."""
    run = SparseRun(cfg(dense_warmup=0.0, refresh_interval=3), sigmas(6), layout=EXACT_LAYOUT)
    q, k, v = qkv(1)
    calls = []

    def dense():
        calls.append(1)
        return dense_ref(q, k, v).to(q.dtype)

    out0 = call(run, q, k, v, 0, dense=dense)
    assert calls == [1] and torch.equal(out0, dense_ref(q, k, v).to(q.dtype))
    mask = build_mask(q, k, v, mode="topk", grid=GRID, txt_len=TXT, density=0.5, block_q=16, block_k=16)
    sparse0 = masked_attention(q, k, v, mask, grid=GRID, txt_len=TXT).float()
    resid = out0.float()[:, :, TXT:] - sparse0[:, :, TXT:]
    stored = run.ssar.correction(("double", 0, "all", 0))  # kept in the output's dtype
    torch.testing.assert_close(stored, resid.to(stored.dtype), atol=0, rtol=0)
    v2 = qkv(2)[2]
    out1 = call(run, q, k, v2, 1, dense=dense).float()
    assert calls == [1], "a sparse step does not run the dense pass"
    sparse1 = masked_attention(q, k, v2, mask, grid=GRID, txt_len=TXT).float()
    torch.testing.assert_close(out1[:, :, TXT:], sparse1[:, :, TXT:] + resid, atol=2e-2, rtol=2e-2)


def test_ssar_off_returns_the_plain_sparse_output():
    run = SparseRun(cfg(dense_warmup=0.0, ssar_order=0), sigmas(4))
    q, k, v = qkv(3)
    assert run.kind(0) == SPARSE
    mask = build_mask(q, k, v, mode="topk", grid=GRID, txt_len=TXT, density=0.5, block_q=16, block_k=16)
    torch.testing.assert_close(call(run, q, k, v, 0), masked_attention(q, k, v, mask, grid=GRID, txt_len=TXT))
    assert run.ssar.cache_bytes() == 0


def test_cond_and_uncond_rows_keep_their_own_cache_batched_or_not():
    run = SparseRun(cfg(dense_warmup=0.0, refresh_interval=4), sigmas(8), layout=EXACT_LAYOUT)
    q, k, v = qkv(4, b=2)
    call(run, q, k, v, 0, cond_rows=[1, 0])  # uncond in row 0, cond in row 1
    keys = set(run.ssar.entries)
    assert keys == {("double", 0, 1, 0), ("double", 0, 0, 0)}
    # the cond half alone, at a sparse step, with the same q, k, v: sparse + its own residual = dense
    out = call(run, q[1:], k[1:], v[1:], 1, cond_rows=[0]).float()
    torch.testing.assert_close(out, dense_ref(q[1:], k[1:], v[1:]), atol=3e-2, rtol=3e-2)
    # swapped order in one batch: each row still gets its own correction
    out2 = call(run, q.flip(0), k.flip(0), v.flip(0), 1, cond_rows=[0, 1]).float()
    torch.testing.assert_close(out2, dense_ref(q, k, v).flip(0), atol=3e-2, rtol=3e-2)
    # the wrong correction would not match: uncond's residual on the cond row
    wrong = call(run, q[1:], k[1:], v[1:], 1, cond_rows=[1]).float()
    assert not torch.allclose(wrong, dense_ref(q[1:], k[1:], v[1:]), atol=3e-2, rtol=3e-2)


def test_key_padding_is_honoured_on_sparse_and_refresh_steps():
    run = SparseRun(cfg(dense_warmup=0.0), sigmas(4), layout=EXACT_LAYOUT)
    q, k, v = qkv(5)
    add = torch.zeros(1, 1, SEQ)
    add[..., 5:TXT] = -torch.finfo(torch.bfloat16).max
    kp = key_padding_from_mask(add, 1, SEQ)
    assert kp.shape == (1, SEQ) and kp[0, :5].all() and not kp[0, 5:TXT].any() and kp[0, TXT:].all()
    out = call(run, q, k, v, 0, key_padding=kp).float()
    torch.testing.assert_close(out, dense_ref(q, k, v, kp), atol=2e-2, rtol=2e-2)
    assert not torch.allclose(out, dense_ref(q, k, v), atol=2e-2, rtol=2e-2)
    assert key_padding_from_mask(torch.zeros(1, 1, SEQ), 1, SEQ) is None
    with pytest.raises(ValueError, match="varies over query rows"):
        key_padding_from_mask(torch.zeros(1, SEQ, SEQ), 1, SEQ)


def test_grid_that_does_not_match_the_tokens_is_a_clear_error():
    run = SparseRun(cfg(), sigmas(4))
    q, k, v = qkv(6)
    with pytest.raises(ValueError, match="latent grid"):
        sparse_attention_call(run, q, k, v, block_type="double", block_index=0, step=2, grid=(1, 4, 4), txt_len=TXT)


# ---------------------------------------------------------------------------- whole runs

def _run_schedule(config, n, seed=0):
    run = SparseRun(config, sigmas(n), layout=EXACT_LAYOUT)
    for step in range(n):
        with run.timed(step):
            for bi in range(2):
                q, k, v = qkv(seed + 10 * step + bi)
                call(run, q, k, v, step, block_index=bi, cond_rows=[0])
    return run


def test_stats_count_steps_by_kind_and_density():
    config = cfg(dense_warmup=0.25, refresh_interval=3, density=0.25, ssar_order=2)
    n = 12
    run = _run_schedule(config, n)
    s = run.summary()
    ks = kinds(config, n)
    assert (s["dense_steps"], s["refresh_steps"], s["sparse_steps"]) == (ks.count(DENSE), ks.count(REFRESH),
                                                                         ks.count(SPARSE))
    assert s["dense_steps"] >= 1 and s["refresh_steps"] >= 2 and s["sparse_steps"] >= 4
    assert s["attention_calls"] == {k: 2 * ks.count(k) for k in (DENSE, REFRESH, SPARSE)}
    assert 0.25 <= s["achieved_density"] < 0.25 + 1 / 4 + 1e-9  # at most one block per row above the target
    assert s["ssar"]["corrections"] == 2 * ks.count(SPARSE) and s["ssar"]["misses"] == 0
    assert s["peak_cache_bytes"] >= s["cache_bytes"] > 0
    assert len(s["step_seconds"]) == n and s["seconds_per_step"] > 0
    assert "achieved density" in format_summary(s)
    run.close()
    assert run.ssar.cache_bytes() == 0
    with pytest.raises(RuntimeError, match="closed"):
        call(run, *qkv(0), 5)


def test_a_new_run_starts_empty_and_takes_other_settings_and_sizes():
    first = _run_schedule(cfg(dense_warmup=0.0, refresh_interval=2), 4)
    assert first.ssar.entries
    second = SparseRun(cfg(dense_warmup=0.0, refresh_interval=2, density=0.75), sigmas(4), layout=EXACT_LAYOUT)
    assert second.ssar.entries == {} and second.summary()["ssar"]["refreshes"] == 0
    # a sparse call before any refresh of this run is a miss, never the first run's correction
    q, k, v = qkv(99)
    second_out = call(second, q, k, v, 1)
    assert second.summary()["ssar"]["misses"] == 1
    mask = build_mask(q, k, v, mode="topk", grid=GRID, txt_len=TXT, density=0.75, block_q=16, block_k=16)
    torch.testing.assert_close(second_out, masked_attention(q, k, v, mask, grid=GRID, txt_len=TXT))


def test_tiny_hunyuan_model_refresh_step_is_dense_and_refiner_passes_through():
    """Through the torch HunyuanVideo: every joint attention call goes through the override; a refresh
    step's output is the dense model's output."""
    dims = HunyuanVideoDims.tiny()
    model = HunyuanVideo(dims, dtype=torch.bfloat16)
    model.load_state_dict(make_random_state_dict(dims, 0, dtype=torch.bfloat16), strict=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 8, 16, generator=g)  # grid (3, 4, 8): 96 video tokens
    ctx = torch.randn(1, 6, dims.context_in_dim, generator=g)
    y = torch.randn(1, 768, generator=g)
    t, guid = torch.tensor([900.0]), torch.tensor([6.0])
    grid = (3, 4, 8)
    seen = []

    def attention_for(run, step):
        def attn(q, k, v, *, mask=None, block_type="", block_index=0):
            if block_type == "refiner":
                seen.append("refiner")
                return model.attention(q, k, v, mask=mask, block_type=block_type, block_index=block_index)
            seen.append(block_type)
            kp = key_padding_from_mask(mask, q.shape[0], q.shape[2])
            out = sparse_attention_call(run, q, k, v, block_type=block_type, block_index=block_index, step=step,
                                        grid=grid, txt_len=q.shape[2] - 96, cond_rows=[0], key_padding=kp)
            b, h, n, d = out.shape
            return out.transpose(1, 2).reshape(b, n, h * d)
        return attn

    with torch.no_grad():
        dense = model(x, t, ctx, y, guid).float()
        run = SparseRun(cfg(dense_warmup=0.0, density=0.25), sigmas(4), layout=EXACT_LAYOUT)
        refreshed = model(x, t, ctx, y, guid, attention=attention_for(run, 0)).float()
        sparse = model(x, t, ctx, y, guid, attention=attention_for(run, 1)).float()
    assert seen.count("refiner") >= 2 and seen.count("double") == 2 * dims.depth
    assert seen.count("single") == 2 * dims.depth_single_blocks
    assert len(run.ssar.entries) == dims.depth + dims.depth_single_blocks
    rel = float((refreshed - dense).norm() / dense.norm())
    assert rel < 0.03, rel
    # the step after the refresh, same inputs: sparse + cached residual restores most of dense
    rel_sparse = float((sparse - dense).norm() / dense.norm())
    assert rel_sparse < 0.05, rel_sparse


@pytest.mark.gpu
@pytest.mark.parametrize("callers_dense", [False, True], ids=["one-launch-refresh", "callers-dense-refresh"])
def test_gpu_override_through_the_triton_kernel_svg_masks_and_compact_cache(callers_dense):
    """The whole sparse path on CUDA in BF16 (kernel, svg masks, FP8 low-rank SSAR cache): a refresh
    step is dense attention, and on a slowly changing input the corrected sparse step is closer to
    dense attention than the plain sparse output; with the kernel's one-launch refresh and with the
    caller's dense pass (ComfyUI's) plus a sparse pass."""
    from comfyui_quantsparse.quantsparse.sparse.ssar import DEFAULT_LAYOUT

    grid, txt, heads = (5, 16, 24), 61, 4
    seq = txt + grid[0] * grid[1] * grid[2]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    padding = torch.ones(1, seq, dtype=torch.bool, device="cuda")
    padding[:, txt - 5:txt] = False  # padded text tokens
    config = SparseConfig(density=0.25, mask_mode="svg", dense_warmup=0.0, refresh_interval=4, ssar_order=2,
                          block_q=64, block_k=64)
    run = SparseRun(config, torch.linspace(1.0, 0.0, 9, device="cuda"), layout=DEFAULT_LAYOUT)
    kw = dict(block_type="single", block_index=3, grid=grid, txt_len=txt, key_padding=padding)
    bias = torch.where(padding, 0.0, float("-inf"))[:, None, None, :]
    dense = lambda q_, k_, v_: F.scaled_dot_product_attention(q_.float(), k_.float(), v_.float(), attn_mask=bias)  # noqa: E731
    if callers_dense:
        kw["dense"] = lambda: dense(q, k, v).to(torch.bfloat16)
    out0 = sparse_attention_call(run, q, k, v, step=0, **kw)
    assert out0.dtype == torch.bfloat16 and out0.is_cuda
    assert float((out0.float() - dense(q, k, v)).abs().max()) < 3e-2  # refresh step = dense (BF16 bound)
    mask = build_mask(q, k, v, mode="svg", grid=grid, txt_len=txt, density=0.25, block_q=64, block_k=64)
    q1, k1, v1 = (t + 0.05 * torch.randn(t.shape, device="cuda", generator=g, dtype=torch.bfloat16) for t in (q, k, v))
    out1 = sparse_attention_call(run, q1, k1, v1, step=1, **kw).float()
    plain = masked_attention(q1, k1, v1, mask, grid=grid, txt_len=txt, key_padding=padding).float()
    ref1 = dense(q1, k1, v1)
    err_corrected = float((out1 - ref1)[:, :, txt:].norm() / ref1[:, :, txt:].norm())
    err_plain = float((plain - ref1)[:, :, txt:].norm() / ref1[:, :, txt:].norm())
    assert torch.isfinite(out1).all() and err_corrected < err_plain, (err_corrected, err_plain)
    summary = run.summary()
    assert summary["refresh_steps"] == 1 and summary["sparse_steps"] == 1 and summary["cache_bytes"] > 0
    run.close()


def test_masks_are_chosen_at_refresh_steps_and_kept_until_the_next():
    """Sparse steps reuse the refresh step's mask (the cached correction belongs to it) and selection is paid
    once per interval; without SSAR the mask is chosen again every refresh_interval steps."""
    config = cfg(dense_warmup=0.0, refresh_interval=3, ssar_order=1)
    run = SparseRun(config, sigmas(7), layout=EXACT_LAYOUT)
    q, k, v = qkv(5)
    for step in range(7):
        q_step = q + 0.5 * step * torch.randn(q.shape, generator=torch.Generator().manual_seed(step)).to(q.dtype)
        call(run, q_step, k, v, step)
    assert [run.kind(s) for s in range(7)] == [REFRESH, SPARSE, SPARSE, REFRESH, SPARSE, SPARSE, REFRESH]
    assert run.summary()["mask_builds"] == 3
    # the mask used at step 1 is the one chosen at step 0, even though q changed
    site = next(iter(run._masks))
    assert run._masks[site][1] == 6
    off = SparseRun(cfg(dense_warmup=0.0, refresh_interval=2, ssar_order=0), sigmas(5))
    for step in range(5):
        call(off, q, k, v, step)
    assert off.summary()["mask_builds"] == 3  # steps 0, 2, 4
    two_sites = SparseRun(cfg(dense_warmup=0.0, refresh_interval=3, ssar_order=1), sigmas(3), layout=EXACT_LAYOUT)
    call(two_sites, q, k, v, 0, block_index=0)
    call(two_sites, q, k, v, 0, block_index=1)
    assert two_sites.summary()["mask_builds"] == 2
    two_sites.close()
    assert not two_sites._masks
