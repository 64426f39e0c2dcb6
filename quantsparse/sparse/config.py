"""Sparse-attention and SSAR settings: one frozen object from the sampler widgets to ``sparse_defaults``.

``QuantSparseConfig`` says how the weights were quantized (fixed once a checkpoint exists); this says
how attention runs at sampling time, which a user may change per run. Both are frozen and validated
at construction, so a bad widget value or a damaged checkpoint fails with a message naming the field,
not deep inside a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...kernels.sparse_attention import HEAD_DIM as KERNEL_HEAD_DIM
from ..core.config import JsonConfig, is_int, is_number

MASK_MODES = ("svg", "topk")
SSAR_ORDERS = (0, 1, 2)  # 0 = no residual cache (plain sparse), 1 = cached residual, 2 = + rank-r second order
HEAD_DIM = KERNEL_HEAD_DIM  # the sparse kernel's head size; the rank-r projection lives in this space


BLOCK_SIZES = (16, 32, 64, 128, 256)  # tokens per query / key block: the kernel's tile sizes


def block_size_problem(name: str, b) -> Optional[str]:
    """Why ``b`` cannot be the block size ``name`` (None when it can): the one rule for configs and widgets."""
    if not is_int(b) or b not in BLOCK_SIZES:
        return f"{name} = {b!r}: use a power of two from 16 to 256 ({', '.join(map(str, BLOCK_SIZES[:-1]))} or 256)"
    return None


@dataclass(frozen=True)
class SparseConfig(JsonConfig):
    """How attention runs while sampling.

    - ``density``: fraction of the video-to-video (query block, key block) pairs computed, in (0, 1];
      1.0 runs dense. The paper runs HunyuanVideo at 0.25 and 0.15.
    - ``mask_mode``: "svg" (per head spatial or temporal band, SparseVideoGen) or "topk" (pooled block
      scores).
    - ``dense_warmup``: fraction of the sampling steps (the first, high-noise ones) run dense. 0.1:
      SparseVideoGen's 0.25 (paper notes 3, 9.14) was both slower and worse with SSAR on the trained proxy
      at 50 steps (W4A8, 15%: 33.23 dB against 34.42 dB at 0.1; ``benchmarks/results/schedule_proxy.md``),
      and each dense step costs a sparse step's 3x-4x at 720p.
    - ``refresh_interval``: SSAR recomputes dense attention every this many steps (paper: 5).
    - ``rank``: rank r of the second-order correction's projection (paper: 16), at most the head size.
    - ``ssar_order``: 0 off, 1 first order (cache D), 2 second order (cache D + w rank-r(D - D_prev),
      ``ssar.extrapolation_weight``; the paper's). Default 1: on the trained proxy first order beat second
      order in all eight settings measured (``quality_proxy.md``: -0.52 to -0.90 dB at W4A8 / W6A6, 15% /
      25%, 20 steps; ``schedule_order_proxy.md``: -0.42 dB / -2.23 dB at 50 steps refreshing every 5 / 10),
      and it skips the rank-r update of every refresh (0.65 s per refresh step at 30,210 tokens on the
      H100, 2 s at 118,800) and half the cache. Order 2 stays one widget away.
    - ``block_q`` / ``block_k``: video tokens per query / key block of the kernel and of the masks.
    - ``svg_sample_rows``: query rows computed densely to choose each head's svg pattern (SVG: 64).
    """

    LABEL = "sparse config"

    density: float = 0.15
    mask_mode: str = "svg"
    dense_warmup: float = 0.1
    refresh_interval: int = 5
    rank: int = 16
    ssar_order: int = 1
    block_q: int = 128
    block_k: int = 128  # 128x128 tiles with TMA: the fastest on the H100 (attention_sweep_*_h100.json)
    svg_sample_rows: int = 64

    def __post_init__(self) -> None:
        if not is_number(self.density) or not 0.0 < self.density <= 1.0:
            raise ValueError(f"SparseConfig.density={self.density!r} must be a number in (0, 1] "
                             "(the fraction of video-to-video attention blocks computed; 1 = dense)")
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"SparseConfig.mask_mode={self.mask_mode!r} is not supported; choose one of {list(MASK_MODES)}")
        if not is_number(self.dense_warmup) or not 0.0 <= self.dense_warmup <= 1.0:
            raise ValueError(f"SparseConfig.dense_warmup={self.dense_warmup!r} must be a fraction of the steps in [0, 1]")
        if not is_int(self.refresh_interval) or self.refresh_interval < 1:
            raise ValueError(f"SparseConfig.refresh_interval={self.refresh_interval!r} must be an integer >= 1 "
                             "(1 refreshes every step, i.e. runs dense)")
        if not is_int(self.rank) or not 1 <= self.rank <= HEAD_DIM:
            raise ValueError(f"SparseConfig.rank={self.rank!r} must be an integer in [1, {HEAD_DIM}] (the head size)")
        if not is_int(self.ssar_order) or self.ssar_order not in SSAR_ORDERS:
            raise ValueError(f"SparseConfig.ssar_order={self.ssar_order!r} must be 0 (off), 1 (first order) "
                             "or 2 (second order)")
        for name in ("block_q", "block_k"):
            problem = block_size_problem(name, getattr(self, name))
            if problem:
                raise ValueError(f"SparseConfig.{problem} (a kernel tile size)")
        if not is_int(self.svg_sample_rows) or self.svg_sample_rows < 1:
            raise ValueError(f"SparseConfig.svg_sample_rows={self.svg_sample_rows!r} must be an integer >= 1")

    @property
    def is_dense(self) -> bool:
        return self.density >= 1.0

