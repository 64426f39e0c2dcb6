"""Builds the example workflows in ComfyUI's UI format (what drag-and-drop and the template browser load) from a
compact description, so that links, slots and widget values stay consistent.

    python workflows/build.py        # rewrites workflows/*.json (thumbnails: workflows/thumbnails.py)

Each node's widgets are given by name -> value, in the order of the node's widgets in the frontend (the schema's
input order; an INT named seed / noise_seed, or any input flagged control_after_generate, is followed by the
"control after generate" widget, written here as ``CONTROL``). The UI format stores only the values
(``widgets_values``); the tests map them back to names through the server's /object_info and through the real
frontend in a browser and compare with the names given here (tests/comfyui/test_comfyui_workflows.py,
tests/comfyui/test_comfyui_browser.py).

ComfyUI lists a custom node's workflows/*.json in its template browser under the file stem, which the frontend
(1.47.10) shows as both the title and the description, and takes the thumbnail from ``<stem>.jpg`` beside it:
so each file is named by its title, and starts with a MarkdownNote (title, what it does, the model files and
their download links). The stock loaders carry ``properties.models`` (name, url, directory), which ComfyUI's
missing-models panel offers to download.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
CONTROL = "control_after_generate"  # the frontend's extra widget after a seed (not sent to the server)

# Download links of the stock HunyuanVideo files, exactly as ComfyUI's own template uses them
# (comfyui_workflow_templates_json: templates/hunyuan_video_text_to_video.json, properties.models of its
# UNETLoader, DualCLIPLoader and VAELoader; a real-ComfyUI test compares them with that file).
STOCK_TEMPLATE = "hunyuan_video_text_to_video.json"
MODEL_LINKS = {
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
}
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

    def models(self) -> list[dict]:
        """``properties.models`` of a loader: the files it names that have a known download link."""
        return [{"name": v, "url": MODEL_LINKS[v][1], "directory": MODEL_LINKS[v][0]}
                for v in self.widgets.values() if isinstance(v, str) and v in MODEL_LINKS]


class Workflow:
    def __init__(self):
        self.nodes: list[Node] = []
        self.links: list[list] = []

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
            if n.models():
                properties["models"] = n.models()
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

def note(w: Workflow, pos, title: str, description: str, files: list[str], make_checkpoint: bool,
         size=(460, 560)) -> Node:
    """A MarkdownNote as ComfyUI's own templates have: title, one line on what the workflow does, the model
    files with their download links and where they go; ``make_checkpoint`` adds how to make the QuantSparse
    checkpoint (there is no download: users convert or calibrate their own)."""
    by_dir: dict[str, list[str]] = {}
    for f in files:
        by_dir.setdefault(MODEL_LINKS[f][0], []).append(f)
    lines = [f"# {title}", "", description, "", "## Model links", ""]
    for directory, names in by_dir.items():
        lines += [f"**{directory}**", ""] + [f"- [{n}]({MODEL_LINKS[n][1]})" for n in names] + [""]
    tree = [(d, names) for d, names in by_dir.items()]
    if make_checkpoint:
        lines += ["**quantsparse** (no download: you make it)", "",
                  f"- {W4A8}: convert the BF16 model ([{BF16}]({MODEL_LINKS[BF16][1]})) with",
                  "", f"  `quantsparse convert {BF16} ComfyUI/models/quantsparse/{W4A8} --bits w4a8`", "",
                  f"  or calibrate one with MSAD in the \"{CALIBRATION}\" template (better quality).", ""]
        tree.append(("quantsparse", [W4A8]))
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


WORKFLOWS = {f"{TEXT_TO_VIDEO}.json": text_to_video,
             f"{DENSE_VS_QUANTSPARSE}.json": dense_vs_quantsparse,
             f"{CALIBRATION}.json": calibration}


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
