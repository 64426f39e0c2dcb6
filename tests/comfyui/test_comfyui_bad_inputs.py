"""Every node against a table of bad widget values and files, in a real ComfyUI server.

A bad widget value or file is refused when the prompt is queued (HTTP 400, a node error carrying the
message, nothing runs, no traceback in the server's console) and nothing in ``models/`` changes. What
only shows once the graph runs (a MODEL of the wrong kind, an existing file) is an execution error with
the message and a readable exception type. The Calibrate node runs again after its file was deleted,
and recognises a file it wrote itself.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from .test_comfyui_server import execution_error, qs_loader, sampling_graph, succeeded

pytestmark = pytest.mark.comfyui

NAME = "qs_bad_inputs_calibrated"


def models_snapshot(base: Path) -> dict[str, str]:
    root = base / "models"
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def calibrate_graph(model_nodes: dict, model_ref: list, **widgets) -> dict:
    inputs = {"model": model_ref, "conditioning": ["90", 0], "prompts": "", "width": 64, "height": 64, "frames": 5,
              "samples": 2, "steps": 3, "bits": "w4a8", "density": 0.15, "epochs": 1, "seed": 0, "file_name": NAME,
              "overwrite": False, "guidance": 6.0, "lambda_global": -1.0, "lambda_local": -1.0,
              "sparse_calibration": False, "restart": False}
    inputs.update(widgets)
    g = dict(model_nodes)
    g["90"] = {"class_type": "QSTestConditioning", "inputs": {"seed": 5, "tokens": 6, "context_dim": 64}}
    g["91"] = {"class_type": "QuantSparseCalibrate", "inputs": inputs}
    return g


def unet(tiny_files) -> dict:
    return {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": tiny_files.bf16.name, "weight_dtype": "default"}}}


def sampler_graph(tiny_files, **knobs) -> dict:
    g = qs_loader(tiny_files.w4a8.name)
    g.update({
        "2": {"class_type": "QSTestConditioning", "inputs": {"seed": 1, "tokens": 6, "context_dim": 64}},
        "3": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 5,
                                                                 "batch_size": 1}},
        "4": {"class_type": "QuantSparseSampler", "inputs": {
            "model": ["1", 0], "seed": 0, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0], "denoise": 1.0, "density": 0.5,
            "mask_mode": "svg", "dense_warmup": 0.0, "refresh_interval": 2, "rank": 4, "ssar_order": 1,
            "block_q": 16, "block_k": 16, **knobs}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "qs_bad/s"}},
    })
    return g


def attention_graph(tiny_files, **knobs) -> dict:
    g = qs_loader(tiny_files.w4a8.name)
    g["2"] = {"class_type": "QuantSparseAttention", "inputs": {
        "model": ["1", 0], "density": 0.5, "mask_mode": "svg", "dense_warmup": 0.0, "refresh_interval": 2, "rank": 4,
        "ssar_order": 1, "block_q": 16, "block_k": 16, **knobs}}
    return sampling_graph(g, ["2", 0], "qs_bad/a")


@pytest.fixture(scope="module")
def foreign_files(comfy_server):
    """A HunyuanVideo 1.5-like file and a text file with a .safetensors name, in models/quantsparse."""
    folder = comfy_server.base / "models" / "quantsparse"
    save_file({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(8, 8),
               "model.diffusion_model.vision_in.proj.0.weight": torch.zeros(8)}, str(folder / "hv15.safetensors"))
    (folder / "notes.safetensors").write_text("not a model")
    yield
    for name in ("hv15.safetensors", "notes.safetensors"):
        (folder / name).unlink(missing_ok=True)


# (case id, graph builder, node id, phrases the node error must contain)
QUEUE_CASES = [
    ("loader-missing-file", lambda f: sampling_graph(qs_loader("missing.safetensors"), ["1", 0], "x"), "1",
     ["'missing.safetensors' is not in models/quantsparse/", "press R to refresh"]),
    ("loader-path-outside", lambda f: sampling_graph(qs_loader("../diffusion_models/" + f.bf16.name), ["1", 0], "x"),
     "1", ["must be a file name inside models/quantsparse/"]),
    ("loader-not-safetensors", lambda f: sampling_graph(qs_loader("model.ckpt"), ["1", 0], "x"), "1",
     ["is not a .safetensors file"]),
    ("loader-plain-model", lambda f: sampling_graph(qs_loader(f.bad_plain.name), ["1", 0], "x"), "1",
     ["plain HunyuanVideo T2V model", "convert it with `quantsparse convert`"]),
    ("loader-truncated", lambda f: sampling_graph(qs_loader(f.bad_truncated.name), ["1", 0], "x"), "1",
     ["is truncated", "download or copy it again"]),
    ("loader-hv15-file", lambda f: sampling_graph(qs_loader("hv15.safetensors"), ["1", 0], "x"), "1",
     ["looks like a HunyuanVideo 1.5 model (not supported yet)"]),
    ("loader-text-file", lambda f: sampling_graph(qs_loader("notes.safetensors"), ["1", 0], "x"), "1",
     ["is not a safetensors file"]),
    ("sampler-block-not-power-of-two", lambda f: sampler_graph(f, block_q=100), "4",
     ["block_q = 100: use a power of two from 16 to 256"]),
    ("attention-block-out-of-range", lambda f: attention_graph(f, block_k=512), "2",
     ["block_k = 512: use a power of two from 16 to 256"]),
    ("calibrate-name-escapes", lambda f: calibrate_graph(unet(f), ["1", 0], file_name="../escape"), "91",
     ["file_name '../escape' is not allowed", "no folders"]),
    ("calibrate-width-not-multiple-of-16", lambda f: calibrate_graph(unet(f), ["1", 0], width=850), "91",
     ["multiples of 16, got 850x64"]),
    ("calibrate-frames-not-4k-plus-1", lambda f: calibrate_graph(unet(f), ["1", 0], frames=6), "91",
     ["(4k + 1), got 6"]),
    ("calibrate-size-out-of-range", lambda f: calibrate_graph(unet(f), ["1", 0], width=8192), "91",
     ["is out of range"]),
    ("calibrate-overwrite-a-model", lambda f: calibrate_graph(unet(f), ["1", 0], file_name=f.bad_plain.stem,
                                                              overwrite=True), "91",
     ["exists and is not a QuantSparse checkpoint", "never replaces it", "Choose another file_name"]),
]


@pytest.mark.parametrize("case", QUEUE_CASES, ids=[c[0] for c in QUEUE_CASES])
def test_bad_widget_or_file_is_a_node_error_when_queued(case, comfy_server, tiny_files, foreign_files):
    _, build, node, phrases = case
    before = models_snapshot(comfy_server.base)
    log_start = comfy_server.log.stat().st_size
    code, answer = comfy_server.post_prompt(build(tiny_files))
    assert code == 400, answer
    assert node in answer["node_errors"], answer
    details = " ".join(e["details"] for e in answer["node_errors"][node]["errors"])
    for p in phrases:
        assert p in details, details
    assert models_snapshot(comfy_server.base) == before
    log = comfy_server.log.read_bytes()[log_start:].decode(errors="replace")
    assert "Traceback" not in log, log


def test_calibrating_a_quantized_model_is_an_execution_error_with_a_readable_type(comfy_server, tiny_files):
    before = models_snapshot(comfy_server.base)
    entry = comfy_server.run(calibrate_graph(qs_loader(tiny_files.w4a8.name), ["1", 0], file_name="qs_never"))
    err = execution_error(entry)
    assert err["node_type"] == "QuantSparseCalibrate"
    assert "needs the full-precision model" in err["exception_message"], err
    assert err["exception_type"] == "ValueError"
    assert models_snapshot(comfy_server.base) == before


def test_calibrate_reruns_after_its_file_is_deleted_and_recognises_its_own_file(comfy_server, tiny_files):
    path = comfy_server.base / "models" / "quantsparse" / f"{NAME}.safetensors"
    graph = calibrate_graph(unet(tiny_files), ["1", 0])
    entry = comfy_server.run(graph, timeout=600)
    assert succeeded(entry)
    assert path.is_file()
    assert "wrote models/quantsparse/" in " ".join(entry["outputs"]["91"]["text"])
    mtime = path.stat().st_mtime_ns

    # Queued again unchanged: the node finds the file it wrote (its recorded fingerprint) and loads it.
    entry = comfy_server.run(graph)
    assert succeeded(entry)
    text = " ".join(entry["outputs"].get("91", {}).get("text", []))
    assert "already holds this calibration" in text, text
    assert path.stat().st_mtime_ns == mtime

    # Deleted: ComfyUI must not answer from its cache; the node calibrates again and the file is back.
    path.unlink()
    entry = comfy_server.run(graph, timeout=600)
    assert succeeded(entry)
    assert path.is_file() and "wrote models/quantsparse/" in " ".join(entry["outputs"]["91"]["text"])
    assert not (comfy_server.base / "output" / "quantsparse_work" / NAME).exists()

    # Another setting, same name, no overwrite: refused with the fix, the file untouched.
    mtime = path.stat().st_mtime_ns
    entry = comfy_server.run(calibrate_graph(unet(tiny_files), ["1", 0], epochs=2))
    err = execution_error(entry)
    assert err["exception_type"] == "quantsparse.CheckpointError", err
    assert "already exists" in err["exception_message"] and "overwrite" in err["exception_message"]
    assert path.stat().st_mtime_ns == mtime
    shutil.rmtree(comfy_server.base / "output" / "quantsparse_work", ignore_errors=True)
