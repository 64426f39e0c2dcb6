"""The fused activation kernels against what they replace, at HunyuanVideo's shapes (30,466 rows):

- LayerNorm + modulation + quantization (K = 3072) against ComfyUI's LayerNorm, addcmul and our act_quant;
- GELU + concatenation + quantization (attention 3072 + MLP 12288, the MLP a strided view of linear1's
  output) against GELU, cat and act_quant; and GELU + quantization of fc1's output (K = 12288).

Checked first (codes within one step of the unfused path's), then timed; ``--sweep`` tries launch configs.

    python benchmarks/bench_act_fused.py --out benchmarks/results/act_fused_h100.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bench_ms, environment, write_json  # noqa: E402

from comfyui_quantsparse.kernels import act_quant  # noqa: E402
from comfyui_quantsparse.kernels.act_quant_fused import (  # noqa: E402
    act_quant_gelu_cat_triton, act_quant_ln_mod_triton,
)

ROWS, C, MLP = 30466, 3072, 12288
CONFIGS = [(64, 4, 4), (64, 8, 2), (32, 4, 8), (128, 8, 2), (16, 4, 8)]


def codes_close(a, b) -> float:
    return float(((a[0].int() - b[0].int()).abs() > 1).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(ROWS, C, device=dev, dtype=dt) * 2 + 0.5
    mod = torch.randn(1, 1, 6 * C, device=dev, dtype=dt)
    shift, scale = mod[:, 0, :C], mod[:, 0, C:2 * C]
    lin1 = torch.randn(ROWS, 3 * C + MLP, device=dev, dtype=dt)
    attn, mlp = torch.randn(ROWS, C, device=dev, dtype=dt), lin1[:, 3 * C:]
    fc1 = torch.randn(ROWS, MLP, device=dev, dtype=dt)

    def ln_unfused():
        y = torch.addcmul(shift, F.layer_norm(x, (C,), eps=1e-6), 1 + scale)
        return act_quant(y, None, 127, True)

    def cat_unfused():
        return act_quant(torch.cat((attn, F.gelu(mlp, approximate="tanh")), 1), None, 127, True)

    def fc2_unfused():
        return act_quant(F.gelu(fc1, approximate="tanh"), None, 127, True)

    cases = {
        "ln_mod_3072": (ln_unfused, lambda cfg=None: act_quant_ln_mod_triton(x, shift, scale, rows_per_batch=ROWS,
                                                                              config=cfg)),
        "gelu_cat_15360": (cat_unfused, lambda cfg=None: act_quant_gelu_cat_triton(attn, mlp, config=cfg)),
        "gelu_12288": (fc2_unfused, lambda cfg=None: act_quant_gelu_cat_triton(fc1[:, :0], fc1, config=cfg)),
    }
    rows = []
    for name, (unfused, fused) in cases.items():
        row = {"case": name, "rows": ROWS, "codes_off_by_more_than_one": codes_close(fused(), unfused()),
               "unfused_ms": bench_ms(unfused), "fused_ms": bench_ms(fused)}
        if args.sweep:
            row["sweep"] = []
            for c in CONFIGS:
                try:
                    ms = bench_ms(lambda c=c: fused(c))
                except Exception as e:  # noqa: BLE001 - a config that does not fit is reported, not fatal
                    ms = f"{type(e).__name__}: {str(e)[:120]}"
                row["sweep"].append({"config": list(c), "ms": ms})
        row["speedup"] = row["unfused_ms"] / row["fused_ms"]
        print(row, flush=True)
        rows.append(row)
    write_json(args.out, dict(environment(), rows=rows))


if __name__ == "__main__":
    main()
