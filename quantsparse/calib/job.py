"""One calibration from samples to a shareable file: check everything, calibrate, export, tidy up.

Used by ``quantsparse calibrate`` and the "QuantSparse Calibrate" node, so both behave the same way:
the destination, the work folder and the inputs are checked before any sampling (an unwritable folder
fails in a second, not after an hour); the captured samples are kept in the work folder, so a resumed
run does not sample the full model again; a rerun whose settings differ from the work folder's stops
and names what differs instead of discarding finished blocks; the checkpoint is written only when
every block is done (atomically), records the fingerprint of what made it, and says so when it ends
worse than round-to-nearest; the work folder is removed only after the checkpoint is in place.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from ..checkpoint.format import CheckpointError, checkpoint_replaceable
from ..core.paths import (
    PathError,
    clean_stale_partials,
    clean_stale_partials_under,
    input_file,
    output_file,
    output_folder,
)
from ..core.safetensors_io import SafetensorsError, read_header
from ..models import registry
from ..sparse.config import SparseConfig
from .driver import CalibrationResult, RunOptions, WorkFolder, calibrate_model, clear_work, model_fingerprint
from .export import export_checkpoint
from .provenance import calibration_record
from .settings import CalibSettings

Samples = Sequence[dict[str, torch.Tensor]]


@dataclass(frozen=True)
class CalibrationInfo:
    """What the record says about where the samples came from."""

    base_model: str
    prompts: int
    width: int
    height: int
    frames: int
    steps: int
    guidance: Optional[float] = None


def check_output(dst: str | os.PathLike, overwrite: bool, inputs: Sequence = ()) -> Path:
    """The checkpoint path, checked before any work (see ``paths.output_file``)."""
    try:
        return output_file(dst, "the output checkpoint", inputs=inputs, overwrite=overwrite,
                           replaceable=checkpoint_replaceable)
    except PathError as e:
        raise CheckpointError(str(e)) from None


def check_work_dir(work_dir: str | os.PathLike, inputs: Sequence = ()) -> Path:
    return output_folder(work_dir, "the work folder", inputs=inputs)


def conditioning_fingerprint(conds: Sequence) -> str:
    """Identity of the prompt embeddings (shapes and sums), for the work folder's fingerprint."""
    h = hashlib.sha256()
    for c in conds:
        for t in (c.context, c.y, c.txt_mask):
            if t is None:
                h.update(b"none")
            else:
                h.update(f"{tuple(t.shape)}:{float(t.double().sum()):.12e}:{float(t.double().abs().sum()):.12e}"
                         .encode())
    return h.hexdigest()[:16]


def capture_fingerprint(info: CalibrationInfo, samples: int, conds: Sequence) -> dict:
    """What decides the captured samples: resolution, schedule, guidance, count and the prompts."""
    return {"width": info.width, "height": info.height, "frames": info.frames, "steps": info.steps,
            "guidance": info.guidance, "samples": samples, "conditioning": conditioning_fingerprint(conds)}


def run_fingerprint(model_key: str, settings: CalibSettings, capture: Optional[dict]) -> dict:
    """What a work folder and a finished checkpoint are identified by: the weights (``model_fingerprint``), the
    capture and the settings."""
    return {"model": model_key, "capture": capture or {}, "settings": settings.to_dict()}


def calibrate_to_file(model, samples: Union[Samples, Callable[[], Samples]], settings: CalibSettings,
                      dst: str | os.PathLike, info: CalibrationInfo, *, work_dir: str, overwrite: bool = False,
                      restart: bool = False, inputs: Sequence = (), capture: Optional[dict] = None,
                      fingerprint: Optional[dict] = None, keep_work: bool = False,
                      options: Optional[RunOptions] = None) -> tuple[Path, CalibrationResult, dict]:
    """Calibrate ``model`` and write ``dst``; returns (path, result, calibration record).

    ``samples`` is the list of captured samples or a function that captures them; it is called only when
    the work folder holds no usable samples of this ``calib.capture`` fingerprint. ``inputs`` are the files
    the job reads (never written over). ``fingerprint`` is ``run_fingerprint(...)``
    when the caller has it already (it reads every block's weights once)."""
    opt = options or RunOptions()
    log = opt.log or (lambda msg: None)
    path = check_output(dst, overwrite, inputs)
    check_work_dir(work_dir, inputs)
    clean_stale_partials(path, log)
    clean_stale_partials_under(work_dir, log)
    fingerprint = fingerprint or run_fingerprint(model_fingerprint(model), settings, capture)
    work = WorkFolder(work_dir, fingerprint, restart=restart, log=opt.log)
    got = work.cached_samples()
    if got is not None:
        log(f"using the {len(got)} samples captured by an earlier run (in {work_dir})")
    else:
        got = list(samples() if callable(samples) else samples)
        work.keep_samples(got)
    result = calibrate_model(model, got, settings, work, opt)
    record = calibration_record(base_model=info.base_model, settings=settings, prompts=info.prompts,
                                samples=len(got), width=info.width, height=info.height, frames=info.frames,
                                steps=info.steps, blocks=result.blocks, seconds=result.seconds,
                                device=str(opt.device), guidance=info.guidance, fingerprint=fingerprint)
    sparse = SparseConfig(density=settings.density, block_q=settings.block_q, block_k=settings.block_k)
    export_checkpoint(path, model.state_dict(), model.dims, settings.quant_config(), result.params, record,
                      sparse.to_dict(), overwrite=overwrite)
    if not keep_work:
        clear_work(work_dir)
    return path, result, record


def worse_than_rtn_lines(record: dict) -> list[str]:
    """Warnings for a calibration that ends worse than round-to-nearest (overall, or in named blocks)."""
    losses = record.get("losses") or {}
    worse = losses.get("worse_blocks") or []
    if losses.get("worse_than_rtn"):
        return [f"WARNING: this calibration ends worse than round-to-nearest overall (block output MSE, mean "
                f"{losses['out_mean']:.4g} vs {losses['rtn_out_mean']:.4g}); worse in {len(worse)} block(s): "
                f"{', '.join(worse)}. The checkpoint says so in its provenance; `quantsparse convert` gives the "
                f"round-to-nearest one."]
    if worse:
        return [f"note: {len(worse)} block(s) end with a higher output error than round-to-nearest (their "
                f"attention terms improved instead): {', '.join(worse)}"]
    return []


def load_full_model(src, dtype: torch.dtype = torch.bfloat16):
    """A model file in any form the converter reads (bf16/fp16/fp32, fp8, scaled fp8, int8; ComfyUI naming,
    prefixed or not) as its family's torch model, in ``dtype``.

    ``src`` is a path, checked from its header first (``convert.inspect_source``: a QuantSparse or FP8 file, or
    another model, is refused with a message saying which file to use instead), or the ``SourcePlan`` of that
    check; either way its family must be one calibration supports."""
    from ..checkpoint.convert import SourcePlan, inspect_source

    source = src if isinstance(src, SourcePlan) else inspect_source(src)
    check_calibration_supported(source.dims)
    return source.load_model(dtype)


def check_calibration_supported(dims):
    """The adapter of ``dims``, if MSAD calibration supports its family; otherwise a refusal with what to do."""
    adapter = registry.adapter_for(dims)
    if not adapter.calibration_supported:
        raise CheckpointError(f"MSAD calibration of {adapter.variant(dims)} is not supported yet; make a "
                              "round-to-nearest checkpoint of it with `quantsparse convert` instead")
    return adapter


_COND_KEY = re.compile(r"^(context|pooled|mask)\.(\d+)$")
_COND_HELP = ("expected context.N [Ltxt, C] (text-encoder hidden states), pooled.N [768] (the pooled CLIP-L "
              "vector) and optionally mask.N [Ltxt] (1 = token, 0 = padding), for N = 0, 1, 2, ...")


def load_conditioning(path: str | os.PathLike, context_dim: int, pooled_dim: int) -> list:
    """Prompt embeddings from a safetensors file, every tensor checked (names, numbering, shapes): a
    tensor that would be ignored, or a prompt without its pooled vector, is an error that says so."""
    from .capture import Conditioning
    from .store import load_tensors

    p = input_file(path, "the conditioning file")  # the content decides: read_header sniffs it
    try:
        read_header(p)
    except SafetensorsError as e:
        raise CheckpointError(f"--conditioning: {e}") from None
    t = load_tensors(str(p))
    where = f"--conditioning {p}"
    unknown = sorted(k for k in t if not _COND_KEY.match(k))
    if unknown:
        raise CheckpointError(f"{where}: unexpected tensors {unknown[:5]}; {_COND_HELP}.")
    index: dict[str, set[int]] = {"context": set(), "pooled": set(), "mask": set()}
    for k in t:
        kind, n = _COND_KEY.match(k).groups()
        index[kind].add(int(n))
    if not index["context"]:
        raise CheckpointError(f"{where}: no prompt embeddings found; {_COND_HELP}.")
    for a, b in (("context", "pooled"), ("pooled", "context"), ("mask", "context")):
        lone = sorted(index[a] - index[b])
        if lone:
            raise CheckpointError(f"{where}: {', '.join(f'{a}.{n}' for n in lone)} without "
                                  f"{', '.join(f'{b}.{n}' for n in lone)}; every prompt needs both context.N and "
                                  f"pooled.N ({_COND_HELP}).")
    count = len(index["context"])
    if sorted(index["context"]) != list(range(count)):
        missing = sorted(set(range(max(index["context"]) + 1)) - index["context"])
        raise CheckpointError(f"{where}: prompts must be numbered 0..{count - 1} without gaps; "
                              f"context.{missing[0]} is missing.")
    out = []
    for n in range(count):
        ctx, pooled, mask = t[f"context.{n}"], t[f"pooled.{n}"], t.get(f"mask.{n}")
        ctx = ctx[None] if ctx.dim() == 2 else ctx
        if ctx.dim() != 3 or ctx.shape[0] != 1 or not ctx.is_floating_point():
            raise CheckpointError(f"{where}: context.{n} has shape {list(t[f'context.{n}'].shape)} "
                                  f"({t[f'context.{n}'].dtype}); expected floats [Ltxt, C] or [1, Ltxt, C].")
        if ctx.shape[-1] != context_dim:
            raise CheckpointError(f"{where}: context.{n} has {ctx.shape[-1]} channels but the model's text input "
                                  f"takes {context_dim}; save the embeddings of this model's text encoder.")
        if pooled.numel() != pooled_dim or not pooled.is_floating_point():
            raise CheckpointError(f"{where}: pooled.{n} has shape {list(pooled.shape)}; expected the {pooled_dim} "
                                  "floats of the pooled CLIP-L vector.")
        if mask is not None:
            if mask.numel() != ctx.shape[1]:
                raise CheckpointError(f"{where}: mask.{n} has {mask.numel()} entries but context.{n} has "
                                      f"{ctx.shape[1]} tokens; one 0/1 entry per token.")
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise CheckpointError(f"{where}: mask.{n} must hold only 0 (padding) and 1 (token).")
        if not math.isfinite(float(ctx.float().abs().sum())) or not math.isfinite(float(pooled.float().abs().sum())):
            raise CheckpointError(f"{where}: prompt {n} holds NaN or infinite values.")
        out.append(Conditioning(ctx, pooled.reshape(1, -1), None if mask is None else mask.reshape(1, -1)))
    return out


def random_conditioning(count: int, context_dim: int, pooled_dim: int, tokens: int = 32, seed: int = 0) -> list:
    """Random prompt embeddings: for timing and for smoke tests without a text encoder, never for a real model."""
    from .capture import Conditioning

    g = torch.Generator().manual_seed(seed)
    return [Conditioning(torch.randn(1, tokens, context_dim, generator=g), torch.randn(1, pooled_dim, generator=g))
            for _ in range(count)]
