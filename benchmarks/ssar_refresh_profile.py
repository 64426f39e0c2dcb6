"""What one SSAR refresh costs outside attention: ``SSARState.refresh`` per block, timed and profiled by op.

A refresh step at 118,800 tokens cost 7.5 s more than a dense step in the end-to-end run (issue 6), more
than its extra sparse pass explains; this isolates the cache update (residual, second-order term, the two
low-rank FP8 packs) at HunyuanVideo's shapes (24 heads x 128, one CFG branch) with random outputs, the
second refresh of a key (the order-2 path) timed with CUDA events after warm-up.

    python benchmarks/ssar_refresh_profile.py --out benchmarks/results/ssar_refresh_h100.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_json  # noqa: E402

from comfyui_quantsparse.quantsparse.sparse.config import SparseConfig  # noqa: E402
from comfyui_quantsparse.quantsparse.sparse.ssar import SSARState  # noqa: E402

TXT = 256


def time_refresh(tokens: int, reps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (1, 24, TXT + tokens, 128)
    outs = [(torch.randn(shape, device=dev, dtype=torch.bfloat16, generator=g),
             torch.randn(shape, device=dev, dtype=torch.bfloat16, generator=g)) for _ in range(2)]
    st = SSARState(SparseConfig(), total_steps=50)
    for i in range(3):  # first refresh (order 1 path), then order-2 refreshes warm
        st.refresh("k", *outs[i % 2], txt_len=TXT)
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        st.refresh("k", *outs[i % 2], txt_len=TXT)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        st.refresh("k", *outs[0], txt_len=TXT)
        torch.cuda.synchronize()
    rows = sorted(((e.key, e.count, e.self_device_time_total / 1e3) for e in prof.key_averages()
                   if e.self_device_time_total > 0), key=lambda r: -r[2])
    return {"video_tokens": tokens, "ms_median": sorted(times)[len(times) // 2], "ms_all": times,
            "blocks_60_s": 60 * sorted(times)[len(times) // 2] / 1e3,
            "top_ops": [{"name": n[:120], "calls": c, "device_ms": round(ms, 3)} for n, c, ms in rows[:20]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/ssar_refresh_h100.json")
    ap.add_argument("--tokens", type=int, nargs="+", default=[30210, 118800])
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for n in a.tokens:
        r = time_refresh(n, a.reps)
        rows.append(r)
        print(f"{n} tokens: {r['ms_median']:.2f} ms per block refresh ({r['blocks_60_s']:.2f} s per step of 60 blocks)")
        for op in r["top_ops"][:12]:
            print(f"   {op['device_ms']:9.3f} ms  x{op['calls']:<4} {op['name']}")
    write_json(a.out, {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
