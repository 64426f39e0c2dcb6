"""Capture: what the full model sees while sampling, at points spread over the schedule.

A calibration sample is one call of the diffusion model during a real sampling run: the latent
``x`` at that step, the timestep (sigma * 1000), the text conditioning (``context``, pooled ``y``,
optional ``txt_mask``) and the embedded guidance. Only these model-level inputs are recorded (a few
MB per sample); each block's inputs are then produced one block at a time by running the full
model's chain (``calibrate.prepare_inputs`` and the block outputs), so nothing of size
``blocks x samples`` is ever held.

Sample ``k`` of ``n`` goes to prompt ``k mod P`` at step ``floor((k + 1/2) * steps / n)``: every prompt
is used and the steps cover the schedule evenly. In ComfyUI the sampler is ComfyUI's own (the node
records through a DIFFUSION_MODEL wrapper); the command line uses :func:`sample_and_capture`, an Euler
flow-matching sampler with ComfyUI's ``simple`` schedule and the family's shift and embedded guidance
(its adapter's ``sampling``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from torch import nn

from ..core.schedule import simple_sigmas
from ..models import registry
from ..models.base import SamplingDefaults


def check_video_size(width: int, height: int, frames: int, sampling: SamplingDefaults) -> None:
    """A size the family's VAE (``sampling.spatial`` x, ``sampling.temporal`` x) and 2x2 patching can take."""
    side, t = 2 * sampling.spatial, sampling.temporal
    if width % side or height % side or width < side or height < side:
        raise ValueError(f"calibration width and height must be positive multiples of {side}, got {width}x{height}")
    if frames < 1 or (frames - 1) % t:
        raise ValueError(f"calibration frames must be 1, {1 + t}, {1 + 2 * t}, ... ({t}k + 1), got {frames}")


def latent_shape(width: int, height: int, frames: int, sampling: SamplingDefaults) -> tuple[int, int, int, int, int]:
    """The family's empty video latent (``EmptyHunyuanLatentVideo``, ``EmptyLatentVideo``)."""
    check_video_size(width, height, frames, sampling)
    return (1, sampling.latent_channels, (frames - 1) // sampling.temporal + 1, height // sampling.spatial,
            width // sampling.spatial)


@dataclass(frozen=True)
class CapturePoint:
    prompt: int
    step: int


def capture_plan(samples: int, prompts: int, steps: int) -> list[CapturePoint]:
    """Which (prompt, step) each of ``samples`` calibration samples is taken at."""
    if samples < 1 or prompts < 1 or steps < 1:
        raise ValueError(f"need at least one sample, prompt and step (got {samples}, {prompts}, {steps})")
    return [CapturePoint(k % prompts, min(steps - 1, int((k + 0.5) * steps / samples))) for k in range(samples)]


def steps_by_prompt(plan: Sequence[CapturePoint]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for p in plan:
        out.setdefault(p.prompt, []).append(p.step)
    return {k: sorted(v) for k, v in out.items()}


def model_inputs(x, timestep, context, y, guidance=None, txt_mask=None) -> dict[str, torch.Tensor]:
    """One model call's inputs by the names a recorded sample uses (what ``adapter.denoise`` takes)."""
    out = {"x": x, "timestep": timestep, "context": context, "y": y}
    if guidance is not None:
        out["guidance"] = guidance
    if txt_mask is not None:
        out["txt_mask"] = txt_mask
    return out


def record(x, timestep, context, y, guidance=None, txt_mask=None) -> dict[str, torch.Tensor]:
    """One model-level sample on the host: latent and text in BF16 (like the model's own input), timestep and
    guidance as float32 vectors, the mask as given."""
    host = {"x": lambda t: t.to("cpu", torch.bfloat16), "context": lambda t: t.to("cpu", torch.bfloat16),
            "y": lambda t: t.to("cpu", torch.bfloat16), "timestep": lambda t: t.float().cpu().reshape(-1),
            "guidance": lambda t: t.float().cpu().reshape(-1), "txt_mask": lambda t: t.cpu()}
    return {k: host[k](v.detach()) for k, v in model_inputs(x, timestep, context, y, guidance, txt_mask).items()}


@dataclass(frozen=True)
class Conditioning:
    """One prompt's text conditioning: ``context`` [1, Ltxt, C], pooled ``y`` [1, 768], optional mask [1, Ltxt]."""

    context: torch.Tensor
    y: torch.Tensor
    txt_mask: Optional[torch.Tensor] = None


@torch.no_grad()
def sample_and_capture(model: nn.Module, conds: Sequence[Conditioning], *, width: int, height: int, frames: int,
                       samples: int, steps: int, seed: int = 0, guidance: Optional[float] = None,
                       shift: Optional[float] = None, device="cpu", progress=None) -> list[dict[str, torch.Tensor]]:
    """Run Euler flow sampling per prompt (stopping after its last planned step) and record the plan's samples;
    ``guidance`` and ``shift`` default to the family's (``adapter.sampling``)."""
    adapter = registry.adapter_for(model.dims)
    defaults = adapter.sampling
    guidance = defaults.guidance if guidance is None else guidance
    shape = latent_shape(width, height, frames, defaults)
    plan = capture_plan(samples, len(conds), steps)
    wanted = steps_by_prompt(plan)
    sigmas = simple_sigmas(steps, defaults.shift if shift is None else shift)
    dev = torch.device(device)
    model.to(dev)
    records: dict[tuple[int, int], dict] = {}
    try:
        for p, cond in enumerate(conds):
            if p not in wanted:
                continue
            gen = torch.Generator().manual_seed(seed + p)
            x = torch.randn(shape, generator=gen).to(dev) * sigmas[0]
            g = None if guidance is None else torch.tensor([guidance], device=dev)
            ctx, y = cond.context.to(dev), cond.y.to(dev)
            mask = None if cond.txt_mask is None else cond.txt_mask.to(dev)
            last = max(wanted[p])
            for i in range(last + 1):
                t = (sigmas[i] * 1000).reshape(1).to(dev)
                if i in wanted[p]:
                    records[(p, i)] = record(x, t, ctx, y, g, mask)
                if i == last:
                    break
                v = adapter.denoise(model, model_inputs(x, t, ctx, y, g, mask)).float()
                x = x + (sigmas[i + 1] - sigmas[i]).to(dev) * v
            if progress is not None:
                progress(p + 1, len(conds))
    finally:
        model.to("cpu")
    return [records[(pt.prompt, pt.step)] for pt in plan]
