"""The demo's pictures without running the demo: the bitmap font, the labelled preview frames, the
hand-written APNG (decoded back here) and the SVG plot's layout (every label inside the canvas)."""

from __future__ import annotations

import math
import re
import struct
import xml.etree.ElementTree as ET
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from comfyui_quantsparse.quantsparse import demo_preview as dp
from comfyui_quantsparse.quantsparse.proxy import data as pdata
from comfyui_quantsparse.quantsparse.proxy import sample as ps

# ---------------------------------------------------------------------------------------------- font

ONE = ["..#..",
       ".##..",
       "..#..",
       "..#..",
       "..#..",
       "..#..",
       ".###.",
       "....."]


def test_a_glyph_renders_its_pixels_and_scales_by_whole_pixels():
    m = dp.text_mask("1")
    assert m.tolist() == [[c == "#" for c in row] for row in ONE]
    m3 = dp.text_mask("1", 3)
    assert torch.equal(m3, m.repeat_interleave(3, 0).repeat_interleave(3, 1))
    two = dp.text_mask("11", 2)
    assert two.shape == (16, dp.text_width("11", 2)) == (16, 22)  # 5 + gap + 5 columns, 2x
    assert not two[:, 10:12].any()  # the gap between glyphs
    assert dp.text_mask("g")[7].any() and not dp.text_mask("a")[7].any()  # the descender row
    assert torch.equal(dp.text_mask("\u00e9"), dp.text_mask("?"))


def test_drawn_text_stays_in_its_box_and_clips_at_the_edge():
    img = torch.full((2, 30, 130, 3), 236, dtype=torch.uint8)
    dp.draw_text(img, 5, 7, "PSNR 31.2", 2, (24, 24, 24))
    ink = (img[..., 0] == 24)
    assert torch.equal(ink[0], ink[1])  # every frame
    ys, xs = torch.nonzero(ink[0], as_tuple=True)
    assert int(ink[0].sum()) == int(dp.text_mask("PSNR 31.2", 2).sum())
    assert ys.min() >= 7 and ys.max() < 7 + 16 and xs.min() >= 5 and xs.max() < 5 + dp.text_width("PSNR 31.2", 2)
    assert set(img.unique().tolist()) == {24, 236}
    dp.draw_text(img, 120, 25, "clipped", 2)  # runs off right and bottom: drawn in part, no error
    dp.draw_text(img, -500, 0, "gone", 2)


def test_wrap_fits_every_line():
    lines = dp.wrap("a yellow square rotating anticlockwise (seed 6)", 200, 2)
    assert len(lines) > 1 and all(dp.text_width(ln, 2) <= 200 for ln in lines)
    assert " ".join(lines) == "a yellow square rotating anticlockwise (seed 6)"
    assert all(dp.text_width(ln, 2) <= 40 for ln in dp.wrap("QuantSparse", 40, 2))  # a long word is cut


# ---------------------------------------------------------------------------------------------- preview

def _results(size, frames=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = (frames - 1) // 4 + 1
    a = torch.randn(16, t, size, size, generator=g)
    return ps.SampleResult(a, 0.0), ps.SampleResult(a + 0.3 * torch.randn(a.shape, generator=g), 0.0)


def _labels(n):
    quality = SimpleNamespace(psnr_per_clip=[31.25] * n, ssim_per_clip=[0.9876] * n)
    return dp.preview_labels(ps.benchmark_clips(n), quality, "w4a8", 0.15)


def test_preview_frame_at_the_demo_size_has_its_bands_and_the_2x_clip():
    ref, test = _results(16, frames=17)  # the demo's latent: 17 frames of 128 x 128 pixels
    columns, rows = _labels(1)
    assert columns == ("dense BF16", "QuantSparse W4A8 15%", "|difference| x4")
    assert rows[0][0] == "clip 0: PSNR 31.25 dB  SSIM 0.9876 vs dense"
    f = dp.preview_frames([ref], [test], columns, rows)
    # header 24 (one line), clip band 44 (two lines), the clip 2x, footer 24; 3 columns + 2 separators, 2x
    assert f.shape == (17, 24 + 44 + 256 + 24, 2 * (3 * 128 + 4), 3) and f.dtype == torch.uint8
    dense = pdata.to_uint8(ps.decode(ref.latent)).repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert torch.equal(f[:, 68:68 + 256, :256], dense)
    header = f[:, :24]
    assert torch.equal(header, header[:1].expand_as(header))  # the same on every frame
    colours = {tuple(c) for c in header[0].reshape(-1, 3).tolist()}
    assert colours == {dp.BAND, dp.INK}  # dark text on a light band, nothing else
    ink = (header[0] == torch.tensor(dp.INK, dtype=torch.uint8)).all(-1)
    for i in range(3):  # each title sits over its own column
        lo, hi = i * 260, i * 260 + 256
        assert ink[:, lo:hi].any()
        if i < 2:
            assert not ink[:, hi:hi + 4].any()
    assert not torch.equal(f[0, -24:], f[1, -24:])  # the footer counts frames


def test_preview_wraps_labels_on_narrow_clips():
    ref, test = _results(4)  # 32-pixel clips: titles wrap, the frame grows taller, not wider
    f = dp.preview_frames([ref, ref], [test, test], *_labels(2))
    assert f.shape[0] == 5 and f.shape[2] == 2 * (3 * 32 + 4)
    dense = pdata.to_uint8(ps.decode(ref.latent)).repeat_interleave(2, 1).repeat_interleave(2, 2)
    tops = [y for y in range(f.shape[1] - 64) if torch.equal(f[:, y:y + 64, :64], dense)]
    assert len(tops) == 2 and tops[0] > 24  # both clips found, under a header of several lines


# ---------------------------------------------------------------------------------------------- APNG

def _chunks(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, out = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        out.append((kind, body))
        pos += 12 + n
    assert pos == len(data)
    return out


def test_apng_decodes_to_its_frames():
    frames = np.random.default_rng(0).integers(0, 256, (4, 9, 7, 3), dtype=np.uint8)
    chunks = _chunks(dp.apng(frames, delay_ms=120))
    kinds = [k for k, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
    assert struct.unpack(">IIBBBBB", chunks[0][1]) == (7, 9, 8, 2, 0, 0, 0)
    actl = dict(chunks)[b"acTL"]
    assert struct.unpack(">II", actl) == (4, 0)  # 4 frames, loop forever
    fctl = [b for k, b in chunks if k == b"fcTL"]
    assert len(fctl) == 4 and all(struct.unpack(">IIIIIHHBB", b)[5:7] == (120, 1000) for b in fctl)
    seqs, images = [], []
    for k, b in chunks:
        if k == b"fcTL":
            seqs.append(struct.unpack(">I", b[:4])[0])
        elif k == b"fdAT":
            seqs.append(struct.unpack(">I", b[:4])[0])
            images.append(zlib.decompress(b[4:]))
        elif k == b"IDAT":
            images.append(zlib.decompress(b))
    assert seqs == list(range(len(seqs))) and kinds.index(b"fcTL") < kinds.index(b"IDAT")
    for img, ref in zip(images, frames, strict=True):
        rows = np.frombuffer(img, np.uint8).reshape(9, 1 + 7 * 3)
        assert (rows[:, 0] == 0).all()  # filter "none" on every row
        assert np.array_equal(rows[:, 1:].reshape(9, 7, 3), ref)


# ---------------------------------------------------------------------------------------------- plot

PER_CHAR = 7 / 12  # em a character: a conservative sans-serif width


def _boxes(svg: str):
    """(text, (x0, y0, x1, y1)) of every <text>, its width estimated, its rotation applied."""
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert root.tag == ns + "svg"
    base = float(root.get("font-size"))
    out = []
    for t in root.iter(ns + "text"):
        s, size = t.text or "", float(t.get("font-size", base))
        x, y, w = float(t.get("x")), float(t.get("y")), PER_CHAR * size * len(t.text or "")
        x0 = {"start": x, "middle": x - w / 2, "end": x - w}[t.get("text-anchor", "start")]
        corners = [(x0, y - 0.8 * size), (x0 + w, y - 0.8 * size), (x0, y + 0.25 * size), (x0 + w, y + 0.25 * size)]
        m = re.fullmatch(r"rotate\((\S+) (\S+) (\S+)\)", t.get("transform", "rotate(0 0 0)"))
        a, cx, cy = (float(v) for v in m.groups())
        c, sn = math.cos(math.radians(a)), math.sin(math.radians(a))
        pts = [(cx + c * (px - cx) - sn * (py - cy), cy + sn * (px - cx) + c * (py - cy)) for px, py in corners]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        out.append((s, (min(xs), min(ys), max(xs), max(ys))))
    return float(root.get("width")), float(root.get("height")), out


def _check_layout(svg: str):
    w, h, boxes = _boxes(svg)
    for s, (x0, y0, x1, y1) in boxes:
        assert 0 <= x0 and x1 <= w and 0 <= y0 and y1 <= h, (s, (x0, y0, x1, y1), (w, h))
    for i, (s, a) in enumerate(boxes):
        for t, b in boxes[i + 1:]:
            overlap = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
            assert min(overlap) <= 0.5, f"{s!r} overlaps {t!r}"
    return w, h, boxes


MSAD_STAGES = "round-to-nearest, initialisation, calibrated"


def test_plot_of_the_proxy_keeps_its_legend_inside_and_right_of_the_curves():
    names = ["double.0", "double.1"] + [f"single.{i}" for i in range(4)]
    report = {"losses": {n: [0.03 + 0.001 * i, 0.02, 0.012] for i, n in enumerate(names)}, "x_label": MSAD_STAGES}
    svg = dp.calibration_svg(report, {n: 0.05 + 0.01 * i for i, n in enumerate(names)},
                             "proxy_msad:calibrate_proxy w4a8")
    w, h, boxes = _check_layout(svg)
    assert w == 900  # the default width when everything fits
    texts = [s for s, _ in boxes]
    assert {"loss (log scale)", "relative error", "calibration stage", "block", "calibrated"} <= set(texts)
    curves = [float(pt.split(",")[0]) for p in re.findall(r'points="([^"]*)"', svg) for pt in p.split()]
    legend = [b for s, b in boxes if s in names and b[1] < h / 2]
    assert len(legend) == 6 and min(b[0] for b in legend) > max(curves)


def test_plot_fits_long_names_and_many_blocks():
    names = [f"double_blocks.{i}" for i in range(20)] + [f"single_blocks.{i}" for i in range(40)]
    curves = {n: [10 ** (-1 - i / 20), 10 ** (-2 - i / 30), 10 ** (-3 - i / 25)] for i, n in enumerate(names)}
    report = {"losses": curves, "x_label": MSAD_STAGES}
    errors = {n: 0.01 * (i % 7 + 1) for i, n in enumerate(names)}
    svg = dp.calibration_svg(report, errors, "some.very.long.module.path:calibrate_function_with_a_long_name w4a8")
    w, h, boxes = _check_layout(svg)
    texts = [s for s, _ in boxes]
    assert all(texts.count(n) == 2 for n in names)  # in the legend and under its bar
    assert svg.index("single_blocks.2<") < svg.index("single_blocks.10<")  # natural order in the legend


@pytest.mark.parametrize("report", [None, {"losses": {"b": [0.5]}}, {"losses": {"b": [0.0, 0.0]}},
                                    {"losses": {f"blk{i}": [1e-9, 1e3] for i in range(3)}, "x_label": "epoch"}])
def test_plot_edge_cases_stay_inside(report):
    _check_layout(dp.calibration_svg(report, {"double.0": 0.0, "single.0": 2.5e-5}, "rtn w4a8 <&>"))
    _check_layout(dp.calibration_svg(report, {}, "x"))
