"""The proxy HunyuanVideo (issue 5): procedural data, the shipped weights, training, the quality metrics,
the proxy sampler and the demo, on CPU."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from comfyui_quantsparse.quantsparse.core import metrics
from comfyui_quantsparse.quantsparse.proxy import data as pd
from comfyui_quantsparse.quantsparse.proxy import sample as ps
from comfyui_quantsparse.quantsparse.proxy import train as pt
from comfyui_quantsparse.quantsparse.models.hunyuan_video.dims import dims_from_state_dict
from comfyui_quantsparse.quantsparse.models.hunyuan_video.model import reference_state_shapes

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = pt.DEFAULT_PATH


# ---------------------------------------------------------------------------------------------- data

def test_videos_are_deterministic_by_prompt_and_seed():
    p = pd.Prompt("red", "triangle", "clockwise")
    a, b = pd.render_video(p, 7), pd.render_video(p, 7)
    assert a.shape == (3, 17, 128, 128) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, pd.render_video(p, 8))
    assert not torch.equal(a, pd.render_video(pd.Prompt("blue", "triangle", "clockwise"), 7))
    b1, b2 = pd.training_batch(3, 2, 64), pd.training_batch(3, 2, 64)
    assert torch.equal(b1.latent, b2.latent) and b1.prompts == b2.prompts and b1.seeds == b2.seeds
    assert all(s >= 2**40 for s in b1.seeds)  # never a benchmark seed


def test_motion_moves_the_shape_the_way_the_prompt_says():
    """The shape's colour mass moves right for 'moving right' (centroid of the most red pixels)."""
    v = pd.render_video(pd.Prompt("red", "square", "right"), 3)
    redness = (v[0] - v[1:].mean(0)).clamp(min=0)  # [F, H, W]
    xs = torch.arange(v.shape[-1], dtype=torch.float32)
    cx = [(redness[f].sum(0) * xs).sum() / redness[f].sum() for f in (0, v.shape[1] - 1)]
    assert cx[1] - cx[0] > 10


def test_prompt_text_and_embeddings():
    p = pd.Prompt("green", "ring", "up")
    assert p.text == "a green ring moving up" and pd.Prompt.parse(p.text) == p
    with pytest.raises(ValueError, match="vocabulary"):
        pd.Prompt.parse("a green dragon moving up")
    ctx, y = pd.encode_prompt(p, 64)
    ctx2, y2 = pd.encode_prompt(p, 64)
    assert ctx.shape == (pd.TEXT_TOKENS, 64) and y.shape == (768,)
    assert torch.equal(ctx, ctx2) and torch.equal(y, y2)
    other, _ = pd.encode_prompt(pd.Prompt("green", "ring", "down"), 64)
    assert torch.equal(ctx[:3], other[:3]) and not torch.equal(ctx[3], other[3])  # only the motion word differs
    assert len(set(pd.ALL_PROMPTS)) == len(pd.COLOURS) * len(pd.SHAPES) * len(pd.MOTIONS)


def test_latent_code_has_hunyuan_layout_and_round_trips():
    v = pd.render_video(pd.prompt_for(10), 1)
    lat = pd.encode_video(v)
    assert lat.shape == (16, 5, 16, 16)  # 4(T-1)+1 frames, 8x spatial, 16 channels
    rec = pd.decode_latent(lat)
    assert rec.shape == v.shape
    assert float((rec - v).square().mean().sqrt()) < 0.1  # a low-pass preview of the same video
    # decode is the code's transpose (orthonormal basis): exact on the code's span, away from the clamp
    mid = pd.encode_video(v * 0.5)
    torch.testing.assert_close(pd.encode_video(pd.decode_latent(mid)), mid, atol=1e-3, rtol=0)
    basis = pd._BASIS
    torch.testing.assert_close(basis @ basis.T, torch.eye(16), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="4\\(T-1\\)\\+1"):
        pd.encode_video(torch.zeros(3, 6, 16, 16))


# ---------------------------------------------------------------------------------------------- weights

def test_shipped_proxy_has_comfyui_names_detection_and_card():
    from safetensors import safe_open

    assert WEIGHTS.is_file(), f"the proxy weights are missing at {WEIGHTS}"
    assert WEIGHTS.stat().st_size <= 30 * 2**20
    with safe_open(str(WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()[pt.METADATA_KEY])
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert dtypes == {"BF16"}
    dims = dims_from_state_dict(shapes)  # ComfyUI's detection rules, as the repo implements them
    assert dims == pt.proxy_dims() and dims.head_dim == 128 and dims.num_heads == 2
    assert (dims.depth, dims.depth_single_blocks) == (2, 4)
    assert shapes == reference_state_shapes(dims)
    assert any(k.startswith("vector_in.") for k in keys)
    assert "txt_in.individual_token_refiner.blocks.0.norm1.weight" in keys  # ComfyUI's HunyuanVideo trigger
    assert meta["steps"] > 0 and meta["loss_last"] < meta["loss_first"]
    assert (REPO / "models" / "proxy" / "CARD.md").is_file()


def test_shipped_proxy_is_a_valid_conversion_source(tmp_path):
    from comfyui_quantsparse.quantsparse.checkpoint.convert import inspect_source

    plan = inspect_source(WEIGHTS)
    assert plan.dims == pt.proxy_dims() and plan.prefix == ""


# ---------------------------------------------------------------------------------------------- training

def test_a_few_cpu_training_steps_lower_the_loss():
    torch.manual_seed(0)
    cfg = pt.TrainConfig(max_steps=40, batch_size=4, lr=2e-3, warmup_steps=5, ema=0.0, log_every=10,
                         latent_frames=2, latent_size=8)
    model = pt.new_model(0)
    held_out = pd.training_batch(10**6, 8, 64, data_seed=1, latent_frames=2, latent_size=8)
    before = pt.evaluate_loss(model, held_out)
    result = pt.train(cfg, model=model, log=lambda s: None)
    after = pt.evaluate_loss(model, held_out)
    assert result.steps == 40 and len(result.losses) == 4
    assert after < 0.85 * before, (before, after)
    assert result.losses[-1][1] < result.losses[0][1]


def test_save_and_load_round_trip(tmp_path):
    model = pt.new_model(1)
    path = tmp_path / "p.safetensors"
    pt.save_proxy(path, model.state_dict(), {"steps": 0})
    back = pt.load_proxy(path, dtype=torch.float32)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v.to(torch.bfloat16).float())
    with pytest.raises(ValueError, match="missing.safetensors does not exist"):
        pt.load_proxy(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="already exists"):  # never over the file unasked
        pt.save_proxy(path, model.state_dict(), {"steps": 1})
    pt.save_proxy(path, model.state_dict(), {"steps": 1}, overwrite=True)
    # a file in ComfyUI's all-in-one naming loads too (the check accepts it; the loader strips the prefix)
    prefixed = tmp_path / "prefixed.safetensors"
    save_file({f"model.diffusion_model.{k}": v.to(torch.bfloat16) for k, v in model.state_dict().items()},
              str(prefixed))
    again = pt.load_proxy(prefixed, dtype=torch.float32)
    for k, v in back.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v)


# ---------------------------------------------------------------------------------------------- metrics

def test_psnr_on_known_inputs():
    x = torch.zeros(3, 2, 16, 16)
    assert metrics.psnr(x, x, 2.0) == math.inf
    y = x + 0.125  # exact in float32: the squared error is exactly 1/64
    assert float(metrics.psnr(y, x, 2.0)) == pytest.approx(10 * math.log10(4 * 64), abs=1e-9)
    batch = torch.stack([y, x + 0.25])
    got = metrics.psnr(batch, torch.stack([x, x]), 1.0)
    assert got.shape == (2,)
    assert got[0] == pytest.approx(10 * math.log10(64)) and got[1] == pytest.approx(10 * math.log10(16))


def _ssim_bruteforce(a: torch.Tensor, b: torch.Tensor, data_range: float) -> float:
    """Direct per-window SSIM of two 2-D images (Wang et al. 2004), window 11, sigma 1.5, valid positions."""
    g = metrics.gaussian_window()
    w2 = torch.outer(g, g)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i:i + 11, j:j + 11].double(), b[i:i + 11, j:j + 11].double()
            ma, mb = (w2 * pa).sum(), (w2 * pb).sum()
            va, vb = (w2 * (pa - ma) ** 2).sum(), (w2 * (pb - mb) ** 2).sum()
            cov = (w2 * (pa - ma) * (pb - mb)).sum()
            vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(torch.stack(vals).mean())


def test_ssim_on_known_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 16, 16, generator=g)
    assert float(metrics.ssim(x, x, 1.0)) == pytest.approx(1.0, abs=1e-12)
    # constant images: only the luminance term is left, (2 m1 m2 + C1) / (m1^2 + m2^2 + C1)
    a, b = torch.full((1, 1, 12, 12), 0.25), torch.full((1, 1, 12, 12), 0.625)  # exact in float32
    c1 = 0.01 ** 2
    want = (2 * 0.25 * 0.625 + c1) / (0.25 ** 2 + 0.625 ** 2 + c1)
    assert float(metrics.ssim(a, b, 1.0)) == pytest.approx(want, rel=1e-9)
    # random frames: equal to the per-window definition, averaged over channels and frames
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    want = sum(_ssim_bruteforce(x[c, f], y[c, f], 1.0) for c in range(3) for f in range(2)) / 6
    assert float(metrics.ssim(y, x, 1.0)) == pytest.approx(want, rel=1e-9)
    assert float(metrics.ssim(x, y, 1.0)) == pytest.approx(want, rel=1e-9)  # symmetric
    with pytest.raises(ValueError, match="smaller than"):
        metrics.ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), 1.0)


# ---------------------------------------------------------------------------------------------- sampling

def test_simple_sigmas_follow_comfyui_shifted_schedule():
    from comfyui_quantsparse.quantsparse.core.schedule import simple_sigmas

    shift = 7.0
    want = [shift * t / (1 + (shift - 1) * t) for t in (1.0, 0.75, 0.5, 0.25)] + [0.0]
    torch.testing.assert_close(simple_sigmas(4, shift), torch.tensor(want, dtype=torch.float32))
    # 30 steps do not divide ComfyUI's table of 1000 sigmas: step i takes entry 1000 - int(i * 1000 / 30)
    t = [(1000 - int(i * 1000 / 30)) / 1000 for i in range(30)]
    want30 = [shift * x / (1 + (shift - 1) * x) for x in t] + [0.0]
    torch.testing.assert_close(simple_sigmas(30, shift), torch.tensor(want30, dtype=torch.float32))


@pytest.fixture(scope="module")
def proxy():
    return pt.load_proxy(WEIGHTS)


def test_sampling_is_deterministic_and_refresh_every_step_is_dense(proxy):
    clip = ps.benchmark_clips(1)[0]
    a = ps.sample_clip(proxy, clip, steps=3)
    b = ps.sample_clip(proxy, clip, steps=3)
    assert torch.equal(a.latent, b.latent) and a.latent.shape == (16, 5, 16, 16)
    # a refresh at every step computes sparse + complement merged, i.e. dense attention
    every = ps.sample_clip(proxy, clip, steps=3, sparse=ps.proxy_sparse_config(dense_warmup=0.0, refresh_interval=1))
    assert every.summary["refresh_steps"] == 3 and every.summary["sparse_steps"] == 0
    pa, pb = ps.decode(every.latent), ps.decode(a.latent)
    assert float(metrics.psnr(pa, pb, 2.0)) > 35
    plain = ps.sample_clip(proxy, clip, steps=3, sparse=ps.proxy_sparse_config(dense_warmup=0.0, ssar_order=0))
    assert plain.summary["achieved_density"] == pytest.approx(0.15)
    assert not torch.equal(plain.latent, a.latent)


# ---------------------------------------------------------------------------------------------- demo, bench

def test_demo_runs_end_to_end_on_a_shrunken_setting(tmp_path, capsys):
    from comfyui_quantsparse.quantsparse.demo import main

    rc = main(["--clips", "1", "--steps", "2", "--calib-clips", "1", "--calib-epochs", "1", "--out", str(tmp_path)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "PSNR" in text and "storage" in text and "achieved density" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert math.isfinite(summary["psnr"]) and 0 < summary["ssim"] <= 1
    assert summary["quantsparse_bytes"] < summary["dense_bytes"] / 2
    assert summary["achieved_density"] == pytest.approx(0.15)
    assert set(summary["block_errors"]) == {"double_00", "double_01"} | {f"single_{i:02d}" for i in range(4)}
    preview = next(tmp_path.glob("side_by_side.*"))
    assert preview.stat().st_size > 1000
    svg = (tmp_path / "calibration.svg").read_text()
    assert svg.startswith("<svg") and "single_03" in svg
    assert summary["calibration"] == "MSAD"  # through the calibrate_fn seam (proxy_msad)
    # run again: the earlier results are not replaced unasked
    assert main(["--clips", "1", "--steps", "2", "--out", str(tmp_path)]) == 2
    assert "already holds an earlier demo's results" in capsys.readouterr().err
    assert "<polyline" in svg  # its per-block losses are plotted


def test_demo_reports_missing_weights(tmp_path, capsys):
    from comfyui_quantsparse.quantsparse.demo import main

    assert main(["--weights", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quantsparse demo: error: the proxy weights (--weights)") and "does not exist" in err
    assert not (tmp_path / "demo").exists()  # nothing created for a run that did not start


def _bench():
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "benchmarks" / "bench_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_quality_plans_every_method_and_writes_its_table(tmp_path):
    bench = _bench()
    methods = {r[0] for r in bench.plan(["w4a8", "w6a6"], (0.15, 0.25), True)}
    assert methods == {"rtn", "sparse", "rtn+sparse", "msad+sparse", "msad+ssar1", "quantsparse",
                       "quantsparse-no-global", "quantsparse-no-local"}
    out = tmp_path / "q.json"
    assert bench.main(["--seeds", "1", "--steps", "2", "--bits", "w4a8", "--calibrate", "rtn", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"date", "rows"} <= set(result)
    got = {(r["method"], r["bits"], r["density"]) for r in result["rows"]}
    assert got == {("rtn", "w4a8", 1.0), ("sparse", "bf16", 0.15), ("sparse", "bf16", 0.25),
                   ("rtn+sparse", "w4a8", 0.15), ("rtn+sparse", "w4a8", 0.25)}
    assert all(math.isfinite(r["psnr"]) and 0 < r["ssim"] <= 1 for r in result["rows"])
    assert any("quantsparse w4a8 0.15" in s for s in result["skipped"])
    assert "| rtn+sparse | w4a8 | 0.15 |" in out.with_suffix(".md").read_text()


def test_bench_quality_states_the_ranking_from_the_rows():
    bench = _bench()
    rows = [{"method": m, "bits": "w4a8", "density": 0.15, "psnr": p} for m, p in
            [("rtn+sparse", 20.0), ("msad+sparse", 21.0), ("msad+ssar1", 30.0), ("quantsparse", 29.5),
             ("quantsparse-no-global", 29.0), ("quantsparse-no-local", 30.5)]]
    (line,) = bench.ranking(rows)
    assert line.startswith("Ranking, w4a8 at 15%:")
    assert "QuantSparse above the naive rtn+sparse: holds (+9.50 dB)" in line
    assert "second order above first order: does NOT hold (-0.50 dB)" in line
    assert "the global term helps: holds (+0.50 dB)" in line
    assert "the local term helps: does NOT hold (-1.00 dB)" in line
    assert bench.ranking([r for r in rows if r["method"] == "rtn+sparse"]) == []
