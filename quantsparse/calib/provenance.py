"""What a checkpoint says about itself: the calibration record written into its metadata, and the
human summary that ``quantsparse inspect`` prints and the loader node shows.

A shared checkpoint travels without its author, so the record answers the questions a user asks
before trusting one: from which base model, with what bits, how many prompts at what resolution,
how long it was trained, how much the error dropped, and which sparse/SSAR settings it was made for.
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any, Mapping, Optional, Sequence

import torch

from .settings import CalibSettings

METHOD = "msad"


def calibration_record(*, base_model: str, settings: CalibSettings, prompts: int, samples: int,
                       width: int, height: int, frames: int, steps: int, blocks: Mapping[str, dict],
                       seconds: float, device: str = "cpu", guidance: Optional[float] = None,
                       fingerprint: Optional[dict] = None) -> dict[str, Any]:
    """The ``calibration`` entry of the checkpoint metadata (plain JSON).

    ``fingerprint`` identifies what made it (model, capture, settings): a node queued again with the same
    inputs recognises its own file. ``worse_than_rtn`` marks a calibration whose mean block output error
    ends above round-to-nearest, so a shared file carries the warning with it."""
    rtn = [b["rtn"]["out"] for b in blocks.values()]
    fin = [b["final"]["out"] for b in blocks.values()]
    rtn_mean = statistics.fmean(rtn) if rtn else None
    out_mean = statistics.fmean(fin) if fin else None
    per_block = {k: {"rtn_out": b["rtn"]["out"], "out": b["final"]["out"], "global": b["final"]["global"],
                     "local": b["final"]["local"], "rtn_global": b["rtn"]["global"], "rtn_local": b["rtn"]["local"],
                     "lambda_global": b["lambda_global"], "lambda_local": b["lambda_local"],
                     "seconds": round(b["seconds"], 2)} for k, b in blocks.items()}
    return {
        "method": METHOD,
        "base_model": base_model,
        "prompts": prompts,
        "samples": samples,
        "resolution": {"width": width, "height": height, "frames": frames},
        "sampling_steps": steps,
        "guidance": guidance,
        "epochs": settings.epochs,
        "settings": settings.to_dict(),
        "losses": {
            "blocks": len(blocks),
            "rtn_out_mean": rtn_mean,
            "out_mean": out_mean,
            "improved_blocks": sum(f < r for f, r in zip(fin, rtn)),
            "worse_blocks": [k for k, b in blocks.items() if b["final"]["out"] > b["rtn"]["out"]],
            "worse_than_rtn": bool(rtn and out_mean > rtn_mean),
            "per_block": per_block,
        },
        "fingerprint": fingerprint,
        "seconds": round(seconds, 1),
        "device": device,
        "torch": torch.__version__,
        "host": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def calibration_lines(calibration: Optional[Mapping[str, Any]]) -> list[str]:
    """Provenance lines of a checkpoint's calibration record (robust to records written by ``checkpoint.convert``)."""
    if not calibration:
        return ["calibration: none (round-to-nearest, `quantsparse convert`)"]
    c = calibration
    if c.get("method") != METHOD:
        return ["calibration: " + ", ".join(f"{k}={_fmt(v)}" for k, v in c.items())]
    res = c.get("resolution") or {}
    s = c.get("settings") or {}
    losses = c.get("losses") or {}
    lines = [
        f"calibration: MSAD from {c.get('base_model', '?')}, {c.get('prompts', '?')} prompt(s), "
        f"{c.get('samples', '?')} samples at {res.get('width', '?')}x{res.get('height', '?')}x{res.get('frames', '?')} "
        f"({c.get('sampling_steps', '?')} sampling steps), {c.get('epochs', '?')} epochs, seed {s.get('seed', '?')}, "
        f"{_fmt(c.get('seconds', '?'))} s on {c.get('device', '?')} ({c.get('date', '?')})",
        f"  settings: density {s.get('density', '?')}, attention during calibration "
        f"{'sparse' if s.get('sparse_attention') else 'dense'}, lr {s.get('lr_smooth', '?')}/{s.get('lr_clip', '?')} "
        f"(smoothing/clipping), lambdas {_lam(s.get('lambda_global'))}/{_lam(s.get('lambda_local'))} "
        f"(global/local), pooling stride {s.get('pool_stride', '?')}, {s.get('salient_tokens', '?')} salient tokens",
    ]
    if losses.get("blocks"):
        lines.append(f"  losses: block output MSE, mean over {losses['blocks']} blocks: "
                     f"{_fmt(losses.get('rtn_out_mean'))} (round-to-nearest) -> {_fmt(losses.get('out_mean'))}; "
                     f"{losses.get('improved_blocks', '?')}/{losses['blocks']} blocks improved")
    if losses.get("worse_than_rtn"):
        lines.append(f"  WARNING: worse than round-to-nearest overall; worse blocks: "
                     f"{', '.join(losses.get('worse_blocks') or [])} (a `quantsparse convert` checkpoint is better)")
    return lines


def _lam(v) -> str:
    return "auto" if v is None else _fmt(v)


def sparse_lines(sparse_defaults: Mapping[str, Any]) -> list[str]:
    if not sparse_defaults:
        return ["sparse defaults: none stored (the sampler's own defaults apply)"]
    d = sparse_defaults
    return [f"sparse defaults: density {d.get('density')}, mask {d.get('mask_mode')}, dense warm-up "
            f"{d.get('dense_warmup')}, blocks {d.get('block_q')}x{d.get('block_k')}",
            f"SSAR defaults: order {d.get('ssar_order')}, refresh every {d.get('refresh_interval')} steps, "
            f"rank {d.get('rank')}"]


def summary_lines(info) -> list[str]:
    """Everything ``inspect`` prints about provenance and settings, for a ``CheckpointInfo``."""
    d, c = info.dims, info.config
    base = [f"base: {info.adapter.variant(d)}; "
            f"bits {c.bits}, group size {c.group_size or 'per channel'}, rotation {'on' if c.rotate else 'off'}"]
    return base + calibration_lines(info.calibration) + sparse_lines(info.sparse_defaults)


def block_table(calibration: Optional[Mapping[str, Any]], keys: Optional[Sequence[str]] = None) -> list[str]:
    """Per-block losses (inspect --blocks)."""
    per = ((calibration or {}).get("losses") or {}).get("per_block") or {}
    lines = []
    for k in keys or list(per):
        b = per[k]
        lines.append(f"  {k}: out {b['rtn_out']:.4g} -> {b['out']:.4g}, global {b['rtn_global']:.3g} -> "
                     f"{b['global']:.3g}, local {b['rtn_local']:.3g} -> {b['local']:.3g}, {b['seconds']} s")
    return lines
