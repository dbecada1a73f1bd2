"""A run never lies: the guards of the training loop and of the output directory, through the real CLI entry point.

Each test reproduces a defect found by review (the comment names it): a step with nothing to learn from, a
non-finite step, a reward that cannot be computed from the data, a reused output directory, the logged learning
rate. The tiny random model keeps every run to a few seconds.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _toy import prompt_jsonl, sft_jsonl
from alignkit.cli import main
from alignkit.train.loop import clip_and_step

RL = ["model=tiny", "max_new_tokens=2", "scheduler=constant", "rollout_precision=fp32", "seed=1",
      "prompts_per_step=4", "num_generations=4"]


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def no_model(monkeypatch):
    """Make loading any model an error, so a test proves that a check ran before the model was loaded."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    for mod in ("alignkit.recipes.rl", "alignkit.recipes.common"):
        monkeypatch.setattr(f"{mod}.load_model", boom)


# ------------------------------------------------------------------------------------------------ defect 1


def test_a_reward_column_missing_from_the_data_exits_2_before_the_model_loads(tmp_path, capsys, monkeypatch):
    data = tmp_path / "noanswer.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"max({i},3)="}) + "\n" for i in range(8)))
    no_model(monkeypatch)
    out = tmp_path / "out"
    assert main(["grpo", *RL, f"data={data}", f"output_dir={out}", "max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert f"{data}:1" in err and "'answer'" in err and "'correctness'" in err
    assert not out.exists()  # nothing half-made


def test_a_user_reward_declares_its_columns(tmp_path, capsys, monkeypatch):
    fn = tmp_path / "needs.py"
    fn.write_text("def r(prompts, completions, topic, **_):\n    return [1.0] * len(completions)\nr.columns = ('topic',)\n")
    data = prompt_jsonl(tmp_path)
    no_model(monkeypatch)
    assert main(["grpo", *RL, f"data={data}", f"output_dir={tmp_path / 'o'}", f"rewards={fn}:r"]) == 2
    assert "'topic'" in capsys.readouterr().err


def test_a_step_where_no_reward_applies_makes_no_update(tmp_path, caplog):
    """Every reward None: the step's normaliser is 0. It used to be 0/0 = NaN, written into every weight with
    exit 0. Now each such step is skipped (logged), the weights stay the initial ones, and with the progress bar
    on (the default) nothing crashes (defect 2's path too)."""
    fn = tmp_path / "none.py"
    fn.write_text("def none(prompts, completions, **_):\n    return [None] * len(completions)\n")
    data = prompt_jsonl(tmp_path)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        assert main(["grpo", *RL, f"data={data}", f"output_dir={out}", f"rewards={fn}:none", "max_steps=2"]) == 0
    h = history(out)
    assert [x["skipped"] for x in h] == [1, 1] and not any("loss" in x or "grad_norm" in x for x in h)
    assert "2 of 2 steps made no update" in caplog.text
    base = tmp_path / "base"
    assert main(["sft", "model=tiny", f"data={sft_jsonl(tmp_path)}", f"output_dir={base}", "lr=0", "max_steps=1",
                 "progress=false", "seed=1"]) == 0
    a, b = weights(out / "final"), weights(base / "final")
    assert all(torch.isfinite(t).all() for t in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a)  # lr 0: the initial weights, so no skipped step moved them


def test_clip_and_step_never_steps_on_a_non_finite_gradient():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    p.grad = torch.tensor([1.0, float("nan"), 1.0])
    norm = clip_and_step(opt, [p], 1.0)
    assert math.isnan(float(norm)) and torch.equal(p.detach(), torch.ones(3)) and not opt.state


def _nan_loss_from(step_from: int, monkeypatch):
    """SFT's loss becomes NaN from optimizer step ``step_from`` (1-based) on."""
    from alignkit.recipes import sft

    calls = {"n": 0}
    original = sft.SFTTask.loss

    def loss(self, model, rows, normaliser):
        calls["n"] += 1
        value, metrics = original(self, model, rows, normaliser)
        if calls["n"] >= step_from:  # one micro-batch a step here
            value = value * float("nan")
            metrics = {**metrics, "loss": (float("nan"), metrics["loss"][1])}
        return value, metrics

    monkeypatch.setattr(sft.SFTTask, "loss", loss)


def test_non_finite_steps_are_skipped_then_the_run_stops_with_exit_1_and_no_final_model(tmp_path, capsys, monkeypatch):
    _nan_loss_from(3, monkeypatch)
    out = tmp_path / "out"
    code = main(["sft", "model=tiny", f"data={sft_jsonl(tmp_path)}", f"output_dir={out}", "max_steps=8",
                 "batch_size=4", "save_steps=1", "save_total_limit=10", "max_bad_steps=3", "progress=false"])
    assert code == 1
    err = capsys.readouterr().err
    assert "3 steps in a row" in err and "max_bad_steps" in err and "Traceback" not in err
    assert not (out / "final").exists()
    h = history(out)
    assert [x.get("skipped", 0) for x in h] == [0, 0, 1, 1, 1]
    # the skipped steps changed nothing: the checkpoints after steps 2, 3 and 4 hold the same finite weights
    ckpt = lambda s: load_file(str(out / "checkpoints" / f"step-{s:08d}" / "trainable.safetensors"))  # noqa: E731
    w2, w4 = ckpt(2), ckpt(4)
    assert all(torch.isfinite(t).all() for t in w4.values()) and all(torch.equal(w2[k], w4[k]) for k in w2)


@pytest.mark.parametrize("poison", ["inf_gradient", "nan_loss_finite_gradient"])
def test_an_isolated_non_finite_step_is_skipped_and_the_run_goes_on(tmp_path, monkeypatch, caplog, poison):
    """Step 2's loss is not finite: either its gradients too (x inf), or only the loss (+ NaN: the gradient of a
    constant is 0, so the gradient norm looks fine and only the loss itself shows it). Either way no update: the
    weights after step 2 are those after step 1, and the run goes on."""
    from alignkit.recipes import sft

    original, calls = sft.SFTTask.loss, {"n": 0}

    def loss(self, model, rows, normaliser):
        calls["n"] += 1
        value, metrics = original(self, model, rows, normaliser)
        if calls["n"] == 2:
            value = value * float("inf") if poison == "inf_gradient" else value + float("nan")
        return value, metrics  # the metrics stay finite: the loop must look at the loss itself

    monkeypatch.setattr(sft.SFTTask, "loss", loss)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert main(["sft", "model=tiny", f"data={sft_jsonl(tmp_path)}", f"output_dir={out}", "max_steps=4",
                     "batch_size=4", "progress=false", "save_steps=1", "save_total_limit=10"]) == 0
    assert [x.get("skipped", 0) for x in history(out)] == [0, 1, 0, 0]
    assert "not finite, the step was skipped" in caplog.text
    ckpt = lambda s: load_file(str(out / "checkpoints" / f"step-{s:08d}" / "trainable.safetensors"))  # noqa: E731
    w1, w2 = ckpt(1), ckpt(2)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert all(torch.isfinite(t).all() for t in weights(out / "final").values())


# ------------------------------------------------------------------------------------------------ defect 3


def _sft(tmp_path, out, *args):
    return main(["sft", "model=tiny", f"data={sft_jsonl(tmp_path)}", f"output_dir={out}", "batch_size=4",
                 "progress=false", "save_steps=2", *args])


def test_a_used_output_dir_is_refused_unless_resume_or_overwrite(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert _sft(tmp_path, out, "max_steps=6") == 0
    assert (out / "checkpoints" / "step-00000004").exists()
    with monkeypatch.context() as m:
        no_model(m)
        assert _sft(tmp_path, out, "max_steps=4") == 2
    err = capsys.readouterr().err
    assert "resume=true" in err and "overwrite=true" in err
    # overwrite: the other run's checkpoints go, so this run's own are kept (retention used to delete them)
    assert _sft(tmp_path, out, "max_steps=4", "overwrite=true") == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    assert len(history(out)) == 4


def test_resume_refuses_other_settings_and_a_checkpoint_past_the_end(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert _sft(tmp_path, out, "max_steps=6", "lr=1e-3") == 0
    no_model(monkeypatch)
    assert _sft(tmp_path, out, "max_steps=6", "lr=2e-3", "resume=true") == 2
    err = capsys.readouterr().err
    assert "lr=0.001 (now 0.002)" in err and "step-00000004" in err
    assert _sft(tmp_path, out, "max_steps=3", "lr=1e-3", "resume=true") == 2
    assert "step 4, past this run's 3 steps" in capsys.readouterr().err


def test_resume_continues_with_matching_settings(tmp_path):
    out = tmp_path / "out"
    assert _sft(tmp_path, out, "max_steps=6", "lr=1e-3") == 0
    first = weights(out / "final")
    # progress, logging and checkpointing settings may change; the run continues from step 4 to the same end
    assert _sft(tmp_path, out, "max_steps=6", "lr=1e-3", "resume=true", "log_every=3") == 0
    again = weights(out / "final")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert [x["step"] for x in history(out)] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------------------------------ item 7


def test_the_logged_lr_is_the_one_the_update_used(tmp_path):
    """A one-step cosine run updates at the full rate; the log said 0 (the next step's rate)."""
    out = tmp_path / "out"
    assert _sft(tmp_path, out, "max_steps=1", "lr=1e-3", "scheduler=cosine") == 0
    assert history(out)[0]["lr"] == pytest.approx(1e-3)
    out2 = tmp_path / "out2"
    assert _sft(tmp_path, out2, "max_steps=3", "lr=1e-3", "warmup_steps=1", "scheduler=linear") == 0
    assert [x["lr"] for x in history(out2)] == pytest.approx([5e-4, 1e-3, 5e-4])


def test_a_bad_reward_spec_exits_2_before_the_model_loads_and_leaves_no_output(tmp_path, capsys, monkeypatch):
    no_model(monkeypatch)
    out = tmp_path / "out"
    assert main(["grpo", *RL, f"data={prompt_jsonl(tmp_path)}", f"output_dir={out}", "rewards=corectness"]) == 2
    assert "corectness" in capsys.readouterr().err and not out.exists()


def test_resume_without_a_checkpoint_still_evaluates_before_training(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["grpo", *RL, f"data={prompt_jsonl(tmp_path)}", f"output_dir={out}", "max_steps=1", "eval_fraction=0.25",
                 "progress=false", "resume=true"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "eval_before" in summary and summary["eval_before"]["length"] > 0
