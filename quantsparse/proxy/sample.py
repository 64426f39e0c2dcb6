"""Sample the proxy HunyuanVideo (torch model) dense or with QuantSparse, as ComfyUI would, from fixed seeds.

The demo and the quality benchmark need the same clips sampled many ways (dense BF16, round-to-nearest,
sparse, calibrated ...) without ComfyUI, so this reproduces ComfyUI's path for HunyuanVideo: the
"simple" scheduler over ``ModelSamplingDiscreteFlow`` with shift 7, the Euler sampler on the velocity
(``x += (sigma_next - sigma) * v``), the initial latent ``sigma_0 * noise`` from an empty latent, and
optional CFG against the zero conditioning. Sparse attention goes through the same
``attention_override.sparse_attention_call`` the ComfyUI node uses, with one ``SparseRun`` (fresh SSAR
cache) per clip; the text refiner stays dense, as in the node.

The calibration seam: ``CalibrateFn(model, qconfig, calib, options) -> model`` turns the dense proxy
into a quantized one. ``rtn_calibrate`` (round-to-nearest, no data) is the default; MSAD calibration
(``quantsparse/calib/msad.py``) plugs in here without the demo or the benchmark changing.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import nn

from ..calib.capture import model_inputs
from ..core.config import QuantSparseConfig
from ..core.schedule import simple_sigmas
from ..sparse.config import SparseConfig
from ..sparse.override import SparseRun, key_padding_from_mask, sparse_attention_call
from . import data as pdata
from .train import GUIDANCE, SHIFT, proxy_adapter

DEFAULT_STEPS = 20


def proxy_sparse_config(density: float = 0.15, ssar_order: int = SparseConfig.ssar_order, **kw) -> SparseConfig:
    """The product's defaults (svg masks, 10% dense warm-up, refresh every 5 steps, rank 16) with blocks
    of 16 tokens: the proxy's 5 x 8 x 8 = 320 video tokens are 20 query and 20 key blocks (the product's
    128 / 64 would leave 3 x 5, where 15% could not be expressed: one key block is already 20%)."""
    base = dict(density=density, ssar_order=ssar_order, block_q=16, block_k=16)
    base.update(kw)
    return SparseConfig(**base)


@dataclass(frozen=True)
class Clip:
    prompt: pdata.Prompt
    seed: int


def benchmark_clips(n: int) -> list[Clip]:
    """``n`` fixed (prompt, seed) pairs; seeds 0..n-1 (training videos use seeds >= 2^40)."""
    return [Clip(p, i) for i, p in enumerate(pdata.benchmark_prompts(n))]


def initial_noise(seed: int, latent_frames: int = pdata.LATENT_FRAMES,
                  latent_size: int = pdata.LATENT_SIZE) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(1, pdata.LATENT_CHANNELS, latent_frames, latent_size, latent_size, generator=g)


def _sparse_attention(model: nn.Module, run: SparseRun, step: int, grid, img_len: int):
    def attn(q, k, v, *, mask=None, block_type="", block_index=0):
        if block_type not in ("double", "single"):
            return model.attention(q, k, v, mask=mask, block_type=block_type, block_index=block_index)
        kp = key_padding_from_mask(mask, q.shape[0], q.shape[2])

        def dense():  # warm-up steps: the model's own dense attention (SDPA), as the node chains to ComfyUI's
            m = None if mask is None else mask.to(q.dtype)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)

        out = sparse_attention_call(run, q, k, v, block_type=block_type, block_index=block_index, step=step,
                                    grid=grid, txt_len=q.shape[2] - img_len, cond_rows=list(range(q.shape[0]))
                                    if q.shape[0] > 1 else [0], key_padding=kp, dense=dense)
        b, h, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d)
    return attn


@dataclass
class SampleResult:
    latent: torch.Tensor  # [16, T, H, W] float32
    seconds: float
    summary: Optional[dict] = None  # the SparseRun's summary (density, steps by kind, cache) when sparse


def sample_clip(model: nn.Module, clip: Clip, *, steps: int = DEFAULT_STEPS, sparse: Optional[SparseConfig] = None,
                cfg: float = 1.0, latent_frames: int = pdata.LATENT_FRAMES, latent_size: int = pdata.LATENT_SIZE,
                trajectory: Optional[list] = None,
                condition: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> SampleResult:
    """Euler flow-matching sampling of one clip; dense when ``sparse`` is None.

    With ``cfg`` > 1 the conditional and zero-conditioned halves run as one batch of two (cond first),
    each keeping its own SSAR cache. ``trajectory``, when given, receives the model inputs
    ``(x, timestep, context, y, guidance)`` of every step (calibration data). ``condition``
    ``(context [Ltxt, C], pooled [768])`` replaces the prompt's embedding (e.g. ComfyUI's conditioning).
    """
    dev = next(iter(model.state_dict().values())).device
    ctx, y = condition if condition is not None else pdata.encode_prompt(clip.prompt, model.dims.context_in_dim)
    ctx, y = ctx.float()[None], y.float()[None]
    if cfg != 1.0:
        nctx, ny = pdata.null_condition(model.dims.context_in_dim)
        ctx, y = torch.cat([ctx, nctx[None]]), torch.cat([y, ny[None]])
    ctx, y = ctx.to(dev), y.to(dev)
    b = ctx.shape[0]
    guidance = torch.full((b,), GUIDANCE, device=dev)
    sigmas = simple_sigmas(steps, SHIFT)
    x = initial_noise(clip.seed, latent_frames, latent_size).to(dev) * sigmas[0]
    grid = (latent_frames, latent_size // 2, latent_size // 2)
    img_len = grid[0] * grid[1] * grid[2]
    run = SparseRun(sparse, sigmas) if sparse is not None else None
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for i in range(steps):
                s, s_next = float(sigmas[i]), float(sigmas[i + 1])
                xin = x.expand(b, *x.shape[1:])
                t = torch.full((b,), s * 1000.0, device=dev)
                if trajectory is not None:
                    trajectory.append((xin[:1].cpu(), t[:1].cpu(), ctx[:1].cpu(), y[:1].cpu(), guidance[:1].cpu()))
                attn = _sparse_attention(model, run, i, grid, img_len) if run is not None else None
                v = proxy_adapter().denoise(model, model_inputs(xin, t, ctx, y, guidance), attention=attn).float()
                if b > 1:  # CFG: uncond + cfg * (cond - uncond)
                    v = v[1:] + cfg * (v[:1] - v[1:])
                x = x + (s_next - s) * v
    finally:
        summary = None
        if run is not None:
            summary = run.summary()
            run.close()
    return SampleResult(x[0].float().cpu(), time.perf_counter() - t0, summary)


# ------------------------------------------------------------------------------------------ calibration seam

@dataclass
class CalibrationSet:
    """What a calibration may use: the dense proxy's model inputs along its own sampling trajectories
    for ``clips`` (prompts and seeds disjoint from the benchmark's), one tuple per step."""

    clips: list[Clip]
    steps: int
    inputs: list = field(default_factory=list)  # (x, timestep, context, y, guidance), batch 1, float32/CPU


@dataclass(frozen=True)
class CalibrationOptions:
    """Knobs the benchmark varies. None = the calibration's own default (design section 5)."""

    lambda_global: Optional[float] = None  # 0 removes MSAD's global (pooled attention map) term
    lambda_local: Optional[float] = None  # 0 removes MSAD's local (salient query rows) term
    sparse: Optional[SparseConfig] = None  # the attention the calibrated model will run under
    epochs: Optional[int] = None
    log: Optional[Callable[[str], None]] = None


class CalibrateFn(Protocol):
    def __call__(self, model: nn.Module, qconfig: QuantSparseConfig, calib: CalibrationSet,
                 options: CalibrationOptions) -> nn.Module:
        """A quantized copy of ``model`` (``model`` itself unchanged). May set ``.calibration_report``
        (a dict: per-block losses / errors) on the result for the demo's plot."""
        ...


def rtn_calibrate(model: nn.Module, qconfig: QuantSparseConfig, calib: Optional[CalibrationSet] = None,
                  options: Optional[CalibrationOptions] = None) -> nn.Module:
    """Round-to-nearest (smoothing 1, clipping 1): no data; the baseline every calibration starts from."""
    q = proxy_adapter().quantize_model(copy.deepcopy(model), qconfig)
    return q.eval()


def calibration_set(model: nn.Module, n_clips: int, steps: int, *, first_seed: int = 10_000,
                    stride: int = 1) -> CalibrationSet:
    """Dense trajectories of ``n_clips`` calibration clips (seeds from ``first_seed``, prompts offset from the
    benchmark's), keeping every ``stride``-th step's inputs."""
    clips = [Clip(pdata.prompt_for(i * 53 + 11), first_seed + i) for i in range(n_clips)]
    out = CalibrationSet(clips, steps)
    for c in clips:
        traj: list = []
        sample_clip(model, c, steps=steps, trajectory=traj)
        out.inputs.extend(traj[::stride])
    return out


def resolve_calibrate(name: str) -> CalibrateFn:
    """``"rtn"`` or ``"module:function"`` (a module of this package, e.g. ``"calibrate:calibrate_proxy"``)."""
    if name == "rtn":
        return rtn_calibrate
    import importlib

    mod_name, _, fn_name = name.partition(":")
    if not fn_name:
        raise ValueError(f"calibration {name!r}: use 'rtn' or 'module:function'")
    mod = importlib.import_module(("." + mod_name) if not mod_name.startswith(".") else mod_name, __package__)
    return getattr(mod, fn_name)


def decode(latent: torch.Tensor) -> torch.Tensor:
    """Preview pixels ``[3, F, 8H, 8W]`` in [-1, 1] of a ``[16, T, H, W]`` latent."""
    return pdata.decode_latent(latent)


def clip_pixels(results: Sequence[SampleResult]) -> torch.Tensor:
    """``[B, 3, F, H, W]`` decoded previews of several results."""
    return torch.stack([decode(r.latent) for r in results])
