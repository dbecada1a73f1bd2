"""Reward models: pooling, grouping of ranking pairs, identifiability, aspects, process rewards, save and load."""

import json
import math
import random

import pytest
import torch

from alignkit.config import RMConfig, build
from alignkit.data.formats import load_examples
from alignkit.models.loading import tiny_tokenizer
from alignkit.models.reward import RewardScorer, last_token_index, load_reward_backbone, sequence_rewards
from alignkit.recipes import rm


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_last_token_index_left_right_and_no_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rewards_equal_unpadded(side):
    model, _ = load_reward_backbone("tiny", 2, seed=1)
    model.eval()
    seqs = [[5, 9, 33, 7], [8, 8, 100, 41, 42, 43, 44], [77]]
    alone = torch.cat([sequence_rewards(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        span = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[b, span] = torch.tensor(s)
        mask[b, span] = 1
    with torch.no_grad():
        batched = sequence_rewards(model, ids, mask)
    assert torch.allclose(batched, alone, atol=1e-5)


def test_ranking_pairs_stay_together_and_responses_run_once(tmp_path):
    data = _write(tmp_path / "rank.jsonl", [
        {"prompt": "p1", "responses": ["a", "b", "c", "d"], "ranking": [2, 1, 4, 3]},
        {"prompt": "p2", "chosen": "x", "rejected": "y"},
    ])
    cfg = build(RMConfig, overrides=dict(model="tiny", data=data))
    rows = rm.encode_groups(load_examples(data, "preference").examples, tiny_tokenizer(), ["reward"], cfg)
    assert [len(r.responses) for r in rows] == [4, 2]
    pairs = rows[0].extra["pairs"]
    assert len(pairs) == 6 and len({(i, j) for i, j, *_ in pairs}) == 6
    tok = tiny_tokenizer()
    text = lambda i: tok.decode(rows[0].responses[i]).replace("<|im_end|>", "")  # noqa: E731
    # rank order b > a > d > c: every pair's chosen has the better rank
    rank = {"b": 1, "a": 2, "d": 3, "c": 4}
    assert all(rank[text(i)] < rank[text(j)] for i, j, *_ in pairs)


def test_aspect_labels():
    class Ex:
        def __init__(self, extra):
            self.extra, self.origin = extra, None

    assert rm.aspect_labels(Ex({"aspects": {"help": 1, "safe": -1}}), ["help", "safe"]) == [1, -1]
    assert rm.aspect_labels(Ex({"aspects": {"safe": 1}}), ["help", "safe"]) == [0, 1]
    assert rm.aspect_labels(Ex({"aspect": "help"}), ["help", "safe"]) == [1, 0]
    assert rm.aspect_labels(Ex({}), ["help", "safe"]) == [1, 1]


def _bt_data(tmp_path, n_items=8, n_pairs=1500, seed=0):
    """Responses 'item K' with latent score s_K; each pair's label drawn from Bradley-Terry P = sigmoid(s_i - s_j)."""
    rng = random.Random(seed)
    scores = [rng.uniform(-2, 2) for _ in range(n_items)]
    rows = []
    for _ in range(n_pairs):
        i, j = rng.sample(range(n_items), 2)
        if rng.random() > 1 / (1 + math.exp(-(scores[i] - scores[j]))):
            i, j = j, i
        rows.append({"prompt": "rate: ", "chosen": f"item {chr(65 + i)}", "rejected": f"item {chr(65 + j)}"})
    return _write(tmp_path / "bt.jsonl", rows), scores


def test_identifiability_on_bradley_terry_data(tmp_path):
    """Learned rewards recover the latent scores: Spearman >= 0.95 and equal differences up to a constant."""
    data, scores = _bt_data(tmp_path)
    cfg = build(RMConfig, overrides=dict(model="tiny", data=data, output_dir=str(tmp_path / "out"), batch_size=64,
                                         epochs=6, lr=3e-3, scheduler="constant", progress=False))
    rm.run(cfg)
    scorer = RewardScorer.load(tmp_path / "out" / "final")
    learned = scorer.score_aspects(["rate: "] * len(scores), [f"item {chr(65 + k)}" for k in range(len(scores))])[:, 0]
    true = torch.tensor(scores)
    rank = lambda x: x.argsort().argsort().float()  # noqa: E731
    spearman = torch.corrcoef(torch.stack([rank(learned), rank(true)]))[0, 1].item()
    assert spearman >= 0.95
    # up to a constant: centred learned rewards match centred true scores (MLE on 1,500 noisy pairs)
    err = ((learned - learned.mean()) - (true - true.mean())).abs().max().item()
    assert err < 0.5, err


def _toy_pairs(tmp_path, n=48, seed=0, name="toy.jsonl"):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.sample(range(10), 2)
        rows.append({"prompt": f"max({a},{b})=", "chosen": str(max(a, b)), "rejected": str(min(a, b))})
    return _write(tmp_path / name, rows)


def test_saved_model_loads_in_transformers_and_scores_the_same(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = _toy_pairs(tmp_path)
    cfg = build(RMConfig, overrides=dict(model="tiny", data=data, output_dir=str(tmp_path / "o"), max_steps=3,
                                         lr=1e-3, progress=False))
    rm.run(cfg)
    final = tmp_path / "o" / "final"
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    scorer = RewardScorer.load(final, batch_size=2)
    prompts, responses = ["max(3,4)=", "max(10,2)=", "max(1,9)="], ["4", "10 is the larger", "9"]
    ours = scorer.score_aspects(prompts, responses)[:, 0]
    # transformers pools at the last non-pad token; a single unpadded sequence ends with EOS (== pad here is not
    # the case: the tiny tokenizer's pad differs from its EOS)
    with torch.no_grad():
        theirs = torch.stack([hf(torch.tensor([tok(p)["input_ids"] + tok(r)["input_ids"] + [tok.eos_token_id]])).logits[0, 0]
                              for p, r in zip(prompts, responses)])
    assert torch.allclose(ours, theirs, atol=1e-5)
    meta = json.loads((final / "alignkit_rm.json").read_text())
    normalised = scorer.score(prompts, responses)
    assert torch.allclose(normalised, (ours - meta["mean"][0]) / meta["std"][0], atol=1e-5)


def test_two_aspects_learn_their_own_labels(tmp_path):
    """'big' prefers the larger digit, 'small' the smaller; each row labels one aspect (the other is masked)."""
    rng = random.Random(1)
    rows = []
    for k in range(160):
        a, b = rng.sample(range(10), 2)
        aspect = "big" if k % 2 else "small"
        hi, lo = str(max(a, b)), str(min(a, b))
        rows.append({"prompt": "n=", "chosen": hi if aspect == "big" else lo, "rejected": lo if aspect == "big" else hi,
                     "aspect": aspect})
    data = _write(tmp_path / "asp.jsonl", rows)
    cfg = build(RMConfig, overrides=dict(model="tiny", data=data, output_dir=str(tmp_path / "o"), aspects="big,small",
                                         aspect_weights="1,0", batch_size=32, epochs=8, lr=3e-3, eval_fraction=0.2,
                                         progress=False))
    summary = rm.run(cfg)
    assert summary["eval"]["accuracy/big"] >= 0.9 and summary["eval"]["accuracy/small"] >= 0.9
    scorer = RewardScorer.load(tmp_path / "o" / "final")
    r = scorer.score_aspects(["n="] * 2, ["9", "0"])
    assert r[0, 0] > r[1, 0] and r[0, 1] < r[1, 1]
    combined = scorer.score(["n="] * 2, ["9", "0"])  # weights 1,0: the 'big' head alone
    assert combined[0] > combined[1]


def test_process_reward_model_learns_step_labels(tmp_path):
    """A step's label is decided by its LAST characters ('ok' or 'no'): only a label read at the step's last
    token can be learned, so this also checks where the labels land."""
    rng = random.Random(2)
    rows = []
    for _ in range(120):
        labels = [rng.random() < 0.5 for _ in range(3)]
        steps = [f"step {k} {'ok' if good else 'no'}" for k, good in enumerate(labels)]
        rows.append({"prompt": "check:", "steps": steps, "labels": labels})
    data = _write(tmp_path / "prm.jsonl", rows)
    cfg = build(RMConfig, overrides=dict(model="tiny", data=data, output_dir=str(tmp_path / "o"), process=True,
                                         batch_size=16, epochs=12, lr=3e-3, eval_fraction=0.2, progress=False))
    summary = rm.run(cfg)
    assert summary["eval"]["step_accuracy"] >= 0.8, summary["eval"]
    scorer = RewardScorer.load(tmp_path / "o" / "final")
    (probs, agg), = scorer.score_steps(["check:"], [["step 0 ok", "step 1 no"]])
    assert len(probs) == 2 and probs[0] > 0.5 > probs[1]
    assert agg == pytest.approx(min(probs))


def test_cli_rm_reaches_held_out_accuracy(tmp_path):
    import os
    import subprocess
    import sys

    data = _toy_pairs(tmp_path, n=96)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "alignkit.cli", "rm", "model=tiny", f"data={data}", "eval_fraction=0.25",
                           f"output_dir={tmp_path / 'o'}", "batch_size=16", "epochs=10", "lr=3e-3", "progress=false"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["eval"]["accuracy"] >= 0.9
    lines = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, len(lines) + 1))
    assert {"accuracy", "margin", "rewards/mean", "rewards/std"} <= set(lines[-1])


def test_shared_prompt_rewards_equal_separate_sequences(tmp_path):
    """A group scored as one masked sequence gives each response the reward it gets on its own (and gradients)."""
    data = _write(tmp_path / "rank.jsonl", [
        {"prompt": "which is best? ", "responses": ["a", "bbbb", "cc"], "ranking": [2, 1, 3]},
        {"prompt": "q", "chosen": "xy", "rejected": "z"},
    ])
    cfg = build(RMConfig, overrides=dict(model="tiny", data=data))
    model, tok = load_reward_backbone("tiny", 2, seed=4)
    rows = rm.encode_groups(load_examples(data, "preference").examples, tok, ["reward"], cfg)
    shared = rm._forward(model, rows, tok.pad_token_id, shared=True)
    separate = rm._forward(model, rows, tok.pad_token_id, shared=False)
    for a, b in zip(shared, separate):
        assert torch.allclose(a, b, atol=1e-5)
    g1 = torch.autograd.grad(torch.cat(shared).sum(), list(model.parameters()))
    g2 = torch.autograd.grad(torch.cat(rm._forward(model, rows, tok.pad_token_id, shared=False)).sum(), list(model.parameters()))
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(g1, g2))
