"""SSAR cache size at HunyuanVideo-13B's full shape, and the error its compact storage costs.

Size: analytic from the storage layout (``ssar.cache_bytes_for``), for 60 blocks x 118,800 video
tokens x 24 heads x 128, one CFG branch (HunyuanVideo uses embedded guidance: one row per step; a
true-CFG run holds a second branch, twice the bytes). The formula is checked against the bytes the
cache really holds at the measured shape.

Error: the relative Frobenius error of the stored correction C against the exact one, after two
refreshes (so it includes the compressed D_prev), on SYNTHETIC residuals: q, k, v per head are
projections of a smooth random field over the (t, h, w) latent grid plus per-step noise, with
HunyuanVideo's RoPE, moved along a diffusion-like path between the two refreshes; the residuals
are ``dense - sparse`` attention outputs (FP16 operands, sparse + complement passes of the kernel
merged by log-sum-exp, as a refresh computes them) under a real ``svg`` mask at 15% density. Real HunyuanVideo
attention is not available here, so the error is an indication of how the layout behaves on
structured attention, not a measurement on the real model.

    python benchmarks/ssar_cache.py            # writes benchmarks/results/ssar_cache.json (CPU, ~1 min)
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

import torch

from comfyui_quantsparse.quantsparse.models.hunyuan_video.attention import apply_rope, rope_freqs
from comfyui_quantsparse.quantsparse.sparse.masks import svg_mask
from comfyui_quantsparse.quantsparse.sparse.masked import masked_attention
from comfyui_quantsparse.quantsparse.sparse.config import SparseConfig
from comfyui_quantsparse.quantsparse.sparse.ssar import (
    CacheLayout, DEFAULT_LAYOUT, SSARState, cache_bytes_for, correction_error, merged_residual,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_json  # noqa: E402

FULL = {"video_tokens": 118_800, "blocks": 60, "heads": 24, "head_dim": 128}
AXES_DIM = (16, 56, 56)


def smooth_field(grid, channels, modes, gen):
    """[T*H*W, channels]: a sum of low-frequency random Fourier modes over (t, h, w)."""
    t, h, w = grid
    pos = torch.stack(torch.meshgrid(torch.arange(t) / t, torch.arange(h) / h, torch.arange(w) / w,
                                     indexing="ij"), -1).reshape(-1, 3)
    freq = torch.randn(3, modes, generator=gen) * 4.0
    phase = torch.rand(modes, generator=gen) * 2 * math.pi
    basis = torch.cos(pos @ freq + phase)  # [N, modes]
    return basis @ torch.randn(modes, channels, generator=gen) / modes ** 0.5


def synthetic_qkv(grid, txt_len, heads, s, gen_seed, noise_seed, noise=0.3, sharp=2.0):
    """q, k, v [1, H, L, 128] at diffusion position ``s`` in [0, 1]: two fields blended, fresh noise."""
    g = torch.Generator().manual_seed(gen_seed)
    n = grid[0] * grid[1] * grid[2]
    fa, fb = smooth_field(grid, 256, 64, g), smooth_field(grid, 256, 64, g)
    txt = torch.randn(txt_len, 256, generator=g)
    proj = torch.randn(3, heads, 256, 128, generator=g) / 16.0
    field = math.cos(s * math.pi / 2) * fa + math.sin(s * math.pi / 2) * fb
    gn = torch.Generator().manual_seed(noise_seed)
    x = torch.cat([txt, field + noise * torch.randn(n, 256, generator=gn)], 0)  # [L, 256]
    q, k, v = (torch.einsum("lc,hcd->hld", x, proj[i])[None] for i in range(3))
    pe = rope_freqs(grid, txt_len, AXES_DIM, 256)
    return apply_rope(q, pe) * sharp, apply_rope(k, pe) * sharp, v


def residual(grid, txt_len, heads, s, seed, density):
    q, k, v = (x.half() for x in synthetic_qkv(grid, txt_len, heads, s, gen_seed=seed,
                                                noise_seed=seed * 1000 + int(s * 1000)))
    mask = svg_mask(q, k, v, grid=grid, txt_len=txt_len, density=density, block_q=128, block_k=64)
    # Both through the kernel (its eager reference on the CPU): the sparse pass and its complement,
    # merged by log-sum-exp, exactly as a refresh step computes the residual.
    o_s, lse_s = masked_attention(q, k, v, mask, grid=grid, txt_len=txt_len, return_lse=True)
    o_c, lse_c = masked_attention(q, k, v, mask, grid=grid, txt_len=txt_len, mode="complement", return_lse=True)
    dense, resid = merged_residual(o_s, lse_s, o_c, lse_c)
    dense = dense.float()
    d = resid[:, :, txt_len:]
    return d, float(mask.density()), int(mask.temporal.sum()), float(d.norm() / dense[:, :, txt_len:].norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default="8,16,24", help="synthetic latent grid T,H,W (tokens = T*H*W)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "ssar_cache.json"))
    args = ap.parse_args()
    grid = tuple(int(x) for x in args.grid.split(","))
    txt_len, cfg = 64, SparseConfig()
    gap = cfg.refresh_interval / 50  # two refreshes 5 steps apart in a 50-step run
    t0 = time.time()
    pairs, info = [], []
    for seed in range(args.seeds):
        d1, dens, n_temp, rel1 = residual(grid, txt_len, args.heads, 0.5, seed, cfg.density)
        d2, _, _, rel2 = residual(grid, txt_len, args.heads, 0.5 + gap, seed, cfg.density)
        pairs.append((d1, d2))
        info.append({"seed": seed, "density": dens, "temporal_heads": n_temp, "residual_over_output": [rel1, rel2]})

    layouts = {
        "bf16_full": CacheLayout(None, None, fp8=False),
        "fp8_full": CacheLayout(None, None, fp8=True),
        "c32_d16_fp8": CacheLayout(32, 16),
        "c16_d8_fp8": CacheLayout(16, 8),
        "c12_d8_fp8": CacheLayout(12, 8),
        "c8_d4_fp8": CacheLayout(8, 4),
        "c8_d8_fp8": CacheLayout(8, 8),
        "c4_d4_fp8": CacheLayout(4, 4),
    }
    rows = []
    for name, lay in layouts.items():
        errs = [correction_error(a, b, rank=cfg.rank, order=cfg.ssar_order, layout=lay)
                for a, b in pairs]
        full = cache_bytes_for(lay, cfg.ssar_order, tokens=FULL["video_tokens"], heads=FULL["heads"],
                               blocks=FULL["blocks"], head_dim=FULL["head_dim"])
        # The formula must be what the cache holds: check at the measured shape.
        st = SSARState(cfg, 1, lay)
        st.refresh("k", pairs[0][1], torch.zeros_like(pairs[0][1]), txt_len=0)
        st.refresh("k", pairs[0][1], torch.zeros_like(pairs[0][1]), txt_len=0)
        n = pairs[0][1].shape[2]
        predicted = cache_bytes_for(lay, cfg.ssar_order, tokens=n, heads=args.heads, blocks=1, dtype_bytes=4)
        assert st.cache_bytes() == predicted, (name, st.cache_bytes(), predicted)
        rows.append({"layout": name, "c_rank": lay.c_rank, "d_rank": lay.d_rank, "fp8": lay.fp8,
                     "cache_bytes": full, "cache_gb": full / 1e9,
                     "rel_error": max(e["rel_error"] for e in errs),
                     "rel_error_first_refresh": max(e["rel_error_first_refresh"] for e in errs)})
        print(f"{name:12s} {full / 1e9:7.2f} GB  rel_error {rows[-1]['rel_error']:.4f} "
              f"(first refresh {rows[-1]['rel_error_first_refresh']:.4f})")
    default = next(r for r in rows if r["c_rank"] == DEFAULT_LAYOUT.c_rank and r["d_rank"] == DEFAULT_LAYOUT.d_rank
                   and r["fp8"] == DEFAULT_LAYOUT.fp8)
    write_json(args.out, {
        "video_tokens": FULL["video_tokens"], "blocks": FULL["blocks"],
        "cache_bytes": default["cache_bytes"], "rel_error": default["rel_error"],
        "details": {
            "layout": default["layout"], "heads": FULL["heads"], "head_dim": FULL["head_dim"],
            "cfg_branches": 1, "ssar_order": cfg.ssar_order, "rank": cfg.rank,
            "full_bf16_bytes_C_only": cache_bytes_for(CacheLayout(None, None, False), 1, tokens=FULL["video_tokens"],
                                                      heads=FULL["heads"], blocks=FULL["blocks"]),
            "size": "analytic from the layout (checked equal to the bytes held at the measured shape)",
            "error_data": (f"synthetic: smooth random (t,h,w) field + noise projected to q,k,v with HunyuanVideo RoPE, "
                           f"grid {list(grid)}, {txt_len} text tokens, {args.heads} heads, svg mask at density "
                           f"{cfg.density}, refreshes at s=0.5 and s={0.5 + gap:.2f}; max over {args.seeds} seeds"),
            "rel_error": "||C_stored - C_exact||_F / ||C_exact||_F at the second refresh (order 2, rank 16)",
            "note": ("The size meets the 4 GB target (not the 2 GB stretch: c8_d4 is 2.06 GB). The error is high "
                     "on these synthetic residuals, whose attention is diffuse (the residual is "
                     f"{min(min(i['residual_over_output']) for i in info):.0%}-"
                     f"{max(max(i['residual_over_output']) for i in info):.0%} of the output) "
                     "and whose residual is not low-rank in the head dimension; it must be re-measured "
                     "on the trained proxy model's attention before the layout is trusted."),
            "residuals": info, "layouts": rows,
            "host": platform.node(), "torch": torch.__version__, "seconds": round(time.time() - t0, 1),
        },
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
