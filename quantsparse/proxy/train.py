"""Train the proxy HunyuanVideo on procedural videos (rectified flow, as ComfyUI samples HunyuanVideo).

The proxy is ``HunyuanVideoDims.tiny()``: the real architecture (ComfyUI key names and detection, head
size 128, 2 heads, 2 double and 4 single blocks, ``vector_in`` and ``guidance_in``, a 64-wide text
context) at 10M parameters, so that quality figures (PSNR / SSIM of QuantSparse against the dense model)
are measured on attention with real structure instead of random weights.

Parameterisation (ComfyUI ``ModelSamplingDiscreteFlow`` + ``CONST``, shift 7 for HunyuanVideo):
``x_sigma = sigma * noise + (1 - sigma) * x0``, the model gets ``timestep = 1000 * sigma`` and predicts the
velocity ``noise - x0`` (ComfyUI's denoised = ``x - sigma * v``). Training draws sigma half uniformly and
half through ComfyUI's shift-7 warp (the sampler spends most steps at high noise), drops the text for
10% of the samples (the zero conditioning of ConditioningZeroOut: CFG works) and feeds the guidance
embedder a constant 6.0 (ComfyUI's FluxGuidance default; the proxy is not guidance-distilled).

    python -m comfyui_quantsparse.quantsparse.proxy.train --minutes 10 --device cuda --out X.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..calib.capture import model_inputs
from ..core.safetensors_io import write_safetensors
from ..core.schedule import time_snr_shift
from ..models import registry
from . import data as pdata

PROXY_ARCHITECTURE = "hunyuan_video"  # the family of the bundled proxy (issue 17 adds a Wan one)
SHIFT = registry.by_name(PROXY_ARCHITECTURE).sampling.shift  # ComfyUI's sampling_settings for the family
GUIDANCE = registry.by_name(PROXY_ARCHITECTURE).sampling.guidance
TEXT_DROPOUT = 0.1
METADATA_KEY = "quantsparse_proxy"
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "models" / "proxy" / "hunyuan_video_proxy.safetensors"


def proxy_adapter():
    """The adapter of the proxy's family: its tiny dims, torch model, quantization and model call."""
    return registry.by_name(PROXY_ARCHITECTURE)


def proxy_dims():
    return proxy_adapter().tiny_dims()


def new_model(seed: int = 0, dtype: torch.dtype = torch.float32, device=None) -> nn.Module:
    """A freshly initialised proxy: PyTorch's default Linear init, adaLN-zero (modulations and the output
    layer start at zero, so every block starts as the identity, as DiT trains), norm weights 1."""
    torch.manual_seed(seed)
    model = proxy_adapter().build_model(proxy_dims(), dtype=dtype, device=device)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            if name.endswith(("mod.lin", "modulation.lin", "adaLN_modulation.1")) or name == "final_layer.linear":
                nn.init.zeros_(mod.weight)
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, (nn.RMSNorm, nn.LayerNorm)) and getattr(mod, "weight", None) is not None:
            nn.init.ones_(mod.weight)
    return model


def draw_sigmas(b: int, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(b, generator=gen)
    shifted = torch.rand(b, generator=gen) < 0.5
    return torch.where(shifted, time_snr_shift(SHIFT, u), u)


def flow_loss(model: nn.Module, batch: pdata.Batch, gen: torch.Generator, device) -> torch.Tensor:
    """Rectified-flow MSE on velocity for one batch; noise, sigmas and text dropout from ``gen``."""
    x0 = batch.latent
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=gen)
    sigma = draw_sigmas(b, gen)
    keep = (torch.rand(b, generator=gen) >= TEXT_DROPOUT).float()
    s = sigma.view(b, 1, 1, 1, 1)
    xt = s * noise + (1 - s) * x0
    target = noise - x0
    ctx = batch.context * keep.view(b, 1, 1)
    y = batch.pooled * keep.view(b, 1)
    dev = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    pred = proxy_adapter().denoise(model, model_inputs(dev(xt), dev(sigma * 1000), dev(ctx), dev(y),
                                                       dev(torch.full((b,), GUIDANCE))))
    return (pred.float() - dev(target)).square().mean()


@torch.no_grad()
def evaluate_loss(model: nn.Module, batch: pdata.Batch, seed: int = 0) -> float:
    """The flow loss on a fixed batch with fixed noise and sigmas: comparable across training steps."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    loss = float(flow_loss(model, batch, torch.Generator().manual_seed(seed), dev))
    model.train(was)
    return loss


class _Stream(torch.utils.data.Dataset):
    """Batch ``i`` of the training stream (deterministic by (data_seed, i), whichever worker renders it)."""

    def __init__(self, batch_size: int, context_dim: int, data_seed: int, length: int, latent: tuple[int, int]):
        self.batch_size, self.context_dim, self.data_seed, self.length = batch_size, context_dim, data_seed, length
        self.latent = latent

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        bt = pdata.training_batch(i, self.batch_size, self.context_dim, data_seed=self.data_seed,
                                  latent_frames=self.latent[0], latent_size=self.latent[1])
        return bt.latent, bt.context, bt.pooled


def _one_thread(_worker: int) -> None:
    """Data workers render on one thread each (12 workers x torch's default threads would oversubscribe)."""
    torch.set_num_threads(1)


@dataclass
class TrainConfig:
    minutes: float = 10.0
    max_steps: int = 0  # 0: until the time budget is spent
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 200
    ema: float = 0.999
    seed: int = 0
    data_seed: int = 0
    device: str = "cpu"
    workers: int = 0
    threads: int = 0  # torch.set_num_threads on CPU (0: leave as is)
    log_every: int = 25
    latent_frames: int = pdata.LATENT_FRAMES  # smaller only in tests
    latent_size: int = pdata.LATENT_SIZE


@dataclass
class TrainResult:
    state: dict  # EMA weights, float32, ComfyUI key names
    steps: int
    seconds: float
    losses: list = field(default_factory=list)  # (step, mean loss over the last log_every steps)
    config: Optional[TrainConfig] = None

    def card(self) -> dict:
        return {"steps": self.steps, "seconds": round(self.seconds, 1), "config": asdict(self.config),
                "loss_first": self.losses[0][1] if self.losses else None,
                "loss_last": self.losses[-1][1] if self.losses else None, "losses": self.losses}


def _lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% over the budget (steps or wall time, whichever binds)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(cfg: TrainConfig, *, model: Optional[nn.Module] = None, log=print) -> TrainResult:
    """Train until ``cfg.minutes`` of wall time or ``cfg.max_steps`` steps; returns the EMA weights."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    model = model if model is not None else new_model(cfg.seed, device=device)
    model.to(device).train()
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    decay_params = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay_params, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))
    length = cfg.max_steps if cfg.max_steps else 10**9
    loader = torch.utils.data.DataLoader(_Stream(cfg.batch_size, model.dims.context_in_dim, cfg.data_seed, length,
                                                 (cfg.latent_frames, cfg.latent_size)),
                                         batch_size=None, shuffle=False, num_workers=cfg.workers,
                                         pin_memory=device.type == "cuda", prefetch_factor=4 if cfg.workers else None,
                                         persistent_workers=False, worker_init_fn=_one_thread)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    budget = cfg.minutes * 60.0
    start = time.perf_counter()
    losses, window, step = [], [], 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()
    for latent, context, pooled in loader:
        elapsed = time.perf_counter() - start
        if (cfg.max_steps and step >= cfg.max_steps) or (not cfg.max_steps and elapsed >= budget):
            break
        progress = step / cfg.max_steps if cfg.max_steps else elapsed / budget
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, progress, cfg.warmup_steps)
        batch = pdata.Batch(latent, context, pooled, [], [])
        with autocast:
            loss = flow_loss(model, batch, gen, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        d = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
        window.append(loss.item())
        step += 1
        if step % cfg.log_every == 0:
            mean = sum(window) / len(window)
            losses.append((step, round(mean, 5)))
            window = []
            log(f"step {step}  loss {mean:.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"{time.perf_counter() - start:.0f} s")
    if window:
        losses.append((step, round(sum(window) / len(window), 5)))
    state = {k: v.cpu() for k, v in ema.items()}
    return TrainResult(state, step, time.perf_counter() - start, losses, cfg)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def save_proxy(path: str | os.PathLike, state: dict, card: dict, *, dtype: torch.dtype = torch.bfloat16,
               overwrite: bool = False) -> int:
    """Write the weights (ComfyUI key names, ``dtype``) atomically, with the training card as metadata."""
    path = Path(path)
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in sorted(state.items())}
    meta = {METADATA_KEY: json.dumps({"dims": proxy_dims().to_dict(), "shift": SHIFT, "guidance": GUIDANCE,
                                      "latent": "quantsparse.proxy_data.encode_video", **card})}
    return write_safetensors(path, tensors, meta, overwrite=overwrite)


def check_proxy_file(path: str | os.PathLike) -> Path:
    """``path`` as a plain (BF16/FP32) model of the proxy's family to sample from, checked from its header: a
    QuantSparse checkpoint or another kind of file is refused with what it is, before anything is loaded."""
    from ..checkpoint.format import METADATA_KEY as CHECKPOINT_KEY
    from ..core.errors import QuantSparseError
    from ..core.paths import input_file
    from ..core.safetensors_io import read_header

    p = input_file(path, "the proxy weights (--weights)")
    header = read_header(p)
    if CHECKPOINT_KEY in (header.metadata or {}):
        raise QuantSparseError(f"--weights {p} is a QuantSparse checkpoint; the demo quantizes the model itself and "
                               f"needs the full-precision proxy (default {DEFAULT_PATH.name}, in models/proxy/).")
    _, shapes = registry.split_prefix(header.shapes)
    title = proxy_adapter().title
    if not proxy_adapter().claims(shapes):
        raise QuantSparseError(f"--weights {p} is not a {title} model: it looks like "
                               f"{registry.describe(header.shapes)}. Use the bundled proxy ({DEFAULT_PATH.name}, "
                               f"in models/proxy/) or a {title} file.")
    return p


def load_proxy(path: str | os.PathLike = DEFAULT_PATH, dtype: torch.dtype = torch.bfloat16,
               device="cpu") -> nn.Module:
    """The proxy as its family's torch model (``dtype``), checked against ComfyUI's detection rules."""
    return read_proxy(check_proxy_file(path), dtype, device)


def read_proxy(path: Path, dtype: torch.dtype = torch.bfloat16, device="cpu") -> nn.Module:
    """``load_proxy`` of a file ``check_proxy_file`` has passed."""
    from safetensors.torch import load_file

    _, sd = registry.split_prefix(load_file(str(path)))  # as ComfyUI strips model.diffusion_model.
    adapter = proxy_adapter()
    dims = adapter.dims_from_shapes({k: v.shape for k, v in sd.items()})
    model = adapter.build_model(dims, dtype=dtype, device=device)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True)
    return model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="proxy_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="wall-time budget (default 10)")
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: use the time budget)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(DEFAULT_PATH))
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (the shipped proxy by default)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 on CUDA, 8 on CPU")
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 on CUDA, 6e-4 on CPU")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--ema", type=float, default=None, help="EMA decay (default 0.999 on CUDA, 0.995 on CPU)")
    p.add_argument("--workers", type=int, default=None, help="data workers (default 12 on CUDA, 0 on CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    a = p.parse_args(argv)
    from ..core.errors import QuantSparseError
    from ..core.paths import output_file

    try:  # before the training run, not after it
        output_file(a.out, "the proxy weights (--out)", overwrite=a.overwrite)
    except QuantSparseError as e:
        print(f"proxy_train: error: {e}", file=sys.stderr)
        return 2
    cuda = a.device.startswith("cuda")
    cfg = TrainConfig(minutes=a.minutes, max_steps=a.steps, batch_size=a.batch_size or (64 if cuda else 8),
                      lr=a.lr or (1e-3 if cuda else 6e-4), warmup_steps=a.warmup if a.warmup is not None else
                      (200 if cuda else 50), ema=a.ema or (0.999 if cuda else 0.995), seed=a.seed,
                      data_seed=a.data_seed, device=a.device, workers=a.workers if a.workers is not None else
                      (12 if cuda else 0), threads=a.threads)
    print(f"training the proxy HunyuanVideo ({sum(v.numel() for v in new_model().state_dict().values()) / 1e6:.1f}M "
          f"parameters) on {cfg.device} for {cfg.max_steps or str(cfg.minutes) + ' min'}", flush=True)
    result = train(cfg, log=lambda s: print(s, flush=True))
    card = result.card()
    card["device"] = torch.cuda.get_device_name(0) if cuda else "cpu"
    card["torch"] = torch.__version__
    size = save_proxy(a.out, result.state, card, overwrite=a.overwrite)
    print(f"wrote {a.out} ({size / 2**20:.1f} MiB): {result.steps} steps in {result.seconds:.0f} s, "
          f"loss {card['loss_first']} -> {card['loss_last']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
