"""Best-of-n: the selection rule, its win rate n/(n+1) on continuous rewards, the KL it reports against the bound
log n - (n-1)/n, the knockout for pairwise judges, and ``alignkit bon`` on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from _toy import prompt_jsonl
from alignkit.cli import main
from alignkit.rl.best_of_n import best_index, bon_kl, kl_bound, tournament

REWARD = f"rewards={Path(__file__).parent / '_sampled_rewards.py'}:text_score"


@pytest.mark.parametrize("n", [1, 2, 4])
def test_best_of_n_beats_a_fresh_sample_n_over_n_plus_1(n):
    """Of n + 1 i.i.d. continuous draws each is the largest with probability 1/(n+1): the kept best of the first n
    beats the last one with probability n/(n+1) (0.800 for n=4); 100k draws give a standard error of 0.0013."""
    draws = np.random.default_rng(n).normal(size=(100_000, n + 1))
    picks = [best_index(row) for row in draws[:, :n].tolist()]
    wins = draws[np.arange(len(draws)), picks] > draws[:, n]
    assert abs(wins.mean() - n / (n + 1)) < 0.01, wins.mean()


def test_best_index_rules():
    assert best_index([0.1, 0.7, 0.3]) == 1
    assert best_index([0.5, 0.9, 0.9, 0.2]) == 1  # the earliest of a tie
    assert best_index([None, 0.2, None, -1.0]) == 1  # an unscored sample never wins
    assert best_index([None, None]) is None and best_index([]) is None


def test_kl_bound_values():
    assert kl_bound(1) == 0.0
    assert kl_bound(4) == pytest.approx(math.log(4) - 0.75)


def test_bon_kl_golden_and_under_the_bound():
    # every sample scores alike: best-of-n is the policy itself
    assert bon_kl([1.0, 1.0, 1.0, 1.0], 4) == 0.0
    # a binary verifier passing 1 sample in 4: q1 = 1 - 0.75^4 on the pass level, q0 = 0.75^4
    q0 = 0.75**4
    want = (1 - q0) * math.log((1 - q0) / 0.25) + q0 * math.log(q0 / 0.75)
    assert bon_kl([0.0, 1.0, 0.0, 0.0], 4) == pytest.approx(want)
    # n distinct values: sum over ranks k of q_k log(n q_k), q_k = (k/n)^n - ((k-1)/n)^n
    qs = [(k / 4) ** 4 - ((k - 1) / 4) ** 4 for k in range(1, 5)]
    assert bon_kl([0.3, 0.1, 0.9, 0.5], 4) == pytest.approx(sum(q * math.log(4 * q) for q in qs))
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, m = int(rng.integers(1, 9)), int(rng.integers(1, 40))
        values = rng.integers(0, int(rng.integers(1, 6)), size=m) if rng.random() < 0.5 else rng.random(m)
        assert 0.0 <= bon_kl(values.tolist(), n) <= kl_bound(n) + 1e-12
    # many distinct continuous values: the estimate reaches the continuous KL, the bound itself
    assert bon_kl(rng.random(20_000).tolist(), 4) == pytest.approx(kl_bound(4), abs=2e-3)


class LongerIsBetter:
    """A scripted pairwise judge: prefers the longer answer, 0.5 for equal lengths; records its calls."""

    name = "longer"

    def __init__(self):
        self.calls = 0

    def compare(self, prompts, first, second, **_):
        self.calls += 1
        return [0.5 if len(a) == len(b) else float(len(a) > len(b)) for a, b in zip(first, second)]


def test_tournament_keeps_the_judges_best_and_asks_both_orders():
    judge = LongerIsBetter()
    texts = [["a", "abc", "ab"], ["xyz", "x", "xy"], ["q", "q"]]
    assert tournament(judge, ["p1", "p2", "p3"], texts) == [1, 0, 0]  # a tie keeps the title holder
    assert judge.calls == 4  # 2 rounds x 2 orders


def _run(tmp_path, *args, out="bon"):
    data = prompt_jsonl(tmp_path, n=5)
    return main(["bon", "model=tiny", f"data={data}", f"output_dir={tmp_path / out}", "max_new_tokens=4",
                 "rollout_precision=fp32", "seed=3", *args])


def test_bon_cli_keeps_the_best_and_reports_kl(tmp_path, capsys):
    assert _run(tmp_path, REWARD, "num_generations=4") == 0
    out = tmp_path / "bon"
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    best = [json.loads(x) for x in (out / "best.jsonl").read_text().splitlines()]
    assert len(samples) == 20
    for row in best:  # the kept completion is its prompt's highest-scoring usable sample
        mine = [s for s in samples if s["prompt_index"] == row["prompt_index"] and s["text"].strip()]
        top = max(mine, key=lambda s: s["reward"])
        assert row["reward"] == top["reward"] and row["completion"] == top["text"] and "answer" in row
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kl/bound"] == pytest.approx(kl_bound(4))
    assert 0.0 < summary["kl/estimate"] <= summary["kl/bound"]
    assert summary["reward/best_mean"] > summary["reward/sample_mean"]
    # a used output_dir is refused (exit 2) unless overwrite=true
    assert _run(tmp_path, REWARD) == 2
    assert "already holds a bon run" in capsys.readouterr().err
    assert _run(tmp_path, REWARD, "overwrite=true") == 0


def test_bon_bad_input_exits_2_before_a_model_loads(tmp_path, capsys, monkeypatch):
    import alignkit.recipes.sampled as sampled

    monkeypatch.setattr(sampled, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "answer": "1"}\n{"promt": "typo", "answer": "2"}\n')
    assert main(["bon", "model=tiny", f"data={bad}", f"output_dir={tmp_path / 'o'}", REWARD]) == 2
    assert f"{bad}:2" in capsys.readouterr().err
    # a reward that reads a column the rows lack: exit 2 naming the column and the row
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"prompt": "2+2?"}\n')
    assert main(["bon", "model=tiny", f"data={plain}", f"output_dir={tmp_path / 'o'}", "rewards=correctness"]) == 2
    err = capsys.readouterr().err
    assert f"{plain}:1" in err and "answer" in err
