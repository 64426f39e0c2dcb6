"""Wan through the Load QuantSparse Model path, ComfyUI's own model code driven in this process.

Where a test runs the model as ComfyUI would, it loads it as ComfyUI's samplers do
(``comfy.model_management.load_models_gpu``: to ``get_torch_device()``, the GPU where there is one, in the
dtype ComfyUI picks there, FP16 for Wan on recent NVIDIA GPUs; the CPU in float32 here) and feeds it inputs
on that device, so a bypass LoRA's weights and the quantized kernels are where ComfyUI puts them. A test that
checks a kernel against ComfyUI's math runs the kernel on ``kernel_device`` (CUDA on a GPU, the Triton
interpreter on this CPU). The block-level comparisons run on the CPU in float32 / BF16 / FP16 (the eager
references of the kernels, whose roundings the bounds below describe) and, on a GPU, again with the model
loaded there (the Triton kernels).

Every Wan variant users run, at tiny dims (``WanDims.tiny``: two blocks of 256 channels, two heads of
128, text width 4096): T2V, Wan 2.1 I2V with the CLIP image branch (36 input channels, 257 CLIP tokens
in the cross-attention), a Wan 2.2 A14B expert (36 input channels, no CLIP) and TI2V-5B (48 channels,
per-frame timesteps from a denoise mask: the per-token modulation path).

Accuracy bounds (measured on torch 2.13 CPU, ComfyUI 0.29.0, where ComfyUI holds the model in float32; on a GPU,
where it holds Wan in FP16, the 16-bit bounds apply):

- against ComfyUI's stock model built from the same checkpoint's weights dequantized (each quantized
  Linear's ``effective_weight``): the weights are then the same, so what is left is the round-to-nearest
  INT8 rounding of the activations of the W4A8 Linears; measured 2.4e-3 (T2V) to 3.1e-3 (I2V) relative L2
  on the output, fused or not. The HunyuanVideo conversion test (tests/test_hunyuan_quantize.py) measured
  1.2e-2 for W8A8 block Linears, whose error is 8-bit weight *and* 8-bit activation rounding: activation
  rounding alone must stay under that, so the bound is 1e-2 (3x the largest measurement);
- fused forward against ComfyUI's block forward on the same quantized layers: the same INT8 codes but
  where ComfyUI's two float32 roundings (after the norm, after the modulation) and the kernel's one land on
  either side of a rounding boundary, which flips a code (with ComfyUI's roundings put in front of the same
  quantization the two agree to 1e-7: test_fused_block_matches_comfyuis_block_forward). Measured on the
  model output 1e-7 to 1.1e-3, bound 5e-3 (HunyuanVideo's fused-block bound in float32,
  tests/comfyui/test_comfyui_inprocess.py); per block, where one flipped code in 64 tokens weighs more,
  up to 3.8e-3, bound 1e-2; in BF16, where ComfyUI rounds to BF16 after each elementwise step, 1.0e-2 per
  block, bound 3e-2 (HunyuanVideo's BF16 bound), which FP16 (ComfyUI's Wan dtype on recent NVIDIA GPUs)
  also keeps.
"""

from __future__ import annotations

import contextlib
import logging
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.comfyui

VARIANTS = ("t2v", "i2v", "a14b", "ti2v")
GRID = (2, 4, 8)  # token grid after the (1, 2, 2) patch: 64 video tokens, 4 query blocks of 16
LATENT = (GRID[0], GRID[1] * 2, GRID[2] * 2)
TEXT_TOKENS = 12
CLIP_TOKENS = 257
DEQUANTIZED_BOUND = 1e-2
FUSED_BOUND = 5e-3
FUSED_BLOCK_BOUND = 1e-2
FUSED_BF16_BOUND = 3e-2


@dataclass(frozen=True)
class WanFiles:
    name: str
    dims: object
    bf16: Path
    w4a8: Path


@pytest.fixture(scope="module")
def qs(comfy_inprocess):
    from comfyui_quantsparse.nodes import fused_wan, model, ops, patcher, sparse_patch

    return types.SimpleNamespace(model=model, ops=ops, patcher=patcher, fused_wan=fused_wan, sparse_patch=sparse_patch)


@pytest.fixture(scope="module")
def wan_files(comfy_inprocess, tmp_path_factory) -> dict[str, WanFiles]:
    from safetensors.torch import save_file

    from comfyui_quantsparse.quantsparse.checkpoint.convert import convert_file
    from comfyui_quantsparse.quantsparse.core.config import QuantSparseConfig
    from comfyui_quantsparse.quantsparse.models import registry
    from comfyui_quantsparse.quantsparse.models.wan.dims import WanDims

    d = tmp_path_factory.mktemp("qs_wan")
    dims = {"t2v": WanDims.tiny(), "i2v": WanDims.tiny("i2v", in_dim=36), "a14b": WanDims.tiny(in_dim=36),
            "ti2v": WanDims.tiny(in_dim=48, out_dim=48)}
    out = {}
    for i, (name, dm) in enumerate(dims.items()):
        f = WanFiles(name, dm, d / f"wan_{name}_bf16.safetensors", d / f"wan_{name}_w4a8.safetensors")
        save_file(registry.by_name("wan").random_state_dict(dm, seed=i), str(f.bf16))
        convert_file(f.bf16, f.w4a8, QuantSparseConfig(bits="w4a8"))
        out[name] = f
    return out


def model_inputs(name: str, seed: int = 1, batch: int = 1):
    """(x, sigma, apply_model kwargs) as ComfyUI's samplers hand them to BaseModel.apply_model."""
    g = torch.Generator().manual_seed(seed)
    ch = 48 if name == "ti2v" else 16
    x = torch.randn(batch, ch, *LATENT, generator=g)
    kw = {"c_crossattn": torch.randn(batch, TEXT_TOKENS, 4096, generator=g)}
    if name in ("i2v", "a14b"):
        kw["c_concat"] = torch.randn(batch, 20, *LATENT, generator=g)  # 4 mask + 16 image-latent channels
    if name == "i2v":
        kw["clip_fea"] = torch.randn(batch, CLIP_TOKENS, 1280, generator=g)
    if name == "ti2v":
        mask = torch.ones(batch, 1, *LATENT)
        mask[:, :, 0] = 0  # the first latent frame is the clean image: its own timestep (per-token modulation)
        kw["denoise_mask"] = mask
    return x, torch.full((batch,), 0.7), kw


def apply(patcher, name, fused: bool, seed: int = 1, batch: int = 1, options=None, device="cpu") -> torch.Tensor:
    """BaseModel.apply_model on inputs made on the CPU and moved to ``device`` (where the model is loaded: see
    ``loaded``); the output as float32 on the CPU."""
    x, t, kw = model_inputs(name, seed, batch)
    to = dict(options or {})
    if fused:
        to["patches_replace"] = {"dit": patcher.model_options["transformer_options"]["patches_replace"]["dit"]}
    with torch.no_grad():
        out = patcher.model.apply_model(x.to(device), t.to(device), transformer_options=to,
                                        **{k: v.to(device) for k, v in kw.items()})
    return out.float().cpu()


@contextlib.contextmanager
def loaded(patcher):
    """``patcher`` loaded as ComfyUI's samplers load a model (``model_management.load_models_gpu``: its weights on
    the load device, the GPU where there is one; injections such as a bypass LoRA applied, their weights moved to
    that device); yields the device, unloads everything afterwards."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    try:
        assert patcher.load_device == comfy.model_management.get_torch_device()
        yield patcher.load_device
    finally:
        comfy.model_management.unload_all_models()


def fused_bound(patcher) -> float:
    """The model-output bound of the fused forward against ComfyUI's blocks in the dtype ComfyUI holds the model in
    (float32 on the CPU; FP16 / BF16 on a GPU, where ComfyUI rounds after each elementwise step)."""
    return FUSED_BOUND if patcher.model_dtype() == torch.float32 else FUSED_BF16_BOUND


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def notes_of(patcher):
    patches = patcher.model_options["transformer_options"]["patches_replace"]["dit"]
    return next(iter(patches.values())).notes


# ---------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", VARIANTS)
def test_loader_builds_comfyuis_wan_with_our_layers(qs, wan_files, name):
    import comfy.ldm.wan.model
    import comfy.model_base
    import comfy.model_management
    import comfy.supported_models
    from comfyui_quantsparse import kernels
    from comfyui_quantsparse.quantsparse.checkpoint.format import validate_checkpoint

    f = wan_files[name]
    info = validate_checkpoint(f.w4a8)
    p, summary = qs.model.load_quantsparse_model(str(f.w4a8))
    assert isinstance(p, qs.patcher.QuantSparseModelPatcher)
    want_base, want_config = {"t2v": ("WAN21", "WAN21_T2V"), "i2v": ("WAN21", "WAN21_I2V"),
                              "a14b": ("WAN21", "WAN21_T2V"), "ti2v": ("WAN22", "WAN22_T2V")}[name]
    assert type(p.model) is getattr(comfy.model_base, want_base)
    assert type(p.model.model_config) is getattr(comfy.supported_models, want_config)
    dm = p.model.diffusion_model
    assert type(dm) is comfy.ldm.wan.model.WanModel
    assert (dm.dim, dm.in_dim, dm.out_dim, dm.num_heads, len(dm.blocks), dm.model_type) == (
        f.dims.dim, f.dims.in_dim, f.dims.out_dim, f.dims.num_heads, f.dims.num_layers, f.dims.model_type)

    quantized = qs.ops.quantized_modules(p.model)
    assert {n.removeprefix("diffusion_model.") for n in quantized} == set(info.layers)
    kinds = {n.removeprefix("diffusion_model."): m.quant_kind for n, m in quantized.items()}
    weight_only = {n for n, k in kinds.items() if k == "w4a16"}
    expected_weight_only = {"time_projection.1"} | {
        f"blocks.{i}.cross_attn.{lin}" for i in range(f.dims.num_layers)
        for lin in (("k", "v", "k_img", "v_img") if name == "i2v" else ("k", "v"))}
    assert weight_only == expected_weight_only
    assert all(kinds[f"blocks.{i}.{lin}"] == "w4a8" for i in range(f.dims.num_layers) for lin in (
        "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o", "ffn.0", "ffn.2"))
    for dense in ("head.head", "text_embedding.0", "time_embedding.0") + (("img_emb.proj.1",) if name == "i2v" else ()):
        layer = p.model.diffusion_model.get_submodule(dense)
        assert getattr(layer, "quant_kind", None) is None and layer.weight.shape == (layer.out_features,
                                                                                   layer.in_features)

    # The size summary: the quantized Linears against BF16 (4-bit codes + scales, smoothing, BF16 bias), the
    # model against itself unquantized in ComfyUI's dtype (float32 on the CPU, FP16 on a recent NVIDIA GPU).
    assert summary.model_bytes == p.model_size()
    assert summary.quantized_layers == len(info.layers) and summary.kinds == {"w4a8": 16, "w4a16": len(weight_only)}
    assert 3.5 < summary.quantized_bf16_bytes / summary.quantized_bytes < 4.0
    assert summary.dense_bytes > summary.model_bytes
    assert summary.dtype == str(p.model_dtype()).removeprefix("torch.")
    text = summary.text()
    assert "quantized Linears" in text and "x smaller" in text and "fused in 2 of 2 blocks" in text, text
    # Where ComfyUI runs the model (its load device) and what the quantized Linears run there: the Triton kernels
    # on a GPU, the eager references on the CPU (the interpreter is for tests, not users).
    device = comfy.model_management.get_torch_device()
    assert p.load_device == device and summary.device == str(device)
    assert f"stay {summary.dtype} as ComfyUI holds them on {device})" in text, text
    if device.type == "cuda" and kernels.HAS_TRITON:
        assert (f"kernels on {device}: w4a16: the Triton weight-only INT4 GEMM; w4a8: Triton INT8 activation "
                "quantization + integer GEMM") in text, text
    else:
        assert f"kernels on {device}: w4a16, w4a8: the eager PyTorch references" in text, text

    patches = p.model_options["transformer_options"]["patches_replace"]["dit"]
    assert sorted(patches) == [("double_block", i) for i in range(len(dm.blocks))]
    assert all(isinstance(fn, qs.fused_wan.FusedWanBlock) for fn in patches.values())
    with loaded(p) as device:
        out = apply(p, name, fused=True, device=device)
    assert out.shape == (1, f.dims.out_dim, *LATENT) and torch.isfinite(out).all() and out.std() > 0
    assert notes_of(p).fused == len(dm.blocks) and not notes_of(p).fallbacks


def dequantized_state_dict(path) -> dict[str, torch.Tensor]:
    """The checkpoint with every quantized Linear replaced by the weight its kernels multiply by, in the
    original basis (rotation and smoothing undone), float32; every other tensor as stored."""
    from comfyui_quantsparse.quantsparse.checkpoint.format import load_checkpoint
    from comfyui_quantsparse.quantsparse.core.quantizer import QuantizedWeight, effective_weight

    sd, info = load_checkpoint(path)
    for name, spec in info.layers.items():
        qw = QuantizedWeight(spec.kind, sd.pop(f"{name}.weight"), sd.pop(f"{name}.weight_scale"),
                             sd.pop(f"{name}.smooth", None), spec.group_size, spec.rotate)
        sd[f"{name}.weight"] = effective_weight(qw).float()
    return sd


@pytest.mark.parametrize("name", VARIANTS)
def test_matches_comfyuis_model_on_the_dequantized_weights(qs, wan_files, name):
    """Our model (fused and ComfyUI's block forward) against ComfyUI's own stock Wan, loaded by ComfyUI from
    the dequantized weights: only the INT8 rounding of the W4A8 Linears' activations differs."""
    import comfy.sd
    import comfy.utils

    f = wan_files[name]
    p, _ = qs.model.load_quantsparse_model(str(f.w4a8))
    ref = comfy.sd.load_diffusion_model_state_dict(dequantized_state_dict(f.w4a8), disable_dynamic=True)
    original = comfy.sd.load_diffusion_model_state_dict(comfy.utils.load_torch_file(str(f.bf16)), disable_dynamic=True)
    assert type(ref.model) is type(p.model) and not qs.ops.quantized_modules(ref.model)
    assert ref.model_dtype() == p.model_dtype()
    want = apply(ref, name, fused=False)
    fused, plain = apply(p, name, fused=True), apply(p, name, fused=False)
    assert notes_of(p).fused == len(p.model.diffusion_model.blocks) and not notes_of(p).fallbacks
    errors = {"fused": rel(fused, want), "comfyui_blocks": rel(plain, want)}
    assert all(1e-5 < e < DEQUANTIZED_BOUND for e in errors.values()), errors
    assert rel(fused, plain) < FUSED_BOUND
    # The weights' own round-to-nearest error, for scale: far above the activations' (random Gaussian weights
    # are a hard case for 4-bit, about 5% here).
    assert rel(want, apply(original, name, fused=False)) > 5 * errors["fused"]


# ---------------------------------------------------------------------------------------------- the fused block


def block_wrap_for(block, context_img_len):
    """forward_orig's ``block_wrap``: ComfyUI's block, closing over ``context_img_len`` as forward_orig's does."""

    def block_wrap(args):
        return {"img": block(args["img"], context=args["txt"], e=args["vec"], freqs=args["pe"],
                             context_img_len=context_img_len, transformer_options=args["transformer_options"])}

    return block_wrap


def block_case(dm, name, batch, dtype, vec_dims, seed=0, device="cpu"):
    """Inputs of one block as forward_orig makes them: x [B, L, C], e0, the RoPE table, the embedded context (made
    on the CPU, then moved to ``device``)."""
    g = torch.Generator().manual_seed(seed)
    c, n = dm.dim, GRID[0] * GRID[1] * GRID[2]
    x = torch.randn(batch, n, c, generator=g).to(dtype)
    frames = GRID[0] if name == "ti2v" else 1
    e0 = (torch.randn(batch, frames, 6, c, generator=g) * 0.5).to(dtype)
    if vec_dims == 3:
        e0 = e0[:, 0]
    freqs = dm.rope_encode(*LATENT, device=x.device, dtype=dtype)
    clip = CLIP_TOKENS if name == "i2v" else 0
    context = torch.randn(batch, clip + TEXT_TOKENS, c, generator=g).to(dtype)
    x, e0, freqs, context = (t.to(device) for t in (x, e0, freqs, context))
    return x, e0, freqs, context, (clip if name == "i2v" else None)


def comfy_rounding_ln_mod(x, shift, scale, smooth=None, qmax=127, rotate=True, *, rows_per_batch, eps=1e-6):
    """kernels.act_quant_ln_mod with ComfyUI's op order and roundings (``addcmul(shift, norm1(x), 1 + scale)``;
    for cross_attn.q, whose rows are norm3's affine LayerNorm, ``layer_norm(x, weight = 1 + scale, bias = shift)``)
    before the same activation quantization: the fused block with it must equal ComfyUI's block exactly."""
    from comfyui_quantsparse import kernels

    c = x.shape[1]
    if shift.shape[0] == 1 and rows_per_batch == x.shape[0]:  # norm3: shift = bias, scale = weight - 1
        y = torch.nn.functional.layer_norm(x, (c,), (1 + scale[0]).to(x.dtype), shift[0].to(x.dtype), eps)
    else:
        rep = lambda t: t.to(x.dtype).repeat_interleave(rows_per_batch, 0)  # noqa: E731  (repeat_e)
        y = torch.addcmul(rep(shift), torch.nn.functional.layer_norm(x, (c,), eps=eps), 1 + rep(scale))
    return kernels.act_quant(y, smooth, qmax, rotate)


def comfy_norm_rope(x, weight, eps, freqs, heads, out=None):
    """kernels.wan_qk_norm_rope as ComfyUI's WanSelfAttention computes it (its RMSNorm's ``rms_norm`` over the full
    width, the view, ``apply_rope1``). On the CPU the kernel's eager reference is this bit for bit
    (test_norm_rope_kernel_matches_comfyuis_norm_and_apply_rope1); on a GPU the Triton kernel sums the squares in
    another order than torch's CUDA rms_norm, and a difference in the last float32 place can flip an INT8 code of
    the next quantized Linear (o), so the exact comparison puts ComfyUI's own calls in its place there."""
    import comfy.ldm.flux.math

    b, n, c = x.shape
    y = torch.nn.functional.rms_norm(x, (c,), weight.to(x.dtype), eps)
    y = comfy.ldm.flux.math.apply_rope1(y.view(b, n, heads, c // heads), freqs).view(b, n, c)
    return y if out is None else out.copy_(y)


@pytest.mark.parametrize("where", ["cpu", pytest.param("load_device", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name,batch,dtype,vec_dims", [
    ("t2v", 2, torch.float32, 4), ("t2v", 1, torch.float32, 3), ("i2v", 2, torch.float32, 4),
    ("ti2v", 2, torch.float32, 4), ("t2v", 2, torch.bfloat16, 4), ("i2v", 1, torch.bfloat16, 4),
    ("ti2v", 1, torch.bfloat16, 4), ("t2v", 1, torch.float16, 4), ("ti2v", 2, torch.float16, 4)])
def test_fused_block_matches_comfyuis_block_forward(qs, wan_files, monkeypatch, name, batch, dtype, vec_dims, where):
    """Each block's fused forward against ComfyUI's WanAttentionBlock.forward on the same quantized layers:
    T2V, I2V with CLIP tokens, TI2V's per-frame modulation rows; e0 as [B, T, 6, C] (what forward_orig makes)
    and [B, 6, C]; float32, BF16 and FP16 (ComfyUI runs Wan in FP16 on NVIDIA GPUs of compute capability 8 and
    up: WAN21_T2V lists it first among its inference dtypes). The three QKV GEMMs share one activation quantization. In float32, with
    the LayerNorm + modulation rounded as ComfyUI rounds it before the same quantization, the fused block is
    ComfyUI's block to float32 precision: everything else (modulation rows, gates, the norm + RoPE kernel, the
    cross-attention, the FFN, the residuals) is ComfyUI's math. ``where``: the CPU (the kernels' eager references,
    the model as loaded, not moved), or, on a GPU, the model loaded there as ComfyUI loads it (the Triton kernels;
    ComfyUI's own block too runs there, so both sides see the GPU's float math; the exact float32 comparison puts
    ComfyUI's norm + RoPE calls in place of the Triton one there, ``comfy_norm_rope``)."""
    from comfyui_quantsparse import kernels

    calls = {"act_quant_ln_mod": 0, "wan_qk_norm_rope": 0, "act_quant": 0}
    for fn in calls:
        real = getattr(kernels, fn)
        monkeypatch.setattr(kernels, fn, (lambda real, fn: lambda *a, **k: calls.__setitem__(fn, calls[fn] + 1)
                                          or real(*a, **k))(real, fn))
    spied_ln_mod, spied_norm_rope = kernels.act_quant_ln_mod, kernels.wan_qk_norm_rope
    p, _ = qs.model.load_quantsparse_model(str(wan_files[name].w4a8))
    dm = p.model.diffusion_model
    patches = p.model_options["transformer_options"]["patches_replace"]["dit"]
    errors = []
    with (loaded(p) if where == "load_device" else contextlib.nullcontext("cpu")) as device:
        for i, block in enumerate(dm.blocks):
            x, e0, freqs, context, clip = block_case(dm, name, batch, dtype, vec_dims, seed=i, device=device)
            args = {"txt": context, "vec": e0, "pe": freqs, "transformer_options": {}}
            extra = {"original_block": block_wrap_for(block, clip)}
            with torch.no_grad():
                want = block(x.clone(), e=e0, freqs=freqs, context=context, context_img_len=clip,
                             transformer_options={})
                for k in calls:
                    calls[k] = 0
                fused = patches[("double_block", i)]({"img": x.clone(), **args}, extra)["img"]
                # one LayerNorm+modulation+quantization for q/k/v, one for cross_attn.q, one for ffn.0; the
                # norm+RoPE kernel for q and k; the plain activation kernel only for o, cross_attn.o and ffn.2
                assert calls == {"act_quant_ln_mod": 3, "wan_qk_norm_rope": 2, "act_quant": 3}, calls
                if dtype == torch.float32:
                    monkeypatch.setattr(kernels, "act_quant_ln_mod", comfy_rounding_ln_mod)
                    if device != "cpu":  # the Triton norm + RoPE is not bitwise torch's CUDA kernels: see above
                        monkeypatch.setattr(kernels, "wan_qk_norm_rope", comfy_norm_rope)
                    same_codes = patches[("double_block", i)]({"img": x.clone(), **args}, extra)["img"]
                    monkeypatch.setattr(kernels, "act_quant_ln_mod", spied_ln_mod)
                    monkeypatch.setattr(kernels, "wan_qk_norm_rope", spied_norm_rope)
                    assert rel(same_codes, want) < 1e-6, rel(same_codes, want)
            assert fused.dtype == want.dtype == dtype and fused.shape == want.shape
            assert fused.device == want.device == torch.device(device)
            errors.append(rel(fused, want))
    assert max(errors) < (FUSED_BLOCK_BOUND if dtype == torch.float32 else FUSED_BF16_BOUND), errors
    assert not notes_of(p).fallbacks


def test_uneven_frames_fall_back_to_comfyuis_block_and_say_so(qs, wan_files, caplog):
    """Per-token modulation whose rows do not divide the tokens (repeat_e's uneven case) runs ComfyUI's block."""
    p, _ = qs.model.load_quantsparse_model(str(wan_files["ti2v"].w4a8))
    dm = p.model.diffusion_model
    block = dm.blocks[0]
    x, _, freqs, context, _ = block_case(dm, "ti2v", 1, torch.float32, 4)
    e0 = torch.randn(1, 3, 6, dm.dim, generator=torch.Generator().manual_seed(3)) * 0.5  # 3 rows for 64 tokens
    fn = p.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)]
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="quantsparse"):
        want = block(x.clone(), e=e0, freqs=freqs, context=context, transformer_options={})
        got = fn({"img": x.clone(), "txt": context, "vec": e0, "pe": freqs, "transformer_options": {}},
                 {"original_block": block_wrap_for(block, None)})["img"]
    assert torch.equal(got, want)
    assert notes_of(p).fused == 0 and sum(notes_of(p).fallbacks.values()) == 1
    assert "64 tokens for 3 modulation rows" in caplog.text and "ComfyUI's block forward runs" in caplog.text


def test_norm_rope_kernel_matches_comfyuis_norm_and_apply_rope1(qs, wan_files, kernel_device):
    """kernels.wan_qk_norm_rope against the real self_attn.norm_q module and comfy.ldm.flux.math.apply_rope1 on
    WanModel.rope_encode's table, computed by ComfyUI on the CPU: the eager reference bit for bit, the Triton
    kernel on ``kernel_device`` (the GPU, or the interpreter on this CPU) in float32, FP16 and BF16 to within the
    last place or two of its output dtype (float32: its sums run in another order; FP16 as before; BF16, whose last
    place is 8x FP16's, twice FP16's bound: the norm's rounding to BF16 can land either side of a boundary)."""
    import comfy.ldm.flux.math
    import comfy.ops
    from comfyui_quantsparse.kernels.wan_qk_norm_rope import wan_qk_norm_rope_reference, wan_qk_norm_rope_triton

    p, _ = qs.model.load_quantsparse_model(str(wan_files["t2v"].w4a8))
    dm = p.model.diffusion_model
    sa = dm.blocks[0].self_attn
    heads, c = sa.num_heads, dm.dim
    n = GRID[0] * GRID[1] * GRID[2]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        norm = comfy.ops.manual_cast.RMSNorm(c, eps=sa.norm_q.eps, elementwise_affine=True, dtype=dtype)
        norm.weight = torch.nn.Parameter(sa.norm_q.weight.detach().to(dtype), requires_grad=False)
        q = (torch.randn(2, n, c, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
        freqs = dm.rope_encode(*LATENT, device=q.device, dtype=dtype)
        with torch.no_grad():
            want = comfy.ldm.flux.math.apply_rope1(norm(q).view(2, n, heads, c // heads), freqs).view(2, n, c)
        got = wan_qk_norm_rope_reference(q, norm.weight.to(dtype), norm.eps, freqs, heads)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        dev = torch.device(kernel_device)
        kernel = wan_qk_norm_rope_triton(q.to(dev), norm.weight.to(dev), norm.eps, freqs.to(dev), heads)
        assert kernel.device.type == dev.type and kernel.dtype == dtype
        tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(kernel.cpu().float(), want.float(), rtol=tol, atol=2 * tol)


# ---------------------------------------------------------------------------------------------- paths


def test_weight_only_layers_run_the_weight_only_gemm(qs, wan_files, monkeypatch, caplog, kernel_device):
    """Cross-attention k / v (and the CLIP k_img / v_img) and the time projection go to kernels.w4a16_gemm with
    their BF16 / float inputs; with the Triton kernels selected that is the weight-only Triton GEMM, never a
    dequantized copy: on a GPU by default, on this CPU when forced (the interpreter). Without them the log says,
    once per kind and device."""
    from comfyui_quantsparse import kernels

    monkeypatch.setattr(qs.ops, "_ROUTES_LOGGED", set())
    seen, triton_calls = [], []
    real, real_triton = kernels.w4a16_gemm, kernels.w4a16_gemm_triton
    monkeypatch.setattr(kernels, "w4a16_gemm", lambda x, *a, **k: seen.append(tuple(x.shape)) or real(x, *a, **k))
    monkeypatch.setattr(kernels, "w4a16_gemm_triton", lambda *a, **k: triton_calls.append(1) or real_triton(*a, **k))
    p, _ = qs.model.load_quantsparse_model(str(wan_files["i2v"].w4a8))
    with loaded(p) as device, caplog.at_level(logging.INFO, logger="quantsparse"):
        apply(p, "i2v", fused=True, device=device)
        apply(p, "i2v", fused=True, device=device)
    blocks = len(p.model.diffusion_model.blocks)
    c = p.model.diffusion_model.dim
    per_call = [(1, c)] + [(TEXT_TOKENS, c)] * 2 * blocks + [(CLIP_TOKENS, c)] * 2 * blocks
    assert sorted(seen) == sorted(per_call * 2)
    logged = [r.getMessage() for r in caplog.records if "run the eager PyTorch references" in r.getMessage()]
    if device.type == "cuda" and kernels.HAS_TRITON:  # the fast path, every call: nothing to say
        assert len(triton_calls) == len(seen) and not logged, logged
    else:  # the CPU without forcing: the references, said once per kind
        assert not triton_calls
        assert len(logged) == 2 and {m.split()[1] for m in logged} == {"w4a8", "w4a16"}, logged
        assert all(f" on {device} run " in m for m in logged), logged

    # Forced Triton against the forced reference on the same layer, where the kernel runs (the layer's tensors
    # follow the input there, as in low-VRAM mode).
    dev = torch.device(kernel_device)
    ca = p.model.diffusion_model.blocks[0].cross_attn
    context = torch.randn(1, TEXT_TOKENS, c, generator=torch.Generator().manual_seed(4)).to(torch.float16).to(dev)
    monkeypatch.setenv("QUANTSPARSE_KERNELS", "triton")
    triton_calls.clear()
    interpreted = " (interpreted on the CPU)" if dev.type == "cpu" else ""
    assert qs.ops.kernel_route("w4a16", dev) == (True, "the Triton weight-only INT4 GEMM" + interpreted)
    with torch.no_grad():
        fast = ca.k(context)
    monkeypatch.setenv("QUANTSPARSE_KERNELS", "reference")
    with torch.no_grad():
        slow = ca.k(context)
    assert triton_calls == [1]
    assert fast.device.type == slow.device.type == dev.type
    torch.testing.assert_close(fast.float().cpu(), slow.float().cpu(), rtol=1e-2, atol=1e-2)
    fast_route, what = qs.ops.kernel_route("w4a16", dev)
    assert not fast_route and "QUANTSPARSE_KERNELS=reference" in what and "dequantized at every call" in what


def test_fused_switch_off(qs, wan_files, monkeypatch):
    monkeypatch.setenv("QUANTSPARSE_FUSED", "0")
    p, summary = qs.model.load_quantsparse_model(str(wan_files["t2v"].w4a8))
    assert not p.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit")
    assert "QUANTSPARSE_FUSED=0" in summary.text()


def test_lowvram_streaming_matches_full_load_with_the_fused_forward(qs, wan_files):
    import comfy.model_management

    p, _ = qs.model.load_quantsparse_model(str(wan_files["i2v"].w4a8))
    device = comfy.model_management.get_torch_device()
    p.load(device, full_load=True)
    try:
        full = apply(p, "i2v", fused=True, device=device)
    finally:
        p.detach()
    p.load(device, lowvram_model_memory=64 * 1024, full_load=False)
    try:
        assert p.model.model_lowvram
        if device.type != "cpu":  # the streamed layers stay on the host and come to the GPU per call
            assert any(m.weight.device.type == "cpu" for m in qs.ops.quantized_modules(p.model).values())
        low = apply(p, "i2v", fused=True, device=device)
    finally:
        p.detach()
    assert notes_of(p).fused == 2 * len(p.model.diffusion_model.blocks) and not notes_of(p).fallbacks
    torch.testing.assert_close(low, full, rtol=0, atol=0)


def _lora(prefix, out_features, in_features, seed, rank=4):
    g = torch.Generator().manual_seed(seed)
    return {f"diffusion_model.{prefix}.lora_up.weight": torch.randn(out_features, rank, generator=g) * 0.5,
            f"diffusion_model.{prefix}.lora_down.weight": torch.randn(rank, in_features, generator=g) * 0.5,
            f"diffusion_model.{prefix}.alpha": torch.tensor(float(rank))}


def test_bypass_lora_on_self_attention_q_runs_comfyuis_block(qs, wan_files, caplog):
    """ComfyUI's bypass LoRA replaces the layer's forward; the fused block would skip it by calling the GEMM
    directly, so that block runs ComfyUI's forward (logged) and the LoRA applies; the other block stays fused.
    Each model is loaded as ComfyUI's samplers load it (load_models_gpu), which injects the bypass adapter with
    its weights on the load device, where the activations are."""
    import comfy.sd

    p, _ = qs.model.load_quantsparse_model(str(wan_files["t2v"].w4a8))
    c = p.model.diffusion_model.dim
    bypassed, _ = comfy.sd.load_bypass_lora_for_models(p, None, _lora("blocks.0.self_attn.q", c, c, 5), 1.0, 0.0)
    with loaded(p) as device:
        base = apply(p, "t2v", fused=True, device=device)
    q = p.model.diffusion_model.blocks[0].self_attn.q
    with loaded(bypassed) as device:
        assert qs.fused_wan._hooked(q)  # the adapter is in
        with caplog.at_level(logging.WARNING, logger="quantsparse"):
            fused = apply(bypassed, "t2v", fused=True, device=device)
        plain = apply(bypassed, "t2v", fused=False, device=device)
        # Only block 0's fused entry installed: it falls back to ComfyUI's block, so the model is ComfyUI's own
        # forward throughout, bit for bit.
        only_0 = {("double_block", 0): bypassed.model_options["transformer_options"]["patches_replace"]["dit"][
            ("double_block", 0)]}
        alone = apply(bypassed, "t2v", fused=False, device=device, options={"patches_replace": {"dit": only_0}})
    # Unloading ejected the adapter (ComfyUI assigns the saved bound forward back): without the LoRA the model runs
    # fused in both blocks again, as before.
    assert not qs.fused_wan._hooked(q)
    with loaded(p) as device:
        base_again = apply(p, "t2v", fused=True, device=device)
    torch.testing.assert_close(base_again, base, rtol=0, atol=0)
    assert rel(fused, base) > 1e-2  # the LoRA changed the output
    assert rel(fused, plain) < fused_bound(p)
    assert torch.equal(alone, plain)
    assert "blocks.0.self_attn.q has an injected forward or hooks" in caplog.text
    notes = notes_of(bypassed)
    assert notes is notes_of(p) and sum(notes.fallbacks.values()) == 2  # block 0 in the fused run and alone
    assert notes.fused == 2 + 1 + 2  # base: both blocks; with the LoRA: block 1; base again: both


# ---------------------------------------------------------------------------------------------- sparse attention


@pytest.mark.parametrize("name", ["t2v", "i2v"])
def test_sparse_patch_on_the_fused_forward(qs, wan_files, name):
    """The QuantSparse Attention patch over the fused blocks, under ComfyUI's own sampler: every
    self-attention call goes to the sparse path (refresh or sparse steps), every cross-attention call (text,
    and CLIP for I2V) is left dense as cross-attention, and the fused forward ran every block."""
    import comfy.sample
    from comfyui_quantsparse.quantsparse.sparse.config import SparseConfig

    p, _ = qs.model.load_quantsparse_model(str(wan_files[name].w4a8))
    config = SparseConfig(density=0.5, mask_mode="topk", dense_warmup=0.0, refresh_interval=2, rank=4, ssar_order=1,
                          block_q=16, block_k=16)
    patched, patch = qs.sparse_patch.apply_sparse_patch(p, config)
    assert patched.model_options["transformer_options"]["patches_replace"]["dit"]  # the clone keeps the fused blocks
    g = torch.Generator().manual_seed(0)
    cond = {}
    if name == "i2v":
        cond["clip_vision_output"] = types.SimpleNamespace(
            penultimate_hidden_states=torch.randn(1, CLIP_TOKENS, 1280, generator=g))
    positive = [[torch.randn(1, TEXT_TOKENS, 4096, generator=g), dict(cond)]]
    negative = [[torch.randn(1, TEXT_TOKENS, 4096, generator=g), dict(cond)]]
    latent = torch.zeros(1, 16, *LATENT)
    noise = torch.randn(latent.shape, generator=g)
    steps = 3
    with torch.no_grad():
        out = comfy.sample.sample(patched, noise, steps, 2.0, "euler", "simple", positive, negative, latent,
                                  denoise=1.0, seed=0)
    assert torch.isfinite(out).all()
    s = patch.last_summary
    blocks = len(p.model.diffusion_model.blocks)
    self_calls = s["attention_calls"].get("refresh", 0) + s["attention_calls"].get("sparse", 0)
    assert s["sparse_steps"] >= 1 and s["attention_calls"].get("sparse", 0) > 0, s
    model_calls = self_calls // blocks
    assert self_calls == model_calls * blocks and model_calls >= steps
    assert s["dense_reasons"] == {"cross-attention": self_calls * (2 if name == "i2v" else 1)}, s
    notes = notes_of(patched)
    assert notes.fused == model_calls * blocks and not notes.fallbacks


def test_a_wan_variant_with_extra_blocks_is_not_taken_for_wan_by_the_sparse_patch(comfy_inprocess):
    """A VACE model (ComfyUI's VaceWanModel: extra vace blocks called with the main blocks' block_index) has Wan's
    keys plus its own; the patch must not run it as Wan, whose cached residuals are keyed by block index."""
    from comfyui_quantsparse.nodes.sparse_patch import model_adapter
    from comfyui_quantsparse.quantsparse.models import registry

    wan = registry.by_name("wan")

    def patcher_of(extra: dict):  # what model_adapter reads of a MODEL: its diffusion model's state dict
        sd = {**wan.build_model(wan.tiny_dims(), device="meta").state_dict(),
              **{k: torch.empty(shape, device="meta") for k, shape in extra.items()}}
        return types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=types.SimpleNamespace(
            state_dict=lambda: sd)))

    adapter, why = model_adapter(patcher_of({}))
    assert adapter is wan and why == ""
    adapter, why = model_adapter(patcher_of({"vace_patch_embedding.weight": (256, 96, 1, 2, 2)}))
    assert adapter is None
    assert "Wan VACE" in why and "does not support yet" in why and "runs dense" in why, why
