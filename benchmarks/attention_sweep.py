"""Tile and launch sweep of the block-sparse attention kernel at 118,800 video tokens (H100):
the kernel alone at 15% density (random masks) and in dense mode, against cuDNN SDPA.

    python3 benchmarks/attention_sweep.py --out sweep.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bench_ms, environment, rel_err, write_json  # noqa: E402
from bench_attention import random_mask  # noqa: E402

from comfyui_quantsparse.kernels.sparse_attention import block_sparse_attention_triton  # noqa: E402

# (block_q, block_k, num_warps, num_stages, K/V through TMA descriptors)
CONFIGS = [(128, 64, 8, 3, False), (128, 64, 8, 3, True), (128, 64, 8, 2, True), (128, 64, 8, 4, True),
           (128, 128, 8, 2, True), (128, 128, 8, 3, True), (128, 128, 8, 3, False), (128, 128, 8, 4, True),
           (64, 64, 4, 3, True), (64, 64, 4, 3, False)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--video-tokens", type=int, default=118800)
    args = ap.parse_args()
    heads, txt, l_img = 24, 256, args.video_tokens
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, heads, txt + l_img, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
        cudnn_ms = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v), 500)
        ref = F.scaled_dot_product_attention(q, k, v)
    rows = []
    print(f"cuDNN dense {cudnn_ms:.1f} ms", flush=True)
    for bq, bk, warps, stages, desc in CONFIGS:
        cfg = dict(num_warps=warps, num_stages=stages, use_desc=desc)
        try:
            blocks, counts = random_mask(q, k, 0.15, txt, bq, bk, gen)
            dense = lambda: block_sparse_attention_triton(q, k, v, None, None, txt_len=txt, mode="dense",  # noqa: E731
                                                          block_q=bq, block_k=bk, config=cfg)
            err = rel_err(dense()[:, :, :4096], ref[:, :, :4096])
            dense_ms = bench_ms(dense, 500) if err < 2e-2 else float("nan")
            sparse_ms = bench_ms(lambda: block_sparse_attention_triton(
                q, k, v, blocks, counts, txt_len=txt, mode="sparse", block_q=bq, block_k=bk, config=cfg), 300)
        except Exception as e:  # noqa: BLE001 - a config that does not compile is a result too
            print(f"{(bq, bk, warps, stages, desc)}: {str(e).splitlines()[0][:100]}", flush=True)
            continue
        row = {"block_q": bq, "block_k": bk, "num_warps": warps, "num_stages": stages, "tma": desc, "dense_ms": dense_ms,
               "sparse15_ms": sparse_ms, "dense_vs_cudnn": dense_ms / cudnn_ms, "sparse15_speedup": cudnn_ms / sparse_ms,
               "dense_rel_err": err}
        rows.append(row)
        print(row, flush=True)
    write_json(args.out, dict(environment(), video_tokens=l_img, cudnn_ms=cudnn_ms, rows=rows))


if __name__ == "__main__":
    main()
