"""QuantSparse node pack for ComfyUI.

ComfyUI imports this folder as a module and calls ``comfy_entrypoint``; the node
modules are imported only then, so that the command line and the tests can use
``quantsparse`` and ``kernels`` without ComfyUI installed.
"""


async def comfy_entrypoint():
    from .nodes import QuantSparseExtension

    return QuantSparseExtension()
