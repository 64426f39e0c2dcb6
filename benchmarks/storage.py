"""Checkpoint size of the full HunyuanVideo-13B configuration, measured on real files.

Sizes depend only on shapes, so random weights give the real figures; but they are measured,
not computed: a 25.6 GB BF16 source of the real shapes is stream-written to disk, converted
by the real converter (``convert_file``, as ``quantsparse convert`` runs it) for each scheme,
and the output files are validated and weighed. Each step runs in its own process, whose
peak RSS is recorded: the converter must fit a 24 GB machine, so it must stream.

    python benchmarks/storage.py                       # full 13B, writes benchmarks/results/storage.json
    python benchmarks/storage.py --dims tiny --out /tmp/s.json   # a 10-second dry run

Needs ~45 GB free under --workdir (source 25.6 GB + the outputs, each deleted after weighing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from comfyui_quantsparse.quantsparse.checkpoint.format import validate_checkpoint
from comfyui_quantsparse.quantsparse.core.config import QuantSparseConfig
from comfyui_quantsparse.quantsparse.checkpoint.convert import convert_file
from comfyui_quantsparse.quantsparse.models.hunyuan_video.dims import HunyuanVideoDims
from comfyui_quantsparse.quantsparse.models.hunyuan_video.model import reference_state_shapes
from comfyui_quantsparse.quantsparse.models.hunyuan_video.random_weights import iter_random_state, make_random_state_dict
from comfyui_quantsparse.quantsparse.core.safetensors_io import TensorSpec, write_safetensors

REPO = Path(__file__).resolve().parents[1]
TARGET_W4A8_BYTES = 6.6e9
SEED = 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def stream_random_state(dims: HunyuanVideoDims, seed: int):
    """make_random_state_dict's tensors one at a time (same generator sequence, same values)."""
    return iter_random_state(dims, seed, torch.bfloat16)


def _progress_printer(label: str):
    state = {"next": 0.0, "t0": time.perf_counter()}

    def show(done: int, total: int, name: str) -> None:
        if done / max(total, 1) >= state["next"] or done == total:
            print(f"  {label}: {done / 1e9:6.2f}/{total / 1e9:.2f} GB  {time.perf_counter() - state['t0']:6.0f}s  "
                  f"rss peak {peak_rss_bytes() / 1e9:.2f} GB  {name}", file=sys.stderr, flush=True)
            state["next"] += 0.05
    return show


def child_generate(dims_name: str, dst: str) -> dict:
    dims = getattr(HunyuanVideoDims, dims_name)()
    if dims_name == "tiny":  # the streamed values are make_random_state_dict's, checked where it fits in memory
        ref = make_random_state_dict(dims, SEED)
        for key, value in stream_random_state(dims, SEED):
            assert torch.equal(ref[key], value), key
    specs = [TensorSpec(k, torch.bfloat16, s) for k, s in reference_state_shapes(dims).items()]
    t0 = time.perf_counter()
    show = _progress_printer("generate")
    size = write_safetensors(dst, stream_random_state(dims, SEED), specs=specs,
                             progress=lambda d, t, n: show(d, t, n))
    return {"bytes": size, "seconds": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes(),
            "params": sum(math.prod(s.shape) for s in specs), "tensors": len(specs)}


def child_convert(src: str, dst: str, bits: str) -> dict:
    show = _progress_printer(f"convert {bits}")
    result = convert_file(src, dst, QuantSparseConfig(bits=bits),
                          progress=lambda p: show(p.bytes_done, p.bytes_total, p.name))
    rss = peak_rss_bytes()
    info = validate_checkpoint(dst)
    by_kind: dict[str, int] = defaultdict(int)
    owner = {}
    for prefix, layer in info.layers.items():
        for suffix in ("weight", "weight_scale", "smooth"):
            owner[f"{prefix}.{suffix}"] = layer.kind
    for name, entry in info.tensors.items():
        by_kind[owner.get(name, "bf16 (biases, norms, embedders, final layer)")] += entry.nbytes
    return {"bytes": result.dst_bytes, "seconds": result.seconds, "peak_rss_bytes": rss,
            "ratio": result.ratio, "tensors": result.tensors, "bytes_by_kind": dict(by_kind),
            "layers_by_kind": {k: sum(1 for v in info.layers.values() if v.kind == k)
                               for k in sorted({v.kind for v in info.layers.values()})}}


def run_child(*args: str) -> dict:
    """One step in a fresh process, so that its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--child", *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"step failed ({proc.returncode}): {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, *rest = sys.argv[2:]
        out = child_generate(*rest) if kind == "generate" else child_convert(*rest)
        print(json.dumps(out))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", choices=["full", "tiny"], default="full")
    ap.add_argument("--workdir", default="/work/tmp_storage", help="scratch folder for the big files (deleted)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "storage.json"))
    ap.add_argument("--bits", nargs="+", default=["w4a8", "w8a8"])
    args = ap.parse_args()

    dims = getattr(HunyuanVideoDims, args.dims)()
    work = Path(args.workdir) / f"storage_{args.dims}_{os.getpid()}"
    work.mkdir(parents=True)
    src = work / "hunyuan_video_random_bf16.safetensors"
    record: dict = {
        "config": dims.to_dict(), "dims_name": args.dims,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *[os.path.relpath(a, REPO) if a == __file__ else a
                                                          for a in sys.argv]]),
        "machine": {"cpus": os.cpu_count(), "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                    "platform": platform.platform()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "safetensors": __import__("safetensors").__version__},
        "weights": f"random (make_random_state_dict distribution, seed {SEED}); sizes depend only on shapes",
    }
    try:
        print(f"generating the BF16 source in {src}", file=sys.stderr)
        gen = run_child("generate", args.dims, str(src))
        record["bf16_bytes"] = gen["bytes"]
        record["params"] = gen["params"]
        record["steps"] = {"generate": gen}
        for bits in args.bits:
            dst = work / f"hunyuan_video_{bits}.safetensors"
            print(f"converting to {bits}", file=sys.stderr)
            res = run_child("convert", str(src), str(dst), bits)
            dst.unlink()
            record[f"{bits}_bytes"] = res["bytes"]
            record["steps"][bits] = res
            print(f"  {bits}: {res['bytes'] / 1e9:.3f} GB ({res['ratio']:.2f}x), {res['seconds']:.0f} s, "
                  f"peak RSS {res['peak_rss_bytes'] / 1e9:.2f} GB", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if "w4a8_bytes" in record:
        record["w4a8_target_bytes"] = TARGET_W4A8_BYTES
        record["w4a8_meets_target"] = record["w4a8_bytes"] <= TARGET_W4A8_BYTES
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k.endswith("_bytes")}, indent=2))


if __name__ == "__main__":
    main()
