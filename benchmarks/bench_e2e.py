"""End to end: ComfyUI's own HunyuanVideo-13B, dense BF16 against QuantSparse (W4A8 + sparse attention + SSAR).

What runs (one process, one GPU; random BF16 weights, since timing does not depend on their values):

1. ComfyUI's ``comfy.ldm.hunyuan_video.model.HunyuanVideo`` is built from ComfyUI's own detection config for
   HunyuanVideo T2V (``comfy.model_detection.detect_unet_config`` on the 13B key shapes), with the operations
   ComfyUI picks for a BF16 model (``comfy.ops.pick_operations``), directly on the GPU; its parameters are
   filled in place on the GPU, one tensor at a time, with ``random_weights``' distribution.
2. Dense BF16 steps: the diffusion model's forward exactly as ``BaseModel._apply_model`` calls it (latent,
   timestep = sigma * 1000 in float32, context, y, guidance 6.0 in BF16, no attention mask: ComfyUI drops the
   text mask when no token is padding, as with batch 1 and 256 real tokens; cfg 1, the model is
   guidance-distilled), with ComfyUI's default attention (``optimized_attention``) and again with SDPA forced
   to the cuDNN backend. Each is timed with CUDA events after a warm-up (a full step at short lengths; at long
   lengths the second backend, whose GEMMs are already warm, is warmed by one attention call at the shape).
3. The same model converted to W4A8 the way "Load QuantSparse Model" builds it: ComfyUI's HunyuanVideo with
   our operations class (``nodes.ops.quantsparse_ops``, ``QuantSparseLinear`` loading its packed tensors
   through its own ``_load_from_state_dict``), the weights quantized on the GPU block by block by the
   converter's ``quantize_weight`` (round to nearest, per-channel scales, Hadamard rotation), each BF16 block
   freed as soon as it is converted.
4. QuantSparse steps: the sparse attention override installed as the QuantSparse Sampler installs it
   (``SparsePatch`` + ``SparseAttentionOverride`` in ``transformer_options``, the DIFFUSION_MODEL wrapper
   added with ComfyUI's ``add_wrapper_with_key``, and the steps run inside the pack's OUTER_SAMPLE wrapper,
   which makes the run's ``SparseRun`` over a 50-step schedule); SparseConfig(density 0.15, svg masks,
   refresh_interval 5, default dense warm-up). One step of each kind is timed: DENSE (quantized linears +
   ComfyUI's dense attention), REFRESH (the second refresh of the run, so the second-order update is paid),
   SPARSE (the step after it, SSAR cache populated, mask kept from the refresh).
5. 50-step accounting: the kinds are counted with ``quantsparse.ssar.step_kind`` over 50 steps and
   multiplied by the per-kind times; dense is 50 x the faster dense backend. ``--schedules`` adds the same
   sum for other (dense warm-up, refresh interval) pairs under ``rows[].schedules``: a step's time does not
   depend on the schedule (a refresh step costs the same every 5 or every 10 steps), only the counts do;
   which schedules keep the quality is the proxy's question (``benchmarks/bench_schedule.py``).

Checks before timing: BF16 outputs finite; at the shortest length the QuantSparse DENSE step's output against
the BF16 model's at the same inputs (relative error recorded; W4A8 round-to-nearest on random weights is far
from exact, so only finiteness is asserted), and the REFRESH / SPARSE steps' outputs against BF16 at their
inputs. A per-op profile (torch.profiler, device time by op name) of one SPARSE step at the shortest length
goes to ``e2e_profile_<tag>.json``. Every phase catches its own errors (OOM included), records them and the
run goes on; the JSON is rewritten after every phase, so a run cut short keeps what it measured.

    COMFYUI_DIR=$PWD/.comfyui python benchmarks/bench_e2e.py --out "$OUT"         # H100: e2e_h100.json
    COMFYUI_DIR=/work/ComfyUI /work/comfyvenv/bin/python benchmarks/bench_e2e.py --tiny --out /tmp/e2e
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import math
import os
import statistics
import sys
import time
import traceback
from collections import Counter
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import rel_err, write_json  # noqa: E402

# video tokens -> latent (T, H, W) before the (1, 2, 2) patch
LATENTS = {30210: (19, 60, 106), 118800: (33, 90, 160)}  # 848x480x73, 1280x720x129
TINY_LATENTS = {64: (2, 8, 16), 192: (3, 16, 16), 256: (4, 16, 16)}
TXT_FULL, TXT_TINY = 256, 16
# Wan 14B: 832x480x81 and 1280x720x81 (16-channel latents, stride 4x8x8), 512 umT5 tokens in cross-attention
WAN_LATENTS = {32760: (21, 60, 104), 75600: (21, 90, 160)}
WAN_TINY_LATENTS = {64: (2, 8, 16), 192: (3, 16, 16)}
WAN_TXT = 512
STEPS = 50  # --steps sets it (4 for the step-distilled regime)
SHIFT = 7.0  # HunyuanVideo's sampling shift (comfy.supported_models.HunyuanVideo); Wan's is 8 (WAN21_T2V)
GUIDANCE = 6.0  # ComfyUI's default embedded guidance for HunyuanVideo
LONG_TOKENS = 60000  # above this: one timed rep by default, attention-only warm-up for the second backend
LONG_TOKENS_TINY = 200  # --tiny: the larger tiny length takes the long path, so that the dry run covers it
SEED = 0
BIAS_STD, NORM_STD = 0.02, 0.1  # quantsparse.hunyuan.random_weights' distribution

T0 = time.perf_counter()
ARCH = "hunyuan_video"  # --model sets it: the family whose adapter the sparse patch reads calls with


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def gb(n) -> float | None:
    return None if n is None else round(n / 1e9, 3)


# ---------------------------------------------------------------------------------------------- setup

def import_comfy(cpu: bool):
    root = os.environ.get("COMFYUI_DIR")
    if not root or not os.path.isfile(os.path.join(root, "comfy", "ldm", "hunyuan_video", "model.py")):
        raise SystemExit(f"COMFYUI_DIR={root!r} is not a ComfyUI checkout: set it to one (the device run carries it "
                         "as .comfyui)")
    sys.dont_write_bytecode = True
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfy.cli_args

    if cpu:
        comfy.cli_args.args.cpu = True  # must precede comfy.model_management's import
    import comfy.ldm.modules.attention as comfy_attention
    import comfy.model_detection
    import comfy.model_management  # noqa: F401
    import comfy.ops
    import comfy.patcher_extension
    from comfy.ldm.hunyuan_video.model import HunyuanVideo
    from comfy.ldm.wan.model import WanModel

    version = None
    with contextlib.suppress(OSError):
        for line in open(os.path.join(root, "comfyui_version.py")).read().splitlines():
            if "__version__" in line:
                version = line.split("=", 1)[1].strip().strip("\"'")
    return SimpleNamespace(HunyuanVideo=HunyuanVideo, WanModel=WanModel, ops=comfy.ops, detection=comfy.model_detection,
                           patcher_extension=comfy.patcher_extension, attention=comfy_attention, version=version)


def environment(device: torch.device) -> dict:
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (--tiny)"
    return {"gpu": gpu, "torch": torch.__version__, "triton": tv, "date": datetime.date.today().isoformat()}


def unet_config(comfy, dims) -> dict:
    """ComfyUI's detection config for these dims (read from key shapes on the meta device: no memory)."""
    from comfyui_quantsparse.quantsparse.models import registry

    shapes = registry.adapter_for(dims).reference_shapes(dims)
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    cfg = comfy.detection.detect_unet_config(sd, "")
    want = {"hunyuan_video": "hunyuan_video", "wan": "wan2.1"}[type(dims).architecture]
    if cfg is None or cfg.get("image_model") != want:
        raise RuntimeError(f"ComfyUI did not detect {want} from the {dims} key shapes: {cfg}")
    return cfg


def comfy_class(comfy, dims):
    return comfy.WanModel if type(dims).architecture == "wan" else comfy.HunyuanVideo


@torch.no_grad()
def fill_random_(model: torch.nn.Module, device: torch.device, seed: int) -> int:
    """random_weights' distribution, generated in place on ``device`` one tensor at a time."""
    g = torch.Generator(device=device).manual_seed(seed)
    n = 0
    for name, p in model.named_parameters():
        parts = name.rsplit(".", 2)
        if name.endswith(".bias"):
            p.normal_(0.0, BIAS_STD, generator=g)
        elif len(parts) > 1 and "norm" in parts[-2] and p.dim() == 1:
            p.normal_(1.0, NORM_STD, generator=g)
        else:
            p.normal_(0.0, 1.0 / math.sqrt(math.prod(p.shape[1:])), generator=g)
        n += p.numel()
    return n


def flow_sigmas(steps: int, device) -> torch.Tensor:
    """ComfyUI's simple schedule with the benchmarked family's shift (what the SSAR refresh plan reads)."""
    from comfyui_quantsparse.quantsparse.core.schedule import simple_sigmas

    return simple_sigmas(steps, SHIFT).to(device)


def make_inputs(latent, txt_len, dims, device, dtype, seed, batch: int = 1) -> SimpleNamespace:
    """One model call's inputs; ``batch`` 2 is a CFG call (uncond and cond rows in one forward, as ComfyUI
    batches them: ``cond_or_uncond`` [1, 0])."""
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
    cond_or_uncond = [1, 0][:batch] if batch > 1 else [0]
    if type(dims).architecture == "wan":
        grid = (latent[0], latent[1] // 2, latent[2] // 2)
        return SimpleNamespace(x=rnd(batch, dims.in_dim, *latent), ctx=rnd(batch, txt_len, dims.text_dim), y=None,
                               guidance=None, sigmas=flow_sigmas(STEPS, device), grid=grid, img_len=math.prod(grid),
                               txt_len=0, heads=dims.num_heads, latent=latent, batch=batch,
                               cond_or_uncond=cond_or_uncond, wan=True)
    x = rnd(batch, dims.in_channels, *latent)
    ctx = rnd(batch, txt_len, dims.context_in_dim)
    y = rnd(batch, dims.vec_in_dim)
    grid = tuple(s // p for s, p in zip(latent, dims.patch_size))
    return SimpleNamespace(x=x, ctx=ctx, y=y, guidance=torch.full((batch,), GUIDANCE, device=device, dtype=dtype),
                           sigmas=flow_sigmas(STEPS, device), grid=grid, img_len=math.prod(grid), txt_len=txt_len,
                           heads=dims.num_heads, latent=latent, batch=batch, cond_or_uncond=cond_or_uncond, wan=False)


# ---------------------------------------------------------------------------------------------- running

class Bench:
    def __init__(self, args, device, dtype, long_tokens: int):
        self.args, self.device, self.dtype = args, device, dtype
        self.cuda = device.type == "cuda"
        self.long_tokens = long_tokens
        self.on_step = None  # called after every model call: the JSON is rewritten, a run cut short keeps its steps

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def backend(self, name: str):
        if name == "default":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel
        # cuDNN needs CUDA; the CPU dry run forces MATH instead, to run the same code path.
        return sdpa_kernel(SDPBackend.CUDNN_ATTENTION if self.cuda else SDPBackend.MATH)

    def forward(self, model, inp, step: int, to: dict, backend: str = "default", keep: bool = False):
        """One model call as BaseModel._apply_model makes it; returns (seconds, output on the host or None)."""
        sig = inp.sigmas[step:step + 1]
        call_to = dict(to)
        call_to.update(sigmas=sig, sample_sigmas=inp.sigmas, cond_or_uncond=list(inp.cond_or_uncond))
        # ComfyUI's blocks may add into their inputs in place: every call gets fresh copies.
        x, ctx = inp.x.clone(), inp.ctx.clone()
        y = None if inp.y is None else inp.y.clone()
        guidance = None if inp.guidance is None else inp.guidance.clone()
        t = (sig * 1000.0).float().expand(inp.batch)
        if inp.wan:
            call = lambda: model(x, t, ctx, transformer_options=call_to)  # noqa: E731
        else:
            call = lambda: model(x, t, ctx, y, guidance=guidance, attention_mask=None,  # noqa: E731
                                 transformer_options=call_to)
        self.sync()
        with torch.inference_mode(), self.backend(backend):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = call()
                end.record()
                end.synchronize()
                secs = start.elapsed_time(end) / 1000.0
            else:
                t0 = time.perf_counter()
                out = call()
                secs = time.perf_counter() - t0
        host = out.float().cpu() if keep else None
        finite = bool(torch.isfinite(out).all())
        del out, x, ctx, y, guidance
        if self.on_step is not None:
            self.on_step()
        return secs, host, finite

    def attention_warmup(self, inp, backend: str):
        """One SDPA call at the model's attention shape under ``backend`` (cuDNN builds its graph per shape)."""
        import torch.nn.functional as F
        seq = inp.txt_len + inp.img_len
        q = torch.randn(inp.batch, inp.heads, seq, 128, device=self.device, dtype=self.dtype)
        with torch.inference_mode(), self.backend(backend):
            F.scaled_dot_product_attention(q, q, q)
        self.sync()
        del q

    def reset_peak(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self):
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None


def median(xs):
    return statistics.median(xs) if xs else None


def error_record(phase: str, e: BaseException) -> dict:
    tb = traceback.format_exc()
    log(f"ERROR in {phase}: {type(e).__name__}: {e}")
    print(tb[-3000:], flush=True)
    return {"phase": phase, "error": f"{type(e).__name__}: {str(e)[:1500]}", "traceback": tb[-3000:]}


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- dense

def dense_phase(b: Bench, model, inp, row: dict, reps: int, ref_steps: list[int], refs: dict, errors: list):
    """ComfyUI's default attention, then SDPA forced to cuDNN; reference outputs for the correctness check."""
    long = inp.img_len > b.long_tokens
    b.reset_peak()
    times = {}
    for i, backend in enumerate(b.args.backends):
        try:
            if i == 0 or not long:
                secs, host, finite = b.forward(model, inp, 0, {}, backend, keep=(i == 0 and 0 in ref_steps))
                log(f"  dense {backend} warm-up step: {secs:.3f} s (finite {finite})")
                if not finite:
                    raise RuntimeError(f"the BF16 model's output is not finite ({backend})")
                if host is not None:
                    refs[0] = host
                warm = "step"
            else:
                b.attention_warmup(inp, backend)
                warm = "attention call at the same shape (the GEMMs are warm from the default backend's steps)"
            ts = []
            for r in range(reps):
                secs, _, finite = b.forward(model, inp, 1 + r, {}, backend)
                ts.append(secs)
                log(f"  dense {backend} step: {secs:.3f} s")
            times[backend] = median(ts)
            row[f"dense_{backend}_step_s"] = times[backend]
            row[f"dense_{backend}_step_times"] = ts
            row[f"dense_{backend}_warmup"] = warm
        except Exception as e:  # noqa: BLE001 (an OOM or a missing backend must not end the run)
            errors.append(error_record(f"dense {backend} {inp.img_len}", e))
            row[f"dense_{backend}_error"] = errors[-1]["error"]
        free_memory(b.device)
    row["dense_peak_gb"] = gb(b.peak())
    if times:
        best = min(times, key=times.get)
        row["dense_best_backend"] = best
        row["dense_step_s"] = times[best]
        row["dense_s_per_50"] = STEPS * times[best]
    # Reference outputs (BF16, default backend) at the steps the QuantSparse check compares.
    for step in ref_steps:
        if step in refs:
            continue
        try:
            _, host, finite = b.forward(model, inp, step, {}, "default", keep=True)
            refs[step] = host
            log(f"  dense reference output at step {step} (finite {finite})")
        except Exception as e:  # noqa: BLE001
            errors.append(error_record(f"dense reference step {step}", e))
        free_memory(b.device)


# ---------------------------------------------------------------------------------------------- convert

@torch.no_grad()
def convert_in_place(comfy, cfg, dense, dims, device, dtype) -> tuple[torch.nn.Module, dict]:
    """A second ComfyUI HunyuanVideo with our operations, loaded block by block from ``dense``'s weights
    quantized on the device; each dense block's storage is freed once its quantized twin holds it."""
    from comfyui_quantsparse.nodes.ops import quantized_modules, quantsparse_ops
    from comfyui_quantsparse.quantsparse.checkpoint.format import FLOAT_DTYPE, checkpoint_plan, quantized_layers
    from comfyui_quantsparse.quantsparse.core.config import QuantSparseConfig
    from comfyui_quantsparse.quantsparse.core.quantizer import kind_bits, quantize_weight

    qconfig = QuantSparseConfig(bits="w4a8")
    layers = quantized_layers(dims, qconfig)
    t0 = time.perf_counter()
    qs = comfy_class(comfy, dims)(**cfg, dtype=dtype, device=device, operations=quantsparse_ops(layers))
    dense_mods = dict(dense.named_modules())
    units = []
    for name, child in qs.named_children():
        if isinstance(child, torch.nn.ModuleList):
            units += [(f"{name}.{i}", sub) for i, sub in enumerate(child)]
        else:
            units.append((name, child))
    for uname, _ in units:
        dunit = dense_mods[uname]
        sd = {}
        for key, value in dunit.state_dict().items():
            prefix = f"{uname}.{key}"[: -len(".weight")] if key.endswith(".weight") else None
            spec = layers.get(prefix) if prefix is not None else None
            if spec is None:
                sd[key] = value.to(FLOAT_DTYPE)
                continue
            act_quantized = kind_bits(spec.kind)[1] < 16
            smooth = torch.ones(spec.in_features, device=value.device, dtype=torch.float32) if act_quantized else None
            qw = quantize_weight(value, spec.kind, group_size=spec.group_size, rotate=spec.rotate, smooth=smooth)
            local = key[: -len(".weight")]
            sd[f"{local}.weight"] = qw.weight
            sd[f"{local}.weight_scale"] = qw.scale
            if qw.smooth is not None:
                sd[f"{local}.smooth"] = qw.smooth
        # Loaded from the root, so that every layer sees its full name (QuantSparseLinear looks its spec up
        # by it), as ComfyUI's load_model_weights loads the diffusion model.
        res = qs.load_state_dict({f"{uname}.{k}": v for k, v in sd.items()}, strict=False)
        bad = [k for k in res.missing_keys if k.startswith(uname + ".")] + list(res.unexpected_keys)
        if bad:
            raise RuntimeError(f"loading {uname}: missing or unexpected tensors {bad[:5]}")
        del sd, res
        for p in dunit.parameters():  # the BF16 block is no longer needed
            p.data = torch.empty(0, device=p.device, dtype=p.dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    quantized = quantized_modules(qs)
    missing = sorted(set(layers) - set(quantized))
    if missing:
        raise RuntimeError(f"{len(missing)} layers were not quantized, e.g. {missing[:3]}")
    state_bytes = sum(t.nbytes for t in qs.state_dict().values())
    plan_bytes = sum(math.prod(s.shape) * torch.empty(0, dtype=s.dtype).element_size()
                     for s in checkpoint_plan(dims, qconfig))
    kinds = Counter(m.quant_kind for m in quantized.values())
    return qs, {"quantize_seconds": seconds, "checkpoint_bytes": state_bytes, "checkpoint_plan_bytes": plan_bytes,
                "quantized_layers": dict(kinds), "quant_config": qconfig.to_dict()}


# ---------------------------------------------------------------------------------------------- QuantSparse

def schedule(config):
    from comfyui_quantsparse.quantsparse.sparse.ssar import step_kind

    kinds = [step_kind(s, STEPS, config) for s in range(STEPS)]
    return kinds, Counter(kinds)


def parse_schedule(text: str) -> tuple[float, int]:
    """"WARMUP:INTERVAL" (e.g. "0.1:10") -> (dense warm-up fraction, refresh interval)."""
    try:
        w, i = text.split(":")
        return float(w), int(i)
    except ValueError:
        raise argparse.ArgumentTypeError(f"schedule {text!r}: write WARMUP:INTERVAL, e.g. 0.1:10") from None


def schedule_rows(row: dict, config, schedules) -> list[dict]:
    """s/50 and speedup of each (warm-up, interval) from the measured per-kind step times of ``row``."""
    per_kind, dense = row.get("qs_step_s") or {}, row.get("dense_s_per_50")
    out = []
    for warm, interval in schedules:
        cfg = type(config)(**{**config.to_dict(), "dense_warmup": warm, "refresh_interval": interval})
        _, counts = schedule(cfg)
        if any(per_kind.get(k) is None for k in counts):
            continue
        total = sum(counts[k] * per_kind[k] for k in counts)
        out.append({"dense_warmup": warm, "refresh_interval": interval, "counts": dict(counts),
                    "quantsparse_s_per_50": total, "speedup": dense / total if dense else None})
    return out


def plan_steps(kinds, reps):
    """Step indices: DENSE warm-up/check, DENSE timed, then refresh/sparse pairs (first pair warms up).

    A short schedule with one refresh (4 steps: refresh, then 3 sparse) times that first pair again: the
    step's kind follows its index, so running step 0 again after step 1 is another refresh of the run."""
    dense = [s for s, k in enumerate(kinds) if k == "dense"]
    refresh = [s for s, k in enumerate(kinds) if k == "refresh"]
    pairs = [(r, r + 1) for r in refresh if r + 1 < len(kinds) and kinds[r + 1] == "sparse"]
    timed = pairs[1:1 + reps] or pairs[:1] * reps
    return dense, pairs[0] if pairs else None, timed


def sparse_options(config):
    """transformer_options as the QuantSparse Sampler leaves them on the patched model (nodes/sparse_patch.py:
    apply_sparse_patch, with the wrapper added the way ModelPatcher.add_wrapper_with_key stores it)."""
    import comfy.patcher_extension as pe
    from comfyui_quantsparse.nodes.sparse_patch import (PATCH_KEY, WRAPPER_KEY, SparseAttentionOverride, SparsePatch,
                                                        diffusion_model_wrapper)

    from comfyui_quantsparse.quantsparse.models import registry

    patch = SparsePatch(config, registry.by_name(ARCH))
    to = {PATCH_KEY: patch, "optimized_attention_override": SparseAttentionOverride(None)}
    pe.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, diffusion_model_wrapper, to)
    return to, patch


def in_sampling_run(config, sample_sigmas, body, block_patches=None):
    """Run ``body(run_options)`` inside the pack's OUTER_SAMPLE wrapper, as CFGGuider.outer_sample runs under
    it: the wrapper makes the run's SparseRun in a per-run copy of the options and closes it afterwards.
    ``block_patches``: the fused block forwards as the Load QuantSparse Model node installs them."""
    import comfy.patcher_extension as pe
    from comfyui_quantsparse.nodes.sparse_patch import outer_sample_wrapper

    to, patch = sparse_options(config)
    if block_patches:
        to["patches_replace"] = {"dit": block_patches}
    guider = SimpleNamespace(model_options={"transformer_options": to})

    def outer_sample(noise, latent_image, sampler, sigmas, *args, **kwargs):
        return body(guider.model_options["transformer_options"])

    result = pe.WrapperExecutor.new_class_executor(outer_sample, guider, [outer_sample_wrapper]).execute(
        None, None, None, sample_sigmas)
    return result, patch.last_summary


def family_fused_patches():
    """(the family's fused block forward as the loader installs it, or None; why not)."""
    if ARCH == "wan":
        try:
            from comfyui_quantsparse.nodes.fused_wan import fused_block_patches
        except ImportError as e:
            return None, f"no fused Wan block forward in this tree ({e})"
        return fused_block_patches, ""
    from comfyui_quantsparse.nodes.fused_blocks import fused_block_patches
    return fused_block_patches, ""


def qs_phase(b: Bench, model, inp, row: dict, reps: int, config, refs: dict, errors: list, check: bool,
             best_backend: str | None, profile_out: dict | None, deadline: float, fused: bool = True):
    from comfyui_quantsparse.nodes.sparse_patch import RUN_KEY

    fused_block_patches, why_unfused = family_fused_patches()
    fused = fused and fused_block_patches is not None
    if why_unfused:
        row["unfused_reason"] = why_unfused

    kinds, counts = schedule(config)
    dense_steps, warm_pair, timed_pairs = plan_steps(kinds, reps)
    long = inp.img_len > b.long_tokens
    b.reset_peak()
    t = {"dense": [], "dense_best": [], "refresh": [], "sparse": []}
    row["qs_step_times"] = t  # live: a run cut short still has its step times in the JSON

    def dense_on_best_backend(to, used, last_secs):
        """The DENSE step under the dense baseline's faster backend (the dense steps' attention is ComfyUI's);
        run after the essential timings (a DENSE step index after later steps is legal: kind follows the index)."""
        if best_backend in (None, "default") or last_secs is None:
            return
        if long and time.perf_counter() + 3 * last_secs > deadline:
            log(f"  skipped the QuantSparse DENSE step on {best_backend}: soft budget")
            row["qs_dense_best_backend_skipped"] = "soft wall-clock budget"
            return
        try:
            if long:
                b.attention_warmup(inp, best_backend)
            else:
                b.forward(model, inp, next(used), to, best_backend)
            for _ in range(reps):
                step = next(used)
                secs, _, _ = b.forward(model, inp, step, to, best_backend)
                t["dense_best"].append(secs)
                log(f"  qs dense step {step} ({best_backend}): {secs:.3f} s")
        except Exception as e:  # noqa: BLE001
            errors.append(error_record(f"qs dense {best_backend} {inp.img_len}", e))
        free_memory(b.device)

    def body(to):
        run = to[RUN_KEY]
        used = iter(dense_steps)
        # DENSE: the first call warms up (Triton compiles) and is the correctness check at the check length.
        if dense_steps:
            step = next(used)
            secs, host, finite = b.forward(model, inp, step, to, keep=check)
            row["qs_outputs_finite"] = finite
            log(f"  qs dense warm-up step {step}: {secs:.3f} s (finite {finite})")
            if check and step in refs:
                row["rel_err_dense_step_vs_bf16"] = rel_err(host, refs[step])
                log(f"  CHECK qs DENSE step vs BF16: rel err {row['rel_err_dense_step_vs_bf16']:.4f}")
            if not finite:
                errors.append({"phase": f"qs check {inp.img_len}", "error": "QuantSparse DENSE step output not finite"})
            for _ in range(reps):
                step = next(used)
                secs, _, _ = b.forward(model, inp, step, to)
                t["dense"].append(secs)
                log(f"  qs dense step {step}: {secs:.3f} s")
        if warm_pair is None:
            dense_on_best_backend(to, used, median(t["dense"]))
            return
        for step in warm_pair:  # first refresh (no D_prev yet) and the sparse step after it: compile, fill cache
            secs, _, finite = b.forward(model, inp, step, to)
            log(f"  qs {kinds[step]} warm-up step {step}: {secs:.3f} s (finite {finite})")
        row["cache_gb_first_refresh"] = gb(run.ssar.cache_bytes())
        row["cache_bytes_first_refresh"] = run.ssar.cache_bytes()
        for r, s in timed_pairs:
            secs, host, finite = b.forward(model, inp, r, to, keep=check and r in refs)
            t["refresh"].append(secs)
            row["cache_gb"] = gb(run.ssar.cache_bytes())
            row["cache_bytes"] = run.ssar.cache_bytes()
            log(f"  qs refresh step {r}: {secs:.3f} s (finite {finite}); SSAR cache {row['cache_gb']} GB")
            if host is not None:
                row["rel_err_refresh_step_vs_bf16"] = rel_err(host, refs[r])
                log(f"  CHECK qs REFRESH step vs BF16: rel err {row['rel_err_refresh_step_vs_bf16']:.4f}")
            secs, host, finite = b.forward(model, inp, s, to, keep=check and s in refs)
            t["sparse"].append(secs)
            log(f"  qs sparse step {s}: {secs:.3f} s (finite {finite})")
            if host is not None:
                row["rel_err_sparse_step_vs_bf16"] = rel_err(host, refs[s])
                log(f"  CHECK qs SPARSE step vs BF16: rel err {row['rel_err_sparse_step_vs_bf16']:.4f}")
            if not finite:
                errors.append({"phase": f"qs sparse {inp.img_len}", "error": f"step {s} output not finite"})
        dense_on_best_backend(to, used, median(t["dense"]))
        if profile_out is not None and timed_pairs:
            nxt = timed_pairs[-1][1] + 1
            if nxt < STEPS and kinds[nxt] == "sparse":
                try:
                    profile_out.update(profile_step(b, model, inp, nxt, to))
                except Exception as e:  # noqa: BLE001
                    errors.append(error_record(f"profile {inp.img_len}", e))
                    profile_out["error"] = errors[-1]["error"]

    try:
        _, summary = in_sampling_run(config, inp.sigmas.cpu(), body, fused_block_patches(model) if fused else None)
        row["fused_blocks"] = fused
    finally:
        row["quantsparse_peak_gb"] = gb(b.peak())
        per_kind = {k: median(v) for k, v in t.items()}
        row["qs_step_s"] = {k: per_kind[k] for k in ("dense", "refresh", "sparse")}
        row["qs_step_times"] = {k: v for k, v in t.items() if v}
        row["schedule_counts"] = dict(counts)
        if all(per_kind[k] is not None for k in counts):
            row["quantsparse_s_per_50"] = sum(counts[k] * per_kind[k] for k in counts)
            if per_kind["dense_best"] is not None:
                row["quantsparse_s_per_50_dense_steps_on_best_backend"] = (
                    row["quantsparse_s_per_50"] + counts["dense"] * (per_kind["dense_best"] - per_kind["dense"]))
                row["qs_dense_step_best_backend_s"] = per_kind["dense_best"]
        if row.get("dense_s_per_50") and row.get("quantsparse_s_per_50"):
            row["speedup"] = row["dense_s_per_50"] / row["quantsparse_s_per_50"]
    if summary:
        row["run_summary"] = {k: summary[k] for k in ("steps", "dense_steps", "refresh_steps", "sparse_steps",
                                                     "mask_builds", "attention_calls", "achieved_density",
                                                     "peak_cache_bytes", "ssar")}


def profile_step(b: Bench, model, inp, step, to) -> dict:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b.cuda else [])
    with profile(activities=acts) as prof:
        secs, _, _ = b.forward(model, inp, step, to)
    log(f"  profiled qs sparse step {step}: {secs:.3f} s (with the profiler on)")
    dev = b.cuda

    def self_time(e):
        if dev:
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        return e.self_cpu_time_total

    evs = [e for e in prof.key_averages() if self_time(e) > 0]
    evs.sort(key=self_time, reverse=True)
    total = sum(self_time(e) for e in evs)
    top = [{"name": e.key[:200], "calls": e.count, "self_ms": self_time(e) / 1e3,
            "share": self_time(e) / total if total else None} for e in evs[:25]]
    print(f"\nper-op profile, one QuantSparse SPARSE step at {inp.img_len} video tokens "
          f"({'device' if dev else 'CPU'} self time, top 25 of {len(evs)} ops; total {total / 1e3:.1f} ms)")
    for e in top:
        print(f"  {e['self_ms']:10.2f} ms  {100 * (e['share'] or 0):5.1f}%  x{e['calls']:<6d} {e['name'][:110]}")
    print(flush=True)
    return {"video_tokens": inp.img_len, "step": step, "step_s_with_profiler": secs,
            "time": "device (CUDA) self time" if dev else "CPU self time", "total_ms": total / 1e3,
            "ops": len(evs), "top": top}


# ---------------------------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", default="benchmarks/results", help="folder for e2e_<tag>.json and e2e_profile_<tag>.json")
    ap.add_argument("--tag", default=None, help="file name tag (default: h200, or tiny with --tiny; wan_<regime>_ is prefixed for --model wan)")
    ap.add_argument("--tokens", type=int, nargs="+", default=None,
                    help=f"video token counts, from {sorted(LATENTS)} (--tiny: {sorted(TINY_LATENTS)})")
    ap.add_argument("--reps", type=int, default=2, help="timed steps per kind at lengths up to 60,000 tokens")
    ap.add_argument("--reps-long", type=int, default=1, help="timed steps per kind above 60,000 tokens")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="soft wall-clock budget: optional extra timings are skipped when they would pass it")
    ap.add_argument("--backends", nargs="+", choices=["default", "cudnn"], default=["default", "cudnn"],
                    help="dense attention backends: ComfyUI's default, SDPA forced to cuDNN (MATH on the CPU)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--unfused", action="store_true",
                    help="QuantSparse through ComfyUI's own block forward (not the fused one the loader installs)")
    ap.add_argument("--schedules", type=parse_schedule, nargs="*",
                    default=[parse_schedule(x) for x in ("0.1:5", "0.25:5", "0.04:5", "0.1:10", "0.0:10")],
                    help="WARMUP:INTERVAL pairs also summed from the measured step times (rows[].schedules)")
    ap.add_argument("--tiny", action="store_true",
                    help="CPU dry run of the same code path: tiny model, small latents, reference kernels")
    ap.add_argument("--model", choices=["hunyuan", "wan"], default="hunyuan",
                    help="HunyuanVideo 13B T2V (default) or Wan 14B T2V (one Wan 2.2 A14B expert has its shapes)")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps of the schedule (4: step-distilled)")
    ap.add_argument("--batch", type=int, choices=[1, 2], default=1,
                    help="rows per model call: 2 = CFG (uncond and cond batched, as ComfyUI does), 1 = CFG 1")
    args = ap.parse_args()
    args.backends = sorted(set(args.backends), key=["default", "cudnn"].index)  # the default backend's step warms up
    global STEPS, SHIFT, ARCH
    STEPS = args.steps
    wan = args.model == "wan"
    if wan:
        SHIFT, ARCH = 8.0, "wan"

    tiny = args.tiny
    regime = f"{STEPS}step_{'cfg' if args.batch == 2 else 'cfg1'}"
    tag = args.tag or ((f"wan_{regime}_" if wan else "") + ("tiny" if tiny else "h200"))
    device = torch.device("cpu") if tiny else torch.device("cuda")
    if not tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny for the CPU dry run")
    dtype = torch.bfloat16
    latents = (WAN_TINY_LATENTS if tiny else WAN_LATENTS) if wan else (TINY_LATENTS if tiny else LATENTS)
    tokens = sorted(args.tokens or (latents if not tiny else sorted(latents)[-2:]))
    for n in tokens:
        if n not in latents:
            raise SystemExit(f"--tokens {n}: known lengths are {sorted(latents)}")
    txt_len = (TXT_TINY if tiny else WAN_TXT) if wan else (TXT_TINY if tiny else TXT_FULL)
    deadline = T0 + args.budget_s
    os.makedirs(args.out, exist_ok=True)
    out_path = os.path.join(args.out, f"e2e_{tag}.json")
    prof_path = os.path.join(args.out, f"e2e_profile_{tag}.json")

    comfy = import_comfy(cpu=tiny)
    from comfyui_quantsparse.quantsparse.models.hunyuan_video.dims import HunyuanVideoDims
    from comfyui_quantsparse.quantsparse.models.wan.dims import WanDims
    from comfyui_quantsparse.quantsparse.sparse.config import SparseConfig

    if wan:
        dims = WanDims.tiny() if tiny else WanDims.t2v_14b()
    else:
        dims = HunyuanVideoDims.tiny() if tiny else HunyuanVideoDims.full()
    config = SparseConfig(density=0.15, mask_mode="svg", refresh_interval=5)
    kinds, counts = schedule(config)
    check_len = tokens[0]
    errors: list = []
    rows = {n: {"video_tokens": n, "latent": list(latents[n]), "text_tokens": txt_len, "steps": STEPS,
                "cfg": args.batch == 2, "batch": args.batch} for n in tokens}
    refs: dict = {n: {} for n in tokens}
    profile: dict = {}
    result = dict(environment(device), rows=[], errors=errors)
    name = (("Wan 14B T2V" if wan else "HunyuanVideo 13B T2V") if not tiny else
            ("Wan tiny" if wan else "HunyuanVideo tiny"))
    result.update(
        comfyui_version=comfy.version, comfyui_attention=comfy.attention.optimized_attention.__name__,
        model=name + " (ComfyUI's class, random BF16 weights)",
        dims=dims.to_dict(), batch=args.batch, cfg=("CFG: uncond and cond in one batch" if args.batch == 2 else 1.0),
        guidance=None if wan else GUIDANCE, steps=STEPS, shift=SHIFT,
        sparse_config=config.to_dict(), schedule_counts=dict(counts), schedule=kinds,
        method=(f"per-kind step times (CUDA events, median of the timed reps, after warm-up) x the kinds' counts "
                f"over {STEPS} steps (quantsparse.sparse.ssar.step_kind); dense = {STEPS} x the faster of ComfyUI's "
                "default attention and SDPA forced to cuDNN; QuantSparse DENSE steps run ComfyUI's default attention "
                "(the product path); quantsparse_s_per_50_dense_steps_on_best_backend puts them on the dense "
                "baseline's faster backend; peaks are torch.cuda.max_memory_allocated per phase (weights included; "
                "the BF16 model is freed before the QuantSparse phases); cache_gb is the SparseRun's SSAR cache after "
                "the timed refresh (all blocks); the *_per_50 fields are per run of `steps` steps"),
    )

    def save():
        for n in tokens:
            rows[n]["checkpoint_bytes"] = result.get("checkpoint_bytes")
            rows[n]["dense_s"] = rows[n].get("dense_s_per_50")  # per run of `steps` steps
            rows[n]["quantsparse_s"] = rows[n].get("quantsparse_s_per_50")
        result["rows"] = [rows[n] for n in tokens]
        result["wall_s"] = time.perf_counter() - T0
        write_json(out_path, result)
        if profile:
            write_json(prof_path, dict(environment(device), **profile))

    b = Bench(args, device, dtype, LONG_TOKENS_TINY if tiny else LONG_TOKENS)
    b.on_step = save
    log(f"{result['gpu']}, torch {result['torch']}, triton {result['triton']}, ComfyUI {comfy.version}, "
        f"attention {result['comfyui_attention']}; schedule over {STEPS} steps: {dict(counts)}")

    # ---- BF16 model, dense phases
    cfg = unet_config(comfy, dims)
    dense = None
    try:
        ops = comfy.ops.pick_operations(dtype, None, load_device=device)
        t0 = time.perf_counter()
        dense = comfy_class(comfy, dims)(**cfg, dtype=dtype, device=device, operations=ops)
        params = fill_random_(dense, device, SEED)
        b.sync()
        result.update(dense_operations=f"{ops.__module__}.{ops.__name__}", params=params,
                      bf16_bytes=sum(t.nbytes for t in dense.state_dict().values()),
                      build_seconds=time.perf_counter() - t0)
        log(f"built ComfyUI {name} ({params / 1e9:.2f} B params, {ops.__name__}) on {device} in "
            f"{result['build_seconds']:.1f} s")
    except Exception as e:  # noqa: BLE001
        errors.append(error_record("build BF16 model", e))
    save()

    dense_steps, warm_pair, timed_pairs = plan_steps(kinds, args.reps)
    check_steps = [0] + ([x for pair in timed_pairs[:1] for x in pair])
    inputs = {}
    for n in tokens:
        try:
            inputs[n] = make_inputs(latents[n], txt_len, dims, device, dtype, SEED + n, batch=args.batch)
        except Exception as e:  # noqa: BLE001
            errors.append(error_record(f"inputs {n}", e))
    for n in tokens:
        if dense is None or n not in inputs:
            break
        reps = args.reps if n <= b.long_tokens else args.reps_long
        log(f"dense BF16 at {n} video tokens (+{txt_len} text), latent {latents[n]}, {reps} timed reps")
        try:
            dense_phase(b, dense, inputs[n], rows[n], reps, check_steps if n == check_len else [], refs[n], errors)
        except Exception as e:  # noqa: BLE001
            errors.append(error_record(f"dense {n}", e))
        free_memory(device)
        save()

    # ---- convert to W4A8 in place of the BF16 model
    qs = None
    if dense is not None:
        try:
            log("quantizing to W4A8 on the device, block by block (the BF16 blocks are freed as they go)")
            qs, info = convert_in_place(comfy, cfg, dense, dims, device, dtype)
            result.update(info)
            log(f"  {info['quantize_seconds']:.1f} s; W4A8 state dict {info['checkpoint_bytes'] / 1e9:.3f} GB "
                f"(checkpoint plan {info['checkpoint_plan_bytes'] / 1e9:.3f} GB); layers {info['quantized_layers']}")
        except Exception as e:  # noqa: BLE001
            errors.append(error_record("convert to W4A8", e))
        dense = None
        free_memory(device)
        save()

    # ---- QuantSparse phases
    for n in tokens:
        if qs is None or n not in inputs:
            break
        reps = args.reps if n <= b.long_tokens else args.reps_long
        log(f"QuantSparse at {n} video tokens, {reps} timed reps")
        want_profile = n == check_len and not args.no_profile
        try:
            qs_phase(b, qs, inputs[n], rows[n], reps, config, refs[n], errors, check=(n == check_len),
                     best_backend=rows[n].get("dense_best_backend"), profile_out=profile if want_profile else None,
                     deadline=deadline, fused=not args.unfused)
        except Exception as e:  # noqa: BLE001
            errors.append(error_record(f"quantsparse {n}", e))
        rows[n]["schedules"] = schedule_rows(rows[n], config, args.schedules)
        free_memory(device)
        save()

    save()
    print(f"\nwrote {out_path}" + (f" and {prof_path}" if profile else ""))
    print(f"{'tokens':>8} {'dense s/50':>11} {'QS s/50':>9} {'speedup':>8} {'dense GB':>9} {'QS GB':>7} "
          f"{'cache GB':>9} {'dense/refresh/sparse s':>26} {'rel err dense/refresh/sparse':>30}")
    for n in tokens:
        r = rows[n]
        st = r.get("qs_step_s", {})
        f = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
        print(f"{n:>8} {f(r.get('dense_s_per_50'), 1):>11} {f(r.get('quantsparse_s_per_50'), 1):>9} "
              f"{f(r.get('speedup')):>8} {f(r.get('dense_peak_gb'), 1):>9} {f(r.get('quantsparse_peak_gb'), 1):>7} "
              f"{f(r.get('cache_gb')):>9} "
              f"{'/'.join(f(st.get(k), 3) for k in ('dense', 'refresh', 'sparse')):>26} "
              f"{'/'.join(f(r.get(f'rel_err_{k}_step_vs_bf16'), 3) for k in ('dense', 'refresh', 'sparse')):>30}")
    for n in tokens:
        for sc in rows[n].get("schedules", []):
            print(f"{n:>8} warm-up {sc['dense_warmup']:.2f} interval {sc['refresh_interval']:>2} {sc['counts']}: "
                  f"{sc['quantsparse_s_per_50']:.1f} s/50, speedup {sc['speedup'] or 0:.2f}x")
    print(f"errors: {len(errors)}; wall {time.perf_counter() - T0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
