"""Wan end to end in a real ComfyUI server: the three Wan example workflows, converted from their UI format, run
on tiny models with the stock nodes, and the QuantSparse Attention report says what every attention call did.

What a tiny Wan is here: ``WanDims.tiny`` (dim 256, 2 heads of 128, 2 blocks, text width 4096) with random
weights, converted by ``quantsparse convert`` to W4A8 (conftest.py ``tiny_wan_files``); ComfyUI builds its own
WanModel from each file. A 128x128x9 latent is a (3, 8, 8) token grid: 192 video tokens, 12 blocks of 16.
Only what cannot exist on a CPU test machine is substituted, as for the HunyuanVideo workflow test: the
checkpoints, umT5-XXL (random ``[1, L, 4096]`` conditioning in its place), the Wan VAE (ComfyUI's own Wan 2.1 VAE
class at width 8, random weights: VAEDecode, WanImageToVideo's encode, CreateVideo and SaveVideo still run), the
size, the step count where named, and the kernel's block size.

The report: the QuantSparse Sampler shows it on the node; every run under the QuantSparse Attention patch logs
it ("QuantSparse attention run:"), which the tests read from the server's log.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import pathlib
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from .conftest import HV15_LIKE, WAN_LORA, WAN_VAE
from .test_comfyui_server import succeeded
from .workflow_api import assert_links_resolve, load_build, to_api

pytestmark = pytest.mark.comfyui

BUILD = load_build()
WORKFLOWS_DIR = pathlib.Path(__file__).resolve().parents[2] / "workflows"
BLOCKS = 16  # the kernel's block size for 192 tokens (the workflows' 128 would be one block)
SIZE = {"width": 128, "height": 128, "length": 9}  # latent (16, 3, 16, 16): 192 video tokens
LAYERS = 2  # WanDims.tiny's blocks: each makes one self- and one cross-attention call per model call
CROSS = "cross-attention"
DENSE_STEP = "dense step (warm-up or density 1)"
LATER_RANGE = "a later range of the schedule: no warm-up, a refresh first"


# ---------------------------------------------------------------------------- the report


@dataclasses.dataclass
class Report:
    steps: int
    dense: int
    refresh: int
    sparse: int
    from_noise: bool
    density: float | None
    corrections: int
    misses: int
    calls: dict  # kind -> count: dense / refresh / sparse (self-attention) and passthrough (left dense)
    not_sparsified: dict  # reason -> count
    warnings: list
    text: str

    @property
    def self_calls(self) -> int:
        """Calls the adapter read as video self-attention (run dense, refreshed or sparse)."""
        return sum(self.calls.get(k, 0) for k in ("dense", "refresh", "sparse"))


def parse_report(text: str) -> Report:
    """One run's report (``format_summary``), as the sampler shows it or the log holds it."""
    m = re.search(r"steps: (\d+) \(dense (\d+), refresh (\d+), sparse (\d+)\)(.*)", text)
    dens = re.search(r"achieved density: (\S+)", text)
    cache = re.search(r"corrections (\d+), misses (\d+)", text)
    calls = re.search(r"attention calls: (\{.*\})", text)
    reasons = re.search(r"not sparsified: (.*)", text)
    assert m and dens and cache and calls and reasons, text
    not_sparsified = {}
    if reasons[1].strip() != "none":
        for part in reasons[1].split(", "):
            reason, count = part.rsplit(" ", 1)
            not_sparsified[reason] = int(count)
    return Report(steps=int(m[1]), dense=int(m[2]), refresh=int(m[3]), sparse=int(m[4]),
                  from_noise=LATER_RANGE not in m[5], density=None if dens[1] == "n/a" else float(dens[1]),
                  corrections=int(cache[1]), misses=int(cache[2]), calls=ast.literal_eval(calls[1]),
                  not_sparsified=not_sparsified, warnings=re.findall(r"WARNING: (.*)", text), text=text)


def logged_reports(log: str) -> list[Report]:
    """Every "QuantSparse attention run" summary in a piece of the server's log, in order."""
    out = []
    for block in log.split("QuantSparse attention run:")[1:]:
        lines = []
        for line in block.splitlines()[1:]:
            if not line.strip() or "\x1b[" in line or re.match(r"\[(DEBUG|INFO|WARNING|ERROR|CRITICAL)\]", line):
                break
            lines.append(line)
        out.append(parse_report("\n".join(lines)))
    return out


def ui_report(entry: dict, node_id: str) -> Report:
    return parse_report("\n".join(entry["outputs"][node_id]["text"]))


def run_logged(server, prompt: dict) -> tuple[dict, list[Report], str]:
    """Run ``prompt``; its history entry, the run reports it logged, and its log text."""
    start = server.log_offset()
    entry = server.run(prompt)
    assert succeeded(entry)
    log = server.log_since(start)
    return entry, logged_reports(log), log


def assert_every_call_accounted(r: Report, per_model_call: int = LAYERS) -> None:
    """Wan's self-attention ran sparse (or refreshed, or dense on a warm-up step), every cross-attention call is
    counted under "cross-attention", and no call was left dense for any other reason (none silently)."""
    assert r.sparse > 0 and r.calls.get("sparse", 0) > 0, r.text
    assert r.calls.get("passthrough", 0) == r.not_sparsified.get(CROSS) == r.self_calls, r.text
    assert set(r.not_sparsified) <= {CROSS, DENSE_STEP}, r.text
    assert r.not_sparsified.get(DENSE_STEP, 0) == r.calls.get("dense", 0), r.text
    assert r.self_calls % per_model_call == 0, r.text
    assert r.misses == 0 and not r.warnings, r.text


def expected_kinds(steps: int, from_noise: bool = True, **knobs) -> tuple[int, int, int]:
    """(dense, refresh, sparse) steps SparseRun schedules for a run of ``steps`` with these knobs."""
    from comfyui_quantsparse.quantsparse.sparse.config import SparseConfig
    from comfyui_quantsparse.quantsparse.sparse.ssar import DENSE, REFRESH, SPARSE, step_kind

    cfg = SparseConfig(**knobs)
    if not from_noise:
        cfg = dataclasses.replace(cfg, dense_warmup=0.0)
    kinds = [step_kind(i, steps, cfg) for i in range(steps)]
    return kinds.count(DENSE), kinds.count(REFRESH), kinds.count(SPARSE)


# ---------------------------------------------------------------------------- the workflows, substituted


def only(prompt: dict, class_type: str, title_has: str | None = None, graph: dict | None = None) -> str:
    ids = [i for i, n in prompt.items() if n["class_type"] == class_type]
    if title_has is not None:
        titles = {str(n["id"]): n.get("title", "") for n in graph["nodes"]}
        ids = [i for i in ids if title_has in titles[i]]
    assert len(ids) == 1, f"expected one {class_type} ({title_has}), found {ids}"
    return ids[0]


def shipped(server, title: str) -> tuple[dict, dict]:
    """(UI graph, its API prompt) of a shipped workflow."""
    graph = json.loads((WORKFLOWS_DIR / f"{title}.json").read_text())
    return graph, to_api(graph, server.get("/object_info"))


def substitute_text_and_vae(prompt: dict) -> None:
    """umT5-XXL cannot be fetched: CLIPLoader goes, each CLIPTextEncode becomes random Wan conditioning under the
    same id (positive seed 1, negative seed 2). The Wan VAE becomes the tiny one (same class, width 8)."""
    del prompt[only(prompt, "CLIPLoader")]
    texts = sorted((i for i, n in prompt.items() if n["class_type"] == "CLIPTextEncode"),
                   key=lambda i: prompt[i]["inputs"]["text"] == BUILD.WAN_NEGATIVE)
    assert len(texts) == 2
    for seed, i in enumerate(texts, start=1):
        prompt[i] = {"class_type": "QSTestWanConditioning", "inputs": {"seed": seed, "tokens": 8}}
    prompt[only(prompt, "VAELoader")]["inputs"]["vae_name"] = WAN_VAE


def add_save_latent(prompt: dict, source: str, prefix: str) -> str:
    node = str(max(int(i) for i in prompt) + 1)
    prompt[node] = {"class_type": "SaveLatent", "inputs": {"samples": [source, 0], "filename_prefix": prefix}}
    return node


def saved(server, entry: dict, node: str) -> torch.Tensor:
    (f,) = entry["outputs"][node]["latents"]
    return load_file(str(server.base / "output" / f["subfolder"] / f["filename"]))["latent_tensor"]


def assert_video_saved(server, entry: dict, prompt: dict) -> None:
    save = only(prompt, "SaveVideo")
    files = [f for v in entry["outputs"][save].values() if isinstance(v, list) for f in v if isinstance(f, dict)]
    assert files, entry["outputs"][save]
    path = server.base / "output" / files[0]["subfolder"] / files[0]["filename"]
    assert path.is_file() and path.stat().st_size > 0, path


def two_expert_prompt(server, tiny_wan_files, task: str, knobs: dict | None = None) -> tuple[dict, dict, dict]:
    """A shipped A14B workflow with the tiny experts: (prompt, as shipped, {"high"/"low": sampler id}); ``knobs``
    change both QuantSparse Attention nodes (besides the block size)."""
    title = BUILD.WAN22_T2V if task == "t2v" else BUILD.WAN22_I2V
    graph, api = shipped(server, title)
    prompt = copy.deepcopy(api)
    samplers = {}
    for noise in ("high", "low"):
        loader = only(prompt, "QuantSparseLoader", f"({noise} noise)", graph)
        prompt[loader]["inputs"]["ckpt_name"] = tiny_wan_files.w4a8[f"wan22_{task}_{noise}_noise"].name
        attn = only(prompt, "QuantSparseAttention", f"({noise} noise)", graph)
        prompt[attn]["inputs"].update(block_q=BLOCKS, block_k=BLOCKS, **(knobs or {}))
        samplers[noise] = only(prompt, "KSamplerAdvanced", f"{noise.capitalize()} noise", graph)
    substitute_text_and_vae(prompt)
    latent = only(prompt, "EmptyHunyuanLatentVideo" if task == "t2v" else "WanImageToVideo")
    prompt[latent]["inputs"].update(SIZE)
    return prompt, api, samplers


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_wan22_a14b_workflow_runs_both_experts_sparse(comfy_server, tiny_wan_files, task):
    """The shipped A14B workflow (text or image to video) runs as built: two QuantSparse W4A8 experts, each under
    its own QuantSparse Attention (SparseConfig's defaults), the template's 20 steps split at 10, CFG 3.5, then
    VAEDecode -> CreateVideo -> SaveVideo (image to video: LoadImage's example.png through WanImageToVideo).

    Each KSamplerAdvanced is its own run with its own report: the high-noise one from noise, the low-noise one
    from the split (no warm-up, a refresh first); both sparse on self-attention with every cross-attention call
    counted, and at CFG 3.5 an SSAR correction for cond and for uncond per block and sparse step."""
    prompt, api, samplers = two_expert_prompt(comfy_server, tiny_wan_files, task)
    # Nothing else changed: the samplers, shifts and video tail are the file's.
    for kind in ("KSamplerAdvanced", "ModelSamplingSD3", "VAEDecode", "CreateVideo", "SaveVideo"):
        assert sorted(json.dumps(n, sort_keys=True) for n in prompt.values() if n["class_type"] == kind) == sorted(
            json.dumps(n, sort_keys=True) for n in api.values() if n["class_type"] == kind), kind
    if task == "i2v":
        assert prompt[only(prompt, "LoadImage")] == api[only(api, "LoadImage")]  # example.png, in input/
    last = add_save_latent(prompt, samplers["low"], f"qs_wan/{task}")
    assert_links_resolve(prompt)

    entry, reports, _ = run_logged(comfy_server, prompt)
    assert_video_saved(comfy_server, entry, prompt)
    out = saved(comfy_server, entry, last)
    assert out.shape == (1, 16, 3, 16, 16) and torch.isfinite(out).all() and out.float().std() > 0

    high_s, low_s = (prompt[samplers[n]]["inputs"] for n in ("high", "low"))
    steps, split = high_s["steps"], high_s["end_at_step"]
    assert (steps, split, low_s["start_at_step"], high_s["cfg"]) == (20, 10, 10, 3.5)
    attention = [n["inputs"] for n in prompt.values() if n["class_type"] == "QuantSparseAttention"]
    knobs = {k: attention[0][k] for k in BUILD.SPARSE_KNOBS}
    assert len(attention) == 2 and all({k: a[k] for k in knobs} == knobs for a in attention)
    assert len(reports) == 2, [r.text for r in reports]
    high, low = reports
    assert high.from_noise and not low.from_noise, (high.text, low.text)
    assert (high.steps, low.steps) == (split, steps - split)
    assert (high.dense, high.refresh, high.sparse) == expected_kinds(split, **knobs), high.text
    assert (low.dense, low.refresh, low.sparse) == expected_kinds(steps - split, from_noise=False, **knobs), low.text
    for r in (high, low):
        assert_every_call_accounted(r)
        # cond and uncond (CFG 3.5) keep their own residuals: a correction per block, half and sparse step
        assert r.corrections == 2 * LAYERS * r.sparse, r.text


def test_wan21_workflow_runs_with_the_quantsparse_sampler(comfy_server, tiny_wan_files):
    """The shipped Wan 2.1 1.3B workflow with the tiny Wan T2V: the QuantSparse Sampler (uni_pc, CFG 6, the
    workflow's knobs) at 6 steps instead of 30; its report on the node: the schedule the knobs give, self-attention
    sparse, every cross-attention call counted, a correction for cond and for uncond."""
    graph, api = shipped(comfy_server, BUILD.WAN21_T2V)
    prompt = copy.deepcopy(api)
    prompt[only(prompt, "QuantSparseLoader")]["inputs"]["ckpt_name"] = tiny_wan_files.w4a8["wan_t2v"].name
    substitute_text_and_vae(prompt)
    prompt[only(prompt, "EmptyHunyuanLatentVideo")]["inputs"].update(SIZE)
    sampler = only(prompt, "QuantSparseSampler")
    prompt[sampler]["inputs"].update(steps=6, block_q=BLOCKS, block_k=BLOCKS)
    changed = {"steps", "block_q", "block_k"}
    ours, theirs = prompt[sampler]["inputs"], api[sampler]["inputs"]
    assert {k: v for k, v in ours.items() if k not in changed} == {k: v for k, v in theirs.items() if k not in changed}
    last = add_save_latent(prompt, sampler, "qs_wan/t2v_21")
    assert_links_resolve(prompt)

    entry, logged, _ = run_logged(comfy_server, prompt)
    assert_video_saved(comfy_server, entry, prompt)
    out = saved(comfy_server, entry, last)
    assert out.shape == (1, 16, 3, 16, 16) and torch.isfinite(out).all()
    r = ui_report(entry, sampler)
    assert len(logged) == 1 and logged[0].text.split("time per step")[0] == r.text.split("time per step")[0]
    knobs = {k: ours[k] for k in BUILD.SPARSE_KNOBS}
    assert r.from_noise and r.steps == 6 and (r.dense, r.refresh, r.sparse) == expected_kinds(6, **knobs), r.text
    assert_every_call_accounted(r)
    assert r.corrections == 2 * LAYERS * r.sparse, r.text
    assert 0 < r.density < 1, r.text


def test_each_expert_run_has_its_own_cache_and_the_low_noise_run_starts_with_a_refresh(comfy_server, tiny_wan_files):
    """The A14B text-to-video workflow at 8 steps split at 4 with half the steps dense warm-up: the high-noise run
    starts from noise (1 dense step, its refresh, then sparse), the low-noise run mid-schedule (no warm-up: a
    refresh first, then sparse, no miss). Its own cache: the low-noise expert run alone on the high-noise
    expert's saved latent gives the same latent bit for bit as in the two-expert run."""
    knobs = {"dense_warmup": 0.5}
    prompt, _, samplers = two_expert_prompt(comfy_server, tiny_wan_files, "t2v", knobs)
    high_s, low_s = (prompt[samplers[n]]["inputs"] for n in ("high", "low"))
    high_s.update(steps=8, end_at_step=4)
    low_s.update(steps=8, start_at_step=4)
    mid = add_save_latent(prompt, samplers["high"], "qs_wan/expert_high")
    last = add_save_latent(prompt, samplers["low"], "qs_wan/expert_both")
    entry, reports, _ = run_logged(comfy_server, prompt)
    assert len(reports) == 2
    high, low = reports
    assert high.from_noise and (high.steps, high.dense, high.refresh, high.sparse) == (4, 1, 1, 2), high.text
    assert not low.from_noise and (low.steps, low.dense, low.refresh, low.sparse) == (4, 0, 1, 3), low.text
    assert low.calls.get("dense", 0) == 0 and low.misses == 0 and high.misses == 0, low.text
    assert low.corrections == 2 * LAYERS * 3, low.text

    # The low-noise expert alone, from the high-noise expert's latent read back from disk.
    (f,) = entry["outputs"][mid]["latents"]
    src = comfy_server.base / "output" / f["subfolder"] / f["filename"]
    shutil.copyfile(src, comfy_server.base / "input" / "qs_wan_high_noise.latent")
    alone = copy.deepcopy(prompt)
    for node in (mid, last, only(alone, "VAEDecode"), only(alone, "CreateVideo"), only(alone, "SaveVideo"),
                 samplers["high"]):
        del alone[node]
    alone["900"] = {"class_type": "LoadLatent", "inputs": {"latent": "qs_wan_high_noise.latent"}}
    alone[samplers["low"]]["inputs"]["latent_image"] = ["900", 0]
    only_low = add_save_latent(alone, samplers["low"], "qs_wan/expert_low_alone")
    alone = {k: v for k, v in alone.items() if k not in _unused(alone, only_low)}
    entry2, reports2, _ = run_logged(comfy_server, alone)
    assert len(reports2) == 1 and reports2[0].text.split("time per step")[0] == low.text.split("time per step")[0]
    assert torch.equal(saved(comfy_server, entry2, only_low), saved(comfy_server, entry, last))


def _unused(prompt: dict, output: str) -> set:
    """Nodes ``output`` does not read (directly or not)."""
    needed, todo = set(), [output]
    while todo:
        node = todo.pop()
        if node in needed:
            continue
        needed.add(node)
        todo += [v[0] for v in prompt[node]["inputs"].values() if isinstance(v, list)]
    return set(prompt) - needed


def patched_wan_graph(model_nodes: dict, model_ref: list, cfg: float, prefix: str, tokens: int = 8,
                      knobs: dict | None = None, latent: dict | None = None) -> dict:
    """Shift 5 -> QuantSparse Attention -> stock KSampler (euler, 4 steps) on random Wan conditioning."""
    k = dict(BUILD.SPARSE_KNOBS, block_q=BLOCKS, block_k=BLOCKS, **(knobs or {}))
    g = dict(model_nodes)
    g.update({
        "20": {"class_type": "ModelSamplingSD3", "inputs": {"model": model_ref, "shift": 5.0}},
        "31": {"class_type": "QuantSparseAttention", "inputs": {"model": ["20", 0], **k}},
        "21": {"class_type": "QSTestWanConditioning", "inputs": {"seed": 1, "tokens": tokens}},
        "22": {"class_type": "QSTestWanConditioning", "inputs": {"seed": 2, "tokens": tokens}},
        "27": latent or {"class_type": "EmptyHunyuanLatentVideo", "inputs": {**SIZE, "batch_size": 1}},
        "32": {"class_type": "KSampler", "inputs": {
            "model": ["31", 0], "seed": 0, "steps": 4, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["21", 0], "negative": ["22", 0], "latent_image": ["27", 0], "denoise": 1.0}},
        "29": {"class_type": "SaveLatent", "inputs": {"samples": ["32", 0], "filename_prefix": prefix}},
    })
    return g


def qs(name: str) -> dict:
    return {"1": {"class_type": "QuantSparseLoader", "inputs": {"ckpt_name": name}}}


def unet(name: str) -> dict:
    return {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}}


def test_cfg_batching_keeps_separate_residuals_for_cond_and_uncond(comfy_server, tiny_wan_files):
    """CFG > 1: ComfyUI batches cond and uncond into one model call (the same number of attention calls as at
    CFG 1), and SSAR keeps a residual for each half: twice the corrections of the CFG 1 run, none missing. The
    same on the plain BF16 Wan (stock UNETLoader) and on its W4A8 conversion."""
    for name, nodes in (("w4a8", qs(tiny_wan_files.w4a8["wan_t2v"].name)),
                        ("bf16", unet(tiny_wan_files.bf16["wan_t2v"].name))):
        knobs = {"dense_warmup": 0.0, "refresh_interval": 2}
        one = run_logged(comfy_server, patched_wan_graph(nodes, ["1", 0], 1.0, f"qs_wan/cfg1_{name}", knobs=knobs))
        two = run_logged(comfy_server, patched_wan_graph(nodes, ["1", 0], 3.5, f"qs_wan/cfg35_{name}", knobs=knobs))
        (r1,), (r2,) = one[1], two[1]
        for r in (r1, r2):
            assert (r.steps, r.dense, r.refresh, r.sparse) == (4, 0, 2, 2), r.text
            assert_every_call_accounted(r)
        assert r1.corrections == LAYERS * r1.sparse, r1.text  # cond only
        assert r2.corrections == 2 * LAYERS * r2.sparse, r2.text  # cond and uncond, each its own residual
        assert r2.calls == r1.calls, (r1.text, r2.text)  # batched: one call per block per step either way


def test_ti2v_5b_shaped_model_runs_sparse(comfy_server, tiny_wan_files):
    """A Wan 2.2 TI2V-5B-shaped model (48 latent channels in and out, ComfyUI's WAN22 with per-frame time) with
    its 48-channel latent (Wan22ImageToVideoLatent, 256x256x9: a (3, 8, 8) grid): sparse self-attention, every
    cross-attention call counted."""
    latent = {"class_type": "Wan22ImageToVideoLatent", "inputs": {
        "vae": ["40", 0], "width": 256, "height": 256, "length": 9, "batch_size": 1}}
    g = patched_wan_graph(qs(tiny_wan_files.w4a8["wan22_ti2v_5b"].name), ["1", 0], 3.5, "qs_wan/ti2v",
                          knobs={"dense_warmup": 0.0, "refresh_interval": 2}, latent=latent)
    g["40"] = {"class_type": "VAELoader", "inputs": {"vae_name": WAN_VAE}}  # unread without a start image
    entry, (r,), _ = run_logged(comfy_server, g)
    out = saved(comfy_server, entry, "29")
    assert out.shape == (1, 48, 3, 16, 16) and torch.isfinite(out).all()
    assert (r.dense, r.refresh, r.sparse) == (0, 2, 2), r.text
    assert_every_call_accounted(r)


def test_as_many_video_tokens_as_text_tokens_is_never_sparsified_as_self_attention(comfy_server, tiny_wan_files):
    """Self- and cross-attention look alike to the override when the text has exactly as many tokens as the
    video (192 here; 512 for the real umT5 at e.g. 256x256x5): no call may then run sparse on text keys as if
    they were video tokens, and every call is counted dense with a reason."""
    g = patched_wan_graph(qs(tiny_wan_files.w4a8["wan_t2v"].name), ["1", 0], 3.5, "qs_wan/equal", tokens=192)
    entry, (r,), _ = run_logged(comfy_server, g)
    assert not r.calls.get("sparse") and not r.calls.get("refresh"), r.text
    assert r.calls.get("passthrough") == sum(r.not_sparsified.values()) > 0, r.text
    assert r.calls["passthrough"] % (2 * LAYERS) == 0, r.text  # both calls of every block, every model call


def test_model_of_no_supported_family_warns_and_runs_every_call_dense(comfy_server, tiny_wan_files):
    """A tiny HunyuanVideo 1.5-like model (ComfyUI builds it: HunyuanVideo with a cond_type_embedding) under the
    QuantSparse Attention patch and the QuantSparse Sampler: a warning naming what it is, every attention call
    counted dense as "model not supported", nothing sparse, and the patched KSampler's result is the stock one."""
    base = unet(HV15_LIKE)
    conditioning = {
        "21": {"class_type": "QSTestConditioning", "inputs": {"seed": 1, "tokens": 6, "context_dim": 64}},
        "22": {"class_type": "QSTestConditioning", "inputs": {"seed": 2, "tokens": 6, "context_dim": 64}},
        "27": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 5,
                                                                  "batch_size": 1}},
        "20": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 7.0}},
    }
    knobs = dict(BUILD.SPARSE_KNOBS, block_q=BLOCKS, block_k=BLOCKS, dense_warmup=0.0)
    sampling = {"seed": 0, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple",
                "positive": ["21", 0], "negative": ["22", 0], "latent_image": ["27", 0], "denoise": 1.0}

    sampler = {**base, **conditioning,
               "30": {"class_type": "QuantSparseSampler", "inputs": {"model": ["20", 0], **sampling, **knobs}},
               "29": {"class_type": "SaveLatent", "inputs": {"samples": ["30", 0], "filename_prefix": "qs_wan/hv15"}}}
    entry, logged, log = run_logged(comfy_server, sampler)
    r = ui_report(entry, "30")
    assert any("does not understand this model" in w and "HunyuanVideo 1.5" in w for w in r.warnings), r.text
    assert any("no attention call of this run ran sparse" in w for w in r.warnings), r.text
    assert r.not_sparsified == {"model not supported": r.calls["passthrough"]} and r.calls["passthrough"] > 0, r.text
    assert set(r.calls) == {"passthrough"} and r.corrections == 0, r.text
    assert "does not understand this model" in log

    def ksampler(patched: bool, prefix: str) -> dict:
        g = {**base, **conditioning,
             "32": {"class_type": "KSampler", "inputs": {"model": ["31" if patched else "20", 0], **sampling}},
             "29": {"class_type": "SaveLatent", "inputs": {"samples": ["32", 0], "filename_prefix": prefix}}}
        if patched:
            g["31"] = {"class_type": "QuantSparseAttention", "inputs": {"model": ["20", 0], **knobs}}
        return g

    stock, _, _ = run_logged(comfy_server, ksampler(False, "qs_wan/hv15_stock"))
    patched, (rp,), _ = run_logged(comfy_server, ksampler(True, "qs_wan/hv15_patched"))
    assert set(rp.calls) == {"passthrough"} and rp.not_sparsified == {"model not supported": rp.calls["passthrough"]}
    assert torch.equal(saved(comfy_server, stock, "29"), saved(comfy_server, patched, "29"))


def test_bypass_lora_runs_on_a_quantized_wan_and_the_stock_lora_is_refused(comfy_server, tiny_wan_files):
    """The notes' LoRA advice on a QuantSparse Wan: "Load LoRA (Bypass, Model Only)" (a LoRA on a W4A8 and on a
    weight-only 4-bit Linear) runs under the sparse patch and changes the result; the stock LoraLoaderModelOnly
    is refused with the message naming the bypass node."""
    nodes = qs(tiny_wan_files.w4a8["wan_t2v"].name)
    knobs = {"dense_warmup": 0.0, "refresh_interval": 2}
    plain, _, _ = run_logged(comfy_server, patched_wan_graph(nodes, ["1", 0], 1.0, "qs_wan/nolora", knobs=knobs))

    def with_lora(node_type: str, prefix: str) -> dict:
        lora = {"2": {"class_type": node_type, "inputs": {"model": ["1", 0], "lora_name": WAN_LORA,
                                                          "strength_model": BUILD.LORA_STRENGTH}}}
        return patched_wan_graph({**nodes, **lora}, ["2", 0], 1.0, prefix, knobs=knobs)

    bypass, (r,), _ = run_logged(comfy_server, with_lora(BUILD.BYPASS_LORA_NODE, "qs_wan/bypass"))
    assert_every_call_accounted(r)
    a, b = saved(comfy_server, plain, "29").float(), saved(comfy_server, bypass, "29").float()
    assert torch.isfinite(b).all() and (a - b).abs().max() > 1e-3

    entry = comfy_server.run(with_lora("LoraLoaderModelOnly", "qs_wan/stocklora"))
    assert entry["status"]["status_str"] == "error"
    (err,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert "LoRA is not supported on QuantSparse quantized layers" in err["exception_message"]
    assert "Load LoRA (Bypass)" in err["exception_message"]
