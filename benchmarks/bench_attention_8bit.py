"""8-bit attention (INT8 Q K^T, FP8 P V) against the BF16 kernel and cuDNN, HunyuanVideo's joint attention.

24 heads x 128, 256 text tokens, 30,210 and 118,800 video tokens, random BF16 inputs, 15% random block
lists (128 x 128). First the accuracy of each 8-bit mode against its 16-bit counterpart (dense against
cuDNN on all rows), then the times: the 8-bit rows include the quantization pass of every call
(reported alone as "quantize"). ``--sweep`` adds launch configurations of the 8-bit dense mode.

    python benchmarks/bench_attention_8bit.py --out benchmarks/results/attention_8bit_h100.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bench_ms, environment, rel_err, write_json  # noqa: E402
from bench_attention import HEAD_DIM, HEADS, TXT, random_mask  # noqa: E402

from comfyui_quantsparse.kernels.sparse_attention import block_sparse_attention_triton  # noqa: E402
from comfyui_quantsparse.kernels.sparse_attention_fp8 import (  # noqa: E402
    block_sparse_attention_fp8_triton, quantize_qkv_fp8_triton,
)

DENSITY = 0.15
SWEEP = [dict(num_warps=w, num_stages=s) for w, s in ((8, 3), (8, 4))] + \
    [dict(num_warps=w, num_stages=s, ws=True) for w, s in ((4, 2), (4, 3), (8, 2), (8, 3))]


def run(l_img: int, sweep: bool) -> dict:
    seq = TXT + l_img
    gen = torch.Generator(device="cuda").manual_seed(l_img)
    q, k, v = (torch.randn(1, HEADS, seq, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    blocks, counts = random_mask(q, k, DENSITY, TXT, 128, 128, gen)
    kw = dict(txt_len=TXT, block_q=128, block_k=128, check_lists=False)

    def cudnn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)

    def f16(mode):
        return lambda: block_sparse_attention_triton(q, k, v, blocks, counts, mode=mode, **kw)

    def f8(mode, config=None, block_k=128):
        args = dict(kw, block_k=block_k)
        return lambda: block_sparse_attention_fp8_triton(q, k, v, blocks, counts, mode=mode, config=config, **args)

    row = {"video_tokens": l_img, "density": DENSITY}
    ref_dense = cudnn()
    row["err_dense_vs_cudnn"] = rel_err(f8("dense")(), ref_dense)
    row["err_bf16_dense_vs_cudnn"] = rel_err(f16("dense")(), ref_dense)
    del ref_dense
    row["err_sparse_vs_bf16"] = rel_err(f8("sparse")(), f16("sparse")())
    (o8, r8), (o16, r16) = f8("refresh")(), f16("refresh")()
    row["err_refresh_out_vs_bf16"] = rel_err(o8, o16)
    row["err_refresh_residual_vs_bf16"] = rel_err(r8, r16)
    del o8, r8, o16, r16
    print({k_: (round(v_, 5) if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)
    ms = {
        "cudnn_dense": bench_ms(cudnn),
        "bf16_dense": bench_ms(f16("dense")),
        "int8fp8_dense": bench_ms(f8("dense")),
        "quantize": bench_ms(lambda: quantize_qkv_fp8_triton(q, k, v, txt_len=TXT, sm_scale=HEAD_DIM ** -0.5)),
        "bf16_sparse": bench_ms(f16("sparse")),
        "int8fp8_sparse": bench_ms(f8("sparse")),
        "bf16_refresh": bench_ms(f16("refresh")),
        "int8fp8_refresh": bench_ms(f8("refresh")),
    }
    row["ms"] = ms
    row["dense_speedup_vs_cudnn"] = ms["cudnn_dense"] / ms["int8fp8_dense"]
    row["sparse_speedup_vs_bf16"] = ms["bf16_sparse"] / ms["int8fp8_sparse"]
    row["refresh_vs_cudnn_dense"] = ms["int8fp8_refresh"] / ms["cudnn_dense"]
    print({k_: round(v_, 3) for k_, v_ in ms.items()}, flush=True)
    if sweep:
        row["sweep_dense"] = []
        for bk in (128,):
            for cfg in SWEEP:
                try:
                    t = bench_ms(f8("dense", config=cfg, block_k=bk))
                except Exception as e:  # noqa: BLE001 - a configuration that does not compile is reported
                    t = None
                    print(f"config {cfg} block_k {bk}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                row["sweep_dense"].append(dict(cfg, block_k=bk, ms=t))
                print(row["sweep_dense"][-1], flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, nargs="+", default=[30210, 118800])
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    rows = [run(n, args.sweep) for n in args.tokens]
    write_json(args.out, dict(environment(), heads=HEADS, head_dim=HEAD_DIM, txt=TXT, rows=rows))


if __name__ == "__main__":
    main()
