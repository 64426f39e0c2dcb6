"""The "Load QuantSparse Model" node."""

from __future__ import annotations

import os

from comfy_api.latest import io, ui

from ..quantsparse.calib.provenance import summary_lines
from ..quantsparse.checkpoint.format import validate_checkpoint
from ..quantsparse.models import registry
from .folders import checkpoint_path, list_checkpoints
from .model import load_quantsparse_model


def supported_models() -> str:
    """The families a checkpoint can hold, as the registry names them ("HunyuanVideo T2V or Wan 2.1 / 2.2")."""
    titles = [a.title for a in registry.adapters()]
    return titles[0] if len(titles) == 1 else ", ".join(titles[:-1]) + " or " + titles[-1]


class QuantSparseLoader(io.ComfyNode):
    """Lists models/quantsparse/*.safetensors; returns a MODEL for the stock samplers."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        families = supported_models()
        return io.Schema(
            node_id="QuantSparseLoader",
            display_name="Load QuantSparse Model",
            category="QuantSparse",
            description=f"Loads a QuantSparse checkpoint (a quantized {families} diffusion model) from "
                        "models/quantsparse/; the text under the node names the model the file holds (its 'base:' "
                        "line, e.g. Wan 2.2 TI2V 5B). The MODEL works with the stock samplers; its quantized Linears run "
                        "QuantSparse kernels.",
            inputs=[
                io.Combo.Input("ckpt_name", options=list_checkpoints(),
                               tooltip="A .safetensors file in models/quantsparse/ written by QuantSparse "
                                       "(the 'quantsparse convert' command or the Calibrate node)."),
            ],
            outputs=[io.Model.Output(tooltip=f"The checkpoint's model ({families}) as ComfyUI builds it, with "
                                             "QuantSparse-quantized Linears.")],
        )

    @classmethod
    def validate_inputs(cls, ckpt_name: str) -> bool | str:
        # Checked when the prompt is queued: a wrong or damaged file is a node error with the message, not a
        # failure mid-run (the header alone: milliseconds).
        try:
            validate_checkpoint(checkpoint_path(ckpt_name))
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, ckpt_name: str) -> str:
        # ComfyUI reuses a node's output while its inputs are unchanged; a checkpoint rewritten under
        # the same name (re-calibrated, re-converted) must be loaded again.
        try:
            path = checkpoint_path(ckpt_name)
            st = os.stat(path)
        except (OSError, ValueError):
            return ckpt_name
        return f"{ckpt_name}:{st.st_size}:{st.st_mtime_ns}"

    @classmethod
    def execute(cls, ckpt_name: str) -> io.NodeOutput:
        path = checkpoint_path(ckpt_name)
        model, summary = load_quantsparse_model(path)
        # What the model is (its family's adapter names the variant, e.g. "Wan 2.2 I2V A14B expert"), its
        # settings and provenance.
        provenance = summary_lines(summary.info)
        return io.NodeOutput(model, ui=ui.PreviewText("\n".join([summary.text(), *provenance])))
