"""Online RL under several processes computes exactly what one process computes (``alignkit.rl.trainer``'s module
docstring): the same prompts, the same completions, the same kept groups, advantages and optimizer steps.

1. The engine's per-row seeds: a sample's tokens depend on its prompt's seed and its index alone, not on the
   batch, the chunk or the other prompts of the call.
2. ``Rollouts.rows`` hands each process its share of the mini-batch one process would take; a statistic every
   process holds alike is counted once.
3. torchrun, 2 processes (gloo) x ``prompts_per_step=4`` == 1 process x 8 with DAPO's dynamic sampling, a KL
   penalty in the reward under an adaptive controller (both computed over the whole rollout), whitened
   advantages and two optimizer steps per rollout: per-step losses within 1e-6, the rollout statistics equal,
   final weights within 1e-5.
4. The same when one process's groups all have zero variance in every round (it used to keep nothing): the run
   ends, and equals one process.
5. Online DPO, 2 processes x 4 == 1 x 8, and each process trains on its share of the pairs.

The reward file (written by the tests): a row with ``flat`` true gets 1.0 for every completion (a zero-variance
group, dropped by dynamic sampling); any other row gets 0, 1, 2, ... for the completions of its prompt in the
order of the call, so its group always has variance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from alignkit.cli import main
from alignkit.data.tokenize import Encoded
from alignkit.models.loading import load_model
from alignkit.rl.rollout import LocalEngine, SamplingParams
from alignkit.rl.sampling import PromptSampler
from alignkit.rl.trainer import Rollouts, Sums
from alignkit.train import dist
from test_equivalence import _free_port, max_diff, metrics, weights

REWARD = '''
def counting(prompts, completions, flat, **_):
    seen, out = {}, []
    for p, f in zip(prompts, flat):
        seen[p] = seen.get(p, -1) + 1
        out.append(1.0 if f else float(seen[p]))
    return out
'''
COMMON = dict(model="tiny", lr=1e-3, adam_eps=1e-6, seed=1, progress="false", scheduler="constant",
              rollout_precision="fp32", num_generations=4, max_new_tokens=4, batch_size=2)
# the rollout's statistics, computed from the gathered groups: equal, not merely close
EXACT = ("reward/mean", "reward/std", "completion/length/mean", "dynamic_sampling/kept", "dynamic_sampling/dropped",
         "dynamic_sampling/rounds", "kl_coef")


# ---------------------------------------------------------------- 1. per-row seeds in the engine


def _prompts(tok) -> list[list[int]]:
    texts = ["hello there", "hi", "a much longer prompt, with more words in it", "max(3,7)=", "Which is larger?"]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _tiny_ending_early():
    """The tiny model with a bias towards EOS (token 3), so rows finish at different steps and leave the batch."""
    model, tok = load_model("tiny", seed=0)
    old = model.lm_head
    model.lm_head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(old.weight)
        model.lm_head.bias.zero_()
        model.lm_head.bias[3] = 3.0
    return model, tok


@pytest.mark.parametrize("fast", [True, False], ids=["lean", "transformers"])
def test_seeded_rows_do_not_depend_on_the_batch(fast):
    """In float32 on the tiny model a row's logits do not depend on its batch either, so its tokens are equal.
    (With batched bf16 kernels they can: see the README on several processes and `rollout_batch`.)"""
    model, tok = _tiny_ending_early()
    prompts, seeds = _prompts(tok), [11, 22, 33, 44, 55]
    sp = SamplingParams(temperature=1.0, top_k=50, max_new_tokens=12)

    def tokens(engine, order):
        out = engine.generate([prompts[i] for i in order], 3, sp, seeds=[seeds[i] for i in order])
        return {i: [c.token_ids for c in comps] for i, comps in zip(order, out)}

    whole = tokens(LocalEngine(model, tok, precision="fp32", fast_decode=fast, max_batch=64), range(5))
    assert tokens(LocalEngine(model, tok, precision="fp32", fast_decode=fast, max_batch=1), range(5)) == whole
    assert tokens(LocalEngine(model, tok, precision="fp32", fast_decode=fast, max_batch=6), [3, 0, 4, 1, 2]) == whole
    # a prompt alone, or beside others, or split over two calls (two processes): the same samples
    assert tokens(LocalEngine(model, tok, precision="fp32", fast_decode=fast), [2]) == {2: whole[2]}
    # the samples of a prompt differ, and another seed gives other samples
    assert all(len({tuple(t) for t in group}) > 1 for group in whole.values())
    assert len({len(t) for group in whole.values() for t in group}) > 3  # rows left the batch at different steps
    other = LocalEngine(model, tok, precision="fp32").generate([prompts[0]], 3, sp, seeds=[12])[0]
    assert [c.token_ids for c in other] != whole[0]


def test_one_prompt_a_chunk_is_batch_invariant_in_bf16():
    """Batched bf16 kernels round differently for other batch shapes (padding, rows), so a seeded row's tokens can
    still depend on its batch; with ``max_batch = n`` (``rollout_batch = num_generations``) each prompt's samples
    are decoded on their own, and a row's tokens are the same whatever else the call (or process) holds."""
    model, tok = _tiny_ending_early()
    prompts, seeds = _prompts(tok), [11, 22, 33, 44, 55]
    sp = SamplingParams(temperature=1.0, max_new_tokens=12)
    engine = LocalEngine(model, tok, precision="bf16", max_batch=3)
    whole = engine.generate(prompts, 3, sp, seeds=seeds)
    odd = engine.generate(prompts[1::2], 3, sp, seeds=seeds[1::2])
    assert [[c.token_ids for c in g] for g in whole[1::2]] == [[c.token_ids for c in g] for g in odd]

def test_without_seeds_one_generator_serves_the_call():
    """Without ``seeds`` (evaluation, other callers) the call's seed decides, as before: reproducible, and the
    samples do depend on the batch (which is why rollouts pass seeds)."""
    model, tok = load_model("tiny", seed=0)
    prompts = _prompts(tok)
    sp = SamplingParams(temperature=1.0, max_new_tokens=12, seed=5)
    engine = LocalEngine(model, tok, precision="fp32")
    a = [[c.token_ids for c in g] for g in engine.generate(prompts, 3, sp)]
    assert a == [[c.token_ids for c in g] for g in engine.generate(prompts, 3, sp)]
    alone = [c.token_ids for c in engine.generate(prompts[2:3], 3, sp)[0]]
    assert alone != a[2]


# ---------------------------------------------------------------- 2. each process's share of a step


def _source(n_rows: int, mini_batches: int, ppo_epochs: int = 1) -> Rollouts:
    source = Rollouts.__new__(Rollouts)
    source.cfg = SimpleNamespace(mini_batches=mini_batches, ppo_epochs=ppo_epochs, seed=3)
    source.updates = mini_batches * ppo_epochs
    source.buffer = [Encoded([1, 2], [[3], [4]], i) for i in range(n_rows)]
    source.buffer_rollout, source._fresh = 0, True
    return source


@pytest.mark.parametrize("n_rows, mini_batches, world", [(8, 2, 2), (7, 2, 2), (5, 1, 3), (3, 3, 2)])
def test_each_process_gets_its_share_of_the_step_one_process_takes(monkeypatch, n_rows, mini_batches, world):
    source = _source(n_rows, mini_batches, ppo_epochs=2)
    for step in range(2 * mini_batches):
        whole = [r.index for r in source.rows(step, None)]
        shares = []
        for rank in range(world):
            monkeypatch.setattr(dist, "rank", lambda rank=rank: rank)
            monkeypatch.setattr(dist, "world", lambda: world)
            shares.append([r.index for r in source.rows(step, None)])
        monkeypatch.undo()
        assert shares == [whole[r::world] for r in range(world)]
        filler = source.filler()
        assert filler.extra["fresh"] == (step == 0) and filler.index == source.buffer[0].index
    source.buffer = []
    assert source.filler() is None


def test_shared_metrics_are_counted_once(monkeypatch):
    """A value every process holds alike (from the gathered rollout) is counted on process 0 only; the others add
    zeros under the same names, since the loop sums one tensor of every name over the processes."""
    def local(rank: int) -> dict:
        monkeypatch.setattr(dist, "rank", lambda: rank)
        m = Sums()
        m.values("reward", [1.0, 0.1, 0.7], shared=True)  # 0.1 + 0.7 + 1.0 summed three times is not 3x the sum
        m.add("time/generate", 2.0 + rank, 1.0)  # each process's own
        return m.out()

    parts = [local(r) for r in range(3)]
    assert all(p.keys() == parts[0].keys() for p in parts)
    total = {k: tuple(sum(p[k][i] for p in parts) for i in (0, 1)) for k in parts[0]}
    assert total["reward/mean"] == (sum([1.0, 0.1, 0.7]), 3.0) and total["time/generate"] == (9.0, 3.0)


# ---------------------------------------------------------------- 3-4. two processes == one


def _write_data(directory: Path, flat: list[bool]) -> tuple[Path, Path]:
    """Prompt rows (the toy's wordings, each prompt distinct) with their ``flat`` flag, and the reward file."""
    data = directory / "prompts.jsonl"
    rows = [{"prompt": f"Q{i}: max({i % 10}, {(3 * i + 1) % 10})? A:", "flat": f} for i, f in enumerate(flat)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reward = directory / "counting.py"
    reward.write_text(REWARD)
    return data, reward


def _args(data: Path, reward: Path, out: Path, **settings) -> list[str]:
    return [f"data={data}", f"rewards={reward}:counting", f"output_dir={out}",
            *(f"{k}={v}" for k, v in {**COMMON, **settings}.items())]


def _two_processes(args: list[str], timeout: float = 120, command: str = "grpo") -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "alignkit.cli", command, *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return time.perf_counter() - t0


def assert_same_rl_run(one: Path, two: Path, label: str) -> list[dict]:
    ma, mb = metrics(one), metrics(two)
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    assert all("loss" in r for r in ma), "every step must train"
    for ra, rb in zip(ma, mb):
        for k in EXACT:
            assert (k in ra) == (k in rb) and ra.get(k) == rb.get(k), (ra["step"], k, ra.get(k), rb.get(k))
    gaps = {k: max(abs(ra[k] - rb[k]) for ra, rb in zip(ma, mb) if k in ra)
            for k in ("loss", "grad_norm", "kl", "rollout/kl", "advantage/mean") if any(k in r for r in ma)}
    w = max_diff(weights(one), weights(two))
    print(f"\n[{label}] max |diff|: weights {w:.2e}, " + ", ".join(f"{k} {v:.2e}" for k, v in gaps.items()))
    # float32 sums in another order: about 1e-6 in the loss after 4 steps (1.03e-6 on a CPU with AVX-512)
    assert gaps["loss"] <= 2e-6 and gaps["grad_norm"] <= 1e-5, gaps
    assert w <= 1e-5, w
    return ma


def test_two_processes_equal_one_with_dynamic_sampling_and_a_kl_in_the_reward(tmp_path):
    """batch_size=1: a row is scored alone in both runs, so its log-probs, KL and advantage are bit-identical and
    what is left is the order in which the gradients of a step are summed (micro-batches of different rows
    differ by padding: about 1e-6 in the loss after 4 steps at batch_size=2)."""
    flat = [i % 3 == 0 for i in range(32)]  # a third of the groups have zero variance: dropped, drawn again
    data, reward = _write_data(tmp_path, flat)
    settings = dict(preset="dapo", mask_truncated="false", kl_in="reward", kl_estimator="k1", kl_coef=0.05,
                    kl_target=0.5, whiten_advantages="true", mini_batches=2, max_steps=4, batch_size=1)
    one = tmp_path / "one"
    assert main(["grpo", *_args(data, reward, one, prompts_per_step=8, **settings)]) == 0
    seconds = _two_processes(_args(data, reward, tmp_path / "two", prompts_per_step=4, **settings))
    h = assert_same_rl_run(one, tmp_path / "two", f"grpo 2 processes x 4 prompts vs 1 x 8 ({seconds:.0f} s)")
    rollouts = [r for r in h if "kl_coef" in r]  # the first step of each rollout carries its statistics
    assert len(rollouts) == 2 and rollouts[0]["kl_coef"] != rollouts[1]["kl_coef"]  # the controller moved
    assert sum(r["dynamic_sampling/dropped"] for r in rollouts) > 0
    assert max(r["dynamic_sampling/rounds"] for r in rollouts) > 1


def test_a_process_whose_groups_all_have_zero_variance(tmp_path):
    """Rank 1 samples the odd positions of every round's draw; the prompts the sampler puts there are flat. Each
    rollout draws 4 (rank 0's 2 kept), then 2 (rank 0's 1 kept): rank 1 never samples a group with variance,
    yet both processes train on the 3 kept groups, as one process does."""
    n = 32
    order = PromptSampler(n, seed=COMMON["seed"])._perm(0)  # the walk over the prompts, epoch 0
    flat = [False] * n
    for pos in range(1, n, 2):
        flat[order[pos]] = True
    data, reward = _write_data(tmp_path, flat)
    settings = dict(preset="dapo", mask_truncated="false", max_sampling_rounds=2, max_steps=3)
    one = tmp_path / "one"
    assert main(["grpo", *_args(data, reward, one, prompts_per_step=4, **settings)]) == 0
    seconds = _two_processes(_args(data, reward, tmp_path / "two", prompts_per_step=2, **settings), timeout=90)
    h = assert_same_rl_run(one, tmp_path / "two", f"grpo, rank 1 all flat ({seconds:.0f} s)")
    assert all(r["dynamic_sampling/kept"] == 3 and r["dynamic_sampling/dropped"] == 3 for r in h)


def test_online_dpo_two_processes_equal_one(tmp_path):
    """Online DPO gathers the groups too: both processes judge every group alike and each trains on its share of
    the pairs (a flat group gives no pair, so the pair count varies from step to step)."""
    data, reward = _write_data(tmp_path, [i % 3 == 0 for i in range(32)])
    settings = dict(max_steps=3, batch_size=1)
    one = tmp_path / "one"
    assert main(["online-dpo", *_args(data, reward, one, prompts_per_step=8, **settings)]) == 0
    seconds = _two_processes(_args(data, reward, tmp_path / "two", prompts_per_step=4, **settings),
                             command="online-dpo")
    ma, mb = metrics(one), metrics(tmp_path / "two")
    for ra, rb in zip(ma, mb):
        assert ra["pairs/judged"] == rb["pairs/judged"] and ra["reward/mean"] == rb["reward/mean"]
        assert abs(ra["loss"] - rb["loss"]) <= 1e-6
    w = max_diff(weights(one), weights(tmp_path / "two"))
    print(f"\n[online-dpo 2 processes x 4 prompts vs 1 x 8 ({seconds:.0f} s)] max |diff|: weights {w:.2e}")
    assert len(ma) == 3 and len({r["pairs/judged"] for r in ma}) > 1 and w <= 1e-5


def test_online_dpo_each_process_trains_on_its_share_of_the_pairs(monkeypatch):
    """Each process returns its share of the pairs (every process holding them all would take the same step, the
    normaliser counting each pair once per process, so only this sees it)."""
    from alignkit.recipes.online_dpo import JudgedPairs
    from alignkit.rl.trainer import Group, Prompt

    groups = [Group(i, Prompt([1, 2], "p"), [SimpleNamespace(token_ids=[5 + i]), SimpleNamespace(token_ids=[6])],
                    [1.0, 0.0 if i != 3 else 1.0], {}) for i in range(7)]  # group 3: a tie, no pair
    collector = SimpleNamespace(engine=SimpleNamespace(update_weights=lambda model, version=None: None),
                                collect=lambda step, n, m, version=None: groups)
    source = JudgedPairs(collector, SimpleNamespace(fill=lambda model, rows, progress: None),
                         SimpleNamespace(prompts_per_step=4), n_steps=1)
    shares = []
    for rank in range(2):
        monkeypatch.setattr(dist, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(dist, "world", lambda: 2)
        shares.append([r.index for r in source.rows(0, None)])
        assert source.filler().index == 0
    assert shares == [[0, 2, 5], [1, 4, 6]]
