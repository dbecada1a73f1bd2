"""``bench/gpu_check.py --device cpu --small``: the GPU check's own test, on a tiny model on the CPU, with
``datasets`` and ``gguf`` blocked as they are missing on the GPU machine. The figures of the small mode mean
nothing (a 3M-parameter model, CPU bf16); what is checked is that every part runs and reports, and that the
rollout engine's log-probs are the trainer's: fp32 sampler against fp32 trainer within float32 rounding."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_small_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    code = ("import sys, runpy; sys.modules['datasets'] = None; sys.modules['gguf'] = None; "
            f"sys.argv = ['gpu_check.py', '--device', 'cpu', '--small', '--out', {str(out)!r}]; "
            "runpy.run_path('bench/gpu_check.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {} and report["size"] == "small" and report["device"] == "cpu"
    assert report["model"]["vocab"] == 49152 and report["peak_bf16_tflops"] > 0
    for part in ("sft", "dpo", "grpo"):
        r = report[part]
        assert r["steps"] == r["timed_steps"] + 1 and r["skipped_steps"] == 0
        assert r["tokens_per_step"] > 0 and r["tokens_per_s"] > 0 and r["mfu"] > 0
        assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"])
    assert report["grpo"]["generate_s_median"] > 0 and report["grpo"]["rollout_s_median"] > 0
    mm = report["mismatch"]
    assert mm["engine_fp32_vs_trainer_fp32"]["mean_abs_dlogp"] < 1e-4
    for key, r in mm.items():
        assert r["tokens"] > 0 and 0 <= r["mean_abs_dlogp"] < 0.05 and r["max_ratio"] >= 1.0, key
    assert json.loads(proc.stdout[proc.stdout.index("\n{") + 1:]) == report  # printed too
