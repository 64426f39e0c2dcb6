"""`quantsparse` command line: convert a BF16 HunyuanVideo file, inspect a checkpoint.

Errors are the library's own messages (they name the file, the problem and the fix), printed
without a traceback: a user mistake is not a crash.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from typing import Sequence, TextIO

from .config import BIT_SCHEMES, GROUP_SIZES, QuantSparseConfig

GB = 1e9


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantsparse", description="QuantSparse for HunyuanVideo: "
                                     "W4A8 checkpoints for ComfyUI.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="quantize a BF16 HunyuanVideo .safetensors file (round-to-nearest)",
                          description="Stream a BF16/FP16/FP32 HunyuanVideo file (ComfyUI naming, with or without "
                                      "the model.diffusion_model. prefix) into a QuantSparse checkpoint. Uses about "
                                      "one tensor of memory; the output appears only when complete.")
    conv.add_argument("src", help="source .safetensors (e.g. hunyuan_video_t2v_720p_bf16.safetensors)")
    conv.add_argument("dst", help="output .safetensors (e.g. ComfyUI/models/quantsparse/hunyuan_w4a8.safetensors)")
    conv.add_argument("--bits", choices=sorted(BIT_SCHEMES), default="w4a8",
                      help="scheme of the block attention/MLP Linears (default w4a8)")
    conv.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=0,
                      help="0: one weight scale per output channel (default); 128: one per 128 inputs (w4a8 only)")
    conv.add_argument("--no-rotate", action="store_true", help="skip the Hadamard rotation (for experiments)")
    conv.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    ins = sub.add_parser("inspect", help="validate a QuantSparse checkpoint and print a summary")
    ins.add_argument("file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "convert":
            return _convert(args)
        return _inspect(args.file, sys.stdout)
    except ValueError as e:  # CheckpointError, ConvertError, SafetensorsError, config errors
        print(f"quantsparse {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was written", file=sys.stderr)
        return 130


class _ProgressLine:
    """One updating line on a terminal; a line per 10% in a log file."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.tty = stream.isatty()
        self.start = time.perf_counter()
        self.next_tenth = 1

    def __call__(self, p) -> None:
        frac = p.bytes_done / max(p.bytes_total, 1)
        elapsed = time.perf_counter() - self.start
        line = (f"[{p.tensors_done}/{p.tensors_total}] {p.bytes_done / GB:.2f}/{p.bytes_total / GB:.2f} GB "
                f"({100 * frac:.0f}%) {elapsed:.0f}s  {p.name}")
        if self.tty:
            self.stream.write("\r\x1b[K" + line)
            if p.tensors_done == p.tensors_total:
                self.stream.write("\n")
        elif frac * 10 >= self.next_tenth or p.tensors_done == p.tensors_total:
            self.stream.write(line + "\n")
            while self.next_tenth <= frac * 10:
                self.next_tenth += 1
        self.stream.flush()


def _convert(args) -> int:
    from .convert import convert_file

    config = QuantSparseConfig(bits=args.bits, group_size=args.group_size, rotate=not args.no_rotate)
    result = convert_file(args.src, args.dst, config, overwrite=args.overwrite, progress=_ProgressLine(sys.stderr))
    print(f"wrote {result.dst}")
    print(f"source: {result.src_bytes / GB:.2f} GB  output: {result.dst_bytes / GB:.2f} GB  "
          f"ratio: {result.ratio:.2f}x  ({config.bits}, {result.tensors} tensors, {result.seconds:.0f} s)")
    return 0


def _inspect(path: str, out: TextIO) -> int:
    from .checkpoint import validate_checkpoint

    info = validate_checkpoint(path)
    d, c = info.dims, info.config
    kinds = Counter(layer.kind for layer in info.layers.values())
    params = Counter()
    for layer in info.layers.values():
        params[layer.kind] += layer.in_features * layer.out_features
    quant_names = {f"{p}.{s}" for p in info.layers for s in ("weight", "weight_scale", "smooth")}
    qbytes = sum(e.nbytes for n, e in info.tensors.items() if n in quant_names)
    fbytes = sum(e.nbytes for n, e in info.tensors.items() if n not in quant_names)
    w = out.write
    w(f"{info.path}: valid QuantSparse checkpoint (format {info.format_version}, "
      f"written by {info.created_by.get('tool', '?')} {info.created_by.get('version', '?')})\n")
    w(f"architecture: hunyuan_video  hidden {d.hidden_size}, {d.num_heads} heads, {d.depth} double + "
      f"{d.depth_single_blocks} single blocks, in/out channels {d.in_channels}/{d.out_channels}, "
      f"context {d.context_in_dim}, guidance {'yes' if d.guidance_embed else 'no'}\n")
    w(f"quantization: {c.bits}, group size {c.group_size or 'per channel'}, rotation {'on' if c.rotate else 'off'}, "
      f"weight-only {c.weight_only_bits}-bit\n")
    for kind in sorted(kinds):
        w(f"  {kind:6s} {kinds[kind]:4d} Linears, {params[kind] / 1e9:.2f} B weights\n")
    w(f"size: {info.file_size / GB:.3f} GB ({len(info.tensors)} tensors: {qbytes / GB:.3f} GB quantized Linears, "
      f"{fbytes / GB:.3f} GB BF16)\n")
    if info.calibration:
        w("calibration: " + ", ".join(f"{k}={v}" for k, v in info.calibration.items()) + "\n")
    else:
        w("calibration: none (round-to-nearest)\n")
    if info.sparse_defaults:
        w("sparse defaults: " + ", ".join(f"{k}={v}" for k, v in info.sparse_defaults.items()) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
