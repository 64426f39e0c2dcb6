"""The "QuantSparse Sampler" node: KSampler plus the QuantSparse attention knobs, reporting the run.

A thin wrapper (research/comfyui.md 5.3): it applies the same patch as "QuantSparse Attention" to a
clone of the model and samples through ComfyUI's own KSampler path, so noise, schedulers, previews and
memory management are exactly the stock ones; what it adds is the run's summary on the node.
"""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io, ui

import nodes as comfy_nodes  # ComfyUI's nodes.py: common_ksampler

from ..quantsparse.sparse.override import format_summary
from .sparse_patch import apply_sparse_patch, check_blocks, config_from_widgets, sparse_inputs


class QuantSparseSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QuantSparseSampler",
            display_name="QuantSparse Sampler",
            category="QuantSparse",
            description="KSampler with QuantSparse sparse attention and the SSAR cache; shows achieved density, "
                        "dense/refresh/sparse steps, cache memory and time per step.",
            inputs=[
                io.Model.Input("model"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("steps", default=30, min=1, max=10000),
                io.Float.Input("cfg", default=6.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
            ] + sparse_inputs(),
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def validate_inputs(cls, block_q, block_k) -> bool | str:
        return check_blocks(block_q, block_k)

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                **knobs) -> io.NodeOutput:
        patched, patch = apply_sparse_patch(model, config_from_widgets(**knobs))
        (latent,) = comfy_nodes.common_ksampler(patched, seed, steps, cfg, sampler_name, scheduler, positive,
                                                negative, latent_image, denoise=denoise)
        text = format_summary(patch.last_summary) if patch.last_summary else "no sampling run happened"
        return io.NodeOutput(latent, ui=ui.PreviewText(text))
