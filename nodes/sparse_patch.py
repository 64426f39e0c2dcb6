"""The "QuantSparse Attention" MODEL patch: sparse attention + SSAR for any stock sampler.

ComfyUI glue only (research/comfyui.md sections 2 and 3, EasyCache's pattern); the decisions and the
math live in ``quantsparse/sparse/override.py``. On a clone of the patcher it installs:

- ``transformer_options["quantsparse"]``: a ``SparsePatch`` holding the settings (and the last run's
  summary, which the QuantSparse Sampler node shows);
- an OUTER_SAMPLE wrapper giving every sampling run its own ``SparseRun`` in a per-run copy of the
  model options, closed in ``finally`` (no cache survives a run, whatever the next run's settings);
- a DIFFUSION_MODEL wrapper recording per model call the video token grid (read by the model family's
  adapter from the model's inputs) and the step index, and timing the call;
- the attention override, which asks the adapter what each call is (``ModelAdapter.attention_call``:
  HunyuanVideo's joint attention, Wan's self-attention, or a call that stays dense and why: the text
  refiner, cross-attention, a layout it does not know) and passes the dense ones to the previous
  override or the backend ``func``, counting each under its reason; it uses that same dense path on
  dense warm-up steps and for the dense half of refresh steps (cuDNN on the H100: 306 ms plus a 62 ms
  sparse pass per block at 118,800 tokens, against 429 ms for the kernel's one-launch refresh).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import comfy.model_patcher
import comfy.patcher_extension
import torch
from comfy_api.latest import io

from ..quantsparse.sparse.config import BLOCK_SIZES, HEAD_DIM, MASK_MODES, SparseConfig, block_size_problem
from ..quantsparse.sparse.override import SparseRun, format_summary, key_padding_from_mask, sparse_attention_call
from ..quantsparse.models import registry
from ..quantsparse.sparse.ssar import DENSE

PATCH_KEY = "quantsparse"          # SparsePatch (settings), on the patched model's options
RUN_KEY = "quantsparse_run"        # SparseRun, only inside a sampling run's options copy
CALL_KEY = "quantsparse_call"      # per model call: grid, img_len, step
WRAPPER_KEY = "quantsparse"

log = logging.getLogger("quantsparse")


class SparsePatch:
    """Settings of one patched model, the family adapter that reads its attention calls (None when the
    model is of no supported family: then ``warning`` says so and every call runs dense), and the
    summary of the last run sampled with it."""

    def __init__(self, config: SparseConfig, adapter=None, warning: str = ""):
        self.config = config
        self.adapter = adapter
        self.warning = warning
        self.last_summary: Optional[dict] = None


def model_adapter(model) -> tuple[Optional[object], str]:
    """(adapter, "") for a MODEL of a supported family, or (None, why not) for any other."""
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    if dm is None:
        return None, "this MODEL has no diffusion model the patch can read"
    shapes = {k: tuple(v.shape) for k, v in dm.state_dict().items()}
    try:
        return registry.identify(shapes)[0], ""
    except registry.UnknownModelError:
        return None, (f"QuantSparse sparse attention does not understand this model ({type(dm).__name__}: "
                      f"{registry.describe(shapes)}); every attention call of it runs dense. Supported: "
                      f"{registry.supported_text()}")
    except ValueError as e:
        return None, (f"QuantSparse sparse attention does not support this model ({type(dm).__name__}): {e}; every "
                      "attention call of it runs dense")


def sparse_inputs() -> list:
    """The knobs, shared by the patch node and the sampler node."""
    d = SparseConfig()
    return [
        io.Float.Input("density", default=d.density, min=0.01, max=1.0, step=0.01,
                       tooltip="Fraction of video-to-video attention blocks computed on sparse steps (1 = dense)."),
        io.Combo.Input("mask_mode", options=list(MASK_MODES), default=d.mask_mode,
                       tooltip="svg: per head spatial or temporal band (SparseVideoGen); topk: pooled block scores."),
        io.Float.Input("dense_warmup", default=d.dense_warmup, min=0.0, max=1.0, step=0.01,
                       tooltip="Fraction of the first (high-noise) steps run with dense attention."),
        io.Int.Input("refresh_interval", default=d.refresh_interval, min=1, max=100,
                     tooltip="SSAR recomputes dense attention (and its residual cache) every this many steps."),
        io.Int.Input("rank", default=d.rank, min=1, max=HEAD_DIM,  # the sparse kernel's head size
                     tooltip="Rank of SSAR's second-order correction."),
        io.Int.Input("ssar_order", default=d.ssar_order, min=0, max=2,
                     tooltip="0: plain sparse; 1: add the cached residual; 2: plus its rank-r change."),
        io.Int.Input("block_q", default=d.block_q, min=BLOCK_SIZES[0], max=BLOCK_SIZES[-1], advanced=True,
                     tooltip="Video tokens per query block (power of two); smaller = finer masks, slower kernel."),
        io.Int.Input("block_k", default=d.block_k, min=BLOCK_SIZES[0], max=BLOCK_SIZES[-1], advanced=True,
                     tooltip="Video tokens per key block (power of two)."),
    ]


def check_blocks(block_q, block_k) -> bool | str:
    """``validate_inputs`` of both nodes: the block sizes' rule is more than a range (power of two), and a
    declared input skips ComfyUI's own range check: ``SparseConfig``'s rule, before the prompt runs."""
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        problem = None if b is None else block_size_problem(name, b)
        if problem:
            return problem
    return True


def config_from_widgets(density, mask_mode, dense_warmup, refresh_interval, rank, ssar_order, block_q,
                        block_k) -> SparseConfig:
    return SparseConfig(density=float(density), mask_mode=mask_mode, dense_warmup=float(dense_warmup),
                        refresh_interval=int(refresh_interval), rank=int(rank), ssar_order=int(ssar_order),
                        block_q=int(block_q), block_k=int(block_k))


class SparseAttentionOverride:
    """The ``optimized_attention_override`` callable; ``previous`` is the override it chains to."""

    def __init__(self, previous=None):
        self.previous = previous

    def _dense(self, func, args, kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def __call__(self, func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        run: Optional[SparseRun] = to.get(RUN_KEY)
        patch: Optional[SparsePatch] = to.get(PATCH_KEY)
        if run is None or patch is None:
            return self._dense(func, args, kwargs)  # calls outside a sampling run
        if patch.adapter is None:
            run.note_passthrough("model not supported")
            return self._dense(func, args, kwargs)
        call = to.get(CALL_KEY)
        decision = patch.adapter.attention_call(args, kwargs, to, call)
        if not decision.sparse:
            run.note_passthrough(decision.reason)
            return self._dense(func, args, kwargs)
        step = call["step"]
        if run.kind(step) == DENSE:
            run.note_dense_step(step)
            return self._dense(func, args, kwargs)
        q, k, v = decision.q, decision.k, decision.v
        b, _, seq, _ = q.shape
        out = sparse_attention_call(
            run, q, k, v, block_type=to.get("block_type", ""), block_index=int(to.get("block_index", 0)), step=step,
            grid=decision.grid, txt_len=decision.txt_len, cond_rows=to.get("cond_or_uncond"),
            key_padding=key_padding_from_mask(kwargs.get("mask"), b, seq),
            dense=lambda: self._dense(func, args, dict(kwargs, skip_output_reshape=True)))
        if kwargs.get("skip_output_reshape"):
            return out
        return decision.output(out)


def _transformer_options(args, kwargs):
    if args and isinstance(args[-1], dict):
        return args[-1], "args"
    return kwargs.get("transformer_options"), "kwargs"


def outer_sample_wrapper(executor, *args, **kwargs):
    """A fresh SparseRun per sampling run, in a per-run copy of the options; freed in ``finally``."""
    guider = executor.class_obj
    orig = guider.model_options
    patch: SparsePatch = orig["transformer_options"][PATCH_KEY]
    sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
    run = SparseRun(patch.config, sigmas, from_noise=_starts_from_noise(guider, sigmas))
    try:
        guider.model_options = comfy.model_patcher.create_model_options_clone(orig)
        guider.model_options["transformer_options"][RUN_KEY] = run
        return executor(*args, **kwargs)
    finally:
        guider.model_options = orig
        run.close()
        patch.last_summary = run.summary()
        if patch.warning:
            patch.last_summary["warning"] = patch.warning
        log.info("QuantSparse attention run:\n%s", format_summary(patch.last_summary))


def _starts_from_noise(guider, sigmas) -> bool:
    """Whether this run starts at the model's largest sigma (a whole schedule, or the high-noise range of a
    split one); a KSamplerAdvanced range that starts later, or a partial denoise, does not."""
    try:
        sigma_max = float(guider.model_patcher.model.model_sampling.sigma_max)
        return float(sigmas.flatten()[0]) >= sigma_max * (1.0 - 1e-3)
    except (AttributeError, TypeError, IndexError):
        return True


def diffusion_model_wrapper(executor, *args, **kwargs):
    """Per model call: the video token grid the family's adapter reads from the model's inputs, and the step."""
    to, where = _transformer_options(args, kwargs)
    run: Optional[SparseRun] = to.get(RUN_KEY) if to else None
    patch: Optional[SparsePatch] = to.get(PATCH_KEY) if to else None
    if run is None or patch is None or patch.adapter is None or to.get("sigmas") is None:
        return executor(*args, **kwargs)
    call = patch.adapter.call_geometry(executor.class_obj, args, kwargs) or {"dense": "unsupported layout"}
    step = run.step_of(to["sigmas"])
    to = dict(to)
    to[CALL_KEY] = {**call, "step": step}
    if where == "args":
        args = args[:-1] + (to,)
    else:
        kwargs = dict(kwargs, transformer_options=to)
    x = args[0] if args else None
    with run.timed(step, x.device if isinstance(x, torch.Tensor) else None):
        return executor(*args, **kwargs)


def apply_sparse_patch(model, config: SparseConfig) -> tuple[Any, SparsePatch]:
    """A clone of ``model`` with sparse attention installed; returns (clone, its SparsePatch)."""
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    previous = to.get("optimized_attention_override")
    if isinstance(previous, SparseAttentionOverride):
        previous = previous.previous  # patching twice replaces our settings, it does not stack two sparsifiers
    adapter, warning = model_adapter(model)
    if warning:
        log.warning(warning)
    patch = SparsePatch(config, adapter, warning)
    to[PATCH_KEY] = patch
    to["optimized_attention_override"] = SparseAttentionOverride(previous)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample_wrapper)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, diffusion_model_wrapper)
    return m, patch


class QuantSparseAttention(io.ComfyNode):
    """MODEL -> MODEL: the sampler that uses it runs sparse attention with the SSAR cache."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QuantSparseAttention",
            display_name="QuantSparse Attention",
            category="QuantSparse",
            description="Block-sparse attention with the SSAR residual cache (Wan 2.1 / 2.2, HunyuanVideo), for "
                        "any sampler (KSampler, KSamplerAdvanced, SamplerCustomAdvanced). Each sampling run gets a "
                        "fresh cache; the sampler's report counts every attention call left dense, with why.",
            inputs=[io.Model.Input("model")] + sparse_inputs(),
            outputs=[io.Model.Output(tooltip="The model with sparse attention installed.")],
        )

    @classmethod
    def validate_inputs(cls, block_q, block_k) -> bool | str:
        return check_blocks(block_q, block_k)

    @classmethod
    def execute(cls, model, **knobs) -> io.NodeOutput:
        m, _ = apply_sparse_patch(model, config_from_widgets(**knobs))
        return io.NodeOutput(m)
