"""Soft preference labels (a ``soft_label`` column, as ``alignkit cai stage=label`` writes it) through the CLI
with the tiny model: ``alignkit rm`` fits each pair's reward gap and ``alignkit dpo`` each pair's implicit
preference to the label, a label outside [0, 1] stops the run before a model loads, and a loss with no use for
soft labels is a config error unless ``soft_labels=ignore``.

The fixed point both runs reach: each pair's loss is the cross-entropy of sigma(x_i) against s_i (x = r_w - r_l
for the reward model, beta * Delta for DPO), minimised at x_i = logit(s_i), where it equals the binary entropy
H(s_i) = -(s log s + (1 - s) log(1 - s)). So a mean loss of mean H(s_i) says that every pair is at its own
label (any other x_i costs more), and the mean margin is then mean logit(s_i): for s = (0.75, 0.9),
logit = (log 3, log 9) = (1.0986122887, 2.1972245773), mean 1.6479184330; H = (0.5623351446, 0.3250829734),
mean 0.4437090590. Hard labels (``soft_labels=ignore``) have no such point: their margin keeps growing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from alignkit.cli import main

SOFT = [0.75, 0.9]
MEAN_LOGIT = (math.log(3) + math.log(9)) / 2
MEAN_ENTROPY = sum(-(s * math.log(s) + (1 - s) * math.log(1 - s)) for s in SOFT) / len(SOFT)
COMMON = ["model=tiny", "batch_size=2", "scheduler=constant", "progress=false", "log_every=1000"]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def soft_pairs(tmp_path: Path) -> Path:
    return _write(tmp_path / "preferences.jsonl", [
        {"prompt": "max(3,7)=", "chosen": "7", "rejected": "3", "soft_label": SOFT[0], "judge": "tiny"},
        {"prompt": "max(8,2)=", "chosen": "8", "rejected": "2", "soft_label": SOFT[1], "judge": "tiny"},
    ])


def run(args: list[str], out: Path, capsys) -> tuple[int, dict | None, str]:
    """``alignkit ARGS`` through the CLI's entry point in this process: (exit code, summary, stderr)."""
    code = main([*args, f"output_dir={out}"])
    printed = capsys.readouterr()
    return code, (json.loads(printed.out) if code == 0 else None), printed.err


def test_rm_fits_each_pair_to_its_soft_label(tmp_path, capsys):
    data = soft_pairs(tmp_path)
    args = ["rm", *COMMON, f"data={data}", "max_steps=150", "lr=3e-3"]
    code, summary, err = run(args, tmp_path / "soft", capsys)
    assert code == 0, err
    assert summary["train"]["loss"] == pytest.approx(MEAN_ENTROPY, abs=1e-4)
    assert summary["train"]["margin"] == pytest.approx(MEAN_LOGIT, abs=0.02)
    code, hard, err = run([*args, "soft_labels=ignore"], tmp_path / "hard", capsys)
    assert code == 0, err
    assert hard["train"]["margin"] > MEAN_LOGIT + 1


def test_dpo_fits_each_pair_to_its_soft_label(tmp_path, capsys):
    """loss=dpo on soft labels trains as cdpo with eps_i = 1 - s_i, so sigma(beta Delta_i) -> s_i; loss=cdpo the
    same; ignored, the margins run past them."""
    data = soft_pairs(tmp_path)
    args = ["dpo", *COMMON, f"data={data}", "max_steps=150", "lr=1e-3", "beta=0.5"]
    for loss in ("dpo", "cdpo"):
        code, summary, err = run([*args, f"loss={loss}"], tmp_path / loss, capsys)
        assert code == 0, err
        last = summary["train_last"]
        assert last["loss"] == pytest.approx(MEAN_ENTROPY, abs=1e-4), loss
        assert last["rewards/margin"] == pytest.approx(MEAN_LOGIT, abs=0.02), loss
    code, hard, err = run([*args, "soft_labels=ignore"], tmp_path / "hard", capsys)
    assert code == 0, err
    assert hard["train_last"]["rewards/margin"] > MEAN_LOGIT + 1


@pytest.mark.parametrize("method", ["rm", "dpo"])
def test_soft_label_out_of_range_exits_2_naming_file_line_and_field(tmp_path, capsys, method):
    rows = [{"prompt": "max(3,7)=", "chosen": "7", "rejected": "3", "soft_label": 0.8}] * 2
    data = _write(tmp_path / "bad.jsonl", [*rows, {"prompt": "max(1,2)=", "chosen": "2", "rejected": "1", "soft_label": 1.7}])
    out = tmp_path / "out"
    code, _, err = run([method, "model=tiny", f"data={data}", "max_steps=1", "progress=false"], out, capsys)
    assert code == 2, err
    assert f"{data}:3:" in err and "soft_label" in err and "1.7" in err and "Traceback" not in err, err
    assert not out.exists()  # rejected before anything is written


@pytest.mark.parametrize("extra,words", [
    (["loss=ipo"], ["soft_label", "loss=ipo", "soft_labels=ignore"]),
    (["loss=kto"], ["soft_label", "loss=kto", "soft_labels=ignore"]),
    (["loss=cdpo", "label_smoothing=0.1"], ["label_smoothing=0.1", "soft_labels=ignore"]),
], ids=["ipo", "kto", "cdpo-with-label-smoothing"])
def test_soft_labels_a_loss_cannot_use_exit_2_unless_ignored(tmp_path, capsys, extra, words):
    data = soft_pairs(tmp_path)
    out = tmp_path / "out"
    args = ["dpo", "model=tiny", f"data={data}", "max_steps=1", "progress=false", *extra]
    code, _, err = run(args, out, capsys)
    assert code == 2, err
    message = next(line for line in err.splitlines() if line.startswith("alignkit: error:"))
    assert all(w in message for w in words), message
    assert not out.exists()
    code, summary, err = run([*args, "soft_labels=ignore"], tmp_path / "ignored", capsys)
    assert code == 0 and summary["steps"] == 1, err
