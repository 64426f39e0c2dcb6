"""Every command against a table of bad inputs: a refusal, never a traceback, and nothing touched.

Each case runs a real command line (``quantsparse convert | calibrate | inspect | demo``) in a folder of
its own and asserts: a non-zero exit; one line on stderr, ``quantsparse <command>: error: ...``, that
names the problem and the fix; no traceback; and every file in the folder byte for byte as it was, with
nothing left behind (no partial file, no empty folder). Cases run in-process through ``cli.main`` (an
exception escaping it would be the traceback a user sees); ``test_commands_as_a_user_runs_them`` runs a
few of them as real processes, through the installed command and ``python -m quantsparse``.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from safetensors.torch import save_file

from comfyui_quantsparse.quantsparse import cli
from comfyui_quantsparse.quantsparse.core.config import QuantSparseConfig
from comfyui_quantsparse.quantsparse.checkpoint.convert import convert_file
from comfyui_quantsparse.quantsparse.models.hunyuan_video.dims import HunyuanVideoDims
from comfyui_quantsparse.quantsparse.models.hunyuan_video.random_weights import make_random_state_dict
from comfyui_quantsparse.quantsparse.core.paths import PartialFile
from comfyui_quantsparse.quantsparse.models import registry

REPO = Path(__file__).resolve().parents[1]
DIMS = HunyuanVideoDims.tiny()
CALIB = ["--random-prompts", "1", "--width", "64", "--height", "64", "--frames", "5", "--samples", "2",
         "--steps", "2", "--epochs", "1", "--device", "cpu"]


# ------------------------------------------------------------------------------------------ files

@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, bytes]:
    """The inputs once, as bytes: each case copies what it needs into its own folder."""
    d = tmp_path_factory.mktemp("originals")
    sd = make_random_state_dict(DIMS, seed=0)
    save_file(sd, str(d / "model.safetensors"))
    convert_file(d / "model.safetensors", d / "ckpt.safetensors", QuantSparseConfig(bits="w4a8"))
    save_file({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(8, 8),
               "model.diffusion_model.txt_in.individual_token_refiner.blocks.0.norm1.weight": torch.zeros(8),
               "model.diffusion_model.vision_in.proj.0.weight": torch.zeros(8)}, str(d / "hv15.safetensors"))
    wan = registry.by_name("wan")
    save_file(wan.random_state_dict(wan.tiny_dims(), seed=0), str(d / "wan.safetensors"))
    g = torch.Generator().manual_seed(0)
    ctx = lambda: torch.randn(6, DIMS.context_in_dim, generator=g)  # noqa: E731
    pooled = lambda: torch.randn(768, generator=g)  # noqa: E731
    conds = {
        "cond_ok": {"context.0": ctx(), "pooled.0": pooled()},
        "cond_no_pooled": {"context.0": ctx(), "pooled.0": pooled(), "context.1": ctx()},
        "cond_stray": {"context.0": ctx(), "pooled.0": pooled(), "prompt_0": ctx()},
        "cond_channels": {"context.0": torch.randn(6, DIMS.context_in_dim + 1, generator=g), "pooled.0": pooled()},
        "cond_gap": {"context.0": ctx(), "pooled.0": pooled(), "context.2": ctx(), "pooled.2": pooled()},
        "cond_mask": {"context.0": ctx(), "pooled.0": pooled(), "mask.0": torch.ones(5)},
    }
    for name, tensors in conds.items():
        save_file(tensors, str(d / f"{name}.safetensors"))
    out = {p.name: p.read_bytes() for p in d.iterdir()}
    out["notes.txt"] = b"my notes, not a model\n"
    data = out["ckpt.safetensors"]
    out["truncated.safetensors"] = data[: len(data) - 4096]
    return out


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` (hidden ones included) with the sha256 of its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def unwritable_folder(tmp: Path) -> Path:
    """A folder this process cannot create files in: chmod as a normal user; as root (permission bits do not
    stop root) a folder of sysfs, which refuses new files to everyone."""
    if os.geteuid() != 0:
        ro = tmp / "read_only"
        ro.mkdir()
        ro.chmod(0o555)
        return ro
    for candidate in (Path("/sys/kernel"), Path("/sys")):
        if candidate.is_dir():
            try:
                fd, name = tempfile.mkstemp(dir=candidate)
            except OSError:
                return candidate
            os.close(fd)
            os.unlink(name)
    pytest.skip("running as root and no read-only folder (sysfs) is available to test an unwritable destination")


# ------------------------------------------------------------------------------------------ the table

@dataclass(frozen=True)
class Case:
    id: str
    files: tuple[str, ...]  # originals copied into the case's folder
    argv: Callable[[Path], list[str]]  # the folder -> the command line
    problem: str  # the message names the problem...
    fix: str  # ...and what to do
    setup: Optional[Callable[[Path], None]] = None
    skip: Optional[Callable[[], Optional[str]]] = None


def _link(d: Path) -> None:
    os.link(d / "model.safetensors", d / "linked.safetensors")


def _ro_target(d: Path) -> str:
    return str(unwritable_folder(d) / "out.safetensors")


def _busy_partial(d: Path):
    """A conversion of out.safetensors in progress: its partial file, locked by this process."""
    part = PartialFile(d / "out.safetensors")
    _HELD.append(part)


_HELD: list[PartialFile] = []


def _other_files_folder(d: Path) -> None:
    (d / "work").mkdir()
    (d / "work" / "thesis.txt").write_text("do not delete")


def _cuda_present() -> Optional[str]:
    return "this torch sees a CUDA GPU: the CPU-only refusal cannot be shown here" if torch.cuda.is_available() else None


CASES = [
    # convert
    Case("convert-missing-source", (), lambda d: ["convert", str(d / "nope.safetensors"), str(d / "out.safetensors")],
         "does not exist", "check the path"),
    Case("convert-source-is-folder", (), lambda d: ["convert", str(d), str(d / "out.safetensors")],
         "is a folder", "give the file"),
    Case("convert-source-is-text", ("notes.txt",), lambda d: ["convert", str(d / "notes.txt"), str(d / "o.safetensors")],
         "is not a safetensors file", "Use a .safetensors file"),
    Case("convert-source-is-checkpoint", ("ckpt.safetensors",),
         lambda d: ["convert", str(d / "ckpt.safetensors"), str(d / "out.safetensors")],
         "already a QuantSparse checkpoint", "convert the original BF16"),
    Case("convert-source-is-hv15", ("hv15.safetensors",),
         lambda d: ["convert", str(d / "hv15.safetensors"), str(d / "out.safetensors")],
         "looks like a HunyuanVideo 1.5 model (not supported yet)", "Supported: HunyuanVideo T2V"),
    Case("convert-onto-its-source", ("model.safetensors",),
         lambda d: ["convert", str(d / "model.safetensors"), str(d / "model.safetensors"), "--overwrite"],
         "same file as the input", "Give the output a new name"),
    Case("convert-onto-a-hard-link-of-its-source", ("model.safetensors",),
         lambda d: ["convert", str(d / "model.safetensors"), str(d / "linked.safetensors"), "--overwrite"],
         "same file as the input", "Give the output a new name", setup=_link),
    Case("convert-existing-output", ("model.safetensors", "ckpt.safetensors"),
         lambda d: ["convert", str(d / "model.safetensors"), str(d / "ckpt.safetensors")],
         "already exists", "set overwrite (--overwrite) to replace it"),
    Case("convert-overwrite-a-model", ("model.safetensors", "hv15.safetensors"),
         lambda d: ["convert", str(d / "model.safetensors"), str(d / "hv15.safetensors"), "--overwrite"],
         "is not a QuantSparse checkpoint", "Choose another name"),
    Case("convert-into-missing-folder", ("model.safetensors",),
         lambda d: ["convert", str(d / "model.safetensors"), str(d / "no" / "out.safetensors")],
         "does not exist", "create it first"),
    Case("convert-into-read-only-folder", ("model.safetensors",),
         lambda d: ["convert", str(d / "model.safetensors"), _ro_target(d)],
         "cannot write", "choose a folder you can write to"),
    Case("convert-output-not-safetensors", ("model.safetensors",),
         lambda d: ["convert", str(d / "model.safetensors"), str(d / "out.ckpt")],
         "must end in .safetensors", "choose a name like out.safetensors"),
    Case("convert-output-is-folder", ("model.safetensors",),
         lambda d: ["convert", str(d / "model.safetensors"), str(d / "sub.safetensors")],
         "is a folder", "give a file name", setup=lambda d: (d / "sub.safetensors").mkdir()),
    Case("convert-while-another-run-writes", ("model.safetensors",),
         lambda d: ["convert", str(d / "model.safetensors"), str(d / "out.safetensors")],
         "another QuantSparse run is writing", "wait for it to finish", setup=_busy_partial),
    # calibrate
    Case("calibrate-onto-its-source", ("model.safetensors",),
         lambda d: ["calibrate", str(d / "model.safetensors"), str(d / "model.safetensors"), "--overwrite", *CALIB],
         "same file as the input", "Give the output a new name"),
    Case("calibrate-onto-its-conditioning", ("model.safetensors", "cond_ok.safetensors"),
         lambda d: ["calibrate", str(d / "model.safetensors"), str(d / "cond_ok.safetensors"), "--overwrite",
                    "--conditioning", str(d / "cond_ok.safetensors"), *CALIB[2:]],
         "same file as the input", "Give the output a new name"),
    Case("calibrate-source-is-checkpoint", ("ckpt.safetensors",),
         lambda d: ["calibrate", str(d / "ckpt.safetensors"), str(d / "out.safetensors"), *CALIB],
         "already a QuantSparse checkpoint", "convert the original BF16"),
    Case("calibrate-a-family-without-calibration", ("wan.safetensors",),
         lambda d: ["calibrate", str(d / "wan.safetensors"), str(d / "out.safetensors"), *CALIB],
         "MSAD calibration of Wan T2V dim 256 is not supported yet", "`quantsparse convert` instead"),
    Case("calibrate-conditioning-missing", ("model.safetensors",),
         lambda d: ["calibrate", str(d / "model.safetensors"), str(d / "out.safetensors"),
                    "--conditioning", str(d / "prompts.safetensors"), *CALIB[2:]],
         "does not exist", "check the path"),
    Case("calibrate-conditioning-not-safetensors", ("model.safetensors", "notes.txt"),
         lambda d: ["calibrate", str(d / "model.safetensors"), str(d / "out.safetensors"),
                    "--conditioning", str(d / "notes.txt"), *CALIB[2:]],
         "is not a safetensors file", "Use a .safetensors file"),
    Case("calibrate-conditioning-context-without-pooled", ("model.safetensors", "cond_no_pooled.safetensors"),
         lambda d: ["calibrate", str(d / "model.safetensors"), str(d / "out.safetensors"),
                    "--conditioning", str(d / "cond_no_pooled.safetensors"), *CALIB[2:]],
         "context.1 without pooled.1", "every prompt needs both context.N and pooled.N"),
    Case("calibrate-conditioning-stray-tensor", ("model.safetensors", "cond_stray.safetensors"),
         lambda d: ["calibrate", str(d / "model.safetensors"), str(d / "out.safetensors"),
                    "--conditioning", str(d / "cond_stray.safetensors"), *CALIB[2:]],
         "unexpected tensors ['prompt_0']", "expected context.N"),
    Case("calibrate-conditioning-numbering-gap", ("model.safetensors", "cond_gap.safetensors"),
         lambda d: ["calibrate", str(d / "model.safetensors"), str(d / "out.safetensors"),
                    "--conditioning", str(d / "cond_gap.safetensors"), *CALIB[2:]],
         "context.1 is missing", "numbered 0..1 without gaps"),
    Case("calibrate-conditioning-wrong-channels", ("model.safetensors", "cond_channels.safetensors"),
         lambda d: ["calibrate", str(d / "model.safetensors"), str(d / "out.safetensors"),
                    "--conditioning", str(d / "cond_channels.safetensors"), *CALIB[2:]],
         f"has {DIMS.context_in_dim + 1} channels", "save the embeddings of this model's text encoder"),
    Case("calibrate-conditioning-mask-length", ("model.safetensors", "cond_mask.safetensors"),
         lambda d: ["calibrate", str(d / "model.safetensors"), str(d / "out.safetensors"),
                    "--conditioning", str(d / "cond_mask.safetensors"), *CALIB[2:]],
         "mask.0 has 5 entries but context.0 has 6 tokens", "one 0/1 entry per token"),
    Case("calibrate-cuda-on-cpu-torch", ("model.safetensors",),
         lambda d: ["calibrate", str(d / "model.safetensors"), str(d / "out.safetensors"), *CALIB[:-2],
                    "--device", "cuda"],
         "is a CPU-only build", "use --device cpu", skip=_cuda_present),
    Case("calibrate-unknown-device", ("model.safetensors",),
         lambda d: ["calibrate", str(d / "model.safetensors"), str(d / "out.safetensors"), *CALIB[:-2],
                    "--device", "gpu0"],
         "is not a device", "use cpu, cuda"),
    Case("calibrate-into-read-only-folder", ("model.safetensors",),
         lambda d: ["calibrate", str(d / "model.safetensors"), _ro_target(d), *CALIB],
         "cannot write", "choose a folder you can write to"),
    Case("calibrate-into-missing-folder", ("model.safetensors",),
         lambda d: ["calibrate", str(d / "model.safetensors"), str(d / "no" / "out.safetensors"), *CALIB],
         "does not exist", "create it first"),
    Case("calibrate-existing-output", ("model.safetensors", "ckpt.safetensors"),
         lambda d: ["calibrate", str(d / "model.safetensors"), str(d / "ckpt.safetensors"), *CALIB],
         "already exists", "set overwrite (--overwrite) to replace it"),
    Case("calibrate-width-not-multiple-of-16", ("model.safetensors",),
         lambda d: ["calibrate", str(d / "model.safetensors"), str(d / "out.safetensors"), *CALIB, "--width", "100"],
         "multiples of 16, got 100x64", "width and height must be"),
    Case("calibrate-frames-not-4k-plus-1", ("model.safetensors",),
         lambda d: ["calibrate", str(d / "model.safetensors"), str(d / "out.safetensors"), *CALIB, "--frames", "6"],
         "got 6", "1, 5, 9, ... (4k + 1)"),
    Case("calibrate-zero-samples", ("model.safetensors",),
         lambda d: ["calibrate", str(d / "model.safetensors"), str(d / "out.safetensors"), *CALIB, "--samples", "0"],
         "(got 0, 1, 2)", "need at least one sample"),
    Case("calibrate-work-dir-with-other-files", ("model.safetensors",),
         lambda d: ["calibrate", str(d / "model.safetensors"), str(d / "out.safetensors"), *CALIB,
                    "--work-dir", str(d / "work")],
         "holds other files (it is not a QuantSparse work folder)", "give an empty or new folder",
         setup=_other_files_folder),
    Case("calibrate-work-dir-is-a-file", ("model.safetensors", "notes.txt"),
         lambda d: ["calibrate", str(d / "model.safetensors"), str(d / "out.safetensors"), *CALIB,
                    "--work-dir", str(d / "notes.txt")],
         "is a file, not a folder", "give a folder name"),
    # demo
    Case("demo-weights-is-a-checkpoint", ("ckpt.safetensors",),
         lambda d: ["demo", "--weights", str(d / "ckpt.safetensors"), "--out", str(d / "demo")],
         "is a QuantSparse checkpoint", "needs the full-precision proxy"),
    Case("demo-weights-missing", (), lambda d: ["demo", "--weights", str(d / "none.safetensors"), "--out",
                                                str(d / "demo")],
         "does not exist", "check the path"),
    Case("demo-weights-is-hv15", ("hv15.safetensors",),
         lambda d: ["demo", "--weights", str(d / "hv15.safetensors"), "--out", str(d / "demo")],
         "looks like a HunyuanVideo 1.5 model (not supported yet)", "Use the bundled proxy"),
    Case("demo-unknown-calibration", (), lambda d: ["demo", "--calibrate", "bogus", "--out", str(d / "demo")],
         "invalid choice: 'bogus'", "see quantsparse demo --help"),
    Case("demo-out-is-a-file", ("notes.txt",), lambda d: ["demo", "--out", str(d / "notes.txt")],
         "is a file, not a folder", "give a folder name"),
    Case("demo-out-holds-earlier-results", (), lambda d: ["demo", "--out", str(d / "demo")],
         "already holds an earlier demo's results (summary.json)", "pass --overwrite",
         setup=lambda d: ((d / "demo").mkdir(), (d / "demo" / "summary.json").write_text("{}"))),
    Case("demo-zero-clips", (), lambda d: ["demo", "--clips", "0", "--out", str(d / "demo")],
         "--clips 0", "must be at least 1"),
    # usage mistakes: argparse's message, on one line
    Case("convert-unknown-bits", ("model.safetensors",),
         lambda d: ["convert", str(d / "model.safetensors"), str(d / "o.safetensors"), "--bits", "w3a3"],
         "invalid choice: 'w3a3'", "see quantsparse convert --help"),
    # inspect
    Case("inspect-missing", (), lambda d: ["inspect", str(d / "nope.safetensors")], "does not exist", "check the path"),
    Case("inspect-plain-model", ("model.safetensors",), lambda d: ["inspect", str(d / "model.safetensors")],
         "plain HunyuanVideo T2V model", "convert it with `quantsparse convert`"),
    Case("inspect-hv15-model", ("hv15.safetensors",), lambda d: ["inspect", str(d / "hv15.safetensors")],
         "looks like a HunyuanVideo 1.5 model (not supported yet)",
         "QuantSparse loads the checkpoints that `quantsparse convert`"),
    Case("inspect-truncated", ("truncated.safetensors",), lambda d: ["inspect", str(d / "truncated.safetensors")],
         "is truncated", "download or copy it again"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_line_and_touches_nothing(case, originals, tmp_path, capsys):
    if case.skip and case.skip():
        pytest.skip(case.skip())
    d = tmp_path / "case"
    d.mkdir()
    for name in case.files:
        (d / name).write_bytes(originals[name])
    try:
        if case.setup:
            case.setup(d)
        before = snapshot(d)
        try:
            code = cli.main(case.argv(d))
        except SystemExit as e:  # argparse's own exit after printing its message
            code = e.code
        err = capsys.readouterr().err
        after = snapshot(d)
    finally:
        while _HELD:
            _HELD.pop().abort()
    assert code == 2, (code, err)
    lines = [line for line in err.splitlines() if line.strip()]
    command = case.argv(d)[0]
    assert len(lines) == 1 and lines[0].startswith(f"quantsparse {command}: error: "), err
    assert case.problem in lines[0], lines[0]
    assert case.fix in lines[0], lines[0]
    assert "Traceback" not in err
    assert after == before, "files changed or left behind"


def test_a_changed_setting_stops_a_resumed_calibration_and_says_which(originals, tmp_path, capsys, monkeypatch):
    """An interrupted calibration keeps its finished blocks; a rerun with one flag changed names the flag and
    the fix instead of silently discarding them."""
    from comfyui_quantsparse.quantsparse.calib import driver as calibrate_mod

    (tmp_path / "model.safetensors").write_bytes(originals["model.safetensors"])
    argv = ["calibrate", str(tmp_path / "model.safetensors"), str(tmp_path / "out.safetensors"), *CALIB]
    real = calibrate_mod.calibrate_block
    calls = []

    def stop_after_two(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(calibrate_mod, "calibrate_block", stop_after_two)
    assert cli.main(argv) == 130
    assert "run the same command again to continue" in capsys.readouterr().err
    monkeypatch.setattr(calibrate_mod, "calibrate_block", real)
    work = tmp_path / "out.safetensors.work"
    before = snapshot(tmp_path)
    assert cli.main([*argv, "--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds 2 finished block(s)" in err, err
    assert "epochs: 1 in the folder, 2 now" in err and "--restart" in err, err
    assert snapshot(tmp_path) == before  # nothing discarded
    # the same flags resume (the captured samples are reused: no sampling of the full model again)
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    assert "using the 2 samples captured by an earlier run" in out.err and "capturing" not in out.err
    assert "(2 blocks resumed)" in out.out
    assert not work.exists() and (tmp_path / "out.safetensors").exists()


def test_restart_discards_finished_blocks_on_purpose_and_says_so(tmp_path):
    from comfyui_quantsparse.quantsparse.calib.driver import WorkFolder, WorkMismatch

    old = {"model": "m", "capture": {"width": 64}, "settings": {"epochs": 1}}
    work = WorkFolder(str(tmp_path / "w"), old)
    work.mark_done("double_00")
    (tmp_path / "w" / "params" / "double_00.safetensors").write_bytes(b"x")
    new = {"model": "m", "capture": {"width": 128}, "settings": {"epochs": 1}}
    with pytest.raises(WorkMismatch, match="holds 1 finished block.*width: 64 in the folder, 128 now"):
        WorkFolder(str(tmp_path / "w"), new)
    assert (tmp_path / "w" / "params" / "double_00.safetensors").exists()
    said = []
    fresh = WorkFolder(str(tmp_path / "w"), new, restart=True, log=said.append)
    assert fresh.done == [] and not (tmp_path / "w" / "params" / "double_00.safetensors").exists()
    assert said == [f"--restart: discarding 1 finished block(s) in {tmp_path / 'w'}"]
    assert type(WorkMismatch("x")).__module__ == "quantsparse"  # what ComfyUI shows as the error's type


def test_restarting_with_other_training_settings_keeps_the_captured_samples(originals, tmp_path, capsys,
                                                                            monkeypatch):
    """--restart (or a changed setting with nothing finished) starts the blocks over, but samples captured with
    the same model, prompts, capture settings and seed are kept: an hour of sampling is not repeated."""
    from comfyui_quantsparse.quantsparse.calib import job

    (tmp_path / "model.safetensors").write_bytes(originals["model.safetensors"])
    out = tmp_path / "out.safetensors"
    argv = ["calibrate", str(tmp_path / "model.safetensors"), str(out), *CALIB, "--work-dir", str(tmp_path / "work")]
    monkeypatch.setattr(job, "clear_work", lambda *a, **k: None)  # keep each run's folder, as an interrupt does
    assert cli.main(argv) == 0
    assert "capturing" in capsys.readouterr().err
    out.unlink()
    assert cli.main([*argv, "--epochs", "2", "--restart"]) == 0
    err = capsys.readouterr().err
    assert "keeping the samples captured earlier" in err and "using the 2 samples captured by an earlier run" in err
    assert "capturing" not in err, err
    out.unlink()
    assert cli.main([*argv, "--epochs", "2", "--seed", "7", "--restart"]) == 0  # other capture noise
    err = capsys.readouterr().err
    assert "capturing" in err and "keeping the samples" not in err, err


def test_a_changed_sample_count_is_named_as_such():
    from comfyui_quantsparse.quantsparse.calib.driver import fingerprint_differences

    old = {"model": "a", "capture": {"samples": 20, "conditioning": "c1"}}
    new = {"model": "b", "capture": {"samples": 30, "conditioning": "c2"}}
    assert fingerprint_differences(old, new) == ["the prompts (conditioning) differ",
                                                 "samples: 20 in the folder, 30 now", "the model's weights differ"]


def test_a_stale_partial_file_is_reported_and_removed(originals, tmp_path, capsys):
    """What a killed run leaves (an unlocked partial file) is removed by the next run of the same command."""
    (tmp_path / "model.safetensors").write_bytes(originals["model.safetensors"])
    stale = tmp_path / ".out.safetensors.abc123.partial"
    stale.write_bytes(b"\0" * 4096)
    assert cli.main(["convert", str(tmp_path / "model.safetensors"), str(tmp_path / "out.safetensors")]) == 0
    err = capsys.readouterr().err
    assert f"removed {stale}" in err and "left by an interrupted run" in err
    assert not stale.exists() and (tmp_path / "out.safetensors").exists()


def _run(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=300, **kw)


def test_a_killed_writer_leaves_a_partial_that_the_next_run_removes(originals, tmp_path):
    """SIGKILL while a checkpoint is being written: the partial file stays (nothing can run at SIGKILL), its
    lock dies with the process, and the next convert removes it and says so."""
    (tmp_path / "model.safetensors").write_bytes(originals["model.safetensors"])
    writer = ("import os, sys, time\n"
              "from comfyui_quantsparse.quantsparse.core.paths import PartialFile\n"
              "p = PartialFile(sys.argv[1]); os.write(p.fd, b'x' * 65536)\n"
              "print('writing', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", writer, str(tmp_path / "out.safetensors")], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "writing"
    busy = _run([sys.executable, "-m", "comfyui_quantsparse.quantsparse", "convert", "model.safetensors",
                 "out.safetensors"], tmp_path)
    assert busy.returncode == 2 and "another QuantSparse run is writing" in busy.stderr, busy.stderr
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = list(tmp_path.glob(".out.safetensors.*.partial"))
    assert len(left) == 1
    done = _run([sys.executable, "-m", "comfyui_quantsparse.quantsparse", "convert", "model.safetensors",
                 "out.safetensors"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"removed {left[0].name} (65.5 KB)" in done.stderr and "left by an interrupted run" in done.stderr
    assert not left[0].exists() and (tmp_path / "out.safetensors").exists()
    assert "Traceback" not in done.stderr + busy.stderr


def test_commands_as_a_user_runs_them(originals, tmp_path):
    """The installed command and `python -m quantsparse` from the pack's folder (a ComfyUI install has no
    console script): a version, a refusal without a traceback, a real conversion."""
    (tmp_path / "model.safetensors").write_bytes(originals["model.safetensors"])
    exe = Path(sys.executable).parent / "quantsparse"
    version = _run([str(exe), "--version"], tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("quantsparse "), version
    refused = _run([sys.executable, "-m", "quantsparse", "convert", str(tmp_path / "model.safetensors"),
                    str(tmp_path / "model.safetensors"), "--overwrite"], REPO)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert refused.stderr.strip().startswith("quantsparse convert: error:") and "own input" in refused.stderr
    done = _run([sys.executable, "-m", "quantsparse", "convert", str(tmp_path / "model.safetensors"),
                 str(tmp_path / "out.safetensors")], REPO)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.safetensors").exists()


def test_a_calibration_worse_than_round_to_nearest_is_marked_and_said():
    """The record carries the warning (a shared file keeps it), inspect and the loader print it, the command
    names the blocks."""
    from comfyui_quantsparse.quantsparse.calib.job import worse_than_rtn_lines
    from comfyui_quantsparse.quantsparse.calib.settings import CalibSettings
    from comfyui_quantsparse.quantsparse.calib.provenance import calibration_lines, calibration_record

    def block(rtn, final):
        m = {"out": final, "global": 1.0, "local": 1.0}
        return {"rtn": {"out": rtn, "global": 1.0, "local": 1.0}, "final": m, "lambda_global": 1.0,
                "lambda_local": 1.0, "seconds": 1.0}

    record = calibration_record(base_model="m", settings=CalibSettings(), prompts=1, samples=2, width=64, height=64,
                                frames=5, steps=3, blocks={"double_00": block(1.0, 0.5), "single_00": block(1.0, 2.0)},
                                seconds=1.0)
    assert record["losses"]["worse_than_rtn"] and record["losses"]["worse_blocks"] == ["single_00"]
    said = worse_than_rtn_lines(record)
    assert len(said) == 1 and said[0].startswith("WARNING: this calibration ends worse than round-to-nearest")
    assert "single_00" in said[0] and "`quantsparse convert`" in said[0]
    assert any(line.strip().startswith("WARNING: worse than round-to-nearest overall; worse blocks: single_00")
               for line in calibration_lines(record))
    better = calibration_record(base_model="m", settings=CalibSettings(), prompts=1, samples=2, width=64, height=64,
                                frames=5, steps=3, blocks={"double_00": block(1.0, 0.5), "single_00": block(1.0, 1.1)},
                                seconds=1.0)
    assert not better["losses"]["worse_than_rtn"]
    assert worse_than_rtn_lines(better) == [
        "note: 1 block(s) end with a higher output error than round-to-nearest (their attention terms improved "
        "instead): single_00"]
    assert not any("WARNING" in line for line in calibration_lines(better))
