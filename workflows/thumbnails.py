"""Makes the template browser's thumbnails (``workflows/<title>.jpg``, beside each workflow) from real
samples of the bundled proxy HunyuanVideo (``models/proxy/``), sampled as ``quantsparse demo`` samples it:
20 Euler steps, shift 7, W4A8 at 15% attention density with SSAR; MSAD calibrated on the proxy's own
dense trajectories (``quantsparse demo``'s defaults: 2 clips, 5 epochs).

    python workflows/thumbnails.py          # with a Python that has this pack and Pillow (e.g. ComfyUI's)

- text to video: three clips, each at three moments (QuantSparse);
- dense vs QuantSparse: two clips, dense BF16 left, QuantSparse right;
- calibrate: three clips, dense | round-to-nearest W4A8 | MSAD W4A8 (both with sparse attention).

The Wan workflows get a title card in the same look instead (the proxy is a HunyuanVideo; no frame on a card
claims to be Wan's output): the model and task, the experts or the sampler with their steps as the workflow
sets them, and a block-sparse attention mask diagram at the workflow's density.

    python workflows/thumbnails.py --cards  # the title cards only (seconds, Pillow only)

A few minutes on a CPU. The images are 384 x 384 JPEGs under ``MAX_BYTES`` (the tests check both).
"""

from __future__ import annotations

import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE = 384
MAX_BYTES = 60_000
STEPS = 20


def _build():
    spec = importlib.util.spec_from_file_location("qs_workflow_build", os.path.join(HERE, "build.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _frames(result) -> "torch.Tensor":
    """``[F, H, W, 3]`` uint8 preview frames of a sampled clip."""
    from comfyui_quantsparse.quantsparse.proxy import data as pdata
    from comfyui_quantsparse.quantsparse.proxy import sample as ps

    return pdata.to_uint8(ps.decode(result.latent))


def _tile(frame, size: int):
    from PIL import Image

    return Image.fromarray(frame.numpy()).resize((size, size), Image.Resampling.BILINEAR)


def _label(img, xy: tuple[int, int], text: str, size: int = 15) -> None:
    """White text on a dark band, top-left at ``xy``."""
    from PIL import ImageDraw, ImageFont

    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=size)
    x0, y0, x1, y1 = draw.textbbox(xy, text, font=font)
    draw.rectangle((x0 - 4, y0 - 3, x1 + 4, y1 + 3), fill=(16, 16, 16))
    draw.text(xy, text, fill=(255, 255, 255), font=font)


def _grid(rows: list[list], columns: list[str] | None, footer: str | None):
    """``rows`` of frames, each tile square, on a ``SIZE`` x ``SIZE`` canvas with 2 px gaps; ``columns``
    names each column (top), ``footer`` goes bottom-left."""
    from PIL import Image

    n_r, n_c = len(rows), len(rows[0])
    gap = 2
    tile = (SIZE - gap * (max(n_r, n_c) - 1)) // max(n_r, n_c)
    img = Image.new("RGB", (SIZE, SIZE), (24, 24, 24))
    ox = (SIZE - n_c * tile - (n_c - 1) * gap) // 2
    oy = (SIZE - n_r * tile - (n_r - 1) * gap) // 2
    for r, row in enumerate(rows):
        for c, frame in enumerate(row):
            img.paste(_tile(frame, tile), (ox + c * (tile + gap), oy + r * (tile + gap)))
    for c, name in enumerate(columns or []):
        _label(img, (ox + c * (tile + gap) + 6, oy + 6), name)
    if footer:
        _label(img, (ox + 6, oy + n_r * tile + (n_r - 1) * gap - 22), footer, size=13)
    return img


def _save(img, path: str) -> int:
    tmp = path + ".tmp"
    for quality in (85, 80, 75, 70, 60):
        img.save(tmp, format="JPEG", quality=quality, optimize=True, progressive=False)
        if os.path.getsize(tmp) < MAX_BYTES:
            break
    size = os.path.getsize(tmp)
    if size >= MAX_BYTES:
        os.remove(tmp)
        raise RuntimeError(f"{path}: {size} bytes even at JPEG quality 60 (limit {MAX_BYTES})")
    os.replace(tmp, path)
    return size


# ------------------------------------------------------------------------------------------------ title cards

PANEL = (40, 42, 48)
LIT = (86, 156, 224)
UNLIT = (56, 58, 66)


def _text(img, xy: tuple[int, int], text: str, size: int, fill=(255, 255, 255), anchor: str = "la") -> None:
    from PIL import ImageDraw, ImageFont

    ImageDraw.Draw(img).text(xy, text, fill=fill, font=ImageFont.load_default(size=size), anchor=anchor)


def _mask_diagram(img, box: tuple[int, int, int, int], density: float, blocks: int = 12) -> None:
    """A block-sparse attention mask (query blocks down, key blocks across): the diagonal and a band every
    ``period`` blocks lit, about ``density`` of the blocks, the rest dark."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    cell = min(x1 - x0, y1 - y0) // blocks
    period = max(2, round(1 / density))
    for i in range(blocks):
        for j in range(blocks):
            lit = (i - j) % period == 0 and abs(i - j) <= period
            x, y = x0 + j * cell, y0 + i * cell
            draw.rectangle((x, y, x + cell - 2, y + cell - 2), fill=LIT if lit else UNLIT)


def title_card(model: str, task: str, stages: list[tuple[str, str]], density: float, footer: str):
    """``SIZE`` x ``SIZE``: panels on the thumbnails' dark ground with 2 px gaps; the title panel (model, task),
    one panel per sampling stage (name, steps, what runs), the mask diagram, and the same footer label."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SIZE, SIZE), (24, 24, 24))
    draw = ImageDraw.Draw(img)
    gap, third = 2, (SIZE - 4) // 3
    draw.rectangle((0, 0, SIZE - 1, third - 1), fill=PANEL)
    _text(img, (16, 18), model, 38)
    _text(img, (16, 66), task, 26, fill=(200, 204, 212))
    _text(img, (SIZE - 14, third - 14), "QuantSparse", 15, fill=(150, 190, 235), anchor="rb")
    y0 = third + gap
    width = (SIZE - gap * (len(stages) - 1)) // len(stages)
    for k, (name, steps) in enumerate(stages):
        x0 = k * (width + gap)
        draw.rectangle((x0, y0, x0 + width - 1, y0 + third - 1), fill=PANEL)
        _text(img, (x0 + 12, y0 + 14), name, 20)
        _text(img, (x0 + 12, y0 + 44), steps, 16, fill=(200, 204, 212))
        _text(img, (x0 + 12, y0 + 70), "W4A8 + sparse attention", 13, fill=(150, 190, 235))
        if k < len(stages) - 1:
            _text(img, (x0 + width - 6, y0 + third // 2), "->", 18, fill=LIT, anchor="rm")
    y0 = 2 * (third + gap)
    draw.rectangle((0, y0, SIZE - 1, SIZE - 1), fill=PANEL)
    side = SIZE - y0 - 24
    _mask_diagram(img, (SIZE - side - 12, y0 + 12, SIZE - 12, y0 + 12 + side), density)
    _text(img, (12, y0 + 14), "block-sparse attention", 15, fill=(200, 204, 212))
    _text(img, (12, y0 + 36), "query x key blocks", 13, fill=(150, 154, 162))
    _text(img, (12, y0 + 56), "+ SSAR residual cache", 13, fill=(150, 154, 162))
    _label(img, (12, SIZE - 24), footer, size=13)
    return img


def title_cards(build) -> dict:
    """The Wan workflows' cards, with the steps and density their builders set."""
    density = build.SPARSE_KNOBS["density"]
    footer = f"QuantSparse W4A8, {density:.0%} attention"
    split, steps = build.WAN22_SPLIT, build.WAN22_STEPS
    experts = [("high noise", f"steps 0-{split} of {steps}"), ("low noise", f"steps {split}-{steps}")]
    return {
        "wan22_text_to_video": title_card("Wan 2.2 A14B", "text to video", experts, density, footer),
        "wan22_image_to_video": title_card("Wan 2.2 A14B", "image to video", experts, density, footer),
        "wan21_text_to_video": title_card("Wan 2.1 1.3B", "text to video",
                                          [("QuantSparse Sampler", f"{build.WAN21_SAMPLING['steps']} steps, "
                                                                   f"CFG {build.WAN21_SAMPLING['cfg']:g}")],
                                          density, footer),
    }


def _write(build, made: dict) -> None:
    for builder_name, img in made.items():
        name = next(n for n, f in build.WORKFLOWS.items() if f.__name__ == builder_name)
        path = os.path.join(HERE, build.thumbnail_name(name))
        print("wrote", path, _save(img, path), "bytes")


def main() -> None:
    build = _build()
    _write(build, title_cards(build))
    if "--cards" in sys.argv[1:]:
        return
    import torch

    from comfyui_quantsparse.quantsparse.proxy import sample as ps
    from comfyui_quantsparse.quantsparse.core.config import QuantSparseConfig
    from comfyui_quantsparse.quantsparse.proxy.eval import find_calibrate
    from comfyui_quantsparse.quantsparse.proxy.train import DEFAULT_PATH, load_proxy

    torch.manual_seed(0)
    dense = load_proxy(str(DEFAULT_PATH))
    sparse = ps.proxy_sparse_config(0.15)
    qcfg = QuantSparseConfig(bits="w4a8")
    calib_name, calibrate = find_calibrate("auto")
    if calib_name == "rtn":
        raise RuntimeError("MSAD calibration is not importable: the thumbnails show MSAD, not round-to-nearest")
    calib = ps.calibration_set(dense, 2, STEPS, stride=max(1, STEPS // 5))
    msad = calibrate(dense, qcfg, calib, ps.CalibrationOptions(sparse=sparse, epochs=5, log=print))
    rtn = ps.rtn_calibrate(dense, qcfg)
    clips = ps.benchmark_clips(6)
    print("sampling", [c.prompt.text for c in clips])

    def sample(model, clip, sparse_cfg):
        return _frames(ps.sample_clip(model, clip, steps=STEPS, sparse=sparse_cfg))

    made = {}
    # text to video: QuantSparse (MSAD W4A8 + sparse attention + SSAR) clips over time.
    t2v = [sample(msad, c, sparse) for c in clips[:3]]
    last = t2v[0].shape[0] - 1
    made["text_to_video"] = _grid([[v[0], v[last // 2], v[last]] for v in t2v], None,
                                  "QuantSparse W4A8, 15% attention")
    # dense vs QuantSparse: side by side, one clip per row.
    pairs = [(sample(dense, c, None), sample(msad, c, sparse)) for c in clips[3:5]]
    made["dense_vs_quantsparse"] = _grid([[d[last // 2], q[last // 2]] for d, q in pairs],
                                         ["dense BF16", "QuantSparse"], None)
    # calibrate: what MSAD buys over round-to-nearest at the same bits and density.
    trip = [(sample(dense, c, None), sample(rtn, c, sparse), sample(msad, c, sparse))
            for c in (clips[0], clips[3], clips[5])]
    made["calibration"] = _grid([[d[last // 2], r[last // 2], m[last // 2]] for d, r, m in trip],
                                ["dense", "RTN", "MSAD"], "W4A8, 15% attention")

    _write(build, made)


if __name__ == "__main__":
    main()
