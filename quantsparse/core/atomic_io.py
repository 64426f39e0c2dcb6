"""Small files written whole or not at all (reports, previews, benchmark results).

A thin name over ``paths.write_bytes_atomic``: a locked partial file beside the target, fsync, rename;
a killed run leaves a partial that the next run of the same command removes. Checkpoints have their
own streaming writer (``core.safetensors_io``) and calibration activations theirs (``calib.store``), on
the same partial files.
"""

from __future__ import annotations

from pathlib import Path

from .paths import write_bytes_atomic


def write_bytes(path: Path, data: bytes) -> None:
    write_bytes_atomic(path, data)


def write_text(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())
