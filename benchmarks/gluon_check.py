"""Gluon W8A8/W4A8 GEMMs on the H100: correctness on ragged shapes, speed against Triton and cuBLAS BF16.

1. smoke: each Gluon kernel, and each config of the sweep, runs first on small problems in a
   child process watched for stalls, so a pipeline deadlock or a sticky CUDA error costs that
   kernel's (config's) results instead of the whole run;
2. check: each kernel against the float64 eager reference on fresh random operands, ragged M
   and N (rel. L2 error < 4e-3 on the first and last rows);
3. bench: the GEMM alone at 118,800 tokens on the six HunyuanVideo shapes, Gluon vs the
   Triton kernels (w8a8_gemm_triton; w4a8_gemm_triton with its in-loop unpack and with the
   unpack-to-INT8 path it takes at this size) vs torch BF16 F.linear; median of do_bench;
4. sweep (unless --no-sweep, and only while the time budget lasts): a few tile/stage configs.

Every kernel and config is tried separately; a failure prints its first lines and the run
goes on. Results are written (and rewritten after each phase) as JSON to --out.

    python3 benchmarks/gluon_check.py --out $OUT/gluon.json [--no-sweep] [--budget 270]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bench_ms, environment, rel_err, write_json  # noqa: E402

from comfyui_quantsparse.kernels import pack_int4, w4a8, w8a8  # noqa: E402
from comfyui_quantsparse.kernels import w4a8_gluon, w8a8_gluon  # noqa: E402

CHECK_M = [1, 45, 4099, 30210]
CHECK_KN = [(3072, 3072), (12288, 3072), (3072, 21504), (256, 384)]
BENCH_M = 118800
BENCH_KN = [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072)]
SWEEP_KN = [(3072, 3072), (12288, 3072), (3072, 21504)]
TOL = 4e-3
REF_ROWS = 256  # first and last rows compared with the float64 reference

W8A8_SWEEP = [
    {"a_regs": False},                                   # X from shared memory, one 8-warp partition
    {"a_regs": False, "split": True},                    # ... two 4-warp consumer partitions
    {"stages": 3, "epi_bufs": 4},                        # no wait on the epilogue buffers inside a tile
    {"bk": 64, "stages": 8},                             # same bytes in flight, finer stages
    {"group_m": 16},
    {"bm": 256, "bn": 128, "epi_n": 32, "a_regs": False},
]
W4A8_SWEEP = [
    {"stages": 5, "epi_bufs": 1},
    {"stages": 4, "epi_bufs": 4},
    {"bm": 128, "stages": 6},
    {"group_m": 16},
]


def log(s: str) -> None:
    print(s, flush=True)


def first_lines(e: BaseException, n: int = 4) -> str:
    lines = [ln for ln in "".join(traceback.format_exception_only(type(e), e)).splitlines() if ln.strip()]
    return " | ".join(lines[:n])[:600]


def operands(m, k, n, kind, gen):
    """Random codes over the full ranges, scales of realistic size, a BF16 bias."""
    dev = "cuda"
    x_q = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8, generator=gen)
    x_s = (torch.rand(m, device=dev, generator=gen) + 0.5) / 127
    w_s = (torch.rand(n, device=dev, generator=gen) + 0.5) / 127 / k ** 0.5
    bias = torch.randn(n, device=dev, generator=gen).to(torch.bfloat16)
    if kind == "w8a8":
        w = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8, generator=gen)
    else:
        w = pack_int4(torch.randint(-8, 8, (n, k), device=dev, dtype=torch.int8, generator=gen))
    return x_q, x_s, w, w_s, bias


def check_rows(m: int) -> torch.Tensor:
    return torch.unique(torch.cat([torch.arange(min(REF_ROWS, m)), torch.arange(max(0, m - REF_ROWS), m)])).cuda()


def reference(kind, x_q, x_s, w, w_s, bias, rows):
    if kind == "w8a8":
        return w8a8.w8a8_gemm_reference(x_q[rows], x_s[rows], w, w_s, bias, torch.float64)
    return w4a8.w4a8_gemm_reference(x_q[rows], x_s[rows], w, w_s, bias, torch.float64, 0)


def call(kind, impl, x_q, x_s, w, w_s, bias, out_dtype=torch.bfloat16, config=None):
    if impl == "gluon":
        if kind == "w8a8":
            return w8a8_gluon.w8a8_gemm_gluon(x_q, x_s, w, w_s, bias, out_dtype, config=config)
        return w4a8_gluon.w4a8_gemm_gluon(x_q, x_s, w, w_s, bias, out_dtype, 0, config=config)
    if kind == "w8a8":
        return w8a8.w8a8_gemm_triton(x_q, x_s, w, w_s, bias, out_dtype, config=config)
    return w4a8.w4a8_gemm_triton(x_q, x_s, w, w_s, bias, out_dtype, 0, config=config)


# ----------------------------------------------------------------------------- smoke (child)

SMOKE_PROBLEMS = [(1, 256, 384, True, torch.bfloat16), (45, 384, 256, False, torch.float16),
                  (30208, 384, 3072, True, torch.bfloat16)]  # M=1; odd K-steps, no bias, FP16; ~20 tiles per CTA


def smoke(kind: str, configs) -> None:
    """Each config on small problems that cover the paths where a pipeline bug would hang or
    corrupt memory; one line per config, so the parent knows which one hung. The last problem
    has the divisibility of the benchmark shapes, so its compiled kernel is reused there."""
    gen = torch.Generator("cuda").manual_seed(1)
    for i, cfg in enumerate(configs):
        res = {"config": cfg}
        try:
            worst = 0.0
            for m, k, n, with_bias, out_dtype in (SMOKE_PROBLEMS if i == 0 else SMOKE_PROBLEMS[-1:]):
                x_q, x_s, w, w_s, bias = operands(m, k, n, kind, gen)
                b = bias if with_bias else None
                out = call(kind, "gluon", x_q, x_s, w, w_s, b, out_dtype, config=cfg)
                torch.cuda.synchronize()
                rows = check_rows(m)
                worst = max(worst, rel_err(out[rows], reference(kind, x_q, x_s, w, w_s, b, rows)))
            res.update(ok=worst < TOL, rel_err=worst)
        except Exception as e:  # noqa: BLE001
            res.update(ok=False, error=first_lines(e, 6))
        print("SMOKE " + json.dumps(res), flush=True)


def run_smoke_child(kind: str, configs, stall: float) -> list:
    """Results per config, in order. The config during which the child stalls for `stall`
    seconds (a deadlock) or dies (a sticky CUDA error ends the process) fails, and those after
    it are reported as not run."""
    import select
    import tempfile

    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--smoke", kind, "--smoke-configs",
                              json.dumps(configs)], stdout=subprocess.PIPE, stderr=err, bufsize=0)
        results, pending, failure = [], b"", None
        deadline = time.time() + stall
        while len(results) < len(configs) and failure is None:
            ready, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.time()))
            if not ready:
                failure = f"no result within {stall:.0f} s (deadlock?)"
                break
            chunk = os.read(p.stdout.fileno(), 65536)
            if not chunk:
                p.wait()
                err.seek(0)
                tail = [ln for ln in err.read().decode(errors="replace").splitlines() if ln.strip()][-6:]
                failure = f"process ended (rc {p.returncode}): " + " | ".join(tail)[:800]
                break
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if line.startswith(b"SMOKE "):
                    results.append(json.loads(line[6:]))
                    deadline = time.time() + stall
        if p.poll() is None:
            p.kill()
            p.wait()
    if failure is not None and len(results) < len(configs):
        results.append({"config": configs[len(results)], "ok": False, "error": failure})
    for cfg in configs[len(results):]:
        results.append({"config": cfg, "ok": False, "error": "not run (an earlier config ended the process)"})
    return results


# ----------------------------------------------------------------------------- phases

def check_phase(kinds, gen, result):
    for kind in kinds:
        for k, n in CHECK_KN:
            for m in CHECK_M:
                variants = [(True, torch.bfloat16)] + ([(False, torch.float16)] if (k, n) == (256, 384) else [])
                try:
                    x_q, x_s, w, w_s, bias = operands(m, k, n, kind, gen)
                except Exception as e:  # noqa: BLE001
                    log(f"check {kind} M={m} K={k} N={n}: operands failed: {first_lines(e)}")
                    continue
                rows = check_rows(m)
                for with_bias, out_dtype in variants:
                    b = bias if with_bias else None
                    row = {"kernel": f"gluon_{kind}", "M": m, "K": k, "N": n, "bias": with_bias,
                           "out_dtype": str(out_dtype).replace("torch.", "")}
                    try:
                        out = call(kind, "gluon", x_q, x_s, w, w_s, b, out_dtype)
                        err = rel_err(out[rows], reference(kind, x_q, x_s, w, w_s, b, rows))
                        row.update(rel_err=err, ok=err < TOL)
                        log(f"check gluon_{kind} M={m:6d} K={k:5d} N={n:5d} bias={int(with_bias)} "
                            f"{row['out_dtype']}: rel err {err:.2e} {'ok' if err < TOL else 'FAIL'}")
                    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                        row.update(ok=False, error=first_lines(e))
                        log(f"check gluon_{kind} M={m} K={k} N={n}: ERROR {row['error']}")
                    result["checks"].append(row)
                del x_q, w
        torch.cuda.empty_cache()


def timed(name, fn, ref_rows, ref, m, n, k):
    """Correctness on the reference rows of this very call, then the median time."""
    row = {"kernel": name}
    try:
        out = fn()
        if ref is not None:
            row["rel_err"] = rel_err(out[ref_rows], ref)
        del out
        ms = bench_ms(fn)
        row.update(ms=round(ms, 4), tops=round(2 * m * n * k / ms / 1e9, 1))
    except Exception as e:  # noqa: BLE001
        row["error"] = first_lines(e)
    return row


def bench_phase(kinds, gen, result, deadline, sweeps, out_path):
    m = BENCH_M
    for k, n in BENCH_KN:
        rows_out = []
        x_bf16 = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
        w_bf16 = (torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5).to(torch.bfloat16)
        b_bf16 = torch.randn(n, device="cuda", generator=gen).to(torch.bfloat16)
        r = timed("torch_bf16_linear", lambda: F.linear(x_bf16, w_bf16, b_bf16), None, None, m, n, k)
        rows_out.append(r)
        del x_bf16, w_bf16
        torch.cuda.empty_cache()
        for kind in ("w8a8", "w4a8"):
            x_q, x_s, w, w_s, bias = operands(m, k, n, kind, gen)
            rows = check_rows(m)
            ref = reference(kind, x_q, x_s, w, w_s, bias, rows)
            if kind in kinds:
                rows_out.append(timed(f"gluon_{kind}", lambda: call(kind, "gluon", x_q, x_s, w, w_s, bias),
                                      rows, ref, m, n, k))
            if kind == "w8a8":
                rows_out.append(timed("triton_w8a8", lambda: call(kind, "triton", x_q, x_s, w, w_s, bias),
                                      rows, ref, m, n, k))
            else:
                rows_out.append(timed("triton_w4a8_inloop", lambda: call(kind, "triton", x_q, x_s, w, w_s, bias,
                                                                         config=w4a8.W4A8_CONFIG), rows, ref, m, n, k))
                rows_out.append(timed("triton_w4a8_unpack", lambda: call(kind, "triton", x_q, x_s, w, w_s, bias,
                                                                         config=("unpack",)), rows, ref, m, n, k))
            if kind in kinds and (k, n) in SWEEP_KN:
                for cfg in sweeps.get(kind, []):
                    if time.time() > deadline:
                        log(f"sweep {kind} K={k} N={n} {cfg}: skipped (time budget)")
                        continue
                    r = timed(f"gluon_{kind}", lambda: call(kind, "gluon", x_q, x_s, w, w_s, bias, config=cfg),
                              rows, ref, m, n, k)
                    r.update(K=k, N=n, M=m, config=cfg)
                    if "rel_err" in r and not r["rel_err"] < TOL:
                        r["wrong"] = True
                    result["sweep"].append(r)
                    log(f"sweep {kind} K={k:5d} N={n:5d} {json.dumps(cfg)}: "
                        + (f"{r['ms']:.3f} ms {r['tops']:.0f} TOPS err {r.get('rel_err', float('nan')):.1e}"
                           if "ms" in r else f"ERROR {r['error']}"))
            del x_q, w
            torch.cuda.empty_cache()
        for r in rows_out:
            r.update(K=k, N=n, M=m)
            result["bench"].append(r)
        by = {r["kernel"]: r for r in rows_out}
        cells = []
        for name in ("torch_bf16_linear", "gluon_w8a8", "triton_w8a8", "gluon_w4a8", "triton_w4a8_inloop",
                     "triton_w4a8_unpack"):
            r = by.get(name)
            if r is None:
                continue
            bad = "" if r.get("rel_err", 0.0) < TOL else "!"
            cells.append(f"{name.replace('triton_', 'tr_').replace('torch_bf16_linear', 'bf16')} "
                         + (f"{r['tops']:6.0f}{bad}" if "tops" in r else "   ERR"))
        bf16 = by.get("torch_bf16_linear", {}).get("ms")
        g = by.get("gluon_w8a8", {}).get("ms")
        extra = f"  gluon_w8a8/bf16 x{bf16 / g:.2f}" if bf16 and g else ""
        log(f"M={m} K={k:5d} N={n:5d} TOPS | " + " | ".join(cells) + extra)
        write_json(out_path, result)


def summarize(result):
    best = {}
    for r in result["bench"] + result["sweep"]:
        if "ms" not in r or r.get("wrong") or not r.get("rel_err", 0.0) < TOL or not r["kernel"].startswith("gluon"):
            continue
        key = f"{r['kernel']} K={r['K']} N={r['N']}"
        cfg = r.get("config") or "default"
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = {"ms": r["ms"], "tops": r["tops"], "config": cfg}
    result["best_gluon"] = best
    for key, v in best.items():
        log(f"best {key}: {v['tops']:.0f} TOPS with {v['config']}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gluon.json")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--budget", type=float, default=270.0, help="seconds after which optional work is skipped")
    ap.add_argument("--smoke", choices=["w8a8", "w4a8"], help=argparse.SUPPRESS)
    ap.add_argument("--smoke-configs", default="[null]", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        smoke(args.smoke, json.loads(args.smoke_configs))
        return
    t0 = time.time()
    assert torch.cuda.is_available(), "gluon_check needs a CUDA GPU"
    env = environment()
    log(str(env))
    result = dict(env, configs={"W8A8_GLUON_CONFIG": list(w8a8_gluon.W8A8_GLUON_CONFIG._asdict().items()),
                                "W4A8_GLUON_CONFIG": list(w4a8_gluon.W4A8_GLUON_CONFIG._asdict().items()),
                                "W8A8_CONFIG (triton)": w8a8.W8A8_CONFIG, "W4A8_CONFIG (triton)": w4a8.W4A8_CONFIG},
                  smoke={}, checks=[], bench=[], sweep=[])
    log(f"W8A8_GLUON_CONFIG={w8a8_gluon.W8A8_GLUON_CONFIG}\nW4A8_GLUON_CONFIG={w4a8_gluon.W4A8_GLUON_CONFIG}")

    kinds, sweeps = [], {}
    for kind in ("w8a8", "w4a8"):
        configs = [None] + ([] if args.no_sweep else (W8A8_SWEEP if kind == "w8a8" else W4A8_SWEEP))
        res = run_smoke_child(kind, configs, stall=90)
        result["smoke"][kind] = res
        for r in res:
            log(f"smoke gluon_{kind} {json.dumps(r['config'])}: "
                + ("ok" if r.get("ok") else "FAIL") + f" {r.get('rel_err', '')} {r.get('error', '')}")
        if res[0].get("ok"):
            kinds.append(kind)
        sweeps[kind] = [r["config"] for r in res[1:] if r.get("ok")]
    write_json(args.out, result)

    gen = torch.Generator("cuda").manual_seed(0)
    check_phase(kinds, gen, result)
    fails = [c for c in result["checks"] if not c.get("ok")]
    log(f"checks: {len(result['checks']) - len(fails)}/{len(result['checks'])} passed")
    write_json(args.out, result)

    bench_phase(kinds, gen, result, deadline=t0 + args.budget, sweeps=sweeps, out_path=args.out)
    summarize(result)
    result["elapsed_s"] = round(time.time() - t0, 1)
    write_json(args.out, result)
    log(f"done in {result['elapsed_s']} s -> {args.out}")


if __name__ == "__main__":
    main()
