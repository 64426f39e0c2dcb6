"""The demo's pictures: a labelled side-by-side animation of the clips and an SVG plot of the calibration.

Neither needs a dependency (PIL only turns the animation into a GIF when it happens to be installed), so
the animation's labels are drawn with a bitmap font kept here, and the SVG places its labels from
conservative text-width estimates, since nothing here can measure a browser's font.
"""

from __future__ import annotations

import io
import math
import re
import struct
import zlib
from pathlib import Path
from typing import Optional, Sequence

import torch

from .core.paths import write_bytes_atomic as write_bytes
from .proxy import data as pdata
from .proxy import sample as ps

# ------------------------------------------------------------------------------------------ bitmap font

# The classic 5x7 LCD font for printable ASCII (0x20..0x7e): five column bytes per glyph, bit 0 the top
# row; bit 7 is the descender row of g, p, q, y and the comma, so a glyph cell is 5 x 8.
_FONT_HEX = (
    "0000000000 00005f0000 0007000700 147f147f14 242a7f2a12 2313086462 3649562050 0008070300 "  # !"#$%&'
    "001c224100 0041221c00 2a1c7f1c2a 08083e0808 0080703000 0808080808 0000606000 2010080402 "  # ()*+,-./
    "3e5149453e 00427f4000 7249494946 2141494d33 1814127f10 2745454539 3c4a494931 4121110907 "  # 0-7
    "3649494936 464949291e 0000140000 0040340000 0008142241 1414141414 0041221408 0201590906 "  # 89:;<=>?
    "3e415d594e 7c1211127c 7f49494936 3e41414122 7f4141413e 7f49494941 7f09090901 3e41415173 "  # @A-G
    "7f0808087f 00417f4100 2040413f01 7f08142241 7f40404040 7f021c027f 7f0408107f 3e4141413e "  # H-O
    "7f09090906 3e4151215e 7f09192946 2649494932 03017f0103 3f4040403f 1f2040201f 3f4038403f "  # P-W
    "6314081463 0304780403 6159494d43 007f414141 0204081020 004141417f 0402010204 4040404040 "  # XYZ[\]^_
    "0003070800 2054547840 7f28444438 3844444428 384444287f 3854545418 00087e0902 18a4a49c78 "  # `a-g
    "7f08040478 00447d4000 2040403d00 7f10284400 00417f4000 7c04780478 7c08040478 3844444438 "  # h-o
    "fc18242418 18242418fc 7c08040408 4854545424 04043f4424 3c4040207c 1c2040201c 3c4030403c "  # p-w
    "4428102844 4c9090907c 4464544c44 0008364100 00007f0000 0041360800 0201020402"  # xyz{|}~
).split()
GLYPH_W, GLYPH_H = 5, 8
ADVANCE = GLYPH_W + 1  # one blank column between glyphs


def _glyph_table() -> dict:
    table = {}
    for i, hx in enumerate(_FONT_HEX):
        cols = bytes.fromhex(hx)
        table[chr(0x20 + i)] = torch.tensor([[bool(c >> r & 1) for c in cols] for r in range(GLYPH_H)])
    return table


_GLYPHS = _glyph_table()


def text_width(text: str, scale: int = 1) -> int:
    """Pixels from the first glyph's left edge to the last one's right edge (no trailing gap)."""
    return (len(text) * ADVANCE - 1) * scale if text else 0


def text_mask(text: str, scale: int = 1) -> torch.Tensor:
    """``[8 * scale, text_width]`` bool: the ink of ``text``; a character outside ASCII draws as '?'."""
    if not text:
        return torch.zeros(GLYPH_H * scale, 0, dtype=torch.bool)
    gap = torch.zeros(GLYPH_H, 1, dtype=torch.bool)
    cols = [x for ch in text for x in (_GLYPHS.get(ch, _GLYPHS["?"]), gap)][:-1]
    return torch.cat(cols, 1).repeat_interleave(scale, 0).repeat_interleave(scale, 1)


def draw_text(img: torch.Tensor, x: int, y: int, text: str, scale: int, colour=(24, 24, 24)) -> None:
    """Ink ``text`` into ``img`` (``[..., H, W, 3]`` uint8, e.g. all frames at once) with its top-left
    corner at (x, y); what falls outside the image is dropped."""
    m = text_mask(text, scale)
    h, w = img.shape[-3], img.shape[-2]
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + m.shape[1], w), min(y + m.shape[0], h)
    if x1 <= x0 or y1 <= y0:
        return
    m = m[y0 - y:y1 - y, x0 - x:x1 - x, None]
    region = img[..., y0:y1, x0:x1, :]
    region.copy_(torch.where(m, torch.tensor(colour, dtype=img.dtype), region))


def wrap(text: str, width: int, scale: int) -> list:
    """Lines of ``text`` that each fit ``width`` pixels, broken at spaces (a word too long is cut)."""
    per = max(1, (width // scale + 1) // ADVANCE)
    if len(text) <= per:
        return [text]  # as written, double spaces included
    lines, cur = [], ""
    for word in text.split():
        while len(word) > per:
            if cur:
                lines.append(cur)
                cur = ""
            lines.append(word[:per])
            word = word[per:]
        if not cur:
            cur = word
        elif len(cur) + 1 + len(word) <= per:
            cur += " " + word
        else:
            lines.append(cur)
            cur = word
    if cur or not lines:
        lines.append(cur)
    return lines


# ------------------------------------------------------------------------------------------ preview

UPSCALE = 2  # the 128-pixel clips are small on a screen: nearest-neighbour 2x
TEXT_SCALE = 2  # 10 x 14 pixel capitals, readable next to 256-pixel clips
BAND = (236, 236, 236)
INK = (24, 24, 24)


def preview_labels(clips=None, quality=None, bits: str = "w4a8", density: float = 0.15):
    """(column titles, per clip row its lines): what ``preview_frames`` prints."""
    columns = ("dense BF16", f"QuantSparse {bits.upper()} {density * 100:g}%", "|difference| x4")
    n = len(clips) if clips is not None else len(quality.psnr_per_clip) if quality is not None else 0
    rows = []
    for i in range(n):
        first = f"clip {i}"
        if quality is not None:
            first += f": PSNR {quality.psnr_per_clip[i]:.2f} dB  SSIM {quality.ssim_per_clip[i]:.4f} vs dense"
        lines = [first]
        if clips is not None:
            lines.append(f"{clips[i].prompt.text} (seed {clips[i].seed})")
        rows.append(lines)
    return columns, rows


def _band(width: int, lines: Sequence[str], scale: int, columns=None) -> torch.Tensor:
    """``[h, width, 3]`` light band with ``lines`` in dark text; with ``columns`` ([(x, w), ...], one
    text per column) each column's text is wrapped and centred over it instead."""
    pad, lh = 2 * scale, (GLYPH_H + 2) * scale
    if columns is not None:
        blocks = [(x, w, wrap(t, w - 2 * pad, scale), True) for (x, w), t in zip(columns, lines)]
    else:
        blocks = [(0, width, [ln for t in lines for ln in wrap(t, width - 2 * pad, scale)], False)]
    n = max(len(b[2]) for b in blocks)
    band = torch.tensor(BAND, dtype=torch.uint8).expand(2 * pad + n * lh - 2 * scale, width, 3).clone()
    for x, w, ls, centre in blocks:
        for j, ln in enumerate(ls):
            tx = x + (w - text_width(ln, scale)) // 2 if centre else x + pad
            draw_text(band, tx, pad + j * lh, ln, scale, INK)
    return band


def preview_frames(refs: Sequence[ps.SampleResult], tests: Sequence[ps.SampleResult], columns=None,
                   rows=None, upscale: int = UPSCALE, scale: int = TEXT_SCALE) -> torch.Tensor:
    """``[F, H, W, 3]`` uint8: a header naming the columns, then per clip its label band and its row
    (dense | QuantSparse | 4x |difference|), and a footer with the frame number."""
    if columns is None:
        columns, rows = preview_labels()
    videos = []
    for r, t in zip(refs, tests):
        a, b = ps.decode(r.latent), ps.decode(t.latent)
        diff = ((a - b).abs() * 4 - 1).clamp(-1, 1)
        sep = torch.ones(3, a.shape[1], a.shape[2], 2)
        v = pdata.to_uint8(torch.cat([a, sep, b, sep, diff], dim=3))
        videos.append(v.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2))
    f, _, width, _ = videos[0].shape
    cw = (width - 4 * upscale) // 3  # column width; separators are 2 pixels before upscaling
    spans = [(i * (cw + 2 * upscale), cw) for i in range(3)]
    parts = [_band(width, columns, scale, columns=spans)]
    for i, v in enumerate(videos):
        parts.append(_band(width, rows[i] if rows and i < len(rows) else [f"clip {i}"], scale))
        parts.append(v)
    counters = [f"frame {k + 1}/{f}" for k in range(f)]
    note = f"PSNR / SSIM over all {f} frames"
    footer = _band(width, [""], scale)
    if text_width(note, scale) + text_width(counters[-1], scale) + 8 * scale <= width:
        draw_text(footer, 2 * scale, 2 * scale, note, scale, INK)
    footers = []
    for k in range(f):
        fb = footer.clone()
        draw_text(fb, width - 2 * scale - text_width(counters[k], scale), 2 * scale, counters[k], scale, INK)
        footers.append(fb)
    body = torch.cat([p.expand(f, *p.shape) if p.dim() == 3 else p for p in parts], dim=1)
    return torch.cat([body, torch.stack(footers)], dim=1)


def write_preview(out: Path, refs, tests, *, clips=None, quality=None, bits: str = "w4a8",
                  density: float = 0.15) -> Path:
    """Animated GIF with PIL if installed, otherwise an animated PNG written here (no dependency needed;
    browsers and most viewers play APNG, others show its first frame)."""
    columns, rows = preview_labels(clips, quality, bits, density)
    frames = preview_frames(refs, tests, columns, rows).numpy()
    try:
        from PIL import Image
    except ImportError:
        path = out / "side_by_side.png"
        write_bytes(path, apng(frames, delay_ms=120))
        return path
    path = out / "side_by_side.gif"
    imgs = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=120, loop=0)
    write_bytes(path, buf.getvalue())
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def apng(frames, delay_ms: int = 100) -> bytes:
    """Animated PNG of ``[F, H, W, 3]`` uint8 frames (PNG spec + the APNG acTL / fcTL / fdAT chunks)."""
    n, h, w, _ = frames.shape
    out = [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)),
           _chunk(b"acTL", struct.pack(">II", n, 0))]
    seq = 0
    for i in range(n):
        raw = b"".join(b"\x00" + frames[i, y].tobytes() for y in range(h))  # filter 0 per row
        data = zlib.compress(raw, 9)
        out.append(_chunk(b"fcTL", struct.pack(">IIIIIHHBB", seq, w, h, 0, 0, delay_ms, 1000, 0, 0)))
        seq += 1
        if i == 0:
            out.append(_chunk(b"IDAT", data))
        else:
            out.append(_chunk(b"fdAT", struct.pack(">I", seq) + data))
            seq += 1
    out.append(_chunk(b"IEND", b""))
    return b"".join(out)


# ------------------------------------------------------------------------------------------ plot

FONT = 12  # px, the SVG's default font size
MARGIN = 16  # px between any label and the canvas edge
_NARROW, _WIDE = set("il.,:;|!'()[]{} fjrtI"), set("mwMW%@")


def svg_text_width(text, size: float = FONT) -> float:
    """An upper estimate of a label's width in a sans-serif font: a browser's font cannot be measured
    here, so wide letters count more, narrow ones less, and never under 0.6 em a character."""
    s = str(text)
    em = sum(0.4 if c in _NARROW else 0.95 if c in _WIDE else 0.75 if c.isupper() else 0.64 for c in s)
    return max(em, 0.6 * len(s)) * size


def calibration_svg(report: Optional[dict], errors: dict, title: str, width: int = 900) -> str:
    """A hand-written SVG (no plotting dependency): calibration loss curves per block (if the calibration
    reported them as ``{"losses": {block: [loss, ...]}, "x_label": ...}``) and the per-block relative output
    error. The canvas grows beyond ``width`` when the labels need it (long names, many blocks)."""
    report = report or {}
    losses = {str(k): [float(v) for v in seq] for k, seq in (report.get("losses") or {}).items()}
    losses = {k: v for k, v in losses.items() if any(x > 0 for x in v)}
    names = sorted(losses, key=_natural)
    loss_title = f"Calibration losses ({title})"
    err_title = "Per-block relative output error |q(x) - d(x)| / |d(x)| (dense block inputs)"
    empty = ("no calibration losses: round-to-nearest needs no data "
             "(MSAD reports its losses here once it is used)")

    plot_h = min(max(16 * len(names), 220), 400)
    per_col = max(1, (plot_h - 4) // 16)
    col_w = 22 + max((svg_text_width(n) for n in names), default=0) + 14
    legend_w = math.ceil(len(names) / per_col) * col_w if names else 0
    ly = _log_ticks(losses) if names else []
    emax = max(errors.values(), default=0.0) or 1.0
    ey = _linear_ticks(emax)
    left = MARGIN + 22 + max(svg_text_width(t) for _, t in ly + ey) + 8  # y title, tick labels, tick gap
    w = math.ceil(max(width, 2 * MARGIN + svg_text_width(loss_title, 15), 2 * MARGIN + svg_text_width(err_title, 15),
                      left + 320 + (legend_w + 16 if legend_w else 0) + MARGIN, 2 * MARGIN + svg_text_width(empty),
                      left + 15 * len(errors) + MARGIN))

    parts = [f'<text x="{MARGIN}" y="26" font-size="15">{_esc(loss_title)}</text>']
    if names:
        h1 = _loss_panel(parts, report, losses, names, ly, left, w - MARGIN - legend_w - 16, plot_h, per_col, col_w)
    else:
        parts.append(f'<text x="{MARGIN}" y="60">{_esc(empty)}</text>')
        h1 = 90
    h = _error_panel(parts, errors, err_title, ey, left, w - MARGIN, h1)
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
            f'font-family="sans-serif" font-size="{FONT}"><rect width="100%" height="100%" fill="white"/>')
    return "\n".join([head, *parts, "</svg>"]) + "\n"


def _loss_panel(parts, report, losses, names, ticks, left, right, plot_h, per_col, col_w) -> int:
    """Curves on a log axis with the legend in columns right of the plot; returns the panel's height."""
    top, bottom = 48, 48 + plot_h
    lo, hi = math.log10(ticks[0][0]), math.log10(ticks[-1][0])
    n = max(len(s) for s in losses.values())
    x_of = (lambda i: left + (right - left) * i / (n - 1)) if n > 1 else (lambda i: (left + right) / 2)
    y_of = lambda v: bottom - plot_h * (math.log10(max(v, 10 ** lo)) - lo) / (hi - lo)  # noqa: E731
    _y_axis(parts, ticks, y_of, left, right, top, bottom, "loss (log scale)")
    for j, name in enumerate(names):
        colour = f"hsl({int(300 * j / len(names))},70%,{40 + 12 * (j % 2)}%)"  # no wrap to red
        pts = [(x_of(i), y_of(v)) for i, v in enumerate(losses[name]) if v > 0]
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="'
                     + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
        parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>' for x, y in pts)
        lx, ly = right + 16 + (j // per_col) * col_w, top + 10 + 16 * (j % per_col)
        parts.append(f'<line x1="{lx:.1f}" y1="{ly - 4}" x2="{lx + 16:.1f}" y2="{ly - 4}" stroke="{colour}" '
                     f'stroke-width="2.5"/>')
        parts.append(f'<text x="{lx + 22:.1f}" y="{ly}">{_esc(name)}</text>')
    # x ticks: the stages when x_label names one per point ("rtn, init, final"), else the indices
    x_label = str(report.get("x_label", "step"))
    stages = [s.strip() for s in x_label.split(",")]
    if n > 1 and len(stages) == n:
        ticks_x, axis = stages, "calibration stage"
    else:
        ticks_x, axis = [str(i) for i in range(n)], x_label
    widest = max(svg_text_width(t) for t in ticks_x)
    every = max(1, math.ceil((widest + 10) / ((right - left) / max(n - 1, 1))))
    for i in range(0, n, every):
        x = _clamp(x_of(i), svg_text_width(ticks_x[i]), MARGIN, right + 8)
        parts.append(f'<line x1="{x_of(i):.1f}" y1="{bottom}" x2="{x_of(i):.1f}" y2="{bottom + 4}" stroke="black"/>')
        parts.append(f'<text x="{x:.1f}" y="{bottom + 18}" text-anchor="middle">{_esc(ticks_x[i])}</text>')
    ax = _clamp((left + right) / 2, svg_text_width(axis), MARGIN, right + 8)
    parts.append(f'<text x="{ax:.1f}" y="{bottom + 38}" text-anchor="middle">{_esc(axis)}</text>')
    return bottom + 56


def _error_panel(parts, errors, title, ticks, left, right, y0) -> int:
    """Bars per block under the loss panel (names turned upright when they do not fit side by side);
    returns the canvas height."""
    parts.append(f'<text x="{MARGIN}" y="{y0 + 26}" font-size="15">{_esc(title)}</text>')
    plot_h = 240
    top, bottom = y0 + 48, y0 + 48 + plot_h
    vmax = ticks[-1][0]
    y_of = lambda v: bottom - plot_h * v / vmax  # noqa: E731
    _y_axis(parts, ticks, y_of, left, right, top, bottom, "relative error")
    if not errors:
        parts.append(f'<text x="{left + 8}" y="{top + 20}">no blocks</text>')
        return bottom + 40
    slot = (right - left) / len(errors)
    values = {k: f"{e:.3g}" for k, e in errors.items()}
    upright = slot < max(svg_text_width(k) for k in errors) + 8
    show_values = slot >= max(svg_text_width(v) for v in values.values()) + 6
    for i, (name, e) in enumerate(errors.items()):
        cx, y = left + (i + 0.5) * slot, y_of(e)
        parts.append(f'<rect x="{cx - 0.35 * slot:.1f}" y="{y:.1f}" width="{0.7 * slot:.1f}" '
                     f'height="{bottom - y:.1f}" fill="#4a7ab5"/>')
        if show_values:
            parts.append(f'<text x="{cx:.1f}" y="{y - 4:.1f}" text-anchor="middle">{values[name]}</text>')
        if upright:  # reads bottom to top, ending just under the axis
            x, yl = cx + 4, bottom + 8
            parts.append(f'<text x="{x:.1f}" y="{yl}" text-anchor="end" transform="rotate(-90 {x:.1f} {yl})">'
                         f'{_esc(name)}</text>')
        else:
            parts.append(f'<text x="{cx:.1f}" y="{bottom + 18}" text-anchor="middle">{_esc(name)}</text>')
    names_h = max(svg_text_width(k) for k in errors) + 12 if upright else 22
    parts.append(f'<text x="{(left + right) / 2:.1f}" y="{bottom + names_h + 18:.0f}" text-anchor="middle">'
                 f'block</text>')
    return math.ceil(bottom + names_h + 34)


def _y_axis(parts, ticks, y_of, left, right, top, bottom, label) -> None:
    for v, t in ticks:
        y = y_of(v)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#e2e2e2"/>')
        parts.append(f'<text x="{left - 6:.1f}" y="{y + 4:.1f}" text-anchor="end">{t}</text>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="black"/>')
    parts.append(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>')
    x, y = MARGIN + 12, (top + bottom) / 2
    parts.append(f'<text x="{x}" y="{y:.1f}" text-anchor="middle" transform="rotate(-90 {x} {y:.1f})">'
                 f'{_esc(label)}</text>')


def _log_ticks(losses: dict) -> list:
    """(value, label) at 1, 2, 5 x 10^k over whole decades around the data (only 10^k past 3 decades)."""
    vals = [v for seq in losses.values() for v in seq if v > 0]
    lo, hi = math.floor(math.log10(min(vals))), math.ceil(math.log10(max(vals)))
    hi = max(hi, lo + 1)
    mult = (1, 2, 5) if hi - lo <= 2 else (1,)
    every = max(1, math.ceil((hi - lo) / 10))
    ticks = [(m * 10.0 ** k, f"{m * 10.0 ** k:g}") for k in range(lo, hi + 1) for m in mult
             if (k - lo) % every == 0 and (k < hi or m == 1)]
    if ticks[-1][0] < 10.0 ** hi:  # the axis ends on its top decade even when skipped
        ticks.append((10.0 ** hi, f"{10.0 ** hi:g}"))
    return ticks


def _linear_ticks(vmax: float) -> list:
    """(value, label) from 0 at a 1 / 2 / 5 step, about five, the last at or above ``vmax``."""
    raw = vmax / 5
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    n = math.ceil(vmax / step - 1e-9)
    return [(i * step, f"{round(i * step, 12):g}") for i in range(n + 1)]


def _clamp(x: float, w: float, lo: float, hi: float) -> float:
    """The centre of a ``w``-wide label near ``x`` that keeps it within [lo, hi]."""
    return min(max(x, lo + w / 2), hi - w / 2)


def _natural(name: str):
    """'single.10' after 'single.9'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _esc(s: str) -> str:
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
