"""The attention override's logic with its per-run state: which calls go dense, sparse or refresh.

ComfyUI hands every attention call of the model to one override (``nodes/sparse_patch.py``); the model
family's adapter says what a call is (``ModelAdapter.attention_call``), and everything that decides and
computes lives here, torch only, so that the CPU tests drive it with random q, k, v or the torch models.
Every call that is not sparsified is counted with its reason, and the report shows them.

One ``SparseRun`` exists per sampling run (created by the OUTER_SAMPLE wrapper, closed in its
``finally``): a run with other settings, another resolution or another prompt never sees a stale
SSAR correction. Per call, ``sparse_attention_call``:

- DENSE steps (the warm-up, or density 1): the caller's dense attention (the chained backend);
- REFRESH steps: the kernel's refresh mode, one dense pass that also keeps the sparse output on the
  way and returns the residual (dense - sparse) the SSAR cache keeps;
- SPARSE steps: the sparse pass plus the cached correction.

The cache is keyed by (block type, block index, cond/uncond, which chunk of that kind), so the cond
and uncond halves of a CFG batch (ComfyUI may batch them as ``cond_or_uncond = [1, 0]``) keep their
own residuals whether they arrive batched or one at a time.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Optional, Sequence

import torch

from .config import SparseConfig
from .masked import masked_attention
from .masks import build_mask, cat_masks
from .ssar import DEFAULT_LAYOUT, DENSE, REFRESH, SPARSE, CacheLayout, SSARState, step_kind

# Additive mask entries at or below this are padding: ComfyUI writes -finfo(dtype).max there.
PADDING_THRESHOLD = -1.0e4


def step_index(sample_sigmas: torch.Tensor, sigmas: torch.Tensor, after: int = 0) -> int:
    """Position of the current ``sigmas[0]`` in the run's schedule ``sample_sigmas``.

    Schedules may repeat a sigma (some schedulers end on repeated values; a sampler may call the model
    twice at one sigma), so among equal entries this takes the first at or after ``after`` (the last
    step seen): steps never run backwards inside a run. A sigma absent from the schedule (samplers
    that evaluate at midpoints, e.g. dpm_2) belongs to the step whose interval contains it.
    """
    sched = sample_sigmas.detach().flatten().float().cpu()
    s = float(sigmas.detach().flatten()[0].float().cpu())
    hits = (sched == s).nonzero().flatten().tolist()
    if hits:
        later = [i for i in hits if i >= after]
        return later[0] if later else hits[-1]
    # descending schedule: the number of entries above s, minus one, is the interval's start
    above = int((sched > s).sum())
    return min(max(above - 1, 0), max(len(sched) - 2, 0))


def key_padding_from_mask(mask: Optional[torch.Tensor], batch: int, seq: int) -> Optional[torch.Tensor]:
    """bool ``[B, L]`` (True = a real key) from the mask the attention call received, or None.

    ComfyUI's HunyuanVideo passes an additive ``[1, 1, L]`` float mask (0 keep, -finfo.max padding)
    or a bool one (True keep); anything that varies over query rows is not a key padding mask and is
    refused, because the block-sparse kernel cannot honour it.
    """
    if mask is None:
        return None
    if mask.shape[-1] != seq:
        raise ValueError(f"attention mask {tuple(mask.shape)} does not end in the sequence length {seq}")
    m = mask.reshape(-1, seq) if mask.dim() <= 2 else mask
    if m.dim() > 2:
        lead = m.shape[:-1]
        if any(d != 1 for d in lead[1:]):
            raise ValueError(f"attention mask {tuple(mask.shape)} varies over query rows; QuantSparse's sparse "
                             "attention supports only a key padding mask ([B or 1, 1, L])")
        m = m.reshape(lead[0], seq)
    keep = m if m.dtype == torch.bool else m.float() > PADDING_THRESHOLD
    if bool(keep.all()):
        return None
    if keep.shape[0] not in (1, batch):
        raise ValueError(f"attention mask batch {keep.shape[0]} does not match q's batch {batch}")
    return keep.expand(batch, seq).contiguous()


class SparseRun:
    """State of one sampling run: the schedule, the SSAR cache and what happened (``summary``)."""

    def __init__(self, config: SparseConfig, sample_sigmas: torch.Tensor, *, layout: CacheLayout = DEFAULT_LAYOUT,
                 from_noise: bool = True):
        """``from_noise`` False: the run samples only a later range of a schedule (the low-noise expert of a
        Wan 2.2 A14B pair after its ``KSamplerAdvanced`` start step, or a partial denoise): the dense
        warm-up belongs to the high-noise start that another run sampled, so this run starts with a
        refresh step instead."""
        if not isinstance(config, SparseConfig):
            raise ValueError(f"SparseRun needs a SparseConfig, got {type(config).__name__}")
        sigmas = torch.as_tensor(sample_sigmas).detach().flatten().float().cpu()
        if sigmas.numel() < 2:
            raise ValueError(f"sample_sigmas must hold at least 2 values (one step), got {sigmas.numel()}")
        if not from_noise and config.dense_warmup > 0 and not config.is_dense:
            config = dataclasses.replace(config, dense_warmup=0.0)
        self.from_noise = from_noise
        self.config = config
        self.sample_sigmas = sigmas
        self.total_steps = sigmas.numel() - 1
        self.ssar = SSARState(config, total_steps=self.total_steps, layout=layout)
        self.last_step = 0
        self.steps_by_kind: dict[str, set] = {DENSE: set(), REFRESH: set(), SPARSE: set()}
        self._masks: dict = {}  # per call site: (mask, step it was chosen at)
        self.mask_builds = 0
        self.calls: Counter = Counter()      # per kind, plus "passthrough"
        self.dense_reasons: Counter = Counter()  # every call not sparsified, by why
        self._density_sum = 0.0               # over masked (refresh + sparse) calls
        self._masked_calls = 0
        self.peak_cache_bytes = 0
        self.step_seconds: dict[int, float] = {}
        self.closed = False

    # -- schedule
    def step_of(self, sigmas: torch.Tensor) -> int:
        step = step_index(self.sample_sigmas, sigmas, after=self.last_step)
        self.last_step = step
        return step

    def kind(self, step: int) -> str:
        return step_kind(min(step, self.total_steps - 1), self.total_steps, self.config)

    @contextmanager
    def timed(self, step: int, device: Optional[torch.device] = None):
        """Adds the wall time of the block (one model call) to ``step``; synchronises CUDA so the
        time is the GPU's, not the launch's."""
        def sync():
            if device is not None and torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
        sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.step_seconds[step] = self.step_seconds.get(step, 0.0) + time.perf_counter() - t0

    # -- bookkeeping
    def record(self, kind: str, step: int, density: Optional[float] = None) -> None:
        self.calls[kind] += 1
        if kind in self.steps_by_kind:
            self.steps_by_kind[kind].add(step)
        if density is not None:
            self._density_sum += density
            self._masked_calls += 1
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.ssar.cache_bytes())

    def note_dense_step(self, step: int) -> None:
        """A video attention call run dense because its step is (warm-up, or density 1)."""
        self.record(DENSE, step)
        self.dense_reasons["dense step (warm-up or density 1)"] += 1

    def note_passthrough(self, reason: str = "not a video attention call") -> None:
        """A call the patch leaves dense, with the reason the report counts it under."""
        self.calls["passthrough"] += 1
        self.dense_reasons[reason] += 1

    def mask_for(self, site, step: int, kind: str, build):
        """The mask of one call site (block, shapes): chosen at each refresh step and kept until the next,
        so that the sparse steps add each SSAR correction under the mask it was measured with, and the
        selection (sampled rows, spatial/temporal choice) is paid once per interval, not per step.
        Without refreshes (SSAR off) it is chosen again every ``refresh_interval`` steps."""
        cached = self._masks.get(site)
        if kind == REFRESH or cached is None or step - cached[1] >= self.config.refresh_interval or step < cached[1]:
            cached = (build(), step)
            self._masks[site] = cached
            self.mask_builds += 1
        return cached[0]

    def summary(self) -> dict:
        """What the run did: step counts per kind, achieved density, cache memory, time per step."""
        secs = [self.step_seconds[s] for s in sorted(self.step_seconds)]
        return {
            "steps": self.total_steps,
            "dense_steps": len(self.steps_by_kind[DENSE]),
            "mask_builds": self.mask_builds,
            "refresh_steps": len(self.steps_by_kind[REFRESH]),
            "sparse_steps": len(self.steps_by_kind[SPARSE]),
            "attention_calls": {k: int(v) for k, v in sorted(self.calls.items())},
            "dense_reasons": {k: int(v) for k, v in self.dense_reasons.most_common()},
            "from_noise": self.from_noise,
            "achieved_density": (self._density_sum / self._masked_calls) if self._masked_calls else None,
            "cache_bytes": self.ssar.cache_bytes(),
            "peak_cache_bytes": self.peak_cache_bytes,
            "ssar": dict(self.ssar.stats),
            "seconds_per_step": (sum(secs) / len(secs)) if secs else None,
            "step_seconds": secs,
        }

    def close(self) -> None:
        """Free the cache (the OUTER_SAMPLE wrapper's ``finally``); the summary's counts stay."""
        self.ssar.entries.clear()
        self._masks.clear()
        self.closed = True


def format_summary(s: dict) -> str:
    """Human-readable lines for the node's UI text: what ran sparse, and every call that did not, by why."""
    dens = "n/a (no sparse call)" if s["achieved_density"] is None else f"{s['achieved_density']:.3f}"
    sps = "n/a" if s["seconds_per_step"] is None else f"{s['seconds_per_step']:.3f} s"
    reasons = s.get("dense_reasons") or {}
    lines = [f"steps: {s['steps']} (dense {s['dense_steps']}, refresh {s['refresh_steps']}, "
             f"sparse {s['sparse_steps']})" + ("" if s.get("from_noise", True) else
                                               " - a later range of the schedule: no warm-up, a refresh first"),
             f"achieved density: {dens}",
             f"SSAR cache: peak {s['peak_cache_bytes'] / 2**20:.2f} MiB; corrections {s['ssar']['corrections']}, "
             f"misses {s['ssar']['misses']}",
             f"time per step: {sps}",
             f"attention calls: {s['attention_calls']}",
             "not sparsified: " + (", ".join(f"{r} {n}" for r, n in reasons.items()) if reasons else "none")]
    if s.get("warning"):
        lines.insert(0, "WARNING: " + s["warning"])
    calls = s["attention_calls"]
    if not calls.get("sparse") and not calls.get("refresh") and (calls.get("passthrough") or calls.get("dense")):
        lines.append("WARNING: no attention call of this run ran sparse (see 'not sparsified' above)")
    return "\n".join(lines)


def _chunk_keys(block_type: str, block_index: int, cond_rows: Optional[Sequence[int]], batch: int):
    """[(key, row slice)] : one SSAR key per CFG chunk of the batch."""
    if not cond_rows or batch % len(cond_rows):
        return [((block_type, block_index, "all", 0), slice(0, batch))]
    per = batch // len(cond_rows)
    seen: Counter = Counter()
    out = []
    for j, c in enumerate(cond_rows):
        out.append(((block_type, block_index, int(c), seen[c]), slice(j * per, (j + 1) * per)))
        seen[c] += 1
    return out


def sparse_attention_call(run: SparseRun, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                          block_type: str, block_index: int, step: int, grid: tuple[int, int, int], txt_len: int,
                          cond_rows: Optional[Sequence[int]] = None, key_padding: Optional[torch.Tensor] = None,
                          dense: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
    """``[B, H, L, D]`` attention output of one joint-attention call of ``step``.

    ``dense()`` computes dense attention the caller's way (in ComfyUI: the chained backend, which
    honours the mask itself), for dense steps and the dense half of refresh steps; without it they run the
    kernel's dense and one-launch refresh modes. ``cond_rows`` is
    ``transformer_options["cond_or_uncond"]`` (one entry per equal chunk of the batch).
    """
    if run.closed:
        raise RuntimeError("this SparseRun was closed at the end of its sampling run; create a new one per run")
    b, h, seq, d = q.shape
    img_len = seq - txt_len
    t, hh, ww = grid
    if img_len < 1 or t * hh * ww != img_len:
        raise ValueError(f"{block_type} block {block_index}: latent grid {tuple(grid)} ({t * hh * ww} tokens) does "
                         f"not match the {img_len} video tokens after {txt_len} text tokens of this call")
    kind = run.kind(step)
    if (kind != DENSE or dense is None) and q.dtype not in (torch.float16, torch.bfloat16):
        # The block-sparse kernel runs in 16-bit (ComfyUI on CPU computes in float32): run it in bf16.
        out = sparse_attention_call(run, q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16),
                                    block_type=block_type, block_index=block_index, step=step, grid=grid,
                                    txt_len=txt_len, cond_rows=cond_rows, key_padding=key_padding, dense=dense)
        return out.to(q.dtype)
    if kind == DENSE:
        out = dense() if dense is not None else _kernel_dense(run, q, k, v, grid, txt_len, key_padding)
        run.note_dense_step(step)
        return out

    cfg = run.config
    chunks = _chunk_keys(block_type, block_index, cond_rows, b)

    def choose(rows):
        return lambda: build_mask(
            q[rows], k[rows], v[rows], mode=cfg.mask_mode, grid=grid, txt_len=txt_len, density=cfg.density,
            block_q=cfg.block_q, block_k=cfg.block_k, sample_rows_count=cfg.svg_sample_rows,
            key_padding=None if key_padding is None else key_padding[rows])

    # One mask per SSAR key (block, cond/uncond chunk), in this call's batch order.
    mask = cat_masks([run.mask_for((key, q[rows].shape, tuple(grid)), step, kind, choose(rows))
                      for key, rows in chunks])
    if kind == REFRESH and dense is not None:
        # The caller's dense pass (cuDNN in ComfyUI on the H100: 306 ms at 118,800 tokens against 429 ms for
        # the kernel's one-launch refresh) plus a sparse pass (62 ms); D = O_d - O_s.
        out = dense()
        o_s = masked_attention(q, k, v, mask, grid=grid, txt_len=txt_len, key_padding=key_padding, mode="sparse")
        for key, rows in chunks:
            run.ssar.refresh(key, out[rows], o_s[rows], txt_len=txt_len)
    elif kind == REFRESH:
        # One pass: the dense output and the dense - sparse residual under this mask.
        out, resid = masked_attention(q, k, v, mask, grid=grid, txt_len=txt_len, key_padding=key_padding,
                                      mode="refresh")
        for key, rows in chunks:
            run.ssar.refresh_residual(key, resid[rows], out.dtype)
    else:
        out = masked_attention(q, k, v, mask, grid=grid, txt_len=txt_len, key_padding=key_padding, mode="sparse")
        for key, rows in chunks:  # in place: the kernel's output is ours, and its rows of each chunk a view
            run.ssar.correct_(key, out[rows], txt_len=txt_len)
    run.record(kind, step, density=mask.density())
    return out


def _kernel_dense(run, q, k, v, grid, txt_len, key_padding):
    from .masks import SparseMask, num_blocks
    nqb = num_blocks(q.shape[2] - txt_len, run.config.block_q)
    nkb = num_blocks(q.shape[2] - txt_len, run.config.block_k)
    b, h = q.shape[:2]
    blocks = torch.zeros(b, h, nqb, 1, dtype=torch.int32, device=q.device)
    counts = torch.ones(b, h, nqb, dtype=torch.int32, device=q.device)
    mask = SparseMask(blocks, counts, nkb, q.shape[2] - txt_len, run.config.block_q, run.config.block_k)
    return masked_attention(q, k, v, mask, grid=grid, txt_len=txt_len, key_padding=key_padding, mode="dense")
