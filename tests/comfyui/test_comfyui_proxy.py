"""The shipped proxy HunyuanVideo in a real ComfyUI: the stock "Load Diffusion Model" (UNETLoader) loads it,
ComfyUI samples it exactly as ``quantsparse/proxy/sample.py`` does (the demo and the benchmark's figures
are ComfyUI's), and the dense-versus-QuantSparse example workflow runs on it."""

from __future__ import annotations

import copy
import json
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file

from .test_comfyui_server import succeeded
from .test_comfyui_workflows import only
from .workflow_api import assert_links_resolve, load_build, to_api

pytestmark = pytest.mark.comfyui

REPO = pathlib.Path(__file__).resolve().parents[2]
WORKFLOW = REPO / "workflows" / f"{load_build().DENSE_VS_QUANTSPARSE}.json"
PROXY_NAME = "qs_proxy_bf16.safetensors"
PROXY_W4A8 = "qs_proxy_w4a8.safetensors"
SCALE = 0.476986  # ComfyUI's HunyuanVideo latent_format.scale_factor: saved latents are model latents / SCALE


@pytest.fixture(scope="module")
def proxy_in_comfy(comfy_server, tmp_path_factory):
    """The shipped proxy in the server's diffusion_models/ and its W4A8 conversion in quantsparse/
    (ComfyUI re-lists a model folder when its mtime changes)."""
    from comfyui_quantsparse.quantsparse.core.config import QuantSparseConfig
    from comfyui_quantsparse.quantsparse.checkpoint.convert import convert_file
    from comfyui_quantsparse.quantsparse.proxy.train import DEFAULT_PATH

    models = comfy_server.base / "models"
    shutil.copyfile(DEFAULT_PATH, models / "diffusion_models" / PROXY_NAME)
    convert_file(DEFAULT_PATH, models / "quantsparse" / PROXY_W4A8, QuantSparseConfig(bits="w4a8"))
    return comfy_server


def _latent(server, entry, node_id: str) -> torch.Tensor:
    f = entry["outputs"][node_id]["latents"][0]
    return load_file(str(server.base / "output" / f["subfolder"] / f["filename"]))["latent_tensor"]


def _test_conditioning(seed: int, tokens: int, dim: int = 64):
    """What QSTestConditioning(seed, tokens, dim) produces (tests/comfyui/custom_nodes/qs_test_nodes)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, dim, generator=g)[0], torch.randn(1, 768, generator=g)[0]


def test_stock_loader_samples_the_proxy_as_the_torch_sampler_does(proxy_in_comfy):
    from comfyui_quantsparse.quantsparse.proxy import data as pd
    from comfyui_quantsparse.quantsparse.proxy import sample as ps
    from comfyui_quantsparse.quantsparse.proxy.train import load_proxy

    server, steps, seed = proxy_in_comfy, 4, 3
    info = server.get("/object_info/UNETLoader")["UNETLoader"]
    assert PROXY_NAME in json.dumps(info["input"]["required"]["unet_name"])
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": PROXY_NAME, "weight_dtype": "default"}},
        "2": {"class_type": "QSTestConditioning", "inputs": {"seed": 5, "tokens": pd.TEXT_TOKENS, "context_dim": 64}},
        "3": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
        "4": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 128, "height": 128, "length": 17,
                                                                 "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0]}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "qs_proxy/stock"}},
    }
    entry = server.run(prompt)
    assert succeeded(entry)
    comfy = _latent(server, entry, "6").float() * SCALE
    assert comfy.shape == (1, 16, 5, 16, 16)

    # The same run in the torch model (float32, as ComfyUI runs on a CPU): same noise, schedule, sampler.
    model = load_proxy(dtype=torch.float32)
    ours = ps.sample_clip(model, ps.Clip(pd.prompt_for(0), seed), steps=steps,
                          condition=_test_conditioning(5, pd.TEXT_TOKENS)).latent
    rel = float((comfy[0] - ours).norm() / ours.norm())
    assert rel < 1e-2, rel


def test_dense_vs_quantsparse_workflow_runs_on_the_proxy(proxy_in_comfy):
    """The shipped side-by-side workflow with the proxy as both models. Substituted, as in the text-to-video
    workflow test: model files (the proxy and its W4A8 conversion), the text encoder (random conditioning
    of the proxy's width), the VAE tail (a SaveLatent per sampler), the size and steps (CPU), the block size."""
    server = proxy_in_comfy
    shipped = to_api(json.loads(WORKFLOW.read_text()), server.get("/object_info"))
    prompt = copy.deepcopy(shipped)
    dense, quant = only(prompt, "KSampler"), only(prompt, "QuantSparseSampler")
    assert prompt[dense]["inputs"]["seed"] == prompt[quant]["inputs"]["seed"]  # same seed, both samplers
    prompt[only(prompt, "UNETLoader")]["inputs"]["unet_name"] = PROXY_NAME
    prompt[only(prompt, "QuantSparseLoader")]["inputs"]["ckpt_name"] = PROXY_W4A8
    del prompt[only(prompt, "DualCLIPLoader")]
    prompt[only(prompt, "CLIPTextEncode")] = {"class_type": "QSTestConditioning",
                                              "inputs": {"seed": 1, "tokens": 4, "context_dim": 64}}
    for kind in ("VAELoader", "ImageStitch", "CreateVideo", "SaveVideo"):
        del prompt[only(prompt, kind)]
    for i in [i for i, n in prompt.items() if n["class_type"] == "VAEDecodeTiled"]:
        del prompt[i]
    prompt["90"] = {"class_type": "SaveLatent", "inputs": {"samples": [dense, 0], "filename_prefix": "qs_proxy/dense"}}
    prompt["91"] = {"class_type": "SaveLatent", "inputs": {"samples": [quant, 0], "filename_prefix": "qs_proxy/qs"}}
    prompt[only(prompt, "EmptyHunyuanLatentVideo")]["inputs"].update(width=128, height=128, length=17)
    for s in (dense, quant):
        prompt[s]["inputs"]["steps"] = 8
    prompt[quant]["inputs"].update(block_q=16, block_k=16)
    assert_links_resolve(prompt)

    entry = server.run(prompt)
    assert succeeded(entry)
    a, b = _latent(server, entry, "90").float() * SCALE, _latent(server, entry, "91").float() * SCALE
    assert a.shape == b.shape == (1, 16, 5, 16, 16)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert not torch.equal(a, b)  # W4A8 and sparse attention change the result

    # Both halves are what the torch pipeline of the demo and the benchmark computes with the same settings
    # (float32 model, as ComfyUI runs on a CPU; round-to-nearest W4A8 = what `convert` wrote): the figures
    # measured there are this workflow's. The sparse path differs a little (ComfyUI computes the quantized
    # model's other layers in its own way), so the QuantSparse half has a looser bound than the dense one.
    from comfyui_quantsparse.quantsparse.proxy import data as pd
    from comfyui_quantsparse.quantsparse.proxy import sample as ps
    from comfyui_quantsparse.quantsparse.core.config import QuantSparseConfig
    from comfyui_quantsparse.quantsparse.proxy.train import load_proxy

    knobs = prompt[quant]["inputs"]
    sparse = ps.proxy_sparse_config(knobs["density"], ssar_order=knobs["ssar_order"], mask_mode=knobs["mask_mode"],
                                    dense_warmup=knobs["dense_warmup"], refresh_interval=knobs["refresh_interval"],
                                    rank=knobs["rank"])
    clip, cond = ps.Clip(pd.prompt_for(0), knobs["seed"]), _test_conditioning(1, 4)
    model = load_proxy(dtype=torch.float32)
    ours_dense = ps.sample_clip(model, clip, steps=knobs["steps"], condition=cond).latent
    ours_qs = ps.sample_clip(ps.rtn_calibrate(model, QuantSparseConfig(bits="w4a8")), clip, steps=knobs["steps"],
                             condition=cond, sparse=sparse).latent
    assert float((a[0] - ours_dense).norm() / ours_dense.norm()) < 1e-3
    assert float((b[0] - ours_qs).norm() / ours_qs.norm()) < 0.1
