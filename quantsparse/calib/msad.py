"""MSAD losses (multi-scale salient attention distillation), as DESIGN.md section 5 states them.

The calibrated (quantized, sparse) block is taught to keep the full BF16 block's attention at two
scales, from the exact q and k that enter attention (after QK-norm and RoPE), fed the same input:

- global: ``MSE(softmax(pool(Q) pool(K)^T / sqrt(d)))`` with ``pool`` a 1-D average over the token
  sequence, kernel = stride = ``s`` (128), ceil mode (the paper's Table 13 sizes are ceil(L/s));
- local: ``MSE(softmax(Q[I] K^T / sqrt(d)))``: attention rows of the top-``k`` (256) most attended
  tokens ``I`` used as queries against all keys; saliency ``s_j = sum_{h,i} A[h, i, j]`` comes from
  the full model's attention and is computed in query chunks, so no L x L matrix is ever held.

Both maps are computed in float32 (the maps are probabilities, mostly tiny: BF16 would round the
differences away). Every function takes ``[B, H, L, D]`` q and k; ``bias`` is the additive text
padding mask the attention call received (broadcastable to ``[B, 1, 1, L]``) or None, applied to the
keys of the local rows and of the saliency (a padded key receives no attention in the model either).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

POOL_STRIDE = 128  # paper App. C / H: s = 128
SALIENT_TOKENS = 256  # paper App. C: k = 256
SALIENCY_CHUNK_ELEMS = 1 << 26  # float32 logits per chunk of the saliency pass (256 MB)


def _key_bias(bias: Optional[torch.Tensor], b: int, seq: int) -> Optional[torch.Tensor]:
    """``[B, 1, 1, L]`` float32 additive key bias (or None)."""
    if bias is None:
        return None
    return bias.to(torch.float32).reshape(bias.shape[0], 1, 1, seq).expand(b, 1, 1, seq)


def pool_tokens(x: torch.Tensor, stride: int = POOL_STRIDE) -> torch.Tensor:
    """``[B, H, L, D]`` -> float32 ``[B, H, ceil(L/stride), D]`` window means; the last window averages
    only the tokens it holds (``avg_pool1d(ceil_mode=True)``)."""
    b, h, n, d = x.shape
    pooled = F.avg_pool1d(x.float().reshape(b * h, n, d).transpose(1, 2), kernel_size=stride, stride=stride,
                          ceil_mode=True)
    return pooled.transpose(1, 2).reshape(b, h, -1, d)


def pooled_attention(q: torch.Tensor, k: torch.Tensor, stride: int = POOL_STRIDE) -> torch.Tensor:
    """The global map ``softmax(pool(Q) pool(K)^T / sqrt(d))``: float32 ``[B, H, L~, L~]``."""
    qp, kp = pool_tokens(q, stride), pool_tokens(k, stride)
    return torch.softmax(qp @ kp.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)


def saliency(q: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor] = None,
             chunk_elems: int = SALIENCY_CHUNK_ELEMS) -> torch.Tensor:
    """``s_j = sum_{h, i} softmax(Q K^T / sqrt(d))[h, i, j]``: float32 ``[B, L]``, attention each key receives.

    Query rows are processed in chunks of at most ``chunk_elems`` logits (all heads), so memory is
    ``O(chunk * L)``, never ``O(L^2)``.
    """
    b, h, n, d = q.shape
    scale = d ** -0.5
    kb = _key_bias(bias, b, n)
    rows = max(1, chunk_elems // (h * n))
    out = torch.zeros(b, n, dtype=torch.float32, device=q.device)
    for bi in range(b):
        kk = k[bi].float().transpose(-1, -2)
        for r0 in range(0, n, rows):
            logits = q[bi, :, r0:r0 + rows].float() @ kk * scale  # [H, rows, L]
            if kb is not None:
                logits = logits + kb[bi]
            out[bi] += torch.softmax(logits, dim=-1).sum(dim=(0, 1))
    return out


def salient_indices(sal: torch.Tensor, count: int = SALIENT_TOKENS) -> torch.Tensor:
    """Top-``count`` tokens by saliency, ``[B, min(count, L)]`` int64, ascending by position (stable order)."""
    count = min(count, sal.shape[-1])
    return sal.topk(count, dim=-1).indices.sort(dim=-1).values


def local_attention(q: torch.Tensor, k: torch.Tensor, idx: torch.Tensor,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows ``idx`` of the full attention, normalised over all keys: float32 ``[B, H, len(idx), L]``."""
    b, h, n, d = q.shape
    qi = torch.gather(q, 2, idx[:, None, :, None].expand(b, h, idx.shape[-1], d)).float()
    logits = qi @ k.float().transpose(-1, -2) * d ** -0.5
    kb = _key_bias(bias, b, n)
    if kb is not None:
        logits = logits + kb
    return torch.softmax(logits, dim=-1)


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements, in float32."""
    return (a.float() - b.float()).square().mean()


def global_loss(target_map: torch.Tensor, q: torch.Tensor, k: torch.Tensor, stride: int = POOL_STRIDE) -> torch.Tensor:
    """``L_global``: MSE between the full model's pooled map (``target_map``) and this block's."""
    return mse(pooled_attention(q, k, stride), target_map)


def local_loss(target_rows: torch.Tensor, q: torch.Tensor, k: torch.Tensor, idx: torch.Tensor,
               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``L_local``: MSE between the full model's salient rows (``target_rows``) and this block's rows ``idx``."""
    return mse(local_attention(q, k, idx, bias), target_rows)


def msad_loss(out: torch.Tensor, target_out: torch.Tensor, l_global: torch.Tensor, l_local: torch.Tensor,
              lambda_global: float, lambda_local: float) -> tuple[torch.Tensor, dict[str, float]]:
    """``L = MSE(out) + lambda_g * L_global + lambda_l * L_local`` and its parts (floats, for logs)."""
    l_out = mse(out, target_out)
    total = l_out + lambda_global * l_global + lambda_local * l_local
    return total, {"out": float(l_out), "global": float(l_global), "local": float(l_local)}


def normalised_lambdas(l_out: float, l_global: float, l_local: float, *, floor: float = 1e-20) -> tuple[float, float]:
    """Lambdas that bring each attention term to the order of the output loss (paper: "the same order of
    magnitude as L_quant"), measured once at the start of a block and then frozen."""
    return l_out / max(l_global, floor), l_out / max(l_local, floor)
