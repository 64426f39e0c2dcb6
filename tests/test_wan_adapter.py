"""The Wan 2.1 / 2.2 family on the CPU, without ComfyUI (``tests/test_wan_vs_comfyui.py`` compares with it).

What the rest of the pack relies on: every released Wan file is detected as its variant (with or without
ComfyUI's prefixes) and the Wan models QuantSparse cannot run are refused by name; the torch model holds
exactly the tensors of the adapter's table; which Linears are W4A8, weight-only or BF16; a tiny Wan
converts by ``quantsparse convert``, validates and loads back to the same tensors (and dequantized, gives
the model's output up to quantization error); the byte counts of the full models; and what the sparse
patch decides for each kind of attention call ComfyUI's Wan makes.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from safetensors.torch import save_file

from comfyui_quantsparse.quantsparse.checkpoint.convert import ConvertError, convert_file, quantize_rows
from comfyui_quantsparse.quantsparse.checkpoint.format import (
    METADATA_KEY, CheckpointMeta, checkpoint_plan, load_checkpoint, quantized_layers, quantized_weight,
    validate_checkpoint,
)
from comfyui_quantsparse.quantsparse.core.config import QuantSparseConfig
from comfyui_quantsparse.quantsparse.core.quantizer import effective_weight
from comfyui_quantsparse.quantsparse.core.safetensors_io import encode_header, layout, read_header
from comfyui_quantsparse.quantsparse.models import registry
from comfyui_quantsparse.quantsparse.models.wan.adapter import WanAdapter
from comfyui_quantsparse.quantsparse.models.wan.blocks import CROSS, CROSS_IMG, SELF, sdpa_attention
from comfyui_quantsparse.quantsparse.models.wan.dims import (
    OTHER_VARIANTS, WanDims, dims_from_state_dict, reference_state_shapes,
)
from comfyui_quantsparse.quantsparse.models.wan.model import WanModel, model_state_shapes
from comfyui_quantsparse.quantsparse.models.wan.rope import rope_axes, rope_freqs

ADAPTER = WanAdapter()
RELEASED = {
    "t2v_1_3b": (WanDims.t2v_1_3b(), "Wan T2V 1.3B"),
    "t2v_14b": (WanDims.t2v_14b(), "Wan T2V 14B (2.1, or a 2.2 A14B expert)"),
    "i2v_14b": (WanDims.i2v_14b(), "Wan 2.1 I2V 14B"),
    "i2v_a14b": (WanDims.i2v_a14b(), "Wan 2.2 I2V A14B expert"),
    "ti2v_5b": (WanDims.ti2v_5b(), "Wan 2.2 TI2V 5B"),
}
FLF2V = dataclasses.replace(WanDims.i2v_14b(), flf_tokens=514)
TINY_T2V = WanDims.tiny()
TINY_I2V = WanDims.tiny("i2v", in_dim=36)
TINY_TI2V = WanDims.tiny("t2v", in_dim=48, out_dim=48)


def _shapes(dims) -> dict[str, tuple[int, ...]]:
    return dict(reference_state_shapes(dims))


# ---------------------------------------------------------------------------- detection

@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."], ids=["bare", "model.dm", "dm"])
@pytest.mark.parametrize("name", list(RELEASED))
def test_released_variants_are_detected(name, prefix):
    dims, variant = RELEASED[name]
    file_shapes = {prefix + k: v for k, v in _shapes(dims).items()}
    found_prefix, stripped = registry.split_prefix(file_shapes)
    assert found_prefix == prefix
    adapter = registry.detect(stripped)
    assert isinstance(adapter, WanAdapter)
    assert adapter.dims_from_shapes(stripped) == dims
    assert adapter.variant(dims) == variant
    assert registry.describe(file_shapes) == f"a {variant} model"
    assert WanDims.from_dict(dims.to_dict()) == dims  # what checkpoint metadata stores


@pytest.mark.parametrize("data, message", [
    ({"dim": 256}, r"Wan dimension metadata lacks the fields \['ffn_dim', 'num_heads', 'num_layers', 'in_dim', 'out_dim'\]"),
    ({**WanDims.tiny().to_dict(), "depth": 3}, r"unknown Wan dimension fields \['depth'\]"),
    ([256], "Wan dimension metadata must be a JSON object, got list"),
])
def test_damaged_dims_metadata_is_a_value_error_naming_the_fields(data, message):
    with pytest.raises(ValueError, match=message):
        WanDims.from_dict(data)


def test_first_last_frame_model_is_detected():
    assert dims_from_state_dict(_shapes(FLF2V)) == FLF2V
    assert ADAPTER.variant(FLF2V) == "Wan 2.1 FLF2V 14B"


def test_hunyuan_video_is_not_taken_for_wan():
    from comfyui_quantsparse.quantsparse.models.hunyuan_video.dims import HunyuanVideoDims
    from comfyui_quantsparse.quantsparse.models.hunyuan_video.model import reference_state_shapes as hv_shapes

    assert not ADAPTER.claims(hv_shapes(HunyuanVideoDims.tiny()))
    assert registry.detect(_shapes(TINY_T2V)).name == "wan"


# Each other Wan model ComfyUI builds, by the key its detection finds it by, and the name the refusal gives.
OTHER = {
    "vace_patch_embedding.weight": ((256, 96, 1, 2, 2), "Wan VACE"),
    "control_adapter.conv.weight": ((256, 1536, 2, 2), "Wan camera control"),
    "casual_audio_encoder.encoder.final_linear.weight": ((256, 1024), "Wan S2V"),
    "audio_proj.audio_proj_glob_1.layer.bias": ((256,), "Wan HuMo"),
    "face_adapter.fuser_blocks.0.k_norm.weight": ((128,), "Wan Animate"),
    "patch_embedding_mask.weight": ((256, 4, 1, 2, 2), "Wan SCAIL"),
    "patch_embedding_pose.weight": ((256, 16, 1, 2, 2), "Wan SCAIL"),
    "patch_embedding_global.weight": ((256, 16, 1, 2, 2), "WanDancer"),
    "ref_conv.weight": ((256, 16, 2, 2), "ref_conv"),
}


def test_every_refused_key_is_listed():
    assert set(OTHER) == set(OTHER_VARIANTS)


@pytest.mark.parametrize("key", list(OTHER))
def test_other_wan_models_are_refused_by_name(key, tmp_path):
    shape, name = OTHER[key]
    shapes = {**_shapes(TINY_T2V), key: shape}
    with pytest.raises(ValueError, match=re.escape(name)) as e:
        dims_from_state_dict(shapes)
    assert key in str(e.value) and "does not support" in str(e.value)
    # the converter refuses the file with the same words, from its header, writing nothing
    sd = {k: torch.zeros(s, dtype=torch.bfloat16) for k, s in shapes.items()}
    src = tmp_path / "other.safetensors"
    save_file(sd, src)
    with pytest.raises(ConvertError, match=re.escape(name)):
        convert_file(src, tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.safetensors"]


def test_a_text_width_comfyui_cannot_build_is_refused():
    shapes = _shapes(TINY_T2V)
    shapes["text_embedding.0.weight"] = (256, 64)
    with pytest.raises(ValueError, match="4096"):
        dims_from_state_dict(shapes)


# ---------------------------------------------------------------------------- the torch model's tensor table

@pytest.mark.parametrize("dims", [d for d, _ in RELEASED.values()] + [FLF2V, TINY_T2V, TINY_I2V, TINY_TI2V],
                         ids=list(RELEASED) + ["flf2v_14b", "tiny_t2v", "tiny_i2v", "tiny_ti2v"])
def test_model_holds_exactly_the_adapter_table(dims):
    """The adapter's table (what the converter, the checkpoint format and the loader use) is the torch model's
    ``state_dict``: same names, shapes and order."""
    assert list(model_state_shapes(dims).items()) == list(ADAPTER.reference_shapes(dims).items())
    model = ADAPTER.build_model(dims, dtype=torch.bfloat16, device="meta")
    assert isinstance(model, WanModel)
    assert model.patch_embedding.weight.dtype == torch.float32  # ComfyUI runs the patch embedding in float32
    assert model.blocks[0].ffn[0].weight.dtype == torch.bfloat16


# ---------------------------------------------------------------------------- layer kinds

def _kind_table(dims, config):
    """{prefix: kind} of every 2-D Linear weight, "bf16" for those the config leaves alone."""
    layers = quantized_layers(dims, config)
    out = {}
    for name, shape in reference_state_shapes(dims).items():
        if name.endswith(".weight") and len(shape) == 2:
            prefix = name[: -len(".weight")]
            out[prefix] = layers[prefix].kind if prefix in layers else "bf16"
    assert set(layers) <= set(out)  # only Linears are quantized
    return out


def _expected_kinds(dims, scheme):
    table = {p: "bf16" for p in ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
                                 "head.head")}
    table["time_projection.1"] = "w4a16"
    if dims.model_type == "i2v":
        table.update({"img_emb.proj.1": "bf16", "img_emb.proj.3": "bf16"})
    for i in range(dims.num_layers):
        for lin in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o",
                    "ffn.0", "ffn.2"):
            table[f"blocks.{i}.{lin}"] = scheme
        for lin in ("cross_attn.k", "cross_attn.v") + (("cross_attn.k_img", "cross_attn.v_img")
                                                       if dims.model_type == "i2v" else ()):
            table[f"blocks.{i}.{lin}"] = "w4a16"
    return table


@pytest.mark.parametrize("scheme", ["w4a8", "w8a8"])
@pytest.mark.parametrize("name", list(RELEASED) + ["flf2v_14b"])
def test_layer_kinds(name, scheme):
    """Video-token Linears (self-attention q/k/v/o, cross-attention q/o, FFN) take the scheme; those that see
    only the text / CLIP tokens (cross-attention k, v, k_img, v_img) or one vector per sample (the time
    projection) are weight-only 4-bit; embedders, the head and the CLIP projection stay BF16."""
    dims = FLF2V if name == "flf2v_14b" else RELEASED[name][0]
    table = _kind_table(dims, QuantSparseConfig(bits=scheme))
    assert table == _expected_kinds(dims, scheme)
    counts = {k: sum(1 for v in table.values() if v == k) for k in set(table.values())}
    per_block_wo = 4 if dims.model_type == "i2v" else 2
    assert counts[scheme] == 8 * dims.num_layers
    assert counts["w4a16"] == per_block_wo * dims.num_layers + 1


def test_non_linear_tensors_stay_bf16():
    plan = {s.name: s for s in checkpoint_plan(TINY_I2V, QuantSparseConfig())}
    for name in ("patch_embedding.weight", "blocks.0.modulation", "head.modulation", "blocks.0.norm3.weight",
                 "blocks.0.self_attn.norm_q.weight", "blocks.0.cross_attn.norm_k_img.weight", "img_emb.proj.0.weight",
                 "blocks.0.ffn.0.bias", "time_projection.1.bias"):
        assert plan[name].dtype == torch.bfloat16, name


# ---------------------------------------------------------------------------- convert, validate, load

@pytest.fixture(scope="module", params=["t2v", "i2v"])
def converted(request, tmp_path_factory):
    dims = TINY_T2V if request.param == "t2v" else TINY_I2V
    sd = ADAPTER.random_state_dict(dims, seed=3)
    folder = tmp_path_factory.mktemp(f"wan_{request.param}")
    src = folder / "wan_tiny_bf16.safetensors"
    save_file(sd, src)
    dst = folder / "wan_tiny_w4a8.safetensors"
    result = convert_file(src, dst)
    return dims, sd, src, dst, result


def test_converted_wan_validates(converted):
    dims, _, _, dst, result = converted
    info = validate_checkpoint(dst)
    assert info.dims == dims and result.dims == dims
    assert info.adapter.name == "wan"
    assert info.layers == quantized_layers(dims, QuantSparseConfig())
    # the file is exactly the plan: every tensor of checkpoint_plan, nothing else, and not one byte more
    plan = checkpoint_plan(dims, QuantSparseConfig())
    header = read_header(dst)
    assert {n: (e.dtype, e.shape) for n, e in header.tensors.items()} == {s.name: (s.dtype, s.shape) for s in plan}
    assert header.data_bytes == sum(s.nbytes for s in plan)
    # and the header is the one the plan and the metadata give: the file size is known before converting
    metadata = {METADATA_KEY: CheckpointMeta(dims, QuantSparseConfig()).to_json()}
    assert header.metadata == metadata
    assert header.file_size == len(encode_header(layout(plan), metadata)) + sum(s.nbytes for s in plan)
    assert dst.stat().st_size == header.file_size


def test_a_damaged_wan_checkpoint_is_refused_with_a_message(converted, tmp_path):
    from safetensors import safe_open

    from comfyui_quantsparse.quantsparse.checkpoint.format import CheckpointError
    from comfyui_quantsparse.quantsparse.core.safetensors_io import write_safetensors

    _, _, _, dst, _ = converted
    with safe_open(str(dst), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    del tensors["blocks.0.ffn.0.bias"]
    bad = tmp_path / "bad.safetensors"
    write_safetensors(bad, tensors, meta)
    with pytest.raises(CheckpointError, match="blocks.0.ffn.0.bias"):
        validate_checkpoint(bad)


def test_converted_wan_round_trips(converted):
    dims, sd, _, dst, _ = converted
    state, info = load_checkpoint(dst)
    assert set(state) == {s.name for s in checkpoint_plan(dims, info.config)}
    for prefix, layer in info.layers.items():
        ref = quantize_rows(sd[f"{prefix}.weight"], layer)
        got = quantized_weight(state, prefix, layer)
        assert torch.equal(got.weight, ref.weight) and torch.equal(got.scale, ref.scale), prefix
        assert (got.smooth is None) == (ref.smooth is None) and (got.smooth is None or torch.equal(got.smooth,
                                                                                                  ref.smooth))
        assert torch.equal(state[f"{prefix}.bias"], sd[f"{prefix}.bias"])
    quantized = {f"{p}.{s}" for p in info.layers for s in ("weight", "weight_scale", "smooth")}
    for name, t in state.items():
        if name not in quantized:
            assert t.dtype == torch.bfloat16 and torch.equal(t, sd[name]), name


def _dequantized_state(state, info, dtype=torch.float32):
    """The checkpoint as a plain state dict: each quantized Linear's weight mapped back to the original basis."""
    out = {}
    for name, t in state.items():
        prefix = name.rsplit(".", 1)[0]
        if prefix in info.layers:
            if name.endswith(".weight"):
                out[name] = effective_weight(quantized_weight(state, prefix, info.layers[prefix])).to(dtype)
            elif name.endswith(".bias"):
                out[name] = t.to(dtype)
            continue
        out[name] = t.to(dtype)
    return out


def test_converted_wan_runs_like_the_source(converted):
    """Loaded into the torch model, the dequantized checkpoint gives the source model's output up to 4-bit
    rounding of the weights (measured 0.093 relative for T2V, 0.114 for I2V: random Gaussian weights, per-channel
    scales); a layer stored under a wrong name or transposed would be of order 1."""
    dims, sd, _, dst, _ = converted
    state, info = load_checkpoint(dst)
    ref_model = WanModel(dims, dtype=torch.float32)
    ref_model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    q_model = WanModel(dims, dtype=torch.float32)
    q_model.load_state_dict(_dequantized_state(state, info), strict=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, dims.in_dim, 3, 6, 8, generator=g)
    ctx = torch.randn(1, 9, dims.text_dim, generator=g)
    clip = torch.randn(1, 257, 1280, generator=g) if dims.model_type == "i2v" else None
    t = torch.tensor([600.0])
    with torch.no_grad():
        ref, got = ref_model(x, t, ctx, clip), q_model(x, t, ctx, clip)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 1e-3 < rel < 0.25


# ---------------------------------------------------------------------------- sizes of the full models

EXPERT_BUDGET = 8.2e9
TWO_EXPERTS_BUDGET = 20e9
# Activations kept free beside two resident experts: the largest BF16 tensors live at one 14B block's FFN
# for the official Wan 2.2 14B template's 640x640x81 video (33,600 tokens): its input, the normalised
# input, the FFN hidden state and its GELU, L * (2 * 5120 + 2 * 13824) * 2 bytes = 2.55 GB; rounded up
# to 4 GB for the text context, RoPE, the attention workspace and the allocator's slack.
TEMPLATE_TOKENS = 21 * 40 * 40
ACTIVATION_ALLOWANCE = 4.0e9


def _file_bytes(dims, bits="w4a8") -> tuple[int, int]:
    """(data bytes, file bytes) of the checkpoint convert writes: the plan, behind the header of the plan and the
    metadata (exact: test_converted_wan_validates checks this sum against converted files)."""
    config = QuantSparseConfig(bits=bits)
    plan = checkpoint_plan(dims, config)
    data = sum(s.nbytes for s in plan)
    header = encode_header(layout(plan), {METADATA_KEY: CheckpointMeta(dims, config).to_json()})
    return data, len(header) + data


def test_a14b_expert_sizes():
    """Each Wan 2.2 A14B expert at W4A8 is at most 8.2 GB, and both experts leave room for activations in 20 GB
    (T2V expert 7,282,562,488 bytes, I2V expert 7,283,381,688 bytes with this version's header)."""
    (t2v_data, t2v), (i2v_data, i2v) = _file_bytes(WanDims.t2v_14b()), _file_bytes(WanDims.i2v_a14b())
    assert t2v_data == 7_282_329_728 and i2v_data == 7_283_148_928  # shapes only: fixed
    assert 0 < t2v - t2v_data < 1_000_000 and 0 < i2v - i2v_data < 1_000_000  # the header (layer table JSON)
    for expert in (t2v, i2v):
        assert expert <= EXPERT_BUDGET
    ffn_peak = TEMPLATE_TOKENS * (2 * 5120 + 2 * 13824) * 2
    assert ffn_peak < ACTIVATION_ALLOWANCE
    assert 2 * max(t2v, i2v) <= TWO_EXPERTS_BUDGET - ACTIVATION_ALLOWANCE  # 14.57 GB <= 16 GB
    # against the BF16 pair users download (2 x 28.6 GB)
    assert 2 * sum(math.prod(s) for s in reference_state_shapes(WanDims.t2v_14b()).values()) * 2 > 3.9 * 2 * t2v


def test_bf16_sizes_match_the_released_files():
    """The BF16 tables give the sizes of the files users download (models.md 1.3 / 1.6), to the GB digit."""
    bf16 = {name: sum(math.prod(s) for s in reference_state_shapes(d).values()) * 2 for name, (d, _) in
            RELEASED.items()}
    assert round(bf16["t2v_1_3b"] / 1e9, 2) == 2.84
    assert round(bf16["t2v_14b"] / 1e9, 1) == 28.6
    assert round(bf16["i2v_14b"] / 1e9, 1) == 32.8
    assert round(bf16["i2v_a14b"] / 1e9, 1) == 28.6


# ---------------------------------------------------------------------------- the torch model

def _inputs(dims, shape=(1, None, 3, 6, 8), timestep=(600.0,), clip=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape[0], dims.in_dim, *shape[2:], generator=g)
    ctx = torch.randn(shape[0], 7, dims.text_dim, generator=g)
    clip_fea = torch.randn(shape[0], 257, 1280, generator=g) if clip else None
    return x, torch.tensor([list(timestep)] if isinstance(timestep[0], list) else list(timestep)), ctx, clip_fea


def _model(dims, dtype=torch.float32):
    m = WanModel(dims, dtype=dtype)
    m.load_state_dict(ADAPTER.random_state_dict(dims, 0, dtype), strict=True)
    return m


def test_split_forward_equals_forward_and_blocks_are_pure():
    m = _model(TINY_I2V)
    x, t, ctx, clip = _inputs(TINY_I2V, clip=True)
    with torch.no_grad():
        full = m(x, t, ctx, clip)
        inp = m.prepare(x, t, ctx, clip)
        h = inp.x
        for block in m.blocks:
            before = [a.clone() for a in (h, inp.e0, inp.context)]
            out = block(h, inp.e0, inp.freqs, inp.context, inp.context_img_len)
            assert all(torch.equal(a, b) for a, b in zip(before, (h, inp.e0, inp.context)))
            h = out
        assert torch.equal(m.head(h, inp), full)
    assert inp.grid == (3, 3, 4) and inp.img_len == 36 and inp.context_img_len == 257
    assert inp.context.shape == (1, 257 + 7, TINY_I2V.dim)
    assert inp.e0.shape == (1, 1, 6, TINY_I2V.dim) and inp.freqs.shape == (1, 36, 1, 64, 2, 2)


def test_attention_function_sees_every_call():
    """Self-attention then (CLIP image, then text) cross-attention per block, q/k/v [B, H, L, 128]."""
    m = _model(TINY_I2V)
    x, t, ctx, clip = _inputs(TINY_I2V, clip=True)
    calls = []

    def spy(q, k, v, *, mask=None, block_type="", block_index=0):
        calls.append((block_type, block_index, tuple(q.shape), tuple(k.shape), mask))
        return sdpa_attention(q, k, v, mask=mask, block_type=block_type, block_index=block_index)

    with torch.no_grad():
        assert torch.equal(m(x, t, ctx, clip, attention=spy), m(x, t, ctx, clip))
    h = TINY_I2V.num_heads
    assert calls == [c for i in range(TINY_I2V.num_layers) for c in (
        (SELF, i, (1, h, 36, 128), (1, h, 36, 128), None),
        (CROSS_IMG, i, (1, h, 36, 128), (1, h, 257, 128), None),
        (CROSS, i, (1, h, 36, 128), (1, h, 7, 128), None))]


def test_per_frame_timesteps_modulate_each_frame():
    """TI2V-5B: one timestep per latent frame; changing one frame's timestep changes that frame's modulation
    only, so the time projection is per token (frames' tokens share their frame's entry)."""
    m = _model(TINY_TI2V)
    x, _, ctx, _ = _inputs(TINY_TI2V)
    with torch.no_grad():
        a = m.prepare(x, torch.tensor([[0.0, 800.0, 800.0]]), ctx)
        b = m.prepare(x, torch.tensor([[0.0, 800.0, 500.0]]), ctx)
        same = m.prepare(x, torch.tensor([800.0]), ctx)
        per_frame = m.prepare(x, torch.tensor([[800.0, 800.0, 800.0]]), ctx)
    assert a.e0.shape == (1, 3, 6, TINY_TI2V.dim) and a.e.shape == (1, 3, TINY_TI2V.dim)
    assert torch.equal(a.e0[:, :2], b.e0[:, :2]) and not torch.equal(a.e0[:, 2], b.e0[:, 2])
    torch.testing.assert_close(per_frame.e0, same.e0.expand(-1, 3, -1, -1), rtol=1e-5, atol=1e-6)  # GEMM rows
    with torch.no_grad():
        out_same, out_frames = m(x, torch.tensor([800.0]), ctx), m(x, torch.tensor([[800.0, 800.0, 800.0]]), ctx)
    torch.testing.assert_close(out_frames, out_same, rtol=1e-5, atol=1e-5)


def test_odd_latent_sizes_are_padded_and_cut_back():
    m = _model(TINY_T2V)
    x, t, ctx, _ = _inputs(TINY_T2V, shape=(1, None, 3, 9, 7))
    with torch.no_grad():
        inp = m.prepare(x, t, ctx)
        out = m(x, t, ctx)
    assert inp.grid == (3, 5, 4) and inp.size == (3, 9, 7) and out.shape == (1, 16, 3, 9, 7)
    # the padding repeats the first rows / columns (circular), as ComfyUI's pad_to_patch_size
    padded = torch.nn.functional.pad(x, (0, 1, 0, 1, 0, 0), mode="circular")
    assert torch.equal(padded[..., 9, :7], x[..., 0, :]) and torch.equal(padded[..., :9, 7], x[..., :, 0])


def test_rope_is_comfyui_embednd():
    """[44, 42, 42] split of the head dimension; token (t, h, w)'s rotation on each axis is its position times
    theta ** (-2i / axis_dim), in float64."""
    assert rope_axes(128) == (44, 42, 42)
    freqs = rope_freqs((3, 5, 6), (1, 2, 2), 128, dtype=torch.float32)  # grid 3 x 3 x 3
    assert freqs.shape == (1, 27, 1, 64, 2, 2) and freqs.dtype == torch.float32
    token = 1 * 9 + 2 * 3 + 1  # (t, h, w) = (1, 2, 1)
    for axis, (pos, start, dim) in enumerate(((1, 0, 44), (2, 22, 42), (1, 43, 42))):
        i = 5
        angle = pos * 10000.0 ** (-(2 * i) / dim)
        rot = freqs[0, token, 0, start + i].double()
        expect = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        torch.testing.assert_close(rot, expect.double(), rtol=0, atol=1e-7)


def test_inputs_are_checked():
    m = _model(TINY_T2V)
    x, t, ctx, _ = _inputs(TINY_T2V)
    with pytest.raises(ValueError, match=r"latent must be \[B, 16"):
        m(x[:, :8], t, ctx)
    with pytest.raises(ValueError, match="context must be"):
        m(x, t, ctx[..., :64])
    with pytest.raises(ValueError, match="timestep must be"):
        m(x, torch.tensor([1.0, 2.0]), ctx)


# ---------------------------------------------------------------------------- attention-call decisions

GRID = (3, 4, 6)
HEADS = 2


def _call(grid=GRID):
    return {"grid": grid, "img_len": math.prod(grid)}


def _self_call(n=math.prod(GRID), head_dim=128, heads=HEADS, grid=GRID, b=2):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n, heads * head_dim, generator=g) for _ in range(3))
    options = {"grid_sizes": torch.Size(grid), "block_type": "double", "block_index": 0}
    return (q, k, v), {"heads": heads, "transformer_options": options}, options


def test_self_attention_runs_sparse_without_text():
    args, kwargs, options = _self_call()
    d = ADAPTER.attention_call(args, kwargs, options, _call())
    assert d.sparse and d.reason == "" and d.txt_len == 0 and d.grid == GRID and d.heads == HEADS
    b, n = args[0].shape[:2]
    for got, src in zip((d.q, d.k, d.v), args):
        assert got.shape == (b, HEADS, n, 128)
        assert got.data_ptr() == src.data_ptr() and got._base is src  # a view: no copy
        assert torch.equal(got, src.reshape(b, n, HEADS, 128).transpose(1, 2))
    out = torch.randn(b, HEADS, n, 128)
    assert torch.equal(d.output(out), out.transpose(1, 2).reshape(b, n, HEADS * 128))


def test_the_grid_comes_from_transformer_options():
    """ComfyUI's Wan writes grid_sizes into the very dict the call gets; that grid wins over the wrapper's."""
    args, kwargs, options = _self_call()
    d = ADAPTER.attention_call(args, kwargs, options, _call(grid=(3, 6, 4)))
    assert d.sparse and d.grid == GRID


def test_heads_as_a_positional_argument():
    (q, k, v), kwargs, options = _self_call()
    d = ADAPTER.attention_call((q, k, v, HEADS), {"transformer_options": options}, options, _call())
    assert d.sparse and d.heads == HEADS


def test_cross_attention_to_text_is_dense():
    (q, _, _), kwargs, options = _self_call()
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 512, HEADS * 128, generator=g), torch.randn(2, 512, HEADS * 128, generator=g)
    assert ADAPTER.attention_call((q, k, v), kwargs, options, _call()) == ADAPTER.attention_call(
        (q, k[:, :257], v[:, :257]), kwargs, options, _call())  # the CLIP-image call alike
    d = ADAPTER.attention_call((q, k, v), kwargs, options, _call())
    assert not d.sparse and d.reason == "cross-attention" and d.q is None


def test_head_size_64_is_dense_with_its_reason():
    args, kwargs, options = _self_call(head_dim=64)
    d = ADAPTER.attention_call(args, kwargs, options, _call())
    assert not d.sparse and d.reason == "head size 64 (the kernel takes 128)"


def test_skip_reshape_is_an_unsupported_layout():
    (q, k, v), kwargs, options = _self_call()
    b, n, _ = q.shape
    bhld = [t.view(b, n, HEADS, 128).transpose(1, 2) for t in (q, k, v)]
    d = ADAPTER.attention_call(tuple(bhld), dict(kwargs, skip_reshape=True), options, _call())
    assert not d.sparse and d.reason == "unsupported layout"


def test_token_count_not_the_grid_is_dense():
    args, kwargs, options = _self_call(n=math.prod(GRID) - 6)
    d = ADAPTER.attention_call(args, kwargs, options, _call())
    assert not d.sparse and d.reason == "token count differs from the latent grid"


def test_no_geometry_is_dense():
    args, kwargs, options = _self_call()
    assert ADAPTER.attention_call(args, kwargs, options, None).reason == "no geometry for this call"
    assert ADAPTER.attention_call(args, kwargs, options, {"dense": "reference-latent tokens"}).reason == \
        "reference-latent tokens"


def test_call_geometry_from_the_model_arguments():
    x = torch.zeros(1, 16, 21, 61, 103)  # odd H and W: ComfyUI pads to the patch
    ctx = torch.zeros(1, 512, 4096)
    assert ADAPTER.call_geometry(None, (x, torch.zeros(1), ctx, None, None, {}), {}) == \
        {"grid": (21, 31, 52), "img_len": 21 * 31 * 52}
    assert ADAPTER.call_geometry(None, (x,), {"context": ctx, "reference_latent": torch.zeros(1)}) == \
        {"dense": "reference-latent tokens"}
    tdc = torch.zeros(1, 16, 2, 61, 103)
    assert ADAPTER.call_geometry(None, (x, None, ctx, None, tdc, {}), {})["grid"] == (23, 31, 52)


def test_video_as_long_as_the_text_keeps_the_call_dense():
    """A latent of exactly 512 (or 257) tokens makes self- and cross-attention calls of one shape; the model call
    stays dense rather than run a text cross-attention through the sparse kernel."""
    ctx = torch.zeros(1, 512, 4096)
    x = torch.zeros(1, 16, 2, 32, 32)  # 2 x 16 x 16 = 512 tokens
    call = ADAPTER.call_geometry(None, (x, torch.zeros(1), ctx, None, None, {}), {})
    assert "dense" in call and "text or image tokens" in call["dense"]
    clip = torch.zeros(1, 257, 1280)
    x = torch.zeros(1, 36, 257, 2, 2)  # 257 tokens
    assert "dense" in ADAPTER.call_geometry(None, (x, torch.zeros(1), ctx, clip, None, {}), {})
    args, kwargs, options = _self_call()
    assert ADAPTER.attention_call(args, kwargs, options, call).reason == call["dense"]
