"""Host-side calibration data: block activations per sample, in memory or spilled to disk.

Block-wise calibration only ever needs the inputs of the block being calibrated (the full model's
outputs of the block before it), for every sample: at 848x480x33 that is 20 x 90 MB. One block
boundary is one folder of per-sample safetensors files, each written atomically as soon as the
sample is computed, and a ``complete.json`` written last; samples are also kept in memory while
their total stays under ``memory_budget`` bytes, and read back from disk one at a time beyond it.
The same folders make a calibration resumable: the work folder always holds the inputs of the next
block to do. Only safetensors are ever read (nothing is unpickled).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Iterator, Mapping, Optional

import torch

from ..core.paths import write_text_atomic
from ..core.safetensors_io import write_safetensors

DEFAULT_MEMORY_BUDGET = 8 << 30
COMPLETE = "complete.json"


def save_tensors_atomic(path: str, tensors: Mapping[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    """safetensors file at ``path``, complete or absent (the checkpoints' streaming writer: a locked partial
    file, fsync, rename), metadata values as JSON."""
    write_safetensors(path, {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                      {k: json.dumps(v) for k, v in (metadata or {}).items()}, overwrite=True)


def write_json_atomic(path: str, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def read_metadata(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    return {k: json.loads(v) for k, v in meta.items()}


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


class ActivationSet:
    """Per-sample named host tensors of one block boundary (a folder), possibly cached in memory."""

    def __init__(self, folder: str, count: int, cache: Optional[dict[int, dict[str, torch.Tensor]]] = None):
        self.folder, self.count = folder, count
        self._cache = cache

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.count:
            raise IndexError(i)
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        return load_tensors(os.path.join(self.folder, f"s{i}.safetensors"))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(self.count):
            yield self[i]

    @staticmethod
    def is_complete(folder: str) -> bool:
        return os.path.isfile(os.path.join(folder, COMPLETE))

    @classmethod
    def open(cls, folder: str, *, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> "ActivationSet":
        with open(os.path.join(folder, COMPLETE)) as f:
            count = int(json.load(f)["count"])
        size = sum(os.path.getsize(os.path.join(folder, f"s{i}.safetensors")) for i in range(count))
        cache = {i: load_tensors(os.path.join(folder, f"s{i}.safetensors")) for i in range(count)} \
            if size <= memory_budget else None
        return cls(folder, count, cache)


class ActivationWriter:
    """Writes one boundary sample by sample; ``finish`` marks it complete and returns the set."""

    def __init__(self, folder: str, *, memory_budget: int = DEFAULT_MEMORY_BUDGET):
        if os.path.isdir(folder):
            shutil.rmtree(folder)  # an incomplete boundary from an interrupted run
        os.makedirs(folder)
        self.folder, self.budget = folder, memory_budget
        self.count, self.bytes = 0, 0
        self.cache: Optional[dict[int, dict[str, torch.Tensor]]] = {}

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        host = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_tensors_atomic(os.path.join(self.folder, f"s{self.count}.safetensors"), host)
        self.bytes += sum(t.numel() * t.element_size() for t in host.values())
        if self.cache is not None:
            if self.bytes <= self.budget:
                self.cache[self.count] = host
            else:
                self.cache = None  # spilled: read back from disk one sample at a time
        self.count += 1

    def finish(self) -> ActivationSet:
        write_json_atomic(os.path.join(self.folder, COMPLETE), {"count": self.count, "bytes": self.bytes})
        return ActivationSet(self.folder, self.count, self.cache)
