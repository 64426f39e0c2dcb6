"""The example workflows in ComfyUI's real frontend (headless Chromium): every node type is known, every
widget shows the value workflows/build.py gave it (by name, control widgets included), advanced inputs come
where the schema puts them and are hidden by default, the frontend re-saves the same widgets_values, and the
template browser shows each workflow with its title, description and thumbnail and loads it when clicked.

Needs, besides COMFYUI_DIR: Node.js (``node`` on PATH or NODE), Chromium (CHROMIUM, else /usr/bin/chromium)
and playwright-core (PLAYWRIGHT_CORE_DIR: the node_modules folder holding it, else /work/tools/node_modules);
skipped, saying which is missing, without them. QS_BROWSER_SHOTS=DIR also saves screenshots there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest

from .conftest import PACK_DIR_NAME
from .workflow_api import CONTROL, REPO, load_build, widget_inputs

pytestmark = pytest.mark.comfyui

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "browser_workflows.js"
BUILD = load_build()
WORKFLOWS_DIR = REPO / "workflows"
CONTROL_LABEL = "control after generate"


def _find(env: str, fallback: str, check) -> tuple[str | None, str]:
    """(path, what was looked at): the environment variable's value if set (no fallback then), else the fallback."""
    value = os.environ.get(env)
    if value:
        return (value if check(value) else None), f"{env}={value}"
    return (fallback if check(fallback) else None), f"{env} unset, no {fallback}"


@pytest.fixture(scope="session")  # session: decided before the session-scoped ComfyUI server starts
def browser_tools():
    node_env = os.environ.get("NODE")
    node = (node_env if node_env and os.access(node_env, os.X_OK) else None) if node_env else shutil.which("node")
    chromium, chromium_how = _find("CHROMIUM", "/usr/bin/chromium", lambda p: os.access(p, os.X_OK))
    core, core_how = _find("PLAYWRIGHT_CORE_DIR", "/work/tools/node_modules",
                           lambda p: (Path(p) / "playwright-core" / "package.json").is_file())
    missing = [f"{what} ({how})" for what, found, how in (
        ("Node.js", node, f"NODE={node_env}" if node_env else "no node on PATH"),
        ("Chromium", chromium, chromium_how),
        ("playwright-core", core, f"{core_how}; set it to a node_modules folder holding playwright-core"),
    ) if not found]
    if missing:
        pytest.skip("the browser test needs " + "; ".join(missing))
    return node, chromium, core


@pytest.fixture(scope="module")
def frontend(browser_tools, comfy_server, tmp_path_factory):
    """What the frontend shows, as browser_workflows.js reports it (one browser run for all the tests here)."""
    node, chromium, core = browser_tools
    work = tmp_path_factory.mktemp("browser")
    shots = os.environ.get("QS_BROWSER_SHOTS")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
    config = {"url": comfy_server.url, "chromium": chromium, "playwright_core": core, "pack": PACK_DIR_NAME,
              "workflows": [{"name": n, "path": str(WORKFLOWS_DIR / n)} for n in sorted(BUILD.WORKFLOWS)],
              "out": str(work / "result.json"), "shots": shots or None}
    (work / "config.json").write_text(json.dumps(config))
    proc = subprocess.run([node, str(SCRIPT), str(work / "config.json")], capture_output=True, text=True,
                          timeout=600, cwd=work)
    assert proc.returncode == 0, f"browser_workflows.js failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads((work / "result.json").read_text())
    for nodes in [*result["workflows"].values(), *result["card_loads"].values(), result["probe"]]:
        for node in nodes:
            node["id"] = int(node["id"])  # the frontend may hold node ids as strings
    return result


def same(a, b) -> bool:
    """Equal, and a boolean only equals a boolean (False == 0 in Python, not in a widget)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def saved_widgets(node: dict) -> list[dict]:
    """The widgets whose values the frontend saves in ``widgets_values`` (not e.g. LoadImage's image preview)."""
    return [w for w in node["widgets"] if w["serialize"]]


def shown_widgets(node: dict) -> list[tuple[str, object]]:
    """(name, value) of a node's saved widgets as the frontend holds them, a control widget named ``CONTROL``
    (the frontend names it by its default when the schema gives one as a string, e.g. "fixed")."""
    out = []
    widgets = saved_widgets(node)
    for i, w in enumerate(widgets):
        if w["control_of"] is not None:
            assert i > 0 and widgets[i - 1]["name"] == w["control_of"], (node["type"], w)
            assert w["label"] == CONTROL_LABEL, (node["type"], w)
            out.append((CONTROL, w["value"]))
        else:
            out.append((w["name"], w["value"]))
    return out


@pytest.mark.parametrize("name", sorted(BUILD.WORKFLOWS))
def test_every_node_type_is_known_to_the_frontend(frontend, name):
    nodes = frontend["workflows"][name]
    graph = json.loads((WORKFLOWS_DIR / name).read_text())
    assert sorted((n["id"], n["type"]) for n in nodes) == sorted((n["id"], n["type"]) for n in graph["nodes"])
    missing = [n["type"] for n in nodes if not n["registered"]]
    assert not missing, f"{name}: the frontend has no node type {missing}"


def test_the_missing_type_check_sees_an_unknown_type(frontend):
    """The probe graph's made-up type is reported unregistered: the check above can fail."""
    assert [(n["type"], n["registered"]) for n in frontend["probe"]] == [("QSNoSuchNode", False)]


@pytest.mark.parametrize("name", sorted(BUILD.WORKFLOWS))
def test_widgets_show_the_built_values(frontend, name):
    """Each node's widgets, by name and in order, hold exactly build.py's values (a shifted value, e.g.
    a missing control-widget value, puts the wrong value under every later name)."""
    built = {n.id: n for n in BUILD.WORKFLOWS[name]().nodes}
    for node in frontend["workflows"][name]:
        shown = shown_widgets(node)
        expected = list(built[node["id"]].widgets.items())
        assert [k for k, _ in shown] == [k for k, _ in expected], f"{name}: node {node['id']} ({node['type']})"
        for (key, got), (_, want) in zip(shown, expected):
            assert same(got, want), f"{name}: {node['type']} (node {node['id']}).{key} shows {got!r}, built {want!r}"


@pytest.mark.parametrize("name", sorted(BUILD.WORKFLOWS))
def test_the_frontend_saves_the_same_widget_values(frontend, name):
    """Re-serialized by the frontend, every node's widgets_values are the file's (nothing reset or moved)."""
    graph = {n["id"]: n for n in json.loads((WORKFLOWS_DIR / name).read_text())["nodes"]}
    for node in frontend["workflows"][name]:
        saved, filed = node["serialized"], graph[node["id"]]["widgets_values"]
        assert len(saved) == len(filed) and all(same(a, b) for a, b in zip(saved, filed)), (node["type"], saved)


def test_calibrate_shows_its_seed_control_and_advanced_inputs(frontend):
    """The user's report, on the real frontend: after seed comes its control widget ("fixed"), then
    file_name, overwrite = false; the advanced inputs guidance 6, lambda_local -1 ... restart false."""
    node = next(n for n in frontend["workflows"][f"{BUILD.CALIBRATION}.json"] if n["type"] == "QuantSparseCalibrate")
    shown = shown_widgets(node)
    names = [k for k, _ in shown]
    at = names.index("seed")
    assert names[at: at + 4] == ["seed", CONTROL, "file_name", "overwrite"]
    values = dict(shown)
    assert values[CONTROL] == "fixed" and values["file_name"] == "hunyuan_video_msad_w4a8"
    assert same(values["overwrite"], False) and same(values["restart"], False)
    assert values["guidance"] == 6.0 and values["lambda_local"] == -1 and values["lambda_global"] == -1


@pytest.mark.parametrize("name", sorted(BUILD.WORKFLOWS))
def test_advanced_inputs_are_where_the_schema_puts_them(frontend, comfy_server, name):
    """The widgets the frontend marks advanced are the inputs /object_info flags ``advanced``, in schema order,
    among the others exactly where the schema puts them (the values are stored by position); on our nodes they
    come after all the others. (Whether they are drawn depends on the renderer: the classic canvas of 1.47.10
    shows them, Nodes 2.0 folds them behind "show advanced inputs"; the order is the same node.widgets.)"""
    info = comfy_server.get("/object_info")
    for node in frontend["workflows"][name]:
        if node["type"] not in info:
            continue  # the note: no schema, no advanced inputs
        spec = info[node["type"]]
        flagged = [k for s in ("required", "optional") for k in spec.get("input_order", {}).get(s, [])
                   if (spec["input"][s][k][1] if len(spec["input"][s][k]) > 1 else {}).get("advanced")]
        widgets = saved_widgets(node)
        assert [w["name"] for w in widgets if w["advanced"]] == flagged, node["type"]
        schema = [k for k, _ in widget_inputs(spec)]
        assert [CONTROL if w["control_of"] else w["name"] for w in widgets] == schema, node["type"]
        if node["type"].startswith("QuantSparse") and flagged:
            first = min(i for i, w in enumerate(widgets) if w["advanced"])
            assert all(w["advanced"] for w in widgets[first:]), [(w["name"], w["advanced"]) for w in widgets]
    if name == f"{BUILD.CALIBRATION}.json":
        calib = next(n for n in frontend["workflows"][name] if n["type"] == "QuantSparseCalibrate")
        assert [w["name"] for w in calib["widgets"] if w["advanced"]] == [
            "guidance", "lambda_global", "lambda_local", "sparse_calibration", "restart"]


def missing_rows(text: str) -> dict[str, tuple[str, str]]:
    """{file: (folder or "Unknown", the line after it: "Download" or the node's title)} from the panel's text."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return {line: (lines[i + 1], lines[i + 2] if i + 2 < len(lines) else "")
            for i, line in enumerate(lines) if line.endswith(".safetensors") and i + 1 < len(lines)}


@pytest.mark.parametrize("name", sorted(BUILD.WORKFLOWS))
def test_missing_models_panel_offers_the_downloads(frontend, name):
    """None of the model files is in the test's ComfyUI: the frontend's missing-models panel lists every file
    the loaders name, offers a download for each stock file (from properties.models, into its folder), and
    none for the QuantSparse checkpoint, which users make (the note says how)."""
    text = frontend["missing_models"][name]
    assert text is not None, f"{name}: the frontend showed no missing-models panel"
    rows = missing_rows(text)
    graph = json.loads((WORKFLOWS_DIR / name).read_text())
    stock = {m["name"]: m["directory"] for n in graph["nodes"] for m in n["properties"].get("models", [])}
    ours = {n["widgets_values"][0] for n in graph["nodes"] if n["type"] == "QuantSparseLoader"}
    assert set(rows) == set(stock) | ours, text
    for file, directory in stock.items():
        assert rows[file] == (directory, "Download"), (file, rows[file])
    for file in ours:
        assert rows[file][0] == "Unknown" and rows[file][1] != "Download", (file, rows[file])


def test_template_browser_shows_titles_descriptions_and_thumbnails(frontend, comfy_server):
    """In the template browser's entry for the pack: one card per workflow, titled by its file stem, the
    description the frontend derives from it ('-' and '_' become spaces), and the thumbnail the frontend
    fetched from /api/workflow_templates/<pack>/<stem>.jpg shown (384 x 384; the generic fallback is not)."""
    stems = sorted(n[: -len(".json")] for n in BUILD.WORKFLOWS)
    cards = sorted(frontend["cards"], key=lambda c: c["title"])
    assert [c["title"] for c in cards] == stems
    for card, stem in zip(cards, stems):
        assert card["description"] == re.sub(r"[-_]", " ", stem).strip()
        url = f"{comfy_server.url}/api/workflow_templates/{PACK_DIR_NAME}/{urllib.parse.quote(stem)}.jpg"
        fetched = [r for r in frontend["template_responses"] if r["url"] == url]
        assert fetched and all(r["status"] in (200, 304) for r in fetched), (url, frontend["template_responses"])
        assert fetched[0]["content_type"] == "image/jpeg", fetched
        assert "default-template" not in card["thumbnail"]["src"], card
        assert (card["thumbnail"]["width"], card["thumbnail"]["height"]) == (384, 384), card


def test_clicking_a_template_loads_its_workflow(frontend):
    """Each card, clicked, loads its workflow (the same nodes) with the built widget values."""
    assert sorted(frontend["card_loads"]) == sorted(n[: -len(".json")] for n in BUILD.WORKFLOWS)
    for title, nodes in frontend["card_loads"].items():
        built = {n.id: n for n in BUILD.WORKFLOWS[f"{title}.json"]().nodes}
        assert sorted(n["id"] for n in nodes) == sorted(built), title
        for node in nodes:
            assert node["registered"], (title, node["type"])
            shown, expected = shown_widgets(node), list(built[node["id"]].widgets.items())
            assert len(shown) == len(expected) and all(
                k == e and same(v, w) for (k, v), (e, w) in zip(shown, expected)), (title, node["type"], shown)
