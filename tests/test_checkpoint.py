"""QuantSparse checkpoints: round trip, and every way a file can be wrong rejected before a build.

Bad files are made from a good tiny checkpoint by editing its header or tensors with our own
writer, so each test breaks exactly one thing and the message must name that thing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comfyui_quantsparse.quantsparse.checkpoint.format import (
    CONVERT_HINT, METADATA_KEY, CheckpointError, CheckpointMeta, checkpoint_plan, load_checkpoint,
    quantized_layers, quantized_weight, read_checkpoint_header, validate_checkpoint, write_checkpoint,
)
from comfyui_quantsparse.quantsparse.core.config import QuantSparseConfig
from comfyui_quantsparse.quantsparse.checkpoint.convert import convert_file
from comfyui_quantsparse.quantsparse.models.hunyuan_video.dims import HunyuanVideoDims
from comfyui_quantsparse.quantsparse.models import registry
from comfyui_quantsparse.quantsparse.models.hunyuan_video.random_weights import make_random_state_dict
from comfyui_quantsparse.quantsparse.core.quantizer import quantize_weight
from comfyui_quantsparse.quantsparse.core.safetensors_io import read_header, write_safetensors

layer_kind = registry.by_name("hunyuan_video").layer_kind

DIMS = HunyuanVideoDims.tiny()
CONFIGS = {
    "w4a8": QuantSparseConfig(),
    "w4a8-g128": QuantSparseConfig(group_size=128),
    "w8a8": QuantSparseConfig(bits="w8a8"),
    "w6a6-norot": QuantSparseConfig(bits="w6a6", rotate=False),
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A BF16 tiny HunyuanVideo file (random weights) and its state dict."""
    sd = make_random_state_dict(DIMS, seed=0)
    path = tmp_path_factory.mktemp("src") / "tiny_bf16.safetensors"
    save_file(sd, path)
    return path, sd


@pytest.fixture(scope="module")
def good(source, tmp_path_factory):
    """A valid W4A8 checkpoint converted from ``source``."""
    path = tmp_path_factory.mktemp("good") / "tiny_w4a8.safetensors"
    convert_file(source[0], path, CONFIGS["w4a8"])
    return path


def _read_all(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _rewrite(good: Path, dst: Path, *, tensors=None, doc_edit=None) -> Path:
    """A copy of ``good`` with its tensors and/or its quantsparse metadata edited."""
    t, meta = _read_all(good)
    if tensors is not None:
        t = tensors(dict(t))
    if doc_edit is not None:
        doc = json.loads(meta[METADATA_KEY])
        doc_edit(doc)
        meta = dict(meta, **{METADATA_KEY: json.dumps(doc)})
    write_safetensors(dst, t, meta)
    return dst


def _rejects(path, *patterns) -> str:
    """validate_checkpoint and load_checkpoint both refuse ``path``; every pattern is in the message."""
    with pytest.raises(CheckpointError) as e1:
        validate_checkpoint(path)
    with pytest.raises(CheckpointError) as e2:
        load_checkpoint(path)
    msg = str(e1.value)
    assert str(e2.value) == msg
    assert str(path) in msg, msg
    for p in patterns:
        assert p in msg, f"{p!r} not in {msg!r}"
    return msg


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("name", list(CONFIGS))
def test_convert_then_load_equals_quantize_weight(source, tmp_path, name):
    config = CONFIGS[name]
    src, sd = source
    dst = tmp_path / "q.safetensors"
    convert_file(src, dst, config)
    state, info = load_checkpoint(dst)
    assert info.dims == DIMS and info.config == config and info.format_version == 1
    assert info.calibration is None and info.created_by["tool"] == "comfyui-quantsparse"
    assert info.layers == quantized_layers(DIMS, config)
    assert set(state) == {s.name for s in checkpoint_plan(DIMS, config)}
    kinds = set()
    for prefix, layer in info.layers.items():
        kinds.add(layer.kind)
        assert layer.kind == layer_kind(prefix, config)
        ref = quantize_weight(sd[f"{prefix}.weight"], layer.kind, group_size=layer.group_size, rotate=layer.rotate)
        got = quantized_weight(state, prefix, layer)
        assert torch.equal(got.weight, ref.weight), prefix
        assert got.scale.dtype == ref.scale.dtype and torch.equal(got.scale, ref.scale), prefix
        if ref.smooth is None:
            assert f"{prefix}.smooth" not in state
        else:
            assert torch.equal(got.smooth, ref.smooth), prefix
    assert kinds == {config.bits, "w4a16"}
    quantized = {f"{p}.weight" for p in info.layers}
    for key, value in sd.items():
        if key not in quantized:
            assert state[key].dtype == torch.bfloat16 and torch.equal(state[key], value), key


def test_write_checkpoint_from_dict_and_iterator_round_trip(good, tmp_path):
    state, info = load_checkpoint(good)
    meta = CheckpointMeta(DIMS, info.config, calibration={"method": "msad", "prompts": 20, "epochs": 15},
                          sparse_defaults={"density": 0.15})
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_checkpoint(a, state, meta)
    write_checkpoint(b, reversed(list(state.items())), meta)
    assert a.read_bytes() == b.read_bytes()
    state2, info2 = load_checkpoint(a)
    assert info2.calibration == {"method": "msad", "prompts": 20, "epochs": 15}
    assert info2.sparse_defaults == {"density": 0.15}
    assert info2.meta == meta
    for k in state:
        assert torch.equal(state[k], state2[k]), k


def test_write_checkpoint_refuses_wrong_tensors_and_leaves_nothing(good, tmp_path):
    state, info = load_checkpoint(good)
    dst = tmp_path / "x.safetensors"
    missing = dict(state)
    missing.pop("final_layer.linear.bias")
    with pytest.raises(CheckpointError, match=r"1 missing tensor\(s\): final_layer.linear.bias"):
        write_checkpoint(dst, missing, info.meta)
    with pytest.raises(CheckpointError, match=r"1 extra tensor\(s\): bogus"):
        write_checkpoint(dst, dict(state, bogus=torch.zeros(1)), info.meta)
    wrong = dict(state, **{"final_layer.linear.bias": state["final_layer.linear.bias"].float()})
    with pytest.raises(CheckpointError, match="final_layer.linear.bias"):
        write_checkpoint(dst, wrong, info.meta)
    assert list(tmp_path.iterdir()) == []


def test_write_checkpoint_refuses_overwrite(good, tmp_path):
    state, info = load_checkpoint(good)
    dst = tmp_path / "x.safetensors"
    dst.write_bytes(b"precious")
    with pytest.raises(CheckpointError, match="already exists"):
        write_checkpoint(dst, state, info.meta)
    assert dst.read_bytes() == b"precious"
    write_checkpoint(dst, state, info.meta, overwrite=True)
    validate_checkpoint(dst)


def test_read_header_loads_no_tensor(good, monkeypatch):
    import safetensors

    def forbidden(*a, **k):
        raise AssertionError("tensor data was opened")

    monkeypatch.setattr(safetensors, "safe_open", forbidden)
    info = validate_checkpoint(good)
    assert read_checkpoint_header(good).layers == info.layers
    assert info.tensors["final_layer.linear.weight"].dtype == torch.bfloat16


# ----------------------------------------------------------------------------- bad files

def test_truncated_file(good, tmp_path):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(good.read_bytes()[:-1000])
    _rejects(bad, "truncated", "1000 bytes missing", "download or copy it again")


def test_random_bytes(tmp_path):
    bad = tmp_path / "noise.safetensors"
    bad.write_bytes(os.urandom(10000))
    _rejects(bad, "is not a safetensors file")


def test_json_text_file(tmp_path):
    bad = tmp_path / "workflow.safetensors"
    bad.write_text(json.dumps({"nodes": [], "links": []}, indent=2))
    _rejects(bad, "is not a safetensors file")


def test_plain_bf16_model(source):
    msg = _rejects(source[0], CONVERT_HINT, "plain HunyuanVideo T2V model")
    assert "quantsparse convert tiny_bf16.safetensors" in msg


def test_plain_prefixed_bf16_model(source, tmp_path):
    path = tmp_path / "prefixed.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in source[1].items()}, path)
    _rejects(path, CONVERT_HINT, "plain HunyuanVideo T2V model")


@pytest.mark.parametrize("tensors, kind", [
    ({"conv_in.weight": torch.zeros(4, 4)}, "an unrecognised model (1 tensors, e.g. conv_in.weight)"),
    ({"model.diffusion_model.blocks.0.self_attn.q.weight": torch.zeros(4, 4),
      "model.diffusion_model.blocks.0.cross_attn.k.weight": torch.zeros(4, 4)},
     "a Wan-style model that is not a supported Wan variant"),
    ({"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4), "vision_in.proj.0.weight": torch.zeros(4)},
     "a HunyuanVideo 1.5 model (not supported yet)"),
    ({"diffusion_model.blocks.0.lora_up.weight": torch.zeros(4, 2)}, "a LoRA"),
    ({"encoder.conv_in.weight": torch.zeros(4, 4), "decoder.conv_out.weight": torch.zeros(4, 4)}, "a VAE"),
])
def test_other_model_without_metadata(tmp_path, tensors, kind):
    """A file convert does not take is described, and convert is not suggested for it."""
    path = tmp_path / "other.safetensors"
    save_file(tensors, path)
    msg = _rejects(path, "is not a QuantSparse checkpoint: it looks like " + kind, "HunyuanVideo T2V")
    assert "convert it" not in msg


def test_newer_format_version(good, tmp_path):
    bad = _rewrite(good, tmp_path / "v2.safetensors", doc_edit=lambda d: d.update(format_version=2))
    _rejects(bad, "format version is 2", "reads format version(s) [1]", "Update comfyui-quantsparse")


def test_missing_format_version(good, tmp_path):
    bad = _rewrite(good, tmp_path / "v.safetensors", doc_edit=lambda d: d.pop("format_version"))
    _rejects(bad, "format version is None")


def test_other_architecture(good, tmp_path):
    bad = _rewrite(good, tmp_path / "ltx.safetensors", doc_edit=lambda d: d.update(architecture="ltx_video"))
    _rejects(bad, "architecture 'ltx_video'", "(['hunyuan_video', 'wan'])", "update comfyui-quantsparse")


def test_metadata_not_json(good, tmp_path):
    t, meta = _read_all(good)
    bad = tmp_path / "m.safetensors"
    write_safetensors(bad, t, {METADATA_KEY: "{not json"})
    _rejects(bad, "'quantsparse' metadata is not valid JSON")


def test_invalid_dims(good, tmp_path):
    bad = _rewrite(good, tmp_path / "d.safetensors", doc_edit=lambda d: d["dims"].update(num_heads=3))
    _rejects(bad, "stored dimensions are invalid", "num_heads=3")


def test_dims_disagree_with_tensors(good, tmp_path):
    bad = _rewrite(good, tmp_path / "d.safetensors", doc_edit=lambda d: d["dims"].update(context_in_dim=128))
    _rejects(bad, "dimensions in its metadata disagree with its tensors", "context_in_dim: metadata 128 vs tensors 64")


def test_unknown_quant_config(good, tmp_path):
    bad = _rewrite(good, tmp_path / "q.safetensors", doc_edit=lambda d: d["quant"].update(bits="w2a2"))
    _rejects(bad, "stored quantization config is invalid", "w2a2")


def test_missing_tensor(good, tmp_path):
    def drop(t):
        del t["double_blocks.1.img_attn.proj.weight_scale"]
        return t
    bad = _rewrite(good, tmp_path / "m.safetensors", tensors=drop)
    _rejects(bad, "1 missing tensor(s): double_blocks.1.img_attn.proj.weight_scale", "re-create it")


def test_many_missing_tensors_are_counted(good, tmp_path):
    bad = _rewrite(good, tmp_path / "m.safetensors",
                   tensors=lambda t: {k: v for k, v in t.items() if not k.endswith(".smooth")})
    n = sum(1 for k in read_header(good).tensors if k.endswith(".smooth"))
    _rejects(bad, f"{n} missing tensor(s)", f"(and {n - 5} more)")


def test_extra_tensor(good, tmp_path):
    bad = _rewrite(good, tmp_path / "e.safetensors",
                   tensors=lambda t: dict(t, **{"double_blocks.0.img_attn.lora_A.weight": torch.zeros(4, 256)}))
    _rejects(bad, "1 extra tensor(s): double_blocks.0.img_attn.lora_A.weight")


def test_wrong_shape(good, tmp_path):
    def reshape(t):
        t["single_blocks.2.linear2.weight_scale"] = torch.ones(300)
        return t
    bad = _rewrite(good, tmp_path / "s.safetensors", tensors=reshape)
    _rejects(bad, "wrong shape", "single_blocks.2.linear2.weight_scale expected [256] found [300]")


def test_unquantized_layer_weight(good, source, tmp_path):
    """A BF16 weight where the config says packed INT4: both shape and dtype are named."""
    def unquantize(t):
        t["single_blocks.0.linear1.weight"] = source[1]["single_blocks.0.linear1.weight"]
        return t
    bad = _rewrite(good, tmp_path / "u.safetensors", tensors=unquantize)
    _rejects(bad, "single_blocks.0.linear1.weight expected [1792, 128] found [1792, 256]",
             "single_blocks.0.linear1.weight expected int8 found bfloat16")


def test_wrong_dtype(good, tmp_path):
    def cast(t):
        t["img_in.proj.weight"] = t["img_in.proj.weight"].float()
        return t
    bad = _rewrite(good, tmp_path / "t.safetensors", tensors=cast)
    _rejects(bad, "wrong dtype", "img_in.proj.weight expected bfloat16 found float32")


def test_layer_table_disagrees_with_config(good, tmp_path):
    def edit(d):
        d["layers"]["double_blocks.0.img_attn.qkv"]["kind"] = "w8a8"
    bad = _rewrite(good, tmp_path / "l.safetensors", doc_edit=edit)
    _rejects(bad, "layer table disagrees with its quantization config", "double_blocks.0.img_attn.qkv")


def test_layer_missing_from_table(good, tmp_path):
    bad = _rewrite(good, tmp_path / "l.safetensors",
                   doc_edit=lambda d: d["layers"].pop("single_blocks.3.modulation.lin"))
    _rejects(bad, "layers missing from the table: single_blocks.3.modulation.lin")


def test_config_edited_without_tensors(good, tmp_path):
    """Claiming w8a8 for W4A8 tensors: the packed weights have the wrong width for 8-bit codes."""
    def edit(d):
        d["quant"]["bits"] = "w8a8"
        for layer in d["layers"].values():
            if layer["kind"] == "w4a8":
                layer["kind"] = "w8a8"
    bad = _rewrite(good, tmp_path / "c.safetensors", doc_edit=edit)
    _rejects(bad, "wrong shape", "double_blocks.0.img_attn.proj.weight expected [256, 256] found [256, 128]")
