"""Block-sparse flash-attention forward for HunyuanVideo's joint (text + video) attention.

``out = block_sparse_attention(q, k, v, kv_blocks, kv_counts, txt_len=T)`` with q, k, v [B, H, L, 128],
the T text tokens first, then the video tokens. Video queries are cut into blocks of ``block_q`` video
tokens and video keys into blocks of ``block_k``; ``kv_blocks[b, h, i, :kv_counts[b, h, i]]`` lists the
video key blocks that video query block i of (b, h) attends to. Text rows and text columns are always
computed (SVG keeps them dense: few tokens, much attention mass).

Four modes share one kernel:
- ``sparse``: text keys plus the listed video key blocks (text queries: all keys);
- ``dense``: every key block (the lists are ignored), so that a dense step costs what cuDNN does and
  needs no other backend;
- ``complement``: for video queries exactly the video key blocks NOT listed, no text keys; text queries
  nothing. A sparse pass and a complement pass partition every row's keys, so merging their outputs by
  their log-sum-exp (:func:`merge_attention`) is dense attention: a SSAR refresh step then costs one
  dense pass instead of dense plus sparse, and yields the residual ``w_c * (O_c - O_s)`` exactly;
- ``refresh``: the SSAR refresh step in one launch: each video query block runs its listed blocks,
  keeps that sparse output, then continues the same online softmax over the complement (the
  unlisted blocks) to the dense output. Returns the dense output and the float32
  residual ``dense - sparse`` of the video rows: one dense pass, no merge.

``temporal`` (bool ``[B, H]``) with ``grid = (T, H, W)``: those heads' lists refer to the frame-major
layout of SparseVideoGen's temporal heads (one spatial position across all frames, then the next);
the kernel reads q, k, v and writes the outputs through that permutation's index arithmetic, so
nothing is gathered or copied and every output is in (t, h, w) order.

A row whose keys are all masked (padding, or a text row in complement mode) outputs 0 with
lse = -inf, so that merging treats it as empty. lse is natural-log, float32.
"""

from __future__ import annotations

import math

import torch

from ._triton import HAS_TRITON, interpreting, tl, triton

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older Triton, or none
    TensorDescriptor = None

HEAD_DIM = 128  # the one head size the kernel takes (every supported family's)
MODES = ("sparse", "dense", "complement", "refresh")
_MODE_ID = {m: i for i, m in enumerate(MODES)}
LOG2E = 1.4426950408889634
_REF_ROW_CHUNK = 512  # query rows per step of the reference: bounds its [rows, L] float32 scores


def _num_blocks(n: int, block: int) -> int:
    return -(-n // block)


def _check(q, k, v, kv_blocks, kv_counts, txt_len, key_padding, mode, block_q, block_k,
           check_lists=True, temporal=None, grid=None) -> tuple[int, int]:
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
        raise ValueError(f"{name}: head dim {d} is not supported (the kernel takes {HEAD_DIM})")
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
    if temporal is not None:
        if not isinstance(temporal, torch.Tensor) or temporal.dtype != torch.bool or tuple(temporal.shape) != (b, h):
            raise ValueError(f"{name}: temporal must be bool [B, H] = [{b}, {h}], "
                             f"got {getattr(temporal, 'dtype', type(temporal))} {tuple(getattr(temporal, 'shape', ()))}")
        if temporal.device != q.device:
            raise ValueError(f"{name}: temporal is on {temporal.device}, q on {q.device}")
        if grid is None or len(grid) != 3 or math.prod(grid) != seq - txt_len:
            raise ValueError(f"{name}: temporal heads need the latent grid (T, H, W) of the {seq - txt_len} video "
                             f"tokens, got grid={grid!r}")
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
    if key_padding is not None:  # [B, L], or [B, H, L] (the reference's temporal heads)
        m = m & (key_padding[:, None, None, :] if key_padding.dim() == 2 else key_padding[:, :, None, :])
    return m


def temporal_order(grid, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, inverse) of the video tokens for temporal heads: ``permuted = x[perm]``, ``x = permuted[inverse]``;
    permuted position s * T + t holds token t * HW + s (what the kernel computes by index arithmetic)."""
    t, hh, ww = grid
    idx = torch.arange(t * hh * ww, device=device)
    return idx.view(t, hh * ww).t().reshape(-1), idx.view(hh * ww, t).t().reshape(-1)


def _permute_heads(x: torch.Tensor, temporal: torch.Tensor, order: torch.Tensor, txt_len: int) -> torch.Tensor:
    """Video rows (dim 2 from ``txt_len``) of the temporal heads reordered by ``order``; others untouched."""
    out = x.clone()
    bi, hi = temporal.nonzero(as_tuple=True)
    if bi.numel():
        out[bi, hi, txt_len:] = x[bi, hi][:, txt_len + order]
    return out


def _attention_fp32(q, k, v, blocks, txt_len, pad, mode, scale, block_q, block_k):
    """float32 (out, lse) of one mode from the boolean block mask, in chunks of query rows."""
    bsz, heads, seq, d = q.shape
    out = torch.empty(bsz, heads, seq, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(bsz, heads, seq, dtype=torch.float32, device=q.device)
    kf, vf = k.float(), v.float()
    for r0 in range(0, seq, _REF_ROW_CHUNK):
        rows = torch.arange(r0, min(seq, r0 + _REF_ROW_CHUNK), device=q.device)
        m = row_mask(rows, seq, txt_len, blocks, mode, block_q, block_k, pad)
        s = (q[:, :, rows].float() @ kf.transpose(-1, -2)) * scale
        s = s.masked_fill(~m, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - row_lse.clamp_min(torch.finfo(torch.float32).min)[..., None])  # empty rows: all 0
        out[:, :, rows] = p @ vf
        lse[:, :, rows] = row_lse
    return out, lse


def block_sparse_attention_reference(q, k, v, kv_blocks, kv_counts, *, txt_len, key_padding=None, sm_scale=None,
                                     mode="sparse", block_q=128, block_k=64, return_lse=False, check_lists=True,
                                     temporal=None, grid=None):
    """Eager reference: the boolean mask built from the lists, float32 softmax attention, in chunks of
    query rows so that it also checks GPU-sized inputs (a few thousand tokens). Temporal heads are
    permuted into their layout and back (the kernel does it by index arithmetic instead)."""
    nqb, nkb = _check(q, k, v, kv_blocks, kv_counts, txt_len, key_padding, mode, block_q, block_k, check_lists,
                      temporal, grid)
    d = q.shape[-1]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    permuted = temporal is not None and mode != "dense" and bool(temporal.any())
    if permuted:
        perm, inverse = temporal_order(grid, q.device)
        q, k, v = (_permute_heads(x, temporal, perm, txt_len) for x in (q, k, v))
        if key_padding is not None:  # per batch; the temporal heads read it in their own layout
            key_padding = _permute_heads(key_padding[:, None, :, None].expand(-1, q.shape[1], -1, 1), temporal,
                                         perm, txt_len)[..., 0]
    blocks = None if mode == "dense" else block_mask(kv_blocks, kv_counts, nkb)
    pad = key_padding if key_padding is not None else (
        None if blocks is not None else torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device))
    pad_all = pad if pad is not None else torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)

    def back(x):
        return _permute_heads(x, temporal, inverse, txt_len) if permuted else x

    if mode == "refresh":
        o_s, _ = _attention_fp32(q, k, v, blocks, txt_len, pad, "sparse", scale, block_q, block_k)
        o_d, lse = _attention_fp32(q, k, v, None, txt_len, pad_all, "dense", scale, block_q, block_k)
        out, res = back(o_d).to(q.dtype), back(o_d - o_s)[:, :, txt_len:].contiguous()
        lse = back(lse[..., None])[..., 0]
        return (out, res, lse) if return_lse else (out, res)
    out, lse = _attention_fp32(q, k, v, blocks, txt_len, pad_all if mode == "dense" else pad, mode, scale, block_q,
                               block_k)
    out, lse = back(out).to(q.dtype), back(lse[..., None])[..., 0]
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
    def _video_tokens(pos, tflag, T, HW, HAS_TEMPORAL: tl.constexpr):
        """Row of video position ``pos`` of the kernel's layout: itself, or for a temporal head the token
        at permuted position pos = s * T + t, i.e. t * HW + s."""
        if HAS_TEMPORAL:
            return tl.where(tflag, (pos % T) * HW + pos // T, pos)
        else:
            return pos

    @triton.jit
    def _program_block(pid, n_txt_blocks, H, B, NQB):
        """(is text program, query block, batch * H + head, batch, head) of program ``pid``: the text query
        blocks first (dense over all keys, the longest programs), then the video query blocks with the
        query block fastest, so that the programs of one head run together and share its K/V in L2."""
        n_txt_prog = n_txt_blocks * H * B
        is_txt = pid < n_txt_prog
        if is_txt:
            qb = pid % n_txt_blocks
            bh = pid // n_txt_blocks
        else:
            qb = (pid - n_txt_prog) % NQB
            bh = (pid - n_txt_prog) // NQB
        return is_txt, qb, bh, bh // H, bh % H

    @triton.jit
    def _softmax_step(acc, m_i, l_i, q, k, v, keep, qk_scale, MASK: tl.constexpr):
        """One online-softmax step over a [BLOCK_K, D] tile of keys and values; ``keep`` (when MASK)
        masks keys out; scores in the log2 domain (log2(e) in qk_scale)."""
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if MASK:
            s = tl.where(keep[None, :], s, float("-inf"))
        # m_i starts at a finite floor, so a block whose scores are all -inf gives p = 0, alpha = 1.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, m_new, l_i

    @triton.jit
    def _keep(pad_base, toks, ok, MASK: tl.constexpr, HAS_PAD: tl.constexpr):
        if HAS_PAD:
            keep = tl.load(pad_base + toks) != 0
            if MASK:
                keep = keep & ok
        else:
            keep = ok
        return keep

    @triton.jit
    def _attend(acc, m_i, l_i, q, k_base, v_base, pad_base, toks, ok, stride_kl, stride_vl, qk_scale,
                D: tl.constexpr, MASK: tl.constexpr, HAS_PAD: tl.constexpr, I64: tl.constexpr):
        """Keys at rows ``toks`` (always in bounds: loads are unmasked), those with ``ok`` False masked
        out when MASK."""
        cols = tl.arange(0, D)
        # I64: ComfyUI's single blocks hand q, k, v as views of the fused linear1 output (row stride
        # 21,504), and 118,800 tokens x 21,504 overflows int32 (int64 everywhere costs 3-6% on the H100).
        if I64:
            rows = toks.to(tl.int64)
        else:
            rows = toks
        k = tl.load(k_base + rows[:, None] * stride_kl + cols[None, :])
        v = tl.load(v_base + rows[:, None] * stride_vl + cols[None, :])
        keep = _keep(pad_base, toks, ok, MASK, HAS_PAD)
        return _softmax_step(acc, m_i, l_i, q, k, v, keep, qk_scale, MASK or HAS_PAD)

    @triton.jit
    def _attend_video_desc(acc, m_i, l_i, q, k_desc, v_desc, pad_base, b, h, j, txt_len, L_img, qk_scale,
                           BLOCK_K: tl.constexpr, D: tl.constexpr, MASK: tl.constexpr, HAS_PAD: tl.constexpr):
        """Video key block ``j`` in (t, h, w) order through TMA descriptors (Hopper): contiguous tokens
        of one head, loaded asynchronously; rows past the sequence come back as zeros and are masked."""
        tok0 = txt_len + j * BLOCK_K
        k = k_desc.load([b, h, tok0, 0]).reshape(BLOCK_K, D)
        v = v_desc.load([b, h, tok0, 0]).reshape(BLOCK_K, D)
        pos = j * BLOCK_K + tl.arange(0, BLOCK_K)
        ok = pos < L_img
        keep = _keep(pad_base, txt_len + tl.minimum(pos, L_img - 1), ok, MASK, HAS_PAD)
        return _softmax_step(acc, m_i, l_i, q, k, v, keep, qk_scale, MASK or HAS_PAD)

    @triton.jit
    def _attend_video(acc, m_i, l_i, q, k_base, v_base, pad_base, j, txt_len, L_img, tflag, T, HW, stride_kl,
                      stride_vl, qk_scale, BLOCK_K: tl.constexpr, D: tl.constexpr, MASK: tl.constexpr,
                      HAS_PAD: tl.constexpr, HAS_TEMPORAL: tl.constexpr, I64: tl.constexpr):
        """Video key block ``j`` of the kernel's layout; the ragged last block is clamped and masked."""
        pos = j * BLOCK_K + tl.arange(0, BLOCK_K)
        ok = pos < L_img
        toks = txt_len + _video_tokens(tl.minimum(pos, L_img - 1), tflag, T, HW, HAS_TEMPORAL)
        return _attend(acc, m_i, l_i, q, k_base, v_base, pad_base, toks, ok, stride_kl, stride_vl, qk_scale,
                       D, MASK, HAS_PAD, I64)

    @triton.jit
    def _attend_list(acc, m_i, l_i, q, k_base, v_base, k_desc, v_desc, pad_base, b, h, list_base, n_list, txt_len,
                     L_img, tflag, T, HW, skl, svl, qk_scale, BLOCK_K: tl.constexpr, D: tl.constexpr,
                     MASK: tl.constexpr, HAS_PAD: tl.constexpr, HAS_TEMPORAL: tl.constexpr, USE_DESC: tl.constexpr,
                     I64: tl.constexpr):
        """The video key blocks ``list_base[:n_list]``. With descriptors, (t, h, w)-order heads load by
        TMA and temporal heads gather by pointers: two loops, one of them empty for each program, so
        no branch sits inside a loop (the pipeliner needs straight-line loop bodies)."""
        n_ptr = n_list
        if USE_DESC:
            n_ptr = tl.where(tflag, n_list, 0)
            for i in range(0, n_list - n_ptr):
                j = tl.load(list_base + i).to(tl.int32)
                acc, m_i, l_i = _attend_video_desc(acc, m_i, l_i, q, k_desc, v_desc, pad_base, b, h, j, txt_len,
                                                   L_img, qk_scale, BLOCK_K, D, MASK, HAS_PAD)
        for i in range(0, n_ptr):
            j = tl.load(list_base + i).to(tl.int32)
            acc, m_i, l_i = _attend_video(acc, m_i, l_i, q, k_base, v_base, pad_base, j, txt_len, L_img, tflag,
                                          T, HW, skl, svl, qk_scale, BLOCK_K, D, MASK, HAS_PAD, HAS_TEMPORAL, I64)
        return acc, m_i, l_i

    @triton.jit
    def _sparse_attn_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, res_ptr, blk_ptr, cnt_ptr, cblk_ptr, ccnt_ptr,
                            pad_ptr, tmp_ptr, k_desc, v_desc, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
                            B, H, L, txt_len, n_txt_blocks, NQB, NKB, MAXK, T, HW, qk_scale,
                            BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, D: tl.constexpr,
                            MODE: tl.constexpr, HAS_PAD: tl.constexpr, MASK_VID: tl.constexpr,
                            STORE_LSE: tl.constexpr, HAS_TEMPORAL: tl.constexpr, USE_DESC: tl.constexpr,
                            I64: tl.constexpr):
        # MODE: 0 sparse, 1 dense, 2 complement (the launcher passes the complement lists; no text keys,
        # text rows empty), 3 refresh (the lists, sparse output kept in res, then the complement lists;
        # res = dense - sparse).
        pid = tl.program_id(0)
        n_txt_prog = n_txt_blocks * H * B
        is_txt, qb, bh, b, h = _program_block(pid, n_txt_blocks, H, B, NQB)
        L_img = L - txt_len
        # Text programs and dense mode attend every key: the order of keys is irrelevant there.
        tflag = False
        if HAS_TEMPORAL:
            if MODE != 1:
                tflag = (tl.load(tmp_ptr + bh) != 0) & (pid >= n_txt_prog)
        q_base = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        k_base = k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh
        v_base = v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh
        pad_base = pad_ptr + b.to(tl.int64) * L
        cols = tl.arange(0, D)
        if is_txt:
            rows = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
            row_ok = rows < txt_len
        else:
            pos = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
            row_ok = pos < L_img
            rows = txt_len + _video_tokens(pos, tflag, T, HW, HAS_TEMPORAL)
        if I64:
            q_rows = rows.to(tl.int64)
        else:
            q_rows = rows
        q = tl.load(q_base + q_rows[:, None] * sql + cols[None, :], mask=row_ok[:, None], other=0.0)
        m_i = tl.full([BLOCK_Q], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_Q], tl.float32)
        acc = tl.zeros([BLOCK_Q, D], tl.float32)
        if MODE != 2:
            for key0 in range(0, txt_len, BLOCK_K):
                keys = key0 + tl.arange(0, BLOCK_K)
                acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, pad_base, tl.minimum(keys, txt_len - 1),
                                        keys < txt_len, skl, svl, qk_scale, D, True, HAS_PAD, I64)
        # Two loops, each empty for the other kind of program, so neither has a branch inside: every
        # key block for text rows (and in dense mode), the listed blocks for video rows otherwise.
        if MODE == 1:
            n_all = NKB
        elif MODE == 2:
            n_all = 0
        else:
            n_all = tl.where(is_txt, NKB, 0)
        if USE_DESC:
            for j in range(0, n_all):
                acc, m_i, l_i = _attend_video_desc(acc, m_i, l_i, q, k_desc, v_desc, pad_base, b, h, j, txt_len, L_img,
                                                   qk_scale, BLOCK_K, D, MASK_VID, HAS_PAD)
        else:
            for j in range(0, n_all):
                acc, m_i, l_i = _attend_video(acc, m_i, l_i, q, k_base, v_base, pad_base, j, txt_len, L_img, False,
                                              T, HW, skl, svl, qk_scale, BLOCK_K, D, MASK_VID, HAS_PAD, False, I64)
        list_base = blk_ptr + (bh.to(tl.int64) * NQB + qb) * MAXK
        n_list = 0
        if MODE != 1:
            n_list = tl.load(cnt_ptr + bh * NQB + qb, mask=pid >= n_txt_prog, other=0)
            acc, m_i, l_i = _attend_list(acc, m_i, l_i, q, k_base, v_base, k_desc, v_desc, pad_base, b, h, list_base,
                                         n_list, txt_len, L_img, tflag, T, HW, skl, svl, qk_scale, BLOCK_K, D, MASK_VID,
                                         HAS_PAD, HAS_TEMPORAL, USE_DESC, I64)
        is_vid = pid >= n_txt_prog
        res_ptrs = res_ptr + (bh.to(tl.int64) * L_img + (rows - txt_len))[:, None] * D + cols[None, :]
        if MODE == 3:
            # Keep the sparse output (float32, in res), then run the complement list: the same running
            # max and sums continue, so the end state is dense attention.
            if is_vid:
                o_s = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
                tl.store(res_ptrs, o_s, mask=row_ok[:, None])
            n_comp = tl.load(ccnt_ptr + bh * NQB + qb, mask=is_vid, other=0)
            acc, m_i, l_i = _attend_list(acc, m_i, l_i, q, k_base, v_base, k_desc, v_desc, pad_base, b, h,
                                         cblk_ptr + (bh.to(tl.int64) * NQB + qb) * NKB, n_comp, txt_len, L_img, tflag,
                                         T, HW, skl, svl, qk_scale, BLOCK_K, D, MASK_VID, HAS_PAD, HAS_TEMPORAL,
                                         USE_DESC, I64)
        has = l_i > 0.0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        o_base = o_ptr + b.to(tl.int64) * sob + h.to(tl.int64) * soh
        tl.store(o_base + q_rows[:, None] * sol + cols[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
        if MODE == 3:
            if is_vid:
                tl.debug_barrier()  # the sparse output stored above, visible to the whole program
                o_s = tl.load(res_ptrs, mask=row_ok[:, None], other=0.0)
                tl.store(res_ptrs, out - o_s, mask=row_ok[:, None])
        if STORE_LSE:
            lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))  # ln 2: natural log
            tl.store(lse_ptr + bh.to(tl.int64) * L + rows, lse, mask=row_ok)


def complement_lists(kv_blocks: torch.Tensor, kv_counts: torch.Tensor, nkb: int, rows_per_chunk: int = 0):
    """(blocks, counts) listing, per query block, the video key blocks NOT in the given lists, in
    ascending order: int16 [B, H, NQB, NKB] when NKB fits (half the memory; 83 MB at 118,800 tokens),
    counts int32. Each unlisted block goes to its rank among the unlisted ones (a cumulative sum, no
    sort); entries past the count are 0. Built in chunks of query blocks to bound the temporaries."""
    lead = kv_blocks.shape[:3]
    if lead[0] * lead[1] > 1 and kv_blocks.stride(0) == 0 and kv_blocks.stride(1) == 0 and bool((kv_counts == kv_counts[:1, :1]).all()):
        # One list for every (batch, head) (svg's band is an expanded view): build it once.
        blocks, counts = complement_lists(kv_blocks[:1, :1].contiguous(), kv_counts[:1, :1], nkb, rows_per_chunk)
        return blocks.expand(*lead, nkb).contiguous(), counts.expand(*lead).contiguous()
    rows = math.prod(lead)
    dtype = torch.int16 if nkb < 2 ** 15 else torch.int32
    out = torch.zeros(rows, nkb + 1, dtype=dtype, device=kv_blocks.device)
    blk, cnt = kv_blocks.reshape(rows, -1), kv_counts.reshape(rows)
    step = rows_per_chunk or max(1, (1 << 24) // max(1, nkb))
    for r0 in range(0, rows, step):
        free = ~block_mask(blk[r0:r0 + step], cnt[r0:r0 + step], nkb)
        rank = torch.where(free, free.cumsum(-1, dtype=torch.int32) - 1, nkb).long()  # listed -> spare column
        n = free.shape[0]
        out[r0:r0 + n].scatter_(1, rank, torch.arange(nkb, device=kv_blocks.device, dtype=dtype).expand(n, nkb))
    counts = (nkb - block_mask(blk, cnt, nkb).sum(-1, dtype=torch.int32)).reshape(lead)
    return out[:, :nkb].reshape(*lead, nkb).contiguous(), counts


def token_major_output(bsz, heads, seq, d, like) -> torch.Tensor:
    """An uninitialised [B, H, L, D] output laid out [B, L, H, D] in memory: what ComfyUI's attention
    returns ([B, L, H * D]) is then a view of it, not a copy."""
    return torch.empty(bsz, seq, heads, d, dtype=like.dtype, device=like.device).transpose(1, 2)


def default_config(interp: bool | None = None) -> dict:
    """Launch parameters: 8 warps, 3 stages (the best of the H100 sweeps at 128x64 and 128x128 tiles);
    small under the interpreter."""
    if interp if interp is not None else interpreting():
        return dict(num_warps=4, num_stages=1)
    return dict(num_warps=8, num_stages=3)


def _desc_default(q) -> bool:
    """TMA descriptors on Hopper (sm_90+) when Triton has them; the interpreter and older GPUs use pointers."""
    return (TensorDescriptor is not None and q.is_cuda and not interpreting()
            and torch.cuda.get_device_capability(q.device)[0] >= 9)


def _descriptors(k, v, block_k):
    """TMA descriptors of K and V over [B, H, L, D] with their own strides (ComfyUI's transposed views
    included), one [1, 1, block_k, D] box per load; None when a stride or the base is not 16-byte aligned."""
    if TensorDescriptor is None:
        return None
    out = []
    for t in (k, v):
        item = t.element_size()
        if t.data_ptr() % 16 or any(st * item % 16 for st in t.stride()[:-1]) or t.stride(-1) != 1:
            return None
        out.append(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_k, t.shape[-1]]))
    return out


def _launch(q, k, v, out, lse, blocks, counts, maxk, txt_len, key_padding, sm_scale, mode, block_q, block_k,
            nqb, nkb, config, res=None, temporal=None, grid=None, comp=None) -> None:
    """Runs the kernel into the given out / lse / res buffers (tests poison them to see every element written)."""
    bsz, heads, seq, d = q.shape
    n_txt = _num_blocks(txt_len, block_q)
    launch_grid = ((n_txt + nqb) * heads * bsz,)
    cfg = dict(default_config())
    cfg.update(config or {})
    pad = key_padding.contiguous().view(torch.uint8) if key_padding is not None else q
    dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
    has_temporal = temporal is not None and mode != "dense"
    t_frames, hw = (grid[0], grid[1] * grid[2]) if has_temporal else (1, 1)
    use_desc = cfg.pop("use_desc", None)
    # TMA pays at 128-key tiles (H100 sweep: dense 1.25x cuDNN against 1.28x by pointers); at 64 it loses.
    auto = _desc_default(q) and block_k >= 128
    descs = _descriptors(k, v, block_k) if use_desc is not False and (use_desc or auto) else None
    _sparse_attn_kernel[launch_grid](
        q, k, v, out, lse if lse is not None else out, res if res is not None else out,
        blocks if blocks is not None else dummy, counts if counts is not None else dummy,
        *(comp if comp is not None else (dummy, dummy)), pad,
        temporal.contiguous().view(torch.uint8) if has_temporal else dummy,
        *(descs if descs is not None else (k, v)), *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        bsz, heads, seq, txt_len, n_txt, nqb, nkb, maxk, t_frames, hw, sm_scale * LOG2E,
        BLOCK_Q=block_q, BLOCK_K=block_k, D=d, MODE=_MODE_ID[mode], HAS_PAD=key_padding is not None,
        MASK_VID=(seq - txt_len) % block_k != 0, STORE_LSE=lse is not None, HAS_TEMPORAL=has_temporal,
        USE_DESC=descs is not None, I64=seq * max(q.stride(2), k.stride(2), v.stride(2), out.stride(2)) >= 2 ** 31,
        **cfg)


def block_sparse_attention_triton(q, k, v, kv_blocks, kv_counts, *, txt_len, key_padding=None, sm_scale=None,
                                  mode="sparse", block_q=128, block_k=64, return_lse=False, check_lists=True,
                                  temporal=None, grid=None, config=None):
    """Triton kernel, same contract as :func:`block_sparse_attention_reference`; ``config`` overrides
    the launch parameters (num_warps, num_stages) for sweeps."""
    nqb, nkb = _check(q, k, v, kv_blocks, kv_counts, txt_len, key_padding, mode, block_q, block_k, check_lists,
                      temporal, grid)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    bsz, heads, seq, d = q.shape
    out = token_major_output(bsz, heads, seq, d, q)
    lse = torch.empty(bsz, heads, seq, dtype=torch.float32, device=q.device) if return_lse else None
    res = torch.empty(bsz, heads, seq - txt_len, d, dtype=torch.float32, device=q.device) if mode == "refresh" else None
    blocks = counts = comp = None
    maxk = 0
    if mode == "sparse":
        blocks, counts, maxk = kv_blocks.contiguous(), kv_counts.contiguous(), kv_blocks.shape[3]
    elif mode == "refresh":
        blocks, counts, maxk = kv_blocks.contiguous(), kv_counts.contiguous(), kv_blocks.shape[3]
        comp = complement_lists(kv_blocks, kv_counts, nkb)
    elif mode == "complement":
        blocks, counts = complement_lists(kv_blocks, kv_counts, nkb)
        maxk = nkb
    if out.numel():
        _launch(q, k, v, out, lse, blocks, counts, maxk, txt_len, key_padding,
                sm_scale if sm_scale is not None else 1.0 / math.sqrt(d), mode, block_q, block_k, nqb, nkb, config,
                res, temporal, grid, comp)
    if mode == "refresh":
        return (out, res, lse) if return_lse else (out, res)
    return (out, lse) if return_lse else out
