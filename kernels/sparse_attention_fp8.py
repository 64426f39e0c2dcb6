"""8-bit variant of the block-sparse attention, SageAttention2-style: INT8 Q K^T, FP8 (e4m3) P V.

Same contract as :mod:`.sparse_attention` (modes ``sparse``, ``dense`` and ``refresh``; the text rows and
columns always computed; svg's temporal heads), but both products run on Hopper's 8-bit tensor cores
(twice the BF16 rate):

- Q and K in INT8 per token: ``x8 = rint(x * 127 / amax(row))``; the scales multiply the score tile
  (Q's carries the softmax scale and log2 e). K is smoothed first (its mean over the tokens
  subtracted, per batch and head): every score of a row moves by the same q . mean, which the
  softmax ignores, and the tokens' ranges shrink to what differs between them. INT8, not e4m3, for
  Q K^T: on Gaussian inputs the output error is 1.4% against 5.6% (e4m3 keeps 3 mantissa bits).
- V per channel (per batch, head): ``v8 = v * 448 / amax(channel)``, stored transposed ``[B, H, D, L]``,
  because Hopper's FP8 MMA wants both operands contiguous along the reduced dimension.
- P in [0, 1] is cast as ``p * 448`` (the static scale of SageAttention2) so that small probabilities
  keep e4m3's precision; the denominator is summed from the unrounded P.

:func:`quantize_qkv_fp8` writes the quantized tensors in the kernel's layout: the temporal heads' video
tokens are already frame-major there, so every key tile is contiguous (TMA on Hopper) and only the
query rows and output rows go through the permutation's index arithmetic. The quantization is a
separate pass over q, k, v (one read, one quarter-size write each), paid per call.

The reference computes in float32 from the same quantized Q, K, V and quantizes P the same way
relative to each row's final maximum (the kernel's online softmax rounds P relative to the running
maximum, so the two differ by less than one e4m3 step on the affected tiles).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._triton import HAS_TRITON, interpreting, tl, triton
from .rounding import RINT_MAGIC
from .sparse_attention import (
    LOG2E, _check, _desc_default, _num_blocks, _permute_heads, block_mask, complement_lists,
    default_config, temporal_order, token_major_output as _token_major,
)

if HAS_TRITON:
    from .sparse_attention import _keep, _program_block, _video_tokens

FP8_MAX = 448.0  # largest finite e4m3 value
INT8_MAX = 127.0
AMAX_FLOOR = 1e-12  # an all-zero row or channel quantizes to zeros, not NaN
FP8_MODES = ("sparse", "dense", "refresh")
_MODE_ID = {"sparse": 0, "dense": 1, "refresh": 3}
_VT_ALIGN = 16  # V^T's row length is padded to 16 tokens: TMA wants 16-byte row strides


class Fp8QKV(NamedTuple):
    """Quantized operands in the kernel's layout: the text tokens, zero rows up to ``text_pad(txt_len)``
    (so that every video key tile starts 16-byte aligned in V^T, as TMA wants), then the video tokens,
    the temporal heads' frame-major. Length LQ = text_pad + L_img."""
    q: torch.Tensor  # int8 [B, H, LQ, D]
    q_scale: torch.Tensor  # float32 [B, H, LQ]: amax / 127 * sm_scale * log2(e)
    k: torch.Tensor  # int8 [B, H, LQ, D], of k - k_mean
    k_scale: torch.Tensor  # float32 [B, H, LQ]: amax / 127
    vt: torch.Tensor  # float8_e4m3fn [B, H, D, Lp] (Lp = LQ rounded up to 16)
    v_scale: torch.Tensor  # float32 [B, H, D]: amax / 448
    k_mean: torch.Tensor  # float32 [B, H, D]: subtracted from k before quantizing


def _check_fp8(mode, q):
    if mode not in FP8_MODES:
        raise ValueError(f"block_sparse_attention (fp8): mode={mode!r} must be one of {FP8_MODES}")
    if not hasattr(torch, "float8_e4m3fn"):
        raise RuntimeError("FP8 attention needs a PyTorch with torch.float8_e4m3fn (2.1 or later)")


def text_pad(txt_len: int) -> int:
    return -(-txt_len // _VT_ALIGN) * _VT_ALIGN


def _to_kernel_layout(x, temporal, grid, txt_len):
    if temporal is not None:
        perm, _ = temporal_order(grid, x.device)
        x = _permute_heads(x, temporal, perm, txt_len)
    tp = text_pad(txt_len)
    if tp == txt_len:
        return x
    gap = x.new_zeros(*x.shape[:2], tp - txt_len, *x.shape[3:])
    return torch.cat([x[:, :, :txt_len], gap, x[:, :, txt_len:]], 2)


def _from_kernel_layout(x, txt_len):
    """Drops the padding rows (dim 2) of the kernel's layout."""
    tp = text_pad(txt_len)
    return x if tp == txt_len else torch.cat([x[:, :, :txt_len], x[:, :, tp:]], 2)


def _quant_rows(x):
    amax = x.abs().amax(-1).clamp_min(AMAX_FLOOR)
    return torch.round(x * (INT8_MAX / amax)[..., None]).to(torch.int8), amax / INT8_MAX


def key_mean(k) -> torch.Tensor:
    """float32 [B, H, D] mean of k over its tokens (the smoothing shift)."""
    return k.float().mean(2).contiguous()


def lse_shift(q, k_mean, sm_scale) -> torch.Tensor:
    """[B, H, L] what smoothing took off every score of a row (natural log units): q . mean * scale."""
    return (q.float() @ k_mean[..., None])[..., 0] * sm_scale


def _v_inverse(vamax):
    """448 / channel amax: computed once (here) for both implementations, so they round alike."""
    return (FP8_MAX / vamax).float().contiguous()


def quantize_qkv_fp8_reference(q, k, v, *, txt_len, sm_scale, temporal=None, grid=None) -> Fp8QKV:
    """Eager quantization (float32 arithmetic) into the kernel's layout."""
    km = key_mean(k)
    q, k, v = (_to_kernel_layout(x.float(), temporal, grid, txt_len) for x in (q, k, v))
    q8, qs = _quant_rows(q)
    k8, ks = _quant_rows(k - km[:, :, None, :])
    vamax = v.abs().amax(2).clamp_min(AMAX_FLOOR)  # [B, H, D]
    b, h, seq, d = v.shape
    vt = torch.zeros(b, h, d, -(-seq // _VT_ALIGN) * _VT_ALIGN, dtype=torch.float8_e4m3fn, device=v.device)
    vt[..., :seq] = (v * _v_inverse(vamax)[:, :, None, :]).to(torch.float8_e4m3fn).transpose(-1, -2)
    return Fp8QKV(q8, qs * (sm_scale * LOG2E), k8, ks, vt, vamax / FP8_MAX, km)


def _dequant(x8: Fp8QKV, sm_scale, txt_len):
    """float32 q, k (smoothed), v in the kernel's token order, the padding rows dropped."""
    q = x8.q.float() * (x8.q_scale / (sm_scale * LOG2E))[..., None]
    k = x8.k.float() * x8.k_scale[..., None]
    v = x8.vt[..., :q.shape[2]].float().transpose(-1, -2) * x8.v_scale[:, :, None, :]
    return (_from_kernel_layout(x, txt_len) for x in (q, k, v))


def _attention_fp8p(q, k, v, blocks, txt_len, pad, mode, scale, block_q, block_k):
    """float32 (out, lse) with P rounded to e4m3 after the 448 scale, relative to the row maximum."""
    bsz, heads, seq, d = q.shape
    from .sparse_attention import _REF_ROW_CHUNK, row_mask

    out = torch.empty(bsz, heads, seq, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(bsz, heads, seq, dtype=torch.float32, device=q.device)
    for r0 in range(0, seq, _REF_ROW_CHUNK):
        rows = torch.arange(r0, min(seq, r0 + _REF_ROW_CHUNK), device=q.device)
        m = row_mask(rows, seq, txt_len, blocks, mode, block_q, block_k, pad)
        s = (q[:, :, rows] @ k.transpose(-1, -2)) * scale
        s = s.masked_fill(~m, float("-inf"))
        row_max = s.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
        p = torch.exp(s - row_max)
        den = p.sum(-1, keepdim=True)
        p8 = (p * FP8_MAX).to(torch.float8_e4m3fn).float() / FP8_MAX
        out[:, :, rows] = torch.where(den > 0, (p8 @ v) / den.clamp_min(1e-30), 0.0)
        lse[:, :, rows] = torch.where(den[..., 0] > 0, row_max[..., 0] + torch.log(den[..., 0]), float("-inf"))
    return out, lse


def block_sparse_attention_fp8_reference(q, k, v, kv_blocks, kv_counts, *, txt_len, key_padding=None, sm_scale=None,
                                         mode="sparse", block_q=128, block_k=64, return_lse=False, check_lists=True,
                                         temporal=None, grid=None):
    """Eager reference of the FP8 kernel: same signature and returns as
    :func:`~.sparse_attention.block_sparse_attention_reference`."""
    _check_fp8(mode, q)
    nqb, nkb = _check(q, k, v, kv_blocks, kv_counts, txt_len, key_padding, mode, block_q, block_k, check_lists,
                      temporal, grid)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    tmp = temporal if (temporal is not None and bool(temporal.any())) else None
    x8 = quantize_qkv_fp8_reference(q, k, v, txt_len=txt_len, sm_scale=scale, temporal=tmp, grid=grid)
    qd, kd, vd = _dequant(x8, scale, txt_len)
    # In the kernel's layout; the padding follows the temporal heads' permutation.
    pad = key_padding
    if pad is not None and tmp is not None:
        perm, _ = temporal_order(grid, q.device)
        pad = _permute_heads(pad[:, None, :, None].expand(-1, q.shape[1], -1, 1), tmp, perm, txt_len)[..., 0]
    blocks = None if mode == "dense" else block_mask(kv_blocks, kv_counts, nkb)
    pad_all = pad if pad is not None else torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)

    def back(x):
        if tmp is None:
            return x
        _, inverse = temporal_order(grid, q.device)
        return _permute_heads(x, tmp, inverse, txt_len)

    shift = lse_shift(q, x8.k_mean, scale)
    if mode == "refresh":
        o_s, _ = _attention_fp8p(qd, kd, vd, blocks, txt_len, pad, "sparse", scale, block_q, block_k)
        o_d, lse = _attention_fp8p(qd, kd, vd, None, txt_len, pad_all, "dense", scale, block_q, block_k)
        out, res = back(o_d).to(q.dtype), back(o_d - o_s)[:, :, txt_len:].contiguous()
        lse = back(lse[..., None])[..., 0] + shift
        return (out, res, lse) if return_lse else (out, res)
    out, lse = _attention_fp8p(qd, kd, vd, blocks, txt_len, pad_all if mode == "dense" else pad, mode, scale,
                               block_q, block_k)
    out, lse = back(out).to(q.dtype), back(lse[..., None])[..., 0] + shift
    return (out, lse) if return_lse else out


if HAS_TRITON:

    @triton.jit
    def _to_int8(x, RINT: tl.constexpr):
        return ((x + RINT) - RINT).to(tl.int8)  # round to nearest even, then exact

    @triton.jit
    def _to_e4m3(x, EXACT: tl.constexpr):
        """e4m3 (|x| <= 448), rounded to nearest even. EXACT: rounded to the e4m3 grid in float32
        first, for the Triton interpreter, whose float -> e4m3 cast loses the carry into the exponent
        (7.9 -> 4.0); compiled kernels use the hardware conversion."""
        if EXACT:
            a = tl.abs(x)
            e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
            step = ((tl.maximum(e, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)  # e4m3 spacing at a
            r = (a / step + 12582912.0 - 12582912.0) * step
            x = tl.where(x < 0, -r, r)
        return x.to(tl.float8e4nv)

    @triton.jit
    def _source_tokens(r, tflag, txt_len, TP, T, HW, HAS_TEMPORAL: tl.constexpr):
        """Source token of row ``r`` of the kernel's layout (a padding row gives a video token; mask it)."""
        return tl.where(r < txt_len, r, txt_len + _video_tokens(tl.maximum(r - TP, 0), tflag, T, HW, HAS_TEMPORAL))

    @triton.jit
    def _fp8_quant_kernel(q_ptr, k_ptr, v_ptr, tmp_ptr, vinv_ptr, km_ptr, q8_ptr, qs_ptr, k8_ptr, ks_ptr, vt_ptr,
                          sqb, sqh, sql, skb, skh, skl, svb, svh, svl, H, LQ, Lp, txt_len, TP, T, HW, qk_scale,
                          BT: tl.constexpr, D: tl.constexpr, HAS_TEMPORAL: tl.constexpr, FMAX: tl.constexpr,
                          FLOOR: tl.constexpr, RINT: tl.constexpr, EXACT: tl.constexpr):
        """One tile of BT rows of the kernel's layout of one (batch, head): reads the source tokens
        (through the temporal permutation; the padding rows read nothing), writes q8, k8 by rows and V^T
        by columns, and the scales."""
        bh = tl.program_id(0)
        b = bh // H
        h = bh % H
        r = tl.program_id(1) * BT + tl.arange(0, BT)
        ok = r < LQ
        tflag = False
        if HAS_TEMPORAL:
            tflag = tl.load(tmp_ptr + bh) != 0
        src = _source_tokens(r, tflag, txt_len, TP, T, HW, HAS_TEMPORAL)
        real = ok & ((r < txt_len) | (r >= TP))
        src = tl.where(real, src, 0).to(tl.int64)
        cols = tl.arange(0, D)
        out_rows = (bh.to(tl.int64) * LQ + r)
        q = tl.load(q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + src[:, None] * sql + cols[None, :],
                    mask=real[:, None], other=0.0).to(tl.float32)
        qa = tl.maximum(tl.max(tl.abs(q), 1), FLOOR)
        tl.store(q8_ptr + out_rows[:, None] * D + cols[None, :], _to_int8(q * (127.0 / qa)[:, None], RINT),
                 mask=ok[:, None])
        tl.store(qs_ptr + out_rows, qa / 127.0 * qk_scale, mask=ok)
        k = tl.load(k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh + src[:, None] * skl + cols[None, :],
                    mask=real[:, None], other=0.0).to(tl.float32)
        k = k - tl.load(km_ptr + bh * D + cols)[None, :]
        ka = tl.maximum(tl.max(tl.abs(k), 1), FLOOR)
        tl.store(k8_ptr + out_rows[:, None] * D + cols[None, :], _to_int8(k * (127.0 / ka)[:, None], RINT),
                 mask=ok[:, None])
        tl.store(ks_ptr + out_rows, ka / 127.0, mask=ok)
        v = tl.load(v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh + src[:, None] * svl + cols[None, :],
                    mask=real[:, None], other=0.0).to(tl.float32)
        vinv = tl.load(vinv_ptr + bh * D + cols)  # 448 / channel amax
        v8 = _to_e4m3(v * vinv[None, :], EXACT)
        tl.store(vt_ptr + (bh.to(tl.int64) * D + cols)[None, :] * Lp + r[:, None], v8, mask=ok[:, None])

    @triton.jit
    def _fp8_step(acc, m_i, l_i, q, qs, k, ks, vt, keep, MASK: tl.constexpr, FMAX: tl.constexpr,
                  EXACT: tl.constexpr):
        """One online-softmax step over a key tile: INT8 QK^T scaled by the row and column scales
        (log2 domain), P cast to e4m3 after the static 448 scale, FP8 PV."""
        s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32) * qs[:, None] * ks[None, :]
        if MASK:
            s = tl.where(keep[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(_to_e4m3(p * FMAX, EXACT), tl.trans(vt))
        return acc, m_new, l_i

    @triton.jit
    def _fp8_tile(acc, m_i, l_i, q, qs, k_desc, vt_desc, k_ptr, ks_ptr, vt_ptr, pad_base, bh, b, h, tok0, kend,
                  txt_len, TP, LQ, Lp, L, tperm, T, HW, BLOCK_K: tl.constexpr, D: tl.constexpr, MASK: tl.constexpr,
                  HAS_PAD: tl.constexpr, HAS_TEMPORAL: tl.constexpr, USE_DESC: tl.constexpr, FMAX: tl.constexpr,
                  EXACT: tl.constexpr):
        """Keys ``tok0 .. tok0 + BLOCK_K`` of the kernel's layout (contiguous), those at or past ``kend`` masked."""
        toks = tok0 + tl.arange(0, BLOCK_K)
        ok = toks < kend
        tc = tl.minimum(toks, LQ - 1).to(tl.int64)
        if USE_DESC:
            k = k_desc.load([bh * LQ + tok0, 0])
            vt = vt_desc.load([bh * D, tok0])
        else:
            cols = tl.arange(0, D)
            k = tl.load(k_ptr + (bh.to(tl.int64) * LQ + tc)[:, None] * D + cols[None, :])
            vt = tl.load(vt_ptr + (bh.to(tl.int64) * D + cols)[:, None] * Lp + tc[None, :])
        ks = tl.load(ks_ptr + bh.to(tl.int64) * LQ + tc)
        if HAS_PAD:  # the padding is indexed by source token
            src = tl.minimum(_source_tokens(toks, tperm, txt_len, TP, T, HW, HAS_TEMPORAL), L - 1)
        else:
            src = toks
        keep = _keep(pad_base, src, ok, MASK, HAS_PAD)
        return _fp8_step(acc, m_i, l_i, q, qs, k, ks, vt, keep, MASK or HAS_PAD, FMAX, EXACT)

    @triton.jit
    def _fp8_list(acc, m_i, l_i, q, qs, k_desc, vt_desc, k_ptr, ks_ptr, vt_ptr, pad_base, bh, b, h, list_base,
                  n_list, txt_len, TP, LQ, Lp, L, tperm, T, HW, BLOCK_K: tl.constexpr, D: tl.constexpr,
                  MASK: tl.constexpr, HAS_PAD: tl.constexpr, HAS_TEMPORAL: tl.constexpr, USE_DESC: tl.constexpr,
                  FMAX: tl.constexpr, EXACT: tl.constexpr):
        for i in range(0, n_list):
            j = tl.load(list_base + i).to(tl.int32)
            acc, m_i, l_i = _fp8_tile(acc, m_i, l_i, q, qs, k_desc, vt_desc, k_ptr, ks_ptr, vt_ptr, pad_base, bh, b, h,
                                      TP + j * BLOCK_K, LQ, txt_len, TP, LQ, Lp, L, tperm, T, HW, BLOCK_K, D, MASK,
                                      HAS_PAD, HAS_TEMPORAL, USE_DESC, FMAX, EXACT)
        return acc, m_i, l_i

    @triton.jit
    def _fp8_attn_kernel(q_ptr, qs_ptr, k_ptr, ks_ptr, vt_ptr, vs_ptr, k_desc, vt_desc, o_ptr, lse_ptr, res_ptr,
                         blk_ptr, cnt_ptr, cblk_ptr, ccnt_ptr, pad_ptr, tmp_ptr, sob, soh, sol,
                         B, H, L, LQ, Lp, txt_len, TP, n_txt_blocks, NQB, NKB, MAXK, T, HW,
                         BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, D: tl.constexpr, MODE: tl.constexpr,
                         HAS_PAD: tl.constexpr, MASK_VID: tl.constexpr, STORE_LSE: tl.constexpr,
                         HAS_TEMPORAL: tl.constexpr, USE_DESC: tl.constexpr, I64: tl.constexpr, FMAX: tl.constexpr,
                         EXACT: tl.constexpr, WS: tl.constexpr = False):
        # Program order as in the BF16 kernel: text query blocks first, then video query blocks with the
        # query block fastest. MODE: 0 sparse, 1 dense, 3 refresh.
        pid = tl.program_id(0)
        is_txt, qb, bh, b, h = _program_block(pid, n_txt_blocks, H, B, NQB)
        is_vid = pid >= n_txt_blocks * H * B
        L_img = L - txt_len
        tperm = False  # this head's video tokens are frame-major in the quantized layout
        if HAS_TEMPORAL:
            tperm = tl.load(tmp_ptr + bh) != 0
        tflag = tperm & is_vid
        pad_base = pad_ptr + b.to(tl.int64) * L
        cols = tl.arange(0, D)
        if is_txt:
            r = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
            row_ok = r < txt_len
            rows = r  # rows of the output (source order)
        else:
            pos = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
            row_ok = pos < L_img
            r = TP + pos  # rows of the quantized layout
            rows = txt_len + _video_tokens(pos, tflag, T, HW, HAS_TEMPORAL)
        rq = tl.where(row_ok, r, 0).to(tl.int64)
        q = tl.load(q_ptr + (bh.to(tl.int64) * LQ + rq)[:, None] * D + cols[None, :], mask=row_ok[:, None], other=0.0)
        qs = tl.load(qs_ptr + bh.to(tl.int64) * LQ + rq, mask=row_ok, other=0.0)
        m_i = tl.full([BLOCK_Q], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_Q], tl.float32)
        acc = tl.zeros([BLOCK_Q, D], tl.float32)
        for key0 in range(0, txt_len, BLOCK_K):
            acc, m_i, l_i = _fp8_tile(acc, m_i, l_i, q, qs, k_desc, vt_desc, k_ptr, ks_ptr, vt_ptr, pad_base, bh, b, h,
                                      key0, txt_len, txt_len, TP, LQ, Lp, L, tperm, T, HW, BLOCK_K, D, True, HAS_PAD,
                                      HAS_TEMPORAL, USE_DESC, FMAX, EXACT)
        if MODE == 1:
            n_all = NKB
        else:
            n_all = tl.where(is_txt, NKB, 0)
        for j in tl.range(0, n_all, warp_specialize=WS):
            acc, m_i, l_i = _fp8_tile(acc, m_i, l_i, q, qs, k_desc, vt_desc, k_ptr, ks_ptr, vt_ptr, pad_base, bh, b, h,
                                      TP + j * BLOCK_K, LQ, txt_len, TP, LQ, Lp, L, tperm, T, HW, BLOCK_K, D,
                                      MASK_VID, HAS_PAD, HAS_TEMPORAL, USE_DESC, FMAX, EXACT)
        if MODE != 1:
            n_list = tl.load(cnt_ptr + bh * NQB + qb, mask=is_vid, other=0)
            acc, m_i, l_i = _fp8_list(acc, m_i, l_i, q, qs, k_desc, vt_desc, k_ptr, ks_ptr, vt_ptr, pad_base, bh, b, h,
                                      blk_ptr + (bh.to(tl.int64) * NQB + qb) * MAXK, n_list, txt_len, TP, LQ, Lp, L,
                                      tperm, T, HW, BLOCK_K, D, MASK_VID, HAS_PAD, HAS_TEMPORAL, USE_DESC, FMAX, EXACT)
        vs = tl.load(vs_ptr + bh * D + cols) / FMAX  # channel scale, and P's 448
        res_ptrs = res_ptr + (bh.to(tl.int64) * L_img + (rows - txt_len))[:, None] * D + cols[None, :]
        if MODE == 3:
            if is_vid:
                o_s = acc * vs[None, :] / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
                tl.store(res_ptrs, o_s, mask=row_ok[:, None])
            n_comp = tl.load(ccnt_ptr + bh * NQB + qb, mask=is_vid, other=0)
            acc, m_i, l_i = _fp8_list(acc, m_i, l_i, q, qs, k_desc, vt_desc, k_ptr, ks_ptr, vt_ptr, pad_base, bh, b, h,
                                      cblk_ptr + (bh.to(tl.int64) * NQB + qb) * NKB, n_comp, txt_len, TP, LQ, Lp, L,
                                      tperm, T, HW, BLOCK_K, D, MASK_VID, HAS_PAD, HAS_TEMPORAL, USE_DESC, FMAX, EXACT)
        has = l_i > 0.0
        out = acc * vs[None, :] / tl.where(has, l_i, 1.0)[:, None]
        if I64:
            o_rows = rows.to(tl.int64)
        else:
            o_rows = rows
        o_base = o_ptr + b.to(tl.int64) * sob + h.to(tl.int64) * soh
        tl.store(o_base + o_rows[:, None] * sol + cols[None, :], out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
        if MODE == 3:
            if is_vid:
                tl.debug_barrier()
                o_s = tl.load(res_ptrs, mask=row_ok[:, None], other=0.0)
                tl.store(res_ptrs, out - o_s, mask=row_ok[:, None])
        if STORE_LSE:
            lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
            tl.store(lse_ptr + bh.to(tl.int64) * L + rows, lse, mask=row_ok)


def quantize_qkv_fp8_triton(q, k, v, *, txt_len, sm_scale, temporal=None, grid=None) -> Fp8QKV:
    """Triton kernel, same contract as :func:`quantize_qkv_fp8_reference`."""
    b, h, seq, d = q.shape
    tp = text_pad(txt_len)
    lq = tp + seq - txt_len
    lp = -(-lq // _VT_ALIGN) * _VT_ALIGN
    dev = q.device
    vamax = v.abs().amax(2).float().clamp_min(AMAX_FLOOR)
    q8 = torch.empty(b, h, lq, d, dtype=torch.int8, device=dev)
    km = key_mean(k)
    k8 = torch.empty_like(q8)
    vt = torch.empty(b, h, d, lp, dtype=torch.float8_e4m3fn, device=dev)
    if lp > lq:
        vt[..., lq:].zero_()
    qs = torch.empty(b, h, lq, dtype=torch.float32, device=dev)
    ks = torch.empty_like(qs)
    has_t = temporal is not None
    t_frames, hw = (grid[0], grid[1] * grid[2]) if has_t else (1, 1)
    bt = 32 if interpreting() else 64
    _fp8_quant_kernel[(b * h, triton.cdiv(lq, bt))](
        q, k, v, temporal.contiguous().view(torch.uint8) if has_t else qs, _v_inverse(vamax), km, q8, qs, k8, ks, vt,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], h, lq, lp, txt_len, tp, t_frames, hw, sm_scale * LOG2E,
        BT=bt, D=d, HAS_TEMPORAL=has_t, FMAX=FP8_MAX, FLOOR=AMAX_FLOOR, RINT=RINT_MAGIC, EXACT=interpreting(),
        num_warps=4)
    return Fp8QKV(q8, qs, k8, ks, vt, (vamax / FP8_MAX).contiguous(), km)


def _fp8_descriptors(x8: Fp8QKV, block_k: int):
    from triton.tools.tensor_descriptor import TensorDescriptor

    b, h, lq, d = x8.k.shape
    kd = TensorDescriptor(x8.k, [b * h * lq, d], [d, 1], [block_k, d])
    vd = TensorDescriptor(x8.vt, [b * h * d, lq], [x8.vt.shape[-1], 1], [d, block_k])
    return kd, vd


def block_sparse_attention_fp8_triton(q, k, v, kv_blocks, kv_counts, *, txt_len, key_padding=None, sm_scale=None,
                                      mode="sparse", block_q=128, block_k=64, return_lse=False, check_lists=True,
                                      temporal=None, grid=None, config=None):
    """Triton kernel, same contract as :func:`block_sparse_attention_fp8_reference`; ``config`` overrides
    the launch parameters (num_warps, num_stages, use_desc)."""
    _check_fp8(mode, q)
    nqb, nkb = _check(q, k, v, kv_blocks, kv_counts, txt_len, key_padding, mode, block_q, block_k, check_lists,
                      temporal, grid)
    bsz, heads, seq, d = q.shape
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    has_t = temporal is not None and mode != "dense"
    out = _token_major(bsz, heads, seq, d, q)
    lse = torch.empty(bsz, heads, seq, dtype=torch.float32, device=q.device) if return_lse else None
    res = torch.empty(bsz, heads, seq - txt_len, d, dtype=torch.float32, device=q.device) if mode == "refresh" else None
    if out.numel():
        x8 = quantize_qkv_fp8_triton(q, k, v, txt_len=txt_len, sm_scale=scale, temporal=temporal if has_t else None,
                                     grid=grid)
        dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
        blocks = counts = None
        comp = (dummy, dummy)
        maxk = 0
        if mode != "dense":
            blocks, counts, maxk = kv_blocks.contiguous(), kv_counts.contiguous(), kv_blocks.shape[3]
        if mode == "refresh":
            comp = complement_lists(kv_blocks, kv_counts, nkb)
        cfg = dict(default_config())
        cfg.update(config or {})
        use_desc = cfg.pop("use_desc", None)
        if use_desc is None:
            use_desc = _desc_default(q) or interpreting()
        if "ws" in cfg:  # automatic warp specialization of the key loop (an experiment of the sweep)
            cfg["WS"] = cfg.pop("ws")
        descs = _fp8_descriptors(x8, block_k) if use_desc else (x8.k, x8.vt)
        n_txt = _num_blocks(txt_len, block_q)
        pad = key_padding.contiguous().view(torch.uint8) if key_padding is not None else q
        t_frames, hw = (grid[0], grid[1] * grid[2]) if has_t else (1, 1)
        _fp8_attn_kernel[((n_txt + nqb) * heads * bsz,)](
            x8.q, x8.q_scale, x8.k, x8.k_scale, x8.vt, x8.v_scale, *descs, out, lse if lse is not None else out,
            res if res is not None else out, blocks if blocks is not None else dummy,
            counts if counts is not None else dummy, *comp, pad,
            temporal.contiguous().view(torch.uint8) if has_t else dummy, *out.stride()[:3],
            bsz, heads, seq, x8.k.shape[2], x8.vt.shape[-1], txt_len, text_pad(txt_len), n_txt, nqb, nkb, maxk,
            t_frames, hw,
            BLOCK_Q=block_q, BLOCK_K=block_k, D=d, MODE=_MODE_ID[mode], HAS_PAD=key_padding is not None,
            MASK_VID=(seq - txt_len) % block_k != 0, STORE_LSE=lse is not None, HAS_TEMPORAL=has_t,
            USE_DESC=bool(use_desc), I64=seq * out.stride(2) >= 2 ** 31, FMAX=FP8_MAX, EXACT=interpreting(), **cfg)
        if lse is not None:
            lse += lse_shift(q, x8.k_mean, scale)
    if mode == "refresh":
        return (out, res, lse) if return_lse else (out, res)
    return (out, lse) if return_lse else out
