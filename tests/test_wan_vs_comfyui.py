"""Our Wan (models/wan/model.py) against ComfyUI's own ``WanModel``, from a real ComfyUI checkout (COMFYUI_DIR).

For tiny dimensions of every variant the adapter supports (T2V; Wan 2.1 I2V with the CLIP tokens, also
first-last-frame; a Wan 2.2 A14B-style I2V expert with 36 input channels and no CLIP branch; a
TI2V-5B-style 48-channel model with per-frame timesteps), one random state dict
(``WanAdapter.random_state_dict``) is loaded strictly into both models, which get the same latent,
timestep, text (and CLIP features) and must agree. Latents include odd frame counts, non-square grids and
odd H or W (ComfyUI pads those to the patch). ComfyUI's detection must read our tensors back as the same
constructor arguments and model class. Run from ComfyUI's virtual environment:

    COMFYUI_DIR=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/test_wan_vs_comfyui.py

Measured relative L2 differences (tiny dims, torch 2.13 CPU, ComfyUI 0.29.0, whose CPU attention is
sub-quadratic attention): float32 2.1e-7 to 2.9e-7 for every case; BF16 (inputs cast as ComfyUI's
BaseModel casts them) 4.2e-3 to 5.1e-3.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from comfyui_quantsparse.quantsparse.models.wan.adapter import WanAdapter
from comfyui_quantsparse.quantsparse.models.wan.dims import (
    CLIP_DIM, WanDims, dims_from_state_dict, reference_state_shapes,
)
from comfyui_quantsparse.quantsparse.models.wan.model import WanModel

from .comfy_checkout import comfy_model_modules

pytestmark = pytest.mark.comfyui

FLOAT32_BOUND = 1e-5
BF16_BOUND = 2e-2  # measured 4.2e-3 to 5.1e-3: BF16 rounding in another attention backend and op order
ADAPTER = WanAdapter()

TINY = {
    "t2v": WanDims.tiny(),
    "i2v": WanDims.tiny("i2v", in_dim=36),
    "flf2v": dataclasses.replace(WanDims.tiny("i2v", in_dim=36), flf_tokens=514),
    "i2v_a14b": WanDims.tiny("t2v", in_dim=36),
    "ti2v_5b": WanDims.tiny("t2v", in_dim=48, out_dim=48),
}
RELEASED = {"t2v_1_3b": WanDims.t2v_1_3b(), "t2v_14b": WanDims.t2v_14b(), "i2v_14b": WanDims.i2v_14b(),
            "i2v_a14b": WanDims.i2v_a14b(), "ti2v_5b": WanDims.ti2v_5b()}
# ComfyUI's supported_models class for each (its detection picks the model wrapper from it).
COMFY_CLASS = {"t2v": "WAN21_T2V", "i2v": "WAN21_I2V", "flf2v": "WAN21_I2V", "i2v_a14b": "WAN21_T2V",
               "ti2v_5b": "WAN22_T2V", "t2v_1_3b": "WAN21_T2V", "t2v_14b": "WAN21_T2V", "i2v_14b": "WAN21_I2V"}


@pytest.fixture(scope="module")
def comfy():
    with comfy_model_modules("wan", "WanModel") as modules:
        yield modules


def _comfy_kwargs(dims: WanDims) -> dict:
    """ComfyUI's constructor arguments for ``dims``, the fixed ones as its detection sets them."""
    return dict(model_type=dims.model_type, patch_size=(1, 2, 2), in_dim=dims.in_dim, dim=dims.dim,
                ffn_dim=dims.ffn_dim, freq_dim=256, text_dim=dims.text_dim, out_dim=dims.out_dim,
                num_heads=dims.num_heads, num_layers=dims.num_layers, window_size=(-1, -1), qk_norm=True,
                cross_attn_norm=True, eps=1e-6, flf_pos_embed_token_number=dims.flf_tokens)


def _build_comfy(comfy, dims: WanDims, dtype, device="cpu"):
    return comfy["model"](operations=comfy["ops"].manual_cast, dtype=dtype, device=device, **_comfy_kwargs(dims))


ALL_DIMS = {**{f"tiny_{k}": v for k, v in TINY.items()}, **RELEASED}


@pytest.mark.parametrize("name", list(ALL_DIMS))
def test_same_keys_shapes_and_order(comfy, name):
    dims = ALL_DIMS[name]
    theirs = _build_comfy(comfy, dims, torch.bfloat16, device="meta")
    theirs_shapes = [(k, tuple(v.shape)) for k, v in theirs.state_dict().items()]
    ours = WanModel(dims, device="meta")
    assert theirs_shapes == [(k, tuple(v.shape)) for k, v in ours.state_dict().items()]
    assert theirs_shapes == list(ADAPTER.reference_shapes(dims).items())


@pytest.mark.parametrize("name", list(ALL_DIMS))
def test_comfyui_detects_our_dims(comfy, name):
    dims = ALL_DIMS[name]
    sd = {k: torch.empty(s, device="meta") for k, s in reference_state_shapes(dims).items()}
    detected = comfy["detection"].detect_unet_config(sd, "")
    expected = {k: v for k, v in _comfy_kwargs(dims).items() if k != "text_dim"}  # ComfyUI keeps its 4096 default
    if dims.flf_tokens is None:
        expected.pop("flf_pos_embed_token_number")
    assert detected == {"image_model": "wan2.1", **expected}
    assert dims.text_dim == 4096  # the default ComfyUI builds
    assert dims_from_state_dict({k: v.shape for k, v in sd.items()}) == dims
    config = comfy["detection"].model_config_from_unet(sd, "")
    assert type(config).__name__ == COMFY_CLASS[name.removeprefix("tiny_")]


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _same_weights(comfy, dims, dtype):
    """ComfyUI's model and ours, both loaded (strictly) with one random state dict."""
    sd = ADAPTER.random_state_dict(dims, 0, dtype=dtype)
    theirs = _build_comfy(comfy, dims, dtype)
    theirs.load_state_dict(sd, strict=True)
    ours = ADAPTER.build_model(dims, dtype=dtype)
    ours.load_state_dict(sd, strict=True)
    return theirs, ours


# (variant, latent shape [B, C, T, H, W], timestep, CLIP tokens or None)
CASES = {
    "t2v_odd_frames_non_square": ("t2v", (1, 16, 3, 8, 12), [700.0], None),
    "t2v_odd_h_batch2": ("t2v", (2, 16, 2, 9, 6), [700.0, 300.0], None),
    "i2v_clip_odd_w": ("i2v", (1, 36, 3, 8, 7), [650.0], 257),
    "i2v_no_clip_fea": ("i2v", (1, 36, 1, 6, 8), [650.0], None),
    "flf2v_two_images": ("flf2v", (1, 36, 3, 6, 6), [500.0], 514),
    "i2v_a14b_expert_odd_frames": ("i2v_a14b", (1, 36, 5, 8, 10), [900.0], None),
    "i2v_a14b_expert_ignores_clip": ("i2v_a14b", (1, 36, 1, 4, 6), [900.0], 257),
    # per-frame timesteps as WAN22.process_timestep makes them: the clean first frame at 0
    "ti2v_5b_per_frame": ("ti2v_5b", (1, 48, 3, 6, 10), [[0.0, 800.0, 800.0]], None),
    "ti2v_5b_odd_h_w": ("ti2v_5b", (1, 48, 3, 5, 7), [[0.0, 600.0, 600.0]], None),
    "ti2v_5b_uneven_split": ("ti2v_5b", (1, 48, 3, 2, 6), [[0.0, 750.0]], None),  # 2 entries over 9 tokens
    "ti2v_5b_one_timestep": ("ti2v_5b", (1, 48, 2, 4, 4), [400.0], None),
}


def _inputs(dims: WanDims, shape, timestep, clip_tokens, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    ctx = torch.randn(shape[0], 11, dims.text_dim, generator=g)
    clip = torch.randn(shape[0], clip_tokens, CLIP_DIM, generator=g) if clip_tokens else None
    return x, torch.tensor(timestep), ctx, clip


def _comfy_forward(theirs, x, t, ctx, clip, dtype):
    options: dict = {}
    with torch.no_grad():
        # As BaseModel._apply_model: latent, context and extra conds in the model dtype, timestep float32.
        out = theirs(x.clone().to(dtype), t.clone(), ctx.clone().to(dtype),
                     clip_fea=None if clip is None else clip.clone().to(dtype), transformer_options=options)
    return out, options


@pytest.mark.parametrize("case", list(CASES))
def test_same_output_float32(comfy, case):
    variant, shape, timestep, clip_tokens = CASES[case]
    dims = TINY[variant]
    theirs, ours = _same_weights(comfy, dims, torch.float32)
    x, t, ctx, clip = _inputs(dims, shape, timestep, clip_tokens)
    expected, options = _comfy_forward(theirs, x, t, ctx, clip, torch.float32)
    with torch.no_grad():
        got = ours(x, t, ctx, clip)
        inp = ours.prepare(x, t, ctx, clip)
    assert got.shape == expected.shape == (shape[0], dims.out_dim, *shape[2:])
    assert _rel(got, expected) < FLOAT32_BOUND
    # the token grid we report is the one ComfyUI writes for the sparse patch
    assert inp.grid == tuple(options["grid_sizes"])


def test_a_different_weight_changes_the_output(comfy):
    """The bound is tight: scaling one block's modulation parameter (std 0.026 in these random weights,
    added to a time projection of std ~0.6) by 1.01 moves the output by 1.8e-4, 18x the bound."""
    dims = TINY["ti2v_5b"]
    theirs, ours = _same_weights(comfy, dims, torch.float32)
    with torch.no_grad():
        ours.blocks[1].modulation.mul_(1.01)
    x, t, ctx, clip = _inputs(dims, (1, 48, 3, 6, 10), [[0.0, 800.0, 800.0]], None)
    expected, _ = _comfy_forward(theirs, x, t, ctx, clip, torch.float32)
    with torch.no_grad():
        got = ours(x, t, ctx, clip)
    assert _rel(got, expected) > 10 * FLOAT32_BOUND


@pytest.mark.parametrize("case", ["t2v_odd_frames_non_square", "i2v_clip_odd_w", "ti2v_5b_per_frame"])
def test_same_output_bf16(comfy, case):
    variant, shape, timestep, clip_tokens = CASES[case]
    dims = TINY[variant]
    theirs, ours = _same_weights(comfy, dims, torch.bfloat16)
    x, t, ctx, clip = _inputs(dims, shape, timestep, clip_tokens)
    expected, _ = _comfy_forward(theirs, x, t, ctx, clip, torch.bfloat16)
    with torch.no_grad():
        got = ours(x, t, ctx, clip)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert _rel(got, expected) < BF16_BOUND


def test_attention_calls_as_comfyui_makes_them(comfy):
    """Every attention call ComfyUI's Wan makes, seen through the adapter as the sparse patch sees it: the
    self-attention calls sparse with ComfyUI's own grid, their q/k/v equal to what our model's attention
    function receives; the cross-attention calls (text, CLIP image) dense."""
    dims = TINY["i2v"]
    theirs, ours = _same_weights(comfy, dims, torch.float32)
    x, t, ctx, clip = _inputs(dims, (1, 36, 3, 8, 6), [650.0], 257)
    call = ADAPTER.call_geometry(theirs, (x, t, ctx, clip, None, {}), {})
    assert call == {"grid": (3, 4, 3), "img_len": 36}
    seen = []

    def override(func, *args, **kwargs):
        decision = ADAPTER.attention_call(args, kwargs, kwargs["transformer_options"], call)
        seen.append((decision, kwargs["transformer_options"]["block_index"]))
        return func(*args, **kwargs)

    with torch.no_grad():
        theirs(x, t, ctx, clip_fea=clip, transformer_options={"optimized_attention_override": override})
    ours_calls = []

    def record(q, k, v, *, mask=None, block_type="", block_index=0):
        ours_calls.append((block_type, block_index, q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    with torch.no_grad():
        ours(x, t, ctx, clip, attention=record)
    assert [(c[0], c[1]) for c in ours_calls] == [(kind, i) for i in range(dims.num_layers)
                                                  for kind in ("self", "cross_img", "cross")]
    assert [(d.sparse, d.reason, i) for d, i in seen] == [
        (sparse, reason, i) for i in range(dims.num_layers)
        for sparse, reason in ((True, ""), (False, "cross-attention"), (False, "cross-attention"))]
    for (decision, _), (kind, _, q, k, v) in zip(seen, ours_calls):
        if decision.sparse:
            assert kind == "self" and decision.grid == (3, 4, 3) and decision.txt_len == 0
            for a, b in ((decision.q, q), (decision.k, k), (decision.v, v)):
                assert a.shape == b.shape and _rel(a, b) < FLOAT32_BOUND
