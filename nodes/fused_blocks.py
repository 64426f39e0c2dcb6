"""HunyuanVideo's double and single blocks with the activation quantization fused into what precedes it.

ComfyUI's block code normalizes, modulates, activates and concatenates in BF16 kernels of its own and
then hands each quantized Linear a BF16 tensor, which it reads again to quantize. Here, through
``patches_replace["dit"]`` (the hook ComfyUI offers for replacing a block), the same math runs with
the quantized Linears fed by the fused kernels of ``kernels.act_quant_fused``:

- LayerNorm + adaLN modulation + INT8 quantization in one pass (qkv, fc1, linear1 inputs);
- for the single blocks, GELU + the concatenation with the attention output + quantization (linear2's
  input): no cat, no GELU tensor (the double blocks' fc2 keeps ComfyUI's GELU, faster there on the H100:
  ``benchmarks/results/act_fused_h100.json``);
- the gated residual adds in place (``x += gate * y`` as one ``addcmul_``);
- the QK RMSNorm and RoPE in one kernel (``kernels.qk_norm_rope``) written straight into the joint
  (text + video) q and k: no norm outputs, no cat, no rotated copies.

Everything else is ComfyUI's own: the modulation Linears, the attention function (so the
sparse-attention override and any attention backend still apply), the patches ``attn1_patch`` (which
see q and k between norm and RoPE: with any, the norm and RoPE are ComfyUI's own calls) and
``attn1_output_patch``. A block the fusion does not cover (a Linear left in BF16, a
different MLP, per-token modulation dims) runs ComfyUI's forward unchanged. So does a call where one of
the modules whose forward the fused path replaces (the quantized Linears it hands pre-quantized
activations, the norms and GELU folded into its kernels) has an injected forward or hooks (ComfyUI's
bypass LoRA, ``load_bypass_lora_for_models``, replaces the Linear's forward) or a per-call weight patch
(a low-VRAM LoRA on a QK norm): the fused path would skip them. The log says so once per reason and model
(the ``Notes`` the Wan fusion keeps too).
"""

from __future__ import annotations

import torch

from .. import kernels
from .fused_wan import Notes, _hooked, _unpatched
from .ops import QuantSparseLinear


def _fusable(*layers) -> bool:
    return all(isinstance(m, QuantSparseLinear) and m.takes_int8_input for m in layers)


def _gelu_tanh(module) -> bool:
    return isinstance(module, torch.nn.GELU) and module.approximate == "tanh"


def _ln_mod_linear(layer, x, mod, norm):
    """layer(LayerNorm(x) * (1 + mod.scale) + mod.shift) for x [B, L, C], mod tensors [B, 1, C]."""
    b, n, c = x.shape
    smooth, qmax, rotate = layer.activation_prologue(x.device)
    x_q, x_s = kernels.act_quant_ln_mod(x.reshape(b * n, c), mod.shift[:, 0], mod.scale[:, 0], smooth, qmax, rotate,
                                        rows_per_batch=n, eps=norm.eps)
    return layer.forward_prequantized(x_q, x_s, x.dtype).reshape(b, n, -1)


def _gelu_cat_linear(layer, a, h):
    """layer([a | gelu_tanh(h)]) for a [B, L, Ka] (Ka may be 0) and h [B, L, Kh] (a strided view is fine)."""
    b, n = h.shape[:2]
    smooth, qmax, rotate = layer.activation_prologue(h.device)
    a2 = a.reshape(b * n, a.shape[-1]) if a is not None else h.new_empty(b * n, 0)
    x_q, x_s = kernels.act_quant_gelu_cat(a2, h.reshape(b * n, h.shape[-1]), smooth, qmax, rotate)
    return layer.forward_prequantized(x_q, x_s, h.dtype).reshape(b, n, -1)


def _bypassed(block, names) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of the modules in ``block`` whose forward the fused path replaces (those that exist)."""
    out = []
    for name in names:
        try:
            out.append((name, block.get_submodule(name)))
        except AttributeError:
            continue
    return out


def _skip_reason(prefix: str, modules) -> str:
    """Why the fused forward must not run this call ("" when it may): a module whose forward or weights it
    would bypass has an injected forward or hooks (a bypass LoRA) or a per-call weight patch."""
    for name, m in modules:
        if _hooked(m):
            return f"{prefix}.{name} has an injected forward or hooks (e.g. a bypass LoRA)"
        if not isinstance(m, QuantSparseLinear) and not _unpatched(m):
            return f"{prefix}.{name} has a per-call weight patch (e.g. a LoRA in low-VRAM mode)"
    return ""


def _split_heads(qkv, heads):
    return qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)


def _norm_eps(norm):
    # torch.nn.functional.rms_norm with eps None uses float32's epsilon (its math is float32).
    return norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps


def _norm_rope_into(out, x, norm, freqs):
    """RMSNorm (``norm``'s weight and eps) + RoPE of ``x`` into ``out`` (one kernel, no intermediate)."""
    w = norm.weight.to(device=x.device, dtype=x.dtype) if norm.weight is not None else None
    return kernels.qk_norm_rope(x, w, _norm_eps(norm), freqs, out=out)


def _can_fuse_rope(pe, transformer_options) -> bool:
    """attn1 patches see q and k between the norm and RoPE: with any, keep ComfyUI's order of calls."""
    return pe is not None and pe.dtype == torch.float32 and pe.dim() == 6 and \
        not transformer_options.get("patches", {}).get("attn1_patch")


def _attention_prerotated(q, k, v, attn_mask, transformer_options, extra_options):
    """flux's ``attention`` without its RoPE (already applied), then the attn1 output patches."""
    import comfy.ldm.flux.math as flux_math

    attn = flux_math.optimized_attention(q, k, v, q.shape[1], skip_reshape=True, mask=attn_mask,
                                         transformer_options=transformer_options)
    for p in transformer_options.get("patches", {}).get("attn1_output_patch", []):
        attn = p(attn, extra_options)
    return attn


def _patched_attention(q, k, v, pe, attn_mask, transformer_options, extra_options):
    """ComfyUI's attention call of a flux-style block, with its attn1 patches."""
    from comfy.ldm.flux.math import attention

    patches = transformer_options.get("patches", {})
    for p in patches.get("attn1_patch", []):
        out = p(q, k, v, pe=pe, attn_mask=attn_mask, extra_options=extra_options)
        q, k, v, pe, attn_mask = (out.get("q", q), out.get("k", k), out.get("v", v), out.get("pe", pe),
                                  out.get("attn_mask", attn_mask))
    attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)
    for p in patches.get("attn1_output_patch", []):
        attn = p(attn, extra_options)
    return attn


class FusedDoubleBlock:
    """The ``patches_replace["dit"][("double_block", i)]`` entry of one DoubleStreamBlock."""

    # The modules whose forward the fused path replaces: the Linears fed pre-quantized activations, the
    # LayerNorms folded into their activation kernels, the QK norms folded into the norm + RoPE kernel.
    DIRECT = ("img_attn.qkv", "txt_attn.qkv", "img_mlp.0", "txt_mlp.0", "img_norm1", "txt_norm1", "img_norm2",
              "txt_norm2", "img_attn.norm", "img_attn.norm.query_norm", "img_attn.norm.key_norm", "txt_attn.norm",
              "txt_attn.norm.query_norm", "txt_attn.norm.key_norm")

    def __init__(self, block, index: int = 0, notes: Notes | None = None):
        self.block = block
        self.index = index
        self.notes = notes if notes is not None else Notes()
        self.direct = _bypassed(block, self.DIRECT)

    @staticmethod
    def supports(block) -> bool:
        mlp_ok = all(isinstance(m, torch.nn.Sequential) and len(m) == 3 and _gelu_tanh(m[1])
                     for m in (block.img_mlp, block.txt_mlp))
        return bool(getattr(block, "modulation", False)) and mlp_ok and _fusable(
            block.img_attn.qkv, block.img_attn.proj, block.txt_attn.qkv, block.txt_attn.proj,
            block.img_mlp[0], block.img_mlp[2], block.txt_mlp[0], block.txt_mlp[2])

    def __call__(self, args, extra):
        if args.get("modulation_dims_img") is not None or args.get("modulation_dims_txt") is not None:
            return extra["original_block"](args)
        why = _skip_reason(f"double_blocks.{self.index}", self.direct)
        if why:
            self.notes.once(f"{why}: ComfyUI's block forward runs")
            return extra["original_block"](args)
        self.notes.fused += 1
        blk = self.block
        # The patch embedding hands img as a transposed view: made contiguous once here, the in-place
        # residual adds keep it so for the blocks after.
        img, txt = args["img"].contiguous(), args["txt"].contiguous()
        vec, to = args["vec"], args["transformer_options"]
        img_mod1, img_mod2 = blk.img_mod(vec)
        txt_mod1, txt_mod2 = blk.txt_mod(vec)
        img_q, img_k, img_v = _split_heads(_ln_mod_linear(blk.img_attn.qkv, img, img_mod1, blk.img_norm1),
                                           blk.num_heads)
        txt_q, txt_k, txt_v = _split_heads(_ln_mod_linear(blk.txt_attn.qkv, txt, txt_mod1, blk.txt_norm1),
                                           blk.num_heads)
        n_txt, pe = txt.shape[1], args["pe"]
        extra_options = to.copy()
        extra_options["img_slice"] = [n_txt, n_txt + img.shape[1]]
        if _can_fuse_rope(pe, to):
            # Norm + RoPE of each stream straight into the joint q / k buffers: no cat, no rotated copies.
            q, k = (img_q.new_empty(img_q.shape[0], img_q.shape[1], n_txt + img_q.shape[2], img_q.shape[3])
                    for _ in range(2))
            for out, x, norm in ((q, txt_q, blk.txt_attn.norm.query_norm), (k, txt_k, blk.txt_attn.norm.key_norm)):
                _norm_rope_into(out[:, :, :n_txt], x, norm, pe[:, :, :n_txt])
            for out, x, norm in ((q, img_q, blk.img_attn.norm.query_norm), (k, img_k, blk.img_attn.norm.key_norm)):
                _norm_rope_into(out[:, :, n_txt:], x, norm, pe[:, :, n_txt:])
            v = torch.cat((txt_v, img_v), dim=2)
            del img_q, img_k, img_v, txt_q, txt_k, txt_v
            attn = _attention_prerotated(q, k, v, args["attention_mask"], to, extra_options)
        else:
            img_q, img_k = blk.img_attn.norm(img_q, img_k, img_v)
            txt_q, txt_k = blk.txt_attn.norm(txt_q, txt_k, txt_v)
            q, k, v = (torch.cat(pair, dim=2) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
            del img_q, img_k, img_v, txt_q, txt_k, txt_v
            attn = _patched_attention(q, k, v, pe, args["attention_mask"], to, extra_options)
        del q, k, v
        txt_attn, img_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]
        for x, x_attn, lay, mod1, mod2, mlp, norm2 in (
                (img, img_attn, blk.img_attn, img_mod1, img_mod2, blk.img_mlp, blk.img_norm2),
                (txt, txt_attn, blk.txt_attn, txt_mod1, txt_mod2, blk.txt_mlp, blk.txt_norm2)):
            x.addcmul_(lay.proj(x_attn), mod1.gate)
            # fc2's input stays ComfyUI's GELU + the TMA activation kernel: GELU fused into the pointer
            # kernel was slower at 12,288 channels (1.47 against 0.95 ms, act_fused_h100.json).
            x.addcmul_(mlp[2](mlp[1](_ln_mod_linear(mlp[0], x, mod2, norm2))), mod2.gate)
        if txt.dtype == torch.float16:
            txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
        return {"img": img, "txt": txt}


class FusedSingleBlock:
    """The ``patches_replace["dit"][("single_block", i)]`` entry of one SingleStreamBlock."""

    # linear1 and linear2 fed pre-quantized activations, pre_norm and the GELU folded into their activation
    # kernels, the QK norms folded into the norm + RoPE kernel.
    DIRECT = ("linear1", "linear2", "pre_norm", "mlp_act", "norm", "norm.query_norm", "norm.key_norm")

    def __init__(self, block, index: int = 0, notes: Notes | None = None):
        self.block = block
        self.index = index
        self.notes = notes if notes is not None else Notes()
        self.direct = _bypassed(block, self.DIRECT)

    @staticmethod
    def supports(block) -> bool:
        return (getattr(block, "modulation", None) is not None and not getattr(block, "yak_mlp", False)
                and _gelu_tanh(block.mlp_act) and block.mlp_hidden_dim_first == block.mlp_hidden_dim
                and _fusable(block.linear1, block.linear2))

    def __call__(self, args, extra):
        if args.get("modulation_dims") is not None:
            return extra["original_block"](args)
        why = _skip_reason(f"single_blocks.{self.index}", self.direct)
        if why:
            self.notes.once(f"{why}: ComfyUI's block forward runs")
            return extra["original_block"](args)
        self.notes.fused += 1
        blk = self.block
        x, to = args["img"].contiguous(), args["transformer_options"]
        mod, _ = blk.modulation(args["vec"])
        qkv, mlp = torch.split(_ln_mod_linear(blk.linear1, x, mod, blk.pre_norm),
                               [3 * blk.hidden_size, blk.mlp_hidden_dim_first], dim=-1)
        q, k, v = _split_heads(qkv, blk.num_heads)
        if _can_fuse_rope(args["pe"], to):
            q = _norm_rope_into(None, q, blk.norm.query_norm, args["pe"])
            k = _norm_rope_into(None, k, blk.norm.key_norm, args["pe"])
            attn = _attention_prerotated(q, k, v, args["attention_mask"], to, to.copy())
        else:
            q, k = blk.norm(q, k, v)
            attn = _patched_attention(q, k, v, args["pe"], args["attention_mask"], to, to.copy())
        del q, k, v, qkv
        x.addcmul_(_gelu_cat_linear(blk.linear2, attn, mlp), mod.gate)
        if x.dtype == torch.float16:
            x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
        return {"img": x}


def fused_block_patches(diffusion_model) -> dict:
    """``{("double_block", i) | ("single_block", i): fused forward}`` for every block of a HunyuanVideo-style
    model that the fusion covers (empty for a model without flux-style blocks); the entries of one model share
    one ``Notes`` (calls fused, calls that ran ComfyUI's forward and why, each reason logged once)."""
    out = {}
    notes = Notes()
    for name, cls, kind in (("double_blocks", FusedDoubleBlock, "double_block"),
                            ("single_blocks", FusedSingleBlock, "single_block")):
        for i, block in enumerate(getattr(diffusion_model, name, None) or []):
            if cls.supports(block):
                out[(kind, i)] = cls(block, i, notes)
    return out


def install_fused_blocks(patcher) -> int:
    """Registers the fused forwards on a ModelPatcher (``patches_replace["dit"]``); returns how many blocks
    they cover."""
    patches = fused_block_patches(getattr(patcher.model, "diffusion_model", None))
    for (kind, i), fn in patches.items():
        patcher.set_model_patch_replace(fn, "dit", kind, i)
    return len(patches)
