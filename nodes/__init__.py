"""ComfyUI glue: the only package that imports comfy.*.

Imported by the root ``comfy_entrypoint`` once ComfyUI is up, never by the command line or
the CPU tests, so those run without ComfyUI installed.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .calibrate import QuantSparseCalibrate
from .folders import register_folder
from .loader import QuantSparseLoader
from .sampler import QuantSparseSampler
from .sparse_patch import QuantSparseAttention

register_folder()


class QuantSparseExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [QuantSparseCalibrate, QuantSparseLoader, QuantSparseAttention, QuantSparseSampler]
