"""Which sampling schedules keep QuantSparse's quality: the proxy at 50 steps, per (dense warm-up, refresh interval).

End to end, the dense passes decide the speed (issue 6): the warm-up steps and the refreshes run full
attention, so fewer warm-up steps and longer refresh intervals are the largest levers, and each must be
judged by quality. This samples the trained proxy with ComfyUI's 50-step schedule (shift 7, Euler), MSAD
W4A8 (calibrated once, dense attention) and 15% svg-sparse attention with SSAR second order, under each
schedule, against the dense BF16 proxy of the same seeds; the first row without SSAR (the naive sparse
schedule) is the floor. ``bench_e2e.py --schedules`` gives each schedule's time on the full-size model.

    python benchmarks/bench_schedule.py --threads 2       # 8 clips x 50 steps, about 10 minutes on 2 cores

Writes benchmarks/results/schedule_proxy.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from comfyui_quantsparse.quantsparse.proxy import sample as ps
from comfyui_quantsparse.quantsparse.core.paths import write_text_atomic as write_text
from comfyui_quantsparse.quantsparse.core.config import QuantSparseConfig
from comfyui_quantsparse.quantsparse.proxy.eval import compare, find_calibrate
from comfyui_quantsparse.quantsparse.proxy.train import DEFAULT_PATH, load_proxy
from comfyui_quantsparse.quantsparse.sparse.ssar import step_kind

HERE = Path(__file__).resolve().parent
SCHEDULES = ((0.25, 5, 2), (0.25, 5, 0), (0.1, 5, 2), (0.1, 10, 2), (0.04, 5, 2), (0.04, 10, 2), (0.0, 10, 2))
# second against first order at 50 steps: python benchmarks/bench_schedule.py --schedules 0.1:5:2 0.1:5:1 \
#     0.1:10:2 0.1:10:1 --out benchmarks/results/schedule_order_proxy.json


def parse_schedule(text: str) -> tuple[float, int, int]:
    """"WARMUP:INTERVAL[:ORDER]" -> (dense warm-up fraction, refresh interval, SSAR order (default 2))."""
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        return float(parts[0]), int(parts[1]), int(parts[2]) if len(parts) == 3 else 2
    except ValueError:
        raise argparse.ArgumentTypeError(f"schedule {text!r}: write WARMUP:INTERVAL[:ORDER], e.g. 0.1:10") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=str(DEFAULT_PATH))
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--density", type=float, default=0.15)
    p.add_argument("--bits", default="w4a8")
    p.add_argument("--schedules", type=parse_schedule, nargs="+", default=list(SCHEDULES))
    p.add_argument("--calibrate", default="auto", help="'auto', 'rtn' or 'module:function'")
    p.add_argument("--calib-epochs", type=int, default=None)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "schedule_proxy.json"))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dense = load_proxy(Path(a.weights))
    clips = ps.benchmark_clips(a.seeds)
    calib_name, calibrate = find_calibrate(a.calibrate)
    t0 = time.perf_counter()
    refs = [ps.sample_clip(dense, c, steps=a.steps) for c in clips]
    print(f"{len(clips)} clips x {a.steps} steps; dense reference {(time.perf_counter() - t0) / len(clips):.2f} s/clip",
          flush=True)
    calib = ps.calibration_set(dense, 2, a.steps, stride=max(1, a.steps // 10))
    opts = ps.CalibrationOptions(sparse=ps.proxy_sparse_config(a.density), epochs=a.calib_epochs)
    model = calibrate(dense, QuantSparseConfig(bits=a.bits), calib, opts)
    print(f"calibrated {a.bits} with {calib_name} ({len(calib.inputs)} samples)", flush=True)

    rows = []
    out = Path(a.out)
    for warm, interval, order in a.schedules:
        cfg = ps.proxy_sparse_config(a.density, ssar_order=order, dense_warmup=warm, refresh_interval=interval)
        counts = Counter(step_kind(s, a.steps, cfg) for s in range(a.steps))
        t1 = time.perf_counter()
        res = [ps.sample_clip(model, c, steps=a.steps, sparse=cfg) for c in clips]
        q = compare(res, refs)
        rows.append({"dense_warmup": warm, "refresh_interval": interval, "ssar_order": order, "counts": dict(counts),
                     "psnr": round(q.psnr, 3), "ssim": round(q.ssim, 5),
                     "seconds_per_clip": round((time.perf_counter() - t1) / len(clips), 3),
                     "psnr_per_clip": [round(v, 3) for v in q.psnr_per_clip]})
        print(f"warm-up {warm:.2f} interval {interval:2d} order {order}  {dict(counts)}  PSNR {q.psnr:6.2f}  "
              f"SSIM {q.ssim:.4f}", flush=True)
    result = {"date": datetime.date.today().isoformat(), "weights": str(Path(a.weights).name), "clips": len(clips),
              "steps": a.steps, "bits": a.bits, "density": a.density, "calibration": calib_name,
              "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "torch": torch.__version__, "rows": rows}
    write_text(out, json.dumps(result, indent=1) + "\n")
    lines = [f"# Schedules on the proxy at {a.steps} steps ({result['date']})", "",
             f"{len(clips)} clips, {a.bits} ({calib_name}), {a.density:.0%} svg density, PSNR / SSIM of decoded pixels "
             f"against the dense BF16 proxy at {a.steps} steps. Device: {result['device']}.", "",
             "| dense warm-up | refresh interval | SSAR order | dense / refresh / sparse steps | PSNR (dB) | SSIM |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        c = r["counts"]
        lines.append(f"| {r['dense_warmup']:.2f} | {r['refresh_interval']} | {r['ssar_order']} | "
                     f"{c.get('dense', 0)} / {c.get('refresh', 0)} / {c.get('sparse', 0)} | {r['psnr']:.2f} | "
                     f"{r['ssim']:.4f} |")
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
