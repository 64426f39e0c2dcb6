"""The pack's version: one place, read by pyproject.toml, ``--version`` and the checkpoints' ``created_by``
(a ComfyUI install by git clone has no package metadata to ask)."""

__version__ = "0.1.0"
