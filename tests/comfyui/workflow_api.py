"""UI-format workflow (what drag and drop and the template browser load) -> API-format prompt (what
``POST /prompt`` takes).

The frontend does this in JavaScript (``app.graphToPrompt``); the tests need it without a browser, so
this is the subset our example workflows use, driven by the server's own ``/object_info`` rather than
by names written here: each node's ``widgets_values`` are matched to its widget inputs in schema
order (with the frontend's extra UI-only widgets, which the API does not take, where the frontend adds
them: see ``extra_widgets``), and each link becomes ``[source node id, output slot]``.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

CONTROL = "control_after_generate"  # the UI-only widget after a seed ("fixed", "randomize", ...)
FILTER = "control_filter_list"  # the UI-only text widget a COMBO with a control widget also gets
UPLOAD = "upload"  # the UI-only upload button a media file COMBO (LoadImage's image) adds; it saves "image"
UI_ONLY = (CONTROL, FILTER, UPLOAD)
MEDIA_UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
CONTROL_CHOICES = ("fixed", "increment", "decrement", "randomize")
SEED_NAMES = ("seed", "noise_seed")
WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
VIRTUAL = {"Note", "MarkdownNote"}  # frontend-only nodes: nothing to execute
VIRTUAL_WIDGETS = {"Note": ["text"], "MarkdownNote": ["text"]}  # their one widget, named by the frontend
MUTED, BYPASSED = 2, 4  # LiteGraph node modes
REPO = pathlib.Path(__file__).resolve().parents[2]


def extra_widgets(kind: str, name: str, options: dict) -> list[str]:
    """The UI-only widgets the frontend adds after the widget of input ``name`` (type ``kind``).

    The rule of ComfyUI's frontend 1.47.10 (comfyui-frontend-package; assets/promotionUtils-*.js):
    - INT (useIntWidget): a control widget when ``spec.control_after_generate ?? ["seed",
      "noise_seed"].includes(spec.name)`` is truthy: any INT named seed or noise_seed gets one unless it
      says control_after_generate=False, and any INT flagged truthy gets one whatever its name;
    - FLOAT (useFloatWidget): a control widget when ``control_after_generate`` is truthy;
    - COMBO (addComboWidget -> addValueControlWidgets): when ``control_after_generate`` is truthy, a
      control widget and then a filter-list text widget (addFilterList is not turned off there).
    A string ``control_after_generate`` is the control widget's default value (and, in the frontend, its
    internal name; its label stays "control after generate"). None of these widgets reach the server.
    """
    flag = options.get(CONTROL)
    if kind == "INT":
        return [CONTROL] if (flag if flag is not None else name in SEED_NAMES) else []
    if kind == "FLOAT":
        return [CONTROL] if flag else []
    if kind == "COMBO" and flag:
        if options.get("multiselect"):
            raise NotImplementedError(f"{name}: a multiselect COMBO with a control widget is not handled here")
        return [CONTROL, FILTER]
    return []


def upload_widget(spec: dict) -> tuple[str, list] | None:
    """The upload button the frontend (1.47.10, extension Comfy.UploadImage) adds to a node: when a required
    input is a COMBO flagged ``image_upload``, ``video_upload`` or ``animated_image_upload`` (the first such),
    a required ``upload`` input of type IMAGEUPLOAD is appended to the required inputs; its button widget
    holds the value "image", which the UI saves in ``widgets_values`` (ComfyUI's own templates store LoadImage
    as ``[file, "image"]``) but the server never takes. Where it goes among other widgets is checked on
    LoadImage only (the browser test), whose one input is the file."""
    for name, value in spec["input"].get("required", {}).items():
        options = value[1] if len(value) > 1 and isinstance(value[1], dict) else {}
        if (isinstance(value[0], list) or value[0] == "COMBO") and any(options.get(f) is True
                                                                        for f in MEDIA_UPLOAD_FLAGS):
            return UPLOAD, ["IMAGEUPLOAD", {**options, "imageInputName": name}]
    return None


def widget_inputs(spec: dict) -> list[tuple[str, list]]:
    """(name, input spec) of a node's widgets in the order the UI stores their values, with the
    frontend's UI-only widgets (``extra_widgets``, ``upload_widget``) as ``(CONTROL, ...)`` /
    ``(FILTER, ...)`` / ``(UPLOAD, ...)``."""
    order = spec.get("input_order") or {s: list(spec["input"].get(s, {})) for s in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        inputs = spec["input"].get(section, {})
        if section == "optional" and upload_widget(spec):
            out.append(upload_widget(spec))
        for name in order.get(section, []):
            value = inputs[name]
            kind, options = value[0], (value[1] if len(value) > 1 else {})
            options = options if isinstance(options, dict) else {}
            kind = "COMBO" if isinstance(kind, list) else kind
            if kind in WIDGET_KINDS and not options.get("forceInput"):
                out.append((name, value))
                for extra in extra_widgets(kind, name, options):
                    if extra == CONTROL:  # its choices (a COMBO's control can also wrap around)
                        choices = CONTROL_CHOICES + (("increment-wrap",) if kind == "COMBO" else ())
                        out.append((CONTROL, ["COMBO", {"options": list(choices)}]))
                    else:
                        out.append((extra, ["STRING", {}]))
    return out


def widget_names(node: dict, object_info: dict) -> list[str]:
    """The names of a UI-format node's widgets, in ``widgets_values`` order."""
    if node["type"] in VIRTUAL_WIDGETS:
        return list(VIRTUAL_WIDGETS[node["type"]])
    return [name for name, _ in widget_inputs(object_info[node["type"]])]


def named_widgets(node: dict, object_info: dict) -> list[tuple[str, object]]:
    """``[(widget name, value)]`` of a UI-format node as the frontend reads its ``widgets_values``
    (positionally), or a ValueError when the counts differ (the frontend would shift or drop values)."""
    names, values = widget_names(node, object_info), node.get("widgets_values") or []
    if len(values) != len(names):
        raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values {values} for "
                         f"{len(names)} widgets {names}")
    return list(zip(names, values))


def load_build():
    """workflows/build.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("qs_workflow_build", REPO / "workflows" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def to_api(graph: dict, object_info: dict) -> dict:
    """The API prompt ``{node id: {"class_type", "inputs"}}`` of a UI-format ``graph``.

    Raises on what this subset does not handle (a bypassed node, an unknown node type, a widget count
    that does not match the schema) instead of guessing, so a test cannot pass on a wrong conversion.
    """
    sources = {link[0]: [str(link[1]), link[2]] for link in graph["links"]}
    prompt = {}
    for node in graph["nodes"]:
        kind = node["type"]
        if kind in VIRTUAL or node.get("mode", 0) == MUTED:
            continue
        if node.get("mode", 0) == BYPASSED:
            raise NotImplementedError(f"node {node['id']} ({kind}) is bypassed; rerouting is not implemented")
        if kind not in object_info:
            raise KeyError(f"node {node['id']}: type {kind} is not registered in this ComfyUI")
        inputs = {name: value for name, value in named_widgets(node, object_info) if name not in UI_ONLY}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                inputs[inp["name"]] = list(sources[inp["link"]])  # a link overrides a widget turned into an input
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs}
    return prompt


def assert_links_resolve(prompt: dict) -> None:
    """Every linked input of an API prompt points at a node still in it (after a test's substitutions)."""
    for node in prompt.values():
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in prompt, f"{node['class_type']} reads removed node {value[0]}"
