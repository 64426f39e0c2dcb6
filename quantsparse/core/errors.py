"""The pack's user-facing error type.

Every mistake a user can make (a wrong file, a bad setting, a path that cannot be written) is raised
as a ``QuantSparseError`` whose text names the problem and the fix; the command line prints it as one
line and ComfyUI shows it on the node. ComfyUI names an exception by its module path, which for a
custom node loaded from ``custom_nodes/`` is the pack's folder on disk: the classes here say
``quantsparse`` instead, so the user reads ``quantsparse.CheckpointError``.
"""

from __future__ import annotations


class QuantSparseError(ValueError):
    """A user mistake or an unusable input; the message says what to do."""


def public(cls: type) -> type:
    """Give an error class the readable module name ComfyUI and tracebacks show."""
    cls.__module__ = "quantsparse"
    return cls


public(QuantSparseError)
