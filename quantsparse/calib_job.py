"""One calibration from samples to a shareable file: check the destination, calibrate, export, tidy up.

Used by ``quantsparse calibrate`` and the "QuantSparse Calibrate" node, so both refuse an existing
file up front (not after the work), write the checkpoint only when every block is done (atomically),
and remove the work folder only after the checkpoint is in place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from .calib_export import export_checkpoint
from .calib_settings import CalibSettings
from .calibrate import CalibrationResult, RunOptions, calibrate_model, clear_work
from .checkpoint import CheckpointError
from .hunyuan.model import HunyuanVideo
from .provenance import calibration_record
from .safetensors_io import SafetensorsError, check_destination
from .sparse_config import SparseConfig


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


def check_output(dst: str | os.PathLike, overwrite: bool) -> Path:
    path = Path(dst)
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: a QuantSparse checkpoint must end in .safetensors. Choose a name like "
                              f"{path.stem or 'calibrated'}.safetensors")
    try:
        check_destination(path, overwrite)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from None
    return path


def calibrate_to_file(model: HunyuanVideo, samples: Sequence[dict[str, torch.Tensor]], settings: CalibSettings,
                      dst: str | os.PathLike, info: CalibrationInfo, *, work_dir: str, overwrite: bool = False,
                      keep_work: bool = False, options: Optional[RunOptions] = None
                      ) -> tuple[Path, CalibrationResult, dict]:
    """Calibrate ``model`` and write ``dst``; returns (path, result, calibration record)."""
    path = check_output(dst, overwrite)
    opt = options or RunOptions()
    result = calibrate_model(model, samples, settings, work_dir, opt)
    record = calibration_record(base_model=info.base_model, settings=settings, prompts=info.prompts,
                                samples=len(samples), width=info.width, height=info.height, frames=info.frames,
                                steps=info.steps, blocks=result.blocks, seconds=result.seconds,
                                device=str(opt.device), guidance=info.guidance)
    sparse = SparseConfig(density=settings.density, block_q=settings.block_q, block_k=settings.block_k)
    export_checkpoint(path, model.state_dict(), model.dims, settings.quant_config(), result.params, record,
                      sparse.to_dict(), overwrite=overwrite)
    if not keep_work:
        clear_work(work_dir)
    return path, result, record


def load_full_model(src: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> HunyuanVideo:
    """A BF16/FP16/FP32 HunyuanVideo file (ComfyUI naming, prefixed or not) as the torch model, in ``dtype``.

    The file is checked from its header first (``convert.inspect_source``: a QuantSparse or FP8 file, or
    another model, is refused with a message saying which file to use instead).
    """
    from .convert import inspect_source
    from .safetensors_io import TensorFile

    source = inspect_source(src)
    model = HunyuanVideo(source.dims, dtype=dtype, device="meta")
    state = {}
    with TensorFile(source.header) as reader:
        for key in source.header.tensors:
            if key.startswith(source.prefix):
                state[key[len(source.prefix):]] = reader.get(key).to(dtype)
    model.load_state_dict(state, assign=True)
    return model


def load_conditioning(path: str | os.PathLike) -> list:
    """Prompt embeddings from a safetensors file: ``context.N`` [Ltxt, C] (or [1, Ltxt, C]), ``pooled.N`` [768]
    (or [1, 768]) and optionally ``mask.N`` [Ltxt] (1 = token, 0 = padding), for N = 0, 1, ..."""
    from .capture import Conditioning
    from .calib_store import load_tensors

    t = load_tensors(str(path))
    n = 0
    out = []
    while f"context.{n}" in t:
        if f"pooled.{n}" not in t:
            raise ValueError(f"{path}: context.{n} has no pooled.{n} (the pooled CLIP-L vector, [768])")
        ctx = t[f"context.{n}"]
        ctx = ctx[None] if ctx.dim() == 2 else ctx
        y = t[f"pooled.{n}"].reshape(1, -1)
        mask = t.get(f"mask.{n}")
        out.append(Conditioning(ctx, y, None if mask is None else mask.reshape(1, -1)))
        n += 1
    if not out:
        raise ValueError(f"{path}: no prompt embeddings found; expected tensors context.0, pooled.0, ... "
                         "(text-encoder hidden states and pooled CLIP-L vectors, one pair per prompt)")
    return out


def random_conditioning(count: int, context_dim: int, tokens: int = 32, seed: int = 0) -> list:
    """Random prompt embeddings: for timing and for smoke tests without a text encoder, never for a real model."""
    from .capture import Conditioning

    g = torch.Generator().manual_seed(seed)
    return [Conditioning(torch.randn(1, tokens, context_dim, generator=g), torch.randn(1, 768, generator=g))
            for _ in range(count)]
