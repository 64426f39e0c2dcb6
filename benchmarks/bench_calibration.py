"""MSAD calibration cost on the full HunyuanVideo-13B configuration: a few blocks, extrapolated to all 60.

Blocks of the real shape (hidden 3072, 24 heads) with random weights (time does not depend on weight
values), ``--samples`` random block inputs at the calibration resolution (848x480x33 -> 9x30x53 = 14,310
video tokens + 256 text tokens) kept on the host like the real run, ``--epochs`` epochs, the product's
``calibrate_block`` (full-model targets, saliency, svg mask, round-to-nearest baseline, initialisation,
AdamW training, final evaluation). Reports seconds per block and peak GPU memory per block type, and
the whole-model estimate ``20 * double + 40 * single``. Target: <= 60 minutes, <= 24 GB.

    python benchmarks/bench_calibration.py --out benchmarks/results            # H100: 1 double + 1 single
    python benchmarks/bench_calibration.py --out /tmp/x --tiny                 # CPU smoke run of the same path
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_json  # noqa: E402

from comfyui_quantsparse.quantsparse.calib.block import calibrate_block  # noqa: E402
from comfyui_quantsparse.quantsparse.models.base import BlockRef  # noqa: E402
from comfyui_quantsparse.quantsparse.calib.settings import CalibSettings  # noqa: E402
from comfyui_quantsparse.quantsparse.calib.capture import latent_shape  # noqa: E402
from comfyui_quantsparse.quantsparse.models import registry  # noqa: E402
from comfyui_quantsparse.quantsparse.models.hunyuan_video.blocks import DoubleStreamBlock, SingleStreamBlock  # noqa: E402
from comfyui_quantsparse.quantsparse.models.hunyuan_video.dims import HunyuanVideoDims  # noqa: E402


def random_block(block: nn.Module, seed: int) -> nn.Module:
    """Weights ~ N(0, 1/fan_in), biases small, norm weights near 1 (as hunyuan/random_weights.py)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                p.copy_(noise * 0.02)
            elif p.dim() == 1:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))
    return block


def random_samples(block_type: str, count: int, grid, txt_len: int, hidden: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    img_len = math.prod(grid)
    out = []
    for _ in range(count):
        s = {"vec": torch.randn(1, hidden, generator=g).bfloat16(), "grid": torch.tensor(grid)}
        if block_type == "double":
            s["img"] = torch.randn(1, img_len, hidden, generator=g).bfloat16()
            s["txt"] = torch.randn(1, txt_len, hidden, generator=g).bfloat16()
        else:
            s["x"] = torch.randn(1, txt_len + img_len, hidden, generator=g).bfloat16()
            s["txt_len"] = torch.tensor(txt_len)
        out.append(s)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the JSON result")
    ap.add_argument("--double", type=int, default=1, help="double blocks to calibrate (default 1)")
    ap.add_argument("--single", type=int, default=1, help="single blocks to calibrate (default 1)")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--width", type=int, default=848)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--frames", type=int, default=33)
    ap.add_argument("--txt", type=int, default=256, help="text tokens")
    ap.add_argument("--density", type=float, default=0.15)
    ap.add_argument("--device-cache-gb", type=float, default=4.0, help="targets kept on the GPU up to this size")
    ap.add_argument("--tiny", action="store_true", help="tiny dims on the CPU (tests the code path, not a figure)")
    args = ap.parse_args()

    if args.tiny:
        dims, device, dtype = HunyuanVideoDims.tiny(), "cpu", torch.float32
        args.width, args.height, args.frames, args.txt = 128, 128, 9, 6
        args.samples, args.epochs = min(args.samples, 2), min(args.epochs, 1)
        settings = CalibSettings(epochs=args.epochs, density=args.density, block_q=16, block_k=16, pool_stride=16,
                                 salient_tokens=32)
        name = "calibration_tiny_cpu.json"
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --tiny for a CPU run of the code path", file=sys.stderr)
            return 2
        dims, device, dtype = HunyuanVideoDims.full(), "cuda", torch.bfloat16
        settings = CalibSettings(epochs=args.epochs, density=args.density)
        name = "calibration_h100.json"
    _, _, t, h, w = latent_shape(args.width, args.height, args.frames, registry.adapter_for(dims).sampling)
    grid = (t, h // 2, w // 2)
    print(f"{dims.hidden_size} hidden, {dims.num_heads} heads; {math.prod(grid)} video + {args.txt} text tokens "
          f"(grid {grid}); {args.samples} samples x {args.epochs} epochs; density {args.density}; {device}")

    rows = []
    for block_type, count, depth in (("double", args.double, dims.depth), ("single", args.single,
                                                                         dims.depth_single_blocks)):
        for i in range(count):
            cls = DoubleStreamBlock if block_type == "double" else SingleStreamBlock
            block = random_block(cls(dims, i, dtype=dtype), seed=100 * i + (0 if block_type == "double" else 1))
            samples = random_samples(block_type, args.samples, grid, args.txt, dims.hidden_size, seed=i)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            ref = BlockRef(f"{block_type}_{i:02d}", f"{block_type}_blocks.{i}", block_type, i, block)
            res = calibrate_block(ref, samples, settings, dims, device=device, dtype=dtype,
                                  device_cache_bytes=int(args.device_cache_gb * 2**30),
                                  log=lambda m: print("  " + m, flush=True))
            if device == "cuda":
                torch.cuda.synchronize()
            sec = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
            m = res.metrics
            print(f"{block_type}_{i:02d}: {sec:.1f} s, peak {peak:.2f} GB; output MSE {m['rtn']['out']:.4g} (RTN) -> "
                  f"{m['final']['out']:.4g}", flush=True)
            rows.append({"block_type": block_type, "index": i, "seconds_per_block": round(sec, 2),
                         "peak_gb": round(peak, 2), "depth": depth, "rtn_out": m["rtn"]["out"],
                         "final_out": m["final"]["out"]})
    per_type = {}
    for bt in ("double", "single"):
        r = [x for x in rows if x["block_type"] == bt]
        if r:
            per_type[bt] = sum(x["seconds_per_block"] for x in r) / len(r)
    est = (dims.depth * per_type.get("double", per_type.get("single", 0.0))
           + dims.depth_single_blocks * per_type.get("single", per_type.get("double", 0.0))) / 60
    env = {"gpu": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    result = {**env, "date": datetime.date.today().isoformat(),
              "config": {"width": args.width, "height": args.height, "frames": args.frames, "video_tokens":
                         math.prod(grid), "text_tokens": args.txt, "samples": args.samples, "epochs": args.epochs,
                         "density": args.density, "hidden": dims.hidden_size, "blocks": [dims.depth,
                                                                                          dims.depth_single_blocks]},
              "rows": rows, "total_minutes_est": round(est, 1), "peak_gb": max((x["peak_gb"] for x in rows), default=0),
              "targets": {"total_minutes": 60, "peak_gb": 24},
              "note": "capture (sampling the full model over the prompts) is not included; it is a few sampling "
                      "runs of the BF16 model, stopped after the last recorded step"}
    path = os.path.join(args.out, name)
    write_json(path, result)
    print(f"whole model ({dims.depth} double + {dims.depth_single_blocks} single): ~{est:.1f} min; peak "
          f"{result['peak_gb']} GB -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
