"""benchmarks/bench_e2e.py --tiny: the end-to-end benchmark's whole code path on the CPU, against a real ComfyUI.

ComfyUI's HunyuanVideo class (tiny dims), dense steps, the in-place W4A8 conversion through our operations
class, and QuantSparse DENSE / REFRESH / SPARSE steps through the sampler's wrappers and the attention
override; checks that the JSON the GPU run will write has the issue's fields. Runs in a subprocess (ComfyUI
is imported there with ``--cpu``); about 15 s on two idle cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfyui

REPO = Path(__file__).resolve().parents[1]
ROW_FIELDS = ("video_tokens", "dense_s_per_50", "quantsparse_s_per_50", "speedup", "dense_peak_gb",
              "quantsparse_peak_gb", "cache_gb")


def test_bench_e2e_tiny_writes_the_issue_fields(tmp_path):
    root = os.environ.get("COMFYUI_DIR")
    if not root:
        pytest.skip("COMFYUI_DIR is not set: point it at a ComfyUI checkout to run the end-to-end benchmark's dry run")
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_e2e.py"), "--tiny", "--tokens", "64", "--reps", "1",
           "--backends", "default", "--no-profile", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, COMFYUI_DIR=root), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "e2e_tiny.json").read_text())
    assert data["errors"] == [], data["errors"]
    for key in ("gpu", "torch", "triton", "date", "checkpoint_bytes", "schedule_counts"):
        assert key in data, key
    assert data["schedule_counts"] == {"dense": 4, "refresh": 10, "sparse": 36}
    assert data["checkpoint_bytes"] == data["checkpoint_plan_bytes"] > 0
    (row,) = data["rows"]
    for key in ROW_FIELDS:
        assert key in row, key
    assert row["video_tokens"] == 64
    assert row["dense_s_per_50"] > 0 and row["quantsparse_s_per_50"] > 0 and row["speedup"] > 0
    assert row["cache_bytes"] > 0
    assert row["qs_outputs_finite"] is True
    for key in ("rel_err_dense_step_vs_bf16", "rel_err_refresh_step_vs_bf16", "rel_err_sparse_step_vs_bf16"):
        assert 0 < row[key] < 1, (key, row[key])  # W4A8 round-to-nearest on random weights: far from 0, finite
    summary = row["run_summary"]
    assert summary["refresh_steps"] == 2 and summary["sparse_steps"] == 2 and summary["dense_steps"] == 2
    assert summary["attention_calls"]["refresh"] > 0 and summary["attention_calls"]["sparse"] > 0
    # other schedules summed from the same step times: the default one reproduces the row's own figure
    sched = {(r["dense_warmup"], r["refresh_interval"]): r for r in row["schedules"]}
    assert sched[(0.1, 5)]["quantsparse_s_per_50"] == pytest.approx(row["quantsparse_s_per_50"])
    assert sched[(0.1, 10)]["counts"] == {"dense": 4, "refresh": 5, "sparse": 41}
    assert all(sum(r["counts"].values()) == 50 for r in row["schedules"])


def test_bench_e2e_tiny_wan_with_cfg_batch_runs_sparse_self_attention(tmp_path):
    """The Wan code path of the same benchmark: ComfyUI's WanModel, uncond and cond in one batch."""
    root = os.environ.get("COMFYUI_DIR")
    if not root:
        pytest.skip("COMFYUI_DIR is not set: point it at a ComfyUI checkout to run the end-to-end benchmark's dry run")
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_e2e.py"), "--tiny", "--model", "wan", "--batch", "2",
           "--tokens", "64", "--reps", "1", "--backends", "default", "--no-profile", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, COMFYUI_DIR=root), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "e2e_wan_50step_cfg_tiny.json").read_text())
    assert data["errors"] == [], data["errors"]
    (row,) = data["rows"]
    assert row["steps"] == 50 and row["cfg"] is True and row["batch"] == 2
    assert row["dense_s"] > 0 and row["quantsparse_s"] > 0 and row["speedup"] > 0
    calls = row["run_summary"]["attention_calls"]
    # 2 blocks x 6 calls: self-attention sparse or refresh (or dense on dense steps), cross-attention dense
    assert calls["sparse"] > 0 and calls["refresh"] > 0 and calls["passthrough"] == calls["sparse"] + calls["refresh"] \
        + calls["dense"]
    assert row["run_summary"]["ssar"]["corrections"] > 0
