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

from ..calib.block import block_key
from ..core.metrics import psnr, ssim
from ..models.hunyuan_video.model import HunyuanVideo
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


def model_bytes(model: HunyuanVideo) -> int:
    """Bytes of every tensor the model holds (what its checkpoint stores)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@torch.no_grad()
def block_errors(dense: HunyuanVideo, quant: HunyuanVideo, inputs: Sequence[tuple]) -> dict:
    """Relative output error ``|q(x) - d(x)| / |d(x)|`` of every block, each fed the dense model's own
    block inputs (so the figure is that block's error alone, not the accumulated one), averaged over
    ``inputs`` ((x, timestep, context, y, guidance) model inputs)."""
    names = [block_key("double", i) for i in range(len(dense.double_blocks))] + \
            [block_key("single", i) for i in range(len(dense.single_blocks))]
    sums = dict.fromkeys(names, 0.0)
    for x, t, ctx, y, g in inputs:
        inp = dense.prepare(x, t, ctx, y, g)
        img, txt = inp.img, inp.txt
        for i, (db, qb) in enumerate(zip(dense.double_blocks, quant.double_blocks)):
            d_img, d_txt = db(img, txt, inp.vec, inp.pe, inp.attn_mask)
            q_img, q_txt = qb(img, txt, inp.vec, inp.pe, inp.attn_mask)
            d, q = torch.cat([d_txt, d_img], 1).float(), torch.cat([q_txt, q_img], 1).float()
            sums[block_key("double", i)] += float((q - d).norm() / d.norm())
            img, txt = d_img, d_txt
        joint = torch.cat([txt, img], 1)
        for i, (db, qb) in enumerate(zip(dense.single_blocks, quant.single_blocks)):
            d, q = db(joint, inp.vec, inp.pe, inp.attn_mask), qb(joint, inp.vec, inp.pe, inp.attn_mask)
            sums[block_key("single", i)] += float((q.float() - d.float()).norm() / d.float().norm())
            joint = d
    return {k: v / max(len(inputs), 1) for k, v in sums.items()}


def calibration_report(model: HunyuanVideo) -> Optional[dict]:
    """What the calibration reported about itself (per-block losses), if anything."""
    rep = getattr(model, "calibration_report", None)
    return rep if isinstance(rep, dict) else None
