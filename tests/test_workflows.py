"""The example workflows: committed JSON equals what workflows/build.py makes, the graph is consistent, and each
carries what ComfyUI's template browser and missing-models panel need (a title as its file name, a thumbnail
beside it, a note with the model links, download links on the stock loaders). No ComfyUI needed; the values
as the real frontend reads them are checked in tests/comfyui/ (test_comfyui_workflows.py, test_comfyui_browser.py)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import struct
import sys

import pytest

WORKFLOWS = pathlib.Path(__file__).resolve().parent.parent / "workflows"


def builder():
    spec = importlib.util.spec_from_file_location("qs_workflow_build", WORKFLOWS / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


BUILD = builder()


@pytest.mark.parametrize("name", sorted(BUILD.WORKFLOWS))
def test_committed_workflow_is_the_built_one(name):
    assert (WORKFLOWS / name).read_text() == BUILD.render(name), f"run `python workflows/build.py` after editing {name}"


@pytest.mark.parametrize("name", sorted(BUILD.WORKFLOWS))
def test_workflow_graph_is_consistent(name):
    g = json.loads((WORKFLOWS / name).read_text())
    nodes = {n["id"]: n for n in g["nodes"]}
    assert g["last_node_id"] == max(nodes) and g["last_link_id"] == len(g["links"])
    for link_id, src, src_slot, dst, dst_slot, kind in g["links"]:
        assert nodes[src]["outputs"][src_slot]["type"] == kind
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["type"] == kind and nodes[dst]["inputs"][dst_slot]["link"] == link_id
    for n in nodes.values():
        for inp in n["inputs"]:
            assert inp["link"] is not None, f"{n['type']}.{inp['name']} is not connected"
    assert any(n["type"] in ("QuantSparseLoader", "QuantSparseCalibrate") for n in nodes.values())  # ours, not stock only


STOCK_LOADERS = BUILD.STOCK_LOADERS  # UNETLoader, CLIPLoader, DualCLIPLoader, VAELoader
TEXT_ENCODER_LOADERS = {"CLIPLoader", "DualCLIPLoader"}
REPO = WORKFLOWS.parent
WAN22 = [f"{BUILD.WAN22_T2V}.json", f"{BUILD.WAN22_I2V}.json"]
WAN = WAN22 + [f"{BUILD.WAN21_T2V}.json"]


def test_the_workflows_folder_holds_only_built_files():
    """ComfyUI lists every workflows/*.json as a template: nothing stale (e.g. a renamed file) may stay there."""
    built = set(BUILD.WORKFLOWS) | {BUILD.thumbnail_name(n) for n in BUILD.WORKFLOWS}
    shipped = {p.name for p in WORKFLOWS.iterdir() if p.suffix in (".json", ".jpg")}
    assert shipped == built


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a baseline or progressive JPEG's SOF marker."""
    assert data[:3] == b"\xff\xd8\xff", "not a JPEG"
    i = 2
    while i < len(data):
        assert data[i] == 0xFF, f"bad JPEG marker at {i}"
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        i += 2 + length
    raise AssertionError("no SOF marker")


@pytest.mark.parametrize("name", sorted(BUILD.WORKFLOWS))
def test_workflow_has_a_thumbnail(name):
    """The template browser loads ``<stem>.jpg`` beside the workflow (small, square, made by thumbnails.py)."""
    path = WORKFLOWS / BUILD.thumbnail_name(name)
    assert path.is_file(), f"run `python workflows/thumbnails.py` to make {path.name}"
    data = path.read_bytes()
    assert 5_000 < len(data) < 60_000, len(data)  # not blank, not heavy
    assert _jpeg_size(data) == (384, 384)


@pytest.mark.parametrize("name", sorted(BUILD.WORKFLOWS))
def test_workflow_note_names_the_models_and_their_links(name):
    """A MarkdownNote titled as the file (the template browser's title), with a one-line description, every model
    file the loaders name with its download link, and, for a QuantSparse checkpoint (no download), how to make one
    from which full-precision file (with its link); only HunyuanVideo's points at the Calibrate template."""
    title = name[: -len(".json")]
    g = json.loads((WORKFLOWS / name).read_text())
    notes = [n for n in g["nodes"] if n["type"] == "MarkdownNote"]
    assert len(notes) == 1
    note = notes[0]
    assert note.get("title") == title and note["widgets_values"] and isinstance(note["widgets_values"][0], str)
    text = note["widgets_values"][0]
    lines = text.splitlines()
    assert lines[0] == f"# {title}" and lines[1] == "" and len(lines[2]) > 40 and lines[3] == ""  # the description
    links = dict(re.findall(r"\[([^\]]+)\]\((https://[^)\s]+)\)", text))
    for node in g["nodes"]:
        if node["type"] in STOCK_LOADERS:
            for m in node["properties"]["models"]:
                assert links.get(m["name"]) == m["url"], f"{m['name']} has no link in the note"
                assert f"**{m['directory']}**" in text
        if node["type"] == "QuantSparseLoader":
            ckpt = node["widgets_values"][0]
            source = BUILD.CHECKPOINTS[ckpt]
            assert ckpt not in links  # no download exists: the note says how to make it
            assert f"quantsparse convert {source} ComfyUI/models/quantsparse/{ckpt} --bits w4a8" in text
            assert links.get(source) == {**BUILD.SOURCE_LINKS, **BUILD.TEMPLATE_LINKS[BUILD.TEMPLATE_OF[name]]}[
                source][1]
            # MSAD calibration exists for HunyuanVideo only: a Wan note must not send users to it
            assert (f'"{BUILD.CALIBRATION}" template' in text) == (source == BUILD.BF16)


@pytest.mark.parametrize("name", sorted(BUILD.WORKFLOWS))
def test_stock_loaders_carry_download_links(name):
    """UNETLoader, (Dual)CLIPLoader and VAELoader list each file they load as {name, url, directory} (what ComfyUI's
    missing-models panel downloads); the URLs are compared with ComfyUI's own templates in tests/comfyui/."""
    g = json.loads((WORKFLOWS / name).read_text())
    loaders = [n for n in g["nodes"] if n["type"] in STOCK_LOADERS]
    types = {n["type"] for n in loaders}
    assert "VAELoader" in types and types & TEXT_ENCODER_LOADERS
    for node in loaders:
        files = [v for v in node["widgets_values"] if isinstance(v, str) and v.endswith(".safetensors")]
        models = node["properties"]["models"]
        assert [m["name"] for m in models] == files and files
        for m in models:
            assert set(m) == {"name", "url", "directory"}
            assert m["url"].startswith("https://huggingface.co/") and m["name"] in m["url"]
            assert m["directory"] in ("diffusion_models", "text_encoders", "vae")
    assert not any("models" in n["properties"] for n in g["nodes"] if n["type"] not in STOCK_LOADERS)


def test_thumbnails_are_package_data():
    tomllib = pytest.importorskip("tomllib", reason="tomllib (Python 3.11+) reads pyproject.toml")
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = data["comfyui_quantsparse"]
    assert "workflows/*.json" in patterns and "workflows/*.jpg" in patterns


def test_every_workflow_names_its_template():
    """Each workflow's stock download links come from one ComfyUI template (tests/comfyui compares them)."""
    assert set(BUILD.TEMPLATE_OF) == set(BUILD.WORKFLOWS)
    assert set(BUILD.TEMPLATE_OF.values()) <= set(BUILD.TEMPLATE_LINKS)


def test_sparse_knobs_are_sparseconfig_defaults():
    """Every workflow's sparse knobs (QuantSparse Sampler and QuantSparse Attention alike) are SparseConfig's
    defaults: the workflows show what the nodes do out of the box."""
    import dataclasses

    from comfyui_quantsparse.quantsparse.sparse.config import SparseConfig

    defaults = {f.name: getattr(SparseConfig(), f.name) for f in dataclasses.fields(SparseConfig)}
    assert BUILD.SPARSE_KNOBS == {k: defaults[k] for k in BUILD.SPARSE_KNOBS}
    for name in BUILD.WORKFLOWS:
        for node in BUILD.WORKFLOWS[name]().nodes:
            if node.type in ("QuantSparseSampler", "QuantSparseAttention"):
                assert {k: node.widgets[k] for k in BUILD.SPARSE_KNOBS} == BUILD.SPARSE_KNOBS, (name, node.title)


def _graph(name):
    g = json.loads((WORKFLOWS / name).read_text())
    nodes = {n["id"]: n for n in g["nodes"]}
    source = {(link[3], link[4]): nodes[link[1]] for link in g["links"]}  # (node, input slot) -> source node

    def upstream(node, input_name):
        return source[(node["id"], [i["name"] for i in node["inputs"]].index(input_name))]
    return nodes, upstream


@pytest.mark.parametrize("name", WAN22)
def test_wan22_samples_two_experts_as_comfyuis_template(name):
    """Two Load QuantSparse Model nodes (high- and low-noise expert), each through its own QuantSparse Attention
    and a shift of 5 into its own KSamplerAdvanced: high noise adds the noise and samples steps 0-10 of 20,
    returning the leftover noise; low noise continues from 10 to the end; CFG 3.5, euler / simple (ComfyUI's
    template without its LoRA switch). One seed drives the noise."""
    nodes, upstream = _graph(name)
    built = {n.id: n for n in BUILD.WORKFLOWS[name]().nodes}
    samplers = [n for n in nodes.values() if n["type"] == "KSamplerAdvanced"]
    assert len(samplers) == 2 and sum(n["type"] == "QuantSparseLoader" for n in nodes.values()) == 2
    high, low = sorted(samplers, key=lambda n: built[n["id"]].widgets["start_at_step"])
    assert upstream(low, "latent_image") is high  # low noise continues high noise's latent
    ckpts = []
    for sampler in (high, low):
        shift = upstream(sampler, "model")
        attn = upstream(shift, "model")
        load = upstream(attn, "model")
        assert (shift["type"], attn["type"], load["type"]) == ("ModelSamplingSD3", "QuantSparseAttention",
                                                               "QuantSparseLoader")
        assert built[shift["id"]].widgets == {"shift": 5.0}
        ckpts.append(load["widgets_values"][0])
    task = "i2v" if name == f"{BUILD.WAN22_I2V}.json" else "t2v"
    assert ckpts == [f"wan2.2_{task}_high_noise_14B_w4a8.safetensors", f"wan2.2_{task}_low_noise_14B_w4a8.safetensors"]
    h, lo = built[high["id"]].widgets, built[low["id"]].widgets
    common = {"steps": 20, "cfg": 3.5, "sampler_name": "euler", "scheduler": "simple"}
    assert {k: h[k] for k in common} == common == {k: lo[k] for k in common}
    assert (h["add_noise"], h["start_at_step"], h["end_at_step"], h["return_with_leftover_noise"]) == (
        "enable", 0, 10, "enable")
    assert (lo["add_noise"], lo["start_at_step"], lo["end_at_step"], lo["return_with_leftover_noise"]) == (
        "disable", 10, 10000, "disable")
    if task == "i2v":
        i2v = upstream(high, "latent_image")
        assert i2v["type"] == "WanImageToVideo" and upstream(i2v, "start_image")["type"] == "LoadImage"
        for sampler in (high, low):
            assert upstream(sampler, "positive") is i2v and upstream(sampler, "negative") is i2v
    else:
        assert upstream(high, "latent_image")["type"] == "EmptyHunyuanLatentVideo"


@pytest.mark.parametrize("name", WAN22)
def test_wan22_note_describes_the_4_step_lora(name):
    """The LoRA option as ComfyUI's template has it (its two lightx2v files with their links, strength 1, 4 steps
    split at 2, cfg 1), that on QuantSparse layers only the bypass LoRA node works, and what 4 steps do to the
    sparse schedule (a dense warm-up step is a quarter of the run)."""
    g = json.loads((WORKFLOWS / name).read_text())
    text = next(n for n in g["nodes"] if n["type"] == "MarkdownNote")["widgets_values"][0]
    links = dict(re.findall(r"\[([^\]]+)\]\((https://[^)\s]+)\)", text))
    template = BUILD.TEMPLATE_OF[name]
    for lora in BUILD.LORAS[template]:
        assert links[lora] == BUILD.TEMPLATE_LINKS[template][lora][1]
        assert "4steps_lora" in lora
    high, low = BUILD.LORAS[template]
    assert "high_noise" in high and "low_noise" in low
    flat = " ".join(text.split())
    for phrase in ("Load LoRA (Bypass, Model Only) (for debugging)", "LoraLoaderBypassModelOnly",
                   "strength_model 1.0", "steps 4 and cfg 1.0", "end_at_step to 2", "start_at_step to 2",
                   "a dense warm-up step is a quarter of the run", "no warm-up", "refresh",
                   "cross-attention", "only through ComfyUI's bypass LoRA node"):
        assert phrase in flat, phrase


def test_wan21_samples_one_model_with_the_quantsparse_sampler():
    """Wan 2.1 1.3B: one Load QuantSparse Model through shift 8 into the QuantSparse Sampler, at the Wan 2.1
    template's sampling (30 steps uni_pc / simple, CFG 6, 832x480x33), the report on the node."""
    name = f"{BUILD.WAN21_T2V}.json"
    nodes, upstream = _graph(name)
    built = {n.id: n for n in BUILD.WORKFLOWS[name]().nodes}
    (sampler,) = [n for n in nodes.values() if n["type"] == "QuantSparseSampler"]
    shift = upstream(sampler, "model")
    assert built[shift["id"]].widgets == {"shift": 8.0}
    assert upstream(shift, "model")["widgets_values"] == ["wan2.1_t2v_1.3B_w4a8.safetensors"]
    w = built[sampler["id"]].widgets
    assert (w["steps"], w["cfg"], w["sampler_name"], w["scheduler"]) == (30, 6.0, "uni_pc", "simple")
    assert built[upstream(sampler, "latent_image")["id"]].widgets == {"width": 832, "height": 480, "length": 33,
                                                                       "batch_size": 1}


@pytest.mark.parametrize("name", WAN)
def test_wan_workflows_use_umt5_and_the_wan_vae(name):
    """umT5-XXL through CLIPLoader (type wan), Wan's negative prompt, the Wan 2.1 VAE, VAEDecode and a 16 fps
    video, as ComfyUI's Wan templates have them."""
    nodes, upstream = _graph(name)
    built = {n.id: n for n in BUILD.WORKFLOWS[name]().nodes}
    (clip,) = [n for n in nodes.values() if n["type"] == "CLIPLoader"]
    assert built[clip["id"]].widgets == {"clip_name": BUILD.UMT5, "type": "wan", "device": "default"}
    assert [n["widgets_values"] for n in nodes.values() if n["type"] == "VAELoader"] == [[BUILD.WAN_VAE]]
    texts = [n["widgets_values"][0] for n in nodes.values() if n["type"] == "CLIPTextEncode"]
    assert len(texts) == 2 and BUILD.WAN_NEGATIVE in texts
    (video,) = [n for n in nodes.values() if n["type"] == "CreateVideo"]
    assert built[video["id"]].widgets["fps"] == 16.0 and upstream(video, "images")["type"] == "VAEDecode"
