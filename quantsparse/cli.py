"""`quantsparse` command line: convert or calibrate a BF16 HunyuanVideo file, inspect a checkpoint.

Every input and output is checked before any work (``core.paths``); errors are the library's own messages
(they name the file, the problem and the fix), printed as one line without a traceback: a user mistake
is not a crash. Exit status: 0 done, 2 refused (nothing written), 1 the system failed (disk, I/O),
130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from typing import Sequence, TextIO

from .cli_common import OneLineParser, run_command
from .core.config import BIT_SCHEMES, GROUP_SIZES, QuantSparseConfig

GB = 1e9


def _build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="quantsparse", description="QuantSparse for video diffusion transformers (Wan 2.x, "
                                                           "HunyuanVideo): W4A8 checkpoints for ComfyUI.")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="quantize a model .safetensors file (round-to-nearest)",
                          description="Stream a model file (bf16 / fp16 / fp32, fp8_e4m3fn, fp8_scaled or ComfyUI int8; "
                                      "ComfyUI naming, with or without "
                                      "the model.diffusion_model. prefix) into a QuantSparse checkpoint. Uses about "
                                      "one tensor of memory; the output appears only when complete.")
    conv.add_argument("src", help="source .safetensors (e.g. hunyuan_video_t2v_720p_bf16.safetensors, "
                                  "wan2.1_t2v_14B_bf16.safetensors)")
    conv.add_argument("dst", help="output .safetensors (e.g. ComfyUI/models/quantsparse/wan2.1_t2v_14B_w4a8.safetensors)")
    conv.add_argument("--bits", choices=sorted(BIT_SCHEMES), default="w4a8",
                      help="scheme of the block attention/MLP Linears (default w4a8)")
    conv.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=0,
                      help="0: one weight scale per output channel (default); 128: one per 128 inputs (w4a8 only)")
    conv.add_argument("--no-rotate", action="store_true", help="skip the Hadamard rotation (for experiments)")
    conv.add_argument("--overwrite", action="store_true",
                      help="replace DST if it is an existing QuantSparse checkpoint (never a model, never SRC)")
    sub.add_parser("demo", add_help=False,
                   help="the main job on the bundled proxy model: calibrate at W4A8, sample dense and with QuantSparse, "
                        "print PSNR/SSIM, storage, density and time, write a side-by-side preview (see demo --help)")
    ins = sub.add_parser("inspect", help="validate a QuantSparse checkpoint and print its provenance and settings")
    ins.add_argument("file")
    ins.add_argument("--blocks", action="store_true", help="also print each block's calibration losses")
    _add_calibrate(sub)
    return parser


def _add_calibrate(sub) -> None:
    from .calib.settings import CalibSettings

    d = CalibSettings()
    cal = sub.add_parser(
        "calibrate", help="MSAD-calibrate a BF16 HunyuanVideo file into a QuantSparse checkpoint",
        description="Sample the full model over the prompts, record its inputs at steps spread over the schedule, "
                    "then calibrate block by block (smoothing and clipping, MSAD loss) and write the checkpoint. "
                    "Progress is kept in a work folder: run the same command again to continue after a stop.")
    cal.add_argument("src", help="BF16 HunyuanVideo .safetensors (ComfyUI naming)")
    cal.add_argument("dst", help="output .safetensors")
    src = cal.add_mutually_exclusive_group(required=True)
    src.add_argument("--conditioning", help="prompt embeddings .safetensors: context.N [Ltxt, 4096], pooled.N [768], "
                                            "optional mask.N [Ltxt] (e.g. saved from ComfyUI's text encoders)")
    src.add_argument("--random-prompts", type=int, metavar="N",
                     help="N random prompt embeddings (timing and smoke tests only: not for a model you will use)")
    cal.add_argument("--width", type=int, default=848)
    cal.add_argument("--height", type=int, default=480)
    cal.add_argument("--frames", type=int, default=33)
    cal.add_argument("--samples", type=int, default=20, help="calibration samples (default 20, the paper's)")
    cal.add_argument("--steps", type=int, default=20, help="sampling steps of the capture runs (default 20)")
    cal.add_argument("--guidance", type=float, default=None,
                     help="embedded guidance (default: the model's, 6.0 for HunyuanVideo)")
    cal.add_argument("--bits", choices=sorted(BIT_SCHEMES), default=d.bits)
    cal.add_argument("--density", type=float, default=d.density,
                     help=f"default sampling density written into the checkpoint (default {d.density})")
    cal.add_argument("--sparse-calibration", action="store_true",
                     help="calibrate the blocks under the sparse mask at --density (only for sampling without SSAR: "
                          "with SSAR, the default dense calibration is far better)")
    cal.add_argument("--epochs", type=int, default=d.epochs)
    cal.add_argument("--lambda-global", type=float, default=None, help="default: normalised to the output loss")
    cal.add_argument("--lambda-local", type=float, default=None, help="default: normalised to the output loss")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (default)")
    cal.add_argument("--work-dir", help="work folder (default: DST + '.work'); keeps the captured samples and the "
                                        "finished blocks, so running the same command again continues")
    cal.add_argument("--restart", action="store_true",
                     help="discard the work folder's finished blocks (needed when they were made with other settings)")
    cal.add_argument("--overwrite", action="store_true",
                     help="replace DST if it is an existing QuantSparse checkpoint (never a model, never SRC)")


def version_line() -> str:
    from .checkpoint.format import FORMAT_VERSION
    from .core.version import __version__

    return f"quantsparse {__version__} (comfyui-quantsparse; checkpoint format {FORMAT_VERSION})"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # its own parser (quantsparse demo --help)
        from .demo import main as demo_main
        return demo_main(argv[1:])
    args = _build_parser().parse_args(argv)
    commands = {"convert": lambda: _convert(args), "calibrate": lambda: _calibrate(args),
                "inspect": lambda: _inspect(args.file, sys.stdout, blocks=args.blocks)}
    hint = " (run the same command again to continue)" if args.command == "calibrate" else ""
    return run_command(f"quantsparse {args.command}", commands[args.command], interrupt_hint=hint)


def resolve_device(name: str) -> str:
    """``--device`` checked against this torch: a CUDA device on a CPU-only build is refused, not a crash."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type != "cuda":
        raise ValueError(f"--device {name!r}: calibration runs on cpu or cuda; use one of those or auto")
    if not torch.cuda.is_available():
        why = "is a CPU-only build" if torch.version.cuda is None else "sees no CUDA GPU"
        raise ValueError(f"--device {name}: this torch ({torch.__version__}) {why}; use --device cpu (slow), or "
                         "install a CUDA build of torch on a machine with an NVIDIA GPU")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s); use cuda:0 .. "
                         f"cuda:{torch.cuda.device_count() - 1}")
    return str(dev)


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


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _convert(args) -> int:
    from .checkpoint.convert import convert_file

    config = QuantSparseConfig(bits=args.bits, group_size=args.group_size, rotate=not args.no_rotate)
    result = convert_file(args.src, args.dst, config, overwrite=args.overwrite, progress=_ProgressLine(sys.stderr),
                          log=_log)
    print(f"wrote {result.dst}")
    print(f"source form: {result.source_summary}")
    print(f"source: {result.src_bytes / GB:.2f} GB  output: {result.dst_bytes / GB:.2f} GB  "
          f"ratio: {result.ratio:.2f}x  ({config.bits}, {result.tensors} tensors, {result.seconds:.0f} s)")
    return 0


def _calibrate(args) -> int:
    from .calib.capture import capture_plan, check_video_size, sample_and_capture
    from .calib.driver import RunOptions
    from .calib.job import (
        CalibrationInfo,
        calibrate_to_file,
        capture_fingerprint,
        check_calibration_supported,
        check_output,
        check_work_dir,
        load_conditioning,
        load_full_model,
        random_conditioning,
        worse_than_rtn_lines,
    )
    from .calib.settings import CalibSettings
    from .checkpoint.convert import inspect_source

    # Everything checked before the model is loaded or sampled: a mistake costs a second, not an hour.
    settings = CalibSettings(bits=args.bits, density=args.density, sparse_attention=args.sparse_calibration,
                             epochs=args.epochs,
                             lambda_global=args.lambda_global, lambda_local=args.lambda_local, seed=args.seed)
    if args.random_prompts is not None and args.random_prompts < 1:
        raise ValueError(f"--random-prompts {args.random_prompts}: give at least 1")
    prompts = args.random_prompts if args.conditioning is None else 1
    capture_plan(args.samples, prompts, args.steps)  # samples / steps >= 1
    device = resolve_device(args.device)
    source = inspect_source(args.src)
    adapter = check_calibration_supported(source.dims)
    check_video_size(args.width, args.height, args.frames, adapter.sampling)
    guidance = adapter.sampling.guidance if args.guidance is None else args.guidance
    if args.conditioning:
        conds = load_conditioning(args.conditioning, source.dims.context_in_dim, source.dims.vec_in_dim)
    else:
        conds = random_conditioning(args.random_prompts, source.dims.context_in_dim, source.dims.vec_in_dim,
                                    seed=args.seed)
    inputs = [source.path] + ([args.conditioning] if args.conditioning else [])
    dst = check_output(args.dst, args.overwrite, inputs)
    work = args.work_dir or f"{dst}.work"
    check_work_dir(work, inputs + [str(dst)])

    model = load_full_model(source)
    info = CalibrationInfo(os.path.basename(args.src), len(conds), args.width, args.height, args.frames, args.steps,
                           guidance)

    def capture():
        _log(f"capturing {args.samples} samples from {len(conds)} prompt(s) at {args.width}x{args.height}x"
             f"{args.frames}, {args.steps} steps, on {device}")
        return sample_and_capture(model, conds, width=args.width, height=args.height, frames=args.frames,
                                  samples=args.samples, steps=args.steps, seed=args.seed, guidance=guidance,
                                  device=device)

    progress = lambda done, total, key: _log(f"[{done}/{total}] {key} done")  # noqa: E731
    path, result, record = calibrate_to_file(
        model, capture, settings, dst, info, work_dir=work, overwrite=args.overwrite, restart=args.restart,
        inputs=inputs, capture=capture_fingerprint(info, args.samples, conds),
        options=RunOptions(device=device, progress=progress, log=_log))
    print(f"wrote {path}")
    losses = record["losses"]
    print(f"block output MSE, mean over {losses['blocks']} blocks: {losses['rtn_out_mean']:.4g} (round-to-nearest) "
          f"-> {losses['out_mean']:.4g}; {result.seconds / 60:.1f} min"
          + (f" ({result.resumed_blocks} blocks resumed)" if result.resumed_blocks else ""))
    for line in worse_than_rtn_lines(record):
        print(line)
    return 0


def _inspect(path: str, out: TextIO, blocks: bool = False) -> int:
    from .calib.provenance import block_table, calibration_lines, sparse_lines
    from .checkpoint.format import validate_checkpoint
    from .core.paths import input_file

    info = validate_checkpoint(input_file(path, "the checkpoint"))
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
    w(f"architecture: {info.adapter.summary(d)}\n")
    w(f"quantization: {c.bits}, group size {c.group_size or 'per channel'}, rotation {'on' if c.rotate else 'off'}, "
      f"weight-only {c.weight_only_bits}-bit\n")
    for kind in sorted(kinds):
        w(f"  {kind:6s} {kinds[kind]:4d} Linears, {params[kind] / 1e9:.2f} B weights\n")
    w(f"size: {info.file_size / GB:.3f} GB ({len(info.tensors)} tensors: {qbytes / GB:.3f} GB quantized Linears, "
      f"{fbytes / GB:.3f} GB BF16)\n")
    for line in calibration_lines(info.calibration) + sparse_lines(info.sparse_defaults):
        w(line + "\n")
    if blocks:
        for line in block_table(info.calibration):
            w(line + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
