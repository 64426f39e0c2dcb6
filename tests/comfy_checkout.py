"""ComfyUI's own torch model of a family, imported from the checkout ``COMFYUI_DIR`` names, for the tests that
compare ours with it (skipped, with the reason, without a checkout)."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

import pytest


@contextlib.contextmanager
def comfy_model_modules(family: str, class_name: str):
    """``{"model", "ops", "detection", "supported"}``: ``comfy.ldm.<family>.model.<class_name>`` and the ComfyUI
    modules that build and detect it, with the checkout on ``sys.path`` only while the context is open."""
    root = os.environ.get("COMFYUI_DIR")
    if not root:
        pytest.skip(f"COMFYUI_DIR is not set: point it at a ComfyUI checkout to compare with ComfyUI's {class_name}")
    if not os.path.isfile(os.path.join(root, "comfy", "ldm", family, "model.py")):
        pytest.fail(f"COMFYUI_DIR={root} has no comfy/ldm/{family}/model.py; is it a ComfyUI checkout?")
    # ComfyUI is not a package: its checkout goes on sys.path for the calling module's tests only.
    sys.path.insert(0, root)
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # must precede comfy.model_management on a CPU-only torch
        import comfy.model_detection
        import comfy.model_management  # noqa: F401
        import comfy.ops
        import comfy.supported_models

        model = getattr(importlib.import_module(f"comfy.ldm.{family}.model"), class_name)
        yield {"model": model, "ops": comfy.ops, "detection": comfy.model_detection,
               "supported": comfy.supported_models}
    finally:
        sys.path.remove(root)
