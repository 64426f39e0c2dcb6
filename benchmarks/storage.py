"""Checkpoint sizes: HunyuanVideo-13B measured on real files; every released Wan computed from the plan.

Sizes depend only on shapes, so random weights give the real figures; but they are measured,
not computed: a 25.6 GB BF16 source of the real shapes is stream-written to disk, converted
by the real converter (``convert_file``, as ``quantsparse convert`` runs it) for each scheme,
and the output files are validated and weighed. Each step runs in its own process, whose
peak RSS is recorded: the converter must fit a 24 GB machine, so it must stream.

    python benchmarks/storage.py                       # full 13B, writes benchmarks/results/storage.json
    python benchmarks/storage.py --dims tiny --out /tmp/s.json   # a 10-second dry run

Needs ~45 GB free under --workdir (source 25.6 GB + the outputs, each deleted after weighing).

Wan 2.1 / 2.2 (every released variant: T2V 1.3B, T2V 14B = each Wan 2.2 T2V A14B expert, each Wan 2.2
I2V A14B expert, I2V 14B, FLF2V 14B, TI2V-5B) is computed, not measured:

    python benchmarks/storage.py --family wan          # writes benchmarks/results/storage_wan.json

The count is exact. The converter and the checkpoint writer write exactly ``checkpoint_plan(dims,
config)`` (``SafetensorsWriter`` refuses a missing, extra or misshapen tensor), laid out by
``safetensors_io.layout`` with no padding between tensors, behind the header ``encode_header`` makes
from that plan and the metadata. So the file size is ``len(header) + sum(plan bytes)`` before a byte is
written; ``tests/test_wan_adapter.py`` checks this equality on converted tiny Wan files, and the record's
``crosscheck`` finds the same computation equal to the HunyuanVideo-13B files weighed for storage.json.
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

from comfyui_quantsparse.quantsparse.checkpoint.format import (
    METADATA_KEY, CheckpointMeta, checkpoint_plan, quantized_layers, validate_checkpoint,
)
from comfyui_quantsparse.quantsparse.core.config import QuantSparseConfig
from comfyui_quantsparse.quantsparse.checkpoint.convert import convert_file
from comfyui_quantsparse.quantsparse.models.hunyuan_video.dims import HunyuanVideoDims
from comfyui_quantsparse.quantsparse.models.hunyuan_video.model import reference_state_shapes
from comfyui_quantsparse.quantsparse.models.hunyuan_video.random_weights import iter_random_state, make_random_state_dict
from comfyui_quantsparse.quantsparse.core.safetensors_io import TensorSpec, encode_header, layout, write_safetensors
from comfyui_quantsparse.quantsparse.models.wan.adapter import WanAdapter
from comfyui_quantsparse.quantsparse.models.wan.dims import WanDims

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


# ---------------------------------------------------------------------------------------------- Wan

BF16_OTHER = "bf16 (biases, norms, embedders, final layer)"  # the bucket name the HunyuanVideo record uses
WAN_EXPERT_TARGET_BYTES = 8.2e9  # one Wan 2.2 A14B expert at W4A8
WAN_PAIR_BUDGET_BYTES = 20e9  # both experts resident, ...
WAN_ACTIVATION_ALLOWANCE_BYTES = 4e9  # ... beside the activations (tests/test_wan_adapter.py says why 4 GB)


def _flf2v_14b() -> WanDims:
    return WanDims(**{**WanDims.i2v_14b().to_dict(), "flf_tokens": 514})


# (key, what users download, dims)
WAN_VARIANTS = [
    ("t2v_1_3b", "wan2.1_t2v_1.3B (bf16 / fp16)", WanDims.t2v_1_3b),
    ("t2v_14b", "wan2.1_t2v_14B; wan2.2_t2v_high_noise_14B and wan2.2_t2v_low_noise_14B (each A14B expert)",
     WanDims.t2v_14b),
    ("i2v_a14b", "wan2.2_i2v_high_noise_14B and wan2.2_i2v_low_noise_14B (each A14B expert)", WanDims.i2v_a14b),
    ("i2v_14b", "wan2.1_i2v_480p_14B and wan2.1_i2v_720p_14B", WanDims.i2v_14b),
    ("flf2v_14b", "wan2.1_flf2v_720p_14B", _flf2v_14b),
    ("ti2v_5b", "wan2.2_ti2v_5B", WanDims.ti2v_5b),
]


def plan_size(dims, bits: str) -> dict:
    """Bytes of the checkpoint ``quantsparse convert`` writes for ``dims`` at ``bits``, from the plan alone."""
    config = QuantSparseConfig(bits=bits)
    plan = checkpoint_plan(dims, config)
    layers = quantized_layers(dims, config)
    owner = {f"{p}.{suffix}": spec.kind for p, spec in layers.items()
             for suffix in ("weight", "weight_scale", "smooth")}
    by_kind: dict[str, int] = defaultdict(int)
    for spec in plan:
        by_kind[owner.get(spec.name, BF16_OTHER)] += spec.nbytes
    data = sum(spec.nbytes for spec in plan)
    header = len(encode_header(layout(plan), {METADATA_KEY: CheckpointMeta(dims, config).to_json()}))
    return {"bytes": header + data, "data_bytes": data, "header_bytes": header, "tensors": len(plan),
            "bytes_by_kind": dict(by_kind),
            "layers_by_kind": {k: sum(1 for v in layers.values() if v.kind == k)
                               for k in sorted({v.kind for v in layers.values()})}}


def wan_record(bits_list: list[str]) -> dict:
    adapter = WanAdapter()
    variants = {}
    for key, files, make in WAN_VARIANTS:
        dims = make()
        shapes = adapter.reference_shapes(dims)
        params = sum(math.prod(s) for s in shapes.values())
        entry = {"variant": adapter.variant(dims), "files": files, "dims": dims.to_dict(), "params": params,
                 "bf16_bytes": 2 * params}
        for bits in bits_list:
            size = plan_size(dims, bits)
            size["ratio_vs_bf16"] = entry["bf16_bytes"] / size["bytes"]
            entry[bits] = size
            entry[f"{bits}_bytes"] = size["bytes"]
        variants[key] = entry
    record: dict = {"variants": variants}
    if "w4a8" in bits_list:
        expert = max(variants["t2v_14b"]["w4a8_bytes"], variants["i2v_a14b"]["w4a8_bytes"])
        pair = {k: 2 * variants[k]["w4a8_bytes"] for k in ("t2v_14b", "i2v_a14b")}
        record["a14b_w4a8"] = {
            "expert_bytes": {k: variants[k]["w4a8_bytes"] for k in ("t2v_14b", "i2v_a14b")},
            "expert_target_bytes": WAN_EXPERT_TARGET_BYTES,
            "expert_meets_target": expert <= WAN_EXPERT_TARGET_BYTES,
            "pair_bytes": pair,
            "pair_budget_bytes": WAN_PAIR_BUDGET_BYTES,
            "activation_allowance_bytes": WAN_ACTIVATION_ALLOWANCE_BYTES,
            "pair_meets_budget": max(pair.values()) <= WAN_PAIR_BUDGET_BYTES - WAN_ACTIVATION_ALLOWANCE_BYTES,
            "pair_bf16_bytes": {k: 2 * variants[k]["bf16_bytes"] for k in ("t2v_14b", "i2v_a14b")},
        }
    return record


def _provenance() -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *[os.path.relpath(a, REPO) if a == __file__ else a
                                                          for a in sys.argv]]),
        "machine": {"cpus": os.cpu_count(), "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                    "platform": platform.platform()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "safetensors": __import__("safetensors").__version__},
    }


def hunyuan_crosscheck(bits_list: list[str]) -> dict:
    """The same computation for HunyuanVideo-13B against the files measured for storage.json."""
    measured = {}
    path = REPO / "benchmarks" / "results" / "storage.json"
    if path.exists():
        saved = json.loads(path.read_text())
        measured = {b: saved.get(f"{b}_bytes") for b in bits_list}
    computed = {b: plan_size(HunyuanVideoDims.full(), b)["bytes"] for b in bits_list}
    return {"what": "HunyuanVideo-13B: this plan-based count against the converted files weighed in storage.json",
            "computed_bytes": computed, "measured_bytes": measured,
            "equal": bool(measured) and all(computed[b] == measured.get(b) for b in bits_list)}


def main_wan(args) -> None:
    record = {
        "family": "wan",
        **_provenance(),
        "method": ("computed from checkpoint_plan(dims, QuantSparseConfig(bits)) and the header encode_header makes "
                   "from it and the metadata convert writes (round-to-nearest, no calibration record). Exact: the "
                   "checkpoint writer writes exactly the plan's tensors, back to back behind that header, so "
                   "bytes = header_bytes + data_bytes is the size of the file `quantsparse convert` writes "
                   "(tests/test_wan_adapter.py checks the equality on converted tiny Wan files). Sizes depend only "
                   "on shapes, so no weights are needed. A calibrated checkpoint's header is longer by its "
                   "calibration record."),
        "bf16_bytes_means": "every tensor of ComfyUI's WanModel in BF16: the diffusion-model file users download "
                            "in bf16 / fp16",
        "bits": list(args.bits),
    }
    record.update(wan_record(list(args.bits)))
    record["crosscheck"] = hunyuan_crosscheck(list(args.bits))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    for key, v in record["variants"].items():
        sizes = ", ".join(f"{b} {v[b]['bytes'] / 1e9:.3f} GB ({v[b]['ratio_vs_bf16']:.2f}x)" for b in args.bits)
        print(f"{v['variant']:<42} BF16 {v['bf16_bytes'] / 1e9:7.3f} GB  {sizes}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, *rest = sys.argv[2:]
        out = child_generate(*rest) if kind == "generate" else child_convert(*rest)
        print(json.dumps(out))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["hunyuan_video", "wan"], default="hunyuan_video",
                    help="hunyuan_video: measured on real files; wan: every released variant, from the plan")
    ap.add_argument("--dims", choices=["full", "tiny"], default="full")
    ap.add_argument("--workdir", default="/work/tmp_storage", help="scratch folder for the big files (deleted)")
    ap.add_argument("--out", default=None,
                    help="default benchmarks/results/storage.json (HunyuanVideo) or storage_wan.json (Wan)")
    ap.add_argument("--bits", nargs="+", default=["w4a8", "w8a8"])
    args = ap.parse_args()
    if args.out is None:
        name = "storage_wan.json" if args.family == "wan" else "storage.json"
        args.out = str(REPO / "benchmarks" / "results" / name)
    if args.family == "wan":
        main_wan(args)
        return

    dims = getattr(HunyuanVideoDims, args.dims)()
    work = Path(args.workdir) / f"storage_{args.dims}_{os.getpid()}"
    work.mkdir(parents=True)
    src = work / "hunyuan_video_random_bf16.safetensors"
    record: dict = {
        "config": dims.to_dict(), "dims_name": args.dims,
        **_provenance(),
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
