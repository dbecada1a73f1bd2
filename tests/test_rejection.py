"""Rejection-sampling fine-tuning: golden tests of what RAFT, ReST-EM and the Llama 2 rule keep, then
``alignkit rejection`` on the tiny model: each mode keeps what it should from the samples it wrote, ReST-EM's
second iteration is trained starting from the base weights (not the first iteration's), and a rerun skips
finished iterations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _toy import prompt_jsonl
from alignkit.cli import main
from alignkit.models.loading import load_model
from alignkit.rl.best_of_n import keep_best, keep_verified, with_previous_best

HERE = Path(__file__).parent
SCORE = f"rewards={HERE / '_sampled_rewards.py'}:text_score"
VERIFIER = f"rewards={HERE / '_sampled_rewards.py'}:coin_verifier"


def s(i, j, text, reward, round_=1):
    return {"prompt_index": i, "sample": j, "text": text, "reward": reward, "round": round_}


GROUPS = [
    [s(0, 0, "a", 0.2), s(0, 1, "b", 0.9), s(0, 2, "c", 0.9), s(0, 3, "d", None)],
    [s(1, 0, "x", 1.0), s(1, 1, "x", 1.0), s(1, 2, "  ", 5.0), s(1, 3, "y", 1.0)],
    [s(2, 0, "m", None), s(2, 1, "n", None)],
]


def test_raft_keeps_each_prompts_best():
    kept = keep_best(GROUPS)
    # prompt 0: the earliest of the tied best; prompt 1: a blank text never wins; prompt 2: nothing scored
    assert [(k["prompt_index"], k["text"]) for k in kept] == [(0, "b"), (1, "x")]
    assert [k["text"] for k in keep_best(GROUPS, winners=[3, 1, None])] == ["d", "x"]  # a judge's picks


def test_rest_em_keeps_only_verified_distinct_samples():
    kept = keep_verified(GROUPS, threshold=1.0)
    assert [(k["prompt_index"], k["sample"]) for k in kept] == [(1, 0), (1, 3)]  # the repeat "x" and blank dropped
    assert [k["sample"] for k in keep_verified(GROUPS, 1.0, max_per_prompt=1)] == [0]
    assert [k["text"] for k in keep_verified(GROUPS, 0.5)] == ["b", "c", "x", "y"]


def test_best_ever_keeps_the_best_over_iterations():
    earlier = [s(0, 2, "old0", 0.95, 1), s(1, 1, "old1", 0.5, 1)]
    new = [[s(0, 0, "new0", 0.9, 2), s(0, 1, "tie", 0.95, 2)], [s(1, 0, "new1", 0.7, 2)]]
    kept = keep_best(with_previous_best(new, earlier))
    assert [(k["text"], k["round"]) for k in kept] == [("old0", 1), ("new1", 2)]  # a tie keeps the earlier best


def _run(tmp_path, *args, out="rs"):
    data = prompt_jsonl(tmp_path, n=4)
    return main(["rejection", "model=tiny", f"data={data}", f"output_dir={tmp_path / out}", "max_new_tokens=4",
                 "rollout_precision=fp32", "num_generations=4", "progress=false", "seed=2", "lr=1e-2", *args])


def _jsonl(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def _by_prompt(rows):
    out = {}
    for r in rows:
        out.setdefault(r["prompt_index"], []).append(r)
    return out


def test_raft_and_best_ever_through_the_cli(tmp_path):
    assert _run(tmp_path, SCORE, "mode=raft", "iterations=2") == 0
    for k in (1, 2):
        it = tmp_path / "rs" / f"iter_{k}"
        samples, kept = _by_prompt(_jsonl(it / "samples.jsonl")), _jsonl(it / "kept.jsonl")
        assert {r["prompt_index"]: r["reward"] for r in kept} == {
            i: max(x["reward"] for x in g if x["text"].strip()) for i, g in samples.items()}
        assert all(r["round"] == k for r in kept) and (it / "final" / "config.json").exists()
    done2 = json.loads((tmp_path / "rs" / "iter_2" / "done.json").read_text())
    assert done2["sampled_by"] == done2["trained_from"] == str(tmp_path / "rs" / "iter_1" / "final")

    assert _run(tmp_path, SCORE, "mode=best_ever", "iterations=2", out="ll") == 0
    seen = _by_prompt(_jsonl(tmp_path / "ll" / "iter_1" / "samples.jsonl") + _jsonl(tmp_path / "ll" / "iter_2" / "samples.jsonl"))
    kept2 = _jsonl(tmp_path / "ll" / "iter_2" / "kept.jsonl")
    assert {r["prompt_index"]: r["reward"] for r in kept2} == {
        i: max(x["reward"] for x in g if x["text"].strip()) for i, g in seen.items()}
    train2 = _jsonl(tmp_path / "ll" / "iter_2" / "train.jsonl")
    assert [r["completion"] for r in train2] == [r["text"] for r in kept2]


def _fingerprint(model) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten()[:64] for _, p in sorted(model.named_parameters())])


def test_rest_em_restarts_from_the_base_model(tmp_path, monkeypatch):
    import alignkit.recipes.sft as sft

    starts = []
    real_train = sft.train

    def recording_train(task, model, rows, cfg, **kw):
        starts.append(_fingerprint(model))
        return real_train(task, model, rows, cfg, **kw)

    monkeypatch.setattr(sft, "train", recording_train)
    assert _run(tmp_path, VERIFIER, "mode=rest_em", "iterations=2", "epochs=3") == 0
    out = tmp_path / "rs"
    for k in (1, 2):
        kept = _jsonl(out / f"iter_{k}" / "kept.jsonl")
        assert kept and all(r["reward"] >= 1.0 for r in kept)  # only verified samples
    samples = _jsonl(out / "iter_1" / "samples.jsonl")
    assert len(_jsonl(out / "iter_1" / "kept.jsonl")) == len({(x["prompt_index"], x["text"]) for x in samples
                                                              if x["reward"] == 1.0 and x["text"].strip()})
    base = _fingerprint(load_model("tiny", seed=2)[0])
    after_1 = _fingerprint(load_model(str(out / "iter_1" / "final"))[0])
    assert len(starts) == 2
    assert torch.equal(starts[0], base) and torch.equal(starts[1], base)  # iteration 2 starts from the base
    assert not torch.allclose(after_1, base)  # ... which differs from what iteration 1 trained
    done2 = json.loads((out / "iter_2" / "done.json").read_text())
    assert done2["sampled_by"] == str(out / "iter_1" / "final") and done2["trained_from"] == "tiny"


def test_rerun_skips_finished_iterations(tmp_path, capsys):
    assert _run(tmp_path, SCORE, "iterations=1") == 0
    first = (tmp_path / "rs" / "iter_1" / "done.json").read_text()
    assert _run(tmp_path, SCORE, "iterations=2") == 2  # a used output_dir without resume=true
    assert "resume=true" in capsys.readouterr().err
    assert _run(tmp_path, SCORE, "iterations=2", "lr=0.5", "resume=true") == 2  # other settings
    assert "lr=" in capsys.readouterr().err
    assert _run(tmp_path, SCORE, "iterations=2", "resume=true") == 0
    assert (tmp_path / "rs" / "iter_1" / "done.json").read_text() == first
    summary = json.loads((tmp_path / "rs" / "summary.json").read_text())
    assert [r["iteration"] for r in summary["iterations"]] == [1, 2]
    assert summary["final_model"] == str(tmp_path / "rs" / "iter_2" / "final")


def test_bad_config_and_data_exit_2(tmp_path, capsys):
    assert _run(tmp_path, SCORE, "mode=rest_em", "judge=llm:tiny") == 2
    assert _run(tmp_path, SCORE, "start=sideways") == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": 3}\n')
    assert main(["rejection", "model=tiny", f"data={bad}", SCORE, f"output_dir={tmp_path / 'b'}"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "prompt" in err
