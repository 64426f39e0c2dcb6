"""The "QuantSparse Calibrate" node: a BF16 model + prompts -> an MSAD-calibrated checkpoint and MODEL.

ComfyUI glue only; the method lives in ``quantsparse/`` (capture plan, calibration, export). What is
ComfyUI's here: the prompts are encoded by the CLIP given, the calibration samples are recorded from
ComfyUI's own sampler (euler, simple schedule, the model's shift) through a DIFFUSION_MODEL wrapper,
interrupts and the progress bar are ComfyUI's, and the file goes to ``models/quantsparse/`` where
"Load QuantSparse Model" lists it. The work folder (resumable progress, with the captured samples) is
``output/quantsparse_work/NAME/``: queue the same graph again after a stop to continue. Widget mistakes
are caught when the prompt is queued (``validate_inputs``); a re-queue after success finds its own file
by the fingerprint recorded in it and loads it instead of calibrating again.
"""

from __future__ import annotations

import logging
import os
import re

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..quantsparse.calib.capture import (
    Conditioning,
    capture_plan,
    check_video_size,
    latent_shape,
    record,
    steps_by_prompt,
)
from ..quantsparse.calib.driver import RunOptions, state_fingerprint
from ..quantsparse.calib.job import (
    CalibrationInfo,
    calibrate_to_file,
    capture_fingerprint,
    check_calibration_supported,
    run_fingerprint,
    worse_than_rtn_lines,
)
from ..quantsparse.calib.provenance import calibration_lines
from ..quantsparse.calib.settings import CalibSettings
from ..quantsparse.checkpoint.format import checkpoint_replaceable, validate_checkpoint
from ..quantsparse.core.config import BIT_SCHEMES
from ..quantsparse.core.paths import output_folder
from ..quantsparse.core.errors import QuantSparseError
from ..quantsparse.models import registry
from .folders import FOLDER
from .model import load_quantsparse_model

log = logging.getLogger("quantsparse")
WRAPPER_KEY = "quantsparse_capture"
FULL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DEFAULT_PROMPTS = "\n".join([
    "a red fox running through fresh snow, golden hour, cinematic",
    "a busy city street at night in the rain, neon reflections, people with umbrellas",
    "waves crashing on black volcanic rocks, slow motion, overcast sky",
    "a chef chopping vegetables in a bright kitchen, close-up of the hands",
    "a hot air balloon drifting over green hills at sunrise, aerial shot",
])
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,120}$")


# The family this node's widgets and defaults are for: the one MSAD calibration supports today.
FAMILY = next(a for a in registry.adapters() if a.calibration_supported)
WANTED = f"a full-precision {FAMILY.title} MODEL ({FAMILY.source_files} from 'Load Diffusion Model')"


def full_state_of(model):
    """(adapter, dims, weights) of the MODEL, checked to be a full-precision model of a family MSAD calibrates
    (a ValueError says what to load instead)."""
    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    if diffusion_model is None:
        raise ValueError(f"QuantSparse Calibrate needs {WANTED}, but this MODEL is "
                         f"{type(getattr(model, 'model', model)).__name__}.")
    sd = diffusion_model.state_dict()
    low = sorted({str(v.dtype) for k, v in sd.items() if k.endswith(".weight") and v.dtype not in FULL_DTYPES})
    if low:
        raise ValueError(f"QuantSparse Calibrate needs the full-precision model, but this MODEL's weights are {low} "
                         "(already quantized, e.g. fp8 or a QuantSparse checkpoint). Load the BF16 file with "
                         "'Load Diffusion Model' and weight_dtype 'default'.")
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    try:
        adapter, dims = registry.identify(shapes)
        check_calibration_supported(dims)
    except (QuantSparseError, ValueError) as e:
        raise ValueError(f"QuantSparse Calibrate needs {WANTED}: {e}") from None
    return adapter, dims, sd


def full_model_of(adapter, dims, sd: dict[str, torch.Tensor]):
    """The weights as the family's torch-only model (BF16, host) that calibration runs block by block."""
    m = adapter.build_model(dims, dtype=torch.bfloat16, device="meta")
    m.load_state_dict({k: v.detach().to("cpu", torch.bfloat16) for k, v in sd.items()}, assign=True)
    return m


def output_name(name: str) -> str:
    """``NAME.safetensors`` from the widget: a plain file name, never a path out of the folder."""
    name = (name or "").strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not _NAME.match(name) or ".." in name:
        raise ValueError(f"file_name {name!r} is not allowed: use letters, digits, '.', '_', '-' and spaces (no "
                         "folders); the checkpoint is written to models/quantsparse/NAME.safetensors")
    return name + ".safetensors"


def destination(file_name: str) -> str:
    """Where the checkpoint goes: the first ``quantsparse`` model folder (created if missing)."""
    return os.path.join(folder_paths.get_folder_paths(FOLDER)[0], output_name(file_name))


def work_folder(file_name: str) -> str:
    return os.path.join(folder_paths.get_output_directory(), "quantsparse_work",
                        output_name(file_name)[: -len(".safetensors")])


def check_widgets(file_name, width, height, frames) -> None:
    """What the widgets alone decide, checked when the prompt is queued (a node error, no traceback)."""
    if width is not None and height is not None and frames is not None:
        if not (16 <= width <= 4096 and 16 <= height <= 4096 and 1 <= frames <= 1025):
            raise ValueError(f"width x height x frames {width}x{height}x{frames} is out of range "
                             "(16..4096 x 16..4096 x 1..1025)")
        check_video_size(width, height, frames, FAMILY.sampling)
    if file_name is None:
        return
    dst = destination(file_name)
    output_folder(os.path.dirname(dst), f"models/{FOLDER}/{os.path.basename(dst)}")  # created when it runs
    if os.path.exists(dst):
        why = checkpoint_replaceable(dst)
        if why:
            raise ValueError(f"file_name: models/{FOLDER}/{os.path.basename(dst)} exists and is {why}; the node "
                             "never replaces it. Choose another file_name.")


def conditionings(clip, prompts: str, conditioning, guidance: float) -> list[list]:
    """One ComfyUI CONDITIONING per prompt: each non-empty line encoded by ``clip``, then each entry of
    ``conditioning``; the embedded guidance set on all (what FluxGuidance does)."""
    out = []
    lines = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
    if lines and clip is None and conditioning is None:
        raise ValueError("QuantSparse Calibrate got prompts but no CLIP to encode them: connect the CLIP of "
                         f"{FAMILY.text_encoders}, or a CONDITIONING")
    if lines and clip is None:
        log.warning("QuantSparse Calibrate: no CLIP connected, the %d prompt line(s) are not used", len(lines))
    if clip is not None:
        for line in lines:
            out.append(clip.encode_from_tokens_scheduled(clip.tokenize(line)))
    for entry in conditioning or []:
        out.append([entry])
    if not out:
        raise ValueError("QuantSparse Calibrate needs prompts: write one per line (with a CLIP connected) or connect "
                         "a CONDITIONING")
    return [[[c[0], {**c[1], "guidance": guidance}] for c in cond] for cond in out]


def capture(model, conds: list, *, width: int, height: int, frames: int, samples: int, steps: int, seed: int,
            sampling):
    """Sample each prompt with ComfyUI's sampler up to its last planned step, recording the model's inputs."""
    plan = capture_plan(samples, len(conds), steps)
    wanted = steps_by_prompt(plan)
    records: dict[tuple[int, int], dict] = {}
    state = {"prompt": 0}

    def wrapper(executor, x, timestep, context, y=None, txt_byt5=None, clip_fea=None, guidance=None,
                attention_mask=None, *args, **kwargs):
        to = kwargs.get("transformer_options") or (args[-1] if args and isinstance(args[-1], dict) else {})
        sample_sigmas, sigmas = to.get("sample_sigmas"), to.get("sigmas")
        if sample_sigmas is not None and sigmas is not None:
            step = int((sample_sigmas.to(sigmas.device).float() - sigmas.float()[0]).abs().argmin())
            if step in wanted.get(state["prompt"], ()) and (state["prompt"], step) not in records:
                records[(state["prompt"], step)] = record(x, timestep, context, y, guidance, attention_mask)
        return executor(x, timestep, context, y, txt_byt5, clip_fea, guidance, attention_mask, *args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, wrapper)
    latent = torch.zeros(latent_shape(width, height, frames, sampling))
    for p, cond in enumerate(conds):
        if p not in wanted:
            continue
        state["prompt"] = p
        noise = comfy.sample.prepare_noise(latent, seed + p)
        comfy.sample.sample(m, noise, steps, 1.0, "euler", "simple", cond, cond, latent,
                            last_step=max(wanted[p]) + 1, force_full_denoise=False, disable_pbar=True, seed=seed + p)
    missing = [pt for pt in plan if (pt.prompt, pt.step) not in records]
    if missing:
        raise RuntimeError(f"the sampler did not reach {len(missing)} planned calibration step(s) (e.g. prompt "
                           f"{missing[0].prompt} step {missing[0].step}); is another node replacing the model call?")
    return [records[(pt.prompt, pt.step)] for pt in plan]


class QuantSparseCalibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = CalibSettings()
        return io.Schema(
            node_id="QuantSparseCalibrate",
            display_name="QuantSparse Calibrate",
            category="QuantSparse",
            description=f"Calibrates {FAMILY.title} for QuantSparse with MSAD: samples the full model over your prompts, "
                        "then learns smoothing and clipping block by block so that the quantized, sparse model keeps "
                        "the full model's attention. Writes models/quantsparse/NAME.safetensors and returns the "
                        "calibrated MODEL. Resumes where it stopped if queued again with the same settings.",
            inputs=[
                io.Model.Input("model", tooltip=f"BF16 {FAMILY.title} ({FAMILY.source_files}) from 'Load "
                                                "Diffusion Model'."),
                io.Clip.Input("clip", optional=True, tooltip=f"{FAMILY.title} text encoders ({FAMILY.text_encoders}), "
                                                               "to encode the prompts."),
                io.String.Input("prompts", multiline=True, default=DEFAULT_PROMPTS,
                                tooltip="Calibration prompts, one per line (needs the CLIP)."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="Ready conditioning: each entry is used as one more prompt."),
                io.Int.Input("width", default=848, min=16, max=4096, step=16),
                io.Int.Input("height", default=480, min=16, max=4096, step=16),
                io.Int.Input("frames", default=33, min=1, max=1025, step=4),
                io.Int.Input("samples", default=20, min=1, max=1000,
                             tooltip="Calibration samples: model calls recorded at steps spread over the schedule."),
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Sampling steps of the capture runs."),
                io.Combo.Input("bits", options=sorted(BIT_SCHEMES), default=d.bits),
                io.Float.Input("density", default=d.density, min=0.01, max=1.0, step=0.01,
                               tooltip="Sampling density written into the checkpoint as its default."),
                io.Int.Input("epochs", default=d.epochs, min=0, max=200),
                # The frontend adds a "control after generate" widget to any INT named seed; "fixed" keeps a
                # re-queued calibration on the same seed, so it resumes instead of starting over.
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             control_after_generate=io.ControlAfterGenerate.fixed),
                io.String.Input("file_name", default=f"{FAMILY.name}_msad_w4a8",
                                tooltip="Written as models/quantsparse/NAME.safetensors."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name."),
                io.Float.Input("guidance", default=FAMILY.sampling.guidance, min=0.0, max=100.0, step=0.1,
                               advanced=True),
                io.Float.Input("lambda_global", default=-1.0, min=-1.0, max=1e9, step=0.01, advanced=True,
                               tooltip="Weight of the pooled-attention loss; -1 = normalised to the output loss."),
                io.Float.Input("lambda_local", default=-1.0, min=-1.0, max=1e9, step=0.01, advanced=True,
                               tooltip="Weight of the salient-query attention loss; -1 = normalised."),
                io.Boolean.Input("sparse_calibration", default=False, advanced=True,
                                 tooltip="Calibrate under the sparse mask at 'density'. Only for sampling with SSAR "
                                         "off: SSAR adds the dropped attention back, so the default dense "
                                         "calibration is far better with it."),
                io.Boolean.Input("restart", default=False, advanced=True,
                                 tooltip="Discard the finished blocks in the work folder when they were made with "
                                         "other settings (otherwise the node stops and says which settings differ)."),
            ],
            outputs=[io.Model.Output(
                tooltip="The calibrated QuantSparse model (as 'Load QuantSparse Model' loads it).")],
            is_output_node=True,  # it writes a file: a graph of loaders and this node runs
            not_idempotent=True,
        )

    @classmethod
    def validate_inputs(cls, file_name, width, height, frames) -> bool | str:
        # Declared inputs skip ComfyUI's own range checks, so check_widgets checks their ranges itself.
        try:
            check_widgets(file_name, width, height, frames)
        except ValueError as e:  # QuantSparseError included
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, file_name, **_) -> str:
        # ComfyUI reuses a node's output while its fingerprint is unchanged: with the checkpoint deleted
        # (or rewritten) since, the node must run again instead of reporting a file that is not there.
        try:
            st = os.stat(destination(file_name))
            return f"{file_name}:{st.st_size}:{st.st_mtime_ns}"
        except (OSError, ValueError):
            return f"{file_name}:absent"

    @classmethod
    def execute(cls, model, prompts, width, height, frames, samples, steps, bits, density, epochs, seed, file_name,
                overwrite, guidance, lambda_global, lambda_local, sparse_calibration=False, restart=False,
                clip=None, conditioning=None) -> io.NodeOutput:
        settings = CalibSettings(bits=bits, density=float(density), sparse_attention=bool(sparse_calibration),
                                 epochs=int(epochs), seed=int(seed),
                                 lambda_global=None if lambda_global < 0 else float(lambda_global),
                                 lambda_local=None if lambda_local < 0 else float(lambda_local))
        check_widgets(file_name, width, height, frames)
        name = output_name(file_name)
        dst = destination(file_name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        adapter, dims, sd = full_state_of(model)
        conds = conditionings(clip, prompts, conditioning, float(guidance))
        info = CalibrationInfo(_base_name(model, adapter.variant(dims)), len(conds), width, height, frames, steps, float(guidance))
        capture_key = capture_fingerprint(info, samples, [_as_conditioning(c) for c in conds])
        fingerprint = run_fingerprint(state_fingerprint(dims, sd, dtype=torch.bfloat16), settings, capture_key)
        if os.path.exists(dst) and _recorded_fingerprint(dst) == fingerprint and not restart:
            loaded, summary = load_quantsparse_model(dst)
            text = [f"models/{FOLDER}/{name} already holds this calibration (same model, prompts and settings): "
                    "loaded it. Change a setting, or delete the file, to calibrate again.",
                    *calibration_lines(summary.info.calibration), summary.text()]
            return io.NodeOutput(loaded, ui=ui.PreviewText("\n".join(text)))
        source = _source_path(model)
        work = work_folder(file_name)
        full = full_model_of(adapter, dims, sd)
        del sd
        total = len(adapter.calib_blocks(full))
        bar = comfy.utils.ProgressBar(total)
        device = comfy.model_management.get_torch_device()

        def capture_samples():
            recorded = capture(model, conds, width=width, height=height, frames=frames, samples=samples,
                               steps=steps, seed=seed, sampling=adapter.sampling)
            comfy.model_management.unload_all_models()  # calibration holds one block on the device, not the model
            comfy.model_management.soft_empty_cache()
            return recorded

        options = RunOptions(device=str(device), progress=lambda n, t, key: bar.update_absolute(n, t),
                             check_stop=comfy.model_management.throw_exception_if_processing_interrupted,
                             log=log.info)
        path, result, record_ = calibrate_to_file(full, capture_samples, settings, dst, info, work_dir=work,
                                                  overwrite=overwrite, restart=restart,
                                                  inputs=[source] if source else [], capture=capture_key,
                                                  fingerprint=fingerprint, options=options)
        del full
        for line in worse_than_rtn_lines(record_):
            log.warning(line)
        loaded, summary = load_quantsparse_model(str(path))
        text = "\n".join([f"wrote models/{FOLDER}/{name}", *calibration_lines(record_), summary.text()])
        return io.NodeOutput(loaded, ui=ui.PreviewText(text))


def _as_conditioning(cond: list) -> Conditioning:
    """One ComfyUI CONDITIONING (its first entry) as the tensors the fingerprint hashes."""
    tensor, extra = cond[0][0], cond[0][1]
    pooled = extra.get("pooled_output")
    mask = extra.get("attention_mask")
    guidance = extra.get("guidance")
    y = pooled if pooled is not None else torch.zeros(1)
    if guidance is not None:
        y = torch.cat([y.flatten().float(), torch.tensor([float(guidance)])])
    return Conditioning(tensor, y, mask)


def _recorded_fingerprint(path: str):
    try:
        calibration = validate_checkpoint(path).calibration or {}
    except ValueError:
        return None
    return calibration.get("fingerprint")


def _source_path(model):
    """The file the MODEL was loaded from, when ComfyUI kept it: the one file the node must never replace."""
    init = getattr(model, "cached_patcher_init", None)
    if init and len(init) > 1 and init[1] and isinstance(init[1][0], str):
        return init[1][0]
    return None


def _base_name(model, variant: str) -> str:
    """The loaded file's name when ComfyUI kept it, for the provenance record."""
    source = _source_path(model)
    return os.path.basename(source) if source else f"{variant} (ComfyUI MODEL)"
