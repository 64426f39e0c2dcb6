"""The ``quantsparse`` model folder (``models/quantsparse``), listing only ``.safetensors``.

``folder_paths.add_model_folder_path`` creates a new folder key with an empty extension set,
which matches every file (a README or a half-written ``.tmp`` would show in the dropdown), so
the filter is set explicitly. Paths a user already gave under ``quantsparse`` in
``extra_model_paths.yaml`` (read before custom nodes load) are kept.
"""

from __future__ import annotations

import os

import folder_paths

FOLDER = "quantsparse"
EXTENSIONS = {".safetensors"}


def register_folder() -> None:
    """Idempotent: ComfyUI may import the pack more than once (reloads, tests)."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    paths = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))[0]
    paths = list(paths)
    if default not in paths:
        paths.insert(0, default)
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(EXTENSIONS))


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives on Windows
        return False


def list_checkpoints() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


def checkpoint_path(name: str) -> str:
    """Full path of a file picked in a widget; it must name a ``.safetensors`` inside the folder.

    The combo's value comes from the client: a crafted prompt could send ``../../x`` or an
    absolute path. ComfyUI normalises those into the folder, but the check here does not rely
    on that and says what was wrong.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("no QuantSparse checkpoint selected: put a .safetensors file in models/quantsparse/")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":"):
        raise ValueError(f"checkpoint name {name!r} must be a file name inside models/{FOLDER}/, not a path outside it")
    if os.path.splitext(name)[1].lower() not in EXTENSIONS:
        raise ValueError(f"checkpoint {name!r} is not a .safetensors file; QuantSparse loads only .safetensors")
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None or not os.path.isfile(path):
        raise ValueError(f"checkpoint {name!r} is not in models/{FOLDER}/ (it may have been moved or deleted); put "
                         "it there and press R to refresh the list, or pick another")
    full = os.path.normpath(os.path.abspath(path))
    roots = [os.path.normpath(os.path.abspath(p)) for p in folder_paths.get_folder_paths(FOLDER)]
    if not any(_inside(full, r) for r in roots):
        raise ValueError(f"checkpoint {name!r} resolves outside the {FOLDER} model folders")
    return path
