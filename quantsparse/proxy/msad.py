"""The package's MSAD calibration (``calibrate.calibrate_model``) behind the proxy's ``CalibrateFn`` seam.

Wiring only: the captured dense trajectories of ``proxy_sample.calibration_set`` become model-level
samples, ``calibrate_model`` learns smoothing and clipping block by block, and the learned values are
folded into ``QuantizedLinear`` layers exactly as the checkpoint export does (``quantize_weight`` with
``smooth`` and ``clip``). Proxy-sized settings: the blocks of the sparse attention (16 tokens) and a
pooling stride and salient-token count scaled to the proxy's 320 video tokens (the product's 128 and 256
assume 30k-119k tokens); everything else is ``CalibSettings``' defaults (the paper's recipe).
"""

from __future__ import annotations

import copy
import tempfile
from typing import Optional

from torch import nn

from ..calib.capture import record
from ..calib.driver import RunOptions, calibrate_model
from ..calib.settings import CalibSettings
from ..core.config import QuantSparseConfig
from ..models import registry
from .sample import CalibrationOptions, CalibrationSet

POOL_STRIDE = 16  # 320 video tokens -> 20 pooled positions
SALIENT_TOKENS = 32  # 10% of the tokens, as 256 is of ~2.5k text+video tokens at the paper's smallest size


def calibrate_proxy(model: nn.Module, qconfig: QuantSparseConfig, calib: CalibrationSet,
                    options: Optional[CalibrationOptions] = None) -> nn.Module:
    """MSAD-calibrated quantized copy of ``model``; ``.calibration_report`` holds the per-block losses."""
    options = options or CalibrationOptions()
    sparse = options.sparse
    kw = {}
    if options.epochs is not None:
        kw["epochs"] = options.epochs
    settings = CalibSettings(bits=qconfig.bits, group_size=qconfig.group_size, rotate=qconfig.rotate,
                             lambda_global=options.lambda_global, lambda_local=options.lambda_local,
                             pool_stride=POOL_STRIDE, salient_tokens=SALIENT_TOKENS,
                             density=sparse.density if sparse is not None else 1.0,
                             block_q=sparse.block_q if sparse is not None else 16,
                             block_k=sparse.block_k if sparse is not None else 16, **kw)
    samples = [record(x, t, ctx, y, g) for x, t, ctx, y, g in calib.inputs]
    with tempfile.TemporaryDirectory(prefix="qs_proxy_msad_") as work:
        result = calibrate_model(model, samples, settings, work, RunOptions(log=options.log))
    # what calibration does not touch (the text refiner) is quantized round-to-nearest
    quant = registry.adapter_for(model.dims).quantize_model(copy.deepcopy(model), qconfig, learned=result.params)
    quant.calibration_report = {"losses": {k: _curve(m) for k, m in result.blocks.items()}, "blocks": result.blocks,
                                "x_label": "round-to-nearest, initialisation, calibrated"}
    return quant.eval()


def _curve(metrics: dict) -> list:
    """A block's MSAD loss (output + lambda_g * global + lambda_l * local) at round-to-nearest, at the
    initialisation and after calibration: what ``calibrate_block`` records."""
    lg, ll = float(metrics.get("lambda_global") or 0.0), float(metrics.get("lambda_local") or 0.0)
    return [float(metrics[s]["out"]) + lg * float(metrics[s]["global"]) + ll * float(metrics[s]["local"])
            for s in ("rtn", "init", "final") if isinstance(metrics.get(s), dict)]
