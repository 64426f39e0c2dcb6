"""Builds the example workflows in ComfyUI's UI format (what drag-and-drop and the template
browser load) from a compact description, so that links and slots stay consistent.

    python workflows/build.py        # rewrites workflows/*.json
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    widgets: list
    inputs: list[tuple[str, str]]
    outputs: list[tuple[str, str]]
    title: str | None = None
    links_in: dict[str, int] = field(default_factory=dict)
    links_out: dict[int, list[int]] = field(default_factory=dict)


class Workflow:
    def __init__(self):
        self.nodes: list[Node] = []
        self.links: list[list] = []

    def node(self, type_, pos, widgets=(), inputs=(), outputs=(), title=None) -> Node:
        n = Node(len(self.nodes) + 1, type_, pos, list(widgets), list(inputs), list(outputs), title)
        self.nodes.append(n)
        return n

    def link(self, src: Node, slot: int, dst: Node, input_name: str) -> None:
        link_id = len(self.links) + 1
        kind = src.outputs[slot][1]
        dst_slot = [name for name, _ in dst.inputs].index(input_name)
        if dst.inputs[dst_slot][1] != kind:
            raise ValueError(f"{src.type}[{slot}] gives {kind}, {dst.type}.{input_name} takes {dst.inputs[dst_slot][1]}")
        self.links.append([link_id, src.id, slot, dst.id, dst_slot, kind])
        dst.links_in[input_name] = link_id
        src.links_out.setdefault(slot, []).append(link_id)

    def to_json(self) -> dict:
        nodes = []
        for order, n in enumerate(self.nodes):
            d = {
                "id": n.id, "type": n.type, "pos": list(n.pos), "size": [320, 120], "flags": {}, "order": order,
                "mode": 0,
                "inputs": [{"name": name, "type": kind, "link": n.links_in.get(name)} for name, kind in n.inputs],
                "outputs": [{"name": name, "type": kind, "slot_index": i, "links": n.links_out.get(i)}
                            for i, (name, kind) in enumerate(n.outputs)],
                "properties": {"Node name for S&R": n.type},
                "widgets_values": n.widgets,
            }
            if n.title:
                d["title"] = n.title
            nodes.append(d)
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


# The QuantSparse Sampler's knobs in the workflow: SparseConfig's defaults (15% density, a tenth of the steps
# dense, SSAR first order refreshed every 5 steps, rank 16 for when order 2 is chosen),
# in the node's widget order.
SPARSE_KNOBS = [0.15, "svg", 0.1, 5, 16, 1, 128, 128]


def sample_to_video(w: Workflow, model: int, clip: int, vae: int, *, y: int, x: int, prefix: str) -> None:
    """The shared tail: prompt -> FluxGuidance (positive) and its zeroed copy (negative), shift 7, the
    QuantSparse Sampler at 848x480x73 and 20 steps, tiled VAE decode, video saved under ``prefix``.
    ``model`` / ``clip`` / ``vae`` are the nodes whose output 0 feeds it; ``x``, ``y`` place the column."""
    text = w.node("CLIPTextEncode", (x, y + 180), ["a red fox running through fresh snow, golden hour, cinematic"],
                  inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")])
    guidance = w.node("FluxGuidance", (x + 360, y + 180), [6.0], inputs=[("conditioning", "CONDITIONING")],
                      outputs=[("CONDITIONING", "CONDITIONING")])
    negative = w.node("ConditioningZeroOut", (x + 360, y + 300), inputs=[("conditioning", "CONDITIONING")],
                      outputs=[("CONDITIONING", "CONDITIONING")])
    shift = w.node("ModelSamplingSD3", (x, 0), [7.0], inputs=[("model", "MODEL")], outputs=[("MODEL", "MODEL")])
    latent = w.node("EmptyHunyuanLatentVideo", (x + 360, y + 420), [848, 480, 73, 1], outputs=[("LATENT", "LATENT")])
    # seed (+ its control_after_generate widget), steps, cfg, sampler_name, scheduler, denoise, then the knobs
    sample = w.node("QuantSparseSampler", (x + 720, 0), [42, "fixed", 20, 1.0, "euler", "simple", 1.0] + SPARSE_KNOBS,
                    inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                            ("latent_image", "LATENT")],
                    outputs=[("LATENT", "LATENT")], title="QuantSparse Sampler")
    decode = w.node("VAEDecodeTiled", (x + 1080, 0), [256, 64, 64, 8], inputs=[("samples", "LATENT"), ("vae", "VAE")],
                    outputs=[("IMAGE", "IMAGE")])
    video = w.node("CreateVideo", (x + 1440, 0), [24.0, 8], inputs=[("images", "IMAGE")], outputs=[("VIDEO", "VIDEO")])
    save = w.node("SaveVideo", (x + 1800, 0), [prefix, "auto", "auto"], inputs=[("video", "VIDEO")])
    w.link(model, 0, shift, "model")
    w.link(clip, 0, text, "clip")
    w.link(text, 0, guidance, "conditioning")
    w.link(text, 0, negative, "conditioning")
    w.link(shift, 0, sample, "model")
    w.link(guidance, 0, sample, "positive")
    w.link(negative, 0, sample, "negative")
    w.link(latent, 0, sample, "latent_image")
    w.link(sample, 0, decode, "samples")
    w.link(vae, 0, decode, "vae")
    w.link(decode, 0, video, "images")
    w.link(video, 0, save, "video")


def text_to_video(ckpt: str = "hunyuan_video_t2v_720p_w4a8.safetensors") -> Workflow:
    """A QuantSparse checkpoint sampled by the QuantSparse Sampler (848x480, 73 frames, 20 steps).

    HunyuanVideo T2V is guidance-distilled: the guidance goes in through FluxGuidance and cfg is 1.0, so
    ComfyUI runs no uncond pass; the zeroed negative only fills the sampler's KSampler-style input.
    """
    w = Workflow()
    model = w.node("QuantSparseLoader", (0, 0), [ckpt], outputs=[("MODEL", "MODEL")], title="Load QuantSparse Model")
    clip = w.node("DualCLIPLoader", (0, 180), ["clip_l.safetensors", "llava_llama3_fp8_scaled.safetensors",
                                                "hunyuan_video", "default"], outputs=[("CLIP", "CLIP")])
    vae = w.node("VAELoader", (0, 380), ["hunyuan_video_vae_bf16.safetensors"], outputs=[("VAE", "VAE")])
    sample_to_video(w, model, clip, vae, y=0, x=360, prefix="video/QuantSparse")
    return w


def dense_vs_quantsparse(unet: str = "hunyuan_video_t2v_720p_bf16.safetensors",
                         ckpt: str = "hunyuan_video_t2v_720p_w4a8.safetensors") -> Workflow:
    """The BF16 model (stock KSampler) and its QuantSparse checkpoint (QuantSparse Sampler) from the same
    seed, prompt and latent, decoded and stitched side by side (dense left) into one video.

    Runs on the proxy too: the proxy file as the UNET, its converted checkpoint as ``ckpt`` (the
    real-ComfyUI test substitutes them and the text encoder, as for the text-to-video workflow).
    """
    w = Workflow()
    dense = w.node("UNETLoader", (0, 0), [unet, "default"], outputs=[("MODEL", "MODEL")],
                   title="Load Diffusion Model (BF16)")
    quant = w.node("QuantSparseLoader", (0, 160), [ckpt], outputs=[("MODEL", "MODEL")], title="Load QuantSparse Model")
    clip = w.node("DualCLIPLoader", (0, 320), ["clip_l.safetensors", "llava_llama3_fp8_scaled.safetensors",
                                               "hunyuan_video", "default"], outputs=[("CLIP", "CLIP")])
    vae = w.node("VAELoader", (0, 520), ["hunyuan_video_vae_bf16.safetensors"], outputs=[("VAE", "VAE")])
    text = w.node("CLIPTextEncode", (360, 320), ["a red fox running through fresh snow, golden hour, cinematic"],
                  inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")])
    guidance = w.node("FluxGuidance", (720, 320), [6.0], inputs=[("conditioning", "CONDITIONING")],
                      outputs=[("CONDITIONING", "CONDITIONING")])
    negative = w.node("ConditioningZeroOut", (720, 440), inputs=[("conditioning", "CONDITIONING")],
                      outputs=[("CONDITIONING", "CONDITIONING")])
    shift_d = w.node("ModelSamplingSD3", (360, 0), [7.0], inputs=[("model", "MODEL")], outputs=[("MODEL", "MODEL")])
    shift_q = w.node("ModelSamplingSD3", (360, 160), [7.0], inputs=[("model", "MODEL")], outputs=[("MODEL", "MODEL")])
    latent = w.node("EmptyHunyuanLatentVideo", (720, 560), [848, 480, 73, 1], outputs=[("LATENT", "LATENT")])
    common = [42, "fixed", 20, 1.0, "euler", "simple", 1.0]  # same seed, steps, cfg, sampler, schedule
    ports = [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")]
    sample_d = w.node("KSampler", (1080, 0), list(common), inputs=ports, outputs=[("LATENT", "LATENT")],
                      title="Dense BF16")
    sample_q = w.node("QuantSparseSampler", (1080, 300), list(common) + SPARSE_KNOBS, inputs=ports,
                      outputs=[("LATENT", "LATENT")], title="QuantSparse")
    decode_d = w.node("VAEDecodeTiled", (1440, 0), [256, 64, 64, 8], inputs=[("samples", "LATENT"), ("vae", "VAE")],
                      outputs=[("IMAGE", "IMAGE")])
    decode_q = w.node("VAEDecodeTiled", (1440, 300), [256, 64, 64, 8], inputs=[("samples", "LATENT"), ("vae", "VAE")],
                      outputs=[("IMAGE", "IMAGE")])
    stitch = w.node("ImageStitch", (1800, 0), ["right", True, 8, "white"],
                    inputs=[("image1", "IMAGE"), ("image2", "IMAGE")], outputs=[("IMAGE", "IMAGE")],
                    title="Dense | QuantSparse")
    video = w.node("CreateVideo", (2160, 0), [24.0, 8], inputs=[("images", "IMAGE")], outputs=[("VIDEO", "VIDEO")])
    save = w.node("SaveVideo", (2520, 0), ["video/dense_vs_QuantSparse", "auto", "auto"], inputs=[("video", "VIDEO")])
    w.link(dense, 0, shift_d, "model")
    w.link(quant, 0, shift_q, "model")
    w.link(clip, 0, text, "clip")
    w.link(text, 0, guidance, "conditioning")
    w.link(text, 0, negative, "conditioning")
    for shift, sampler, decode in ((shift_d, sample_d, decode_d), (shift_q, sample_q, decode_q)):
        w.link(shift, 0, sampler, "model")
        w.link(guidance, 0, sampler, "positive")
        w.link(negative, 0, sampler, "negative")
        w.link(latent, 0, sampler, "latent_image")
        w.link(sampler, 0, decode, "samples")
        w.link(vae, 0, decode, "vae")
    w.link(decode_d, 0, stitch, "image1")
    w.link(decode_q, 0, stitch, "image2")
    w.link(stitch, 0, video, "images")
    w.link(video, 0, save, "video")
    return w


def calibration(unet: str = "hunyuan_video_t2v_720p_bf16.safetensors") -> Workflow:
    """The BF16 model calibrated with MSAD over a prompt list (848x480x33, 20 samples, 15 epochs, W4A8 at 15%
    density) into models/quantsparse/, then the calibrated MODEL sampled once by the QuantSparse Sampler."""
    w = Workflow()
    model = w.node("UNETLoader", (0, 0), [unet, "default"], outputs=[("MODEL", "MODEL")],
                   title="Load Diffusion Model (BF16)")
    clip = w.node("DualCLIPLoader", (0, 180), ["clip_l.safetensors", "llava_llama3_fp8_scaled.safetensors",
                                                "hunyuan_video", "default"], outputs=[("CLIP", "CLIP")])
    vae = w.node("VAELoader", (0, 380), ["hunyuan_video_vae_bf16.safetensors"], outputs=[("VAE", "VAE")])
    prompts = "\n".join([
        "a red fox running through fresh snow, golden hour, cinematic",
        "a busy city street at night in the rain, neon reflections, people with umbrellas",
        "waves crashing on black volcanic rocks, slow motion, overcast sky",
        "a chef chopping vegetables in a bright kitchen, close-up of the hands",
        "a hot air balloon drifting over green hills at sunrise, aerial shot",
    ])
    # prompts, width, height, frames, samples, steps, bits, density, epochs, seed, file_name, overwrite,
    # then the advanced guidance, lambda_global, lambda_local (-1 = normalised to the output loss),
    # sparse_calibration (off: the sampler's SSAR restores dense attention)
    calib = w.node("QuantSparseCalibrate", (360, 0),
                   [prompts, 848, 480, 33, 20, 20, "w4a8", 0.15, 15, 0, "hunyuan_video_msad_w4a8", False,
                    6.0, -1.0, -1.0, False],
                   inputs=[("model", "MODEL"), ("clip", "CLIP")], outputs=[("MODEL", "MODEL")],
                   title="QuantSparse Calibrate")
    w.link(model, 0, calib, "model")
    w.link(clip, 0, calib, "clip")
    sample_to_video(w, calib, clip, vae, y=240, x=720, prefix="video/QuantSparse_calibrated")
    return w


WORKFLOWS = {"quantsparse_text_to_video.json": text_to_video,
             "quantsparse_dense_vs_quantsparse.json": dense_vs_quantsparse,
             "quantsparse_calibrate.json": calibration}


def render(name: str) -> str:
    return json.dumps(WORKFLOWS[name]().to_json(), indent=1) + "\n"


def main() -> None:
    for name in WORKFLOWS:
        path = os.path.join(HERE, name)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(render(name))
        os.replace(tmp, path)
        print("wrote", path)


if __name__ == "__main__":
    main()
