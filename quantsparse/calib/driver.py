"""Block-wise MSAD calibration of a whole model (its family's blocks in order, e.g. HunyuanVideo's double
then single blocks), resumable.

Input: the model (BF16, on the host) and captured model-level samples (latent, timestep, text
conditioning at points spread over real sampling runs; ``capture.py``). Each block is calibrated on the
full model's inputs to it (FlatQuant style: the full-precision chain, not the quantized one), which are
the full model's outputs of the block before: so only one block boundary is ever held.

The work folder makes it resumable and deterministic:

    state.json            fingerprint (settings, model, capture) and the blocks done, in order
    samples/              the captured model-level samples (a resumed run does not sample the model again)
    inputs/               the first block's inputs (``calib.store`` sets: one safetensors per sample)
    acts/<block>/         the full model's outputs of <block> = the next block's inputs
    params/<block>.safetensors   learned smoothing and clipping of <block>, its losses in the metadata

A restarted calibration with the same fingerprint skips the blocks done and continues from the saved
boundary; every random choice is seeded by (seed, block), so the result equals an uninterrupted run.
A folder whose finished blocks have another fingerprint is never discarded silently: the run stops and
names what differs (``WorkMismatch``) unless asked to restart. Nothing here writes the checkpoint; the
caller exports only when every block is done (``calib.export``), so an interrupted run leaves none.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..core.errors import QuantSparseError, public
from ..core.paths import PathError
from ..models import registry
from .block import calibrate_block
from .settings import CalibSettings
from .store import (
    DEFAULT_MEMORY_BUDGET,
    ActivationSet,
    ActivationWriter,
    load_tensors,
    read_metadata,
    save_tensors_atomic,
    write_json_atomic,
)

STATE = "state.json"
WORK_VERSION = 2


@dataclass
class CalibrationResult:
    params: dict[str, tuple[Optional[torch.Tensor], torch.Tensor]]  # ComfyUI layer prefix -> (smooth, clip)
    blocks: dict[str, dict]  # block key -> metrics
    seconds: float
    resumed_blocks: int = 0


@dataclass
class RunOptions:
    """How to run (not what to compute: none of this changes the result)."""

    device: str = "cpu"
    dtype: Optional[torch.dtype] = None  # None: the model's
    memory_budget: int = DEFAULT_MEMORY_BUDGET  # host bytes of activations kept in memory per boundary
    device_cache_bytes: int = 4 << 30  # targets kept on the device when they fit
    progress: Optional[Callable[[int, int, str], None]] = None  # (blocks done, total, block key)
    check_stop: Optional[Callable[[], None]] = None  # raises to interrupt
    log: Optional[Callable[[str], None]] = None
    extra: dict = field(default_factory=dict)


def model_fingerprint(model) -> str:
    """Cheap identity of the weights: dims plus a float64 checksum of the Linears the family's adapter names
    (``identity_weights``: each block's first)."""
    return state_fingerprint(model.dims, model.state_dict())


def state_fingerprint(dims, state: dict[str, torch.Tensor], dtype: Optional[torch.dtype] = None) -> str:
    """``model_fingerprint`` from the dims and a state dict (ComfyUI's own model's, without a copy); ``dtype``
    casts each weight first, so that a model held in FP16 is the BF16 model calibration runs."""
    marks = registry.adapter_for(dims).identity_weights
    h = hashlib.sha256(json.dumps(dims.to_dict(), sort_keys=True).encode())
    for name, t in state.items():
        if name.endswith(".weight") and any(m in name for m in marks):
            t = (t if dtype is None else t.to(dtype)).double()
            h.update(f"{name}:{float(t.sum()):.12e}:{float(t.abs().sum()):.12e}".encode())
    return h.hexdigest()[:16]


def samples_fingerprint(samples: Sequence[dict[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for s in samples:
        for k in sorted(s):
            t = s[k]
            h.update(f"{k}:{tuple(t.shape)}:{t.dtype}:{float(t.double().sum()):.12e}".encode())
    return h.hexdigest()[:16]


def _load_params(path: str) -> tuple[dict[str, tuple[Optional[torch.Tensor], torch.Tensor]], dict]:
    tensors = load_tensors(path)
    meta = read_metadata(path)
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    params = {n: (tensors.get(f"{n}.smooth"), tensors[f"{n}.clip"]) for n in names}
    return params, meta["metrics"]


def _save_params(path: str, params, metrics: dict) -> None:
    tensors = {}
    for name, (smooth, clip) in params.items():
        if smooth is not None:
            tensors[f"{name}.smooth"] = smooth
        tensors[f"{name}.clip"] = clip
    save_tensors_atomic(path, tensors, {"metrics": metrics})


@torch.no_grad()
def prepare_inputs(model, samples: Sequence[dict[str, torch.Tensor]], folder: str, *, device="cpu",
                   memory_budget: int = DEFAULT_MEMORY_BUDGET) -> ActivationSet:
    """Model-level samples -> the first block's inputs, through the full model's embedders (the family's
    ``calib_first_inputs``)."""
    adapter = registry.adapter_for(model.dims)
    writer = ActivationWriter(folder, memory_budget=memory_budget)
    dev = torch.device(device)
    moved = adapter.calib_embedders(model)
    for mod in moved:
        mod.to(dev)
    try:
        for s in samples:
            writer.add(adapter.calib_first_inputs(model, s, dev))
    finally:
        for mod in moved:
            mod.to("cpu")
    return writer.finish()


class WorkMismatch(QuantSparseError):
    """The work folder holds finished blocks of a calibration with other settings, model or prompts."""


public(WorkMismatch)

# The fingerprint entries that are hashes, by their place in it, as named to the user; every other entry is a
# setting named by its flag (the node's widget has the same name) and shown with both values.
_LABELS = {("model",): "the model's weights", ("samples",): "the calibration samples",
           ("capture", "conditioning"): "the prompts (conditioning)"}


def fingerprint_differences(old: dict, new: dict, path: tuple = ()) -> list[str]:
    """Human lines for what differs between two fingerprints, e.g. ``epochs: 15 in the folder, 10 now``."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
        if a == b:
            continue
        where = (*path, key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_differences(a, b, where)
        elif where in _LABELS:
            out.append(f"{_LABELS[where]} differ")
        else:
            out.append(f"{key}: {a} in the folder, {b} now")
    return out


def same_capture(old: dict, new: dict) -> bool:
    """Whether two run fingerprints capture the same samples: same model, capture entry and seed (the seed
    draws the capture's noise)."""
    return (old.get("model") == new.get("model") and old.get("capture") == new.get("capture")
            and bool(new.get("capture")) and (old.get("settings") or {}).get("seed")
            == (new.get("settings") or {}).get("seed"))


class WorkFolder:
    """The state file, the captured samples and the paths of one calibration's work folder.

    A folder with the same fingerprint continues where it stopped. One with finished blocks of another
    fingerprint is never discarded silently: it raises :class:`WorkMismatch` naming what differs, unless
    ``restart`` (then it is cleared, and the log says so).
    """

    SUBFOLDERS = ("inputs", "acts", "params", "samples")

    def __init__(self, root: str, fingerprint: dict, *, restart: bool = False, log=None):
        self.root = root
        self.fingerprint = fingerprint
        self.log = log
        path = os.path.join(root, STATE)
        if os.path.isdir(root) and not os.path.isfile(path) and os.listdir(root):
            raise PathError(f"the work folder {root} exists and holds other files (it is not a QuantSparse work "
                            "folder); give an empty or new folder.")
        os.makedirs(root, exist_ok=True)
        self.state = {"version": WORK_VERSION, "fingerprint": fingerprint, "done": []}
        if os.path.isfile(path):
            old = self._read_state(path)
            if restart:
                if old is not None and old.get("done") and log:
                    log(f"--restart: discarding {len(old['done'])} finished block(s) in {root}")
                self._clear(old)
            elif old is None or old.get("version") != WORK_VERSION:
                if old is not None and old.get("done"):
                    raise WorkMismatch(f"the work folder {root} was written by another version of QuantSparse; "
                                       "set restart (--restart) to discard it and start over.")
                self._clear()
            else:
                diffs = fingerprint_differences(old.get("fingerprint", {}), fingerprint)
                if diffs and old.get("done"):
                    raise WorkMismatch(
                        f"the work folder {root} holds {len(old['done'])} finished block(s) of a calibration with "
                        f"other settings: {'; '.join(diffs)}. Run again with the folder's values to continue, or "
                        "set restart (--restart) to discard those blocks and start over.")
                if diffs:
                    self._clear(old)  # nothing finished: nothing to lose
                else:
                    self.state = old
        for sub in ("acts", "params"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        self.save()

    @staticmethod
    def _read_state(path: str) -> Optional[dict]:
        try:
            with open(path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def _clear(self, old: Optional[dict] = None) -> None:
        """Start over; the captured samples stay when ``old`` state captured them the same way (an hour of
        sampling is not repeated for a change of, say, epochs)."""
        keep = old is not None and old.get("samples_fingerprint") is not None and same_capture(
            old.get("fingerprint", {}), self.fingerprint)
        for sub in (*self.SUBFOLDERS, STATE):
            if keep and sub == "samples":
                continue
            p = os.path.join(self.root, sub)
            shutil.rmtree(p) if os.path.isdir(p) else (os.remove(p) if os.path.exists(p) else None)
        self.state = {"version": WORK_VERSION, "fingerprint": self.fingerprint, "done": []}
        if keep:
            self.state["samples_fingerprint"] = old["samples_fingerprint"]
            if self.log:
                self.log(f"keeping the samples captured earlier in {self.root} (same model, prompts, capture "
                         "settings and seed)")

    @property
    def done(self) -> list[str]:
        return self.state["done"]

    def mark_done(self, key: str) -> None:
        self.state["done"].append(key)
        self.save()

    def save(self) -> None:
        write_json_atomic(os.path.join(self.root, STATE), self.state)

    def inputs(self) -> str:
        return os.path.join(self.root, "inputs")

    def acts(self, key: str) -> str:
        return os.path.join(self.root, "acts", key)

    def params(self, key: str) -> str:
        return os.path.join(self.root, "params", f"{key}.safetensors")

    # -- the captured model-level samples, kept so that a resumed run does not sample the model again

    def cached_samples(self) -> Optional[list[dict[str, torch.Tensor]]]:
        """The samples a previous run captured, if complete and unchanged; None otherwise."""
        folder = os.path.join(self.root, "samples")
        recorded = self.state.get("samples_fingerprint")
        if recorded is None or not ActivationSet.is_complete(folder):
            return None
        try:
            samples = list(ActivationSet.open(folder, memory_budget=0))
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            if self.log:
                self.log(f"the captured samples in {folder} cannot be read ({e}); capturing again")
            return None
        if samples_fingerprint(samples) != recorded:
            if self.log:
                self.log(f"the captured samples in {folder} changed on disk; capturing again")
            return None
        return samples

    def keep_samples(self, samples: Sequence[dict[str, torch.Tensor]]) -> None:
        """Store freshly captured samples; finished blocks made from other samples cannot be kept."""
        fp = samples_fingerprint(samples)
        recorded = self.state.get("samples_fingerprint")
        if recorded is not None and recorded != fp and self.done:
            raise WorkMismatch(f"the samples captured now differ from those the {len(self.done)} finished block(s) "
                               f"in {self.root} were calibrated on (another device or torch version samples "
                               "differently); set restart (--restart) to start over.")
        folder = os.path.join(self.root, "samples")
        if self.state.get("samples_fingerprint") != fp or not ActivationSet.is_complete(folder):
            writer = ActivationWriter(folder, memory_budget=0)
            for s in samples:
                writer.add(s)
            writer.finish()
        self.state["samples_fingerprint"] = fp
        self.save()


def calibrate_model(model, samples: Sequence[dict[str, torch.Tensor]], settings: CalibSettings,
                    work: WorkFolder | str, options: Optional[RunOptions] = None) -> CalibrationResult:
    """Calibrate every block of ``model`` (unchanged) on the model-level ``samples``; see the module doc.

    ``work`` is an open :class:`WorkFolder`, or a folder path (its fingerprint is then the settings, the
    model and the samples)."""
    opt = options or RunOptions()
    t0 = time.perf_counter()
    if not isinstance(work, WorkFolder):
        fingerprint = {"settings": settings.to_dict(), "model": model_fingerprint(model),
                       "samples": samples_fingerprint(samples), "count": len(samples)}
        work = WorkFolder(work, fingerprint, log=opt.log)
    work_dir = work.root
    adapter = registry.adapter_for(model.dims)
    order = adapter.calib_blocks(model)
    total = len(order)
    first_todo = _first_todo(work, order)
    params: dict[str, tuple] = {}
    blocks: dict[str, dict] = {}
    for ref in order[:first_todo]:
        p, metrics = _load_params(work.params(ref.key))
        params.update({f"{ref.prefix}.{name}": v for name, v in p.items()})
        blocks[ref.key] = metrics
    if first_todo:
        current = ActivationSet.open(work.acts(order[first_todo - 1].key), memory_budget=opt.memory_budget)
        if opt.log:
            opt.log(f"resuming after {first_todo} calibrated block(s) from {work_dir}")
        if opt.progress is not None:
            opt.progress(first_todo, total, order[first_todo - 1].key)
    elif ActivationSet.is_complete(work.inputs()):
        current = ActivationSet.open(work.inputs(), memory_budget=opt.memory_budget)
    else:
        current = prepare_inputs(model, samples, work.inputs(), device=opt.device, memory_budget=opt.memory_budget)
    for n in range(first_todo, total):
        if opt.check_stop is not None:
            opt.check_stop()
        ref = order[n]
        writer = ActivationWriter(work.acts(ref.key), memory_budget=opt.memory_budget)
        last_of_kind = n + 1 == total or order[n + 1].kind != ref.kind
        inputs = current

        def on_outputs(idx, out, inputs=inputs, writer=writer, ref=ref, last_of_kind=last_of_kind):
            writer.add(adapter.calib_next_inputs(ref, last_of_kind, inputs[idx], out))

        result = calibrate_block(ref, current, settings, model.dims, device=opt.device, dtype=opt.dtype,
                                 on_outputs=on_outputs, check_stop=opt.check_stop,
                                 device_cache_bytes=opt.device_cache_bytes, log=opt.log)
        current = writer.finish()
        _save_params(work.params(ref.key), result.params, result.metrics)
        work.mark_done(ref.key)
        if n > 0 and os.path.isdir(work.acts(order[n - 1].key)):
            shutil.rmtree(work.acts(order[n - 1].key))  # the boundary before is no longer needed
        m = result.metrics
        if opt.log:
            opt.log(f"{ref.key}: output MSE {m['rtn']['out']:.4g} (round-to-nearest) -> {m['final']['out']:.4g}; "
                    f"global {m['rtn']['global']:.3g} -> {m['final']['global']:.3g}; "
                    f"local {m['rtn']['local']:.3g} -> {m['final']['local']:.3g}; {m['seconds']:.1f} s")
        params.update({f"{ref.prefix}.{name}": v for name, v in result.params.items()})
        blocks[ref.key] = m
        if opt.progress is not None:
            opt.progress(n + 1, total, ref.key)
    return CalibrationResult(params, blocks, time.perf_counter() - t0, first_todo)


def _first_todo(work: WorkFolder, order) -> int:
    """Blocks done in order, with their parameters, and the saved boundary after the last of them."""
    n = 0
    while n < len(order) and n < len(work.done) and work.done[n] == order[n].key \
            and os.path.isfile(work.params(work.done[n])):
        n += 1
    if n and not ActivationSet.is_complete(work.acts(order[n - 1].key)):
        n = 0  # the boundary is gone (deleted by hand): start over
    if n != len(work.done):
        work.state["done"] = work.done[:n]
        work.save()
    return n


def clear_work(work_dir: str) -> None:
    """Remove a finished calibration's work folder (after its checkpoint is written)."""
    if os.path.isdir(work_dir) and os.path.isfile(os.path.join(work_dir, STATE)):
        shutil.rmtree(work_dir)
