"""Streaming safetensors: a header reader that loads no tensor, and a writer that holds one tensor at a time.

The 13B model is 25.6 GB in BF16 and users convert it on 24 GB machines, so neither side may
materialise the whole file. The writer knows every tensor's dtype and shape in advance (a
plan), so it writes the header with all offsets first and each tensor at its offset in
whatever order they are produced. Its output is the file ``safetensors.torch.save_file``
would write for the same tensors and metadata (same tensor order, same compact header,
padded to 8 bytes), so any safetensors reader takes it. Writes are atomic (``paths.PartialFile``: a
locked partial file in the destination folder, fsync, rename); a failure never leaves a partial file,
and the one a killed run leaves is removed by the next run.

Tensor data: :class:`TensorFile` reads one tensor's bytes at its offset (``pread``, no memory
map). ``safetensors.safe_open`` cannot open the 25.6 GB model on a 24 GB machine: for PyTorch
it maps the whole file privately and writable, which Linux refuses (ENOMEM) when the file is
larger than RAM + swap. Nothing here unpickles.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from .config import is_int
from .errors import QuantSparseError, public
from .paths import PartialFile

# safetensors dtype names, in the order of the format's own Dtype enum: save_file sorts tensors by
# this order (largest first), which keeps every tensor aligned to its element size.
_DTYPE_ORDER: list[tuple[str, torch.dtype, int]] = [
    ("BOOL", torch.bool, 1),
    ("U8", torch.uint8, 1),
    ("I8", torch.int8, 1),
    ("F8_E5M2", torch.float8_e5m2, 1),
    ("F8_E4M3", torch.float8_e4m3fn, 1),
    ("I16", torch.int16, 2),
    ("U16", torch.uint16, 2),
    ("F16", torch.float16, 2),
    ("BF16", torch.bfloat16, 2),
    ("I32", torch.int32, 4),
    ("U32", torch.uint32, 4),
    ("F32", torch.float32, 4),
    ("F64", torch.float64, 8),
    ("I64", torch.int64, 8),
    ("U64", torch.uint64, 8),
]
ST_DTYPES: dict[str, torch.dtype] = {name: dt for name, dt, _ in _DTYPE_ORDER}
_ST_NAME: dict[torch.dtype, str] = {dt: name for name, dt, _ in _DTYPE_ORDER}
_ITEMSIZE: dict[str, int] = {name: size for name, _, size in _DTYPE_ORDER}
_RANK: dict[str, int] = {name: i for i, (name, _, _) in enumerate(_DTYPE_ORDER)}

HEADER_ALIGN = 8
MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces
_WRITE_CHUNK = 64 << 20  # a single write(2) caps at ~2 GiB; smaller chunks keep it simple


@public
class SafetensorsError(QuantSparseError):
    """A file that is not a readable safetensors file, or a write that cannot be done."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float8_e4m3fn`` -> ``float8_e4m3fn``, as messages name a stored dtype."""
    return str(dtype).replace("torch.", "")


def st_dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _ST_NAME:
        raise SafetensorsError(
            f"torch dtype {dtype} cannot be stored in safetensors; known: {sorted(_ST_NAME.values())}")
    return _ST_NAME[dtype]


@dataclass(frozen=True)
class TensorSpec:
    """What the writer must know before the first byte: a tensor's name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _ITEMSIZE[st_dtype_name(self.dtype)]


@dataclass(frozen=True)
class TensorEntry(TensorSpec):
    """A tensor's place in a file: byte offsets relative to the start of the data section."""

    begin: int = 0
    end: int = 0


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    tensors: dict[str, TensorEntry]  # in data order
    metadata: dict[str, str] | None
    data_start: int  # 8 + header length
    file_size: int

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: e.shape for name, e in self.tensors.items()}

    @property
    def data_bytes(self) -> int:
        return self.file_size - self.data_start


def spec_of(name: str, t: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, t.dtype, tuple(t.shape))


def layout(specs: Iterable[TensorSpec]) -> list[TensorEntry]:
    """Offsets in save_file's order: dtype rank descending, then name, so each tensor stays aligned."""
    specs = list(specs)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise SafetensorsError(f"duplicate tensor names in the plan: {dup[:5]}")
    if "__metadata__" in names:
        raise SafetensorsError("'__metadata__' is reserved by the safetensors format and cannot name a tensor")
    ordered = sorted(specs, key=lambda s: (-_RANK[st_dtype_name(s.dtype)], s.name))
    out, offset = [], 0
    for s in ordered:
        out.append(TensorEntry(s.name, s.dtype, tuple(int(d) for d in s.shape), offset, offset + s.nbytes))
        offset += s.nbytes
    return out


def encode_header(entries: list[TensorEntry], metadata: Mapping[str, str] | None) -> bytes:
    """The compact JSON header save_file writes, padded with spaces to a multiple of 8 bytes."""
    header: dict[str, object] = {}
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise SafetensorsError(f"safetensors metadata must map str to str; offending keys: {bad[:5]}")
        header["__metadata__"] = dict(metadata)
    for e in entries:
        header[e.name] = {"dtype": st_dtype_name(e.dtype), "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    raw = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % HEADER_ALIGN)
    return struct.pack("<Q", len(raw)) + raw


# --------------------------------------------------------------------------------------- reading

_OTHER_FORMATS = [
    (b"PK\x03\x04", "a zip archive (a PyTorch .pt/.ckpt pickle file?)"),
    (b"GGUF", "a GGUF file"),
    (b"\x80", "a Python pickle"),
    (b"\x89HDF", "an HDF5 file"),
]


def _not_safetensors(path: str, why: str, head: bytes = b"") -> SafetensorsError:
    guess = next((f" It looks like {what}." for magic, what in _OTHER_FORMATS if head.startswith(magic)), "")
    if not guess and head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        guess = f" It starts with the text {head.decode('ascii')!r}: it looks like a text file (JSON?)."
    return SafetensorsError(
        f"{path} is not a safetensors file: {why}.{guess} Use a .safetensors file "
        f"(ComfyUI's diffusion_models/ files are); other formats must be converted to safetensors first."
    )


def _truncated(path: str, why: str) -> SafetensorsError:
    return SafetensorsError(
        f"{path} is truncated: {why}. The download or copy was cut short; download or copy it again."
    )


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and check the header of a safetensors file without reading any tensor data.

    Catches what would otherwise fail later, deep inside a model build: a file of another
    format, a truncated download, unknown dtypes, offsets that disagree with shapes.
    """
    p = str(path)
    if not os.path.exists(p):
        raise SafetensorsError(f"{p} does not exist; check the path.")
    if os.path.isdir(p):
        raise SafetensorsError(f"{p} is a folder, not a safetensors file.")
    size = os.path.getsize(p)
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _not_safetensors(p, f"it is only {size} bytes long (a safetensors file starts with an 8-byte header "
                                      f"length)", head)
        (n,) = struct.unpack("<Q", head)
        raw = f.read(min(n, MAX_HEADER_BYTES))
    if n == 0 or n > MAX_HEADER_BYTES:
        raise _not_safetensors(p, f"its first 8 bytes give a header length of {n} bytes", head)
    if not raw.startswith(b"{"):
        raise _not_safetensors(p, "its header does not start with '{'", head)
    if len(raw) < n:
        raise _truncated(p, f"its header is {n} bytes long but the file ends after {len(raw)} of them")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _not_safetensors(p, f"its header is not valid JSON ({e})", head) from None
    if not isinstance(header, dict):
        raise _not_safetensors(p, f"its header is a JSON {type(header).__name__}, not an object", head)

    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise SafetensorsError(f"{p} is corrupt: its __metadata__ must be a JSON object of strings to strings.")

    entries = [_parse_entry(p, name, info) for name, info in header.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    expected_begin = 0
    prev = None
    for e in entries:
        if e.begin != expected_begin:
            what = "overlaps" if e.begin < expected_begin else "leaves a gap after"
            other = f"tensor {prev.name!r}" if prev else "the start of the data"
            raise SafetensorsError(
                f"{p} is corrupt: tensor {e.name!r} (data_offsets [{e.begin}, {e.end}]) {what} {other}; "
                f"re-create the file."
            )
        expected_begin, prev = e.end, e
    data_start = 8 + n
    data_len = expected_begin
    if data_start + data_len > size:
        missing = data_start + data_len - size
        raise _truncated(p, f"its header describes {data_len} bytes of tensor data but only {size - data_start} "
                            f"bytes follow the header ({missing} bytes missing; the file should be "
                            f"{data_start + data_len} bytes)")
    if data_start + data_len < size:
        raise SafetensorsError(
            f"{p} is corrupt: {size - data_start - data_len} bytes follow the last tensor that no header entry "
            f"describes; re-create the file."
        )
    return SafetensorsHeader(p, {e.name: e for e in entries}, metadata, data_start, size)


def _parse_entry(path: str, name: str, info: object) -> TensorEntry:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise SafetensorsError(
            f"{path} is corrupt: header entry {name!r} must be an object with dtype, shape and data_offsets."
        )
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in ST_DTYPES:
        raise SafetensorsError(
            f"{path}: tensor {name!r} has dtype {dtype!r}, which is not a safetensors dtype this reader knows "
            f"(known: {', '.join(ST_DTYPES)}); the file is corrupt or from a newer format."
        )
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise SafetensorsError(
            f"{path} is corrupt: tensor {name!r} has shape {shape!r}; expected a list of sizes >= 0.")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(is_int(o) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]):
        raise SafetensorsError(
            f"{path} is corrupt: tensor {name!r} has data_offsets {offsets!r}; expected [begin, end] with begin <= end."
        )
    need = math.prod(shape) * _ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != need:
        raise SafetensorsError(
            f"{path} is corrupt: tensor {name!r} has data_offsets {offsets} spanning {offsets[1] - offsets[0]} bytes, "
            f"but shape {shape} of {dtype} needs {need} bytes; re-create the file."
        )
    return TensorEntry(name, ST_DTYPES[dtype], tuple(shape), offsets[0], offsets[1])


class TensorFile:
    """Reads tensors of a checked header one at a time, each into its own memory.

    Memory is exactly the tensor read: no mapping keeps touched pages resident, so streaming
    a file larger than RAM stays at one tensor.
    """

    def __init__(self, header: SafetensorsHeader):
        self.header = header
        self._f = open(header.path, "rb", buffering=0)
        if os.fstat(self._f.fileno()).st_size != header.file_size:
            self._f.close()
            raise SafetensorsError(f"{header.path} changed size since its header was read; run again.")

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def get(self, name: str) -> torch.Tensor:
        e = self.header.tensors[name]
        out = torch.empty(e.end - e.begin, dtype=torch.uint8)
        view = memoryview(out.numpy()).cast("B")
        pos, done = self.header.data_start + e.begin, 0
        while done < len(view):
            n = os.preadv(self._f.fileno(), [view[done:done + _WRITE_CHUNK]], pos + done)
            if n == 0:
                raise _truncated(self.header.path, f"it ended while reading tensor {name!r}")
            done += n
        return out.view(e.dtype).reshape(e.shape)


# --------------------------------------------------------------------------------------- writing

def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


class SafetensorsWriter:
    """Writes a planned safetensors file atomically; tensors may arrive in any order, each exactly once.

    Use as a context manager: leaving the block normally checks that every planned tensor was
    written, fsyncs and renames the temporary file onto ``path``; leaving it by an exception
    deletes the temporary file, so ``path`` is either the complete file or untouched.
    """

    def __init__(self, path: str | os.PathLike, specs: Iterable[TensorSpec],
                 metadata: Mapping[str, str] | None = None, *, overwrite: bool = False):
        self.path = Path(path)
        self.overwrite = overwrite
        self.entries = {e.name: e for e in layout(specs)}
        self.header = encode_header(list(self.entries.values()), metadata)
        self.total_bytes = len(self.header) + sum(e.nbytes for e in self.entries.values())
        self.bytes_written = 0
        self._written: set[str] = set()
        self._fd: int | None = None
        self._part: PartialFile | None = None

    def __enter__(self) -> "SafetensorsWriter":
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def open(self) -> None:
        check_destination(self.path, self.overwrite)
        self._part = PartialFile(self.path)
        self._fd = self._part.fd
        try:
            _reserve(self._fd, self.total_bytes, self.path)
            self._pwrite(self.header, 0)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._fd is None:
            raise SafetensorsError("SafetensorsWriter.write called outside its `with` block")
        e = self.entries.get(name)
        if e is None:
            raise SafetensorsError(f"tensor {name!r} is not in the plan of {self.path}")
        if name in self._written:
            raise SafetensorsError(f"tensor {name!r} was written twice to {self.path}")
        if tensor.dtype != e.dtype or tuple(tensor.shape) != e.shape:
            raise SafetensorsError(
                f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)} but the plan of {self.path} says "
                f"{e.dtype} {e.shape}"
            )
        self._pwrite(_tensor_bytes(tensor), len(self.header) + e.begin)
        self._written.add(name)
        self.bytes_written += e.nbytes

    def missing(self) -> list[str]:
        return [n for n in self.entries if n not in self._written]

    def commit(self) -> None:
        missing = self.missing()
        if missing:
            self.abort()
            raise SafetensorsError(
                f"{len(missing)} planned tensors were never written to {self.path} (first: {missing[:5]}); "
                f"nothing was saved."
            )
        part, self._part, self._fd = self._part, None, None
        part.commit(overwrite=self.overwrite)  # refuses a destination that appeared while we wrote

    def abort(self) -> None:
        if self._part is not None:
            self._part.abort()
        self._part, self._fd = None, None

    def _pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            n = os.pwrite(self._fd, view[:_WRITE_CHUNK], offset)
            view, offset = view[n:], offset + n


def check_destination(path: Path, overwrite: bool) -> None:
    """Fail before any work when the destination cannot be written."""
    if path.is_dir():
        raise SafetensorsError(f"{path} is a folder; give a file name ending in .safetensors.")
    if not path.parent.is_dir():
        raise SafetensorsError(f"the folder {path.parent} does not exist; create it first.")
    if path.exists() and not overwrite:
        raise SafetensorsError(f"{path} already exists; choose another name or pass overwrite=True (--overwrite).")


def _reserve(fd: int, nbytes: int, path: Path) -> None:
    """Claim the disk space up front so a full disk fails in a second, not after an hour."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except AttributeError:
        return
    except OSError as e:
        import errno

        if e.errno == errno.ENOSPC:
            free = _free_bytes(path.parent)
            raise SafetensorsError(
                f"not enough free disk space for {path}: it needs {nbytes / 1e9:.2f} GB, {path.parent} has "
                f"{free / 1e9:.2f} GB free; free some space or write elsewhere."
            ) from None
        # filesystems without fallocate (EOPNOTSUPP, EINVAL): just write


def _free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def write_safetensors(path: str | os.PathLike,
                      tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                      metadata: Mapping[str, str] | None = None, *, specs: Iterable[TensorSpec] | None = None,
                      overwrite: bool = False,
                      progress: Callable[[int, int, str], None] | None = None) -> int:
    """Write ``tensors`` to ``path`` atomically and return the file size.

    A mapping is read one key at a time (a lazy mapping streams); an iterable of (name, tensor)
    pairs needs ``specs`` (the shapes are needed before the first byte) and may come in any order.
    ``progress(bytes_done, bytes_total, name)`` is called after each tensor.
    """
    if specs is None:
        if not isinstance(tensors, Mapping):
            raise TypeError("write_safetensors: pass specs= when tensors is an iterator of (name, tensor) pairs")
        specs = [spec_of(k, v) for k, v in tensors.items()]
    with SafetensorsWriter(path, specs, metadata, overwrite=overwrite) as w:
        items = ((name, tensors[name]) for name in w.entries) if isinstance(tensors, Mapping) else tensors
        for name, t in items:
            w.write(name, t)
            if progress is not None:
                progress(w.bytes_written, w.total_bytes - len(w.header), name)
    return w.total_bytes
