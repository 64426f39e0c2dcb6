"""Combine the Wan end-to-end runs (bench_e2e.py --model wan, one per regime) into wan_e2e_<gpu>.json.

    python benchmarks/wan_e2e_table.py benchmarks/results/e2e_wan_50step_cfg_h200.json \
        benchmarks/results/e2e_wan_4step_cfg1_h200.json --out benchmarks/results/wan_e2e_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_json  # noqa: E402

ROW_FIELDS = ("video_tokens", "latent", "steps", "cfg", "batch", "dense_s", "quantsparse_s", "speedup",
              "quantsparse_peak_gb", "dense_peak_gb", "cache_gb", "qs_step_s", "dense_step_s", "schedule_counts",
              "schedules", "run_summary")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    runs = [json.load(open(p)) for p in a.runs]
    first = runs[0]
    out = {k: first.get(k) for k in ("gpu", "torch", "triton", "date", "comfyui_version", "model", "dims",
                                     "sparse_config")}
    out["checkpoint_gb"] = round(first["checkpoint_bytes"] / 1e9, 3)
    out["sources"] = [os.path.basename(p) for p in a.runs]
    out["method"] = first.get("method")
    out["rows"] = []
    for run in runs:
        for r in run["rows"]:
            row = {k: r.get(k) for k in ROW_FIELDS}
            row["steps"], row["cfg"] = run["steps"], run["batch"] == 2
            out["rows"].append(row)
    write_json(a.out, out)
    for r in out["rows"]:
        print(f"{r['video_tokens']:>6} {r['steps']:>2} steps cfg={r['cfg']!s:5} dense {r['dense_s']:.1f} s  "
              f"QuantSparse {r['quantsparse_s']:.1f} s  x{r['speedup']:.2f}  peak {r['quantsparse_peak_gb']} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
