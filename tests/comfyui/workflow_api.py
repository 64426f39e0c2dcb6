"""UI-format workflow (what drag and drop and the template browser load) -> API-format prompt (what
``POST /prompt`` takes).

The frontend does this in JavaScript (``app.graphToPrompt``); the tests need it without a browser, so
this is the subset our example workflows use, driven by the server's own ``/object_info`` rather than
by names written here: each node's ``widgets_values`` are matched to its widget inputs in schema
order (an input flagged ``control_after_generate`` is followed by that extra UI-only value, which the
API does not take), and each link becomes ``[source node id, output slot]``.
"""

from __future__ import annotations

CONTROL = "control_after_generate"  # the UI-only widget after a seed ("fixed", "randomize", ...)
WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
VIRTUAL = {"Note", "MarkdownNote"}  # frontend-only nodes: nothing to execute
MUTED, BYPASSED = 2, 4  # LiteGraph node modes


def widget_inputs(spec: dict) -> list[tuple[str, list]]:
    """(name, input spec) of a node's widgets in the order the UI stores their values; a
    ``control_after_generate`` input is followed by ``(CONTROL, ...)`` for its extra value."""
    order = spec.get("input_order") or {s: list(spec["input"].get(s, {})) for s in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        inputs = spec["input"].get(section, {})
        for name in order.get(section, []):
            value = inputs[name]
            kind, options = value[0], (value[1] if len(value) > 1 else {})
            if isinstance(kind, list) or kind in WIDGET_KINDS:
                out.append((name, value))
                if isinstance(options, dict) and options.get(CONTROL):
                    out.append((CONTROL, ["COMBO", {}]))
    return out


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
        widgets = widget_inputs(object_info[kind])
        values = node.get("widgets_values") or []
        if len(values) != len(widgets):
            raise ValueError(f"node {node['id']} ({kind}): {len(values)} widget values {values} for "
                             f"{len(widgets)} widgets {[n for n, _ in widgets]}")
        inputs = {name: value for (name, _), value in zip(widgets, values) if name != CONTROL}
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
