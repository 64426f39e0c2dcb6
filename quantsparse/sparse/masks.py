"""Which video key blocks each (batch, head, video query block) computes: the ``svg`` and ``topk`` modes.

Output is the block-sparse kernel's contract: ``kv_blocks`` int32 ``[B, H, NQB, MAXK]`` and
``kv_counts`` int32 ``[B, H, NQB]`` over VIDEO blocks only (query blocks of ``block_q`` video tokens,
key blocks of ``block_k``); text rows and columns are always computed by the kernel, so they never
appear here. Entries past ``kv_counts`` repeat the row's last valid block, so that a kernel reading
them unmasked still reads a legal index.

Density, as used everywhere in this pack, is the fraction of video-to-video (query block, key block)
pairs computed over all (batch, head, query block): that is what the kernel's work scales with. Each
row keeps ``ceil(density * NKB)`` key blocks, so the achieved density is at least the requested one
and exceeds it by less than one block per row (``1 / NKB``); ``topk`` may add the diagonal blocks
when the budget is smaller than them.

Torch only; every tensor stays on the device of the inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ...kernels import svg_probe


@dataclass(frozen=True)
class SparseMask:
    """A mask plus what the caller needs to run it: for ``svg`` the heads to run in the permuted layout."""

    kv_blocks: torch.Tensor          # int32 [B, H, NQB, MAXK], video key-block indices, ascending per row
    kv_counts: torch.Tensor          # int32 [B, H, NQB]
    num_kv_blocks: int               # NKB = ceil(img_len / block_k)
    img_len: int
    block_q: int
    block_k: int
    temporal: Optional[torch.Tensor] = None  # bool [B, H]: heads to permute frame-major (svg only)

    @property
    def num_q_blocks(self) -> int:
        return self.kv_counts.shape[-1]

    def density(self) -> float:
        return block_density(self.kv_counts, self.num_kv_blocks)


def cat_masks(masks: "list[SparseMask]") -> SparseMask:
    """Masks of consecutive batch chunks (the cond/uncond halves of a CFG batch) as one."""
    if len(masks) == 1:
        return masks[0]
    first = masks[0]
    if any((m.num_kv_blocks, m.img_len, m.block_q, m.block_k) != (first.num_kv_blocks, first.img_len, first.block_q,
                                                                   first.block_k) for m in masks):
        raise ValueError("cat_masks: the chunks' masks differ in geometry")
    maxk = max(m.kv_blocks.shape[-1] for m in masks)
    blocks = torch.cat([torch.nn.functional.pad(m.kv_blocks, (0, maxk - m.kv_blocks.shape[-1])) for m in masks])
    temporal = None
    if any(m.temporal is not None for m in masks):
        temporal = torch.cat([m.temporal if m.temporal is not None else
                              torch.zeros(m.kv_counts.shape[:2], dtype=torch.bool, device=m.kv_counts.device)
                              for m in masks])
    return SparseMask(blocks, torch.cat([m.kv_counts for m in masks]), first.num_kv_blocks, first.img_len,
                      first.block_q, first.block_k, temporal)


def num_blocks(n: int, block: int) -> int:
    return -(-n // block)


def block_budget(density: float, num_kv_blocks: int) -> int:
    """Key blocks per query-block row: the smallest count that reaches ``density`` (at least 1)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density} must be in (0, 1]")
    return min(num_kv_blocks, max(1, math.ceil(density * num_kv_blocks - 1e-9)))


def block_density(kv_counts: torch.Tensor, num_kv_blocks: int) -> float:
    """Fraction of video-to-video blocks computed over all (batch, head, query block)."""
    return float(kv_counts.to(torch.float64).sum()) / (kv_counts.numel() * num_kv_blocks)


def _check_qk(q: torch.Tensor, k: torch.Tensor, txt_len: int) -> int:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, H, L, D]; got {tuple(q.shape)} and {tuple(k.shape)}")
    img_len = q.shape[2] - txt_len
    if txt_len < 0 or img_len < 1:
        raise ValueError(f"txt_len={txt_len} leaves no video tokens in a sequence of {q.shape[2]}")
    return img_len


# ------------------------------------------------------------------------------------ topk

def _block_mean(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, N, D] -> float32 [B, H, ceil(N/block), D] means; the last block averages only its tokens.

    Full blocks are summed through a view (no padded copy of a 118k-token tensor).
    """
    b, h, n, d = x.shape
    full = n // block
    parts = []
    if full:
        parts.append(x[:, :, :full * block].reshape(b, h, full, block, d).sum(3, dtype=torch.float32) / block)
    if n > full * block:
        parts.append(x[:, :, full * block:].sum(2, keepdim=True, dtype=torch.float32) / (n - full * block))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def diagonal_blocks(img_len: int, block_q: int, block_k: int, device=None) -> torch.Tensor:
    """bool [NQB, NKB]: key blocks that hold some of the query block's own tokens (its self-attention)."""
    nqb, nkb = num_blocks(img_len, block_q), num_blocks(img_len, block_k)
    qb = torch.arange(nqb, device=device)
    first = (qb * block_q) // block_k
    last = (torch.clamp((qb + 1) * block_q, max=img_len) - 1) // block_k
    kb = torch.arange(nkb, device=device)
    return (kb[None, :] >= first[:, None]) & (kb[None, :] <= last[:, None])


def topk_mask(q: torch.Tensor, k: torch.Tensor, *, txt_len: int, density: float,
              block_q: int = 128, block_k: int = 64) -> SparseMask:
    """Per (batch, head): score blocks by their mean-pooled q and k, keep the best up to the density.

    Pooled scores are a cheap proxy for a block's attention mass (SpargeAttn / MInference style). The
    diagonal is forced in because a token's attention to itself and its neighbours is the mass a
    smooth video latent can least afford to drop, and pooling can underrate it.
    """
    img_len = _check_qk(q, k, txt_len)
    qp = _block_mean(q[:, :, txt_len:], block_q)
    kp = _block_mean(k[:, :, txt_len:], block_k)
    scores = qp @ kp.transpose(-1, -2)  # float32 [B, H, NQB, NKB]; the softmax scale does not change the order
    nkb = kp.shape[2]
    diag = diagonal_blocks(img_len, block_q, block_k, device=q.device)
    scores.masked_fill_(diag, float("inf"))
    keep = max(block_budget(density, nkb), int(diag.sum(1).max()))
    idx = scores.topk(keep, dim=-1).indices.sort(dim=-1).values.to(torch.int32).contiguous()
    counts = torch.full(idx.shape[:-1], keep, dtype=torch.int32, device=q.device)
    return SparseMask(idx, counts, nkb, img_len, block_q, block_k)


# ------------------------------------------------------------------------------------ svg

def band_blocks(img_len: int, block_q: int, block_k: int, keep: int, device=None) -> torch.Tensor:
    """int32 [NQB, keep]: ``keep`` consecutive key blocks centred on each query block's centre.

    In (t, h, w) order a band of key blocks is the query's own frame and its neighbours; near the ends
    the band slides inwards instead of shrinking, so every row computes the same number of blocks.
    """
    nqb, nkb = num_blocks(img_len, block_q), num_blocks(img_len, block_k)
    if not 1 <= keep <= nkb:
        raise ValueError(f"band of {keep} blocks does not fit {nkb} key blocks")
    qb = torch.arange(nqb, device=device)
    centre = (qb * block_q + (torch.clamp((qb + 1) * block_q, max=img_len) - qb * block_q) // 2) // block_k
    start = torch.clamp(centre - keep // 2, min=0, max=nkb - keep)
    return (start[:, None] + torch.arange(keep, device=device)[None, :]).to(torch.int32)


def temporal_permutation(grid: tuple[int, int, int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, inverse) of the video tokens: ``permuted = x[perm]``, ``x = permuted[inverse]``.

    The permuted layout lists one spatial position across all frames, then the next, so that a block
    band there is a temporal pattern (same place, neighbouring frames and beyond).
    """
    t, h, w = grid
    idx = torch.arange(t * h * w, device=device)
    perm = idx.view(t, h * w).t().reshape(-1)
    inverse = idx.view(h * w, t).t().reshape(-1)
    return perm, inverse


def _permute_video(x: torch.Tensor, heads: torch.Tensor, order: torch.Tensor, txt_len: int) -> torch.Tensor:
    if x.dim() != 4 or heads.shape != x.shape[:2]:
        raise ValueError(f"expected x [B, H, L, D] and heads [B, H]; got {tuple(x.shape)} and {tuple(heads.shape)}")
    if x.shape[2] - txt_len != order.numel():
        raise ValueError(f"{x.shape[2] - txt_len} video tokens do not match a permutation of {order.numel()}")
    bi, hi = heads.nonzero(as_tuple=True)
    if bi.numel() == 0:
        return x
    out = x.clone()
    out[bi, hi, txt_len:] = x[bi, hi][:, txt_len + order.to(x.device)]
    return out


def permute_heads(x: torch.Tensor, temporal: torch.Tensor, grid: tuple[int, int, int], txt_len: int) -> torch.Tensor:
    """Put the video tokens of the temporal heads in frame-major (spatial-position-major) order.

    Apply to q, k and v before the kernel; text tokens and spatial heads are untouched.
    """
    perm, _ = temporal_permutation(grid, device=x.device)
    return _permute_video(x, temporal, perm, txt_len)


def unpermute_heads(x: torch.Tensor, temporal: torch.Tensor, grid: tuple[int, int, int], txt_len: int) -> torch.Tensor:
    """Inverse of ``permute_heads``; apply to the kernel's output."""
    _, inverse = temporal_permutation(grid, device=x.device)
    return _permute_video(x, temporal, inverse, txt_len)


def sample_rows(img_len: int, count: int, device=None) -> torch.Tensor:
    """Evenly spread video query rows (the middle of ``count`` equal strata).

    SparseVideoGen samples at random; even strata cover every frame and make the choice reproducible
    across devices and runs.
    """
    count = min(count, img_len)
    return (torch.arange(count, device=device) * img_len + img_len // 2) // count


def svg_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: tuple[int, int, int], txt_len: int,
             density: float, block_q: int = 128, block_k: int = 64, sample_rows_count: int = 64,
             key_padding: Optional[torch.Tensor] = None) -> SparseMask:
    """SparseVideoGen's online profiling: per (batch, head), spatial or temporal band, whichever errs less.

    A few query rows are computed densely and with each candidate mask (``kernels.svg_probe``: one
    pass over K and V on the GPU); the candidate whose sampled output is closer (squared error) wins.
    Both candidates are the same band of ``ceil(density * NKB)`` key blocks, in (t, h, w) order for
    spatial heads and in the ``temporal_permutation`` layout for temporal heads, so both reach the
    same density.

    ``key_padding``: bool ``[B, L]`` (True = a real key), so that padded text keys do not sway the choice.
    """
    img_len = _check_qk(q, k, txt_len)
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v {tuple(v.shape)} does not match q {tuple(q.shape)}")
    t, hh, ww = grid
    if t * hh * ww != img_len:
        raise ValueError(f"latent grid {tuple(grid)} has {t * hh * ww} tokens but the sequence has {img_len} "
                         f"video tokens after {txt_len} text tokens")
    dev = q.device
    b, h = q.shape[:2]
    nkb = num_blocks(img_len, block_k)
    keep = block_budget(density, nkb)
    band = band_blocks(img_len, block_q, block_k, keep, device=dev)

    rows = sample_rows(img_len, sample_rows_count, device=dev)
    _, inverse = temporal_permutation(grid, device=dev)
    lo_spatial = band[rows // block_q, 0]
    lo_temporal = band[inverse[rows] // block_q, 0]
    err = svg_probe(q, k, v, rows, lo_spatial, lo_temporal, txt_len=txt_len, grid=tuple(grid), band_block=block_k,
                    keep=keep, key_padding=key_padding)
    temporal = err[1] < err[0]
    kv_blocks = band.expand(b, h, *band.shape)  # one band for every head: a view, not B*H copies
    counts = torch.full((b, h, band.shape[0]), keep, dtype=torch.int32, device=dev)
    return SparseMask(kv_blocks, counts, nkb, img_len, block_q, block_k, temporal=temporal)


# ------------------------------------------------------------------------------------ both

def build_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mode: str, grid: tuple[int, int, int],
               txt_len: int, density: float, block_q: int = 128, block_k: int = 64, sample_rows_count: int = 64,
               key_padding: Optional[torch.Tensor] = None) -> SparseMask:
    """Dispatch on the ``SparseConfig.mask_mode`` string."""
    if mode == "svg":
        return svg_mask(q, k, v, grid=grid, txt_len=txt_len, density=density, block_q=block_q, block_k=block_k,
                        sample_rows_count=sample_rows_count, key_padding=key_padding)
    if mode == "topk":
        return topk_mask(q, k, txt_len=txt_len, density=density, block_q=block_q, block_k=block_k)
    raise ValueError(f"mask mode {mode!r} is not supported; choose 'svg' or 'topk'")


def token_mask(mask: SparseMask, txt_len: int) -> torch.Tensor:
    """bool [B, H, L, L] of the entries the kernel computes (sparse mode), in the mask's own layout.

    For tests and eager references at small sizes only: it materialises L x L.
    """
    b, h, nqb, _ = mask.kv_blocks.shape
    n = mask.img_len
    dev = mask.kv_blocks.device
    slot = torch.arange(mask.kv_blocks.shape[-1], device=dev)
    valid = slot < mask.kv_counts[..., None].long()
    # Padding slots repeat a listed block; summing (not overwriting) keeps a False slot from erasing it.
    kb_keep = torch.zeros(b, h, nqb, mask.num_kv_blocks, dtype=torch.int32, device=dev)
    kb_keep = kb_keep.scatter_add_(-1, mask.kv_blocks.long(), valid.to(torch.int32)) > 0
    pos = torch.arange(n, device=dev)
    video = kb_keep[:, :, pos // mask.block_q][:, :, :, pos // mask.block_k]
    out = torch.ones(b, h, txt_len + n, txt_len + n, dtype=torch.bool, device=dev)
    out[:, :, txt_len:, txt_len:] = video
    return out

