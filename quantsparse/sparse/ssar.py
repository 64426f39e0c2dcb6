"""SSAR: the per-run residual cache that restores what sparse attention drops (design section 5).

At a refresh step both the dense output ``O_d`` and the sparse output ``O_s`` are known and
``D = O_d - O_s``. First order caches ``C = D``; second order caches ``C = D + w * rank_r(D - D_prev)``
(the change of the residual since the previous refresh, denoised to its top ``r`` directions per
head) and keeps ``D_prev = D``. The refresh step returns ``O_d``; the steps between return
``O_s + C``. Order 0 returns ``O_s``.

``w`` (``extrapolation_weight``): the paper's Eq. 14 adds the whole change of the previous interval
(``w = 1``), i.e. the residual extrapolated to the END of the window, at every step of it. If the
residual changes linearly, sparse step ``j`` (1 .. tau-1) of a window of ``tau`` needs ``j / tau`` of that
change; one cached tensor gets the mean over those steps, 1/2. On the trained proxy (6 clips, 20 steps,
15%, BF16) ``w = 1`` fell below first order (34.85 vs 35.98 dB) and ``w = 1/2`` rose above it (38.58 dB),
about as far as a step-exact ``j / tau`` (39.13 dB, which needs ``D`` and the change stored apart).

Only video rows carry a residual: the kernel computes text rows densely in every mode, so their
``D`` is zero and is not stored.

Storage (``CacheLayout``): a full BF16 ``C`` at 118,800 video tokens x 24 heads x 128 is 0.73 GB per
block, 44 GB for HunyuanVideo's 60 blocks, and ``D_prev`` as much again. ``C`` is read at every
step and ``D_prev`` only at the next refresh, and both are dominated by a few directions of the
128-dim head space, so each is stored per head as rank-``k`` factors ``U [L, k] @ V [k, 128]``
(``V`` orthonormal rows from the 128x128 Gram matrix, i.e. the SVD truncation), with ``U`` in FP8
(e4m3) and one float32 scale per column of ``U``. ``D_prev`` may live in host memory.
``benchmarks/ssar_cache.py`` records the size and the error this costs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Optional

import torch

from .config import SparseConfig

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0

DENSE, REFRESH, SPARSE = "dense", "refresh", "sparse"


# ------------------------------------------------------------------------------ schedule

def warmup_steps(config: SparseConfig, total_steps: int) -> int:
    """Dense warm-up steps: ``dense_warmup * total_steps`` rounded half up."""
    return min(total_steps, int(config.dense_warmup * total_steps + 0.5))


def step_kind(step: int, total_steps: int, config: SparseConfig) -> str:
    """DENSE, REFRESH or SPARSE for sampling step ``step`` (0-based) of ``total_steps``.

    With SSAR on, the last warm-up step is already a refresh: its output is the dense one anyway, and
    the cache is then ready for the first sparse step instead of costing the first sparse step a
    dense pass. Refreshes then follow every ``refresh_interval`` steps.
    """
    if total_steps < 1 or not 0 <= step:
        raise ValueError(f"step {step} of {total_steps} steps is not a valid sampling step")
    if config.is_dense:
        return DENSE
    warm = warmup_steps(config, total_steps)
    if config.ssar_order == 0:
        return DENSE if step < warm else SPARSE
    anchor = max(warm - 1, 0)
    if step < anchor:
        return DENSE
    return REFRESH if (step - anchor) % config.refresh_interval == 0 else SPARSE


def extrapolation_weight(refresh_interval: int) -> float:
    """Weight of the second-order term: the mean of ``j / tau`` over the window's sparse steps j = 1 .. tau-1
    (1/2; 0 when every step refreshes)."""
    return 0.5 if refresh_interval > 1 else 0.0


# ------------------------------------------------------------------------------ rank-r projection

_PROBES: dict = {}  # fixed random start blocks per (D, k, device): the result is deterministic


def _orthonormal(v: torch.Tensor) -> torch.Tensor:
    """Columns of ``v`` [..., D, k] orthonormalised by Cholesky QR in float64 (batched small ops only)."""
    v = v.double()
    gram = v.transpose(-1, -2) @ v
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    # A relative ridge for rank-deficient blocks and an absolute one for all-zero ones (a zero residual):
    # columns that carry nothing come out ~0 and take no part in the projection.
    ridge = 1e-12 * gram.diagonal(dim1=-2, dim2=-1).amax(-1)[..., None, None] + 1e-200
    chol, _ = torch.linalg.cholesky_ex(gram + ridge * eye)  # no error check: a host sync per call on the GPU
    return torch.linalg.solve_triangular(chol, v.transpose(-1, -2), upper=False).transpose(-1, -2)


GRAM_CHUNK = 2048  # rows per partial Gram product


def gram_matrix(x: torch.Tensor) -> torch.Tensor:
    """float64 ``x^T x`` of each ``[..., L, D]`` matrix, summed over chunks of ``GRAM_CHUNK`` rows.

    One product per head has a ``D x D`` output and an ``L``-long reduction: 24 output tiles for the whole
    GPU, each looping over 118,800 rows (about 10 ms per residual at 720p on the H100). Chunking the rows
    gives ``L / GRAM_CHUNK`` times more tiles; the partial sums add up in float64.
    """
    xf = x.float()
    *lead, length, d = xf.shape
    chunks, full = length // GRAM_CHUNK, length // GRAM_CHUNK * GRAM_CHUNK
    total = torch.zeros(*lead, d, d, dtype=torch.float64, device=xf.device)
    if chunks:
        main = xf[..., :full, :].reshape(*lead, chunks, GRAM_CHUNK, d)  # a view: rows split, no copy
        total += (main.transpose(-1, -2) @ main).double().sum(-3)
    if full < length:
        rest = xf[..., full:, :]
        total += (rest.transpose(-1, -2) @ rest).double()
    return total


def top_directions(x: torch.Tensor, rank: int, *, oversample: int = 16, iters: int = 10) -> torch.Tensor:
    """float32 ``[..., D, rank]``: the top right singular vectors of each ``[..., L, D]`` matrix.

    Through the ``D x D`` Gram matrix G (``O(L D^2)``, D = 128): subspace iteration on G with
    ``rank + oversample`` columns, then Rayleigh-Ritz (an eigendecomposition of a k x k matrix, k <= 32
    in the product). A batched eigendecomposition of 128 x 128 matrices runs one matrix at a time on
    the GPU (~3 ms each: 9 s per refresh step over 60 blocks at 30,210 tokens on the H100); these small
    batched products, Cholesky factorisations and k x k problems do not. With k = D the subspace is
    everything and the result is exact; otherwise the error falls as (s_{k+1} / s_rank)^(4 iters).
    """
    return top_directions_of_gram(gram_matrix(x), rank, oversample=oversample, iters=iters)


def top_directions_of_gram(gram: torch.Tensor, rank: int, *, oversample: int = 16, iters: int = 10) -> torch.Tensor:
    """``top_directions`` from the float64 Gram matrices ``[..., D, D]`` (several residuals in one batch)."""
    d = gram.shape[-1]
    k = min(d, rank + oversample)
    if k == d:
        basis = torch.eye(d, dtype=gram.dtype, device=gram.device).expand_as(gram)
    else:
        key = (d, k, str(gram.device))
        if key not in _PROBES:
            g = torch.Generator().manual_seed(0)
            _PROBES[key] = torch.randn(d, k, generator=g, dtype=torch.float64).to(gram.device)
        basis = _orthonormal(gram @ _PROBES[key])
        for _ in range(iters - 1):
            basis = _orthonormal(gram @ basis)
    ritz = basis.transpose(-1, -2) @ gram @ basis
    _, vecs = torch.linalg.eigh((ritz + ritz.transpose(-1, -2)) / 2)  # ascending eigenvalues
    return (basis @ vecs[..., -rank:]).float()


def rank_projection(x: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-``rank`` approximation of each ``[..., L, D]`` matrix (float32)."""
    v = top_directions(x, rank)
    return (x.float() @ v) @ v.transpose(-1, -2)


# ------------------------------------------------------------------------------ compact storage

@dataclass(frozen=True)
class CacheLayout:
    """How C and D_prev are stored. ``None`` rank = the full ``[L, 128]`` matrix; ``fp8`` = e4m3 codes
    with a float32 scale per column; otherwise the residual's own dtype. ``offload_d_prev`` keeps
    ``D_prev`` in host memory (it is read once per refresh).

    The default (C rank 12, D_prev rank 8, FP8) is the largest that meets the 4 GB target for 60
    blocks at 118,800 tokens (3.44 GB); ``benchmarks/ssar_cache.py`` records what it costs in error.
    ``EXACT_LAYOUT`` stores everything as computed (tests, and a user with memory to spare).
    """

    c_rank: Optional[int] = 12
    d_rank: Optional[int] = 8
    fp8: bool = True
    offload_d_prev: bool = False

    def __post_init__(self) -> None:
        for name in ("c_rank", "d_rank"):
            r = getattr(self, name)
            if r is not None and (not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= 128):
                raise ValueError(f"CacheLayout.{name}={r!r} must be None (full) or an integer in [1, 128]")


EXACT_LAYOUT = CacheLayout(c_rank=None, d_rank=None, fp8=False)
DEFAULT_LAYOUT = CacheLayout()


def _fp8_encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column absmax scale (columns of U have very different norms: they follow the singular values)."""
    scale = x.abs().amax(dim=-2, keepdim=True).clamp_min(1e-30) / FP8_MAX
    return (x / scale).to(FP8), scale


@dataclass
class Packed:
    """One stored ``[..., L, D]`` residual: full or ``U @ V``, with U (or the full matrix) maybe in FP8."""

    u: torch.Tensor                       # [..., L, k] factor, or the full [..., L, D] matrix
    scale: Optional[torch.Tensor] = None  # float32 [..., 1, k or D] when u is FP8
    v: Optional[torch.Tensor] = None      # float32 [..., k, D], orthonormal rows; None = full matrix
    dtype: torch.dtype = torch.float32    # what the residual was computed in; decoding returns it
    offloaded: bool = False               # kept in host memory on purpose (counted by ``host_bytes``)

    @classmethod
    def pack(cls, x: torch.Tensor, rank: Optional[int], fp8: bool, dtype: torch.dtype,
             device: Optional[torch.device] = None, directions: Optional[torch.Tensor] = None) -> "Packed":
        """``directions``: x's top ``rank`` right singular vectors ``[..., D, rank]`` when already known."""
        v = None
        if rank is not None and rank < x.shape[-1]:
            vr = directions if directions is not None else top_directions(x, rank)
            u = x.float() @ vr
            v = vr.transpose(-1, -2).contiguous()
        else:
            u = x
        scale = None
        if fp8:
            u, scale = _fp8_encode(u.float())
        else:
            u = u.to(dtype)
        dev = device if device is not None else x.device
        # Blocking on purpose: an asynchronous device-to-host copy could be read before it lands.
        return cls(u.contiguous().to(dev),
                   None if scale is None else scale.to(dev), None if v is None else v.to(dev), dtype,
                   offloaded=device is not None and torch.device(device).type == "cpu")

    def decode(self, device=None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The stored matrix in ``dtype`` (default ``self.dtype``; float32 math) on ``device`` (default: where it
        lives)."""
        dev = device if device is not None else self.u.device
        u = self.u.to(dev, non_blocking=True).float()
        if self.scale is not None:
            u = u * self.scale.to(dev)
        if self.v is not None:
            u = u @ self.v.to(dev)
        return u.to(dtype or self.dtype)

    def _term(self, out: torch.Tensor) -> torch.Tensor:
        """What ``out`` gets added: the stored matrix as kept when it is kept in full (no copy), else
        decoded; a factored one as u @ v in ``out``'s dtype (no float32 copy of the full matrix)."""
        if self.v is None:
            if self.scale is None:
                return self.u.to(out.device, non_blocking=True)
            return self.decode(out.device).to(out.dtype)
        u = self.u.to(out.device).to(out.dtype)
        if self.scale is not None:
            u = u * self.scale.to(out.device, out.dtype)
        return u @ self.v.to(out.device, out.dtype)

    def add_to(self, out: torch.Tensor) -> torch.Tensor:
        """``out + stored`` for ``out`` [..., L, D]."""
        return out + self._term(out)

    def add_into(self, out: torch.Tensor) -> torch.Tensor:
        """``out += stored`` in place (``out`` may be a strided view, e.g. the video rows of an attention output)."""
        return out.add_(self._term(out))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.u, self.scale, self.v) if t is not None)


def packed_bytes(rank: Optional[int], fp8: bool, *, tokens: int, heads: int, head_dim: int = 128,
                 dtype_bytes: int = 2) -> int:
    """Bytes of one ``Packed`` of ``heads`` matrices ``[tokens, head_dim]`` (batch 1), as ``Packed.pack`` stores it."""
    k = head_dim if rank is None or rank >= head_dim else rank
    per_head = tokens * k * (1 if fp8 else dtype_bytes)
    if fp8:
        per_head += k * 4
    if k < head_dim:
        per_head += k * head_dim * 4
    return heads * per_head


def cache_bytes_for(layout: CacheLayout, order: int, *, tokens: int, heads: int, blocks: int,
                    head_dim: int = 128, dtype_bytes: int = 2) -> int:
    """Analytic SSAR cache size for ``blocks`` attention blocks of one CFG branch."""
    if order == 0:
        return 0
    per_block = packed_bytes(layout.c_rank, layout.fp8, tokens=tokens, heads=heads, head_dim=head_dim,
                             dtype_bytes=dtype_bytes)
    if order == 2:
        per_block += packed_bytes(layout.d_rank, layout.fp8, tokens=tokens, heads=heads, head_dim=head_dim,
                                  dtype_bytes=dtype_bytes)
    return blocks * per_block


# ------------------------------------------------------------------------------ per-run state

@dataclass
class _Entry:
    c: Packed
    d_prev: Optional[Packed]
    shape: tuple[int, ...]  # [B, H, img_len, D] of the residual
    refreshes: int = 1


def merged_residual(o_sparse: torch.Tensor, lse_sparse: torch.Tensor, o_comp: torch.Tensor,
                    lse_comp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense output, float32 residual) from the sparse pass and its complement, by log-sum-exp.

    ``O_d = w_s O_s + w_c O_c`` with ``w_c = exp(lse_c - logaddexp(lse_s, lse_c))`` and ``w_s = 1 - w_c``,
    so ``D = O_d - O_s = w_c (O_c - O_s)``. Rows with nothing in the complement (text rows) have
    ``w_c = 0`` and whatever the kernel left in ``O_c`` is ignored.
    """
    lse = torch.logaddexp(lse_sparse.float(), lse_comp.float())
    w_c = torch.exp(lse_comp.float() - lse)[..., None]
    live = w_c > 0
    resid = torch.where(live, w_c * (o_comp.float() - o_sparse.float()), torch.zeros((), device=o_sparse.device))
    return (o_sparse.float() + resid).to(o_sparse.dtype), resid


@dataclass
class SSARState:
    """The residual cache of ONE sampling run, keyed by (block_type, block_index, cond/uncond row).

    The attention override creates one per run (or calls ``begin_run``), so that a run with other
    settings, another resolution or another prompt never sees a stale correction.
    """

    config: SparseConfig
    total_steps: int
    layout: CacheLayout = DEFAULT_LAYOUT
    entries: dict = field(default_factory=dict)
    stats: dict = field(default_factory=lambda: {"refreshes": 0, "corrections": 0, "misses": 0})

    def __post_init__(self) -> None:
        if not isinstance(self.config, SparseConfig):
            raise ValueError(f"SSARState needs a SparseConfig, got {type(self.config).__name__}")
        if not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise ValueError(f"total_steps={self.total_steps!r} must be a positive integer")

    # -- run lifecycle
    def reset(self) -> None:
        """Drop every cached correction (frees the memory)."""
        self.entries.clear()
        self.stats = {"refreshes": 0, "corrections": 0, "misses": 0}

    def begin_run(self, config: SparseConfig, total_steps: int, layout: Optional[CacheLayout] = None) -> "SSARState":
        """Start a new sampling run: adopt its settings and forget the previous run's cache."""
        self.reset()
        self.config, self.total_steps = config, total_steps
        if layout is not None:
            self.layout = layout
        self.__post_init__()
        return self

    def step_kind(self, step: int) -> str:
        return step_kind(step, self.total_steps, self.config)

    # -- refresh
    def refresh(self, key: Hashable, o_dense: torch.Tensor, o_sparse: torch.Tensor, *, txt_len: int) -> torch.Tensor:
        """Refresh step from separately computed dense and sparse outputs ``[B, H, L, D]``; returns ``O_d``."""
        if o_dense.shape != o_sparse.shape:
            raise ValueError(f"dense output {tuple(o_dense.shape)} and sparse output {tuple(o_sparse.shape)} differ")
        # one float32 copy, subtracted in place (a pass over 1.5 GB at 720p saved); never the caller's tensor
        resid = o_dense[:, :, txt_len:].to(torch.float32, copy=True).sub_(o_sparse[:, :, txt_len:])
        self._store(key, resid, o_sparse.dtype)
        return o_dense

    def refresh_merged(self, key: Hashable, o_sparse: torch.Tensor, lse_sparse: torch.Tensor,
                       o_comp: torch.Tensor, lse_comp: torch.Tensor, *, txt_len: int) -> torch.Tensor:
        """Refresh step from one sparse pass and one complement pass (the price of one dense pass)."""
        o_dense, resid = merged_residual(o_sparse, lse_sparse, o_comp, lse_comp)
        self._store(key, resid[:, :, txt_len:], o_sparse.dtype)
        return o_dense

    def refresh_residual(self, key: Hashable, resid: torch.Tensor, dtype: torch.dtype) -> None:
        """Refresh step from the kernel's refresh mode: ``resid`` is dense - sparse of the video rows
        (float32 ``[B, H, L_img, D]``), the dense output is the caller's."""
        self._store(key, resid, dtype)

    def _store(self, key: Hashable, d: torch.Tensor, dtype: torch.dtype) -> None:
        cfg, lay = self.config, self.layout
        self.stats["refreshes"] += 1
        if cfg.ssar_order == 0:
            return
        old = self.entries.get(key)
        if old is not None and old.shape != tuple(d.shape):
            raise ValueError(f"SSAR cache for {key!r} holds a residual of shape {old.shape}, but this refresh has "
                             f"{tuple(d.shape)}: the cache belongs to another run; create a fresh SSARState "
                             "(or call begin_run) for every sampling run")
        c = d
        if cfg.ssar_order == 2 and old is not None and old.d_prev is not None:
            w = extrapolation_weight(cfg.refresh_interval)
            change = d - old.d_prev.decode(d.device, torch.float32)
            c = rank_projection(change, cfg.rank).mul_(w).add_(d)
        host = torch.device("cpu") if lay.offload_d_prev else None
        c_dirs, d_dirs = self._directions(c, d)
        d_prev = (Packed.pack(d, lay.d_rank, lay.fp8, dtype, device=host, directions=d_dirs)
                  if cfg.ssar_order == 2 else None)
        self.entries[key] = _Entry(Packed.pack(c, lay.c_rank, lay.fp8, dtype, directions=c_dirs), d_prev,
                                   tuple(d.shape), refreshes=(old.refreshes + 1 if old else 1))

    def _directions(self, c: torch.Tensor, d: torch.Tensor):
        """(c's, d's) stored directions from ONE batched subspace iteration when both are factored (order 2):
        the refresh step's cost is small batched launches, so one call instead of two saves half of them."""
        lay, d_head = self.layout, d.shape[-1]
        if self.config.ssar_order != 2 or lay.c_rank is None or lay.d_rank is None or \
                max(lay.c_rank, lay.d_rank) >= d_head:
            return None, None
        rank = max(lay.c_rank, lay.d_rank)
        grams = torch.stack([gram_matrix(c), gram_matrix(d)])
        dirs = top_directions_of_gram(grams, rank)  # ascending: the top r are the last r columns
        return dirs[0][..., rank - lay.c_rank:], dirs[1][..., rank - lay.d_rank:]

    # -- between refreshes
    def correct(self, key: Hashable, o_sparse: torch.Tensor, *, txt_len: int) -> torch.Tensor:
        """``O_s + C`` on the video rows (``O_s`` itself with SSAR off or before any refresh of ``key``)."""
        if self.config.ssar_order == 0 or key not in self.entries:
            return self.correct_(key, o_sparse, txt_len=txt_len)
        return self.correct_(key, o_sparse.clone(), txt_len=txt_len)

    def correct_(self, key: Hashable, o_sparse: torch.Tensor, *, txt_len: int) -> torch.Tensor:
        """:meth:`correct` in place on ``o_sparse`` (a kernel's fresh output: no copy of it, and with the
        correction kept in full none of the correction either); returns ``o_sparse``."""
        if self.config.ssar_order == 0:
            return o_sparse
        entry = self.entries.get(key)
        if entry is None:
            self.stats["misses"] += 1
            return o_sparse
        video = o_sparse[:, :, txt_len:]
        if tuple(video.shape) != entry.shape:
            raise ValueError(f"SSAR cache for {key!r} was built for video output {entry.shape}, but this step has "
                             f"{tuple(video.shape)}: create a fresh SSARState (or call begin_run) for every "
                             "sampling run")
        self.stats["corrections"] += 1
        entry.c.add_into(video)
        return o_sparse

    def correction(self, key: Hashable) -> Optional[torch.Tensor]:
        """The stored correction C ``[B, H, img_len, D]`` as the steps between refreshes add it."""
        entry = self.entries.get(key)
        return None if entry is None else entry.c.decode()

    # -- memory
    def cache_bytes(self) -> int:
        """Bytes held by the cache, device and host together."""
        return sum(e.c.nbytes + (e.d_prev.nbytes if e.d_prev is not None else 0) for e in self.entries.values())

    def host_bytes(self) -> int:
        """The part of ``cache_bytes`` offloaded to host memory (``CacheLayout.offload_d_prev``)."""
        return sum(p.nbytes for e in self.entries.values() for p in (e.c, e.d_prev) if p is not None and p.offloaded)


# ------------------------------------------------------------------------------ measurement

def correction_error(d_first: torch.Tensor, d_second: torch.Tensor, *, rank: int = 16, order: int = 2,
                     layout: CacheLayout = DEFAULT_LAYOUT, refresh_interval: int = 5) -> dict:
    """Relative Frobenius error of the stored correction against the exact one, after two refreshes.

    ``d_first`` and ``d_second`` are the residuals ``O_d - O_s`` ``[B, H, L, D]`` at two consecutive
    refreshes. The exact second correction is ``d_second + w rank_r(d_second - d_first)`` (order 2) or
    ``d_second`` (order 1); the stored one went through ``layout`` at both refreshes, so the error
    includes the compression of ``D_prev``.
    """
    state = SSARState(SparseConfig(rank=rank, ssar_order=order, refresh_interval=refresh_interval), total_steps=1,
                      layout=layout)
    zeros = torch.zeros_like(d_first)
    state.refresh("k", d_first, zeros, txt_len=0)
    first = state.correction("k").float()
    state.refresh("k", d_second, zeros, txt_len=0)
    stored = state.correction("k").float()
    exact = d_second.float()
    if order == 2:
        exact = exact + extrapolation_weight(refresh_interval) * rank_projection(d_second.float() - d_first.float(), rank)

    def rel(a, b):
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    return {"rel_error": rel(stored, exact), "rel_error_first_refresh": rel(first, d_first.float()),
            "cache_bytes": state.cache_bytes()}
