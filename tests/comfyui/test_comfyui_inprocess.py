"""ComfyUI's model code driven directly (no server): detection, memory accounting, low-VRAM, LoRA refusal."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.comfyui

QKV = "diffusion_model.double_blocks.0.img_attn.qkv"
FINAL = "diffusion_model.final_layer.linear"


@pytest.fixture(scope="module")
def qs(comfy_inprocess):
    """The pack's ComfyUI modules, imported once ComfyUI is importable."""
    from comfyui_quantsparse.nodes import folders, model, ops, patcher

    class NS:
        pass

    ns = NS()
    ns.folders, ns.model, ns.ops, ns.patcher = folders, model, ops, patcher
    return ns


def inputs(seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    kw = dict(c_crossattn=torch.randn(1, 6, 64, generator=g), y=torch.randn(1, 768, generator=g),
              guidance=torch.tensor([6.0]))
    return x.to(device), torch.tensor([0.7], device=device), {k: v.to(device) for k, v in kw.items()}


def run(patcher, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    x, t, kw = inputs(seed, device)
    with torch.no_grad():
        return patcher.model.apply_model(x, t, **kw).float().cpu()


def test_comfyui_detects_and_builds_hunyuanvideo_with_quantized_linears(qs, tiny_files):
    import comfy.model_base
    from comfyui_quantsparse.quantsparse.checkpoint.format import validate_checkpoint

    info = validate_checkpoint(tiny_files.w4a8)
    p, summary = qs.model.load_quantsparse_model(str(tiny_files.w4a8))
    assert isinstance(p, qs.patcher.QuantSparseModelPatcher)
    # Detection read only BF16 tensors, yet found the right model and sizes.
    assert type(p.model) is comfy.model_base.HunyuanVideo
    cfg = p.model.model_config.unet_config
    assert (cfg["hidden_size"], cfg["depth"], cfg["depth_single_blocks"], cfg["vec_in_dim"]) == (
        info.dims.hidden_size, info.dims.depth, info.dims.depth_single_blocks, 768)
    quantized = qs.ops.quantized_modules(p.model)
    assert {n.removeprefix("diffusion_model.") for n in quantized} == set(info.layers)
    for name, m in quantized.items():
        spec = info.layers[name.removeprefix("diffusion_model.")]
        assert (m.quant_kind, m.in_features, m.out_features) == (spec.kind, spec.in_features, spec.out_features)
    final = p.model.diffusion_model.final_layer.linear
    assert final.quant_kind is None and final.weight.shape == (final.out_features, final.in_features)
    assert summary.quantized_layers == len(info.layers) and summary.bits == "w4a8"
    out = run(p)
    assert torch.isfinite(out).all() and out.std() > 0


def test_memory_accounting_sees_quantized_sizes(qs, tiny_files):
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    p, summary = qs.model.load_quantsparse_model(str(tiny_files.w4a8))
    for name, m in qs.ops.quantized_modules(p.model).items():
        own = sum(t.nbytes for t in (m.weight, m.weight_scale, m.smooth, m.bias) if t is not None)
        assert comfy.model_management.module_size(m) == own, name
        assert own < 2 * m.in_features * m.out_features, name  # below BF16, let alone the compute dtype
    assert p.model_size() == sum(t.nbytes for t in p.model.state_dict().values())
    dense = comfy.sd.load_diffusion_model_state_dict(comfy.utils.load_torch_file(str(tiny_files.bf16)),
                                                     disable_dynamic=True)
    assert dense.model_dtype() == p.model_dtype()  # same dtype for the layers both keep dense
    assert p.model_size() * 2 < dense.model_size()
    assert summary.model_bytes == p.model_size()


def test_lowvram_partial_load_matches_full_load(qs, tiny_files):
    """ModelPatcher.load with a tiny budget streams every layer per call (comfy_cast_weights)."""
    import comfy.model_management

    p, _ = qs.model.load_quantsparse_model(str(tiny_files.w4a8))
    device = comfy.model_management.get_torch_device()
    p.load(device, full_load=True)
    assert not p.model.model_lowvram
    full = run(p, device=device.type)
    p.detach()

    p.load(device, lowvram_model_memory=64 * 1024, full_load=False)
    try:
        assert p.model.model_lowvram
        streamed = [n for n, m in qs.ops.quantized_modules(p.model).items() if hasattr(m, "prev_comfy_cast_weights")]
        assert len(streamed) > len(qs.ops.quantized_modules(p.model)) // 2
        low = run(p, device=device.type)
    finally:
        p.detach()
    assert not p.model.model_lowvram
    torch.testing.assert_close(low, full, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the per-call host->GPU move needs a CUDA device")
def test_lowvram_moves_host_weights_to_the_gpu_per_call(qs, tiny_files):
    p, _ = qs.model.load_quantsparse_model(str(tiny_files.w4a8))
    cuda = torch.device("cuda")
    p.load(cuda, full_load=True)
    full = run(p, device="cuda")
    p.detach()
    p.load(cuda, lowvram_model_memory=64 * 1024, full_load=False)
    try:
        on_host = [m for m in qs.ops.quantized_modules(p.model).values() if m.weight.device.type == "cpu"]
        assert on_host, "expected low-VRAM mode to leave some quantized layers on the host"
        low = run(p, device="cuda")
    finally:
        p.detach()
    torch.testing.assert_close(low, full, rtol=0, atol=0)


def test_lora_on_quantized_layer_is_refused_and_on_bf16_layer_applies(qs, tiny_files):
    import comfy.hooks
    import comfy.sd
    import comfy.utils

    p, _ = qs.model.load_quantsparse_model(str(tiny_files.w4a8))
    assert isinstance(p.clone(), qs.patcher.QuantSparseModelPatcher)  # LoRA loaders patch a clone
    qkv_lora = comfy.utils.load_torch_file(str(tiny_files.qkv_lora))
    with pytest.raises(ValueError) as e:
        comfy.sd.load_lora_for_models(p, None, qkv_lora, 1.0, 0.0)
    assert "LoRA is not supported on QuantSparse quantized layers yet" in str(e.value)
    assert "double_blocks.0.img_attn.qkv" in str(e.value)
    assert p.patches == {}

    with pytest.raises(ValueError, match="quantized layer"):
        p.clone().add_hook_patches(comfy.hooks.WeightHook(), {f"{QKV}.weight": ("diff", (torch.zeros(1),))})
    with pytest.raises(ValueError, match="quantized layer"):
        p.clone().add_weight_wrapper(f"{QKV}.weight", lambda w: w)

    base = run(p)
    final_lora = comfy.utils.load_torch_file(str(tiny_files.final_lora))
    patched, _ = comfy.sd.load_lora_for_models(p, None, final_lora, 1.0, 0.0)
    assert set(patched.patches) == {f"{FINAL}.weight"}
    patched.patch_model()
    try:
        out = run(patched)
    finally:
        patched.unpatch_model()
    assert (out - base).abs().max() > 1e-3
    torch.testing.assert_close(run(p), base, rtol=0, atol=0)  # unpatching restored the BF16 weight


def test_mismatched_quantized_tensor_names_the_layer(qs, tiny_files):
    """Defence behind validate_checkpoint: the operations class checks shapes against the model."""
    import comfy.sd
    from comfyui_quantsparse.quantsparse.checkpoint.format import load_checkpoint

    sd, info = load_checkpoint(tiny_files.w4a8)
    key = "double_blocks.0.img_attn.qkv.weight"
    sd[key] = sd[key][:, :-1].contiguous()
    with pytest.raises(RuntimeError, match=r"double_blocks\.0\.img_attn\.qkv\.weight: expected torch\.int8"):
        comfy.sd.load_diffusion_model_state_dict(
            sd, model_options={"custom_operations": qs.ops.quantsparse_ops(info.layers)}, disable_dynamic=True)


def test_widget_file_names_cannot_leave_the_folder(qs, tmp_path, monkeypatch):
    import folder_paths

    folder = tmp_path / "quantsparse"
    folder.mkdir()
    (folder / "ok.safetensors").write_bytes(b"x")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "quantsparse", ([str(folder)], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})

    assert qs.folders.checkpoint_path("ok.safetensors") == str(folder / "ok.safetensors")
    for bad in ("../outside.safetensors", str(tmp_path / "outside.safetensors"), "a/../../outside.safetensors"):
        with pytest.raises(ValueError, match="inside models/quantsparse"):
            qs.folders.checkpoint_path(bad)
    with pytest.raises(ValueError, match="not a .safetensors file"):
        qs.folders.checkpoint_path("ok.ckpt")
    with pytest.raises(ValueError, match="is not in models/quantsparse/"):
        qs.folders.checkpoint_path("missing.safetensors")


def test_folder_registration_keeps_user_paths_and_filters_extensions(qs, monkeypatch):
    import os

    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "quantsparse", (["/from/extra_model_paths"], set()))
    qs.folders.register_folder()
    qs.folders.register_folder()
    paths, exts = folder_paths.folder_names_and_paths["quantsparse"]
    assert paths == [os.path.join(folder_paths.models_dir, "quantsparse"), "/from/extra_model_paths"]
    assert exts == {".safetensors"}


def patched_call(patcher, layer, x, device):
    """``layer(x)`` with ``patcher``'s patches applied on ``device``, unpatched afterwards."""
    patcher.patch_model(device_to=device)
    try:
        with torch.no_grad():
            return layer(x)
    finally:
        patcher.unpatch_model()


def test_bypass_lora_adds_beside_a_quantized_layer(qs, tiny_files):
    """The alternative the refusal message names: bypass LoRA gives quantized(x) + up(down(x)) exactly."""
    import comfy.sd
    import comfy.utils

    p, _ = qs.model.load_quantsparse_model(str(tiny_files.w4a8))
    dev = p.load_device  # the GPU where there is one: ComfyUI puts the bypass adapter there
    lora = comfy.utils.load_torch_file(str(tiny_files.qkv_lora))
    up, down = (lora[f"{QKV}.lora_up.weight"].to(dev), lora[f"{QKV}.lora_down.weight"].to(dev))  # alpha = rank
    layer = p.model.diffusion_model.double_blocks[0].img_attn.qkv
    x = torch.randn(1, 5, layer.in_features, generator=torch.Generator().manual_seed(3)).to(dev)
    bypassed, _ = comfy.sd.load_bypass_lora_for_models(p, None, lora, 1.0, 0.0)
    plain, with_lora = (patched_call(patcher, layer, x, dev) for patcher in (p, bypassed))
    torch.testing.assert_close(with_lora, plain + x @ down.T @ up.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the compiled kernels need a CUDA device"))])
def test_fused_block_forward_matches_comfyuis_blocks(qs, tiny_files, monkeypatch, device):
    """Every block of the loaded model runs the fused forward (patches_replace["dit"]), and the model's
    output matches ComfyUI's own block code on the same quantized layers (the fused path rounds once, at
    the INT8 quantization, where ComfyUI rounds after the norm, the modulation and the GELU as well)."""
    from comfyui_quantsparse import kernels
    from comfyui_quantsparse.nodes.fused_blocks import FusedDoubleBlock, FusedSingleBlock

    rope_calls = []
    real_rope = kernels.qk_norm_rope
    monkeypatch.setattr(kernels, "qk_norm_rope", lambda *a, **k: rope_calls.append(1) or real_rope(*a, **k))

    p, _ = qs.model.load_quantsparse_model(str(tiny_files.w4a8))
    dm = p.model.diffusion_model
    patches = p.model_options["transformer_options"]["patches_replace"]["dit"]
    assert sorted(patches) == sorted([("double_block", i) for i in range(len(dm.double_blocks))]
                                     + [("single_block", i) for i in range(len(dm.single_blocks))])
    calls = []
    spied = {key: (lambda fn, key: lambda args, extra: calls.append(key) or fn(args, extra))(fn, key)
             for key, fn in patches.items()}
    assert all(isinstance(fn, (FusedDoubleBlock, FusedSingleBlock)) for fn in patches.values())
    if device == "cuda":  # BF16 on the GPU, the Triton kernels
        p.load(torch.device("cuda"), full_load=True)
    x, t, kw = inputs(3, device)
    try:
        with torch.no_grad():
            fused = p.model.apply_model(x, t, transformer_options={"patches_replace": {"dit": spied}}, **kw).float()
            plain = p.model.apply_model(x, t, transformer_options={}, **kw).float()
    finally:
        p.detach()
    assert sorted(calls) == sorted(patches)
    assert len(rope_calls) == 4 * len(dm.double_blocks) + 2 * len(dm.single_blocks)  # q, k of each stream
    assert torch.isfinite(fused).all()
    rel = float((fused - plain).norm() / plain.norm())
    # measured 1.2e-3 on the tiny model in float32; ComfyUI computes in BF16 where a GPU exists (9.5e-3 on
    # the H100's CPU, BF16 rounding after each of ComfyUI's elementwise steps)
    assert rel < (5e-3 if p.model_dtype() == torch.float32 else 3e-2), rel


def _lora(prefix: str, out_features: int, in_features: int, seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"diffusion_model.{prefix}.lora_up.weight": torch.randn(out_features, rank, generator=g) * 0.5,
            f"diffusion_model.{prefix}.lora_down.weight": torch.randn(rank, in_features, generator=g) * 0.5,
            f"diffusion_model.{prefix}.alpha": torch.tensor(float(rank))}


def run_loaded(patcher, seed: int = 0, transformer_options=None) -> torch.Tensor:
    """``apply_model`` as a sampler runs it: the model loaded by ``model_management.load_models_gpu`` (its load
    device, the GPU where there is one; a bypass LoRA's adapter injected there), the inputs on that device, the
    patcher's own transformer_options (the fused block entries, if any); unloaded afterwards."""
    import comfy.model_management

    to = patcher.model_options.get("transformer_options", {}) if transformer_options is None else transformer_options
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    try:
        device = patcher.load_device
        assert device == comfy.model_management.get_torch_device()
        x, t, kw = inputs(seed, device.type)
        with torch.no_grad():
            return patcher.model.apply_model(x.to(device), t.to(device), transformer_options=dict(to),
                                             **{k: v.to(device) for k, v in kw.items()}).float().cpu()
    finally:
        comfy.model_management.unload_all_models()


def test_bypass_lora_on_fused_blocks_runs_comfyuis_block(qs, tiny_files, monkeypatch, caplog):
    """ComfyUI's bypass LoRA replaces a Linear's forward; the fused HunyuanVideo blocks call the quantized GEMM of
    img_attn.qkv / linear1 directly and would skip it. A block with such a layer runs ComfyUI's own forward (logged
    once per reason), so the LoRA changes the output exactly as with QUANTSPARSE_FUSED=0: with only those blocks'
    fused entries installed the output is QUANTSPARSE_FUSED=0's bit for bit; with every block's, the other blocks
    fused, it is within the fused forward's bound of it."""
    import logging

    import comfy.sd
    import comfy.utils
    from comfyui_quantsparse.nodes.fused_wan import _hooked

    p, _ = qs.model.load_quantsparse_model(str(tiny_files.w4a8))
    monkeypatch.setenv("QUANTSPARSE_FUSED", "0")
    p_off, summary_off = qs.model.load_quantsparse_model(str(tiny_files.w4a8))
    monkeypatch.delenv("QUANTSPARSE_FUSED")
    assert "ComfyUI's own (QUANTSPARSE_FUSED=0)" in summary_off.text()
    assert not p_off.model_options.get("transformer_options", {}).get("patches_replace")
    dm = p.model.diffusion_model
    patches = p.model_options["transformer_options"]["patches_replace"]["dit"]
    assert len(patches) == len(dm.double_blocks) + len(dm.single_blocks)

    linear1 = dm.single_blocks[0].linear1
    lora = {**comfy.utils.load_torch_file(str(tiny_files.qkv_lora)),
            **_lora("single_blocks.0.linear1", linear1.out_features, linear1.in_features, seed=7)}
    bypassed, _ = comfy.sd.load_bypass_lora_for_models(p, None, lora, 1.0, 0.0)
    bypassed_off, _ = comfy.sd.load_bypass_lora_for_models(p_off, None, lora, 1.0, 0.0)

    base = run_loaded(p)
    with caplog.at_level(logging.WARNING, logger="quantsparse"):
        fused = run_loaded(bypassed)
        fused_again = run_loaded(bypassed)
    off = run_loaded(bypassed_off)
    lora_blocks = {k: patches[k] for k in (("double_block", 0), ("single_block", 0))}
    alone = run_loaded(bypassed, transformer_options={"patches_replace": {"dit": lora_blocks}})
    # Unloading ejected the adapters (ComfyUI assigns the saved bound forward back): the model without the LoRA
    # runs fused in every block again, as before.
    assert not any(_hooked(m) for m in (dm.double_blocks[0].img_attn.qkv, dm.single_blocks[0].linear1))
    base_again = run_loaded(p)

    assert float((fused - base).norm() / base.norm()) > 1e-2  # the LoRA changed the output
    assert torch.equal(alone, off)
    rel = float((fused - off).norm() / off.norm())
    assert rel < (5e-3 if p.model_dtype() == torch.float32 else 3e-2), rel  # the fused-forward bound, as above
    torch.testing.assert_close(fused_again, fused, rtol=0, atol=0)
    torch.testing.assert_close(base_again, base, rtol=0, atol=0)

    reasons = {f"{layer} has an injected forward or hooks (e.g. a bypass LoRA): ComfyUI's block forward runs"
               for layer in ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1")}
    logged = [r.getMessage() for r in caplog.records if "injected forward" in r.getMessage()]
    assert sorted(logged) == sorted(f"QuantSparse: {r}" for r in reasons), logged  # once each, two runs
    notes = patches[("double_block", 0)].notes
    assert all(fn.notes is notes for fn in patches.values())  # one record per model
    assert notes.fallbacks == {r: 3 for r in reasons}  # two fully fused runs and the run of those two alone
    others = len(patches) - 2
    assert notes.fused == 2 * len(patches) + 2 * others  # without the LoRA (twice): every block; with it: the others


def test_loader_node_names_every_supported_family_and_the_loaded_model(qs, tiny_files, tmp_path, monkeypatch):
    """The node's description and output tooltip name every family a checkpoint can hold (not HunyuanVideo alone),
    and the text under the node names the model the file holds, by its family's adapter."""
    import folder_paths
    from safetensors.torch import save_file

    from comfyui_quantsparse.nodes.loader import QuantSparseLoader
    from comfyui_quantsparse.quantsparse.checkpoint.convert import convert_file
    from comfyui_quantsparse.quantsparse.checkpoint.format import validate_checkpoint
    from comfyui_quantsparse.quantsparse.core.config import QuantSparseConfig
    from comfyui_quantsparse.quantsparse.models import registry
    from comfyui_quantsparse.quantsparse.models.wan.dims import WanDims

    schema = QuantSparseLoader.define_schema()
    titles = [a.title for a in registry.adapters()]
    assert len(titles) >= 2 and all(t in schema.description and t in schema.outputs[0].tooltip for t in titles), (
        schema.description, schema.outputs[0].tooltip)
    assert "(quantized HunyuanVideo)" not in schema.description

    folder = tmp_path / "quantsparse"
    folder.mkdir()
    wan_bf16 = tmp_path / "wan_bf16.safetensors"
    save_file(registry.by_name("wan").random_state_dict(WanDims.tiny("i2v", in_dim=36), seed=3), str(wan_bf16))
    convert_file(wan_bf16, folder / "wan_i2v_w4a8.safetensors", QuantSparseConfig(bits="w4a8"))
    (folder / tiny_files.w4a8.name).write_bytes(tiny_files.w4a8.read_bytes())
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "quantsparse", ([str(folder)], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    for name, family in ((tiny_files.w4a8.name, "hunyuan_video"), ("wan_i2v_w4a8.safetensors", "wan")):
        info = validate_checkpoint(folder / name)
        assert info.adapter.name == family
        out = QuantSparseLoader.execute(name)
        text = "\n".join(out.ui.as_dict()["text"])
        assert f"base: {info.adapter.variant(info.dims)};" in text, text
        assert "quantized Linears" in text, text
