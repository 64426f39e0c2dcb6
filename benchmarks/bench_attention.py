"""Block-sparse attention against torch SDPA (default backend and cuDNN), HunyuanVideo's joint attention.

24 heads x 128, 256 text tokens, 30,210 and 118,800 video tokens; our kernel at several densities
(fraction of video-to-video key blocks computed), in dense mode, and a SSAR refresh step
(the kernel's refresh mode). Every configuration is first checked: dense against cuDNN on all rows, sparse
against a float32 reference on a subset of query rows (text rows, first / middle / last video query
blocks) with random block lists, refresh against dense and against dense - sparse. The timed "sparse"
and "refresh" rows run what the product runs with the mask selection included in every call (svg:
the probe kernel on sampled rows, then the kernel with temporal heads by index arithmetic); the
sampler actually selects once per refresh interval, so "sparse_cached_mask" (a step between
refreshes) and "select" are reported too.

    python benchmarks/bench_attention.py --out benchmarks/results/attention_h100.json
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bench_ms, environment, rel_err, write_json  # noqa: E402

from comfyui_quantsparse.quantsparse.sparse.masks import build_mask  # noqa: E402
from comfyui_quantsparse.quantsparse.sparse.masked import masked_attention  # noqa: E402
from comfyui_quantsparse.kernels.sparse_attention import (  # noqa: E402
    block_mask, block_sparse_attention_triton, complement_lists, row_mask,
)

HEADS, HEAD_DIM, TXT = 24, 128, 256  # --model wan: 40 heads, no text (self-attention over the video tokens)
VIDEO_TOKENS = [30210, 118800]
WAN_TOKENS = [32760, 75600]
DENSITIES = [0.10, 0.15, 0.25, 0.40]
REFRESH_DENSITY = 0.15


def random_mask(q, k, density, txt_len, block_q, block_k, gen):
    """Distinct random video key blocks per (batch, head, query block), diagonal not forced."""
    b, h, seq, _ = q.shape
    l_img = seq - txt_len
    nqb, nkb = math.ceil(l_img / block_q), math.ceil(l_img / block_k)
    n = max(1, round(density * nkb))
    scores = torch.rand(b, h, nqb, nkb, device=q.device, generator=gen)
    blocks = scores.topk(n, dim=-1).indices.to(torch.int32)
    return blocks, torch.full((b, h, nqb), n, dtype=torch.int32, device=q.device)


GRIDS = {30210: (19, 30, 53), 118800: (33, 45, 80),  # HunyuanVideo 848x480x73 and 1280x720x129, 2x2 patches
         32760: (21, 30, 52), 75600: (21, 45, 80)}  # Wan 832x480x81 and 1280x720x81


def select(q, k, v, density, grid, block_q, block_k):
    """The mask selection the sampler runs at each refresh step (svg: the probe kernel on sampled rows,
    spatial or temporal band per head); sparse steps reuse its result until the next refresh."""
    return build_mask(q, k, v, mode="svg", grid=grid, txt_len=TXT, density=density, block_q=block_q, block_k=block_k)


def product_step(q, k, v, mask, grid, mode="sparse"):
    """What the sampler runs per attention call: a sparse step under a kept mask, or a refresh step
    (the kernel's refresh mode: dense output and residual in one pass). Temporal heads are read by
    the kernel through index arithmetic."""
    return masked_attention(q, k, v, mask, grid=grid, txt_len=TXT, mode=mode)


def check_rows(q, k, v, out, lse, blocks, counts, txt_len, mode, block_q, block_k) -> float:
    """Relative error of ``out`` on a subset of query rows against float32 attention with the
    reference's mask; also that lse agrees there. Head by head, so nothing of size L x L is held."""
    seq = q.shape[2]
    l_img = seq - txt_len
    starts = [txt_len, txt_len + (l_img // 2 // block_q) * block_q, txt_len + ((l_img - 1) // block_q) * block_q]
    rows = torch.cat([torch.arange(0, txt_len)] + [torch.arange(s, min(seq, s + block_q)) for s in starts]).to(q.device)
    nkb = math.ceil(l_img / block_k)
    bm = None if mode == "dense" else block_mask(blocks, counts, nkb)
    errs = []
    for h in range(q.shape[1]):
        sub = None if bm is None else bm[:, h:h + 1]
        pad = torch.ones(q.shape[0], seq, dtype=torch.bool, device=q.device) if sub is None else None
        m = row_mask(rows, seq, txt_len, sub, mode, block_q, block_k, pad)
        s = (q[:, h:h + 1, rows].float() @ k[:, h:h + 1].float().transpose(-1, -2)) / math.sqrt(HEAD_DIM)
        s = s.masked_fill(~m, float("-inf"))
        ref_lse = torch.logsumexp(s, -1)
        ref = torch.exp(s - ref_lse.clamp_min(-1e30)[..., None]) @ v[:, h:h + 1].float()
        fin = torch.isfinite(ref_lse)
        got = lse[:, h:h + 1, rows]
        assert torch.equal(torch.isfinite(got), fin), f"{mode}: empty rows differ"
        if fin.any():
            assert float((got[fin] - ref_lse[fin]).abs().max()) < 1e-2, f"{mode}: lse differs"
        errs.append(rel_err(out[:, h:h + 1, rows], ref))
    return max(errs)


def run_length(l_img, args, gen):
    seq = TXT + l_img
    if args.model == "wan":  # as Wan hands them over: [B, L, H * D] viewed as [B, H, L, D] (strided, no copy)
        q, k, v = (torch.randn(1, seq, HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
                   .view(1, seq, HEADS, HEAD_DIM).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (torch.randn(1, HEADS, seq, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for _ in range(3))
    bq, bk = args.block_q, args.block_k
    rows = []
    # The dense baselines get contiguous [B, H, L, D] (the fastest layout for SDPA); ours runs on the views.
    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ref_dense = F.scaled_dot_product_attention(qc, kc, vc)
        t_cudnn = bench_ms(lambda: F.scaled_dot_product_attention(qc, kc, vc))
    t_default = bench_ms(lambda: F.scaled_dot_product_attention(qc, kc, vc))
    del qc, kc, vc
    best = min(t_cudnn, t_default)

    def row(density, mode, ms, err):
        rows.append(dict(L=l_img, density=density, mode=mode, ours_ms=ms, sdpa_default_ms=t_default,
                         sdpa_cudnn_ms=t_cudnn, speedup_vs_best_dense=None if mode in ("select", "complement_lists") else best / ms,
                         rel_err=err))
        print(rows[-1], flush=True)

    dense_kw = dict(txt_len=TXT, mode="dense", block_q=bq, block_k=bk)
    out = block_sparse_attention_triton(q, k, v, None, None, **dense_kw)
    err = rel_err(out, ref_dense)
    assert err < 2e-2, f"dense mode vs cuDNN: rel err {err}"
    row(1.0, "dense", bench_ms(lambda: block_sparse_attention_triton(q, k, v, None, None, **dense_kw)), err)
    # The same kernel with pointer loads instead of TMA descriptors (what GPUs before Hopper run).
    row(1.0, "dense_pointer_loads", bench_ms(lambda: block_sparse_attention_triton(
        q, k, v, None, None, config={"use_desc": False}, **dense_kw)), None)
    del out
    grid = GRIDS.get(l_img, (1, 1, l_img))
    for density in DENSITIES:
        blocks, counts = random_mask(q, k, density, TXT, bq, bk, gen)  # the kernel's check: random lists
        kw = dict(txt_len=TXT, block_q=bq, block_k=bk)
        out, lse = block_sparse_attention_triton(q, k, v, blocks, counts, mode="sparse", return_lse=True, **kw)
        err = check_rows(q, k, v, out, lse, blocks, counts, TXT, "sparse", bq, bk)
        assert err < 2e-2, f"sparse {density}: rel err {err}"
        del out, lse

        mask = select(q, k, v, density, grid, bq, bk)
        # The measure: mask selection included in every step (the sampler pays it once per
        # refresh interval; "sparse_cached_mask" is a step between refreshes, "select" the selection).
        row(density, "sparse", bench_ms(lambda: product_step(q, k, v, select(q, k, v, density, grid, bq, bk), grid)),
            err)
        row(density, "sparse_cached_mask", bench_ms(lambda: product_step(q, k, v, mask, grid)), err)
        row(density, "select", bench_ms(lambda: select(q, k, v, density, grid, bq, bk)), None)
        if density == REFRESH_DENSITY:
            o_d, res = product_step(q, k, v, mask, grid, "refresh")
            o_s = product_step(q, k, v, mask, grid)
            err_d = rel_err(o_d, ref_dense)
            err_r = rel_err(res, o_d[:, :, TXT:].float() - o_s[:, :, TXT:].float())
            assert err_d < 2e-2 and err_r < 5e-2, f"refresh: dense {err_d}, residual {err_r}"
            del o_d, res, o_s
            row(density, "refresh", bench_ms(lambda: product_step(
                q, k, v, select(q, k, v, density, grid, bq, bk), grid, "refresh")), err_d)
            row(density, "refresh_without_select", bench_ms(lambda: product_step(q, k, v, mask, grid, "refresh")),
                err_d)
            nkb = math.ceil(l_img / bk)
            row(density, "complement_lists", bench_ms(lambda: complement_lists(mask.kv_blocks, mask.kv_counts, nkb)),
                None)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/attention_h100.json")
    ap.add_argument("--block-q", type=int, default=128)
    ap.add_argument("--block-k", type=int, default=128)
    ap.add_argument("--tokens", type=int, nargs="*", default=None)
    ap.add_argument("--model", choices=["hunyuan", "wan"], default="hunyuan",
                    help="hunyuan: 24 heads, 256 text tokens first; wan: 40 heads, self-attention without text")
    args = ap.parse_args()
    global HEADS, TXT
    if args.model == "wan":
        HEADS, TXT = 40, 0
    args.tokens = args.tokens or (WAN_TOKENS if args.model == "wan" else VIDEO_TOKENS)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for l_img in args.tokens:
        rows += run_length(l_img, args, gen)
        torch.cuda.empty_cache()
    write_json(args.out, dict(environment(), model=args.model, heads=HEADS, head_dim=HEAD_DIM, txt_len=TXT,
                              block_q=args.block_q,
                              block_k=args.block_k, mask=("sparse and refresh rows: svg selection (quantsparse.masks.build_mask, probe kernel) + the kernel "
                                    "under that mask, selection included in every call; sparse_cached_mask: the kernel "
                                    "under a kept mask (steps between refreshes); select: the selection alone; "
                                    "checks: random lists against a float32 reference"), rows=rows))


if __name__ == "__main__":
    main()
