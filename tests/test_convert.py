"""The converter and the `quantsparse` command line, on a tiny HunyuanVideo with random weights.

What a user relies on: any ComfyUI-style HunyuanVideo file converts to the same checkpoint;
the output is a plain safetensors file; a failure or a wrong input leaves nothing behind and
says why; the command prints progress and the size ratio.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfyui_quantsparse.quantsparse import cli
from comfyui_quantsparse.quantsparse.checkpoint.format import (
    METADATA_KEY, LayerSpec, load_checkpoint, quantized_weight, validate_checkpoint,
)
from comfyui_quantsparse.quantsparse.core.config import QuantSparseConfig
from comfyui_quantsparse.quantsparse.checkpoint.convert import ConvertError, convert_file, quantize_rows
from comfyui_quantsparse.quantsparse.models.hunyuan_video.dims import HunyuanVideoDims
from comfyui_quantsparse.quantsparse.models.hunyuan_video.random_weights import make_random_state_dict
from comfyui_quantsparse.quantsparse.core.quantizer import quantize_weight
from comfyui_quantsparse.quantsparse.core.safetensors_io import read_header

DIMS = HunyuanVideoDims.tiny()


@pytest.fixture(scope="module")
def sd():
    return make_random_state_dict(DIMS, seed=1)


@pytest.fixture(scope="module")
def src(sd, tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "tiny_bf16.safetensors"
    save_file(sd, path)
    return path


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory):
    path = tmp_path_factory.mktemp("out") / "tiny_w4a8.safetensors"
    result = convert_file(src, path)
    return path, result


def _no_leftovers(folder) -> bool:
    return not any(p.name.startswith(".") or p.suffix == ".partial" for p in folder.iterdir())


def test_output_is_a_plain_safetensors_file(converted):
    path, result = converted
    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert METADATA_KEY in meta
    # save_file of the same tensors and metadata writes the very same bytes
    ref = path.parent / "resaved.safetensors"
    save_file(tensors, ref, metadata=meta)
    assert ref.read_bytes() == path.read_bytes()
    assert result.dst_bytes == os.path.getsize(path) and result.src_bytes > result.dst_bytes
    assert result.ratio == pytest.approx(result.src_bytes / result.dst_bytes)


def test_converter_does_not_memory_map_the_source(src, converted, tmp_path, monkeypatch):
    """safe_open maps the whole file privately: Linux refuses that (ENOMEM) for the 25.6 GB model
    on a 24 GB machine without swap, which the storage benchmark hit. The converter must not use it."""
    import safetensors

    def refuse(*a, **k):
        raise RuntimeError("unable to mmap: Cannot allocate memory (12)")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    out = tmp_path / "out.safetensors"
    convert_file(src, out)
    assert out.read_bytes() == converted[0].read_bytes()


def test_prefixed_source_converts_to_the_same_file(sd, converted, tmp_path):
    prefixed = tmp_path / "prefixed.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, prefixed)
    out = tmp_path / "out.safetensors"
    convert_file(prefixed, out)
    assert out.read_bytes() == converted[0].read_bytes()


def test_all_in_one_file_keeps_only_the_diffusion_model(sd, converted, tmp_path):
    bundle = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    bundle["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4)
    path = tmp_path / "bundle.safetensors"
    save_file(bundle, path)
    out = tmp_path / "out.safetensors"
    convert_file(path, out)
    assert out.read_bytes() == converted[0].read_bytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_full_precision_sources(sd, tmp_path, dtype):
    src = tmp_path / "src.safetensors"
    save_file({k: v.to(dtype) for k, v in sd.items()}, src)
    out = tmp_path / "out.safetensors"
    convert_file(src, out, QuantSparseConfig(bits="w8a8"))
    state, info = load_checkpoint(out)
    prefix = "double_blocks.1.img_mlp.2"
    layer = info.layers[prefix]
    ref = quantize_weight(sd[f"{prefix}.weight"].to(dtype), layer.kind, rotate=layer.rotate)
    assert torch.equal(quantized_weight(state, prefix, layer).weight, ref.weight)
    assert state["img_in.proj.weight"].dtype == torch.bfloat16
    assert torch.equal(state["img_in.proj.weight"], sd["img_in.proj.weight"].to(dtype).bfloat16())


@pytest.mark.parametrize("group_size", [0, 128])
def test_chunked_quantization_equals_whole_tensor(group_size):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 256, generator=g).bfloat16()
    smooth = torch.rand(256, generator=g) + 0.5
    clip = torch.rand(37, 256 // (group_size or 256), generator=g) * 0.5 + 0.5
    layer = LayerSpec("w4a8", 256, 37, group_size, True)
    whole = quantize_weight(w, "w4a8", group_size=group_size, smooth=smooth, clip=clip, rotate=True)
    chunked = quantize_rows(w, layer, smooth=smooth, clip=clip, chunk_elements=5 * 256)  # 8 chunks, last ragged
    assert torch.equal(chunked.weight, whole.weight)
    assert chunked.scale.dtype == whole.scale.dtype and torch.equal(chunked.scale, whole.scale)
    assert torch.equal(chunked.smooth, whole.smooth)


def test_calibrated_smoothing_and_clipping_are_used(sd, src, tmp_path):
    prefix = "single_blocks.1.linear2"
    k = sd[f"{prefix}.weight"].shape[1]
    smooth = {prefix: torch.linspace(0.5, 2.0, k)}
    clip = {prefix: torch.full((sd[f"{prefix}.weight"].shape[0],), 0.9)}
    out = tmp_path / "cal.safetensors"
    convert_file(src, out, smooth=smooth, clip=clip, calibration={"method": "test"})
    state, info = load_checkpoint(out)
    ref = quantize_weight(sd[f"{prefix}.weight"], "w4a8", smooth=smooth[prefix], clip=clip[prefix])
    got = quantized_weight(state, prefix, info.layers[prefix])
    assert torch.equal(got.weight, ref.weight) and torch.equal(got.scale, ref.scale)
    assert torch.equal(got.smooth, smooth[prefix])
    assert info.calibration == {"method": "test"}


def test_failure_mid_conversion_leaves_nothing(src, tmp_path):
    seen = []

    def progress(p):
        seen.append(p)
        if p.tensors_done == 40:
            raise RuntimeError("disk unplugged")

    dst = tmp_path / "dst.safetensors"
    with pytest.raises(RuntimeError, match="disk unplugged"):
        convert_file(src, dst, progress=progress)
    assert len(seen) == 40
    assert not dst.exists() and _no_leftovers(tmp_path) and list(tmp_path.iterdir()) == []


def test_progress_reports_every_tensor(src, tmp_path):
    seen = []
    convert_file(src, tmp_path / "o.safetensors", progress=seen.append)
    assert [p.tensors_done for p in seen] == list(range(1, len(seen) + 1))
    assert seen[-1].tensors_done == seen[-1].tensors_total and seen[-1].bytes_done == seen[-1].bytes_total
    assert seen[-1].bytes_total == read_header(src).data_bytes  # every source byte, counted once
    assert all(a.bytes_done < b.bytes_done for a, b in zip(seen, seen[1:]))


def test_refuses_to_overwrite(src, tmp_path):
    dst = tmp_path / "dst.safetensors"
    dst.write_bytes(b"keep")
    with pytest.raises(ConvertError, match="already exists.*overwrite"):
        convert_file(src, dst)
    assert dst.read_bytes() == b"keep"
    # --overwrite replaces only a QuantSparse checkpoint, never another file (a model, a note)
    with pytest.raises(ConvertError, match="not a QuantSparse checkpoint.*replaces only"):
        convert_file(src, dst, overwrite=True)
    assert dst.read_bytes() == b"keep"
    dst.unlink()
    convert_file(src, dst)
    first = dst.read_bytes()
    convert_file(src, dst, QuantSparseConfig(bits="w8a8"), overwrite=True)
    assert dst.read_bytes() != first
    validate_checkpoint(dst)


def test_refuses_to_write_over_its_source(src, tmp_path):
    copy = tmp_path / "model.safetensors"
    copy.write_bytes(src.read_bytes())
    with pytest.raises(ConvertError, match="same file as the input.*never writes over its own input"):
        convert_file(copy, copy, overwrite=True)
    link = tmp_path / "hard_link.safetensors"  # another name, the same inode
    os.link(copy, link)
    with pytest.raises(ConvertError, match="same file as the input"):
        convert_file(copy, link, overwrite=True)
    assert copy.read_bytes() == src.read_bytes()


# ----------------------------------------------------------------------------- rejected sources

def test_rejects_a_quantsparse_checkpoint(converted, tmp_path):
    with pytest.raises(ConvertError, match="already a QuantSparse checkpoint; convert the original BF16"):
        convert_file(converted[0], tmp_path / "again.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_an_fp8_file_converts_as_its_exact_bf16_value(sd, tmp_path):
    """fp8 weights (no scale) were refused before sources.py; every fp8 number is a BF16 number, so the file
    converts exactly as its BF16 copy does (tests/test_convert_sources.py covers every form)."""
    fp8 = {k: (v.to(torch.float8_e4m3fn) if k.endswith("linear1.weight") else v) for k, v in sd.items()}
    path = tmp_path / "fp8.safetensors"
    save_file(fp8, path)
    bf16 = tmp_path / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in fp8.items()}, bf16)
    result = convert_file(path, tmp_path / "a.safetensors")
    convert_file(bf16, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert result.source_form == "fp8_e4m3fn"
    assert result.source_summary == "fp8_e4m3fn (4 fp8_e4m3fn: unscaled fp8, read exactly; 132 bf16)"


def test_rejects_an_integer_tensor_nothing_declares(sd, tmp_path):
    i16 = {k: (v.to(torch.int16) if k.endswith("linear1.weight") else v) for k, v in sd.items()}
    path = tmp_path / "i16.safetensors"
    save_file(i16, path)
    with pytest.raises(ConvertError, match=r"single_blocks\.0\.linear1\.weight is stored "
                                           r"as int16 and nothing in the file .* says how to read it as a weight; this "
                                           r"converter reads bf16, fp16, fp32, fp8_e4m3fn, fp8_scaled"):
        convert_file(path, tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == [path]


def test_rejects_another_model(tmp_path):
    path = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(8, 8, dtype=torch.bfloat16)}, path)
    with pytest.raises(ConvertError, match="is not a model that can be converted: not a model QuantSparse supports: "
                                           "it looks like a Flux-style image model"):
        convert_file(path, tmp_path / "out.safetensors")


def test_rejects_a_non_safetensors_file(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"PK\x03\x04" + os.urandom(1000))
    with pytest.raises(ConvertError, match="is not a safetensors file.*zip archive"):
        convert_file(path, tmp_path / "out.safetensors")


def test_rejects_a_source_with_a_missing_tensor(sd, tmp_path):
    path = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in sd.items() if k != "double_blocks.1.txt_mlp.2.bias"}, path)
    with pytest.raises(ConvertError, match="missing tensors: double_blocks.1.txt_mlp.2.bias"):
        convert_file(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


# ----------------------------------------------------------------------------- command line

def test_cli_convert_and_inspect(src, tmp_path, capsys):
    dst = tmp_path / "w8.safetensors"
    assert cli.main(["convert", str(src), str(dst), "--bits", "w8a8"]) == 0
    out, err = capsys.readouterr()
    assert "ratio:" in out and "source:" in out and "output:" in out
    assert "source form: bf16 (136 tensors, read as stored)" in out and "source: bf16 (136 tensors" in err
    assert f"/{136}]" in err and "(100%)" in err  # progress on stderr, 136 source tensors
    info = validate_checkpoint(dst)
    assert info.config == QuantSparseConfig(bits="w8a8")
    assert cli.main(["inspect", str(dst)]) == 0
    out, _ = capsys.readouterr()
    assert "valid QuantSparse checkpoint" in out and "w8a8" in out and "24 Linears" in out
    assert "calibration: none" in out


def test_cli_group_size_and_errors(src, tmp_path, capsys):
    dst = tmp_path / "g.safetensors"
    assert cli.main(["convert", str(src), str(dst), "--group-size", "128"]) == 0
    assert validate_checkpoint(dst).config.group_size == 128
    capsys.readouterr()
    assert cli.main(["convert", str(src), str(dst)]) == 2
    _, err = capsys.readouterr()
    assert "error:" in err and "already exists" in err and "Traceback" not in err
    assert cli.main(["convert", str(src), str(tmp_path / "x.safetensors"), "--bits", "w8a8",
                     "--group-size", "128"]) == 2
    _, err = capsys.readouterr()
    assert "group_size=128 is only implemented for 4-bit weights" in err
    assert cli.main(["inspect", str(src)]) == 2
    _, err = capsys.readouterr()
    assert "this is not a QuantSparse checkpoint; convert it with `quantsparse convert`" in err
