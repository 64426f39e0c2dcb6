"""Wan's attention block with the activation quantization fused into what precedes it.

ComfyUI's ``WanAttentionBlock.forward`` normalises, modulates (``addcmul(shift, norm1(x), 1 + scale)``)
and hands the BF16 result to q, k and v, each of which reads it again to quantize it; then it runs the
full-width RMSNorm of q and of k, a view, and ``apply_rope1`` (a cast to float32, the rotation, a cast
back) as separate kernels. Here, through ``patches_replace["dit"][("double_block", i)]`` (the hook
``WanModel.forward_orig`` offers for replacing a block), the same math runs as:

- LayerNorm + modulation + INT8 quantization in one kernel (``kernels.act_quant_ln_mod``, whose
  ``LayerNorm(x) * (1 + scale) + shift`` is Wan's ``addcmul`` exactly) before self-attention and before
  ``ffn.0``. Self-attention's q, k and v read that one quantized input and run three GEMMs on it (not one
  GEMM on weights concatenated at load: a concatenated copy would double those weights in memory, or,
  as views, be split again by ComfyUI's per-module loading and low-VRAM streaming; at video token counts
  each of the three GEMMs already fills the GPU, so one launch instead of three saves microseconds).
  Layers whose smoothing vectors differ (a calibration that smoothed q, k and v apart) share what they
  can: one quantization per distinct vector, said once in the log;
- the affine cross-attention LayerNorm (``norm3``) + INT8 quantization for ``cross_attn.q``, the same
  kernel with ``shift = bias`` and ``scale = weight - 1``;
- the full-width QK RMSNorm (over all heads, affine) + Wan's RoPE in one pass, in place on the q and k
  GEMM outputs (``kernels.wan_qk_norm_rope``): q and k come out in the ``[B, L, heads * 128]`` layout
  ComfyUI hands ``optimized_attention``;
- the gated residual adds in place (``x += gate * y`` as one ``addcmul_``) on the block's own copy of x.

Left to ComfyUI's own modules and math: the attention calls (``comfy.ldm.wan.model.optimized_attention``
with ``heads`` and the block's ``transformer_options``, so the sparse-attention override, any attention
backend and the family adapter that tells self- from cross-attention see exactly ComfyUI's calls); the
cross-attention's k / v (weight-only 4-bit Linears on the 512 text and 257 CLIP tokens: memory-bound
GEMMs where an activation prologue has nothing to save), its q / k RMSNorms and its output; the FFN's
GELU and ``ffn.2`` (GELU fused into the activation kernel was slower at these widths on the H100:
1.47 against 0.95 ms at 12,288 channels, ``benchmarks/results/act_fused_h100.json``; ``ffn.2``
quantizes its own input); the ``attn1_patch`` / ``attn2_patch`` hooks, called where ComfyUI calls them.

Wan 2.2 TI2V-5B's per-token modulation (``e0`` of one row per latent frame) is fused too: the kernel
reads the modulation row of each token's frame (``rows_per_batch`` = tokens per frame), the gates
broadcast over a frame's tokens. A call the fusion does not cover runs ComfyUI's forward
(``extra["original_block"]``), and the log says why, once per reason: a layer with an injected forward
or hooks (a bypass LoRA), frames that do not divide the tokens, a cross-attention that needs the CLIP
token count when ComfyUI's block wrapper does not show it, or an unexpected modulation shape.
"""

from __future__ import annotations

import logging
from collections import Counter

import comfy.ldm.wan.model as wan
import comfy.model_management
import torch

from .. import kernels
from .ops import QuantSparseLinear

log = logging.getLogger("quantsparse")


# ---------------------------------------------------------------------------------------------- checks

def _int8_input(m) -> bool:
    return isinstance(m, QuantSparseLinear) and m.takes_int8_input


def _plain_layernorm(norm, affine: bool) -> bool:
    if not isinstance(norm, torch.nn.LayerNorm) or len(norm.normalized_shape) != 1:
        return False
    return (norm.weight is not None and norm.bias is not None) if affine else (norm.weight is None and norm.bias is None)


def _unpatched(module) -> bool:
    """No weight patch applied per call (low-VRAM LoRA on a norm), so its tensors can be read directly."""
    return not getattr(module, "weight_function", None) and not getattr(module, "bias_function", None)


def _hooked(module) -> bool:
    """An injected forward (ComfyUI's bypass LoRA replaces ``module.forward``) or torch hooks: calling the
    quantized GEMM directly would skip them. An instance ``forward`` that is the module's own method bound to
    it is not an injection: ComfyUI's bypass LoRA ejects by assigning the saved bound method back (its
    ``BypassForwardHook.eject``), so a model that once ran with the LoRA keeps that attribute afterwards."""
    fwd = module.__dict__.get("forward")
    injected = fwd is not None and not (getattr(fwd, "__self__", None) is module
                                        and getattr(fwd, "__func__", None) is type(module).forward)
    return injected or bool(module._forward_hooks) or bool(module._forward_pre_hooks)


def why_not_fused(block) -> str:
    """Why the fused forward does not cover ``block`` ("" when it does)."""
    if type(block) is not wan.WanAttentionBlock:
        return f"{type(block).__name__} blocks"
    sa = block.self_attn
    if type(sa) is not wan.WanSelfAttention or not all(isinstance(n, torch.nn.RMSNorm) for n in (sa.norm_q, sa.norm_k)):
        return "self-attention without Wan's QK RMSNorm"
    if not (_plain_layernorm(block.norm1, False) and _plain_layernorm(block.norm2, False)):
        return "norm1 / norm2 not LayerNorms without affine"
    ffn = block.ffn
    if not (isinstance(ffn, torch.nn.Sequential) and len(ffn) == 3 and isinstance(ffn[1], torch.nn.GELU)):
        return "an FFN other than Linear, GELU, Linear"
    bf16 = [n for n, m in (("self_attn.q", sa.q), ("self_attn.k", sa.k), ("self_attn.v", sa.v), ("ffn.0", ffn[0]))
            if not _int8_input(m)]
    if bf16:
        return f"{', '.join(bf16)} not quantized with 8-bit activations"
    return ""


def _same_prologue(a: QuantSparseLinear, b: QuantSparseLinear) -> bool:
    if (a.quant_kind, a.quant_rotate) != (b.quant_kind, b.quant_rotate):
        return False
    return torch.equal(a.smooth.detach().cpu(), b.smooth.detach().cpu())


def input_groups(layers) -> list[list[QuantSparseLinear]]:
    """Layers that can share one quantized input: same smoothing vector, code range and rotation."""
    groups: list[list[QuantSparseLinear]] = []
    for m in layers:
        for g in groups:
            if _same_prologue(g[0], m):
                g.append(m)
                break
        else:
            groups.append([m])
    return groups


class Notes:
    """Per model: calls fused, calls that ran ComfyUI's forward by reason (logged once per reason)."""

    def __init__(self):
        self.fused = 0
        self.fallbacks: Counter = Counter()

    def once(self, reason: str, level=logging.WARNING) -> None:
        if reason not in self.fallbacks:
            log.log(level, "QuantSparse: %s", reason)
        self.fallbacks[reason] += 1


# ---------------------------------------------------------------------------------------------- pieces

def _modulation(block, vec, x):
    """ComfyUI's ``e``: the block's modulation + e0 in x's dtype, as [B, T, 6, C] (T = 1, or TI2V's frames)."""
    m = comfy.model_management.cast_to(block.modulation, dtype=x.dtype, device=x.device)
    if vec.dim() == 3:  # [B, 6, C]: ComfyUI chunks (modulation + e) on dim 1
        return (m + vec).unsqueeze(1)
    return m.unsqueeze(0) + vec  # [B, T, 6, C]: ComfyUI unbinds on dim 2


def _ln_quant(layer, x2, shift, scale, rows_per_batch, eps):
    """INT8 codes + row scales of ``LayerNorm(x2) * (1 + scale) + shift`` for ``layer``'s activation prologue;
    shift / scale [R, C] rows (R = batch x frames), each shared by ``rows_per_batch`` rows of x2 [M, C]."""
    smooth, qmax, rotate = layer.activation_prologue(x2.device)
    return kernels.act_quant_ln_mod(x2, shift, scale, smooth, qmax, rotate, rows_per_batch=rows_per_batch, eps=eps)


def _rows(e):
    """[B, T, C] modulation chunk -> [B * T, C] rows (a view: the chunks of one [B, T, 6, C] tensor)."""
    return e.reshape(e.shape[0] * e.shape[1], e.shape[2])


def _gated_add(x, y, gate, inplace: bool):
    """``addcmul(x, y, repeat_e(gate, x))`` with gate [B, T, C] broadcast over each frame's tokens."""
    b, n, c = x.shape
    t = gate.shape[1]
    xv, yv, g = x.view(b, t, n // t, c), y.reshape(b, t, n // t, c), gate[:, :, None, :]
    if inplace:
        xv.addcmul_(yv, g)
        return x
    return torch.addcmul(xv, yv, g).view(b, n, c)


def _norm_eps(norm):
    # torch's rms_norm with eps None uses float32's epsilon (its math is float32).
    return norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps


def _rope_table_ok(freqs, b, n, d) -> bool:
    return (isinstance(freqs, torch.Tensor) and freqs.dtype == torch.float32 and freqs.dim() == 6
            and freqs.shape[0] in (1, b) and tuple(freqs.shape[1:]) == (n, 1, d // 2, 2, 2))


def _norm_rope(norm, x, freqs, heads):
    """``apply_rope1(norm(x).view(b, n, heads, d), freqs)`` as [b, n, c]: the kernel in place on ``x`` (a GEMM
    output of this block), or ComfyUI's own calls for a table or norm the kernel does not take."""
    b, n, c = x.shape
    d = c // heads
    if _unpatched(norm) and not _hooked(norm) and norm.weight is not None and _rope_table_ok(freqs, b, n, d):
        w = norm.weight.to(device=x.device, dtype=x.dtype)
        return kernels.wan_qk_norm_rope(x, w, _norm_eps(norm), freqs, heads, out=x)
    return wan.apply_rope1(norm(x).view(b, n, heads, d), freqs).view(b, n, c)


def _cross_attention(ca, q, context, context_img_len, to):
    """``WanT2VCrossAttention`` / ``WanI2VCrossAttention.forward`` after their q projection and norm."""
    if type(ca) is wan.WanI2VCrossAttention:
        context_img = context[:, :context_img_len]
        context = context[:, context_img_len:]
        k = ca.norm_k(ca.k(context))
        v = ca.v(context)
        k_img = ca.norm_k_img(ca.k_img(context_img))
        v_img = ca.v_img(context_img)
        img_x = wan.optimized_attention(q, k_img, v_img, heads=ca.num_heads, transformer_options=to)
        x = wan.optimized_attention(q, k, v, heads=ca.num_heads, transformer_options=to)
        x = x + img_x
    else:
        k = ca.norm_k(ca.k(context))
        v = ca.v(context)
        x = wan.optimized_attention(q, k, v, heads=ca.num_heads, transformer_options=to)
    return ca.o(x)


_NO_VALUE = object()


def _closure_value(fn, name):
    """A variable ``fn`` closes over (``forward_orig``'s ``block_wrap`` closes over ``context_img_len``), or
    _NO_VALUE."""
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or cells is None or name not in code.co_freevars:
        return _NO_VALUE
    try:
        return cells[code.co_freevars.index(name)].cell_contents
    except ValueError:  # an empty cell
        return _NO_VALUE


# ---------------------------------------------------------------------------------------------- the block

class FusedWanBlock:
    """The ``patches_replace["dit"][("double_block", i)]`` entry of one ``WanAttentionBlock``."""

    def __init__(self, block, index: int, notes: Notes):
        self.block = block
        self.index = index
        self.notes = notes
        sa, ca = block.self_attn, block.cross_attn
        self.qkv_groups = input_groups([sa.q, sa.k, sa.v])
        d = sa.head_dim
        if d & (d - 1):
            notes.once(f"blocks.{index}: head size {d} is not a power of two: the QK norm + RoPE runs the eager "
                       "reference of kernels.wan_qk_norm_rope, not the Triton kernel")
        if len(self.qkv_groups) > 1:
            notes.once(f"blocks.{index}: self-attention q, k, v have different smoothing vectors; their shared input "
                       f"is quantized {len(self.qkv_groups)} times", logging.INFO)
        # cross_attn.q's LayerNorm + quantization fused when the cross-attention is one of ComfyUI's two classes
        # (whose forward _cross_attention repeats) and norm3 an affine LayerNorm; else ComfyUI's module runs it.
        self.cross_fused = (type(ca) in (wan.WanT2VCrossAttention, wan.WanI2VCrossAttention)
                            and _plain_layernorm(block.norm3, True) and _int8_input(ca.q)
                            and isinstance(ca.norm_q, torch.nn.RMSNorm))
        self.direct = [sa.q, sa.k, sa.v, block.ffn[0]] + ([ca.q] if self.cross_fused else [])

    def _fallback_reason(self, args, extra) -> tuple[str, object]:
        """(why ComfyUI's forward must run this call, or ""; the CLIP token count for the cross-attention)."""
        x, vec = args["img"], args["vec"]
        b = self.block
        for m in self.direct:
            if _hooked(m):
                name = next(n for n, mm in b.named_modules() if mm is m)
                return f"blocks.{self.index}.{name} has an injected forward or hooks (e.g. a bypass LoRA)", None
        if x.dim() != 3 or x.shape[-1] != b.dim:
            return f"a block input of shape {tuple(x.shape)}", None
        if vec.dim() not in (3, 4) or tuple(vec.shape[-2:]) != (6, b.dim) or vec.shape[0] != x.shape[0]:
            return f"a modulation input of shape {tuple(vec.shape)}", None
        frames = vec.shape[1] if vec.dim() == 4 else 1
        if x.shape[1] % frames:
            return f"{x.shape[1]} tokens for {frames} modulation rows (per-token modulation, uneven)", None
        context_img_len = None
        if type(b.cross_attn) is wan.WanI2VCrossAttention:
            context_img_len = _closure_value(extra.get("original_block"), "context_img_len")
            if context_img_len is _NO_VALUE:
                return "ComfyUI's block wrapper does not show the CLIP token count (context_img_len)", None
        return "", context_img_len

    def __call__(self, args, extra):
        why, context_img_len = self._fallback_reason(args, extra)
        if why:
            self.notes.once(f"{why}: ComfyUI's block forward runs")
            return extra["original_block"](args)
        self.notes.fused += 1
        blk = self.block
        sa, ca, ffn = blk.self_attn, blk.cross_attn, blk.ffn
        to = args["transformer_options"]
        patches = to.get("patches", {})
        x_in, context, freqs = args["img"], args["txt"], args["pe"]
        x = x_in.contiguous()
        # The residual adds go in place on a tensor nobody else holds: the block's own copy, or (no
        # post-block hooks) the previous block's output, which forward_orig drops once this block returns.
        owned = x is not x_in or not patches.get("double_block")
        b, n, c = x.shape
        mod = _modulation(blk, args["vec"], x)  # [B, T, 6, C]
        per = n // mod.shape[1]

        # self-attention: one LayerNorm + modulation + quantization for q, k and v
        out = {}
        for group in self.qkv_groups:
            x_q, x_s = _ln_quant(group[0], x.view(b * n, c), _rows(mod[:, :, 0]), _rows(mod[:, :, 1]), per,
                                 blk.norm1.eps)
            for layer in group:
                out[layer] = layer.forward_prequantized(x_q, x_s, x.dtype).view(b, n, c)
            del x_q, x_s
        q = _norm_rope(sa.norm_q, out.pop(sa.q), freqs, sa.num_heads)
        k = _norm_rope(sa.norm_k, out.pop(sa.k), freqs, sa.num_heads)
        v = out.pop(sa.v)
        attn = wan.optimized_attention(q, k, v, heads=sa.num_heads, transformer_options=to)
        del v
        if "attn1_patch" in patches:
            d = c // sa.num_heads
            for p in patches["attn1_patch"]:
                attn = p({"x": attn, "q": q.view(b, n, sa.num_heads, d), "k": k.view(b, n, sa.num_heads, d),
                          "transformer_options": to})
        del q, k
        x = _gated_add(x, sa.o(attn), mod[:, :, 2], owned)
        owned = True  # from here x is this block's own tensor
        del attn

        # cross-attention (no gate)
        if self.cross_fused and _unpatched(blk.norm3) and not _hooked(blk.norm3):
            w3 = comfy.model_management.cast_to(blk.norm3.weight, dtype=x.dtype, device=x.device).float()
            b3 = comfy.model_management.cast_to(blk.norm3.bias, dtype=x.dtype, device=x.device).float()
            x_q, x_s = _ln_quant(ca.q, x.view(b * n, c), b3.view(1, c), (w3 - 1.0).view(1, c), b * n, blk.norm3.eps)
            q = ca.norm_q(ca.q.forward_prequantized(x_q, x_s, x.dtype).view(b, n, c))
            del x_q, x_s
            y = _cross_attention(ca, q, context, context_img_len, to)
            del q
        else:
            y = ca(blk.norm3(x), context, context_img_len=context_img_len, transformer_options=to)
        x.add_(y)
        del y
        if "attn2_patch" in patches:
            for p in patches["attn2_patch"]:
                x = p({"x": x, "transformer_options": to})
            owned = False
            x = x.contiguous()

        # FFN: LayerNorm + modulation + quantization for ffn.0; ComfyUI's GELU and ffn.2
        x_q, x_s = _ln_quant(ffn[0], x.view(b * n, c), _rows(mod[:, :, 3]), _rows(mod[:, :, 4]), per, blk.norm2.eps)
        h = ffn[0].forward_prequantized(x_q, x_s, x.dtype).view(b, n, -1)
        del x_q, x_s
        y = ffn[2](ffn[1](h))
        del h
        return {"img": _gated_add(x, y, mod[:, :, 5], owned)}


# ---------------------------------------------------------------------------------------------- install

def plan(diffusion_model) -> tuple[dict, str]:
    """({("double_block", i): FusedWanBlock} for the blocks the fusion covers; why the others are not covered).
    Empty for a model that is not ComfyUI's plain ``WanModel``."""
    if type(diffusion_model) is not wan.WanModel:
        return {}, ""
    notes = Notes()
    out, why = {}, Counter()
    for i, block in enumerate(diffusion_model.blocks):
        reason = why_not_fused(block)
        if reason:
            why[reason] += 1
        else:
            out[("double_block", i)] = FusedWanBlock(block, i, notes)
    return out, "; ".join(f"{r} ({k} block{'s' if k > 1 else ''})" for r, k in why.items())


def fused_block_patches(diffusion_model) -> dict:
    """``{("double_block", i): fused forward}`` for every block of a Wan model that the fusion covers."""
    return plan(diffusion_model)[0]


def install_fused_wan(patcher) -> tuple[int, str]:
    """Registers the fused forwards on a ModelPatcher (``patches_replace["dit"]``); returns how many blocks they
    cover and why the others are not."""
    patches, why = plan(getattr(patcher.model, "diffusion_model", None))
    for (kind, i), fn in patches.items():
        patcher.set_model_patch_replace(fn, "dit", kind, i)
    return len(patches), why
