"""The calibration workflow in a real ComfyUI: it runs on the tiny model through the HTTP API, the new file
appears in "Load QuantSparse Model"'s list and loads, an existing file is not overwritten, and a MODEL
that is not HunyuanVideo is refused with a message that says so."""

from __future__ import annotations

import copy
import json
import pathlib

import pytest

from .test_comfyui_server import succeeded
from .test_comfyui_workflows import only
from .workflow_api import assert_links_resolve, load_build, to_api

pytestmark = pytest.mark.comfyui

CALIBRATE = pathlib.Path(__file__).resolve().parents[2] / "workflows" / f"{load_build().CALIBRATION}.json"
NAME = "qs_test_calibrated"


def _error_text(entry) -> str:
    return json.dumps([m for m in entry["status"].get("messages", []) if m[0] == "execution_error"])


def calibration_prompt(server, tiny_files, name=NAME, overwrite=False) -> tuple[dict, str]:
    shipped = to_api(json.loads(CALIBRATE.read_text()), server.get("/object_info"))
    prompt = copy.deepcopy(shipped)
    calib, sampler = only(prompt, "QuantSparseCalibrate"), only(prompt, "QuantSparseSampler")
    # The 13B BF16 model is not here: the tiny HunyuanVideo (BF16) takes its place.
    prompt[only(prompt, "UNETLoader")]["inputs"]["unet_name"] = tiny_files.bf16.name
    # No text encoders here: random conditioning shaped for the tiny model, for calibration and sampling.
    del prompt[only(prompt, "DualCLIPLoader")]
    prompt[only(prompt, "CLIPTextEncode")] = {"class_type": "QSTestConditioning",
                                              "inputs": {"seed": 1, "tokens": 6, "context_dim": 64}}
    cond_id = str(max(int(i) for i in prompt) + 1)
    prompt[cond_id] = {"class_type": "QSTestConditioning", "inputs": {"seed": 5, "tokens": 6, "context_dim": 64}}
    inputs = prompt[calib]["inputs"]
    del inputs["clip"]
    inputs.update(conditioning=[cond_id, 0], prompts="", width=64, height=64, frames=5, samples=2, steps=3,
                  epochs=1, file_name=name, overwrite=overwrite)
    # No VAE: the decode -> video tail becomes a SaveLatent; a CPU-sized sampling run.
    for kind in ("VAELoader", "VAEDecodeTiled", "CreateVideo", "SaveVideo"):
        del prompt[only(prompt, kind)]
    save = str(max(int(i) for i in prompt) + 1)
    prompt[save] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0], "filename_prefix": "qs_calib/t2v"}}
    prompt[only(prompt, "EmptyHunyuanLatentVideo")]["inputs"].update(width=64, height=64, length=5)
    prompt[sampler]["inputs"].update(steps=2, block_q=16, block_k=16)
    assert_links_resolve(prompt)
    return prompt, calib


def test_calibration_workflow_writes_a_checkpoint_the_loader_lists(comfy_server, tiny_files):
    from comfyui_quantsparse.quantsparse.checkpoint.format import validate_checkpoint

    before = comfy_server.get("/object_info/QuantSparseLoader")["QuantSparseLoader"]["input"]["required"]
    assert f"{NAME}.safetensors" not in json.dumps(before)
    prompt, calib = calibration_prompt(comfy_server, tiny_files)
    entry = comfy_server.run(prompt, timeout=600)
    assert succeeded(entry), _error_text(entry) + comfy_server.log_tail()
    path = comfy_server.base / "models" / "quantsparse" / f"{NAME}.safetensors"
    assert path.is_file()
    info = validate_checkpoint(path)
    c = info.calibration
    assert c["method"] == "msad" and c["prompts"] == 1 and c["samples"] == 2 and c["epochs"] == 1
    assert c["resolution"] == {"width": 64, "height": 64, "frames": 5} and c["base_model"] == tiny_files.bf16.name
    assert info.config.bits == "w4a8" and info.sparse_defaults["density"] == 0.15
    assert len(c["losses"]["per_block"]) == 6
    text = " ".join(entry["outputs"][calib]["text"])
    assert "MSAD from" in text and "quantized Linears" in text, text
    assert not (comfy_server.base / "output" / "quantsparse_work" / NAME).exists()  # cleared after the write
    listed = comfy_server.get("/object_info/QuantSparseLoader")["QuantSparseLoader"]["input"]["required"]
    assert f"{NAME}.safetensors" in json.dumps(listed)

    # The loader shows the same provenance.
    entry = comfy_server.run({"1": {"class_type": "QuantSparseLoader", "inputs": {"ckpt_name": f"{NAME}.safetensors"}},
                              "2": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 7.0}},
                              "3": {"class_type": "QSTestConditioning", "inputs": {"seed": 1, "tokens": 6,
                                                                                   "context_dim": 64}},
                              "4": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64,
                                                                                       "length": 5, "batch_size": 1}},
                              "5": {"class_type": "KSampler", "inputs": {
                                  "model": ["2", 0], "seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
                                  "scheduler": "simple", "positive": ["3", 0], "negative": ["3", 0],
                                  "latent_image": ["4", 0], "denoise": 1.0}},
                              "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0],
                                                                           "filename_prefix": "qs_calib/load"}}})
    assert succeeded(entry), _error_text(entry)
    loader_text = " ".join(entry["outputs"]["1"]["text"])
    assert "MSAD from" in loader_text and "SSAR defaults" in loader_text, loader_text

    # Queued again without overwrite: refused, the file is untouched.
    mtime = path.stat().st_mtime_ns
    prompt2, calib2 = calibration_prompt(comfy_server, tiny_files)
    prompt2[prompt2[calib2]["inputs"]["conditioning"][0]]["inputs"]["seed"] = 9  # a different graph, no cache hit
    entry = comfy_server.run(prompt2)
    assert entry["status"]["status_str"] == "error"
    assert "already exists" in _error_text(entry) and "overwrite" in _error_text(entry)
    assert path.stat().st_mtime_ns == mtime


def test_file_names_cannot_leave_the_folder(comfy_server, tiny_files):
    """Refused when queued (the node's validate_inputs): /prompt answers 400 with a node error that names the
    file_name rule, nothing runs and nothing is written."""
    prompt, calib = calibration_prompt(comfy_server, tiny_files, name="../escape")
    code, answer = comfy_server.post_prompt(prompt)
    assert code == 400, answer
    errors = answer["node_errors"][calib]["errors"]
    assert any(e["extra_info"].get("input_name") == "file_name" and "is not allowed" in e["details"] for e in errors)
    assert not (comfy_server.base / "models" / "escape.safetensors").exists()


def test_a_model_that_is_not_hunyuan_video_is_refused(comfy_inprocess):
    from comfyui_quantsparse.nodes.calibrate import full_state_of

    class Flux:  # what a Flux MODEL's .model is, as far as the check can tell
        pass

    class Patcher:
        model = Flux()

    with pytest.raises(ValueError, match="needs a full-precision HunyuanVideo T2V MODEL .*, but this MODEL is Flux"):
        full_state_of(Patcher())


def test_a_wan_model_is_refused_with_what_to_do_instead(comfy_inprocess):
    """Wan is detected through the registry and refused by its adapter (no MSAD calibration for it yet)."""
    from comfyui_quantsparse.nodes.calibrate import full_state_of
    from comfyui_quantsparse.quantsparse.models import registry

    wan = registry.by_name("wan")

    class Base:
        diffusion_model = wan.build_model(wan.tiny_dims(), device="meta")

    class Patcher:
        model = Base()

    with pytest.raises(ValueError, match="MSAD calibration of Wan .* is not supported yet; make a round-to-nearest "
                                         "checkpoint of it with `quantsparse convert`"):
        full_state_of(Patcher())
