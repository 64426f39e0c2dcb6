"""Triton import guard: the pack must import (and fall back to the eager references) without Triton."""

from __future__ import annotations

import os

try:  # pragma: no cover - depends on the platform
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # noqa: BLE001 - any import failure means "no Triton"
    triton = None
    tl = None
    HAS_TRITON = False


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1), as in CI."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def has_tma(device) -> bool:
    """Hopper's tensor-memory accelerator (TMA descriptors): CUDA capability 9.0 and up. The CPU
    interpreter emulates it, so the TMA variants are tested there too."""
    if interpreting():
        return True
    import torch

    dev = torch.device(device)
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)
    return _CAPABILITY[idx][0] >= 9


_CAPABILITY: dict = {}

if HAS_TRITON:

    @triton.jit
    def grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
        """(tile row, tile column) of program ``pid``, GROUP_M tile rows at a time so that the
        programs running together share operand tiles in L2."""
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = min(num_m - first_m, GROUP_M)
        return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows
