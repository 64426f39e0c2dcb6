"""A converted tiny HunyuanVideo stays close to the unquantized one (round-to-nearest, no calibration).

Runs in float32 so that the error measured is quantization error only (in BF16, ComfyUI's
guidance embedding rounds 1000 * guidance in BF16, which alone moves this random model's output
by about 40%). Kernels dispatch to their eager references on the CPU.

Measured relative L2 errors of the output (tiny dims, weights seed 0, inputs seed 1,
torch 2.13 CPU), whole conversion / block Linears only (modulation and refiner left float):

    w8a8  0.098 / 0.012
    w6a6  0.108 / 0.052
    w4a8  0.161 / 0.135

The whole-conversion figures are dominated by the weight-only INT4 modulation and refiner
Linears (0.097 with only those quantized), the same in every scheme: random Gaussian weights
are a hard case for per-channel INT4 (about 14% weight error). The bounds leave about 50% margin.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from comfyui_quantsparse.quantsparse.core.config import WEIGHT_ONLY_SCHEME, QuantSparseConfig
from comfyui_quantsparse.quantsparse.models.hunyuan_video.dims import HunyuanVideoDims
from comfyui_quantsparse.quantsparse.models.hunyuan_video.model import HunyuanVideo
from comfyui_quantsparse.quantsparse.models import registry
from comfyui_quantsparse.quantsparse.models.hunyuan_video.random_weights import make_random_state_dict
from comfyui_quantsparse.quantsparse.core.qlinear import QuantizedLinear

TINY = HunyuanVideoDims.tiny()
WHOLE_BOUND = {"w8a8": 0.15, "w6a6": 0.17, "w4a8": 0.24}
BLOCKS_ONLY_BOUND = {"w8a8": 0.02, "w6a6": 0.08, "w4a8": 0.2}


@pytest.fixture(scope="module")
def reference():
    model = HunyuanVideo(TINY, dtype=torch.float32)
    model.load_state_dict(make_random_state_dict(TINY, 0, dtype=torch.float32), strict=True)
    model.eval()
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, 16, 3, 8, 6, generator=g), torch.tensor([700.0]),
              torch.randn(1, 12, TINY.context_in_dim, generator=g), torch.randn(1, 768, generator=g),
              torch.tensor([6.0]))
    with torch.no_grad():
        out = model(*inputs)
    return model, inputs, out


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _run(reference, config, select=None):
    model, inputs, ref = reference
    q = registry.adapter_for(TINY).quantize_model(copy.deepcopy(model), config, select=select)
    with torch.no_grad():
        out = q(*inputs)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    return q, _rel(out, ref)


@pytest.mark.parametrize("bits", ["w8a8", "w6a6", "w4a8"])
def test_whole_conversion_error(reference, bits):
    q, err = _run(reference, QuantSparseConfig(bits=bits))
    assert 1e-3 < err < WHOLE_BOUND[bits], err


@pytest.fixture(scope="module")
def block_only_errors(reference):
    """Errors with only the block attention/MLP Linears quantized: the part that differs by scheme."""
    return {bits: _run(reference, QuantSparseConfig(bits=bits), select=lambda name, kind: kind != WEIGHT_ONLY_SCHEME)[1]
            for bits in ("w8a8", "w6a6", "w4a8")}


@pytest.mark.parametrize("bits", ["w8a8", "w6a6", "w4a8"])
def test_block_linears_only_error(block_only_errors, bits):
    assert 1e-4 < block_only_errors[bits] < BLOCKS_ONLY_BOUND[bits], block_only_errors


def test_error_grows_as_bits_shrink(block_only_errors):
    assert block_only_errors["w8a8"] < block_only_errors["w6a6"] < block_only_errors["w4a8"]


def test_which_linears_are_replaced(reference):
    q, _ = _run(reference, QuantSparseConfig(bits="w4a8", group_size=128))
    kinds = {name: mod.kind for name, mod in q.named_modules() if isinstance(mod, QuantizedLinear)}
    plain = {name for name, mod in q.named_modules() if isinstance(mod, nn.Linear)}
    per_double = 2 * 5  # qkv, proj, mlp.0, mlp.2, mod.lin for each stream
    per_single = 3  # linear1, linear2, modulation.lin
    per_refiner = 5  # qkv, proj, mlp.0, mlp.2, adaLN_modulation.1
    assert len(kinds) == TINY.depth * per_double + TINY.depth_single_blocks * per_single + 2 * per_refiner
    assert kinds["double_blocks.1.img_attn.qkv"] == "w4a8"
    assert kinds["single_blocks.3.linear2"] == "w4a8"
    assert kinds["double_blocks.0.txt_mod.lin"] == WEIGHT_ONLY_SCHEME
    assert kinds["txt_in.individual_token_refiner.blocks.1.mlp.2"] == WEIGHT_ONLY_SCHEME
    assert q.get_submodule("single_blocks.0.linear1").group_size == 128
    assert {"final_layer.linear", "txt_in.input_embedder", "time_in.in_layer",
            "vector_in.out_layer", "guidance_in.in_layer", "final_layer.adaLN_modulation.1"} <= plain
    assert not any(name.startswith(("double_blocks.", "single_blocks.")) for name in plain)
    # Quantized state dict: packed weights [N, K/2], the embedders untouched.
    sd = q.state_dict()
    assert tuple(sd["single_blocks.0.linear1.weight"].shape) == (1792, 128)
    assert sd["single_blocks.0.linear1.weight"].dtype == torch.int8
    assert torch.equal(sd["img_in.proj.weight"], reference[0].state_dict()["img_in.proj.weight"])
