"""QK RMSNorm and rotary embedding in one pass, written where the attention reads them.

``out = qk_norm_rope(x, weight, eps, freqs, out=None)`` for ``x`` [B, H, L, D] (any strides: in the
blocks it is a view of the fused qkv projection), RMSNorm over D with ``weight`` [D] (float32 math,
rounded to x's dtype, as ComfyUI's norm returns it), then the rotation of flux / HunyuanVideo's RoPE:
``freqs`` [B or 1, 1, L, D/2, 2, 2] float32, pair i of a row rotated as
``out[2i + r] = freqs[i, r, 0] * y[2i] + freqs[i, r, 1] * y[2i + 1]``. ``out`` (same shape, any
strides, e.g. the text or video rows of a joint q buffer) is written and returned; ComfyUI runs the
norm, a cast, the cat of text and video and RoPE as separate kernels, each a full read and write.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, interpreting, tl, triton


def _check(x, weight, freqs, out):
    if x.dim() != 4 or x.shape[-1] % 2 or x.stride(-1) != 1 or not x.is_floating_point():
        raise ValueError(f"qk_norm_rope: x must be a float [B, H, L, D] tensor with even D and a contiguous last "
                         f"dimension, got {x.dtype} {tuple(x.shape)} strides {x.stride()}")
    b, _, n, d = x.shape
    if weight is not None and tuple(weight.shape) != (d,):
        raise ValueError(f"qk_norm_rope: weight must be [{d}], got {tuple(weight.shape)}")
    if freqs.dim() != 6 or freqs.shape[0] not in (1, b) or freqs.shape[1] != 1 or tuple(freqs.shape[2:]) != (
            n, d // 2, 2, 2) or freqs.dtype != torch.float32:
        raise ValueError(f"qk_norm_rope: freqs must be float32 [B or 1, 1, L={n}, {d // 2}, 2, 2], got "
                         f"{freqs.dtype} {tuple(freqs.shape)}")
    if out is not None and (tuple(out.shape) != tuple(x.shape) or out.dtype != x.dtype or out.stride(-1) != 1):
        raise ValueError(f"qk_norm_rope: out must be {x.dtype} {tuple(x.shape)} with a contiguous last dimension")


def qk_norm_rope_reference(x, weight, eps, freqs, out=None):
    _check(x, weight, freqs, out)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    y = y.to(x.dtype).float().reshape(*x.shape[:-1], -1, 1, 2)
    r = (freqs[..., 0] * y[..., 0] + freqs[..., 1] * y[..., 1]).reshape(x.shape).to(x.dtype)
    if out is None:
        return r
    return out.copy_(r)


if HAS_TRITON:

    @triton.jit
    def _qk_norm_rope_kernel(x_ptr, w_ptr, f_ptr, o_ptr, H, L, n_rows, eps, sxb, sxh, sxl, sfb, sfl, sob, soh, sol,
                             BR: tl.constexpr, D: tl.constexpr, HAS_W: tl.constexpr):
        # Rows in (b, l, h) order, heads fastest: a program's rows share one or two positions (their
        # rotation is read once, from L1) and, in the blocks' qkv views, sit next to each other in memory.
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        ok = r < n_rows
        h = r % H
        l = (r // H) % L
        b = r // (H * L)
        cols = tl.arange(0, D)
        x_base = x_ptr + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + l.to(tl.int64) * sxl
        x = tl.load(x_base[:, None] + cols[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        y = x * (1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps))[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + cols).to(tl.float32)[None, :]
        y = y.to(o_ptr.dtype.element_ty).to(tl.float32)  # the norm's output dtype, as ComfyUI rounds it
        y0, y1 = tl.split(tl.reshape(y, (BR, D // 2, 2)))
        f_base = f_ptr + (b * sfb).to(tl.int64) + l.to(tl.int64) * sfl
        f = tl.load(f_base[:, None] + tl.arange(0, 2 * D)[None, :], mask=ok[:, None], other=0.0)
        fc0, fc1 = tl.split(tl.reshape(f, (BR, D // 2, 2, 2)))  # [..., r, c]: column c = 0, 1
        f00, f10 = tl.split(fc0)
        f01, f11 = tl.split(fc1)
        o = tl.reshape(tl.join(f00 * y0 + f01 * y1, f10 * y0 + f11 * y1), (BR, D))
        o_base = o_ptr + b.to(tl.int64) * sob + h.to(tl.int64) * soh + l.to(tl.int64) * sol
        tl.store(o_base[:, None] + cols[None, :], o.to(o_ptr.dtype.element_ty), mask=ok[:, None])


def qk_norm_rope_triton(x, weight, eps, freqs, out=None):
    """Triton kernel, same contract as :func:`qk_norm_rope_reference`."""
    _check(x, weight, freqs, out)
    b, h, n, d = x.shape
    if out is None:
        out = torch.empty(b, h, n, d, dtype=x.dtype, device=x.device)
    rows = b * h * n
    if rows == 0:
        return out
    br = 16 if interpreting() else 32
    contiguous_rows = freqs.stride(-1) == 1 and freqs.stride(-2) == 2 and freqs.stride(-3) == 4
    f = freqs if contiguous_rows else freqs.contiguous()
    w = weight if weight is not None else f
    _qk_norm_rope_kernel[(triton.cdiv(rows, br),)](
        x, w, f, out, h, n, rows, float(eps), x.stride(0), x.stride(1), x.stride(2),
        f.stride(0) if f.shape[0] > 1 else 0, f.stride(2), out.stride(0), out.stride(1), out.stride(2),
        BR=br, D=d, HAS_W=weight is not None, num_warps=4)
    return out
