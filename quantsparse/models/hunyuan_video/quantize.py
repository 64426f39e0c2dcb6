"""Swap the Linears of a HunyuanVideo for quantized ones, as the layer table in ``layers`` says.

Round-to-nearest with smoothing 1 and clipping 1: the starting point that calibration improves
on, and what the accuracy tests measure.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from ...core.config import QuantSparseConfig
from ...core.qlinear import QuantizedLinear
from .layers import layer_kind
from ...core.config import kind_group_size as layer_group_size, kind_rotate as layer_rotate


def quantize_model(model: nn.Module, config: QuantSparseConfig, *,
                   select: Optional[Callable[[str, str], bool]] = None) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` whose ComfyUI name has a quantization kind; returns ``model``.

    Names are taken relative to ``model``, so pass the diffusion model itself (no ``diffusion_model.``
    prefix). Linears without a kind (embedders, final layer) stay as they are. ``select(name, kind)``,
    when given, narrows the set further (one block at a time in calibration; one layer family at a
    time when measuring where the error comes from).
    """
    targets = []
    for name, mod in model.named_modules():
        kind = layer_kind(name, config) if isinstance(mod, nn.Linear) else None
        if kind is not None and (select is None or select(name, kind)):
            targets.append((name, mod))
    for name, linear in targets:
        kind = layer_kind(name, config)
        q = QuantizedLinear.from_linear(linear, kind, group_size=layer_group_size(kind, config),
                                        rotate=layer_rotate(kind, config))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    return model
