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
