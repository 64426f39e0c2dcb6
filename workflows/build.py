"""Builds the example workflows in ComfyUI's UI format (what drag-and-drop and the template browser load) from a
compact description, so that links, slots and widget values stay consistent.

    python workflows/build.py        # rewrites workflows/*.json (thumbnails: workflows/thumbnails.py)

Each node's widgets are given by name -> value, in the order of the node's widgets in the frontend (the schema's
input order; an INT named seed / noise_seed, or any input flagged control_after_generate, is followed by the
"control after generate" widget, written here as ``CONTROL``; a media file COMBO such as LoadImage's image is
followed by the frontend's upload button, saved as "image"). The UI format stores only the values
(``widgets_values``); the tests map them back to names through the server's /object_info and through the real
frontend in a browser and compare with the names given here (tests/comfyui/test_comfyui_workflows.py,
tests/comfyui/test_comfyui_browser.py).

ComfyUI lists a custom node's workflows/*.json in its template browser under the file stem, which the frontend
(1.47.10) shows as both the title and the description, and takes the thumbnail from ``<stem>.jpg`` beside it:
so each file is named by its title, and starts with a MarkdownNote (title, what it does, the model files and
their download links). The stock loaders carry ``properties.models`` (name, url, directory), copied from the
ComfyUI template each workflow follows (``TEMPLATE_OF``), which ComfyUI's missing-models panel offers to download.

The workflows: HunyuanVideo text to video, dense vs QuantSparse, calibration; Wan 2.2 A14B text and image to
video (two experts, each a QuantSparse checkpoint under its own QuantSparse Attention node, two KSamplerAdvanced
as ComfyUI's template splits the steps, the 4-step LoRA option in the note); Wan 2.1 1.3B text to video (the
QuantSparse Sampler). The sparse knobs everywhere are SparseConfig's defaults (``SPARSE_KNOBS``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
CONTROL = "control_after_generate"  # the frontend's extra widget after a seed (not sent to the server)

# Download links, exactly as ComfyUI's own templates give them (comfyui_workflow_templates_json: the
# ``properties.models`` of each template's loaders, subgraphs included): per template, because the same file
# can carry another URL in another template (wan_2.1_vae.safetensors is under Wan_2.1_ComfyUI_repackaged with
# ``?download=true`` in the Wan 2.1 one, under Wan_2.2_ComfyUI_Repackaged in the Wan 2.2 ones). A workflow's
# stock loaders carry the entries of its own template; a real-ComfyUI test compares them with the template
# this ComfyUI serves.
STOCK_TEMPLATE = "hunyuan_video_text_to_video.json"  # HunyuanVideo: UNETLoader, DualCLIPLoader, VAELoader
WAN22_T2V_TEMPLATE = "video_wan2_2_14B_t2v.json"  # Wan 2.2 A14B T2V: two experts, two 4-step LoRAs
WAN22_I2V_TEMPLATE = "video_wan2_2_14B_i2v.json"  # Wan 2.2 A14B I2V
WAN21_T2V_TEMPLATE = "text_to_video_wan.json"  # Wan 2.1 T2V 1.3B
_HF_WAN21 = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/"
_HF_WAN22 = "https://huggingface.co/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/"
UMT5 = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
WAN_VAE = "wan_2.1_vae.safetensors"
WAN22_LINKS = {
    UMT5: ("text_encoders", _HF_WAN21 + f"text_encoders/{UMT5}"),
    WAN_VAE: ("vae", _HF_WAN22 + f"vae/{WAN_VAE}"),
}
TEMPLATE_LINKS: dict[str, dict[str, tuple[str, str]]] = {
    STOCK_TEMPLATE: {
        "hunyuan_video_t2v_720p_bf16.safetensors": (
            "diffusion_models", "https://huggingface.co/Comfy-Org/HunyuanVideo_repackaged/resolve/main/split_files/"
                                "diffusion_models/hunyuan_video_t2v_720p_bf16.safetensors?download=true"),
        "clip_l.safetensors": (
            "text_encoders", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors"
                             "?download=true"),
        "llava_llama3_fp8_scaled.safetensors": (
            "text_encoders", "https://huggingface.co/Comfy-Org/HunyuanVideo_repackaged/resolve/main/split_files/"
                             "text_encoders/llava_llama3_fp8_scaled.safetensors?download=true"),
        "hunyuan_video_vae_bf16.safetensors": (
            "vae", "https://huggingface.co/Comfy-Org/HunyuanVideo_repackaged/resolve/main/split_files/vae/"
                   "hunyuan_video_vae_bf16.safetensors?download=true"),
    },
    WAN22_T2V_TEMPLATE: {
        **WAN22_LINKS,
        "wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors": (
            "loras", _HF_WAN22 + "loras/wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors"),
        "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors": (
            "loras", _HF_WAN22 + "loras/wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors"),
    },
    WAN22_I2V_TEMPLATE: {
        **WAN22_LINKS,
        "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors": (
            "loras", _HF_WAN22 + "loras/wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors"),
        "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors": (
            "loras", _HF_WAN22 + "loras/wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors"),
    },
    WAN21_T2V_TEMPLATE: {
        UMT5: ("text_encoders", _HF_WAN21 + f"text_encoders/{UMT5}?download=true"),
        WAN_VAE: ("vae", _HF_WAN21 + f"vae/{WAN_VAE}?download=true"),
        "wan2.1_t2v_1.3B_fp16.safetensors": (
            "diffusion_models", _HF_WAN21 + "diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors?download=true"),
    },
}
# The Wan 2.2 templates load the experts as fp8_scaled files; the notes send users to the FP16 experts instead
# (`quantsparse convert` reads fp8_scaled too, but 4-bit from an 8-bit model adds the two errors), which are in
# the same folder of the same Comfy-Org repository.
# The I2V links are the ones docs.comfy.org's Wan 2.2 tutorial gives (Comfy-Org/docs,
# tutorials/video/wan/wan2_2.mdx, "Manually Download Models"); the T2V files sit beside them under the same
# naming (wan2.2_{t2v,i2v}_{high,low}_noise_14B_{fp8_scaled,fp16}).
SOURCE_LINKS: dict[str, tuple[str, str]] = {
    f"wan2.2_{task}_{noise}_noise_14B_fp16.safetensors": (
        "diffusion_models", _HF_WAN22 + f"diffusion_models/wan2.2_{task}_{noise}_noise_14B_fp16.safetensors")
    for task in ("t2v", "i2v") for noise in ("high", "low")
}
MODEL_LINKS = TEMPLATE_LINKS[STOCK_TEMPLATE]  # HunyuanVideo's
BF16 = "hunyuan_video_t2v_720p_bf16.safetensors"
W4A8 = "hunyuan_video_t2v_720p_w4a8.safetensors"
CLIP_L, LLAVA, VAE = "clip_l.safetensors", "llava_llama3_fp8_scaled.safetensors", "hunyuan_video_vae_bf16.safetensors"
PROMPT = "a red fox running through fresh snow, golden hour, cinematic"

# Titles (the file stems): the template card cuts its bold title after about 25 characters and shows the
# description (the same text) in full on two lines below, so each starts with what tells it apart.
TEXT_TO_VIDEO = "Text to video with QuantSparse HunyuanVideo"
DENSE_VS_QUANTSPARSE = "Dense vs QuantSparse HunyuanVideo side by side"
CALIBRATION = "Calibrate a QuantSparse HunyuanVideo checkpoint"


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    widgets: dict[str, object]  # widget name -> value, in the frontend's widget order
    inputs: list[tuple[str, str]]
    outputs: list[tuple[str, str]]
    title: str | None = None
    size: tuple[int, int] = (320, 120)
    links_in: dict[str, int] = field(default_factory=dict)
    links_out: dict[int, list[int]] = field(default_factory=dict)

    def models(self, links: dict[str, tuple[str, str]]) -> list[dict]:
        """``properties.models`` of a stock loader: the files it names that have a download link in ``links``."""
        if self.type not in STOCK_LOADERS:
            return []
        return [{"name": v, "url": links[v][1], "directory": links[v][0]}
                for v in self.widgets.values() if isinstance(v, str) and v in links]


STOCK_LOADERS = ("UNETLoader", "CLIPLoader", "DualCLIPLoader", "VAELoader")


class Workflow:
    def __init__(self, template: str = STOCK_TEMPLATE):
        self.nodes: list[Node] = []
        self.links: list[list] = []
        self.template = template  # the ComfyUI template whose download links the stock loaders carry
        self.model_links = TEMPLATE_LINKS[template]

    def node(self, type_, pos, widgets: dict | None = None, inputs=(), outputs=(), title=None, size=(320, 120)) -> Node:
        n = Node(len(self.nodes) + 1, type_, pos, dict(widgets or {}), list(inputs), list(outputs), title, size)
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
            properties = {} if n.type in NOTES else {"Node name for S&R": n.type}
            if n.models(self.model_links):
                properties["models"] = n.models(self.model_links)
            d = {
                "id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size), "flags": {}, "order": order,
                "mode": 0,
                "inputs": [{"name": name, "type": kind, "link": n.links_in.get(name)} for name, kind in n.inputs],
                "outputs": [{"name": name, "type": kind, "slot_index": i, "links": n.links_out.get(i)}
                            for i, (name, kind) in enumerate(n.outputs)],
                "properties": properties,
                "widgets_values": list(n.widgets.values()),
            }
            if n.title:
                d["title"] = n.title
            nodes.append(d)
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


NOTES = ("MarkdownNote", "Note")  # frontend-only nodes; their one widget is "text"


# ------------------------------------------------------------------------------------------------ the note

def note(w: Workflow, pos, title: str, description: str, files: list[str], make_checkpoint: bool = False,
         size=(460, 560), checkpoints: list[tuple[str, str]] | None = None, calibrate: bool = True,
         sections: list[str] = ()) -> Node:
    """A MarkdownNote as ComfyUI's own templates have: title, one line on what the workflow does, the model
    files with their download links (from the workflow's template, else ``SOURCE_LINKS``) and where they go.

    ``checkpoints`` lists the QuantSparse checkpoints the workflow loads as (checkpoint, full-precision source):
    there is no download, so the note says how to convert each (``make_checkpoint``: HunyuanVideo's one), and,
    with ``calibrate``, that the Calibrate template makes a better one. ``sections`` (markdown) go after the
    links, before the storage tree."""
    links = {**SOURCE_LINKS, **w.model_links}
    if make_checkpoint:
        checkpoints = [(W4A8, BF16)]
    checkpoints = checkpoints or []
    by_dir: dict[str, list[str]] = {}
    for f in files:
        by_dir.setdefault(links[f][0], []).append(f)
    lines = [f"# {title}", "", description, "", "## Model links", ""]
    for directory, names in by_dir.items():
        lines += [f"**{directory}**", ""] + [f"- [{n}]({links[n][1]})" for n in names] + [""]
    tree = [(d, names) for d, names in by_dir.items()]
    if checkpoints:
        lines += [f"**quantsparse** (no download: you make {'it' if len(checkpoints) == 1 else 'them'})", ""]
        for ckpt, source in checkpoints:
            precision = "FP16" if "fp16" in source else "BF16"
            lines += [f"- {ckpt}: convert the {precision} model ([{source}]({links[source][1]})) with",
                      "", f"  `quantsparse convert {source} ComfyUI/models/quantsparse/{ckpt} --bits w4a8`", ""]
            if calibrate:
                lines += [f"  or calibrate one with MSAD in the \"{CALIBRATION}\" template (better quality).", ""]
        tree.append(("quantsparse", [c for c, _ in checkpoints]))
    for section in sections:
        lines += section.strip("\n").splitlines() + [""]
    lines += ["Model storage location", "", "```", "ComfyUI/", "└── models/"]
    for i, (directory, names) in enumerate(tree):
        last_dir = i == len(tree) - 1
        lines.append(f"    {'└' if last_dir else '├'}── {directory}/")
        for j, n in enumerate(names):
            lines.append(f"    {' ' if last_dir else '│'}   {'└' if j == len(names) - 1 else '├'}── {n}")
    lines += ["```"]
    return w.node("MarkdownNote", pos, {"text": "\n".join(lines)}, title=title, size=size)


# ------------------------------------------------------------------------------------------------ the graphs

# The QuantSparse Sampler's knobs in the workflow: SparseConfig's defaults (15% density, a tenth of the steps
# dense, SSAR first order refreshed every 5 steps, rank 16 for when order 2 is chosen; 128 x 128 token blocks,
# advanced), in the node's widget order.
SPARSE_KNOBS = {"density": 0.15, "mask_mode": "svg", "dense_warmup": 0.1, "refresh_interval": 5, "rank": 16,
                "ssar_order": 1, "block_q": 128, "block_k": 128}
# The same seed, steps, cfg, sampler and schedule for the stock KSampler and the QuantSparse Sampler.
SAMPLING = {"seed": 42, CONTROL: "fixed", "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "denoise": 1.0}
SAMPLER_PORTS = [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                 ("latent_image", "LATENT")]
TILED_DECODE = {"tile_size": 256, "overlap": 64, "temporal_size": 64, "temporal_overlap": 8}


def text_encoders(w: Workflow, pos) -> Node:
    return w.node("DualCLIPLoader", pos, {"clip_name1": CLIP_L, "clip_name2": LLAVA, "type": "hunyuan_video",
                                          "device": "default"}, outputs=[("CLIP", "CLIP")], size=(320, 130))


def vae_loader(w: Workflow, pos) -> Node:
    return w.node("VAELoader", pos, {"vae_name": VAE}, outputs=[("VAE", "VAE")], size=(320, 60))


def bf16_loader(w: Workflow, pos) -> Node:
    return w.node("UNETLoader", pos, {"unet_name": BF16, "weight_dtype": "default"}, outputs=[("MODEL", "MODEL")],
                  title="Load Diffusion Model (BF16)", size=(320, 85))


def sample_to_video(w: Workflow, model: Node, clip: Node, vae: Node, *, y: int, x: int, prefix: str) -> None:
    """The shared tail: prompt -> FluxGuidance (positive) and its zeroed copy (negative), shift 7, the
    QuantSparse Sampler at 848x480x73 and 20 steps, tiled VAE decode, video saved under ``prefix``.
    ``model`` / ``clip`` / ``vae`` are the nodes whose output 0 feeds it; ``x``, ``y`` place the column."""
    text = w.node("CLIPTextEncode", (x, y + 180), {"text": PROMPT}, inputs=[("clip", "CLIP")],
                  outputs=[("CONDITIONING", "CONDITIONING")], size=(320, 150))
    guidance = w.node("FluxGuidance", (x + 360, y + 180), {"guidance": 6.0},
                      inputs=[("conditioning", "CONDITIONING")], outputs=[("CONDITIONING", "CONDITIONING")],
                      size=(320, 60))
    negative = w.node("ConditioningZeroOut", (x + 360, y + 300), inputs=[("conditioning", "CONDITIONING")],
                      outputs=[("CONDITIONING", "CONDITIONING")], size=(320, 30))
    shift = w.node("ModelSamplingSD3", (x, y), {"shift": 7.0}, inputs=[("model", "MODEL")],
                   outputs=[("MODEL", "MODEL")], size=(320, 60))
    latent = w.node("EmptyHunyuanLatentVideo", (x + 360, y + 400),
                    {"width": 848, "height": 480, "length": 73, "batch_size": 1}, outputs=[("LATENT", "LATENT")],
                    size=(320, 130))
    sample = w.node("QuantSparseSampler", (x + 720, y), {**SAMPLING, **SPARSE_KNOBS}, inputs=SAMPLER_PORTS,
                    outputs=[("LATENT", "LATENT")], title="QuantSparse Sampler", size=(320, 420))
    decode = w.node("VAEDecodeTiled", (x + 1080, y), dict(TILED_DECODE), inputs=[("samples", "LATENT"), ("vae", "VAE")],
                    outputs=[("IMAGE", "IMAGE")], size=(320, 80))
    video = w.node("CreateVideo", (x + 1440, y), {"fps": 24.0, "bit_depth": 8}, inputs=[("images", "IMAGE")],
                   outputs=[("VIDEO", "VIDEO")], size=(320, 85))
    save = w.node("SaveVideo", (x + 1800, y), {"filename_prefix": prefix, "format": "auto", "codec": "auto"},
                  inputs=[("video", "VIDEO")], size=(320, 110))
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


def text_to_video(ckpt: str = W4A8) -> Workflow:
    """A QuantSparse checkpoint sampled by the QuantSparse Sampler (848x480, 73 frames, 20 steps).

    HunyuanVideo T2V is guidance-distilled: the guidance goes in through FluxGuidance and cfg is 1.0, so
    ComfyUI runs no uncond pass; the zeroed negative only fills the sampler's KSampler-style input.
    """
    w = Workflow()
    model = w.node("QuantSparseLoader", (0, 0), {"ckpt_name": ckpt}, outputs=[("MODEL", "MODEL")],
                   title="Load QuantSparse Model", size=(320, 60))
    clip = text_encoders(w, (0, 180))
    vae = vae_loader(w, (0, 380))
    sample_to_video(w, model, clip, vae, y=0, x=360, prefix="video/QuantSparse")
    note(w, (-500, 0), TEXT_TO_VIDEO,
         "Samples a QuantSparse HunyuanVideo checkpoint (W4A8 weights, 15% block-sparse attention with SSAR) "
         "at 848x480, 73 frames, 20 steps, and saves the video.",
         [CLIP_L, LLAVA, VAE], make_checkpoint=True)
    return w


def dense_vs_quantsparse(unet: str = BF16, ckpt: str = W4A8) -> Workflow:
    """The BF16 model (stock KSampler) and its QuantSparse checkpoint (QuantSparse Sampler) from the same
    seed, prompt and latent, decoded and stitched side by side (dense left) into one video.

    Runs on the proxy too: the proxy file as the UNET, its converted checkpoint as ``ckpt`` (the
    real-ComfyUI test substitutes them and the text encoder, as for the text-to-video workflow).
    """
    w = Workflow()
    dense = bf16_loader(w, (0, 0))
    quant = w.node("QuantSparseLoader", (0, 160), {"ckpt_name": ckpt}, outputs=[("MODEL", "MODEL")],
                   title="Load QuantSparse Model", size=(320, 60))
    dense.widgets["unet_name"] = unet
    clip = text_encoders(w, (0, 320))
    vae = vae_loader(w, (0, 520))
    text = w.node("CLIPTextEncode", (360, 320), {"text": PROMPT}, inputs=[("clip", "CLIP")],
                  outputs=[("CONDITIONING", "CONDITIONING")], size=(320, 150))
    guidance = w.node("FluxGuidance", (720, 320), {"guidance": 6.0}, inputs=[("conditioning", "CONDITIONING")],
                      outputs=[("CONDITIONING", "CONDITIONING")], size=(320, 60))
    negative = w.node("ConditioningZeroOut", (720, 440), inputs=[("conditioning", "CONDITIONING")],
                      outputs=[("CONDITIONING", "CONDITIONING")], size=(320, 30))
    shift_d = w.node("ModelSamplingSD3", (360, 0), {"shift": 7.0}, inputs=[("model", "MODEL")],
                     outputs=[("MODEL", "MODEL")], size=(320, 60))
    shift_q = w.node("ModelSamplingSD3", (360, 160), {"shift": 7.0}, inputs=[("model", "MODEL")],
                     outputs=[("MODEL", "MODEL")], size=(320, 60))
    latent = w.node("EmptyHunyuanLatentVideo", (720, 560), {"width": 848, "height": 480, "length": 73, "batch_size": 1},
                    outputs=[("LATENT", "LATENT")], size=(320, 130))
    sample_d = w.node("KSampler", (1080, 0), dict(SAMPLING), inputs=SAMPLER_PORTS, outputs=[("LATENT", "LATENT")],
                      title="Dense BF16", size=(320, 262))
    sample_q = w.node("QuantSparseSampler", (1080, 340), {**SAMPLING, **SPARSE_KNOBS}, inputs=SAMPLER_PORTS,
                      outputs=[("LATENT", "LATENT")], title="QuantSparse", size=(320, 420))
    decode_d = w.node("VAEDecodeTiled", (1440, 0), dict(TILED_DECODE), inputs=[("samples", "LATENT"), ("vae", "VAE")],
                      outputs=[("IMAGE", "IMAGE")], size=(320, 80))
    decode_q = w.node("VAEDecodeTiled", (1440, 340), dict(TILED_DECODE),
                      inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")], size=(320, 80))
    stitch = w.node("ImageStitch", (1800, 0), {"direction": "right", "match_image_size": True, "spacing_width": 8,
                                               "spacing_color": "white"},
                    inputs=[("image1", "IMAGE"), ("image2", "IMAGE")], outputs=[("IMAGE", "IMAGE")],
                    title="Dense | QuantSparse", size=(320, 150))
    video = w.node("CreateVideo", (2160, 0), {"fps": 24.0, "bit_depth": 8}, inputs=[("images", "IMAGE")],
                   outputs=[("VIDEO", "VIDEO")], size=(320, 85))
    save = w.node("SaveVideo", (2520, 0), {"filename_prefix": "video/dense_vs_QuantSparse", "format": "auto",
                                           "codec": "auto"}, inputs=[("video", "VIDEO")], size=(320, 110))
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
    note(w, (-500, 0), DENSE_VS_QUANTSPARSE,
         "Samples the BF16 model and its QuantSparse checkpoint from the same seed and prompt, and saves both "
         "side by side in one video (dense left).",
         [BF16, CLIP_L, LLAVA, VAE], make_checkpoint=True, size=(460, 640))
    return w


CALIBRATION_PROMPTS = "\n".join([
    PROMPT,
    "a busy city street at night in the rain, neon reflections, people with umbrellas",
    "waves crashing on black volcanic rocks, slow motion, overcast sky",
    "a chef chopping vegetables in a bright kitchen, close-up of the hands",
    "a hot air balloon drifting over green hills at sunrise, aerial shot",
])


def calibration(unet: str = BF16) -> Workflow:
    """The BF16 model calibrated with MSAD over a prompt list (848x480x33, 20 samples, 15 epochs, W4A8 at 15%
    density) into models/quantsparse/, then the calibrated MODEL sampled once by the QuantSparse Sampler."""
    w = Workflow()
    model = bf16_loader(w, (0, 0))
    model.widgets["unet_name"] = unet
    clip = text_encoders(w, (0, 180))
    vae = vae_loader(w, (0, 380))
    calib = w.node("QuantSparseCalibrate", (360, 0), {
        "prompts": CALIBRATION_PROMPTS, "width": 848, "height": 480, "frames": 33, "samples": 20, "steps": 20,
        "bits": "w4a8", "density": 0.15, "epochs": 15,
        # "fixed": a re-queued calibration keeps its seed, so it resumes instead of starting over
        "seed": 0, CONTROL: "fixed",
        "file_name": "hunyuan_video_msad_w4a8", "overwrite": False,
        # advanced: the capture's guidance; lambda -1 = normalised to the output loss; sparse calibration off
        # (the sampler's SSAR restores dense attention); no restart (a changed setting stops with a message)
        "guidance": 6.0, "lambda_global": -1.0, "lambda_local": -1.0, "sparse_calibration": False, "restart": False,
    }, inputs=[("model", "MODEL"), ("clip", "CLIP")], outputs=[("MODEL", "MODEL")], title="QuantSparse Calibrate",
        size=(320, 560))
    w.link(model, 0, calib, "model")
    w.link(clip, 0, calib, "clip")
    sample_to_video(w, calib, clip, vae, y=240, x=720, prefix="video/QuantSparse_calibrated")
    note(w, (-500, 0), CALIBRATION,
         "Calibrates the BF16 model with MSAD over your prompts into models/quantsparse/NAME.safetensors "
         "(W4A8, 15% attention), then samples a video with it. Queue it again after a stop to resume.",
         [BF16, CLIP_L, LLAVA, VAE], make_checkpoint=False)
    return w


# ------------------------------------------------------------------------------------------------ Wan

WAN22_T2V = "Wan 2.2 A14B text to video with QuantSparse"
WAN22_I2V = "Wan 2.2 A14B image to video with QuantSparse"
WAN21_T2V = "Wan 2.1 1.3B text to video with QuantSparse"
# Wan's standard negative prompt, as ComfyUI's Wan templates carry it.
WAN_NEGATIVE = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
                "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
                "三条腿，背景人很多，倒着走")
WAN_I2V_PROMPT = "the fox turns its head toward the camera as snow falls, slow camera push-in, cinematic"
# The A14B templates' split without their 4-step LoRA: 20 steps, the high-noise expert for steps 0-10 and the
# low-noise one from 10 to the end, CFG 3.5, euler / simple, shift 5, 640x640, 81 frames at 16 fps.
WAN22_STEPS, WAN22_SPLIT, WAN22_CFG, WAN22_SHIFT = 20, 10, 3.5, 5.0
WAN22_SIZE = {"width": 640, "height": 640, "length": 81, "batch_size": 1}
# With the lightx2v LoRAs the templates switch to 4 steps, split at 2, CFG 1, LoRA strength 1.0.
LORA_STEPS, LORA_SPLIT, LORA_CFG, LORA_STRENGTH = 4, 2, 1.0, 1.0
LORAS = {  # (high-noise LoRA, low-noise LoRA) of each A14B template
    WAN22_T2V_TEMPLATE: ("wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors",
                         "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors"),
    WAN22_I2V_TEMPLATE: ("wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors",
                         "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors"),
}
BYPASS_LORA_NODE = "LoraLoaderBypassModelOnly"  # ComfyUI's "Load LoRA (Bypass, Model Only) (for debugging)"
BYPASS_LORA_TITLE = "Load LoRA (Bypass, Model Only) (for debugging)"
# The QuantSparse checkpoint of each expert and the FP16 file it is converted from.
WAN22_CHECKPOINTS = {task: [(f"wan2.2_{task}_{noise}_noise_14B_w4a8.safetensors",
                             f"wan2.2_{task}_{noise}_noise_14B_fp16.safetensors") for noise in ("high", "low")]
                     for task in ("t2v", "i2v")}
WAN21_CHECKPOINT = ("wan2.1_t2v_1.3B_w4a8.safetensors", "wan2.1_t2v_1.3B_fp16.safetensors")
# Every QuantSparse checkpoint the workflows load -> the full-precision file `quantsparse convert` makes it from.
CHECKPOINTS = {W4A8: BF16, WAN21_CHECKPOINT[0]: WAN21_CHECKPOINT[1],
               **{c: src for pair in WAN22_CHECKPOINTS.values() for c, src in pair}}


def wan_text(w: Workflow, clip: Node, x: int, y: int, prompt: str) -> tuple[Node, Node]:
    """umT5 prompt and Wan's negative prompt (CLIPTextEncode each), as the Wan templates have them."""
    pos = w.node("CLIPTextEncode", (x, y), {"text": prompt}, inputs=[("clip", "CLIP")],
                 outputs=[("CONDITIONING", "CONDITIONING")], title="CLIP Text Encode (Positive Prompt)",
                 size=(400, 150))
    neg = w.node("CLIPTextEncode", (x, y + 200), {"text": WAN_NEGATIVE}, inputs=[("clip", "CLIP")],
                 outputs=[("CONDITIONING", "CONDITIONING")], title="CLIP Text Encode (Negative Prompt)",
                 size=(400, 150))
    w.link(clip, 0, pos, "clip")
    w.link(clip, 0, neg, "clip")
    return pos, neg


def wan_loaders(w: Workflow, y: int) -> tuple[Node, Node]:
    clip = w.node("CLIPLoader", (0, y), {"clip_name": UMT5, "type": "wan", "device": "default"},
                  outputs=[("CLIP", "CLIP")], size=(320, 110))
    vae = w.node("VAELoader", (0, y + 180), {"vae_name": WAN_VAE}, outputs=[("VAE", "VAE")], size=(320, 60))
    return clip, vae


def video_tail(w: Workflow, samples: Node, vae: Node, x: int, prefix: str) -> None:
    """VAE decode -> 16 fps video, as the Wan templates save it."""
    decode = w.node("VAEDecode", (x, 0), inputs=[("samples", "LATENT"), ("vae", "VAE")],
                    outputs=[("IMAGE", "IMAGE")], size=(220, 50))
    video = w.node("CreateVideo", (x + 260, 0), {"fps": 16.0, "bit_depth": 8}, inputs=[("images", "IMAGE")],
                   outputs=[("VIDEO", "VIDEO")], size=(320, 85))
    save = w.node("SaveVideo", (x + 620, 0), {"filename_prefix": prefix, "format": "auto", "codec": "auto"},
                  inputs=[("video", "VIDEO")], size=(320, 110))
    w.link(samples, 0, decode, "samples")
    w.link(vae, 0, decode, "vae")
    w.link(decode, 0, video, "images")
    w.link(video, 0, save, "video")


def two_experts(w: Workflow, checkpoints: list[tuple[str, str]]) -> tuple[Node, Node]:
    """Load QuantSparse Model -> QuantSparse Attention -> shift 5, once per expert; (high, low) model nodes."""
    out = []
    for row, ((ckpt, _), noise) in enumerate(zip(checkpoints, ("high", "low"))):
        y = row * 420
        load = w.node("QuantSparseLoader", (0, y), {"ckpt_name": ckpt}, outputs=[("MODEL", "MODEL")],
                      title=f"Load QuantSparse Model ({noise} noise)", size=(360, 60))
        attn = w.node("QuantSparseAttention", (400, y), dict(SPARSE_KNOBS), inputs=[("model", "MODEL")],
                      outputs=[("MODEL", "MODEL")], title=f"QuantSparse Attention ({noise} noise)", size=(320, 300))
        shift = w.node("ModelSamplingSD3", (760, y), {"shift": WAN22_SHIFT}, inputs=[("model", "MODEL")],
                       outputs=[("MODEL", "MODEL")], size=(320, 60))
        w.link(load, 0, attn, "model")
        w.link(attn, 0, shift, "model")
        out.append(shift)
    return out[0], out[1]


def split_samplers(w: Workflow, high: Node, low: Node, positive: tuple[Node, int], negative: tuple[Node, int],
                   latent: tuple[Node, int]) -> Node:
    """The templates' two KSamplerAdvanced: high noise adds the noise and samples steps 0 to the split, returning
    the leftover noise; low noise samples from the split to the end. Returns the low-noise sampler."""
    common = {"steps": WAN22_STEPS, "cfg": WAN22_CFG, "sampler_name": "euler", "scheduler": "simple"}
    ports = [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
             ("latent_image", "LATENT")]
    first = w.node("KSamplerAdvanced", (1120, 0), {
        "add_noise": "enable", "noise_seed": SAMPLING["seed"], CONTROL: "fixed", **common,
        "start_at_step": 0, "end_at_step": WAN22_SPLIT, "return_with_leftover_noise": "enable"},
        inputs=ports, outputs=[("LATENT", "LATENT")], title=f"High noise: steps 0-{WAN22_SPLIT}", size=(320, 334))
    second = w.node("KSamplerAdvanced", (1480, 0), {
        "add_noise": "disable", "noise_seed": 0, CONTROL: "fixed", **common,
        "start_at_step": WAN22_SPLIT, "end_at_step": 10000, "return_with_leftover_noise": "disable"},
        inputs=ports, outputs=[("LATENT", "LATENT")], title=f"Low noise: steps {WAN22_SPLIT}-end", size=(320, 334))
    for sampler, model in ((first, high), (second, low)):
        w.link(model, 0, sampler, "model")
        w.link(positive[0], positive[1], sampler, "positive")
        w.link(negative[0], negative[1], sampler, "negative")
    w.link(latent[0], latent[1], first, "latent_image")
    w.link(first, 0, second, "latent_image")
    return second


def _link(w: Workflow, name: str) -> str:
    return f"[{name}]({w.model_links[name][1]})"


def wan22_sections(w: Workflow) -> list[str]:
    """What the A14B notes add: the two runs' sparse attention, and the 4-step LoRA with a QuantSparse model."""
    high_lora, low_lora = LORAS[w.template]
    warm = int(SPARSE_KNOBS["dense_warmup"] * WAN22_SPLIT + 0.5)
    fp8 = " and ".join(f"{c.replace('_w4a8', '_fp8_scaled')}" for c, _ in WAN22_CHECKPOINTS[
        "t2v" if w.template == WAN22_T2V_TEMPLATE else "i2v"])
    fp8_note = f"""
Have ComfyUI's template's {fp8} already? `quantsparse convert` reads them too (dequantized first); the FP16 \
files avoid quantizing an already 8-bit model.
"""
    sparse = f"""
## QuantSparse Attention on two experts

Each expert is a QuantSparse W4A8 checkpoint patched by its own QuantSparse Attention node (SparseConfig's defaults: \
{SPARSE_KNOBS['density']:.0%} density, {SPARSE_KNOBS['mask_mode']} masks, dense warm-up \
{SPARSE_KNOBS['dense_warmup']} of the steps, SSAR first order refreshed every {SPARSE_KNOBS['refresh_interval']} \
steps). Each KSamplerAdvanced is its own \
sampling run with its own SSAR cache. The high-noise run starts from noise: its warm-up ({warm} of its \
{WAN22_SPLIT} steps) is also its first refresh. The low-noise run starts mid-schedule: no warm-up, a refresh \
(dense attention that fills its cache) first. Self-attention runs sparse; cross-attention to the text stays \
dense, and the run report in ComfyUI's console ("QuantSparse attention run") counts those calls under \
"cross-attention". At CFG {WAN22_CFG} the cond and uncond halves keep their own SSAR residuals. MSAD calibration \
(the Calibrate node) is HunyuanVideo's only for now: these checkpoints are round-to-nearest conversions.
"""
    lora = f"""
## 4-step LoRA (lightx2v), optional

ComfyUI's template can run 4 steps with the lightx2v distill LoRAs, into ComfyUI/models/loras/:

- {_link(w, high_lora)} on the high-noise expert
- {_link(w, low_lora)} on the low-noise expert

On a QuantSparse model a LoRA works only through ComfyUI's bypass LoRA node today (the stock LoRA loaders \
refuse quantized layers): add **{BYPASS_LORA_TITLE}** ({BYPASS_LORA_NODE}) between each Load QuantSparse Model \
and its QuantSparse Attention, strength_model {LORA_STRENGTH}. Then set both KSamplerAdvanced to steps \
{LORA_STEPS} and cfg {LORA_CFG}, the high-noise end_at_step to {LORA_SPLIT} and the low-noise start_at_step to \
{LORA_SPLIT}, as the template's 4-step switch does.

At {LORA_STEPS} steps a dense warm-up step is a quarter of the run. Keep dense_warmup at \
{SPARSE_KNOBS['dense_warmup']}: it rounds to no warm-up of an expert's {LORA_SPLIT} steps, so each expert's first \
step is a refresh and its second sparse (cfg 1: no uncond pass).
"""
    return [fp8_note, sparse, lora]


def wan22_text_to_video() -> Workflow:
    """Wan 2.2 T2V A14B as ComfyUI's template samples it (without its LoRA switch), each expert a QuantSparse
    checkpoint under its own QuantSparse Attention node."""
    w = Workflow(WAN22_T2V_TEMPLATE)
    checkpoints = WAN22_CHECKPOINTS["t2v"]
    high, low = two_experts(w, checkpoints)
    clip, vae = wan_loaders(w, 860)
    pos, neg = wan_text(w, clip, 400, 860, PROMPT)
    latent = w.node("EmptyHunyuanLatentVideo", (840, 860), dict(WAN22_SIZE), outputs=[("LATENT", "LATENT")],
                    size=(320, 130))
    last = split_samplers(w, high, low, (pos, 0), (neg, 0), (latent, 0))
    video_tail(w, last, vae, 1840, "video/QuantSparse_wan2.2_t2v")
    note(w, (-560, 0), WAN22_T2V,
         f"Samples Wan 2.2 T2V A14B as ComfyUI's template does ({WAN22_STEPS} steps: the high-noise expert for "
         f"0-{WAN22_SPLIT}, the low-noise one for the rest, CFG {WAN22_CFG}, 640x640, 81 frames), each expert a "
         f"QuantSparse W4A8 checkpoint with {SPARSE_KNOBS['density']:.0%} block-sparse self-attention and SSAR.",
         [UMT5, WAN_VAE], checkpoints=checkpoints, calibrate=False, sections=wan22_sections(w), size=(520, 980))
    return w


def wan22_image_to_video() -> Workflow:
    """Wan 2.2 I2V A14B: the same two experts and split, the start image through WanImageToVideo."""
    w = Workflow(WAN22_I2V_TEMPLATE)
    checkpoints = WAN22_CHECKPOINTS["i2v"]
    high, low = two_experts(w, checkpoints)
    clip, vae = wan_loaders(w, 860)
    pos, neg = wan_text(w, clip, 400, 860, WAN_I2V_PROMPT)
    # "upload": the frontend's upload button, saved as "image" (as ComfyUI's own templates store LoadImage)
    image = w.node("LoadImage", (0, 1160), {"image": "example.png", "upload": "image"},
                   outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")], title="Load Image (start frame)", size=(320, 320))
    i2v = w.node("WanImageToVideo", (840, 860), dict(WAN22_SIZE),
                 inputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("vae", "VAE"),
                         ("start_image", "IMAGE")],
                 outputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")],
                 size=(320, 210))
    w.link(pos, 0, i2v, "positive")
    w.link(neg, 0, i2v, "negative")
    w.link(vae, 0, i2v, "vae")
    w.link(image, 0, i2v, "start_image")
    last = split_samplers(w, high, low, (i2v, 0), (i2v, 1), (i2v, 2))
    video_tail(w, last, vae, 1840, "video/QuantSparse_wan2.2_i2v")
    note(w, (-560, 0), WAN22_I2V,
         f"Animates a start image with Wan 2.2 I2V A14B as ComfyUI's template does ({WAN22_STEPS} steps split at "
         f"{WAN22_SPLIT} between the high- and low-noise experts, CFG {WAN22_CFG}, 640x640, 81 frames), each expert "
         f"a QuantSparse W4A8 checkpoint with {SPARSE_KNOBS['density']:.0%} block-sparse self-attention and SSAR. "
         "Load your start frame in Load Image.",
         [UMT5, WAN_VAE], checkpoints=checkpoints, calibrate=False, sections=wan22_sections(w), size=(520, 980))
    return w


WAN21_SAMPLING = {"seed": SAMPLING["seed"], CONTROL: "fixed", "steps": 30, "cfg": 6.0, "sampler_name": "uni_pc",
                  "scheduler": "simple", "denoise": 1.0}  # ComfyUI's Wan 2.1 template's KSampler


def wan21_text_to_video() -> Workflow:
    """Wan 2.1 T2V 1.3B at ComfyUI's template settings (832x480x33, 30 uni_pc steps, CFG 6, shift 8), sampled by
    the QuantSparse Sampler, which shows the run's report on the node."""
    w = Workflow(WAN21_T2V_TEMPLATE)
    ckpt, source = WAN21_CHECKPOINT
    model = w.node("QuantSparseLoader", (0, 0), {"ckpt_name": ckpt}, outputs=[("MODEL", "MODEL")],
                   title="Load QuantSparse Model", size=(360, 60))
    shift = w.node("ModelSamplingSD3", (400, 0), {"shift": 8.0}, inputs=[("model", "MODEL")],
                   outputs=[("MODEL", "MODEL")], size=(320, 60))
    clip, vae = wan_loaders(w, 200)
    pos, neg = wan_text(w, clip, 400, 200, PROMPT)
    latent = w.node("EmptyHunyuanLatentVideo", (840, 200), {"width": 832, "height": 480, "length": 33,
                                                            "batch_size": 1},
                    outputs=[("LATENT", "LATENT")], size=(320, 130))
    sample = w.node("QuantSparseSampler", (1200, 0), {**WAN21_SAMPLING, **SPARSE_KNOBS}, inputs=SAMPLER_PORTS,
                    outputs=[("LATENT", "LATENT")], title="QuantSparse Sampler", size=(320, 420))
    w.link(model, 0, shift, "model")
    w.link(shift, 0, sample, "model")
    w.link(pos, 0, sample, "positive")
    w.link(neg, 0, sample, "negative")
    w.link(latent, 0, sample, "latent_image")
    video_tail(w, sample, vae, 1560, "video/QuantSparse_wan2.1_t2v")
    steps = WAN21_SAMPLING["steps"]
    warm = int(SPARSE_KNOBS["dense_warmup"] * steps + 0.5)
    report = f"""
## QuantSparse Sampler

KSampler plus SparseConfig's defaults ({SPARSE_KNOBS['density']:.0%} density, {SPARSE_KNOBS['mask_mode']} masks, \
dense warm-up {SPARSE_KNOBS['dense_warmup']} of the steps, SSAR first order refreshed every \
{SPARSE_KNOBS['refresh_interval']} steps): at {steps} steps {warm - 1} dense steps, then a refresh every \
{SPARSE_KNOBS['refresh_interval']}. Its report on the node counts every attention call: self-attention sparse \
(or dense / refresh), cross-attention to the text dense, under "cross-attention". At CFG \
{WAN21_SAMPLING['cfg']:g} the cond and uncond halves keep their own SSAR residuals. MSAD calibration (the \
Calibrate node) is HunyuanVideo's only for now: this checkpoint is a round-to-nearest conversion.
"""
    note(w, (-560, 0), WAN21_T2V,
         f"Samples a QuantSparse Wan 2.1 T2V 1.3B checkpoint (W4A8, {SPARSE_KNOBS['density']:.0%} block-sparse "
         f"self-attention with SSAR) at ComfyUI's template settings: 832x480, 33 frames, {steps} steps uni_pc, CFG "
         f"{WAN21_SAMPLING['cfg']:g}, shift 8.",
         [UMT5, WAN_VAE], checkpoints=[WAN21_CHECKPOINT], calibrate=False, sections=[report], size=(520, 760))
    return w


WORKFLOWS = {f"{TEXT_TO_VIDEO}.json": text_to_video,
             f"{DENSE_VS_QUANTSPARSE}.json": dense_vs_quantsparse,
             f"{CALIBRATION}.json": calibration,
             f"{WAN22_T2V}.json": wan22_text_to_video,
             f"{WAN22_I2V}.json": wan22_image_to_video,
             f"{WAN21_T2V}.json": wan21_text_to_video}
# Each workflow -> the ComfyUI template its stock loaders' download links are copied from.
TEMPLATE_OF = {name: make().template for name, make in WORKFLOWS.items()}


def thumbnail_name(name: str) -> str:
    """The template browser's thumbnail of workflow ``name``: ``<stem>.jpg`` beside it."""
    return os.path.splitext(name)[0] + ".jpg"


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
