"""Paths checked before any work, and files that appear whole or not at all.

Every command and node goes through here before it spends a minute of work: inputs must exist and be
files of the right kind; an output must be writable (probed, not guessed: root ignores permission bits,
a read-only mount does not), must not exist unless the user said ``overwrite``, and must never be one
of the command's own inputs, whatever flag is given (compared by resolved path and by inode, so a
symlink or a hard link to the source is caught too).

Files are written as ``.NAME.RANDOM.partial`` beside the target, locked (``flock``) while being written,
then fsynced and renamed onto the target. A killed run (SIGKILL, power loss) leaves its partial file
behind unlocked; the next run of the same command finds it, says so and removes it. A partial that is
still locked belongs to a run in progress, and a second run refuses to race it.
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from .errors import QuantSparseError, public

try:  # POSIX; on Windows a partial counts as stale once it is an hour old
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

PARTIAL = ".partial"
STALE_WITHOUT_LOCKS_S = 3600


@public
class PathError(QuantSparseError):
    """A path that cannot be used as given; the message says which and what to do."""


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name one file: the same resolved path, or the same inode."""
    pa, pb = Path(a), Path(b)
    if pa.resolve() == pb.resolve():
        return True
    try:
        sa, sb = pa.stat(), pb.stat()
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def input_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as an existing, readable file; its name's suffix is not checked (``read_header`` reads what the
    content is, and names a pickle or a GGUF file for what it is)."""
    p = Path(path)
    if not p.exists():
        hint = ""
        if not p.parent.is_dir():
            hint = f" (the folder {p.parent} does not exist either)"
        raise PathError(f"{what} {p} does not exist{hint}; check the path.")
    if p.is_dir():
        raise PathError(f"{what} {p} is a folder; give the file inside it.")
    if not os.access(p, os.R_OK):
        raise PathError(f"{what} {p} cannot be read (permission denied); fix its permissions.")
    return p


def probe_writable(folder: Path, what: str) -> None:
    """Create and remove a file in ``folder``: the only honest test that an output can be written there."""
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".quantsparse-probe-", suffix=PARTIAL)
    except OSError as e:
        reason = {errno.EROFS: "it is on a read-only file system", errno.EACCES: "permission denied",
                  errno.EPERM: "permission denied", errno.ENOSPC: "the disk is full"}.get(e.errno, e.strerror)
        raise PathError(f"cannot write {what} into the folder {folder}: {reason}; choose a folder you can "
                        "write to.") from None
    os.close(fd)
    os.unlink(tmp)


def output_file(path: str | os.PathLike, what: str, *, inputs: Iterable[str | os.PathLike] = (),
                overwrite: bool = False, suffix: Optional[str] = ".safetensors",
                replaceable: Optional[Callable[[Path], Optional[str]]] = None) -> Path:
    """Check that ``path`` can become ``what`` (before any work) and return it.

    ``replaceable(path)`` may return a reason why an existing file must not be replaced even with
    ``overwrite`` (a checkpoint command only replaces a QuantSparse checkpoint, never a model).
    """
    p = Path(path)
    for inp in inputs:
        if inp is not None and same_file(p, inp):
            raise PathError(f"{what} {p} is the same file as the input {inp}; a command never writes over its "
                            "own input (not even with --overwrite). Give the output a new name.")
    if suffix and p.suffix.lower() != suffix:
        raise PathError(f"{what} {p} must end in {suffix}; choose a name like {p.stem or 'output'}{suffix}.")
    if p.is_dir():
        raise PathError(f"{what} {p} is a folder; give a file name ending in {suffix or 'a suffix'}.")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise PathError(f"the folder {parent} for {what} does not exist; create it first (mkdir -p {parent}).")
    if not parent.is_dir():
        raise PathError(f"{parent} (the folder for {what}) is a file, not a folder.")
    probe_writable(parent, what)
    if p.exists():
        if not overwrite:
            raise PathError(f"{what} {p} already exists; choose another name, or set overwrite (--overwrite) to "
                            "replace it.")
        why = replaceable(p) if replaceable is not None else None
        if why:
            raise PathError(f"{what} {p} exists and is {why}; --overwrite replaces only a file this command "
                            "wrote. Choose another name.")
    return p


def output_folder(path: str | os.PathLike, what: str, *, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Check that the folder ``path`` exists or can be created, and is writable; creates nothing."""
    p = Path(path)
    for inp in inputs:
        if inp is not None and Path(inp).exists() and p.exists() and same_file(p, inp):
            raise PathError(f"{what} {p} is the input {inp}; choose another folder.")
    if p.exists() and not p.is_dir():
        raise PathError(f"{what} {p} is a file, not a folder; give a folder name (it is created if missing).")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise PathError(f"{what} {p} cannot be created: {probe} is a file, not a folder.")
    probe_writable(probe, what)
    return p


# ------------------------------------------------------------------------------------ partial files

def _lock(fd: int) -> bool:
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def partial_files(target: str | os.PathLike) -> list[Path]:
    """Partial files of ``target`` (``.NAME.*.partial`` beside it)."""
    t = Path(target)
    folder = t.parent if str(t.parent) else Path(".")
    if not folder.is_dir():
        return []
    return sorted(folder.glob(f".{t.name}.*{PARTIAL}"))


def _in_use(path: Path) -> bool:
    if fcntl is None:  # pragma: no cover
        return time.time() - path.stat().st_mtime < STALE_WITHOUT_LOCKS_S
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return not _lock(fd)
    finally:
        os.close(fd)


def _remove_stale(partials: Iterable[Path], busy: Callable[[Path], str]) -> list[tuple[Path, int]]:
    """Remove unlocked partial files: (path, size) of each removed; a locked one means another run is busy."""
    removed = []
    for p in partials:
        try:
            if _in_use(p):
                raise PathError(busy(p))
            size = p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            continue
        removed.append((p, size))
    return removed


def clean_stale_partials(target: str | os.PathLike, log: Optional[Callable[[str], None]] = None) -> list[Path]:
    """Remove the partial files an interrupted run left for ``target``, saying so; refuse when another run
    is writing ``target`` right now."""
    removed = _remove_stale(partial_files(target), lambda p: f"another QuantSparse run is writing {target} right "
                            f"now ({p.name}); wait for it to finish or stop it, then run again.")
    for p, size in removed:
        if log is not None:
            log(f"removed {p} ({human_bytes(size)}), left by an interrupted run")
    return [p for p, _ in removed]


def clean_stale_partials_under(folder: str | os.PathLike, log: Optional[Callable[[str], None]] = None) -> list[Path]:
    """The same for every partial file anywhere under ``folder`` (a resumable work folder), said in one line."""
    root = Path(folder)
    if not root.is_dir():
        return []
    removed = _remove_stale(sorted(root.rglob(f".*{PARTIAL}")), lambda p: f"another QuantSparse run is using "
                            f"{root} right now ({p}); wait for it to finish or stop it, then run again.")
    if removed and log is not None:
        log(f"removed {len(removed)} partial file(s) under {root}, left by an interrupted run")
    return [p for p, _ in removed]


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


class PartialFile:
    """A locked ``.NAME.RANDOM.partial`` beside ``target`` that becomes ``target`` on :meth:`commit`."""

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)
        folder = self.target.parent if str(self.target.parent) else Path(".")
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{self.target.name}.", suffix=PARTIAL)
        self.fd: Optional[int] = fd
        self.path: Optional[Path] = Path(tmp)
        _lock(fd)

    def commit(self, *, overwrite: bool) -> None:
        """fsync, then rename onto the target (refused when the target appeared meanwhile, unless ``overwrite``)."""
        try:
            os.fsync(self.fd)
            os.chmod(self.path, 0o666 & ~_umask())
            if self.target.exists() and not overwrite:
                raise PathError(f"{self.target} appeared while it was being written; nothing was replaced.")
            os.replace(self.path, self.target)
            self.path = None
            _fsync_dir(self.target.parent)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close and remove the partial file (a no-op after a commit)."""
        if self.fd is not None:
            try:
                os.close(self.fd)
            finally:
                self.fd = None
        if self.path is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.path = None


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> None:
    """``path`` holds ``data`` completely, or is as it was."""
    part = PartialFile(path)
    try:
        view = memoryview(data)
        while len(view):
            view = view[os.write(part.fd, view):]
        part.commit(overwrite=overwrite)
    except BaseException:
        part.abort()
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """``write_bytes_atomic`` of UTF-8 text (reports, previews, results, state files)."""
    write_bytes_atomic(path, text.encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder if str(folder) else ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
