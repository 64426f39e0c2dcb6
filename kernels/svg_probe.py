"""SparseVideoGen's online probe: how much a spatial and a temporal band lose on a few sampled rows.

``err = svg_probe(q, k, v, rows, lo_spatial, lo_temporal, txt_len=T, grid=(F, H, W), band_block=64,
keep=n)`` with q, k, v [B, H, L, D] (text first) returns float32 [2, B, H]: for each (batch, head) the
squared error, summed over the sampled rows and the head dimension, of attention under the spatial
band (index 0) and the temporal band (index 1) against dense attention.

A sampled row ``s`` is the video query ``rows[s]``. Its spatial band keeps the video keys ``j`` with
``j // band_block`` in ``[lo_spatial[s], lo_spatial[s] + keep)``; its temporal band does the same with
``j``'s position in the frame-major layout, ``(j % (H*W)) * F + j // (H*W)``. Text keys are kept by
both; ``key_padding`` (bool [B, L], True = a real key) drops padded keys from all three.

Why a kernel: the eager probe materialises float32 logits and two masked softmaxes of [heads, S, L]
(and float32 copies of K and V): 90 ms at 118,800 tokens, more than a 15% sparse attention pass. The
kernel reads K and V once, shares each QK^T tile between the three softmaxes, and splits the keys
over several programs per head (flash-decoding style) so that 24 heads fill the GPU.
"""

from __future__ import annotations

import math

import torch

from ._triton import HAS_TRITON, interpreting, tl, triton

_REF_HEAD_ELEMS = 1 << 25  # logits elements per step of the reference


def _check(q, k, v, rows, lo_spatial, lo_temporal, txt_len, grid, band_block, keep, key_padding):
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must be [B, H, L, D] of one shape; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    img_len = q.shape[2] - txt_len
    t, hh, ww = grid
    if txt_len < 0 or img_len < 1 or t * hh * ww != img_len:
        raise ValueError(f"grid {tuple(grid)} does not match the {img_len} video tokens after {txt_len} text tokens")
    if rows.dim() != 1 or lo_spatial.shape != rows.shape or lo_temporal.shape != rows.shape:
        raise ValueError("rows, lo_spatial and lo_temporal must be 1-d of one length")
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= img_len):
        raise ValueError(f"sampled rows must be video positions in [0, {img_len})")
    if band_block < 1 or keep < 1:
        raise ValueError(f"band_block={band_block} and keep={keep} must be positive")
    if key_padding is not None and (key_padding.dtype != torch.bool or key_padding.shape != (q.shape[0], q.shape[2])):
        raise ValueError(f"key_padding must be bool [B, L] = {(q.shape[0], q.shape[2])}")


def band_keep(rows_lo: torch.Tensor, key_pos: torch.Tensor, band_block: int, keep: int) -> torch.Tensor:
    """bool [S, n]: is the video key at ``key_pos`` (in the band's layout) inside row s's band."""
    kb = (key_pos // band_block)[None, :]
    return (kb >= rows_lo[:, None]) & (kb < rows_lo[:, None] + keep)


def svg_probe_reference(q, k, v, rows, lo_spatial, lo_temporal, *, txt_len, grid, band_block, keep,
                        key_padding=None, sm_scale=None):
    """Eager reference: float32 logits of the sampled rows, a softmax per candidate, in chunks of heads."""
    _check(q, k, v, rows, lo_spatial, lo_temporal, txt_len, grid, band_block, keep, key_padding)
    b, h, seq, d = q.shape
    t, hh, ww = grid
    dev = q.device
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    j = torch.arange(seq - txt_len, device=dev)
    frame_major = (j % (hh * ww)) * t + j // (hh * ww)
    txt = torch.ones(rows.numel(), txt_len, dtype=torch.bool, device=dev)
    keeps = [torch.cat([txt, band_keep(lo_spatial.to(dev), j, band_block, keep)], 1),
             torch.cat([txt, band_keep(lo_temporal.to(dev), frame_major, band_block, keep)], 1)]
    err = torch.empty(2, b, h, dtype=torch.float32, device=dev)
    chunk = max(1, _REF_HEAD_ELEMS // max(1, rows.numel() * seq))
    for bi in range(b):
        real = None if key_padding is None else key_padding[bi][None, :]
        for h0 in range(0, h, chunk):
            logits = q[bi, h0:h0 + chunk, txt_len + rows.to(dev)].float() @ k[bi, h0:h0 + chunk].float().transpose(-1, -2)
            logits = logits * scale
            if real is not None:
                logits = logits.masked_fill(~real, float("-inf"))
            vv = v[bi, h0:h0 + chunk].float()
            dense = torch.softmax(logits, -1) @ vv
            for c in range(2):
                sparse = torch.softmax(logits.masked_fill(~keeps[c], float("-inf")), -1) @ vv
                err[c, bi, h0:h0 + chunk] = (sparse - dense).square().sum((-1, -2))
    return err


if HAS_TRITON:

    @triton.jit
    def _online(acc, m_i, l_i, s, keep, v):
        s = tl.where(keep, s, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.where(keep, tl.exp2(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, m_new, l_i

    @triton.jit
    def _svg_probe_kernel(q_ptr, k_ptr, v_ptr, rows_ptr, los_ptr, lot_ptr, pad_ptr, m_ptr, l_ptr, acc_ptr,
                          sqb, sqh, sql, skb, skh, skl, svb, svh, svl,
                          H, L, txt_len, T, HW, KEEP, BAND, tiles_per_split, n_tiles, NSPLIT, qk_scale,
                          S: tl.constexpr, BK: tl.constexpr, D: tl.constexpr, HAS_PAD: tl.constexpr):
        # One program per (batch * head, key split): three online softmaxes (dense, spatial, temporal)
        # over the split's key tiles, sharing each QK^T tile; partial (m, l, acc) go to memory.
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // H
        h = bh % H
        srow = tl.arange(0, S)
        cols = tl.arange(0, D)
        vrow = tl.load(rows_ptr + srow)
        q_base = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        k_base = k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh
        v_base = v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh
        q = tl.load(q_base + (txt_len + vrow).to(tl.int64)[:, None] * sql + cols[None, :])
        lo_s = tl.load(los_ptr + srow)
        lo_t = tl.load(lot_ptr + srow)
        m0 = tl.full([S], -1.0e30, tl.float32)
        m1 = tl.full([S], -1.0e30, tl.float32)
        m2 = tl.full([S], -1.0e30, tl.float32)
        l0 = tl.zeros([S], tl.float32)
        l1 = tl.zeros([S], tl.float32)
        l2 = tl.zeros([S], tl.float32)
        a0 = tl.zeros([S, D], tl.float32)
        a1 = tl.zeros([S, D], tl.float32)
        a2 = tl.zeros([S, D], tl.float32)
        t0 = split * tiles_per_split
        t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
        for tile in range(t0, t1):
            keys = tile * BK + tl.arange(0, BK)
            ok = keys < L
            kk = tl.minimum(keys, L - 1).to(tl.int64)
            kt = tl.load(k_base + kk[:, None] * skl + cols[None, :])
            vt = tl.load(v_base + kk[:, None] * svl + cols[None, :])
            s = tl.dot(q, tl.trans(kt)) * qk_scale
            if HAS_PAD:
                ok = ok & (tl.load(pad_ptr + b.to(tl.int64) * L + kk) != 0)
            is_txt = keys < txt_len
            j = tl.maximum(keys - txt_len, 0)
            jb = j // BAND
            jpb = ((j % HW) * T + j // HW) // BAND
            in_s = is_txt[None, :] | ((jb[None, :] >= lo_s[:, None]) & (jb[None, :] < lo_s[:, None] + KEEP))
            in_t = is_txt[None, :] | ((jpb[None, :] >= lo_t[:, None]) & (jpb[None, :] < lo_t[:, None] + KEEP))
            a0, m0, l0 = _online(a0, m0, l0, s, ok[None, :], vt)
            a1, m1, l1 = _online(a1, m1, l1, s, ok[None, :] & in_s, vt)
            a2, m2, l2 = _online(a2, m2, l2, s, ok[None, :] & in_t, vt)
        # layout [B*H, NSPLIT, 3, S(, D)]
        base = (bh.to(tl.int64) * NSPLIT + split) * 3
        tl.store(m_ptr + base * S + srow, m0)
        tl.store(m_ptr + (base + 1) * S + srow, m1)
        tl.store(m_ptr + (base + 2) * S + srow, m2)
        tl.store(l_ptr + base * S + srow, l0)
        tl.store(l_ptr + (base + 1) * S + srow, l1)
        tl.store(l_ptr + (base + 2) * S + srow, l2)
        offs = srow[:, None] * D + cols[None, :]
        tl.store(acc_ptr + base * S * D + offs, a0)
        tl.store(acc_ptr + (base + 1) * S * D + offs, a1)
        tl.store(acc_ptr + (base + 2) * S * D + offs, a2)


def default_config(interp: bool | None = None) -> dict:
    if interp if interp is not None else interpreting():
        return dict(BK=32, num_warps=4, num_stages=1)
    return dict(BK=64, num_warps=8, num_stages=2)


def _splits(bh: int, n_tiles: int, device) -> int:
    """Key splits per head: enough programs for about two waves of the GPU's SMs."""
    if device.type != "cuda":
        return max(1, min(n_tiles, 2))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, -(-2 * sms // bh)))


def svg_probe_triton(q, k, v, rows, lo_spatial, lo_temporal, *, txt_len, grid, band_block, keep,
                     key_padding=None, sm_scale=None, config=None):
    """Triton kernel, same contract as :func:`svg_probe_reference`; the sampled-row count must be a
    power of two of at least 16 (a tl.dot operand)."""
    _check(q, k, v, rows, lo_spatial, lo_temporal, txt_len, grid, band_block, keep, key_padding)
    b, h, seq, d = q.shape
    n = rows.numel()
    if n < 16 or n & (n - 1):
        raise ValueError(f"the Triton probe needs a power-of-two count of sampled rows >= 16, got {n}")
    cfg = dict(default_config())
    cfg.update(config or {})
    bk = cfg.pop("BK")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    n_tiles = -(-seq // bk)
    nsplit = _splits(b * h, n_tiles, q.device)
    per = -(-n_tiles // nsplit)
    dev = q.device
    m = torch.empty(b * h, nsplit, 3, n, dtype=torch.float32, device=dev)
    lsum = torch.empty_like(m)
    acc = torch.empty(b * h, nsplit, 3, n, d, dtype=torch.float32, device=dev)
    pad = key_padding.contiguous().view(torch.uint8) if key_padding is not None else rows
    t, hh, ww = grid
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    _svg_probe_kernel[(b * h, nsplit)](
        q, k, v, rows.to(device=dev, dtype=torch.int32).contiguous(),
        lo_spatial.to(device=dev, dtype=torch.int32).contiguous(),
        lo_temporal.to(device=dev, dtype=torch.int32).contiguous(), pad, m, lsum, acc,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        h, seq, txt_len, t, hh * ww, keep, band_block, per, n_tiles, nsplit, scale * 1.4426950408889634,
        S=n, BK=bk, D=d, HAS_PAD=key_padding is not None, **cfg)
    # Merge the splits (log2 domain), then compare each band with dense.
    top = m.amax(1, keepdim=True)
    w = torch.exp2(m - top)
    out = (acc * w[..., None]).sum(1) / (lsum * w).sum(1)[..., None]  # [B*H, 3, S, D]
    err = (out[:, 1:] - out[:, :1]).square().sum((-1, -2))  # [B*H, 2]
    return err.t().reshape(2, b, h).contiguous()
