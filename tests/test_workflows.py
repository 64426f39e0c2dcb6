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


STOCK_LOADERS = ("UNETLoader", "DualCLIPLoader", "VAELoader")
REPO = WORKFLOWS.parent


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
    file the loaders name with its download link, and, for a QuantSparse checkpoint (no download), how to make one."""
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
            assert ckpt not in links  # no download exists: the note says how to make it
            assert f"quantsparse convert {BUILD.BF16} ComfyUI/models/quantsparse/{ckpt} --bits w4a8" in text
            assert f'"{BUILD.CALIBRATION}" template' in text and BUILD.BF16 in links


@pytest.mark.parametrize("name", sorted(BUILD.WORKFLOWS))
def test_stock_loaders_carry_download_links(name):
    """UNETLoader, DualCLIPLoader and VAELoader list each file they load as {name, url, directory} (what ComfyUI's
    missing-models panel downloads); the URLs are compared with ComfyUI's own template in tests/comfyui/."""
    g = json.loads((WORKFLOWS / name).read_text())
    loaders = [n for n in g["nodes"] if n["type"] in STOCK_LOADERS]
    assert {n["type"] for n in loaders} >= {"DualCLIPLoader", "VAELoader"}
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
