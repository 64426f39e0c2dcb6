"""The streaming safetensors writer and header reader.

The writer must produce exactly what ``safetensors.torch.save_file`` does (so every reader
takes our checkpoints), never leave a partial file, and the reader must turn each way a file
can be broken into a message that names the problem, before any tensor is read.
"""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfyui_quantsparse.quantsparse.core.safetensors_io import (
    SafetensorsError, TensorFile, TensorSpec, read_header, spec_of, write_safetensors,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "z.int8": torch.randint(-8, 8, (3, 5), generator=g, dtype=torch.int8),
        "a.bf16": torch.randn(2, 5, generator=g).bfloat16(),
        "c.fp16": torch.randn(7, generator=g).half(),
        "f.fp32": torch.randn(4, 3, generator=g),
        "s.scalar": torch.tensor(3.5),
        "d.fp64": torch.randn(1, generator=g, dtype=torch.float64),
        "l.int64": torch.arange(3),
        "u8": torch.arange(5, dtype=torch.uint8),
        "b.bool": torch.tensor([True, False, True]),
        "e.empty": torch.zeros(0, 4),
        "i16": torch.arange(3, dtype=torch.int16),
    }


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_bytes_identical_to_save_file(tmp_path):
    tensors = _tensors()
    meta = {"k": "v\n\u00e9\x01\"{}"}  # one key: save_file orders several keys by hash, randomly
    save_file(tensors, tmp_path / "ref.safetensors", metadata=meta)
    size = write_safetensors(tmp_path / "ours.safetensors", tensors, meta)
    ours = (tmp_path / "ours.safetensors").read_bytes()
    assert ours == (tmp_path / "ref.safetensors").read_bytes()
    assert size == len(ours)


def test_several_metadata_keys_read_back(tmp_path):
    meta = {"b": "2", "a": "1", "quantsparse": json.dumps({"x": [1, 2]})}
    write_safetensors(tmp_path / "m.safetensors", _tensors(), meta)
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert f.metadata() == meta
    assert read_header(tmp_path / "m.safetensors").metadata == meta


def test_iterator_in_any_order_gives_the_same_file(tmp_path):
    tensors = _tensors()
    specs = [spec_of(k, v) for k, v in tensors.items()]
    write_safetensors(tmp_path / "a.safetensors", tensors, {"m": "1"})
    write_safetensors(tmp_path / "b.safetensors", reversed(list(tensors.items())), {"m": "1"}, specs=specs)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    loaded = load_file(tmp_path / "b.safetensors")
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


def test_header_reader_reports_shapes_dtypes_and_metadata_without_data(tmp_path):
    tensors = _tensors()
    path = tmp_path / "x.safetensors"
    save_file(tensors, path, metadata={"quantsparse": "{}"})
    h = read_header(path)
    assert h.metadata == {"quantsparse": "{}"}
    assert set(h.tensors) == set(tensors)
    for k, v in tensors.items():
        assert h.tensors[k].shape == tuple(v.shape) and h.tensors[k].dtype == v.dtype
        assert h.tensors[k].end - h.tensors[k].begin == v.numel() * v.element_size()
    assert h.file_size == os.path.getsize(path)
    with safe_open(path, framework="pt") as f:  # offsets agree with the library's reader
        assert list(h.tensors) == sorted(f.keys(), key=lambda k: h.tensors[k].begin)


def test_tensor_file_reads_what_save_file_wrote(tmp_path):
    tensors = _tensors()
    path = tmp_path / "x.safetensors"
    save_file(tensors, path)
    with TensorFile(read_header(path)) as f:
        for k, v in tensors.items():
            got = f.get(k)
            assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k


def test_tensor_file_notices_a_file_cut_after_its_header_was_read(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(_tensors(), path)
    header = read_header(path)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(SafetensorsError, match="changed size"):
        TensorFile(header)


def test_failure_mid_write_leaves_no_file_and_no_temp(tmp_path):
    tensors = _tensors()
    specs = [spec_of(k, v) for k, v in tensors.items()]

    def boom():
        yield from list(tensors.items())[:3]
        raise RuntimeError("source read failed")

    with pytest.raises(RuntimeError, match="source read failed"):
        write_safetensors(tmp_path / "dst.safetensors", boom(), specs=specs)
    assert not (tmp_path / "dst.safetensors").exists()
    assert _leftovers(tmp_path) == []


def test_failure_during_overwrite_keeps_the_old_file(tmp_path):
    dst = tmp_path / "dst.safetensors"
    dst.write_bytes(b"old contents")
    tensors = _tensors()
    specs = [spec_of(k, v) for k, v in tensors.items()]

    def boom():
        yield next(iter(tensors.items()))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_safetensors(dst, boom(), specs=specs, overwrite=True)
    assert dst.read_bytes() == b"old contents"
    assert _leftovers(tmp_path) == []


def test_refuses_to_overwrite_unless_asked(tmp_path):
    dst = tmp_path / "dst.safetensors"
    dst.write_bytes(b"keep me")
    with pytest.raises(SafetensorsError, match="already exists.*overwrite"):
        write_safetensors(dst, _tensors())
    assert dst.read_bytes() == b"keep me"
    write_safetensors(dst, _tensors(), overwrite=True)
    assert set(load_file(dst)) == set(_tensors())


def test_unwritten_or_mismatched_tensors_abort(tmp_path):
    tensors = _tensors()
    specs = [spec_of(k, v) for k, v in tensors.items()]
    with pytest.raises(SafetensorsError, match=r"1 planned tensors were never written"):
        write_safetensors(tmp_path / "a.safetensors", list(tensors.items())[1:], specs=specs)
    bad = dict(tensors, **{"f.fp32": torch.zeros(4, 3, dtype=torch.float64)})
    with pytest.raises(SafetensorsError, match=r"'f.fp32' is torch.float64 \(4, 3\) but the plan .* torch.float32"):
        write_safetensors(tmp_path / "b.safetensors", bad.items(), specs=specs)
    with pytest.raises(SafetensorsError, match="not in the plan"):
        write_safetensors(tmp_path / "c.safetensors", [("nope", torch.zeros(1))], specs=specs)
    assert not any(tmp_path.iterdir())


def test_missing_folder_is_reported(tmp_path):
    with pytest.raises(SafetensorsError, match="does not exist; create it"):
        write_safetensors(tmp_path / "no" / "x.safetensors", _tensors())


# ----------------------------------------------------------------------------- bad files

def _raw(path, header: dict, data: bytes, pad: bool = True) -> None:
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_random_bytes_are_not_safetensors(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(SafetensorsError, match="is not a safetensors file"):
        read_header(path)


def test_json_text_is_not_safetensors(tmp_path):
    path = tmp_path / "config.safetensors"
    path.write_text(json.dumps({"hidden_size": 3072, "num_heads": 24}))
    with pytest.raises(SafetensorsError, match="is not a safetensors file"):
        read_header(path)


def test_pickle_zip_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(SafetensorsError, match="zip archive"):
        read_header(path)


def test_tiny_file_is_not_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"abc")
    with pytest.raises(SafetensorsError, match="only 3 bytes long"):
        read_header(path)


def test_header_that_is_not_an_object(tmp_path):
    path = tmp_path / "x.safetensors"
    raw = b"[1, 2, 3]     "
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(SafetensorsError, match="not a safetensors file"):
        read_header(path)
    raw = b'{"a": [1, 2'
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(SafetensorsError, match="not valid JSON"):
        read_header(path)


def test_truncated_data_is_reported_with_sizes(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(_tensors(), path)
    full = path.read_bytes()
    path.write_bytes(full[:-10])
    with pytest.raises(SafetensorsError, match=r"is truncated: .*\(10 bytes missing.*download or copy it again"):
        read_header(path)


def test_truncated_header_is_reported(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(_tensors(), path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(SafetensorsError, match="is truncated: its header is"):
        read_header(path)


def test_trailing_bytes_are_reported(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(_tensors(), path)
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    with pytest.raises(SafetensorsError, match="8 bytes follow the last tensor"):
        read_header(path)


def test_unknown_dtype_is_reported(tmp_path):
    path = tmp_path / "x.safetensors"
    _raw(path, {"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0")
    with pytest.raises(SafetensorsError, match=r"tensor 'w' has dtype 'Q7'"):
        read_header(path)


def test_offsets_inconsistent_with_shape_are_reported(tmp_path):
    path = tmp_path / "x.safetensors"
    _raw(path, {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, b"\0" * 20)
    with pytest.raises(SafetensorsError, match=r"'w' has data_offsets \[0, 20\] spanning 20 bytes, but shape "
                                               r"\[2, 3\] of F32 needs 24 bytes"):
        read_header(path)


def test_overlapping_and_gapped_offsets_are_reported(tmp_path):
    path = tmp_path / "x.safetensors"
    _raw(path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)
    with pytest.raises(SafetensorsError, match="'b' .* overlaps tensor 'a'"):
        read_header(path)
    _raw(path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}, b"\0" * 20)
    with pytest.raises(SafetensorsError, match="'b' .* leaves a gap after tensor 'a'"):
        read_header(path)


def test_spec_nbytes():
    assert TensorSpec("x", torch.bfloat16, (3, 4)).nbytes == 24
    assert TensorSpec("x", torch.int8, ()).nbytes == 1
