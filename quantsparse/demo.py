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
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .cli_common import OneLineParser, run_command
from .core.config import QuantSparseConfig
from .core.paths import clean_stale_partials, output_folder, write_text_atomic as write_text
from .demo_preview import calibration_svg, write_preview
from .proxy import sample as ps
from .proxy.eval import block_errors, calibration_report, compare, model_bytes
from .proxy.msad import calibrate_proxy
from .proxy.train import DEFAULT_PATH, check_proxy_file, read_proxy

DEMO_FILES = ("side_by_side.gif", "side_by_side.png", "calibration.svg", "summary.json")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="quantsparse demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=str(DEFAULT_PATH), help="proxy weights (default: the shipped file)")
    p.add_argument("--out", default="quantsparse_demo", help="folder for the preview and the plot")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier demo in --out")
    p.add_argument("--clips", type=int, default=4, help="number of fixed clips (prompt, seed)")
    p.add_argument("--steps", type=int, default=ps.DEFAULT_STEPS, help="Euler steps per clip")
    p.add_argument("--bits", default="w4a8", choices=["w4a8", "w6a6", "w8a8"])
    p.add_argument("--density", type=float, default=0.15, help="sparse attention density")
    p.add_argument("--calibrate", default="auto", choices=["auto", "msad", "rtn"],
                   help="auto: MSAD (the package's calibration); rtn: round-to-nearest, no calibration")
    p.add_argument("--calib-clips", type=int, default=2, help="clips whose dense trajectories calibrate")
    p.add_argument("--calib-epochs", type=int, default=5,
                   help="calibration epochs (default 5 to stay within minutes on a CPU; the paper's recipe is 15)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    return run_command("quantsparse demo", lambda: run(a), after="")


def check_args(a) -> tuple[Path, Path]:
    """Everything checked before a minute is spent and before the output folder exists."""
    for name, value, low in (("--clips", a.clips, 1), ("--steps", a.steps, 1), ("--calib-clips", a.calib_clips, 1),
                             ("--calib-epochs", a.calib_epochs, 0), ("--threads", a.threads, 0)):
        if value < low:
            raise ValueError(f"{name} {value}: must be at least {low}")
    if not 0 < a.density <= 1:
        raise ValueError(f"--density {a.density}: must be in (0, 1] (1 = dense attention)")
    weights = check_proxy_file(a.weights)
    out = output_folder(a.out, "the demo's output folder (--out)", inputs=[weights])
    earlier = [n for n in DEMO_FILES if (out / n).exists()]
    if earlier and not a.overwrite:
        raise ValueError(f"{out} already holds an earlier demo's results ({', '.join(earlier)}); pass --overwrite to "
                         "replace them, or --out NEW_FOLDER")
    for n in DEMO_FILES:
        clean_stale_partials(out / n)
    return weights, out


def run(a) -> int:
    weights, out = check_args(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    dense = read_proxy(weights)
    clips = ps.benchmark_clips(a.clips)
    sparse = ps.proxy_sparse_config(a.density)
    calib_name, calibrate = ("round-to-nearest", ps.rtn_calibrate) if a.calibrate == "rtn" else ("MSAD", calibrate_proxy)
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

    out.mkdir(parents=True, exist_ok=True)
    gif = write_preview(out, refs, tests, clips=clips, quality=q, bits=a.bits, density=a.density)
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


if __name__ == "__main__":
    sys.exit(main())
