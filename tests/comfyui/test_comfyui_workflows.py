"""The example workflows against a real ComfyUI: every node type exists, every widget value fits its
input, and the text-to-video workflow itself runs through /prompt with the tiny model substituted."""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file

from .test_comfyui_server import succeeded
from .test_comfyui_sparse import summary
from .workflow_api import CONTROL, assert_links_resolve, to_api, widget_inputs

pytestmark = pytest.mark.comfyui

WORKFLOWS_DIR = pathlib.Path(__file__).resolve().parents[2] / "workflows"
WORKFLOWS = sorted(WORKFLOWS_DIR.glob("*.json"))
TEXT_TO_VIDEO = WORKFLOWS_DIR / "quantsparse_text_to_video.json"
MODEL_WIDGETS = {"ckpt_name", "clip_name1", "clip_name2", "vae_name", "unet_name"}  # files a user supplies


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_nodes_and_widgets_exist_in_comfyui(comfy_server, path):
    info = comfy_server.get("/object_info")
    graph = json.loads(path.read_text())
    for node in graph["nodes"]:
        assert node["type"] in info, f"{path.name}: node type {node['type']} is not registered"
        widgets = widget_inputs(info[node["type"]])
        assert len(node["widgets_values"]) == len(widgets), (node["type"], node["widgets_values"], widgets)
        for value, (name, spec) in zip(node["widgets_values"], widgets):
            options = spec[0] if isinstance(spec[0], list) else spec[1].get("options") if spec[0] == "COMBO" else None
            if options and name not in MODEL_WIDGETS and name != CONTROL:
                assert value in options, f"{node['type']}.{name}={value!r} not in {options[:8]}"
            if spec[0] in ("INT", "FLOAT"):
                lo, hi = spec[1].get("min", float("-inf")), spec[1].get("max", float("inf"))
                assert lo <= value <= hi, f"{node['type']}.{name}={value!r} outside [{lo}, {hi}]"


def test_workflows_are_listed_as_templates(comfy_server):
    """ComfyUI's template browser lists a custom node's workflows/ folder (it accepts that name)."""
    templates = comfy_server.get("/workflow_templates")
    ours = [files for files in templates.values() if "quantsparse_text_to_video" in json.dumps(files)]
    assert ours, templates


def only(prompt: dict, class_type: str) -> str:
    """The id of the one node of ``class_type`` (the substitutions below must each hit exactly one)."""
    ids = [i for i, n in prompt.items() if n["class_type"] == class_type]
    assert len(ids) == 1, f"expected one {class_type} in the workflow, found {ids}"
    return ids[0]


def test_text_to_video_workflow_runs_with_the_tiny_model(comfy_server, tiny_files):
    """The shipped text-to-video workflow, converted from its UI format, runs through /prompt.

    Only what cannot exist on a CPU test machine is substituted (listed below); the guidance, the zeroed
    negative, the shift, the sampler, its cfg and its sparse knobs (bar the block size) are the file's.
    """
    from comfyui_quantsparse.quantsparse.hunyuan.dims import HunyuanVideoDims
    from comfyui_quantsparse.quantsparse.sparse_config import SparseConfig
    from comfyui_quantsparse.quantsparse.ssar import DENSE, REFRESH, SPARSE, step_kind

    shipped = to_api(json.loads(TEXT_TO_VIDEO.read_text()), comfy_server.get("/object_info"))
    prompt = copy.deepcopy(shipped)
    sampler = only(prompt, "QuantSparseSampler")

    # --- substitutions, each for a reason the test machine imposes ---
    # 1. The 13B W4A8 checkpoint is not here: the tiny HunyuanVideo converted to W4A8 takes its place.
    prompt[only(prompt, "QuantSparseLoader")]["inputs"]["ckpt_name"] = tiny_files.w4a8.name
    # 2. The text encoders (CLIP-L + LLaVA-Llama-3 8B) cannot be fetched: the DualCLIPLoader goes and the
    #    CLIPTextEncode becomes random conditioning shaped for the tiny model (context_dim 64), under the
    #    same id, so that the workflow's FluxGuidance and ConditioningZeroOut still read it.
    del prompt[only(prompt, "DualCLIPLoader")]
    prompt[only(prompt, "CLIPTextEncode")] = {"class_type": "QSTestConditioning",
                                              "inputs": {"seed": 1, "tokens": 6, "context_dim": 64}}
    # 3. There is no tiny HunyuanVideo VAE: the VAE decode -> video tail becomes a SaveLatent of the sampler.
    for kind in ("VAELoader", "VAEDecodeTiled", "CreateVideo", "SaveVideo"):
        del prompt[only(prompt, kind)]
    save = str(max(int(i) for i in prompt) + 1)
    prompt[save] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0],
                                                           "filename_prefix": "qs_workflow/t2v"}}
    # 4. 848x480x73 at 20 steps would take far too long on a CPU: 128x128x9 (192 video tokens), 4 steps.
    latent = only(prompt, "EmptyHunyuanLatentVideo")
    prompt[latent]["inputs"].update(width=128, height=128, length=9)
    prompt[sampler]["inputs"]["steps"] = 4
    # 5. The workflow's 128x64-token blocks would split 192 tokens into 2 query blocks; 16x16 gives a
    #    12x12 block grid, so the mask has blocks to choose among at the workflow's density.
    prompt[sampler]["inputs"].update(block_q=16, block_k=16)

    # Everything else is the file's own, and no input points at a removed node.
    for kind in ("FluxGuidance", "ConditioningZeroOut", "ModelSamplingSD3"):
        assert prompt[only(prompt, kind)] == shipped[only(shipped, kind)]
    changed = {"steps", "block_q", "block_k"}
    ours, theirs = prompt[sampler]["inputs"], shipped[sampler]["inputs"]
    assert {k: v for k, v in ours.items() if k not in changed} == {k: v for k, v in theirs.items() if k not in changed}
    assert_links_resolve(prompt)

    entry = comfy_server.run(prompt)
    assert succeeded(entry)

    files = entry["outputs"][save]["latents"]
    assert len(files) == 1
    out = load_file(str(comfy_server.base / "output" / files[0]["subfolder"] / files[0]["filename"]))["latent_tensor"]
    li = prompt[latent]["inputs"]  # HunyuanVideo's VAE: 16 channels, 8x spatial, 4x temporal (+1 frame)
    assert out.shape == (li["batch_size"], 16, (li["length"] - 1) // 4 + 1, li["height"] // 8, li["width"] // 8)
    assert torch.isfinite(out).all() and out.float().std() > 0

    # The run's schedule is what the workflow's knobs say for 4 steps, and it includes sparse steps.
    knobs = SparseConfig(**{f.name: ours[f.name] for f in dataclasses.fields(SparseConfig) if f.name in ours})
    kinds = [step_kind(i, ours["steps"], knobs) for i in range(ours["steps"])]
    s = summary({"outputs": {"30": entry["outputs"][sampler]}})  # summary() reads the sampler at id "30"
    assert (s["steps"], s["dense"], s["refresh"], s["sparse"]) == (
        ours["steps"], kinds.count(DENSE), kinds.count(REFRESH), kinds.count(SPARSE)), s["text"]
    assert s["sparse"] > 0, s["text"]
    # Within one key block per row (of 12) of the density asked.
    assert 0 < s["density"] < 1 and abs(s["density"] - knobs.density) <= 1 / 12 + 1e-6, s["text"]
    # cfg 1.0 (guidance-distilled): ComfyUI runs no uncond pass, so one SSAR correction per joint block
    # and sparse step (the uncond half would double it), and none missing a refresh.
    dims = HunyuanVideoDims.tiny()
    assert ours["cfg"] == 1.0
    assert s["corrections"] == (dims.depth + dims.depth_single_blocks) * s["sparse"], s["text"]
    assert s["misses"] == 0 and s["peak_mib"] > 0, s["text"]
