"""Whole quantized Linear (activation quantization + integer GEMM) against torch BF16 F.linear (cuBLAS).

HunyuanVideo's block shapes at 30,210 and 118,800 tokens, W8A8 and W4A8, in one run on one GPU.
Each configuration is first checked against the eager reference on fresh random inputs;
then timed with CUDA events (median after warm-up). ``--sweep`` also times tile configurations
of each kernel and reports the best, which is how the defaults in kernels/ were chosen.

    python benchmarks/bench_linear.py --out benchmarks/results/linear_h100.json [--sweep]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bench_ms, environment, rel_err, write_json  # noqa: E402

from comfyui_quantsparse import kernels  # noqa: E402
from comfyui_quantsparse.kernels import act_quant_triton, w4a8, w8a8  # noqa: E402
from comfyui_quantsparse.quantsparse.core.qlinear import nontrivial_smooth, quantized_linear  # noqa: E402
from comfyui_quantsparse.quantsparse.core.quantizer import quantize_weight  # noqa: E402

SHAPES = [(3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072)]  # (K, N)
TOKENS = [30210, 118800]
# Wan 14B: self-attention q, k, v read one input (one activation quantization, one GEMM on the concatenated
# weights: N 15360), o and cross-attention q / o 5120 x 5120, the FFN 5120 -> 13824 -> 5120.
WAN_SHAPES = [(5120, 15360), (5120, 5120), (5120, 13824), (13824, 5120)]
WAN_TOKENS = [32760, 75600]
CHECK_ROWS = 4099  # rows checked against the float64 reference (first and last rows of the batch)

W8A8_SWEEP = [
    ("ptr", 128, 256, 128, 8, 8, 3), ("ptr", 128, 256, 128, 8, 8, 4), ("ptr", 256, 128, 128, 8, 8, 3),
    ("ptr", 128, 128, 128, 8, 4, 4), ("ptr", 128, 256, 64, 8, 8, 4), ("tma", 128, 256, 128, 8, 8, 3),
    ("tma", 128, 256, 128, 8, 8, 4), ("tma", 256, 128, 128, 8, 8, 3), ("tma", 128, 128, 128, 8, 4, 5),
    ("tma", 256, 256, 64, 8, 8, 3),
]
W4A8_SWEEP = [("ptr", 256, 128, 8, 8, 3), ("ptr", 128, 128, 8, 8, 3), ("ptr", 128, 128, 8, 4, 4), ("unpack",)]
ACT_QUANT_SWEEP = [("tma", 64, 4, 4, 2), ("tma", 64, 4, 6, 2), ("tma", 64, 4, 4, 3), ("tma", 128, 4, 3, 2),
                   ("tma", 128, 8, 2, 2), ("tma", 128, 8, 3, 3), ("tma", 64, 8, 4, 2), ("tma", 256, 8, 1, 2)]
SWEEP_SHAPES = [(3072, 3072), (12288, 3072), (3072, 21504)]


def make_layer(k, n, kind, gen):
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    b = torch.randn(n, generator=gen) * 0.1
    qw = quantize_weight(w, kind)
    dev = lambda t: None if t is None else t.cuda()  # noqa: E731
    return w.to("cuda", torch.bfloat16), b.to("cuda", torch.bfloat16), (dev(qw.weight), dev(qw.scale), dev(qw.smooth))


def activations(m, k, gen):
    x = torch.randn(m, k, generator=gen)
    x[:, torch.randint(0, k, (k // 64,), generator=gen)] *= 20  # outlier channels
    return x.to("cuda", torch.bfloat16)


def check_layer(x, w_bf16, b, qt, kind):
    """Kernel path vs the float64 reference path on the first and last rows; also the quantization error vs BF16."""
    wq, ws, sm = qt
    out = quantized_linear(x, wq, ws, sm, b, kind=kind, group_size=0, rotate=True)
    rows = torch.cat([torch.arange(CHECK_ROWS // 2), torch.arange(x.shape[0] - CHECK_ROWS // 2, x.shape[0])]).cuda()
    xs = x[rows]
    os.environ["QUANTSPARSE_KERNELS"] = "reference"
    try:
        ref = quantized_linear(xs, wq, ws, sm, b, kind=kind, group_size=0, rotate=True)
    finally:
        os.environ["QUANTSPARSE_KERNELS"] = "auto"
    kernel_vs_ref = rel_err(out[rows], ref)
    quant_vs_bf16 = rel_err(out[rows], F.linear(xs, w_bf16, b))
    return kernel_vs_ref, quant_vs_bf16


def sweep(gen, log, what):
    best = {}
    for kind, cfgs in (() if what == "act" else (("w8a8", W8A8_SWEEP), ("w4a8", W4A8_SWEEP))):
        for k, n in SWEEP_SHAPES:
            m = 118800
            x = activations(m, k, gen)
            _, b, (wq, ws, sm) = make_layer(k, n, kind, gen)
            x_q, x_s = act_quant_triton(x, sm)
            ref = None
            for cfg in cfgs:
                try:
                    if kind == "w8a8":
                        fn = lambda: w8a8.w8a8_gemm_triton(x_q, x_s, wq, ws, b, torch.bfloat16, config=cfg)  # noqa: E731
                    else:
                        fn = lambda: w4a8.w4a8_gemm_triton(x_q, x_s, wq, ws, b, torch.bfloat16, 0, config=cfg)  # noqa: E731
                    out = fn()[:4096]
                    ref = out if ref is None else ref
                    err = rel_err(out, ref)
                    ms = bench_ms(fn, 200) if err < 1e-3 else float("nan")
                except Exception as e:  # noqa: BLE001 - a config that does not compile is a result too
                    ms, err = float("nan"), str(e).splitlines()[0][:80]
                tops = 2 * m * n * k / ms / 1e9 if ms == ms else 0
                log(f"sweep {kind} K={k} N={n} {cfg}: {ms:.3f} ms {tops:.0f} TOPS err={err}")
                best.setdefault((kind, k, n), []).append((ms if ms == ms else 1e9, cfg))
            del x, x_q
    for key, rows in best.items():
        log(f"best {key}: {min(rows)}")
    aq = []
    for k in (3072, 12288, 15360):
        x = activations(118800, k, gen)
        sm = None  # round-to-nearest layers: no smoothing, the direct tensor-core path
        ref_q, ref_s = act_quant_triton(x, sm)
        for cfg in ACT_QUANT_SWEEP:
            q, s = act_quant_triton(x, sm, config=cfg)
            same = float((q != ref_q).float().mean())
            ms = bench_ms(lambda: act_quant_triton(x, sm, config=cfg))
            gbs = x.numel() * 3 / ms / 1e6
            log(f"act_quant K={k} {cfg}: {ms:.3f} ms  {gbs:.0f} GB/s (bf16 read + int8 write)  mismatch {same:.1e}")
            aq.append({"K": k, "config": cfg, "ms": ms, "GBps": gbs})
        smooth = torch.rand(k, device="cuda") + 0.5
        for cfg in ACT_QUANT_SWEEP[:2]:  # calibrated layers (smoothing) and no rotation, for the record
            ms = bench_ms(lambda: act_quant_triton(x, smooth, config=cfg))
            ms0 = bench_ms(lambda: act_quant_triton(x, None, rotate=False, config=cfg))
            log(f"act_quant K={k} {cfg} smoothing: {ms:.3f} ms  {x.numel() * 3 / ms / 1e6:.0f} GB/s; "
                f"no rotation: {ms0:.3f} ms  {x.numel() * 3 / ms0 / 1e6:.0f} GB/s")
        del x, ref_q
    return aq


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/linear_h100.json")
    ap.add_argument("--sweep", choices=["all", "act"], help="time tile configurations first")
    ap.add_argument("--tokens", type=int, nargs="*", default=None)
    ap.add_argument("--model", choices=["hunyuan", "wan"], default="hunyuan", help="whose block shapes")
    ap.add_argument("--kinds", nargs="+", default=["w8a8", "w4a8"], choices=["w8a8", "w4a8"])
    args = ap.parse_args(argv)
    shapes = WAN_SHAPES if args.model == "wan" else SHAPES
    args.tokens = args.tokens or (WAN_TOKENS if args.model == "wan" else TOKENS)
    assert torch.cuda.is_available(), "bench_linear needs a CUDA GPU"
    log = lambda s: print(s, flush=True)  # noqa: E731
    env = environment()
    log(str(env))
    log(f"W8A8_CONFIG={w8a8.W8A8_CONFIG} W4A8_CONFIG={w4a8.W4A8_CONFIG}")
    gen = torch.Generator().manual_seed(0)
    result = dict(env, model=args.model, rows=[])
    if args.sweep:
        result["act_quant"] = sweep(gen, log, args.sweep)
    for m in args.tokens:
        for k, n in shapes:
            x = activations(m, k, gen)
            for kind in args.kinds:
                w_bf16, b, qt = make_layer(k, n, kind, gen)
                kernel_err, quant_err = check_layer(x, w_bf16, b, qt, kind)
                assert kernel_err < 1e-2, f"{kind} K={k} N={n} M={m}: kernel vs reference rel err {kernel_err}"
                wq, ws, sm = qt
                bf16_ms = bench_ms(lambda: F.linear(x, w_bf16, b))
                quant_ms = bench_ms(lambda: quantized_linear(x, wq, ws, sm, b, kind=kind, group_size=0, rotate=True))
                aq_ms = bench_ms(lambda: kernels.act_quant(x, nontrivial_smooth(sm)))
                row = {"bits": kind, "K": k, "N": n, "M": m, "bf16_ms": round(bf16_ms, 4), "quant_ms": round(quant_ms, 4),
                       "speedup": round(bf16_ms / quant_ms, 3), "act_quant_ms": round(aq_ms, 4),
                       "bf16_tflops": round(2 * m * n * k / bf16_ms / 1e9, 1),
                       "gemm_tops": round(2 * m * n * k / (quant_ms - aq_ms) / 1e9, 1),
                       "kernel_vs_reference": kernel_err, "quant_vs_bf16": quant_err}
                row["gemm"] = "gluon" if kernels.use_gluon(x, n, torch.bfloat16) else "triton"
                result["rows"].append(row)
                log(f"{kind} M={m:6d} K={k:5d} N={n:5d}  bf16 {bf16_ms:7.3f} ms  quant {quant_ms:7.3f} ms "
                    f"(act {aq_ms:.3f})  x{bf16_ms / quant_ms:.2f}  err {kernel_err:.1e}/{quant_err:.3f}")
                del w_bf16, qt
            del x
            torch.cuda.empty_cache()
    sp = [r["speedup"] for r in result["rows"]]
    if sp:
        log(f"speedup min {min(sp):.2f} max {max(sp):.2f}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
