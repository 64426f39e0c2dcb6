"""Makes the template browser's thumbnails (``workflows/<title>.jpg``, beside each workflow) from real
samples of the bundled proxy HunyuanVideo (``models/proxy/``), sampled as ``quantsparse demo`` samples it:
20 Euler steps, shift 7, W4A8 at 15% attention density with SSAR; MSAD calibrated on the proxy's own
dense trajectories (``quantsparse demo``'s defaults: 2 clips, 5 epochs).

    python workflows/thumbnails.py          # with a Python that has this pack and Pillow (e.g. ComfyUI's)

- text to video: three clips, each at three moments (QuantSparse);
- dense vs QuantSparse: two clips, dense BF16 left, QuantSparse right;
- calibrate: three clips, dense | round-to-nearest W4A8 | MSAD W4A8 (both with sparse attention).

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


def main() -> None:
    import torch

    from comfyui_quantsparse.quantsparse.proxy import sample as ps
    from comfyui_quantsparse.quantsparse.core.config import QuantSparseConfig
    from comfyui_quantsparse.quantsparse.proxy.eval import find_calibrate
    from comfyui_quantsparse.quantsparse.proxy.train import DEFAULT_PATH, load_proxy

    torch.manual_seed(0)
    build = _build()
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

    for builder_name, img in made.items():
        name = next(n for n, f in build.WORKFLOWS.items() if f.__name__ == builder_name)
        path = os.path.join(HERE, build.thumbnail_name(name))
        print("wrote", path, _save(img, path), "bytes")


if __name__ == "__main__":
    main()
