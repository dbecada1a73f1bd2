"""On-policy iterative DPO (``alignkit iterative-dpo``): golden pairing (best against worst by reward, ties and
unscored samples dropped), then the tiny model through the CLI: every pair written is its prompt's best and
worst sample, iteration 2 samples from iteration 1's model and trains from it, and a rerun skips finished
iterations."""

import json
from pathlib import Path

from _toy import prompt_jsonl

from alignkit.cli import main
from alignkit.recipes.iterative_dpo import pairs

HERE = Path(__file__).parent
SCORE = f"rewards={HERE / '_sampled_rewards.py'}:text_score"


class Ex:
    def __init__(self, prompt):
        self.prompt = prompt


def s(i, j, text, reward):
    return {"prompt_index": i, "sample": j, "text": text, "reward": reward}


def test_best_against_worst_ties_dropped():
    groups = [[s(0, 0, "a", 0.2), s(0, 1, "b", 0.9), s(0, 2, "c", None), s(0, 3, "d", 0.1)],
              [s(1, 0, "x", 1.0), s(1, 1, "y", 1.0)],  # all right: a tie, no pair
              [s(2, 0, "m", None), s(2, 1, "n", 0.0)]]  # one scored: no pair
    rows = pairs([Ex("p0"), Ex([{"role": "user", "content": "p1"}]), Ex("p2")], groups)
    assert [(r["chosen"], r["rejected"], r["chosen_reward"], r["rejected_reward"]) for r in rows] == [("b", "d", 0.9, 0.1)]
    chat = pairs([Ex([{"role": "user", "content": "q"}])], [[s(0, 0, "good", 1.0), s(0, 1, "bad", 0.0)]])
    assert chat[0]["chosen"] == [{"role": "assistant", "content": "good"}]  # a chat prompt gets assistant turns


def test_cli_two_iterations_on_policy(tmp_path):
    data = prompt_jsonl(tmp_path, n=6)
    args = ["iterative-dpo", "model=tiny", f"data={data}", f"output_dir={tmp_path / 'out'}", "max_new_tokens=4",
            "rollout_precision=fp32", "num_generations=4", "progress=false", "seed=2", "lr=1e-2", "iterations=2",
            SCORE]
    assert main(args) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    it1, it2 = summary["iterations"]
    assert it2["sampled_by"] == it1["model"] == str(tmp_path / "out" / "iter_1" / "final")
    for k in (1, 2):
        it = tmp_path / "out" / f"iter_{k}"
        samples = [json.loads(x) for x in (it / "samples.jsonl").read_text().splitlines()]
        for row in (json.loads(x) for x in (it / "pairs.jsonl").read_text().splitlines()):
            mine = [x["reward"] for x in samples if x["prompt_index"] == row["prompt_index"] and x["reward"] is not None]
            assert row["chosen_reward"] == max(mine) > row["rejected_reward"] == min(mine)
    cfg2 = (tmp_path / "out" / "iter_2" / "config.yaml").read_text()
    assert f"model: {it1['model']}" in cfg2  # DPO of iteration 2 starts from (and refers to) iteration 1's model
    done = (tmp_path / "out" / "iter_1" / "done.json").read_text()
    assert main([*args, "resume=true", "iterations=3"]) == 0
    assert (tmp_path / "out" / "iter_1" / "done.json").read_text() == done  # finished iterations are skipped
    assert len(json.loads((tmp_path / "out" / "summary.json").read_text())["iterations"]) == 3
