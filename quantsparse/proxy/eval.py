"""What the demo and the quality benchmark measure on the proxy: quality against dense, storage, block errors.

Quality is taken on decoded pixels (``proxy_data.decode_latent``, values in [-1, 1], data range 2), the
way the paper compares videos after the VAE; the dense BF16 proxy sampled from the same seed is the
reference. The calibration used is looked up once (``find_calibrate``): MSAD when the package provides it,
otherwise round-to-nearest, and the caller is told which.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ..calib.attention import CalibAttention
from ..calib.capture import model_inputs
from ..core.metrics import psnr, ssim
from ..models import registry
from .sample import CalibrateFn, SampleResult, decode, resolve_calibrate, rtn_calibrate

DATA_RANGE = 2.0
# Where MSAD calibration is looked for, in order ("module:function" inside this package; the function
# follows proxy_sample.CalibrateFn).
MSAD_CANDIDATES = ("msad:calibrate_proxy",)


def find_calibrate(name: str = "auto") -> tuple[str, CalibrateFn]:
    """(name, function): ``"auto"`` takes the first MSAD candidate that imports, else ``"rtn"``."""
    if name != "auto":
        return name, resolve_calibrate(name)
    for cand in MSAD_CANDIDATES:
        mod, _, fn = cand.partition(":")
        try:
            module = importlib.import_module("." + mod, __package__)
        except ImportError:
            continue
        if hasattr(module, fn):
            return cand, getattr(module, fn)
    return "rtn", rtn_calibrate


@dataclass
class Quality:
    psnr: float  # mean over clips, dB
    ssim: float
    psnr_per_clip: list
    ssim_per_clip: list


def compare(results: Sequence[SampleResult], references: Sequence[SampleResult]) -> Quality:
    """PSNR / SSIM of decoded clips against the dense clips of the same seeds (means over clips;
    a clip equal to its reference counts at 100 dB instead of infinity, so that the mean stays finite)."""
    p, s = [], []
    for r, ref in zip(results, references, strict=True):
        a, b = decode(r.latent), decode(ref.latent)
        p.append(min(float(psnr(a, b, DATA_RANGE)), 100.0))
        s.append(float(ssim(a, b, DATA_RANGE)))
    return Quality(sum(p) / len(p), sum(s) / len(s), p, s)


def model_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds (what its checkpoint stores)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@torch.no_grad()
def block_errors(dense, quant, inputs: Sequence[tuple]) -> dict:
    """Relative output error ``|q(x) - d(x)| / |d(x)|`` of every block, each fed the dense model's own
    block inputs (so the figure is that block's error alone, not the accumulated one), averaged over
    ``inputs`` ((x, timestep, context, y, guidance) model inputs). Blocks, their inputs and how they run
    come from the model family's adapter, as in calibration."""
    adapter = registry.adapter_for(dense.dims)
    d_refs, q_refs = adapter.calib_blocks(dense), adapter.calib_blocks(quant)
    sums = dict.fromkeys((r.key for r in d_refs), 0.0)
    for x, t, ctx, y, g in inputs:
        sample = adapter.calib_first_inputs(dense, model_inputs(x, t, ctx, y, g), x.device)
        grid, txt_len = adapter.calib_geometry(sample)  # one geometry through all blocks
        pe = adapter.calib_rope(dense.dims, grid, txt_len, x.device)
        for n, (dr, qr) in enumerate(zip(d_refs, q_refs)):
            attn = CalibAttention(grid=grid, txt_len=txt_len, record=False)
            d_out = adapter.calib_run_block(dr, dr.module, sample, pe, attn)
            q_out = adapter.calib_run_block(qr, qr.module, sample, pe, attn)
            d = torch.cat([d_out[k].float().flatten() for k in sorted(d_out)])
            q = torch.cat([q_out[k].float().flatten() for k in sorted(q_out)])
            sums[dr.key] += float((q - d).norm() / d.norm())
            last_of_kind = n + 1 == len(d_refs) or d_refs[n + 1].kind != dr.kind
            sample = adapter.calib_next_inputs(dr, last_of_kind, sample, d_out)
    return {k: v / max(len(inputs), 1) for k, v in sums.items()}


def calibration_report(model: nn.Module) -> Optional[dict]:
    """What the calibration reported about itself (per-block losses), if anything."""
    rep = getattr(model, "calibration_report", None)
    return rep if isinstance(rep, dict) else None
