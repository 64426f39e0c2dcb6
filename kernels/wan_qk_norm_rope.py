"""Wan's self-attention QK RMSNorm (over all heads at once) and its rotary embedding in one pass.

``out = wan_qk_norm_rope(x, weight, eps, freqs, heads, out=None)`` for ``x`` [B, L, C] with
``C = heads * D`` (the q or k projection's output, last dimension contiguous, rows of any stride: a
GEMM output or a column slice of one), as ComfyUI's ``WanSelfAttention`` computes
``apply_rope1(norm_q(q(x)).view(B, L, heads, D), freqs)``:

- RMSNorm over the whole width C (Wan normalises q and k across heads, unlike flux / HunyuanVideo's
  per-head norm), times ``weight`` [C] (affine), in float32, rounded to x's dtype as the norm returns it;
- then per head the interleaved rotation of flux's RoPE: ``freqs`` float32 [B or 1, L, 1, D/2, 2, 2]
  (``WanModel.rope_encode``'s layout, one table per token shared by the heads), pair i of a head rotated
  as ``out[2i + r] = freqs[i, r, 0] * y[2i] + freqs[i, r, 1] * y[2i + 1]``, rounded to x's dtype.

``out`` [B, L, C] (any row strides, last dimension contiguous) may be ``x`` itself: each row is read
whole (its sum of squares) before any of it is written, by the program that writes it. The result is
q or k in the ``[B, L, heads * D]`` layout that ComfyUI hands ``optimized_attention``; ComfyUI runs the
norm, the view, the cast to float32, the rotation and the cast back as separate kernels, each a full read
and write of q (or k).
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, interpreting, next_pow2, tl, triton


def _check(x, weight, freqs, heads, out):
    if x.dim() != 3 or not x.is_floating_point() or x.stride(-1) != 1:
        raise ValueError(f"wan_qk_norm_rope: x must be a float [B, L, C] tensor with a contiguous last dimension, "
                         f"got {x.dtype} {tuple(x.shape)} strides {x.stride()}")
    b, n, c = x.shape
    if not isinstance(heads, int) or heads < 1 or c % heads or (c // heads) % 2:
        raise ValueError(f"wan_qk_norm_rope: heads={heads!r} must divide C={c} into heads of even size")
    d = c // heads
    if weight is not None and tuple(weight.shape) != (c,):
        raise ValueError(f"wan_qk_norm_rope: weight must be [{c}] (the norm is over all heads), got "
                         f"{tuple(weight.shape)}")
    if freqs.dim() != 6 or freqs.shape[0] not in (1, b) or freqs.shape[2] != 1 or tuple(freqs.shape[3:]) != (
            d // 2, 2, 2) or freqs.shape[1] != n or freqs.dtype != torch.float32:
        raise ValueError(f"wan_qk_norm_rope: freqs must be float32 [B or 1, L={n}, 1, {d // 2}, 2, 2], got "
                         f"{freqs.dtype} {tuple(freqs.shape)}")
    if out is not None and (tuple(out.shape) != tuple(x.shape) or out.dtype != x.dtype or out.stride(-1) != 1):
        raise ValueError(f"wan_qk_norm_rope: out must be {x.dtype} {tuple(x.shape)} with a contiguous last dimension")
    return b, n, c, d


def wan_qk_norm_rope_reference(x, weight, eps, freqs, heads, out=None):
    """ComfyUI's ``rms_norm`` (float32 math, one rounding) then ``apply_rope1`` (float32, ``x0 * f0`` then
    ``addcmul_(f1, x1)``, one rounding), written out op for op."""
    b, n, c, d = _check(x, weight, freqs, heads, out)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    y = y.to(x.dtype).float().reshape(b, n, heads, d // 2, 1, 2)
    r = freqs[..., 0] * y[..., 0]
    r.addcmul_(freqs[..., 1], y[..., 1])
    r = r.reshape(b, n, c).to(x.dtype)
    if out is None:
        return r
    return out.copy_(r)


if HAS_TRITON:

    @triton.jit
    def _wan_qk_norm_rope_kernel(x_ptr, w_ptr, f_ptr, o_ptr, L, C, n_rows, eps, sxb, sxl, sfb, sfl, sob, sol,
                                 BR: tl.constexpr, CH: tl.constexpr, D: tl.constexpr, HAS_W: tl.constexpr):
        # BR whole rows (tokens) per program, walked in chunks of CH channels (whole heads): a first pass
        # sums the squares, the second normalises, rounds, rotates and stores chunk by chunk.
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        ok = r < n_rows
        l = r % L
        b = r // L
        x_row = x_ptr + b.to(tl.int64) * sxb + l.to(tl.int64) * sxl
        o_row = o_ptr + b.to(tl.int64) * sob + l.to(tl.int64) * sol
        f_row = f_ptr + b.to(tl.int64) * sfb + l.to(tl.int64) * sfl
        cols = tl.arange(0, CH)
        ss = tl.zeros((BR,), dtype=tl.float32)
        for c0 in range(0, C, CH):
            m = ok[:, None] & ((c0 + cols) < C)[None, :]
            xv = tl.load(x_row[:, None] + c0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
            ss += tl.sum(xv * xv, 1)
        rstd = 1.0 / tl.sqrt(ss / C + eps)
        pair = tl.arange(0, CH // 2) % (D // 2)  # the pair's index within its head: its rotation
        for c0 in range(0, C, CH):
            m = ok[:, None] & ((c0 + cols) < C)[None, :]
            xv = tl.load(x_row[:, None] + c0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
            y = xv * rstd[:, None]
            if HAS_W:
                y = y * tl.load(w_ptr + c0 + cols, mask=(c0 + cols) < C, other=0.0).to(tl.float32)[None, :]
            y = y.to(o_ptr.dtype.element_ty).to(tl.float32)  # the norm's output dtype, as ComfyUI rounds it
            y0, y1 = tl.split(tl.reshape(y, (BR, CH // 2, 2)))
            fp = f_row[:, None] + 4 * pair[None, :]
            mp = ok[:, None]
            f00 = tl.load(fp, mask=mp, other=0.0)
            f01 = tl.load(fp + 1, mask=mp, other=0.0)
            f10 = tl.load(fp + 2, mask=mp, other=0.0)
            f11 = tl.load(fp + 3, mask=mp, other=0.0)
            o = tl.reshape(tl.join(f00 * y0 + f01 * y1, f10 * y0 + f11 * y1), (BR, CH))
            tl.store(o_row[:, None] + c0 + cols[None, :], o.to(o_ptr.dtype.element_ty), mask=m)


def default_config(heads: int, d: int) -> tuple[int, int, int]:
    """(rows per program, channels per chunk, warps): chunks of up to 8 heads (1024 channels at D 128),
    so a 14B row (40 heads) is 5 chunks; small tiles under the interpreter."""
    ch = next_pow2(min(heads, 8)) * d
    if interpreting():
        return 16, ch, 4
    return 4, ch, 4


def wan_qk_norm_rope_triton(x, weight, eps, freqs, heads, out=None, config=None):
    """Triton kernel, same contract as :func:`wan_qk_norm_rope_reference`; ``config`` as :func:`default_config`."""
    b, n, c, d = _check(x, weight, freqs, heads, out)
    if d & (d - 1):
        raise ValueError(f"wan_qk_norm_rope: the Triton kernel needs a power-of-two head size, got {d}")
    if out is None:
        out = torch.empty(b, n, c, dtype=x.dtype, device=x.device)
    rows = b * n
    if rows == 0:
        return out
    br, ch, warps = config or default_config(heads, d)
    f = freqs if tuple(freqs.stride()[3:]) == (4, 2, 1) else freqs.contiguous()
    w = weight if weight is not None else f
    if weight is not None and weight.stride(0) != 1:
        w = weight.contiguous()
    _wan_qk_norm_rope_kernel[(triton.cdiv(rows, br),)](
        x, w, f, out, n, c, rows, float(eps), x.stride(0), x.stride(1),
        f.stride(0) if f.shape[0] > 1 else 0, f.stride(1), out.stride(0), out.stride(1),
        BR=br, CH=ch, D=d, HAS_W=weight is not None, num_warps=warps)
    return out
