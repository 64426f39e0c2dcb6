#!/usr/bin/env bash
# One device call: GPU tests, then the benchmarks; everything lands in $OUT, named *_<gpu>.json (h200, h100).
# Usage on the device machine: bash benchmarks/run_gpu.sh [tests] [linear] [sweep] [sweep-act] [gluon] [attention]
#   [attention-sweep] [ssar] [comfyui] [e2e] [attention8] [act-fused] [wan-linear] [wan-attention] [wan-e2e]
#   [wan-e2e-4step]
# comfyui: the in-process ComfyUI tests on CUDA; needs a ComfyUI checkout carried as .comfyui and
# wheels of what the device image lacks (comfy-kitchen, comfy-aimdo, einops, psutil, pyyaml) in .whl;
# PyAV, imported by ComfyUI's V3 API for video I/O only, may be stubbed in .comfyui/_stubs.
# e2e: ComfyUI's HunyuanVideo-13B, dense BF16 vs QuantSparse (e2e_<gpu>.json, e2e_profile_<gpu>.json); same
# carried .comfyui and .whl as comfyui; about 6 minutes. wan-e2e: ComfyUI's Wan 14B at 32,760 and 75,600 tokens,
# 50 steps with CFG (uncond and cond batched); wan-e2e-4step: the 4-step CFG-1 regime.
# The carried .whl may be a folder of unpacked packages (.whl/site) as well as wheels.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site; fi
if [ -d .whl/site ]; then export PYTHONPATH=$PWD/.whl/site:${PYTHONPATH:-}; fi
# the repo root is the package comfyui_quantsparse: expose it under that name
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/comfyui_quantsparse && export PYTHONPATH=/tmp/pkg:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
GPU=$(python3 -c "import torch; n = torch.cuda.get_device_name(0); print('h200' if 'H200' in n else 'h100' if 'H100' in n else 'gpu')")
CUI="PYTHONPATH=$PWD/.comfyui/_stubs:$PYTHONPATH COMFYUI_DIR=$PWD/.comfyui"
for what in "$@"; do
  case "$what" in
    tests) python3 -m pytest -q -m "gpu or not comfyui" tests/test_kernels.py tests/test_gluon_kernels.py tests/test_act_quant_fused.py tests/test_sparse_attention.py tests/test_sparse_attention_fp8.py tests/test_svg_probe.py tests/test_masks.py tests/test_attention_override.py tests/test_ssar.py tests/test_qk_norm_rope.py $(ls tests/test_wan_*kernel*.py tests/test_*wan*rope*.py 2>/dev/null) -p no:cacheprovider 2>&1 | tee "$OUT/tests_$GPU.log" ;;
    linear) python3 benchmarks/bench_linear.py --out "$OUT/linear_$GPU.json" 2>&1 | tee "$OUT/linear.log" ;;
    wan-linear) python3 benchmarks/bench_linear.py --model wan --kinds w4a8 --out "$OUT/wan_linear_$GPU.json" 2>&1 | tee "$OUT/wan_linear.log" ;;
    wan-attention) python3 benchmarks/bench_attention.py --model wan --out "$OUT/wan_attention_$GPU.json" 2>&1 | tee "$OUT/wan_attention.log" ;;
    wan-e2e) env $CUI python3 benchmarks/bench_e2e.py --model wan --steps 50 --batch 2 --tag "wan_50step_cfg_$GPU" --out "$OUT" 2>&1 | tee "$OUT/wan_e2e.log" ;;
    wan-e2e-4step) env $CUI python3 benchmarks/bench_e2e.py --model wan --steps 4 --batch 1 --schedules 0.5:5 0.0:5 0.0:2 --tag "wan_4step_cfg1_$GPU" --out "$OUT" 2>&1 | tee "$OUT/wan_e2e_4step.log" ;;
    sweep) python3 benchmarks/bench_linear.py --sweep all --tokens --out "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.log" ;;
    sweep-act) python3 benchmarks/bench_linear.py --sweep act --tokens --out "$OUT/sweep_act.json" 2>&1 | tee "$OUT/sweep_act.log" ;;
    comfyui) env $CUI python3 -m pytest -q -m comfyui tests/comfyui/test_comfyui_inprocess.py $(ls tests/comfyui/test_comfyui_wan_inprocess.py 2>/dev/null) tests/test_hunyuan_vs_comfyui.py $(ls tests/test_wan_vs_comfyui.py 2>/dev/null) -p no:cacheprovider -rs 2>&1 | tee "$OUT/comfyui_$GPU.log" ;;
    e2e) env $CUI python3 benchmarks/bench_e2e.py --tag "$GPU" --out "$OUT" 2>&1 | tee "$OUT/e2e.log" ;;
    attention-sweep) python3 benchmarks/attention_sweep.py --out "$OUT/attention_sweep.json" 2>&1 | tee "$OUT/attention_sweep.log" ;;
    ssar) python3 benchmarks/ssar_cache.py --out "$OUT/ssar_cache.json" 2>&1 | tee "$OUT/ssar.log" ;;
    attention) python3 benchmarks/bench_attention.py --out "$OUT/attention_$GPU.json" 2>&1 | tee "$OUT/attention.log" ;;
    attention8) python3 -m pytest -q -m gpu tests/test_sparse_attention_fp8.py -p no:cacheprovider 2>&1 | tee "$OUT/tests_8bit.log"
      python3 benchmarks/bench_attention_8bit.py --sweep --out "$OUT/attention_8bit_h100.json" 2>&1 | tee "$OUT/attention_8bit.log" ;;
    act-fused) python3 benchmarks/bench_act_fused.py --sweep --out "$OUT/act_fused_h100.json" 2>&1 | tee "$OUT/act_fused.log" ;;
    gluon) python3 benchmarks/gluon_check.py --out "$OUT/gluon.json" 2>&1 | tee "$OUT/gluon.log" ;;
  esac
done
