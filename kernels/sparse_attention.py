"""Block-sparse flash-attention forward for HunyuanVideo's joint (text + video) attention.

``out = block_sparse_attention(q, k, v, kv_blocks, kv_counts, txt_len=T)`` with q, k, v [B, H, L, 128],
the T text tokens first, then the video tokens. Video queries are cut into blocks of ``block_q`` video
tokens and video keys into blocks of ``block_k``; ``kv_blocks[b, h, i, :kv_counts[b, h, i]]`` lists the
video key blocks that video query block i of (b, h) attends to. Text rows and text columns are always
computed (SVG keeps them dense: few tokens, much attention mass).

Three modes share one kernel:
- ``sparse``: text keys plus the listed video key blocks (text queries: all keys);
- ``dense``: every key block (the lists are ignored), so that a dense step costs what cuDNN does and
  needs no other backend;
- ``complement``: for video queries exactly the video key blocks NOT listed, no text keys; text queries
  nothing. A sparse pass and a complement pass partition every row's keys, so merging their outputs by
  their log-sum-exp (:func:`merge_attention`) is dense attention: a SSAR refresh step then costs one
  dense pass instead of dense plus sparse, and yields the residual ``w_c * (O_c - O_s)`` exactly.

A row whose keys are all masked (padding, or a text row in complement mode) outputs 0 with
lse = -inf, so that merging treats it as empty. lse is natural-log, float32.
"""

from __future__ import annotations

import math

import torch

from ._triton import HAS_TRITON, interpreting, tl, triton

HEAD_DIM = 128
MODES = ("sparse", "dense", "complement")
_MODE_ID = {m: i for i, m in enumerate(MODES)}
LOG2E = 1.4426950408889634
_REF_ROW_CHUNK = 512  # query rows per step of the reference: bounds its [rows, L] float32 scores


def _num_blocks(n: int, block: int) -> int:
    return -(-n // block)


def _check(q, k, v, kv_blocks, kv_counts, txt_len, key_padding, mode, block_q, block_k,
           check_lists=True) -> tuple[int, int]:
    """Rejects bad input with a message naming the problem; returns (NQB, NKB). Costs one host sync
    (list ranges and duplicates), because a bad index would read out of bounds on the GPU and a
    duplicate would silently count a block twice."""
    name = "block_sparse_attention"
    if mode not in MODES:
        raise ValueError(f"{name}: mode={mode!r} must be one of {MODES}")
    for t, n in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: {n} must be a [B, H, L, D] tensor, got {getattr(t, 'shape', type(t))}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"{name}: q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{name}: q must be float16 or bfloat16, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{name}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{name}: q, k, v are on different devices")
    b, h, seq, d = q.shape
    if d != HEAD_DIM:
        raise ValueError(f"{name}: head dim {d} is not supported (HunyuanVideo's is {HEAD_DIM})")
    if isinstance(txt_len, bool) or not isinstance(txt_len, int) or not 0 <= txt_len <= seq:
        raise ValueError(f"{name}: txt_len={txt_len!r} must be an int in [0, L={seq}]")
    for bs, n in ((block_q, "block_q"), (block_k, "block_k")):
        if not isinstance(bs, int) or bs < 16 or bs & (bs - 1):
            raise ValueError(f"{name}: {n}={bs!r} must be a power of two >= 16")
    nqb, nkb = _num_blocks(seq - txt_len, block_q), _num_blocks(seq - txt_len, block_k)
    if key_padding is not None:
        if key_padding.dtype != torch.bool or tuple(key_padding.shape) != (b, seq):
            raise ValueError(f"{name}: key_padding must be bool [B, L] = [{b}, {seq}], "
                             f"got {key_padding.dtype} {tuple(key_padding.shape)}")
        if key_padding.device != q.device:
            raise ValueError(f"{name}: key_padding is on {key_padding.device}, q on {q.device}")
    if mode == "dense":
        return nqb, nkb
    if not isinstance(kv_blocks, torch.Tensor) or kv_blocks.dtype != torch.int32 or kv_blocks.dim() != 4 \
            or tuple(kv_blocks.shape[:3]) != (b, h, nqb):
        raise ValueError(f"{name}: kv_blocks must be int32 [B, H, NQB, MAXK] with NQB = ceil(L_img / block_q) "
                         f"= {nqb}, got {getattr(kv_blocks, 'dtype', None)} {tuple(getattr(kv_blocks, 'shape', ()))}")
    if not isinstance(kv_counts, torch.Tensor) or kv_counts.dtype != torch.int32 \
            or tuple(kv_counts.shape) != (b, h, nqb):
        raise ValueError(f"{name}: kv_counts must be int32 [B, H, NQB] = [{b}, {h}, {nqb}], "
                         f"got {getattr(kv_counts, 'dtype', None)} {tuple(getattr(kv_counts, 'shape', ()))}")
    if kv_blocks.device != q.device or kv_counts.device != q.device:
        raise ValueError(f"{name}: kv_blocks and kv_counts must be on {q.device}")
    maxk = kv_blocks.shape[3]
    if not check_lists:  # lists made by quantsparse.masks: valid by construction, and the check costs a sync
        return nqb, nkb
    if kv_blocks.numel() == 0:
        if kv_counts.numel() and int(kv_counts.abs().max()) != 0:
            raise ValueError(f"{name}: kv_counts must be 0 when kv_blocks has no entries")
        return nqb, nkb
    valid = torch.arange(maxk, device=q.device) < kv_counts[..., None]
    # Invalid entries sort last (sentinel nkb); a repeated valid index then sits next to its twin.
    ids = torch.where(valid, kv_blocks, nkb).sort(dim=-1).values
    bad = torch.stack([
        ((kv_counts < 0) | (kv_counts > maxk)).any(),
        (valid & ((kv_blocks < 0) | (kv_blocks >= nkb))).any(),
        ((ids[..., 1:] == ids[..., :-1]) & (ids[..., 1:] < nkb)).any(),
    ]).tolist()
    if bad[0]:
        raise ValueError(f"{name}: kv_counts must lie in [0, MAXK={maxk}]")
    if bad[1]:
        raise ValueError(f"{name}: kv_blocks has a listed video key block outside [0, NKB={nkb})")
    if bad[2]:
        raise ValueError(f"{name}: kv_blocks lists a video key block twice for one query block")
    return nqb, nkb


def block_mask(kv_blocks: torch.Tensor, kv_counts: torch.Tensor, nkb: int) -> torch.Tensor:
    """[..., NKB] bool from [..., MAXK] lists: True where the video key block is listed."""
    maxk = kv_blocks.shape[-1]
    valid = torch.arange(maxk, device=kv_blocks.device) < kv_counts[..., None]
    idx = torch.where(valid, kv_blocks, nkb).long()  # invalid entries land in a spare column
    out = torch.zeros(*kv_blocks.shape[:-1], nkb + 1, dtype=torch.bool, device=kv_blocks.device)
    return out.scatter_(-1, idx, True)[..., :nkb]


def row_mask(rows: torch.Tensor, seq: int, txt_len: int, blocks: torch.Tensor | None, mode: str,
              block_q: int, block_k: int, key_padding) -> torch.Tensor:
    """The [B, H, len(rows), L] bool mask of the query rows ``rows`` (True = computed): the reference's
    definition of the modes, reused by the benchmark to check a subset of rows at full size."""
    dev = rows.device
    cols = torch.arange(seq, device=dev)
    is_txt_row, is_txt_col = rows < txt_len, cols < txt_len
    if mode == "dense":
        m = torch.ones(1, 1, len(rows), seq, dtype=torch.bool, device=dev)
    else:
        qb = ((rows - txt_len).clamp_min(0) // block_q)
        kb = ((cols - txt_len).clamp_min(0) // block_k)
        vid = blocks[:, :, qb][:, :, :, kb]  # [B, H, rows, L]
        if mode == "sparse":
            m = vid | is_txt_col | is_txt_row[:, None]
        else:
            m = ~vid & ~is_txt_col & ~is_txt_row[:, None]
    if key_padding is not None:
        m = m & key_padding[:, None, None, :]
    return m


def block_sparse_attention_reference(q, k, v, kv_blocks, kv_counts, *, txt_len, key_padding=None, sm_scale=None,
                                     mode="sparse", block_q=128, block_k=64, return_lse=False, check_lists=True):
    """Eager reference: the boolean mask built from the lists, float32 softmax attention, in chunks of
    query rows so that it also checks GPU-sized inputs (a few thousand tokens)."""
    nqb, nkb = _check(q, k, v, kv_blocks, kv_counts, txt_len, key_padding, mode, block_q, block_k, check_lists)
    bsz, heads, seq, d = q.shape
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    blocks = None if mode == "dense" else block_mask(kv_blocks, kv_counts, nkb)
    pad = key_padding if key_padding is not None else (
        None if blocks is not None else torch.ones(bsz, seq, dtype=torch.bool, device=q.device))
    out = torch.empty(bsz, heads, seq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(bsz, heads, seq, dtype=torch.float32, device=q.device)
    kf, vf = k.float(), v.float()
    for r0 in range(0, seq, _REF_ROW_CHUNK):
        rows = torch.arange(r0, min(seq, r0 + _REF_ROW_CHUNK), device=q.device)
        m = row_mask(rows, seq, txt_len, blocks, mode, block_q, block_k, pad)
        s = (q[:, :, rows].float() @ kf.transpose(-1, -2)) * scale
        s = s.masked_fill(~m, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - row_lse.clamp_min(torch.finfo(torch.float32).min)[..., None])  # empty rows: all 0
        out[:, :, rows] = (p @ vf).to(q.dtype)
        lse[:, :, rows] = row_lse
    return (out, lse) if return_lse else out


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """Attention over the union of two disjoint key sets from each set's (output, lse): the outputs
    weighted by exp(lse_x - lse). An empty side (lse = -inf) weighs 0; both empty gives 0 and -inf.
    Returns (out in out_a's dtype, lse float32)."""
    lse = torch.logaddexp(lse_a.float(), lse_b.float())
    wa, wb = complement_weight(lse_a, lse), complement_weight(lse_b, lse)
    out = wa[..., None] * out_a.float() + wb[..., None] * out_b.float()
    return out.to(out_a.dtype), lse


def complement_weight(lse_part: torch.Tensor, lse_total: torch.Tensor) -> torch.Tensor:
    """exp(lse_part - lse_total), the share of a row's softmax mass in one part of its keys (float32),
    0 where the part is empty. For SSAR: dense - sparse = w_c * (O_c - O_s) with w_c the complement's."""
    lp, lt = lse_part.float(), lse_total.float()
    return torch.where(torch.isneginf(lp), torch.zeros_like(lp), torch.exp(lp - lt))


def dense_and_residual(out_s, lse_s, out_c, lse_c):
    """(dense output, dense - sparse residual float32) from a sparse and a complement pass; the residual
    is taken as w_c * (O_c - O_s) in float32, not as a difference of two rounded outputs."""
    out_d, lse_d = merge_attention(out_s, lse_s, out_c, lse_c)
    w_c = complement_weight(lse_c, lse_d)
    return out_d, w_c[..., None] * (out_c.float() - out_s.float())


if HAS_TRITON:

    @triton.jit
    def _attend(acc, m_i, l_i, q, k_base, v_base, pad_base, key0, key_end, stride_kl, stride_vl, qk_scale,
                BLOCK_K: tl.constexpr, D: tl.constexpr, MASK: tl.constexpr, HAS_PAD: tl.constexpr):
        """One online-softmax step over keys key0 .. key0 + BLOCK_K (those >= key_end masked when MASK),
        scores in the log2 domain (log2(e) folded into qk_scale)."""
        keys = key0 + tl.arange(0, BLOCK_K)
        cols = tl.arange(0, D)
        if MASK:
            kmask = keys < key_end
            k = tl.load(k_base + keys[:, None] * stride_kl + cols[None, :], mask=kmask[:, None], other=0.0)
            v = tl.load(v_base + keys[:, None] * stride_vl + cols[None, :], mask=kmask[:, None], other=0.0)
        else:
            k = tl.load(k_base + keys[:, None] * stride_kl + cols[None, :])
            v = tl.load(v_base + keys[:, None] * stride_vl + cols[None, :])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if HAS_PAD:
            ok = tl.load(pad_base + keys, mask=keys < key_end, other=0) != 0
            if MASK:
                ok = ok & kmask
            s = tl.where(ok[None, :], s, float("-inf"))
        elif MASK:
            s = tl.where(kmask[None, :], s, float("-inf"))
        # m_i starts at a finite floor, so a block whose scores are all -inf gives p = 0, alpha = 1.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, m_new, l_i

    @triton.jit
    def _sparse_attn_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, blk_ptr, cnt_ptr, pad_ptr,
                            sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
                            B, H, L, txt_len, n_txt_blocks, NQB, NKB, MAXK, qk_scale,
                            BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, D: tl.constexpr,
                            MODE: tl.constexpr, HAS_PAD: tl.constexpr, MASK_VID: tl.constexpr,
                            STORE_LSE: tl.constexpr):
        # Programs 0 .. B*H*n_txt_blocks - 1 are text query blocks (dense over all keys, the longest
        # programs, started first); then the video query blocks, query block fastest, so that the
        # programs of one head run together and share its K/V in L2. MODE: 0 sparse, 1 dense,
        # 2 complement (the launcher passes the complement lists; no text keys, text rows empty).
        pid = tl.program_id(0)
        n_txt_prog = n_txt_blocks * H * B
        is_txt = pid < n_txt_prog
        if is_txt:
            qb = pid % n_txt_blocks
            bh = pid // n_txt_blocks
            row0 = qb * BLOCK_Q
            row_end = txt_len
        else:
            qb = (pid - n_txt_prog) % NQB
            bh = (pid - n_txt_prog) // NQB
            row0 = txt_len + qb * BLOCK_Q
            row_end = L
        b = bh // H
        h = bh % H
        q_base = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        k_base = k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh
        v_base = v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh
        pad_base = pad_ptr + b.to(tl.int64) * L
        rows = row0 + tl.arange(0, BLOCK_Q)
        cols = tl.arange(0, D)
        row_ok = rows < row_end
        q = tl.load(q_base + rows[:, None] * sql + cols[None, :], mask=row_ok[:, None], other=0.0)
        m_i = tl.full([BLOCK_Q], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_Q], tl.float32)
        acc = tl.zeros([BLOCK_Q, D], tl.float32)
        if MODE != 2:
            for key0 in range(0, txt_len, BLOCK_K):
                acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, pad_base, key0, txt_len, skl, svl,
                                        qk_scale, BLOCK_K, D, True, HAS_PAD)
        # Two loops, each empty for the other kind of program, so neither has a branch inside: every
        # key block for text rows (and in dense mode), the listed blocks for video rows otherwise.
        if MODE == 1:
            n_all = NKB
        elif MODE == 2:
            n_all = 0
        else:
            n_all = tl.where(is_txt, NKB, 0)
        for j in range(0, n_all):
            acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, pad_base, txt_len + j * BLOCK_K, L, skl, svl,
                                    qk_scale, BLOCK_K, D, MASK_VID, HAS_PAD)
        if MODE != 1:
            list_base = blk_ptr + (bh.to(tl.int64) * NQB + qb) * MAXK
            n_list = tl.load(cnt_ptr + bh * NQB + qb, mask=pid >= n_txt_prog, other=0)
            for i in range(0, n_list):
                j = tl.load(list_base + i).to(tl.int32)
                acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, pad_base, txt_len + j * BLOCK_K, L,
                                        skl, svl, qk_scale, BLOCK_K, D, MASK_VID, HAS_PAD)
        has = l_i > 0.0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        o_base = o_ptr + b.to(tl.int64) * sob + h.to(tl.int64) * soh
        tl.store(o_base + rows[:, None] * sol + cols[None, :], out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
        if STORE_LSE:
            lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))  # ln 2: natural log
            tl.store(lse_ptr + bh.to(tl.int64) * L + rows, lse, mask=row_ok)


def complement_lists(kv_blocks: torch.Tensor, kv_counts: torch.Tensor, nkb: int, rows_per_chunk: int = 0):
    """(blocks, counts) listing, per query block, the video key blocks NOT in the given lists, in
    ascending order: int16 [B, H, NQB, NKB] when NKB fits (half the memory; 165 MB at 118,800 tokens
    and B = 2), counts int32. Built in chunks of query blocks so the int64 sort indices stay small."""
    lead = kv_blocks.shape[:3]
    rows = math.prod(lead)
    dtype = torch.int16 if nkb < 2 ** 15 else torch.int32
    out = torch.empty(rows, nkb, dtype=dtype, device=kv_blocks.device)
    blk, cnt = kv_blocks.reshape(rows, -1), kv_counts.reshape(rows)
    step = rows_per_chunk or max(1, (1 << 22) // max(1, nkb))
    for r0 in range(0, rows, step):
        kept = block_mask(blk[r0:r0 + step], cnt[r0:r0 + step], nkb)
        # A stable sort of the kept flags puts the unkept block indices first, in ascending order.
        out[r0:r0 + step] = torch.sort(kept.to(torch.uint8), dim=-1, stable=True).indices.to(dtype)
    return out.reshape(*lead, nkb), (nkb - kv_counts).to(torch.int32)


def default_config(interp: bool | None = None) -> dict:
    """Launch parameters: 128x64 tiles, 8 warps (the issue's H100 measurement); small under the interpreter."""
    if interp if interp is not None else interpreting():
        return dict(num_warps=4, num_stages=1)
    return dict(num_warps=8, num_stages=3)


def _launch(q, k, v, out, lse, blocks, counts, maxk, txt_len, key_padding, sm_scale, mode, block_q, block_k,
            nqb, nkb, config) -> None:
    """Runs the kernel into the given out / lse buffers (tests poison them to see every element written)."""
    bsz, heads, seq, d = q.shape
    n_txt = _num_blocks(txt_len, block_q)
    grid = ((n_txt + nqb) * heads * bsz,)
    cfg = dict(default_config())
    cfg.update(config or {})
    pad = key_padding.contiguous().view(torch.uint8) if key_padding is not None else q
    dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
    _sparse_attn_kernel[grid](
        q, k, v, out, lse if lse is not None else out,
        blocks if blocks is not None else dummy, counts if counts is not None else dummy, pad,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        bsz, heads, seq, txt_len, n_txt, nqb, nkb, maxk, sm_scale * LOG2E,
        BLOCK_Q=block_q, BLOCK_K=block_k, D=d, MODE=_MODE_ID[mode], HAS_PAD=key_padding is not None,
        MASK_VID=key_padding is not None or (seq - txt_len) % block_k != 0, STORE_LSE=lse is not None, **cfg)


def block_sparse_attention_triton(q, k, v, kv_blocks, kv_counts, *, txt_len, key_padding=None, sm_scale=None,
                                  mode="sparse", block_q=128, block_k=64, return_lse=False, check_lists=True,
                                  config=None):
    """Triton kernel, same contract as :func:`block_sparse_attention_reference`; ``config`` overrides
    the launch parameters (num_warps, num_stages) for sweeps."""
    nqb, nkb = _check(q, k, v, kv_blocks, kv_counts, txt_len, key_padding, mode, block_q, block_k, check_lists)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    bsz, heads, seq, d = q.shape
    out = torch.empty(bsz, heads, seq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(bsz, heads, seq, dtype=torch.float32, device=q.device) if return_lse else None
    blocks = counts = None
    maxk = 0
    if mode == "sparse":
        blocks, counts, maxk = kv_blocks.contiguous(), kv_counts.contiguous(), kv_blocks.shape[3]
    elif mode == "complement":
        blocks, counts = complement_lists(kv_blocks, kv_counts, nkb)
        maxk = nkb
    if out.numel():
        _launch(q, k, v, out, lse, blocks, counts, maxk, txt_len, key_padding,
                sm_scale if sm_scale is not None else 1.0 / math.sqrt(d), mode, block_q, block_k, nqb, nkb, config)
    return (out, lse) if return_lse else out
