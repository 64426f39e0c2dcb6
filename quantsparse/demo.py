"""``quantsparse demo``: QuantSparse on the trained proxy HunyuanVideo, on a CPU, in a few minutes.

Calibrates the proxy at W4A8 (MSAD when the package provides it, otherwise round-to-nearest, and it says
which), samples a fixed set of clips dense and with QuantSparse (quantized weights + sparse attention +
SSAR), prints PSNR / SSIM against dense, storage, achieved density and time, and writes a side-by-side
animated preview (dense | QuantSparse | 4x difference) and a plot of the calibration losses and per-block
errors into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import proxy_data as pdata
from .atomic_io import write_bytes, write_text
from . import proxy_sample as ps
from .config import QuantSparseConfig
from .proxy_eval import block_errors, calibration_report, compare, find_calibrate, model_bytes
from .proxy_train import DEFAULT_PATH, load_proxy


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quantsparse demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=str(DEFAULT_PATH), help="proxy weights (default: the shipped file)")
    p.add_argument("--out", default="quantsparse_demo", help="folder for the preview and the plot")
    p.add_argument("--clips", type=int, default=4, help="number of fixed clips (prompt, seed)")
    p.add_argument("--steps", type=int, default=ps.DEFAULT_STEPS, help="Euler steps per clip")
    p.add_argument("--bits", default="w4a8", choices=["w4a8", "w6a6", "w8a8"])
    p.add_argument("--density", type=float, default=0.15, help="sparse attention density")
    p.add_argument("--calibrate", default="auto",
                   help="'auto' (MSAD if available, else rtn), 'rtn', or 'module:function'")
    p.add_argument("--calib-clips", type=int, default=2, help="clips whose dense trajectories calibrate")
    p.add_argument("--calib-epochs", type=int, default=5,
                   help="calibration epochs (default 5 to stay within minutes on a CPU; the paper's recipe is 15)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    if a.clips < 1 or a.steps < 1 or not 0 < a.density <= 1:
        print("demo: --clips and --steps must be >= 1 and --density in (0, 1]", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        dense = load_proxy(a.weights)
    except (FileNotFoundError, ValueError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    clips = ps.benchmark_clips(a.clips)
    sparse = ps.proxy_sparse_config(a.density)
    calib_name, calibrate = find_calibrate(a.calibrate)
    qcfg = QuantSparseConfig(bits=a.bits)

    print(f"proxy HunyuanVideo {a.weights}: {sum(v.numel() for v in dense.state_dict().values()) / 1e6:.1f}M "
          f"parameters; {len(clips)} clips x {a.steps} steps")
    t0 = time.perf_counter()
    calib = ps.calibration_set(dense, a.calib_clips, a.steps, stride=max(1, a.steps // 5))
    opts = ps.CalibrationOptions(sparse=sparse, epochs=a.calib_epochs, log=lambda s: print("  " + s))
    quant = calibrate(dense, qcfg, calib, opts)
    t_cal = time.perf_counter() - t0
    print(f"calibration ({calib_name}, {a.bits}): {t_cal:.1f} s on {len(calib.inputs)} captured steps")

    refs, tests = [], []
    for c in clips:
        refs.append(ps.sample_clip(dense, c, steps=a.steps))
        tests.append(ps.sample_clip(quant, c, steps=a.steps, sparse=sparse))
    q = compare(tests, refs)
    dens = [r.summary["achieved_density"] for r in tests if r.summary["achieved_density"] is not None]
    bd, bq = model_bytes(dense), model_bytes(quant)
    t_d = sum(r.seconds for r in refs) / len(refs)
    t_q = sum(r.seconds for r in tests) / len(tests)
    s0 = tests[0].summary

    print("\n clip  prompt                                     PSNR (dB)   SSIM")
    for i, c in enumerate(clips):
        print(f" {i:4d}  {c.prompt.text + f' (seed {c.seed})':42s} {q.psnr_per_clip[i]:9.2f}  {q.ssim_per_clip[i]:.4f}")
    print(f" mean  {'':42s} {q.psnr:9.2f}  {q.ssim:.4f}")
    print(f"\nstorage: dense BF16 {bd / 2**20:.2f} MiB -> QuantSparse {bq / 2**20:.2f} MiB ({bd / bq:.2f}x smaller)")
    print(f"achieved density: {sum(dens) / len(dens):.3f} (target {a.density}); steps: {s0['dense_steps']} dense, "
          f"{s0['refresh_steps']} refresh, {s0['sparse_steps']} sparse")
    print(f"time per clip on {torch.get_num_threads()} CPU thread(s): dense {t_d:.2f} s, QuantSparse {t_q:.2f} s "
          f"(the CPU runs the eager kernel references: speed is measured on the GPU, not here)")

    gif = write_preview(out, refs, tests)
    errs = block_errors(dense, quant, calib.inputs[:: max(1, len(calib.inputs) // 4)])
    plot = out / "calibration.svg"
    write_text(plot, calibration_svg(calibration_report(quant), errs, f"{calib_name} {a.bits}"))
    summary = {"weights": str(a.weights), "calibration": calib_name, "bits": a.bits, "density": a.density,
               "clips": [{"prompt": c.prompt.text, "seed": c.seed} for c in clips], "steps": a.steps,
               "psnr": q.psnr, "ssim": q.ssim, "psnr_per_clip": q.psnr_per_clip, "ssim_per_clip": q.ssim_per_clip,
               "dense_bytes": bd, "quantsparse_bytes": bq, "achieved_density": sum(dens) / len(dens),
               "calibration_seconds": t_cal, "seconds_per_clip": {"dense": t_d, "quantsparse": t_q},
               "block_errors": errs}
    write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    print(f"\nwrote {gif}, {plot} and {out / 'summary.json'}")
    return 0


# ------------------------------------------------------------------------------------------ preview

def preview_frames(refs: Sequence[ps.SampleResult], tests: Sequence[ps.SampleResult]) -> torch.Tensor:
    """``[F, H, W, 3]`` uint8: per clip a row (dense | QuantSparse | 4x |difference|), clips stacked."""
    rows = []
    for r, t in zip(refs, tests):
        a, b = ps.decode(r.latent), ps.decode(t.latent)
        diff = ((a - b).abs() * 4 - 1).clamp(-1, 1)
        sep = torch.ones(3, a.shape[1], a.shape[2], 2)
        rows.append(torch.cat([a, sep, b, sep, diff], dim=3))
    gap = torch.ones(3, rows[0].shape[1], 2, rows[0].shape[3])
    video = torch.cat([x for r in rows for x in (r, gap)][:-1], dim=2)
    return pdata.to_uint8(video)


def write_preview(out: Path, refs, tests) -> Path:
    """Animated GIF with PIL if installed, otherwise an animated PNG written here (no dependency needed;
    browsers and most viewers play APNG, others show its first frame)."""
    frames = preview_frames(refs, tests)
    frames = frames.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).numpy()  # 2x, nearest
    try:
        from PIL import Image
    except ImportError:
        path = out / "side_by_side.png"
        write_bytes(path, apng(frames, delay_ms=120))
        return path
    path = out / "side_by_side.gif"
    imgs = [Image.fromarray(f) for f in frames]
    tmp = path.with_name(path.name + ".tmp")
    imgs[0].save(tmp, format="GIF", save_all=True, append_images=imgs[1:], duration=120, loop=0)
    os.replace(tmp, path)
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

def calibration_svg(report: Optional[dict], errors: dict, title: str) -> str:
    """A hand-written SVG (no plotting dependency): calibration loss curves per block (if the calibration
    reported them as ``{"losses": {block: [loss, ...]}, "x_label": ...}``) and the per-block relative output
    error."""
    w, h, pad = 900, 360, 50
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{2 * h}" font-family="sans-serif" '
             f'font-size="12"><rect width="100%" height="100%" fill="white"/>']
    losses = (report or {}).get("losses") or {}
    parts.append(f'<text x="{pad}" y="24" font-size="15">Calibration losses ({_esc(title)})</text>')
    if losses:
        vals = [v for seq in losses.values() for v in seq if v > 0]
        lo, hi = math.log10(min(vals)), math.log10(max(vals))
        hi = hi if hi > lo else lo + 1
        n = max(len(s) for s in losses.values())
        for j, (name, seq) in enumerate(sorted(losses.items())):
            colour = f"hsl({int(360 * j / max(len(losses), 1))},70%,40%)"
            pts = " ".join(f"{pad + (w - 2 * pad) * i / max(n - 1, 1):.1f},"
                           f"{h - pad - (h - 2 * pad) * (math.log10(max(v, 1e-30)) - lo) / (hi - lo):.1f}"
                           for i, v in enumerate(seq))
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{pts}"/>')
            parts.append(f'<text x="{w - pad + 4}" y="{pad + 14 * j}" fill="{colour}">{_esc(name)}</text>')
        xl = _esc((report or {}).get("x_label", "step"))
        parts.append(f'<text x="{pad}" y="{h - pad + 20}">{xl} (loss on a log scale, '
                     f'{10 ** lo:.2g} .. {10 ** hi:.2g})</text>')
    else:
        parts.append(f'<text x="{pad}" y="{h // 2}">no calibration losses: round-to-nearest needs no data '
                     f'(MSAD reports its losses here once it is used)</text>')
    parts.append(f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>')
    top = h + 24
    parts.append(f'<text x="{pad}" y="{top}" font-size="15">Per-block relative output error |q(x) - d(x)| / |d(x)| '
                 f'(dense block inputs)</text>')
    emax = max(errors.values()) if errors else 1.0
    bw = (w - 2 * pad) / max(len(errors), 1)
    for i, (name, e) in enumerate(errors.items()):
        bh = (h - 2 * pad) * e / (emax or 1.0)
        x, y = pad + i * bw, 2 * h - pad - bh
        parts.append(f'<rect x="{x + 4:.1f}" y="{y:.1f}" width="{bw - 8:.1f}" height="{bh:.1f}" fill="#4a7ab5"/>')
        parts.append(f'<text x="{x + 4:.1f}" y="{y - 4:.1f}">{e:.4f}</text>')
        parts.append(f'<text x="{x + 4:.1f}" y="{2 * h - pad + 16}">{_esc(name)}</text>')
    parts.append(f'<line x1="{pad}" y1="{2 * h - pad}" x2="{w - pad}" y2="{2 * h - pad}" stroke="black"/>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _esc(s: str) -> str:
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


if __name__ == "__main__":
    sys.exit(main())
