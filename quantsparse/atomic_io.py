"""Small files written whole or not at all: a temp file beside the target, then ``os.replace``.

For reports, previews and benchmark results; checkpoints have their own streaming writer
(``safetensors_io``) and calibration activations theirs (``calib_store``).
"""

from __future__ import annotations

import os
from pathlib import Path


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())
