"""The example workflows: committed JSON equals what workflows/build.py makes, and the graph is consistent."""

from __future__ import annotations

import importlib.util
import json
import pathlib
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
