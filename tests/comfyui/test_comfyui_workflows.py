"""The example workflows against a real ComfyUI: every node type exists and every widget value fits its input."""

from __future__ import annotations

import json
import pathlib

import pytest

pytestmark = pytest.mark.comfyui

WORKFLOWS = sorted((pathlib.Path(__file__).resolve().parents[2] / "workflows").glob("*.json"))
MODEL_WIDGETS = {"ckpt_name", "clip_name1", "clip_name2", "vae_name", "unet_name"}  # files a user supplies


def widget_inputs(spec: dict) -> list[tuple[str, list]]:
    """The widget inputs of a node in the order the UI stores their values (a seed adds its control widget)."""
    out = []
    for section in ("required", "optional"):
        for name, value in spec["input"].get(section, {}).items():
            kind, options = value[0], (value[1] if len(value) > 1 else {})
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                out.append((name, value))
                if isinstance(options, dict) and options.get("control_after_generate"):
                    out.append(("control_after_generate", ["COMBO", {}]))
    return out


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
            if options and name not in MODEL_WIDGETS and name != "control_after_generate":
                assert value in options, f"{node['type']}.{name}={value!r} not in {options[:8]}"


def test_workflows_are_listed_as_templates(comfy_server):
    """ComfyUI's template browser lists a custom node's workflows/ folder (it accepts that name)."""
    templates = comfy_server.get("/workflow_templates")
    ours = [files for files in templates.values() if "quantsparse_text_to_video" in json.dumps(files)]
    assert ours, templates
