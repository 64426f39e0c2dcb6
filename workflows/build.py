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


def text_to_video(ckpt: str = "hunyuan_video_t2v_720p_w4a8.safetensors") -> Workflow:
    """A QuantSparse checkpoint sampled by ComfyUI's stock HunyuanVideo nodes (848x480, 73 frames)."""
    w = Workflow()
    model = w.node("QuantSparseLoader", (0, 0), [ckpt], outputs=[("MODEL", "MODEL")], title="Load QuantSparse Model")
    clip = w.node("DualCLIPLoader", (0, 180), ["clip_l.safetensors", "llava_llama3_fp8_scaled.safetensors",
                                                "hunyuan_video", "default"], outputs=[("CLIP", "CLIP")])
    vae = w.node("VAELoader", (0, 380), ["hunyuan_video_vae_bf16.safetensors"], outputs=[("VAE", "VAE")])
    text = w.node("CLIPTextEncode", (360, 180), ["a red fox running through fresh snow, golden hour, cinematic"],
                  inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")])
    guidance = w.node("FluxGuidance", (720, 180), [6.0], inputs=[("conditioning", "CONDITIONING")],
                      outputs=[("CONDITIONING", "CONDITIONING")])
    shift = w.node("ModelSamplingSD3", (360, 0), [7.0], inputs=[("model", "MODEL")], outputs=[("MODEL", "MODEL")])
    guider = w.node("BasicGuider", (1080, 0), inputs=[("model", "MODEL"), ("conditioning", "CONDITIONING")],
                    outputs=[("GUIDER", "GUIDER")])
    noise = w.node("RandomNoise", (1080, 160), [42, "fixed"], outputs=[("NOISE", "NOISE")])
    sampler = w.node("KSamplerSelect", (1080, 300), ["euler"], outputs=[("SAMPLER", "SAMPLER")])
    sigmas = w.node("BasicScheduler", (1080, 420), ["simple", 20, 1.0], inputs=[("model", "MODEL")],
                    outputs=[("SIGMAS", "SIGMAS")])
    latent = w.node("EmptyHunyuanLatentVideo", (720, 420), [848, 480, 73, 1], outputs=[("LATENT", "LATENT")])
    sample = w.node("SamplerCustomAdvanced", (1440, 0),
                    inputs=[("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"),
                            ("latent_image", "LATENT")],
                    outputs=[("output", "LATENT"), ("denoised_output", "LATENT")])
    decode = w.node("VAEDecodeTiled", (1800, 0), [256, 64, 64, 8], inputs=[("samples", "LATENT"), ("vae", "VAE")],
                    outputs=[("IMAGE", "IMAGE")])
    video = w.node("CreateVideo", (2160, 0), [24.0, 8], inputs=[("images", "IMAGE")], outputs=[("VIDEO", "VIDEO")])
    save = w.node("SaveVideo", (2520, 0), ["video/QuantSparse", "auto", "auto"], inputs=[("video", "VIDEO")])
    w.link(model, 0, shift, "model")
    w.link(clip, 0, text, "clip")
    w.link(text, 0, guidance, "conditioning")
    w.link(shift, 0, guider, "model")
    w.link(guidance, 0, guider, "conditioning")
    w.link(shift, 0, sigmas, "model")
    w.link(noise, 0, sample, "noise")
    w.link(guider, 0, sample, "guider")
    w.link(sampler, 0, sample, "sampler")
    w.link(sigmas, 0, sample, "sigmas")
    w.link(latent, 0, sample, "latent_image")
    w.link(sample, 0, decode, "samples")
    w.link(vae, 0, decode, "vae")
    w.link(decode, 0, video, "images")
    w.link(video, 0, save, "video")
    return w


WORKFLOWS = {"quantsparse_text_to_video.json": text_to_video}


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
