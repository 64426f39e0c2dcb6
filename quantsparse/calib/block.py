"""MSAD calibration of one transformer block (DESIGN.md section 5; paper notes sections 2 and 4).

For each sample the full-precision block runs once, dense: its outputs are the targets (and the
next block's inputs), its q and k give the MSAD targets (pooled map, salient rows) and its q, k, v
choose each head's svg pattern. Then a copy of the block with every quantized Linear replaced by a
``FakeQuantLinear`` runs with dense attention (or svg-sparse attention at the target density, when
``settings.sparse_attention``: see ``calib.settings``) and learns smoothing and
clipping against ``MSE(out) + lambda_g * L_global + lambda_l * L_local`` with AdamW under a cosine
schedule, ``epochs`` passes over the samples in a seeded order. One block is on the device at a time;
samples and targets stay on the host unless they fit ``device_cache_bytes``.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..core.fakequant import FakeQuantLinear, wrap_linears
from ..core.config import kind_group_size, kind_rotate
from ..models import registry
from ..models.base import BlockRef, ModelAdapter
from .attention import CalibAttention, band_token_mask, temporal_heads
from .msad import (
    global_loss,
    local_attention,
    local_loss,
    mse,
    normalised_lambdas,
    pooled_attention,
    saliency,
    salient_indices,
)
from .settings import CalibSettings

ETA_MIN_FACTOR = 1e-3  # cosine schedule floor: lr * 1e-3 (FlatQuant)


def block_layers(block: nn.Module, ref: BlockRef, settings: CalibSettings, adapter: ModelAdapter
                 ) -> dict[str, tuple[str, int, bool]]:
    """{name within the block: (kind, group size, rotate)} of every Linear the checkpoint quantizes."""
    config = settings.quant_config()
    out = {}
    for name, mod in block.named_modules():
        if isinstance(mod, nn.Linear):
            kind = adapter.layer_kind(f"{ref.prefix}.{name}", config)
            if kind is not None:
                out[name] = (kind, kind_group_size(kind, config), kind_rotate(kind, config))
    return out


# ------------------------------------------------------------------------------------ one call

class _Family:
    """The family's calibration hooks for one block: running it on a sample, and the RoPE tables of a
    geometry (cached on the device). A sample's geometry ``(grid, txt_len)`` is read once, from the host
    sample (reading it from a device copy would synchronise on every training step)."""

    def __init__(self, adapter: ModelAdapter, ref: BlockRef, dims, device):
        self.adapter, self.ref, self.dims, self.device, self.cache = adapter, ref, dims, device, {}

    def rope(self, geom):
        grid, txt_len = geom
        key = (tuple(grid), txt_len)
        if key not in self.cache:
            self.cache[key] = self.adapter.calib_rope(self.dims, grid, txt_len, self.device)
        return self.cache[key]

    def run(self, block, sample, pe, attention):
        return self.adapter.calib_run_block(self.ref, block, sample, pe, attention)


def _flat(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([outputs[k].reshape(-1) for k in sorted(outputs)])


def _to(sample: dict[str, torch.Tensor], device, dtype=None) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sample.items():
        v = v.to(device, non_blocking=True)
        if v.is_inference():  # recorded under ComfyUI's inference mode: autograd cannot save those
            v = v.clone()
        if dtype is not None and v.is_floating_point():  # activations and the additive mask: the block's dtype
            v = v.to(dtype)
        out[k] = v
    return out


# ------------------------------------------------------------------------------------ targets

@dataclass
class Target:
    out: dict[str, torch.Tensor]  # full-model block outputs
    pooled: torch.Tensor  # float32 [B, H, L~, L~]
    idx: torch.Tensor  # int64 [B, k] salient tokens
    rows: torch.Tensor  # float16 [B, H, k, L] full-model salient rows
    temporal: Optional[torch.Tensor]  # bool [B, H] svg heads run frame-major, None when dense

    def to(self, device) -> "Target":
        return Target({k: v.to(device, non_blocking=True) for k, v in self.out.items()},
                      self.pooled.to(device, non_blocking=True), self.idx.to(device, non_blocking=True),
                      self.rows.to(device, non_blocking=True),
                      None if self.temporal is None else self.temporal.to(device))

    @property
    def nbytes(self) -> int:
        ts = [*self.out.values(), self.pooled, self.idx, self.rows]
        return sum(t.numel() * t.element_size() for t in ts)


@torch.no_grad()
def full_model_targets(block: nn.Module, fam: _Family, sample: dict[str, torch.Tensor], geom, pe: torch.Tensor,
                       settings: CalibSettings, act_absmax: dict[str, torch.Tensor], names: Sequence[str]
                       ) -> Target:
    """Dense forward of the full-precision ``block`` on one (device) sample; also accumulates each quantized
    Linear's per-channel input absmax into ``act_absmax`` (for the SmoothQuant initialisation)."""
    hooks = []
    for name in names:
        def hook(mod, args, _out, name=name):
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            act_absmax[name] = a if name not in act_absmax else torch.maximum(act_absmax[name], a)
        hooks.append(block.get_submodule(name).register_forward_hook(hook))
    grid, txt_len = geom
    attn = CalibAttention(grid=grid, txt_len=txt_len)
    try:
        out = fam.run(block, sample, pe, attn)
    finally:
        for h in hooks:
            h.remove()
    q, k, v = attn.q, attn.k, attn.v
    bias = sample.get("mask")
    idx = salient_indices(saliency(q, k, bias), settings.salient_tokens)
    temporal = None
    if settings.masked:
        temporal = temporal_heads(q, k, v, grid=grid, txt_len=txt_len, density=settings.density,
                                  block_q=settings.block_q, block_k=settings.block_k, bias=bias)
    return Target({k_: v_.detach() for k_, v_ in out.items()}, pooled_attention(q, k, settings.pool_stride),
                  idx, local_attention(q, k, idx, bias).to(torch.float16), temporal)


# ------------------------------------------------------------------------------------ losses

def sample_losses(qblock: nn.Module, fam: _Family, sample, geom, target: Target, settings: CalibSettings,
                  token_masks: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output MSE, L_global, L_local) of the quantized block on one device sample of geometry ``geom``."""
    grid, txt_len = geom
    pe = fam.rope(geom)
    mask = None
    if settings.masked:
        key = (grid, txt_len)
        if key not in token_masks:  # the additive form, made once: a [L, L] mask is 400 MB at 848x480x33
            keep = band_token_mask(grid, txt_len, settings.density, settings.block_q, settings.block_k,
                                   device=pe.device)
            dtype = next(v.dtype for v in sample.values() if v.is_floating_point())  # the block's (see _to)
            token_masks[key] = torch.zeros(keep.shape, dtype=dtype, device=pe.device).masked_fill_(~keep, float("-inf"))
        mask = token_masks[key]
    attn = CalibAttention(grid=grid, txt_len=txt_len, token_mask=mask, temporal=target.temporal)
    out = fam.run(qblock, sample, pe, attn)
    l_out = mse(_flat(out), _flat(target.out))
    l_g = global_loss(target.pooled, attn.q, attn.k, settings.pool_stride)
    l_l = local_loss(target.rows, attn.q, attn.k, target.idx, sample.get("mask"))
    return l_out, l_g, l_l


@dataclass
class BlockResult:
    key: str
    params: dict[str, tuple[Optional[torch.Tensor], torch.Tensor]]  # layer name in block -> (smooth, clip)
    metrics: dict = field(default_factory=dict)


def _set_mode(layers: dict[str, FakeQuantLinear], *, rtn: bool) -> None:
    for m in layers.values():
        m.rtn = rtn


def _evaluate(qblock, fam: _Family, samples, geoms, targets, settings, token_masks, device, dtype
              ) -> dict[str, float]:
    sums = {"out": 0.0, "global": 0.0, "local": 0.0}
    with torch.no_grad():
        for s, geom, t in zip(samples, geoms, targets):
            terms = sample_losses(qblock, fam, _to(s, device, dtype), geom, t.to(device), settings, token_masks)
            for key, v in zip(("out", "global", "local"), terms):
                sums[key] += float(v)
    return {k: v / max(1, len(samples)) for k, v in sums.items()}


def _total(terms: dict[str, float], lg: float, ll: float) -> float:
    return terms["out"] + lg * terms["global"] + ll * terms["local"]


def _cosine(step: int, total: int) -> float:
    return ETA_MIN_FACTOR + (1 - ETA_MIN_FACTOR) * 0.5 * (1 + math.cos(math.pi * step / max(1, total)))


def calibrate_block(ref: BlockRef, samples: Sequence[dict[str, torch.Tensor]], settings: CalibSettings, dims, *,
                    device="cpu", dtype=None,
                    on_outputs: Optional[Callable[[int, dict[str, torch.Tensor]], None]] = None,
                    check_stop: Optional[Callable[[], None]] = None, device_cache_bytes: int = 4 << 30,
                    log: Optional[Callable[[str], None]] = None) -> BlockResult:
    """Calibrate the block ``ref`` (left unchanged; its family from ``dims``) on host ``samples``; ``on_outputs(i, outputs)`` receives each
    sample's full-model outputs (host tensors, the next block's inputs) in order; ``check_stop`` is called
    between steps and may raise to interrupt. Runs with autograd on even when called under ComfyUI's
    inference mode."""
    with torch.inference_mode(False), torch.enable_grad():
        return _calibrate_block(ref, samples, settings, dims, device=device, dtype=dtype,
                                on_outputs=on_outputs, check_stop=check_stop, device_cache_bytes=device_cache_bytes,
                                log=log)


def _calibrate_block(ref: BlockRef, samples, settings, dims, *, device, dtype, on_outputs, check_stop,
                     device_cache_bytes, log) -> BlockResult:
    t0 = time.perf_counter()
    device = torch.device(device)
    key = ref.key
    adapter = registry.adapter_for(dims)
    fp = copy.deepcopy(ref.module).to(device)
    dtype = dtype or next(fp.parameters()).dtype
    fp.to(dtype)
    for t in list(fp.parameters()) + list(fp.buffers()):
        if t.is_inference():
            t.data = t.data.clone()
    names = block_layers(fp, ref, settings, adapter)
    fam = _Family(adapter, ref, dims, device)

    # 1. full-model targets, one sample at a time
    act_absmax: dict[str, torch.Tensor] = {}
    targets: list[Target] = []
    geoms = []
    for n, s in enumerate(samples):
        geoms.append(adapter.calib_geometry(s))
        sd = _to(s, device, dtype)
        t = full_model_targets(fp, fam, sd, geoms[n], fam.rope(geoms[n]), settings, act_absmax, list(names))
        host_out = {k: v.to("cpu") for k, v in t.out.items()}
        if on_outputs is not None:
            on_outputs(n, host_out)
        targets.append(t)
    on_device = device.type != "cpu" and sum(t.nbytes for t in targets) <= device_cache_bytes
    targets = [t if on_device else t.to("cpu") for t in targets]
    if device.type == "cuda" and not on_device:
        targets = [Target({k: v.pin_memory() for k, v in t.out.items()}, t.pooled.pin_memory(), t.idx,
                          t.rows.pin_memory(), t.temporal) for t in targets]

    # 2. the quantized copy; baseline (round-to-nearest) and the better of two initialisations
    layers = wrap_linears(fp, names)
    for p in fp.parameters():
        p.requires_grad_(False)
    token_masks: dict = {}
    ev = lambda: _evaluate(fp, fam, samples, geoms, targets, settings, token_masks, device, dtype)  # noqa: E731
    _set_mode(layers, rtn=True)
    rtn = ev()
    _set_mode(layers, rtn=False)
    init_identity = ev()
    for name, m in layers.items():
        if name in act_absmax:
            m.init_smoothquant(act_absmax[name])
    init_sq = ev()
    if settings.lambda_global is None or settings.lambda_local is None:
        ng, nl = normalised_lambdas(*(min(init_identity[k], init_sq[k]) for k in ("out", "global", "local")))
    lg = settings.lambda_global if settings.lambda_global is not None else ng
    ll = settings.lambda_local if settings.lambda_local is not None else nl
    choice = "smoothquant"
    if _total(init_identity, lg, ll) <= _total(init_sq, lg, ll):
        choice = "identity"
        for m in layers.values():
            m.reset_identity()
    init = init_identity if choice == "identity" else init_sq

    # 3. AdamW + cosine over epochs x samples, seeded order
    smooth_params = [m.log_smooth for m in layers.values() if m.log_smooth is not None]
    clip_params = [m.clip_logit for m in layers.values()]
    for p in smooth_params + clip_params:
        p.requires_grad_(True)
    groups = [{"params": clip_params, "lr": settings.lr_clip}]
    if smooth_params:
        groups.insert(0, {"params": smooth_params, "lr": settings.lr_smooth})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    total = settings.epochs * len(samples)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _cosine(step, total))
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + (500 if ref.kind == "single" else 0) + ref.index)
    step = 0
    for epoch in range(settings.epochs):
        for i in torch.randperm(len(samples), generator=gen).tolist():
            if check_stop is not None:
                check_stop()
            l_out, l_g, l_l = sample_losses(fp, fam, _to(samples[i], device, dtype), geoms[i], targets[i].to(device),
                                            settings, token_masks)
            loss = l_out + lg * l_g + ll * l_l
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        if log is not None:
            log(f"{key}: epoch {epoch + 1}/{settings.epochs} loss {float(loss.detach()):.4g}")

    # 4. final figures; never worse than where it started
    for p in smooth_params + clip_params:
        p.requires_grad_(False)
    final = ev()
    kept = "learned"
    if _total(final, lg, ll) > _total(init, lg, ll):
        kept = "init"
        for m in layers.values():
            m.reset_identity()
        if choice == "smoothquant":
            for name, m in layers.items():
                if name in act_absmax:
                    m.init_smoothquant(act_absmax[name])
        final = init
    params = {name: m.exported() for name, m in layers.items()}
    metrics = {"rtn": rtn, "init": init, "final": final, "init_choice": choice, "kept": kept,
               "lambda_global": lg, "lambda_local": ll, "steps": step, "samples": len(samples),
               "seconds": time.perf_counter() - t0}
    del fp, targets, layers, opt
    return BlockResult(key, params, metrics)
