"""Calibrated smoothing and clipping -> a QuantSparse checkpoint (the format of ``checkpoint.py``).

The learned values go through the same ``quantize_rows`` as ``quantsparse convert``, so a calibrated
checkpoint differs from a round-to-nearest one only in its numbers and its ``calibration`` record.
Layers calibration does not touch (the text refiner) are round-to-nearest. The write is atomic: an
interrupted export leaves no file.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping, Optional

import torch

from ..checkpoint.convert import quantize_rows
from ..checkpoint.format import FLOAT_DTYPE, CheckpointMeta, quantized_layers, write_checkpoint
from ..core.config import QuantSparseConfig


def checkpoint_tensors(state: Mapping[str, torch.Tensor], dims, config: QuantSparseConfig,
                       params: Mapping[str, tuple[Optional[torch.Tensor], torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of the checkpoint, one Linear quantized at a time (ComfyUI names, no prefix)."""
    layers = quantized_layers(dims, config)
    for name, t in state.items():
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        layer = layers.get(prefix) if prefix is not None else None
        if layer is None:
            yield name, t.detach().to("cpu", FLOAT_DTYPE)
            continue
        smooth, clip = params.get(prefix, (None, None))
        qw = quantize_rows(t.detach().float().cpu(), layer, smooth=smooth, clip=clip)
        yield f"{prefix}.weight", qw.weight
        yield f"{prefix}.weight_scale", qw.scale
        if qw.smooth is not None:
            yield f"{prefix}.smooth", qw.smooth


def export_checkpoint(path: str | os.PathLike, state: Mapping[str, torch.Tensor], dims,
                      config: QuantSparseConfig, params: Mapping[str, tuple[Optional[torch.Tensor], torch.Tensor]],
                      calibration: dict[str, Any], sparse_defaults: dict[str, Any], *, overwrite: bool = False) -> int:
    """Write the calibrated checkpoint; returns its size in bytes."""
    meta = CheckpointMeta(dims, config, calibration, sparse_defaults)
    return write_checkpoint(path, checkpoint_tensors(state, dims, config, params), meta, overwrite=overwrite)
