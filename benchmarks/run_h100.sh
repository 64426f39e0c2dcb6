#!/usr/bin/env bash
# One device call: GPU tests, then the benchmarks; everything lands in $OUT.
# Usage on the device machine: bash benchmarks/run_h100.sh [tests] [linear] [sweep] [sweep-act] [gluon] [attention] [attention-sweep] [ssar] [comfyui] [e2e] [attention8] [act-fused]
# comfyui: the in-process ComfyUI tests on CUDA; needs a ComfyUI checkout carried as .comfyui and
# wheels of what the device image lacks (comfy-kitchen, comfy-aimdo, einops, psutil, pyyaml) in .whl;
# PyAV, imported by ComfyUI's V3 API for video I/O only, may be stubbed in .comfyui/_stubs.
# e2e: ComfyUI's HunyuanVideo-13B, dense BF16 vs QuantSparse (e2e_h100.json, e2e_profile_h100.json); same
# carried .comfyui and .whl as comfyui; about 6 minutes.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site; fi
# the repo root is the package comfyui_quantsparse: expose it under that name
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/comfyui_quantsparse && export PYTHONPATH=/tmp/pkg:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
for what in "$@"; do
  case "$what" in
    tests) python3 -m pytest -q -m "gpu or not comfyui" tests/test_kernels.py tests/test_gluon_kernels.py tests/test_act_quant_fused.py tests/test_sparse_attention.py tests/test_sparse_attention_fp8.py tests/test_svg_probe.py tests/test_masks.py tests/test_attention_override.py tests/test_ssar.py -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" ;;
    linear) python3 benchmarks/bench_linear.py --out "$OUT/linear_h100.json" 2>&1 | tee "$OUT/linear.log" ;;
    sweep) python3 benchmarks/bench_linear.py --sweep all --tokens --out "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.log" ;;
    sweep-act) python3 benchmarks/bench_linear.py --sweep act --tokens --out "$OUT/sweep_act.json" 2>&1 | tee "$OUT/sweep_act.log" ;;
    comfyui) PYTHONPATH="$PWD/.comfyui/_stubs:$PYTHONPATH" COMFYUI_DIR="$PWD/.comfyui" python3 -m pytest -q -m comfyui tests/comfyui/test_comfyui_inprocess.py tests/test_hunyuan_vs_comfyui.py -p no:cacheprovider -rs 2>&1 | tee "$OUT/comfyui.log" ;;
    e2e) PYTHONPATH="$PWD/.comfyui/_stubs:$PYTHONPATH" COMFYUI_DIR="$PWD/.comfyui" python3 benchmarks/bench_e2e.py --out "$OUT" 2>&1 | tee "$OUT/e2e.log" ;;
    attention-sweep) python3 benchmarks/attention_sweep.py --out "$OUT/attention_sweep.json" 2>&1 | tee "$OUT/attention_sweep.log" ;;
    ssar) python3 benchmarks/ssar_cache.py --out "$OUT/ssar_cache.json" 2>&1 | tee "$OUT/ssar.log" ;;
    attention) python3 benchmarks/bench_attention.py --out "$OUT/attention_h100.json" 2>&1 | tee "$OUT/attention.log" ;;
    attention8) python3 -m pytest -q -m gpu tests/test_sparse_attention_fp8.py -p no:cacheprovider 2>&1 | tee "$OUT/tests_8bit.log"
      python3 benchmarks/bench_attention_8bit.py --sweep --out "$OUT/attention_8bit_h100.json" 2>&1 | tee "$OUT/attention_8bit.log" ;;
    act-fused) python3 benchmarks/bench_act_fused.py --sweep --out "$OUT/act_fused_h100.json" 2>&1 | tee "$OUT/act_fused.log" ;;
    gluon) python3 benchmarks/gluon_check.py --out "$OUT/gluon.json" 2>&1 | tee "$OUT/gluon.log" ;;
  esac
done
