"""Swap a torch model's Linears for quantized ones, as a model family's layer table says.

Family-free: which Linear gets which kind comes from ``kind_of`` (an adapter's ``layer_kind``), so
round-to-nearest conversion of any family and the folding of calibrated smoothing / clipping share
one loop.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import nn

from .config import QuantSparseConfig, kind_group_size, kind_rotate
from .qlinear import QuantizedLinear

KindOf = Callable[[str, QuantSparseConfig], Optional[str]]
Learned = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (smooth, clip)


def quantize_linears(model: nn.Module, config: QuantSparseConfig, kind_of: KindOf, *,
                     select: Optional[Callable[[str, str], bool]] = None,
                     learned: Optional[Learned] = None) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` whose name (relative to ``model``, ComfyUI naming) has a kind.

    Round-to-nearest (smoothing 1, clipping 1) unless ``learned`` holds the layer's calibrated
    ``(smooth, clip)``. ``select(name, kind)`` narrows the set (one block at a time, one layer family
    at a time); Linears without a kind (embedders, final layer) and layers already quantized stay.
    """
    learned = learned or {}
    targets = []
    for name, mod in model.named_modules():
        kind = kind_of(name, config) if isinstance(mod, nn.Linear) else None
        if kind is not None and (select is None or select(name, kind)):
            targets.append((name, mod, kind))
    for name, linear, kind in targets:
        smooth, clip = learned.get(name, (None, None))
        q = QuantizedLinear.from_linear(linear, kind, group_size=kind_group_size(kind, config),
                                        rotate=kind_rotate(kind, config), smooth=smooth, clip=clip)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    return model
