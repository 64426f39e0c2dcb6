"""Sparse attention + SSAR inside a real ComfyUI server: the patch node under a stock sampler and the
QuantSparse Sampler node, on the tiny model, through the HTTP API."""

from __future__ import annotations

import re

import pytest
import torch

from .test_comfyui_server import qs_loader, saved_latent, succeeded

pytestmark = pytest.mark.comfyui

# 128x128x9 -> latent (3, 16, 16) -> token grid (3, 8, 8): 192 video tokens = 12 blocks of 16
KNOBS = {"density": 0.25, "mask_mode": "svg", "dense_warmup": 0.25, "refresh_interval": 2, "rank": 4,
         "ssar_order": 2, "block_q": 16, "block_k": 16}
STEPS = 4  # warm-up 1 step, anchored refresh at step 0: refresh, sparse, refresh, sparse


def base_nodes(model_nodes: dict, model_ref: list, width=128, height=128, length=9) -> dict:
    g = dict(model_nodes)
    g.update({
        "20": {"class_type": "ModelSamplingSD3", "inputs": {"model": model_ref, "shift": 7.0}},
        "21": {"class_type": "QSTestConditioning", "inputs": {"seed": 1, "tokens": 6, "context_dim": 64}},
        "22": {"class_type": "QSTestConditioning", "inputs": {"seed": 2, "tokens": 6, "context_dim": 64}},
        "27": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": width, "height": height,
                                                                  "length": length, "batch_size": 1}},
    })
    return g


def sampler_graph(model_nodes, model_ref, prefix, knobs=KNOBS, **latent) -> dict:
    g = base_nodes(model_nodes, model_ref, **latent)
    g["30"] = {"class_type": "QuantSparseSampler", "inputs": {
        "model": ["20", 0], "seed": 0, "steps": STEPS, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["21", 0], "negative": ["22", 0], "latent_image": ["27", 0], "denoise": 1.0, **knobs}}
    g["29"] = {"class_type": "SaveLatent", "inputs": {"samples": ["30", 0], "filename_prefix": prefix}}
    return g


def patch_graph(model_nodes, model_ref, prefix, knobs=KNOBS, sparse=True) -> dict:
    g = base_nodes(model_nodes, model_ref)
    model = ["20", 0]
    if sparse:
        g["31"] = {"class_type": "QuantSparseAttention", "inputs": {"model": ["20", 0], **knobs}}
        model = ["31", 0]
    g["32"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": 0, "steps": STEPS, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["21", 0], "negative": ["22", 0], "latent_image": ["27", 0], "denoise": 1.0}}
    g["29"] = {"class_type": "SaveLatent", "inputs": {"samples": ["32", 0], "filename_prefix": prefix}}
    return g


def summary(entry) -> dict:
    text = " ".join(entry["outputs"]["30"]["text"])
    m = re.search(r"steps: (\d+) \(dense (\d+), refresh (\d+), sparse (\d+)\)", text)
    assert m, text
    dens = re.search(r"achieved density: ([0-9.]+)", text)
    peak = re.search(r"SSAR cache: peak ([0-9.]+) MiB; corrections (\d+), misses (\d+)", text)
    assert dens and peak and "time per step" in text, text
    return {"steps": int(m[1]), "dense": int(m[2]), "refresh": int(m[3]), "sparse": int(m[4]),
            "density": float(dens[1]), "peak_mib": float(peak[1]), "corrections": int(peak[2]),
            "misses": int(peak[3]), "text": text}


def models(tiny_files):
    yield "w4a8", qs_loader(tiny_files.w4a8.name), ["1", 0]
    if tiny_files.bf16.exists():
        yield "bf16", {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": tiny_files.bf16.name,
                                                                     "weight_dtype": "default"}}}, ["1", 0]


def test_sampler_node_runs_sparse_steps_and_reports_them(comfy_server, tiny_files):
    for name, nodes, ref in models(tiny_files):
        entry = comfy_server.run(sampler_graph(nodes, ref, f"qs_sparse/sampler_{name}"))
        assert succeeded(entry)
        latent = saved_latent(comfy_server, entry)
        assert latent.shape == (1, 16, 3, 16, 16) and torch.isfinite(latent).all()
        s = summary(entry)
        assert (s["steps"], s["dense"], s["refresh"], s["sparse"]) == (STEPS, 0, 2, 2), s["text"]
        # 3 of 12 key blocks per row asked; svg's band gives exactly that
        assert s["density"] == pytest.approx(0.25, abs=1e-3), s["text"]
        # cond and uncond x 6 joint blocks, every sparse step corrected, none missing a refresh
        assert s["corrections"] == 2 * 6 * s["sparse"] and s["misses"] == 0, s["text"]
        assert s["peak_mib"] > 0


def test_a_second_run_with_other_settings_starts_from_an_empty_cache(comfy_server, tiny_files):
    _, nodes, ref = next(models(tiny_files))
    first = comfy_server.run(sampler_graph(nodes, ref, "qs_sparse/run_a"))
    assert succeeded(first)
    other = dict(KNOBS, density=0.5, mask_mode="topk", block_q=32, refresh_interval=3)
    second = comfy_server.run(sampler_graph(nodes, ref, "qs_sparse/run_b", knobs=other, width=96, length=5))
    assert succeeded(second)  # a cache left from run A (other grid) would fail its shape check
    s = summary(second)
    assert s["misses"] == 0 and (s["refresh"], s["sparse"]) == (2, 2), s["text"]
    again = comfy_server.run(sampler_graph(nodes, ref, "qs_sparse/run_a_again"))
    assert succeeded(again)
    # nothing from run B leaked into the repeat of run A
    assert torch.equal(saved_latent(comfy_server, first), saved_latent(comfy_server, again))
    assert summary(first)["text"].split("time per step")[0] == summary(again)["text"].split("time per step")[0]


def test_patch_node_under_stock_ksampler_tracks_dense_sampling(comfy_server, tiny_files):
    _, nodes, ref = next(models(tiny_files))
    dense = comfy_server.run(patch_graph(nodes, ref, "qs_sparse/ks_dense", sparse=False))
    sparse = comfy_server.run(patch_graph(nodes, ref, "qs_sparse/ks_sparse"))
    full = comfy_server.run(patch_graph(nodes, ref, "qs_sparse/ks_full", knobs=dict(KNOBS, density=1.0)))
    for e in (dense, sparse, full):
        assert succeeded(e)
    d, s, f = (saved_latent(comfy_server, e).float() for e in (dense, sparse, full))
    assert torch.equal(f, d)  # density 1 runs the stock attention on every call
    assert not torch.equal(s, d)  # sparse steps really ran
    rel = float((s - d).norm() / d.norm())
    assert rel < 0.3, rel
    assert "QuantSparse attention run" in comfy_server.log.read_text(errors="replace")
