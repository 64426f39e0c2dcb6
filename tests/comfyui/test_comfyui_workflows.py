"""The example workflows against a real ComfyUI: every node type exists, every widget value fits its
input, each node's widget values read by name (the frontend's rule, through /object_info) are the ones
workflows/build.py gave, the template browser's routes serve the workflows and their thumbnails, the
download links are ComfyUI's own (each workflow's from its ComfyUI template), and the text-to-video workflow itself
runs through /prompt with the tiny model substituted (the Wan workflows run in test_comfyui_wan.py)."""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import urllib.error
import urllib.parse
import urllib.request

import pytest
import torch
from safetensors.torch import load_file

from .test_comfyui_server import succeeded
from .test_comfyui_sparse import summary
from .conftest import PACK_DIR_NAME
from .workflow_api import VIRTUAL, assert_links_resolve, load_build, named_widgets, to_api, widget_inputs

pytestmark = pytest.mark.comfyui

BUILD = load_build()
WORKFLOWS_DIR = pathlib.Path(__file__).resolve().parents[2] / "workflows"
WORKFLOWS = sorted(WORKFLOWS_DIR / name for name in BUILD.WORKFLOWS)
TEXT_TO_VIDEO = WORKFLOWS_DIR / f"{BUILD.TEXT_TO_VIDEO}.json"
# Files a user supplies (models, LoadImage's start frame): not in this test server's lists.
MODEL_WIDGETS = {"ckpt_name", "clip_name", "clip_name1", "clip_name2", "vae_name", "unet_name", "image"}
STOCK_LOADERS = BUILD.STOCK_LOADERS


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_nodes_and_widgets_exist_in_comfyui(comfy_server, path):
    info = comfy_server.get("/object_info")
    graph = json.loads(path.read_text())
    for node in graph["nodes"]:
        if node["type"] in VIRTUAL:  # frontend-only (the note): checked in the browser test
            continue
        assert node["type"] in info, f"{path.name}: node type {node['type']} is not registered"
        widgets = widget_inputs(info[node["type"]])
        assert len(node["widgets_values"]) == len(widgets), (node["type"], node["widgets_values"], widgets)
        for value, (name, spec) in zip(node["widgets_values"], widgets):
            options = spec[0] if isinstance(spec[0], list) else spec[1].get("options") if spec[0] == "COMBO" else None
            if options and name not in MODEL_WIDGETS:
                assert value in options, f"{node['type']}.{name}={value!r} not in {options[:8]}"
            if spec[0] in ("INT", "FLOAT"):
                assert isinstance(value, (int, float)) and not isinstance(value, bool), (node["type"], name, value)
                lo, hi = spec[1].get("min", float("-inf")), spec[1].get("max", float("inf"))
                assert lo <= value <= hi, f"{node['type']}.{name}={value!r} outside [{lo}, {hi}]"
            if spec[0] == "BOOLEAN":
                assert isinstance(value, bool), f"{node['type']}.{name}={value!r} is not a boolean"


@pytest.mark.parametrize("name", sorted(BUILD.WORKFLOWS))
def test_widget_values_by_name_are_the_built_ones(comfy_server, name):
    """Each node's ``widgets_values``, named as the frontend names them (its control-widget rule applied to
    this server's /object_info), are exactly build.py's name -> value pairs, in order: a missing or extra
    value anywhere (e.g. no value for a seed's control widget) shifts every later name and fails here."""
    info = comfy_server.get("/object_info")
    graph = json.loads((WORKFLOWS_DIR / name).read_text())
    built = {n.id: n for n in BUILD.WORKFLOWS[name]().nodes}
    assert sorted(n["id"] for n in graph["nodes"]) == sorted(built)
    for node in graph["nodes"]:
        expected = list(built[node["id"]].widgets.items())
        assert named_widgets(node, info) == expected, f"{name}: node {node['id']} ({node['type']})"


def test_the_control_widget_rule_matches_the_frontend_source():
    """The rule in workflow_api.extra_widgets, on the cases the frontend's useIntWidget / useFloatWidget /
    addComboWidget distinguish (see its docstring); the browser test checks it on the real frontend."""
    from .workflow_api import CONTROL, FILTER, UPLOAD, extra_widgets

    assert extra_widgets("INT", "seed", {}) == [CONTROL]  # by name alone
    assert extra_widgets("INT", "noise_seed", {}) == [CONTROL]
    assert extra_widgets("INT", "seed", {"control_after_generate": False}) == []  # an explicit false wins
    assert extra_widgets("INT", "seed", {"control_after_generate": "fixed"}) == [CONTROL]
    assert extra_widgets("INT", "steps", {}) == []
    assert extra_widgets("INT", "steps", {"control_after_generate": True}) == [CONTROL]
    assert extra_widgets("FLOAT", "seed", {}) == []  # the name rule is the INT widget's only
    assert extra_widgets("FLOAT", "cfg", {"control_after_generate": True}) == [CONTROL]
    assert extra_widgets("COMBO", "seed", {}) == []
    assert extra_widgets("COMBO", "sampler", {"control_after_generate": True}) == [CONTROL, FILTER]
    assert extra_widgets("STRING", "seed", {"control_after_generate": True}) == []
    # a media file COMBO gets the upload button, saved as "image" (LoadImage: [file, "image"])
    load_image = {"input": {"required": {"image": [["a.png"], {"image_upload": True}]}},
                  "input_order": {"required": ["image"]}}
    assert [k for k, _ in widget_inputs(load_image)] == ["image", UPLOAD]
    assert [k for k, _ in widget_inputs({"input": {"required": {"image": [["a.png"], {}]}}})] == ["image"]


def test_workflows_are_listed_as_templates(comfy_server):
    """ComfyUI's template browser lists the pack's workflows/ folder by file stem (the title the frontend
    shows) and serves each workflow and its <stem>.jpg thumbnail where the frontend asks for them."""
    templates = comfy_server.get("/workflow_templates")
    stems = [name[: -len(".json")] for name in BUILD.WORKFLOWS]
    assert sorted(templates.get(PACK_DIR_NAME, [])) == sorted(stems), templates
    for stem in stems:
        base = f"{comfy_server.url}/api/workflow_templates/{PACK_DIR_NAME}/{urllib.parse.quote(stem)}"
        with urllib.request.urlopen(base + ".json", timeout=30) as r:
            assert json.loads(r.read()) == json.loads((WORKFLOWS_DIR / f"{stem}.json").read_text())
        with urllib.request.urlopen(base + ".jpg", timeout=30) as r:
            data = r.read()
            assert r.headers.get_content_type() == "image/jpeg" and data[:3] == b"\xff\xd8\xff", stem
            assert data == (WORKFLOWS_DIR / f"{stem}.jpg").read_bytes()


def template_models(server, template: str) -> dict[str, dict]:
    """{file: properties.models entry} of every node of a ComfyUI template as this ComfyUI serves it, the nodes
    inside its subgraphs included (the Wan 2.2 templates keep their loaders in one); skips when not served."""
    try:
        stock = server.get(f"/templates/{template}")
    except urllib.error.HTTPError as e:
        pytest.skip(f"this ComfyUI does not serve /templates/{template} ({e}); "
                    "install comfyui-workflow-templates to compare the download links")
    subgraphs = (stock.get("definitions") or {}).get("subgraphs", [])
    nodes = list(stock["nodes"]) + [n for sg in subgraphs for n in sg["nodes"]]
    out = {}
    for n in nodes:
        for m in (n.get("properties") or {}).get("models") or []:
            assert out.get(m["name"], m) == m, f"{template}: two links for {m['name']}"
            out[m["name"]] = m
    return out


def test_model_links_are_comfyuis_own(comfy_server):
    """The stock loaders' ``properties.models`` (what the missing-models panel downloads) are the entries of the
    ComfyUI template each workflow names (HunyuanVideo's, Wan 2.2 T2V / I2V A14B's, Wan 2.1 T2V's) for the same
    files, as this ComfyUI serves it; so is every template link build.py keeps (the notes' 4-step LoRAs too)."""
    theirs = {t: template_models(comfy_server, t) for t in BUILD.TEMPLATE_LINKS}
    for template, links in BUILD.TEMPLATE_LINKS.items():
        for name, (directory, url) in links.items():
            assert theirs[template].get(name) == {"name": name, "url": url, "directory": directory}, (template, name)
    seen = {t: set() for t in BUILD.TEMPLATE_LINKS}
    for name in BUILD.WORKFLOWS:
        template = BUILD.TEMPLATE_OF[name]
        for node in json.loads((WORKFLOWS_DIR / name).read_text())["nodes"]:
            if node["type"] not in STOCK_LOADERS:
                continue
            models = node["properties"].get("models")
            files = [v for v in node["widgets_values"] if isinstance(v, str) and v.endswith(".safetensors")]
            assert models == [theirs[template][f] for f in files], f"{name}: {node['type']}"
            seen[template].update(files)
    # every template link is used by a loader, a note's conversion source, or a note's LoRA
    notes = set(BUILD.CHECKPOINTS.values()) | {f for pair in BUILD.LORAS.values() for f in pair}
    for template, links in BUILD.TEMPLATE_LINKS.items():
        assert set(links) <= seen[template] | notes, (template, set(links) - seen[template] - notes)


def test_conversion_sources_sit_beside_the_templates_files(comfy_server):
    """The Wan 2.2 templates load fp8_scaled experts; the notes link the FP16 files of the same experts as the
    conversion source (SOURCE_LINKS; 4-bit from an 8-bit model would add the two errors): the same repository
    folder as the template's own expert links, the same file names but for the precision."""
    for task, template in (("t2v", BUILD.WAN22_T2V_TEMPLATE), ("i2v", BUILD.WAN22_I2V_TEMPLATE)):
        experts = {n: m for n, m in template_models(comfy_server, template).items() if m["directory"] ==
                   "diffusion_models"}
        assert sorted(experts) == [f"wan2.2_{task}_{noise}_noise_14B_fp8_scaled.safetensors"
                                   for noise in ("high", "low")]
        for fp8, m in experts.items():
            fp16 = fp8.replace("fp8_scaled", "fp16")
            directory, url = BUILD.SOURCE_LINKS[fp16]
            assert directory == m["directory"] and url == m["url"].replace(fp8, fp16)
    assert set(BUILD.SOURCE_LINKS) <= set(BUILD.CHECKPOINTS.values())


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
    from comfyui_quantsparse.quantsparse.models.hunyuan_video.dims import HunyuanVideoDims
    from comfyui_quantsparse.quantsparse.sparse.config import SparseConfig
    from comfyui_quantsparse.quantsparse.sparse.ssar import DENSE, REFRESH, SPARSE, step_kind

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
