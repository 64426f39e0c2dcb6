"""``python -m quantsparse ...`` in the pack's folder (e.g. ``ComfyUI/custom_nodes/ComfyUI-QuantSparse``),
with ComfyUI's Python: the command line without installing anything.

Run that way, ``quantsparse/`` is a top-level package whose relative imports cannot reach ``kernels/``
beside it, so the pack's folder is first loaded as the package ``comfyui_quantsparse`` from its own
location (no ``sys.path`` edit, and never another installed copy). Installed with pip, the same
module runs as ``python -m comfyui_quantsparse.quantsparse`` (or the ``quantsparse`` command).
"""

import sys

if __package__ == "quantsparse":
    import importlib.util
    import os

    ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("comfyui_quantsparse", os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_quantsparse"] = pack
    spec.loader.exec_module(pack)
    from comfyui_quantsparse.quantsparse.cli import main
else:
    from .cli import main

sys.exit(main())
