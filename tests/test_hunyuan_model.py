"""The torch-only HunyuanVideo: ComfyUI's tensor names and shapes, dimension detection, forward behaviour.

Expected keys are enumerated here from ComfyUI's module layout (research/comfyui.md, section 1.3),
independently of the model code, so that a renamed module fails this test and not only the
real-ComfyUI comparison.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from comfyui_quantsparse.quantsparse.models.hunyuan_video.dims import HunyuanVideoDims, dims_from_state_dict
from comfyui_quantsparse.quantsparse.models import registry
from comfyui_quantsparse.quantsparse.core.config import QuantSparseConfig
from comfyui_quantsparse.quantsparse.models.hunyuan_video.model import (HunyuanVideo, reference_state_dtypes,
                                                          reference_state_shapes)
from comfyui_quantsparse.quantsparse.models.hunyuan_video.random_weights import make_random_state_dict

layer_kind = registry.by_name("hunyuan_video").layer_kind

TINY = HunyuanVideoDims.tiny()
FULL = HunyuanVideoDims.full()
# Full 13B configuration, counted on the meta device: every parameter, and those of the
# block Linears (weights + biases of the 20 double and 40 single blocks), which is what
# the 4-bit format compresses. 339,830,784 per double block, 141,591,552 per single block.
FULL_PARAMS = 12_821_012_544
FULL_BLOCK_LINEAR_PARAMS = 12_460_277_760


def expected_shapes(d: HunyuanVideoDims) -> dict[str, tuple[int, ...]]:
    h, ctx, mlp, hd = d.hidden_size, d.context_in_dim, int(d.hidden_size * d.mlp_ratio), 128
    out: dict[str, tuple[int, ...]] = {}

    def lin(name, n, k):
        out[f"{name}.weight"] = (n, k)
        out[f"{name}.bias"] = (n,)

    out["img_in.proj.weight"] = (h, d.in_channels, *d.patch_size)
    out["img_in.proj.bias"] = (h,)
    embedders = [("time_in", 256), ("vector_in", d.vec_in_dim)] + ([("guidance_in", 256)] if d.guidance_embed else [])
    for name, k in embedders:
        lin(f"{name}.in_layer", h, k)
        lin(f"{name}.out_layer", h, h)
    lin("txt_in.input_embedder", h, ctx)
    lin("txt_in.t_embedder.in_layer", h, 256)
    lin("txt_in.t_embedder.out_layer", h, h)
    lin("txt_in.c_embedder.in_layer", h, ctx)
    lin("txt_in.c_embedder.out_layer", h, h)
    for i in range(2):
        p = f"txt_in.individual_token_refiner.blocks.{i}"
        lin(f"{p}.adaLN_modulation.1", 2 * h, h)
        for norm in ("norm1", "norm2"):
            out[f"{p}.{norm}.weight"] = (h,)
            out[f"{p}.{norm}.bias"] = (h,)
        lin(f"{p}.self_attn.qkv", 3 * h, h)
        lin(f"{p}.self_attn.proj", h, h)
        lin(f"{p}.mlp.0", 4 * h, h)
        lin(f"{p}.mlp.2", h, 4 * h)
    for i in range(d.depth):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            lin(f"{p}_mod.lin", 6 * h, h)
            lin(f"{p}_attn.qkv", 3 * h, h)
            out[f"{p}_attn.norm.query_norm.weight"] = (hd,)
            out[f"{p}_attn.norm.key_norm.weight"] = (hd,)
            lin(f"{p}_attn.proj", h, h)
            lin(f"{p}_mlp.0", mlp, h)
            lin(f"{p}_mlp.2", h, mlp)
    for i in range(d.depth_single_blocks):
        p = f"single_blocks.{i}"
        lin(f"{p}.linear1", 3 * h + mlp, h)
        lin(f"{p}.linear2", h, h + mlp)
        out[f"{p}.norm.query_norm.weight"] = (hd,)
        out[f"{p}.norm.key_norm.weight"] = (hd,)
        lin(f"{p}.modulation.lin", 3 * h, h)
    lin("final_layer.linear", d.patch_size[1] * d.patch_size[2] * d.out_channels, h)
    lin("final_layer.adaLN_modulation.1", 2 * h, h)
    return out


def test_state_dict_keys_and_shapes_match_comfyui_layout():
    model = HunyuanVideo(TINY, dtype=torch.float32)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected_shapes(TINY)
    assert reference_state_shapes(TINY) == expected_shapes(TINY)
    full = reference_state_shapes(FULL)
    assert full == expected_shapes(FULL)
    assert len(full) == 856
    # Spot checks against the 13B table of research/comfyui.md 1.3.
    assert full["double_blocks.19.img_mod.lin.weight"] == (18432, 3072)
    assert full["single_blocks.39.linear1.weight"] == (21504, 3072)
    assert full["single_blocks.39.linear2.weight"] == (3072, 15360)
    assert full["img_in.proj.weight"] == (3072, 16, 1, 2, 2)
    assert full["final_layer.linear.weight"] == (64, 3072)


def test_without_guidance_there_are_no_guidance_keys():
    d = HunyuanVideoDims.from_dict({**TINY.to_dict(), "guidance_embed": False})
    shapes = reference_state_shapes(d)
    assert not any(k.startswith("guidance_in.") for k in shapes)
    assert shapes == expected_shapes(d)


def test_full_parameter_count():
    model = HunyuanVideo(FULL, device="meta")
    assert sum(p.numel() for p in model.parameters()) == FULL_PARAMS
    block_linear = sum(p.numel() for name, mod in model.named_modules()
                       if isinstance(mod, nn.Linear) and name.startswith(("double_blocks.", "single_blocks."))
                       for p in mod.parameters())
    assert block_linear == FULL_BLOCK_LINEAR_PARAMS
    assert not list(model.buffers())


def test_reference_dtypes_cover_every_key():
    dtypes = reference_state_dtypes(TINY)
    assert set(dtypes) == set(reference_state_shapes(TINY))
    assert set(dtypes.values()) == {torch.bfloat16}


@pytest.mark.parametrize("dims", [TINY, FULL], ids=["tiny", "full"])
def test_dims_round_trip(dims):
    assert dims_from_state_dict(reference_state_shapes(dims)) == dims
    assert HunyuanVideoDims.from_dict(dims.to_dict()) == dims
    tensors = {k: torch.empty(s, device="meta") for k, s in reference_state_shapes(dims).items()}
    assert dims_from_state_dict(tensors) == dims


@pytest.mark.parametrize("dims", [TINY, FULL], ids=["tiny", "full"])
def test_dims_detection_ignores_quantized_shapes(dims):
    """Packed INT4 weights are [N, K/2] and carry extra tensors; detection must not care."""
    shapes = dict(reference_state_shapes(dims))
    cfg = QuantSparseConfig()
    for key in list(shapes):
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and layer_kind(module, cfg) is not None:
            n, k = shapes[key]
            shapes[key] = (n, k // 2)
            shapes[f"{module}.weight_scale"] = (n,)
            shapes[f"{module}.smooth"] = (k,)
    assert dims_from_state_dict(shapes) == dims


def test_guidance_detected_from_keys():
    shapes = {k: v for k, v in reference_state_shapes(TINY).items() if not k.startswith("guidance_in.")}
    assert dims_from_state_dict(shapes).guidance_embed is False


def test_detection_errors_name_the_problem():
    shapes = reference_state_shapes(TINY)
    no_trigger = {k: v for k, v in shapes.items() if k != "txt_in.individual_token_refiner.blocks.0.norm1.weight"}
    with pytest.raises(ValueError, match="not a HunyuanVideo T2V checkpoint.*individual_token_refiner"):
        dims_from_state_dict(no_trigger)
    with pytest.raises(ValueError, match="prefix 'model.diffusion_model.'"):
        dims_from_state_dict({f"model.diffusion_model.{k}": v for k, v in shapes.items()})
    no_vector = {k: v for k, v in shapes.items() if not k.startswith("vector_in.")}
    with pytest.raises(ValueError, match="Hunyuan Image 2.1"):
        dims_from_state_dict(no_vector)
    v15 = {**no_vector, "vision_in.proj.0.weight": (1152, 1152), "cond_type_embedding.weight": (3, 256)}
    with pytest.raises(ValueError, match=r"HunyuanVideo 1\.5.*cond_type_embedding.*vision_in"):
        dims_from_state_dict(v15)
    with pytest.raises(ValueError, match="img_in.proj.weight"):
        dims_from_state_dict({k: v for k, v in shapes.items() if k != "img_in.proj.weight"})
    with pytest.raises(ValueError, match="768"):
        dims_from_state_dict({**shapes, "vector_in.in_layer.weight": (256, 512)})


def test_dims_validation_names_the_field():
    good = TINY.to_dict()
    with pytest.raises(ValueError, match="num_heads"):
        HunyuanVideoDims.from_dict({**good, "num_heads": 4})
    with pytest.raises(ValueError, match="depth"):
        HunyuanVideoDims.from_dict({**good, "depth": -1})
    with pytest.raises(ValueError, match="qkv_bias"):
        HunyuanVideoDims.from_dict({**good, "qkv_bias": 1})
    with pytest.raises(ValueError, match="axes_dim"):
        HunyuanVideoDims.from_dict({**good, "axes_dim": [16, 56, 48]})
    with pytest.raises(ValueError, match="patch_size"):
        HunyuanVideoDims.from_dict({**good, "patch_size": [1, 2]})
    with pytest.raises(ValueError, match=r"unknown.*heads"):
        HunyuanVideoDims.from_dict({**good, "heads": 2})
    with pytest.raises(ValueError, match="theta"):
        HunyuanVideoDims.from_dict({k: v for k, v in good.items() if k != "theta"})
    assert HunyuanVideoDims.full().to_dict()["patch_size"] == [1, 2, 2]


def _tiny_model(dtype=torch.float32, seed=0) -> HunyuanVideo:
    model = HunyuanVideo(TINY, dtype=dtype)
    model.load_state_dict(make_random_state_dict(TINY, seed, dtype=dtype), strict=True)
    return model.eval()


def _inputs(batch=1, txt_len=12, grid=(3, 8, 6), seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, *grid, generator=g)
    ctx = torch.randn(batch, txt_len, TINY.context_in_dim, generator=g)
    y = torch.randn(batch, 768, generator=g)
    return x, torch.full((batch,), 700.0), ctx, y, torch.full((batch,), 6.0)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_random_weights_are_deterministic_and_not_degenerate():
    a, b = make_random_state_dict(TINY, 3), make_random_state_dict(TINY, 3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["final_layer.linear.weight"], make_random_state_dict(TINY, 4)["final_layer.linear.weight"])
    for key in ("double_blocks.0.img_mod.lin.weight", "single_blocks.0.modulation.lin.bias",
                "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight"):
        assert a[key].float().abs().mean() > 1e-3, key
    norms = a["double_blocks.0.img_attn.norm.query_norm.weight"].float()
    assert 0.5 < norms.mean() < 1.5 and norms.std() > 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_shape_and_finite(dtype):
    model = _tiny_model(dtype)
    x, t, ctx, y, g = _inputs(batch=2)
    with torch.no_grad():
        out = model(x, t, ctx, y, g)
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert 0.1 < out.float().std() < 10


def test_forward_depends_on_every_input():
    model = _tiny_model()
    x, t, ctx, y, g = _inputs()
    with torch.no_grad():
        base = model(x, t, ctx, y, g)
        for changed in (model(x, t * 0.5, ctx, y, g), model(x, t, ctx * 1.5, y, g),
                        model(x, t, ctx, -y, g), model(x, t, ctx, y, g * 0.5), model(x, t, ctx, y, None),
                        model(x.flip(-1), t, ctx, y, g)):
            assert _rel(changed, base) > 1e-3
        # Text tokens carry no position (RoPE id 0, mean pooling), so their order does not matter.
        assert _rel(model(x, t, ctx.roll(1, dims=1), y, g), base) < 1e-5


def _zero_sum_perturbation(ctx, start, seed=5):
    """Change the padded tokens but keep their sum: ComfyUI's refiner pools the mean over all tokens,
    padding included, so only such a change is invisible with a correct mask."""
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(ctx[:, start:].shape, generator=g) * 3
    delta = delta - delta.mean(dim=1, keepdim=True)
    out = ctx.clone()
    out[:, start:] += delta
    return out


def test_text_padding_mask_is_honoured():
    model = _tiny_model()
    x, t, ctx, y, g = _inputs(txt_len=12)
    keep = torch.ones(1, 12, dtype=torch.bool)
    keep[:, 9:] = False
    ctx2 = _zero_sum_perturbation(ctx, 9)
    with torch.no_grad():
        masked = model(x, t, ctx, y, g, txt_mask=keep)
        assert _rel(model(x, t, ctx2, y, g, txt_mask=keep), masked) < 1e-5
        # Without the mask the same change is visible, so the check above has power.
        assert _rel(model(x, t, ctx2, y, g), model(x, t, ctx, y, g)) > 1e-2
        # A change to a real token is visible even with the mask.
        ctx3 = ctx.clone()
        ctx3[:, 2] += 1.0
        assert _rel(model(x, t, ctx3, y, g, txt_mask=keep), masked) > 1e-3
        # ComfyUI's conventions: integer 1/0 mask, or an already additive float mask.
        assert torch.equal(model(x, t, ctx, y, g, txt_mask=keep.long()), masked)
        additive = torch.zeros(1, 12)
        additive[:, 9:] = -torch.finfo(torch.float32).max
        assert torch.equal(model(x, t, ctx, y, g, txt_mask=additive), masked)
        # An all-ones mask changes nothing.
        assert _rel(model(x, t, ctx, y, g, txt_mask=torch.ones(1, 12, dtype=torch.bool)), model(x, t, ctx, y, g)) < 1e-6


def test_batch_with_different_padding_equals_samples_alone():
    model = _tiny_model()
    x, t, ctx, y, g = _inputs(batch=2)
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[0, 7:] = False
    keep[1, 10:] = False
    with torch.no_grad():
        both = model(x, t, ctx, y, g, txt_mask=keep)
        for i in range(2):
            alone = model(x[i:i + 1], t[i:i + 1], ctx[i:i + 1], y[i:i + 1], g[i:i + 1], txt_mask=keep[i:i + 1])
            assert _rel(both[i:i + 1], alone) < 1e-5


def test_every_attention_call_goes_through_the_attention_function():
    model = _tiny_model()
    x, t, ctx, y, g = _inputs(txt_len=12, grid=(3, 8, 6))
    seen = []

    def probe(q, k, v, *, mask, block_type, block_index):
        seen.append((block_type, block_index, tuple(q.shape), None if mask is None else tuple(mask.shape)))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)

    keep = torch.ones(1, 12, dtype=torch.bool)
    with torch.no_grad():
        base = model(x, t, ctx, y, g, keep)
        out = model(x, t, ctx, y, g, keep, attention=probe)
    assert torch.equal(out, base)
    n = 12 + 3 * 4 * 3
    assert seen == ([("refiner", i, (1, 2, 12, 128), (1, 1, 12, 12)) for i in range(2)]
                    + [("double", i, (1, 2, n, 128), (1, 1, 1, n)) for i in range(TINY.depth)]
                    + [("single", i, (1, 2, n, 128), (1, 1, 1, n)) for i in range(TINY.depth_single_blocks)])
    # The model attribute is the default for every call.
    seen.clear()
    model.attention = probe
    with torch.no_grad():
        model(x, t, ctx, y, g)
    assert len(seen) == 2 + TINY.depth + TINY.depth_single_blocks


def test_blocks_called_one_by_one_reproduce_forward():
    model = _tiny_model()
    x, t, ctx, y, g = _inputs()
    keep = torch.ones(1, 12, dtype=torch.bool)
    keep[:, 10:] = False
    with torch.no_grad():
        inp = model.prepare(x, t, ctx, y, g, keep)
        assert inp.grid == (3, 4, 3) and inp.img_len == 36 and inp.txt_len == 12
        img, txt = inp.img, inp.txt
        img_before = img.clone()
        for block in model.double_blocks:
            img, txt = block(img, txt, inp.vec, inp.pe, inp.attn_mask)
        assert torch.equal(inp.img, img_before)  # blocks do not write into their inputs
        joint = torch.cat((txt, img), 1)
        for block in model.single_blocks:
            joint = block(joint, inp.vec, inp.pe, inp.attn_mask)
        out = model.head(joint[:, inp.txt_len:], inp.vec, inp.grid)
        assert torch.equal(out, model(x, t, ctx, y, g, keep))


def test_bad_inputs_raise_clear_errors():
    model = _tiny_model()
    x, t, ctx, y, g = _inputs()
    with pytest.raises(ValueError, match="latent"):
        model(x[:, :8], t, ctx, y, g)
    with pytest.raises(ValueError, match="multiples of the patch"):
        model(x[..., :5], t, ctx, y, g)
    with pytest.raises(ValueError, match="context"):
        model(x, t, ctx[..., :32], y, g)
    with pytest.raises(ValueError, match="txt_mask"):
        model(x, t, ctx, y, g, txt_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="timestep"):
        model(x, t.repeat(2), ctx, y, g)
