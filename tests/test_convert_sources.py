"""The converter reads every form users download (``checkpoint/sources.py``), on tiny HunyuanVideo and Wan models.

Each source form is made here from a BF16 model exactly as that form stores it (fp8_e4m3fn; legacy fp8_scaled
with its ``scaled_fp8`` marker, ``scale_weight`` and ``scale_input``; ComfyUI comfy_quant float8 and
int8_tensorwise, per row and per tensor, ConvRot-rotated or not, declared per layer or in the header's
``_quantization_metadata``), with and without the ``model.diffusion_model.`` / ``diffusion_model.`` prefix.
Each converts to a valid checkpoint that is byte for byte the conversion of its dequantized model, written
here independently: unscaled fp8 as BF16 (exact), scaled forms as the exact product rounded once to float32
(what the reader returns). 4-bit sources, GGUF, MXFP8, unknown formats and inconsistent files are refused
with one message naming the form (or the tensor), why and what to download instead, and nothing is written.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from comfyui_quantsparse.quantsparse import cli
from comfyui_quantsparse.quantsparse.checkpoint.convert import ConvertError, convert_file, inspect_source
from comfyui_quantsparse.quantsparse.checkpoint.format import validate_checkpoint
from comfyui_quantsparse.quantsparse.checkpoint.sources import dequantize, hadamard_groups
from comfyui_quantsparse.quantsparse.core.safetensors_io import read_header
from comfyui_quantsparse.quantsparse.models import registry

FAMILIES = ["hunyuan_video", "wan"]
FP8 = torch.float8_e4m3fn
H4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float64)
GROUP = 16  # the tiny models' Linears have 64..1792 inputs: a ConvRot group that divides them all


def hadamard(g: int) -> torch.Tensor:
    """The unnormalised regular Hadamard matrix comfy-kitchen's ConvRot uses: Kronecker powers of H4 (symmetric)."""
    h = H4
    while h.shape[0] < g:
        h = torch.kron(h, H4)
    return h


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    adapter = registry.by_name(request.param)
    return adapter, adapter.random_state_dict(adapter.tiny_dims(), seed=3)


def linears(sd) -> list[str]:
    """The Linear weights a quantized release stores quantized (here every 2-D weight, including those
    QuantSparse keeps BF16, so both output paths read dequantized tensors)."""
    return [k for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2]


def cq(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


# ------------------------------------------------------------------------ the forms, as they store weights

def fp8_e4m3fn(sd):
    src, deq = dict(sd), dict(sd)
    for k in linears(sd):
        src[k] = sd[k].to(FP8)
        deq[k] = src[k].to(torch.bfloat16)  # every fp8 number is a BF16 number
    return src, deq, None


def fp8_scaled(sd, marker=torch.empty(0, dtype=FP8)):
    """Kijai / Comfy-Org legacy fp8_scaled: marker, a scalar scale_weight per layer, some scale_input."""
    src, deq, lin = {"scaled_fp8": marker}, {}, set(linears(sd))
    for i, (k, v) in enumerate(sd.items()):
        if k not in lin:
            src[k] = deq[k] = v
            continue
        layer = k[: -len(".weight")]
        s = (v.float().abs().max() / 448.0).reshape(() if i % 2 else (1,))
        w8 = (v.float() / s).to(FP8)
        src[k], src[f"{layer}.scale_weight"] = w8, s
        if i % 3 == 0:
            src[f"{layer}.scale_input"] = torch.tensor(1.0 + i)
        deq[k] = (w8.double() * s.double()).float()
    return src, deq, None


def fp8_scaled_full_precision_mm(sd):
    return fp8_scaled(sd, marker=torch.zeros(2, dtype=FP8))


def comfy_float8(sd):
    """comfy_quant float8_e4m3fn (what ComfyUI turns the legacy form into): weight_scale, input_scale; one weight
    stored as uint8 bytes, which ComfyUI views as fp8."""
    src, deq = {}, {}
    for i, (k, v) in enumerate(sd.items()):
        if k not in linears(sd):
            src[k] = deq[k] = v
            continue
        layer = k[: -len(".weight")]
        s = (v.float().abs().max() / 448.0).reshape(())
        w8 = (v.float() / s).to(FP8)
        src[k] = w8.view(torch.uint8) if i == 1 else w8
        src[f"{layer}.weight_scale"] = s
        src[f"{layer}.input_scale"] = torch.tensor(0.5)
        src[f"{layer}.comfy_quant"] = cq({"format": "float8_e4m3fn"})
        deq[k] = (w8.double() * s.double()).float()
    return src, deq, None


def int8_quantize(w: torch.Tensor, group: int, per_row: bool):
    """comfy-kitchen's int8 weights: optionally W H^T per group (normalised H), then round(W / scale) with
    scale = absmax / 127 per row ([out, 1]) or per tensor (a scalar)."""
    n, k = w.shape
    wf = w.float()
    if group:
        wf = (wf.reshape(n, k // group, group) @ (hadamard(group) / math.sqrt(group)).float().T).reshape(n, k)
    amax = wf.abs().amax(dim=1, keepdim=True) if per_row else wf.abs().max()
    s = (amax / 127.0).clamp(min=1e-30).float()
    return (wf / s).round().clamp(-128, 127).to(torch.int8), s


def int8_dequantize(q: torch.Tensor, s: torch.Tensor, group: int) -> torch.Tensor:
    """Exact in float64 (integer codes times the +-1 matrix, scale / sqrt(group) a power of two), rounded once."""
    x = q.double()
    if group:
        n, k = q.shape
        x = (x.reshape(n, k // group, group) @ hadamard(group)).reshape(n, k)
        return (x * (s.double() / math.sqrt(group))).float()
    return (x * s.double()).float()


def int8_forms(sd, *, group=0, metadata=False, prefix=""):
    src, deq, layers = {}, {}, {}
    for i, (k, v) in enumerate(sd.items()):
        if k not in linears(sd):
            src[k] = deq[k] = v
            continue
        layer = k[: -len(".weight")]
        q, s = int8_quantize(v, group, per_row=group > 0 or i % 2 == 0)
        conf = {"format": "int8_tensorwise"}
        if group:
            conf.update(convrot=True, convrot_groupsize=group) if i % 2 else conf.update(
                params={"convrot": True, "convrot_groupsize": group})
        src[k], src[f"{layer}.weight_scale"] = q, s
        if metadata:
            layers[prefix + layer] = conf
        else:
            src[f"{layer}.comfy_quant"] = cq(conf)
        deq[k] = int8_dequantize(q, s, group)
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})} if metadata else None
    return src, deq, meta


FORMS = {
    "fp8_e4m3fn": (fp8_e4m3fn, "fp8_e4m3fn"),
    "fp8_scaled": (fp8_scaled, "fp8_scaled"),
    "fp8_scaled_2_element_marker": (fp8_scaled_full_precision_mm, "fp8_scaled"),
    "comfy_quant_float8": (comfy_float8, "comfy_quant float8"),
    "int8_tensorwise": (int8_forms, "int8_tensorwise"),
    "int8_tensorwise_in_metadata": (lambda sd, prefix="": int8_forms(sd, metadata=True, prefix=prefix),
                                    "int8_tensorwise"),
    "int8_convrot": (lambda sd: int8_forms(sd, group=GROUP), "int8_tensorwise (ConvRot)"),
}


def write(path, tensors, prefix="", metadata=None):
    save_file({prefix + k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def references(family, tmp_path_factory):
    """Per form: the source tensors and metadata, and the conversion of the dequantized model (no prefix)."""
    adapter, sd = family
    d = tmp_path_factory.mktemp(f"ref_{adapter.name}")
    out = {}
    for form, (make, _) in FORMS.items():
        src, deq, meta = make(sd)
        ref = convert_file(write(d / f"{form}_dequantized.safetensors", deq), d / f"{form}_ref.safetensors")
        assert ref.source_form in ("bf16", "fp32 + bf16", "bf16 + fp32")
        out[form] = (d / f"{form}_ref.safetensors").read_bytes()
    return out


def _only(folder, *names) -> bool:
    return sorted(p.name for p in folder.iterdir()) == sorted(names)


# ------------------------------------------------------------------------ every form converts

@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."])
@pytest.mark.parametrize("form", list(FORMS))
def test_each_form_converts_to_the_conversion_of_its_dequantized_model(family, references, form, prefix, tmp_path):
    adapter, sd = family
    make, form_name = FORMS[form]
    src, _, meta = make(sd, prefix=prefix) if form == "int8_tensorwise_in_metadata" else make(sd)
    path = write(tmp_path / "src.safetensors", src, prefix, meta)
    plan = inspect_source(path)
    assert plan.form == form_name and plan.prefix == prefix and plan.ignored == 0
    assert set(plan.names) == set(sd)  # scales, declarations and the marker are consumed, not model tensors
    dst = tmp_path / "out.safetensors"
    seen = []
    result = convert_file(path, dst, progress=seen.append)
    assert result.source_form == form_name and result.source_summary.startswith(form_name)
    info = validate_checkpoint(dst)
    assert info.adapter.name == adapter.name and info.dims == adapter.tiny_dims()
    assert dst.read_bytes() == references[form]
    assert seen[-1].bytes_done == seen[-1].bytes_total == read_header(path).data_bytes  # every byte, once


def test_marker_outside_the_prefix_and_an_all_in_one_file(family, references, tmp_path):
    """A prefixed file whose scaled_fp8 marker is top level (ComfyUI reads both), beside a VAE's tensors."""
    adapter, sd = family
    src, _, _ = fp8_scaled(sd)
    tensors = {("scaled_fp8" if k == "scaled_fp8" else "model.diffusion_model." + k): v for k, v in src.items()}
    tensors["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4)
    path = write(tmp_path / "bundle.safetensors", tensors)
    plan = inspect_source(path)
    assert plan.ignored == 1 and plan.form == "fp8_scaled"
    convert_file(path, tmp_path / "out.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == references["fp8_scaled"]


def test_dequantized_values(family):
    """The reader's values: fp8 exactly, scaled forms the exact product rounded once, ConvRot rotated back
    (so the weight is close to the original one, not to its rotation)."""
    _, sd = family
    k = linears(sd)[0]
    w = sd[k]
    q, s = int8_quantize(w, GROUP, per_row=True)
    got = dequantize(q, s, GROUP, chunk_elements=3 * w.shape[1])  # chunked: the same values
    assert got.dtype == torch.float32 and torch.equal(got, int8_dequantize(q, s, GROUP))
    err = (got - w.float()).abs().max() / w.float().abs().max()
    assert err < 0.05, err  # within int8 rounding of the original, so the rotation was undone the right way
    q, s = int8_quantize(w, 0, per_row=False)
    assert torch.equal(dequantize(q, s), int8_dequantize(q, s, 0))


@pytest.mark.parametrize("group", [4, 16, 64, 256])
def test_fast_hadamard_equals_the_regular_hadamard_matrix(group):
    g = torch.Generator().manual_seed(group)
    x = torch.randint(-128, 128, (3, 2 * group), generator=g).double()
    dense = (x.reshape(3, 2, group) @ hadamard(group)).reshape(3, 2 * group)
    assert torch.equal(hadamard_groups(x, group), dense)
    h = hadamard(group)
    assert torch.equal(h, h.T) and torch.equal(h @ h, group * torch.eye(group, dtype=torch.float64))


def test_matches_comfy_kitchen_where_installed():
    """Where comfy-kitchen (ComfyUI's own reader) is installed: the same weights as its dequantization, up to its
    float32 rounding."""
    eager = pytest.importorskip("comfy_kitchen.backends.eager.quantization")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 512, generator=g)
    q, s = eager.quantize_int8_convrot_weight(w, 256)
    theirs = eager.dequantize_int8_convrot_weight(q, s, 256)
    ours = dequantize(q, s, 256)
    assert torch.allclose(ours, theirs.float(), rtol=0, atol=1e-6 * float(w.abs().max()))


# ------------------------------------------------------------------------ refusals

def _four_bit(sd, fmt: str, metadata: bool = False):
    """A few Linears in a 4-bit comfy_quant format, with tensors shaped as that format stores them."""
    src, layers = dict(sd), {}
    for k in linears(sd)[:3]:
        layer = k[: -len(".weight")]
        n, kk = sd[k].shape
        src[k] = torch.zeros(n, kk // 2, dtype=torch.uint8 if fmt == "nvfp4" else torch.int8)
        if fmt == "nvfp4":
            src[f"{layer}.weight_scale"] = torch.zeros(n, kk // 16, dtype=FP8)
            src[f"{layer}.weight_scale_2"] = torch.tensor(1.0)
        elif fmt == "asym_w4a8_int8":
            src[f"{layer}.weight_codebook"] = torch.zeros(16)
            src[f"{layer}.weight_s_rel"] = torch.zeros(n, kk // 16, dtype=FP8)
            src[f"{layer}.weight_s_channel"] = torch.zeros(n)
        else:
            src[f"{layer}.weight_scale"] = torch.zeros(n, kk // 64)
        if metadata:
            layers[layer] = {"format": fmt}
        else:
            src[f"{layer}.comfy_quant"] = cq({"format": fmt})
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})} if metadata else None
    return src, meta


@pytest.mark.parametrize("fmt,what", [("nvfp4", "NVFP4"), ("convrot_w4a4", "ConvRot W4A4"),
                                      ("asym_w4a8_int8", "W4A8"), ("svdquant_w4a4", "SVDQuant")])
@pytest.mark.parametrize("metadata", [False, True])
def test_four_bit_sources_are_refused(family, fmt, what, metadata, tmp_path, capsys):
    adapter, sd = family
    src, meta = _four_bit(sd, fmt, metadata)
    path = write(tmp_path / "src.safetensors", src, "model.diffusion_model.", meta)
    dst = tmp_path / "out.safetensors"
    with pytest.raises(ConvertError) as e:
        convert_file(path, dst)
    msg = str(e.value)
    assert f"is a 4-bit model, {what}" in msg and f"stored as '{fmt}'" in msg
    assert "does not convert 4-bit sources" in msg and "compounds the two errors" in msg
    assert f"Download the same {adapter.title} model's bf16 or fp16 file instead" in msg
    assert _only(tmp_path, "src.safetensors")  # nothing written, no partial left
    # the command: one line, no traceback, nothing written
    assert cli.main(["convert", str(path), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quantsparse convert: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert "compounds the two errors" in err and _only(tmp_path, "src.safetensors")


def test_mxfp8_is_refused(family, tmp_path):
    _, sd = family
    k = linears(sd)[0]
    layer = k[: -len(".weight")]
    src = dict(sd, **{k: sd[k].to(FP8), f"{layer}.weight_scale": torch.zeros(sd[k].shape[0], 8, dtype=torch.uint8),
                      f"{layer}.comfy_quant": cq({"format": "mxfp8"})})
    path = write(tmp_path / "src.safetensors", src)
    with pytest.raises(ConvertError, match=r"is an MXFP8 .*tiled scale layout.*stored as 'mxfp8' \(e\.g\. "
                                           rf"{layer}\.comfy_quant\).*does not read that block-scale layout\. "
                                           r"Download the same .* bf16 or fp16 file"):
        convert_file(path, tmp_path / "out.safetensors")
    assert _only(tmp_path, "src.safetensors")


def test_gguf_is_refused(tmp_path):
    path = tmp_path / "wan2.2_t2v_low_noise_14B_Q4_K_M.gguf"
    path.write_bytes(b"GGUF" + bytes(4096))
    with pytest.raises(ConvertError, match=r"is a GGUF model .*does not convert GGUF models.*compounds the two "
                                           r"errors.*bf16 or fp16 file instead"):
        convert_file(path, tmp_path / "out.safetensors")
    assert _only(tmp_path, path.name)


def _broken(sd, how: str):
    """A file whose forms do not fit together, and the tensor the refusal must name."""
    ks = linears(sd)
    k, layer = ks[0], ks[0][: -len(".weight")]
    src, _, _ = fp8_scaled(sd)
    if how == "scale_weight without its weight":
        del src[k]
        return src, f"{layer}.scale_weight is a weight scale without its weight {k}"
    if how == "scale_weight without the marker":
        del src["scaled_fp8"]
        return src, "scale_weight is a legacy fp8_scaled weight scale, but the file has no scaled_fp8 marker"
    if how == "scale_weight of a bf16 weight":
        src[k] = sd[k]
        return src, f"{layer}.scale_weight scales {k}, which is bfloat16, not fp8"
    if how == "a per-column scale":
        src[f"{layer}.scale_weight"] = torch.ones(sd[k].shape[1])
        return src, (f"{layer}.scale_weight has shape [{sd[k].shape[1]}]; a weight scale is a scalar or one per "
                     "output row")
    src, _, _ = int8_forms(sd)
    if how == "unknown comfy_quant format":
        src[f"{layer}.comfy_quant"] = cq({"format": "int6_magic"})
        return src, (f"{layer}.comfy_quant declares the quantization format 'int6_magic', which this converter "
                     "does not know")
    if how == "comfy_quant without its weight":
        del src[k]
        return src, f"{layer}.comfy_quant declares the layer '{layer}' as 'int8_tensorwise', but the file has no {k}"
    if how == "int8 weight without its scale":
        del src[f"{layer}.weight_scale"]
        return src, (f"{k} is declared 'int8_tensorwise' (by {layer}.comfy_quant) but the file has no "
                     f"{layer}.weight_scale")
    if how == "weight_scale without a declaration":
        del src[f"{layer}.comfy_quant"]
        return src, f"{layer}.weight_scale belongs to the quantized layer '{layer}', but no {layer}.comfy_quant"
    if how == "int8 declared, stored bf16":
        src[k] = sd[k]
        return src, f"{k} is declared int8_tensorwise but is stored as bfloat16"
    if how == "undeclared int8 tensor":
        src = dict(sd, **{k: sd[k].to(torch.int8)})
        return src, f"{k} is stored as int8 and nothing in the file"
    if how == "bad JSON":
        src[f"{layer}.comfy_quant"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
        return src, f"{layer}.comfy_quant is not valid JSON"
    raise AssertionError(how)


@pytest.mark.parametrize("how", [
    "scale_weight without its weight", "scale_weight without the marker", "scale_weight of a bf16 weight",
    "a per-column scale", "unknown comfy_quant format", "comfy_quant without its weight",
    "int8 weight without its scale", "weight_scale without a declaration", "int8 declared, stored bf16",
    "undeclared int8 tensor", "bad JSON"])
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_inconsistent_files_are_refused_naming_the_tensor(family, how, prefix, tmp_path):
    _, sd = family
    src, says = _broken(sd, how)
    path = write(tmp_path / "src.safetensors", src, prefix)
    with pytest.raises(ConvertError) as e:
        convert_file(path, tmp_path / "out.safetensors")
    msg = str(e.value).replace(prefix, "") if prefix else str(e.value)
    assert says in msg, msg
    assert "bf16 or fp16 file" in msg and "\n" not in msg
    assert _only(tmp_path, "src.safetensors")


@pytest.mark.parametrize("case", ["default group", "not a power of 4", "not a number"])
def test_a_convrot_rotation_that_cannot_be_undone_exactly_is_refused(family, case, tmp_path):
    """No group size means ComfyUI's default, 256, which a Linear whose inputs are no multiple of 256 cannot have
    been rotated with (a larger group where the tiny model has no such Linear)."""
    _, sd = family
    k = next((k for k in linears(sd) if sd[k].shape[1] % 256), linears(sd)[0])
    inputs, layer = sd[k].shape[1], k[: -len(".weight")]
    src, _, _ = int8_forms(sd)
    conf = {"format": "int8_tensorwise", "convrot": True}
    if case == "default group":
        group = 256 if inputs % 256 else 4 ** math.ceil(math.log(inputs + 1, 4))
        if group != 256:
            conf["convrot_groupsize"] = group
        why = f"the weight's {inputs} inputs are not a multiple of the group size {group}"
    elif case == "not a power of 4":
        conf["params"] = {"convrot_groupsize": 8}
        why = "its group size 8 is not a power of 4"
    else:
        conf["convrot_groupsize"] = "x"
        why = "its group size 'x' is not a number"
    src[f"{layer}.comfy_quant"] = cq(conf)
    path = write(tmp_path / "src.safetensors", src)
    with pytest.raises(ConvertError) as e:
        convert_file(path, tmp_path / "out.safetensors")
    msg = str(e.value)
    assert f"{layer}.comfy_quant says the int8 weight {k} was ConvRot-rotated, but {why}" in msg, msg
    assert "cannot be undone exactly from what the file stores" in msg and "bf16 or fp16 file" in msg
    assert _only(tmp_path, "src.safetensors")


def test_a_non_finite_scale_fails_mid_conversion_and_leaves_nothing(family, tmp_path):
    _, sd = family
    src, _, _ = fp8_scaled(sd)
    layer = linears(sd)[-1][: -len(".weight")]
    src[f"{layer}.scale_weight"] = torch.tensor(float("nan"))
    path = write(tmp_path / "src.safetensors", src)
    with pytest.raises(ConvertError, match=rf"the weight scale {layer}\.scale_weight is not finite"):
        convert_file(path, tmp_path / "out.safetensors")
    assert _only(tmp_path, "src.safetensors")


def test_cli_prints_the_source_form(family, tmp_path, capsys):
    _, sd = family
    src, _, _ = int8_forms(sd, group=GROUP)
    path = write(tmp_path / "src.safetensors", src, "model.diffusion_model.")
    assert cli.main(["convert", str(path), str(tmp_path / "out.safetensors")]) == 0
    out, err = capsys.readouterr()
    n = len(linears(sd))
    assert (f"source form: int8_tensorwise (ConvRot) ({n} int8_tensorwise (ConvRot): int8 x weight_scale rotated "
            "back, dequantized exactly to float32; ") in out
    assert "source: int8_tensorwise (ConvRot)" in err  # said before the conversion starts
    validate_checkpoint(tmp_path / "out.safetensors")


def test_calibration_loads_a_scaled_fp8_source_as_its_dequantized_model(tmp_path):
    """`quantsparse calibrate` reads the model through the same reader: a scaled fp8 source gives the model
    of its dequantized weights (not the raw fp8 bytes, not a load error on the scale tensors)."""
    from comfyui_quantsparse.quantsparse.calib.job import load_full_model
    from comfyui_quantsparse.quantsparse.checkpoint.convert import inspect_source

    from comfyui_quantsparse.quantsparse.models import registry

    adapter = registry.by_name("hunyuan_video")
    sd = adapter.random_state_dict(adapter.tiny_dims(), seed=3)
    write(tmp_path / "fp8_scaled.safetensors", fp8_scaled(sd)[0])
    model = load_full_model(tmp_path / "fp8_scaled.safetensors", dtype=torch.float32)
    with inspect_source(tmp_path / "fp8_scaled.safetensors").open() as reader:
        for name, t in model.state_dict().items():
            assert torch.equal(t, reader.get(name).float()), name
    name = linears(sd)[0]
    assert not torch.equal(model.state_dict()[name], sd[name].float())  # fp8 is lossy: really the fp8 weights
