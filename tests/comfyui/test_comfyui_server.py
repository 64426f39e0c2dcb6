"""The pack inside a real ComfyUI server, driven through its HTTP API like the web UI does."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.comfyui

STEPS = 3
PACK_MODULE_MARK = "comfyui_quantsparse"


def sampling_graph(model_nodes: dict, model_ref: list, prefix: str, seed: int = 0) -> dict:
    """Stock HunyuanVideo text-to-video sampling after ``model_nodes`` (which end at ``model_ref``)."""
    g = dict(model_nodes)
    g.update({
        "20": {"class_type": "ModelSamplingSD3", "inputs": {"model": model_ref, "shift": 7.0}},
        "21": {"class_type": "QSTestConditioning", "inputs": {"seed": 1, "tokens": 6, "context_dim": 64}},
        "22": {"class_type": "QSTestConditioning", "inputs": {"seed": 2, "tokens": 6, "context_dim": 64}},
        "23": {"class_type": "CFGGuider", "inputs": {"model": ["20", 0], "positive": ["21", 0],
                                                     "negative": ["22", 0], "cfg": 2.0}},
        "24": {"class_type": "BasicScheduler", "inputs": {"model": ["20", 0], "scheduler": "simple",
                                                          "steps": STEPS, "denoise": 1.0}},
        "25": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "26": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "27": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 5,
                                                                  "batch_size": 1}},
        "28": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["26", 0], "guider": ["23", 0],
                                                                 "sampler": ["25", 0], "sigmas": ["24", 0],
                                                                 "latent_image": ["27", 0]}},
        "29": {"class_type": "SaveLatent", "inputs": {"samples": ["28", 0], "filename_prefix": prefix}},
    })
    return g


def qs_loader(ckpt: str) -> dict:
    return {"1": {"class_type": "QuantSparseLoader", "inputs": {"ckpt_name": ckpt}}}


def saved_latent(server, entry: dict) -> torch.Tensor:
    files = entry["outputs"]["29"]["latents"]
    assert len(files) == 1
    f = files[0]
    return load_file(str(server.base / "output" / f["subfolder"] / f["filename"]))["latent_tensor"]


def succeeded(entry: dict) -> bool:
    """Assert the prompt ran; on failure show ComfyUI's own exception text, not the message list."""
    errors = [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
    detail = "; ".join(f"{e.get('node_type')}: {e.get('exception_type')}: {e.get('exception_message')}" for e in errors)
    assert entry["status"]["status_str"] == "success", detail or entry["status"]
    return True


def execution_error(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error", f"expected an execution error, got {entry['status']}"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert len(errors) == 1, entry["status"]["messages"]
    return errors[0]


def test_loader_is_listed_with_only_safetensors(comfy_server, tiny_files):
    info = comfy_server.get("/object_info/QuantSparseLoader")["QuantSparseLoader"]
    assert info["display_name"] == "Load QuantSparse Model"
    assert info["category"] == "QuantSparse"
    assert info["output"] == ["MODEL"]
    spec = info["input"]["required"]["ckpt_name"]
    listed = json.dumps(spec)
    assert all(f.name in listed for f in (tiny_files.w4a8, tiny_files.bad_plain, tiny_files.bad_truncated))
    assert "README.txt" not in listed  # the folder is filtered to .safetensors
    # The test-only node is there too, and the pack registered nothing else.
    all_nodes = comfy_server.get("/object_info")
    ours = {name for name, n in all_nodes.items() if PACK_MODULE_MARK in n.get("python_module", "")}
    assert ours == {"QuantSparseLoader", "QuantSparseAttention", "QuantSparseSampler", "QuantSparseCalibrate"}, ours
    assert "QSTestConditioning" in all_nodes


def test_tiny_w4a8_model_samples_with_stock_nodes(comfy_server, tiny_files):
    entry = comfy_server.run(sampling_graph(qs_loader(tiny_files.w4a8.name), ["1", 0], "qs_test/w4a8"))
    assert succeeded(entry)
    latent = saved_latent(comfy_server, entry)
    assert latent.shape == (1, 16, 2, 8, 8)
    assert torch.isfinite(latent).all()
    assert latent.float().std() > 0.1
    summary = " ".join(entry["outputs"]["1"]["text"])
    assert "w4a8" in summary and "quantized Linears" in summary and "MiB" in summary


def test_quantized_sampling_tracks_the_bf16_model(comfy_server, tiny_files):
    """Same seeds through the stock UNETLoader on the BF16 source: the W4A8 result must stay close.

    A layer loaded under a wrong name or with a mis-read scale gives an unrelated latent; RTN
    W4A8 on random weights moves it by a few tens of percent at most.
    """
    quant_graph = sampling_graph(qs_loader(tiny_files.w4a8.name), ["1", 0], "qs_test/cmp_q", 5)
    q = saved_latent(comfy_server, comfy_server.run(quant_graph))
    dense_nodes = {"1": {"class_type": "UNETLoader",
                         "inputs": {"unet_name": tiny_files.bf16.name, "weight_dtype": "default"}}}
    entry = comfy_server.run(sampling_graph(dense_nodes, ["1", 0], "qs_test/cmp_bf16", 5))
    assert succeeded(entry)
    d = saved_latent(comfy_server, entry)
    rel = ((q.float() - d.float()).norm() / d.float().norm()).item()
    assert 0 < rel < 0.35, rel


@pytest.mark.parametrize("which, phrase", [
    ("bad_plain", "without 'quantsparse' metadata"),
    ("bad_truncated", "is truncated"),
])
def test_bad_checkpoint_is_refused_when_queued_naming_the_problem(comfy_server, tiny_files, which, phrase):
    """Validated when the prompt is queued: a node error with the message, nothing runs, no traceback."""
    name = getattr(tiny_files, which).name
    code, answer = comfy_server.post_prompt(sampling_graph(qs_loader(name), ["1", 0], "qs_test/bad"))
    assert code == 400, answer
    errors = answer["node_errors"]["1"]["errors"]
    details = " ".join(e["details"] for e in errors)
    assert phrase in details and name in details, errors


def test_unknown_or_escaping_file_name_is_refused_before_running(comfy_server, tiny_files):
    for name in ("missing.safetensors", "../diffusion_models/" + tiny_files.bf16.name):
        code, answer = comfy_server.post_prompt(sampling_graph(qs_loader(name), ["1", 0], "qs_test/nope"))
        assert code == 400, answer
        assert "1" in answer["node_errors"], answer


def test_lora_on_a_quantized_layer_fails_clearly(comfy_server, tiny_files):
    nodes = qs_loader(tiny_files.w4a8.name)
    nodes["2"] = {"class_type": "LoraLoaderModelOnly",
                  "inputs": {"model": ["1", 0], "lora_name": tiny_files.qkv_lora.name, "strength_model": 1.0}}
    err = execution_error(comfy_server.run(sampling_graph(nodes, ["2", 0], "qs_test/lora")))
    assert err["node_type"] == "LoraLoaderModelOnly"
    msg = err["exception_message"]
    assert "LoRA is not supported on QuantSparse quantized layers" in msg
    assert "apply the LoRA to the BF16 model before converting/calibrating" in msg
    assert "double_blocks.0.img_attn.qkv" in msg


def test_lora_on_a_bf16_layer_still_applies(comfy_server, tiny_files):
    """The refusal is per layer: a LoRA on the BF16 final layer loads and changes the result."""
    plain = sampling_graph(qs_loader(tiny_files.w4a8.name), ["1", 0], "qs_test/nolora", 7)
    base = saved_latent(comfy_server, comfy_server.run(plain))
    nodes = qs_loader(tiny_files.w4a8.name)
    nodes["2"] = {"class_type": "LoraLoaderModelOnly",
                  "inputs": {"model": ["1", 0], "lora_name": tiny_files.final_lora.name, "strength_model": 1.0}}
    entry = comfy_server.run(sampling_graph(nodes, ["2", 0], "qs_test/finallora", 7))
    assert succeeded(entry)
    with_lora = saved_latent(comfy_server, entry)
    assert torch.isfinite(with_lora).all()
    assert (with_lora.float() - base.float()).abs().max() > 1e-3


def cached_nodes(entry: dict) -> set[str]:
    return {n for m in entry["status"]["messages"] if m[0] == "execution_cached" for n in m[1]["nodes"]}


def test_rewritten_checkpoint_is_loaded_again(comfy_server, tiny_files):
    """ComfyUI reuses the loader's MODEL while the inputs are unchanged, but not after the file changes."""
    import os

    graph = sampling_graph(qs_loader(tiny_files.w4a8.name), ["1", 0], "qs_test/refresh", 11)
    comfy_server.run(graph)
    assert "1" in cached_nodes(comfy_server.run(graph))
    path = comfy_server.base / "models" / "quantsparse" / tiny_files.w4a8.name
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    entry = comfy_server.run(graph)
    assert entry["status"]["status_str"] == "success"
    assert "1" not in cached_nodes(entry)
