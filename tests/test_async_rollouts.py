"""Asynchronous rollouts (``max_staleness=k``, :mod:`alignkit.rl.pipeline`).

Unit tests drive :class:`~alignkit.rl.pipeline.Pipeline` with a fake rollout (which records the weights it was
handed); the runs go through the GRPO recipe on the tiny model: the pipeline at depth 0 is the synchronous loop
bit for bit, and at ``max_staleness=2`` no completion is more than 2 versions older than the weights it trains.
"""

from __future__ import annotations

import json
import math
import threading
import time

import pytest
import torch
from torch import nn

from alignkit.rl import pipeline as pl
from alignkit.rl.pipeline import Pipeline, Serialised, shadow_of, snapshot


class Sampler:
    def __init__(self):
        self.position = 0

    def state_dict(self):
        return {"position": self.position}


class Engine:
    version = 0

    def update_weights(self, model, version=None):
        self.version = version

    def generate(self, *a, **k):
        return "generated"


class Metrics:
    def __init__(self):
        self.d = {}

    def add(self, name, total, count, shared=False):
        self.d[name] = (total, count)


def make(depth, last, policy=None, delay=0.0):
    """A pipeline whose rollout ``r`` draws from the sampler, reads the shadow's weight and returns them."""
    policy = policy or nn.Linear(1, 1, bias=False)
    sampler, engine = Sampler(), Serialised(Engine())

    def generate(model, rollout, version):
        engine.update_weights(model, version=version)
        time.sleep(delay)
        sampler.position += 1
        return {"rollout": rollout, "version": version, "weight": float(model.weight)}, Metrics()

    return Pipeline(engine, policy, generate, sampler, depth, last), policy, sampler, engine


def train(pipe, policy, n):
    """Take rollouts 0..n-1, one optimizer step (weight += 1) after each; the versions they were sampled at."""
    seen = []
    for r in range(n):
        out, _, _ = pipe.take(r, policy, version=r)
        seen.append(out)
        with torch.no_grad():
            policy.weight.add_(1.0)
    return seen


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_rollout_r_is_sampled_by_the_weights_of_rollout_r_minus_k(depth):
    policy = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        policy.weight.fill_(0.0)
    pipe, policy, _, _ = make(depth, last=5, policy=policy)
    seen = train(pipe, policy, 6)
    assert [s["rollout"] for s in seen] == list(range(6))
    assert [s["version"] for s in seen] == [max(0, r - depth) for r in range(6)]
    # the weights it sampled with are those of that version (a snapshot, not the weights of when the job ran)
    assert [s["weight"] for s in seen] == [float(max(0, r - depth)) for r in range(6)]
    pipe._thread.join(5)  # the last rollout taken: the thread ends and the shadow is let go
    assert not pipe._thread.is_alive() and pipe.shadow is None


def test_the_snapshot_is_taken_when_asked_not_when_the_thread_runs():
    """The thread is slow: the trainer has moved the weights by the time it samples, and the sample still sees the
    weights of the moment the rollout was asked for."""
    policy = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        policy.weight.fill_(0.0)
    pipe, policy, _, _ = make(2, last=3, policy=policy, delay=0.2)
    seen = train(pipe, policy, 4)
    assert [s["weight"] for s in seen] == [0.0, 0.0, 0.0, 1.0]


def test_shadow_copies_trainable_weights_and_shares_frozen_ones():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    net[0].requires_grad_(False)
    shadow = shadow_of(net)
    assert shadow[0].weight is net[0].weight  # frozen: shared, nothing writes it
    assert shadow[1].weight is not net[1].weight and torch.equal(shadow[1].weight, net[1].weight)
    assert set(snapshot(net)) == {"1.weight", "1.bias"}
    pl.load_snapshot(shadow, {"1.weight": torch.ones(2, 2)})
    assert torch.equal(shadow[1].weight, torch.ones(2, 2)) and not torch.equal(net[1].weight, torch.ones(2, 2))
    with pytest.raises(RuntimeError, match="does not fit"):
        pl.load_snapshot(shadow, {"2.weight": torch.ones(1)})


def test_checkpointed_sampler_state_is_from_before_the_in_flight_rollouts_drew():
    pipe, policy, sampler, _ = make(2, last=9)
    pipe.take(0, policy, 0)  # rollouts 0, 1, 2 asked for; 0 taken
    assert pipe.sampler_state(1) == {"position": 1}  # rollout 1 drew after rollout 0's one draw
    for job in list(pipe.jobs.values()):
        job.result.result()
    assert sampler.position == 3 and pipe.sampler_state(1) == {"position": 1}
    assert pipe.sampler_state(3) is None  # not asked for yet: the sampler's own state is current


def test_an_error_in_the_thread_is_raised_when_its_rollout_is_taken():
    sampler, engine = Sampler(), Serialised(Engine())

    def generate(model, rollout, version):
        if rollout == 1:
            raise ValueError("reward function failed")
        return rollout, Metrics()

    pipe = Pipeline(engine, nn.Linear(1, 1), generate, sampler, 1, 3)
    assert pipe.take(0, nn.Linear(1, 1), 0)[0] == 0
    with pytest.raises(ValueError, match="reward function failed"):
        pipe.take(1, nn.Linear(1, 1), 1)


def test_the_engine_is_held_for_a_whole_job():
    """A caller between steps (the held-out evaluation) waits until the job in flight is done with the engine."""
    engine = Serialised(Engine())
    order = []

    def job():
        with engine.held():
            order.append("job start")
            time.sleep(0.3)
            order.append("job end")

    t = threading.Thread(target=job)
    t.start()
    time.sleep(0.05)
    engine.generate([[1]], 1, None)
    order.append("evaluate")
    t.join()
    assert order == ["job start", "job end", "evaluate"]
    assert engine.version == 0  # attributes read through


# ------------------------------------------------------------------ through the recipe


def _grpo(tmp_path, name, **extra):
    import _toy
    from alignkit.config import RLConfig
    from alignkit.recipes import rl

    cfg = RLConfig(model="tiny", data=str(_toy.prompt_jsonl(tmp_path)),
                   rewards=f"{_toy.__file__}:max_digit_reward", output_dir=str(tmp_path / name),
                   prompts_per_step=4, num_generations=4, max_new_tokens=3, batch_size=2, lr=3e-2,
                   scheduler="constant", progress=False, seed=1, eval_fraction=0, **extra)
    rl.run(cfg)
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    from safetensors.torch import load_file

    final = next((tmp_path / name / "final").glob("*.safetensors"))
    return rows, load_file(final)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_pipeline_at_depth_0_is_the_synchronous_loop_bit_for_bit(tmp_path, monkeypatch, precision):
    """fp32: the engine samples with the trainer's model in the synchronous loop and with the shadow copy in the
    pipeline; bf16: its copy is refreshed from one or the other. The same losses, gradients and final weights."""
    sync, w_sync = _grpo(tmp_path, "sync", max_steps=3, rollout_precision=precision)
    monkeypatch.setattr(pl, "ASYNC_FROM", 0)
    piped, w_piped = _grpo(tmp_path, "piped", max_steps=3, rollout_precision=precision)
    assert len(sync) == len(piped) == 3
    for a, b in zip(sync, piped):
        for k in ("loss", "grad_norm", "reward/mean", "completion/length/mean", "mismatch/abs"):
            assert a[k] == b[k], (k, a[k], b[k])
        assert a["rollout/max_staleness"] == b["rollout/max_staleness"] == 0
        assert "time/wait" in b and "time/wait" not in a  # the pipeline did run
    assert w_sync.keys() == w_piped.keys() and all(torch.equal(w_sync[k], w_piped[k]) for k in w_sync)


def test_max_staleness_2_never_trains_on_completions_more_than_2_versions_old(tmp_path, caplog):
    """Rollout r is sampled by the weights of rollout max(0, r - 2), one optimizer step a rollout: the staleness
    of steps 1..5 is 0, 1, 2, 2, 2. Step 1 is the synchronous run's step 1 (both sampled the initial weights);
    the others are not, and the correction weighs them (its weights differ from 1 once the sampler lags)."""
    sync, _ = _grpo(tmp_path, "sync", max_steps=5)
    lagged, _ = _grpo(tmp_path, "lagged", max_steps=5, max_staleness=2, correction="tis", rollout_precision="fp32")
    assert [r["rollout/max_staleness"] for r in lagged] == [0, 1, 2, 2, 2]
    assert [r["rollout/staleness"] for r in lagged] == [0, 1, 2, 2, 2]  # every completion of the rollout alike
    assert lagged[0]["correction/weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert any(abs(r["correction/weight_mean"] - 1) > 1e-3 for r in lagged[2:])
    assert lagged[0]["reward/mean"] == sync[0]["reward/mean"]
    assert all(math.isfinite(r["loss"]) for r in lagged)


def test_max_staleness_warns_without_a_correction_and_is_refused_negative(tmp_path, caplog):
    import logging

    from alignkit.config import RLConfig, build
    from alignkit.errors import ConfigError

    with pytest.raises(ConfigError, match="max_staleness must be >= 0"):
        build(RLConfig, None, ["model=tiny", "data=x.jsonl", "rewards=correctness", "max_staleness=-1"])
    with caplog.at_level(logging.WARNING, logger="alignkit"):
        rows, _ = _grpo(tmp_path, "uncorrected", max_steps=2, max_staleness=1)
    assert [r["rollout/max_staleness"] for r in rows] == [0, 1]
    assert any("without an off-policy correction" in r.getMessage() for r in caplog.records)


def test_resume_draws_the_prompts_that_were_in_flight(tmp_path):
    """At step 2 of a max_staleness=2 run rollouts 2 and 3 have drawn their prompts in the background; the
    checkpoint keeps the sampler where the synchronous run has it (2 rollouts x 4 prompts), and the resumed run
    draws rollouts 2 and 3 again, from there, and finishes."""
    rows, _ = _grpo(tmp_path, "a", max_steps=4, max_staleness=2, correction="tis", save_steps=2)
    ckpt = sorted((tmp_path / "a" / "checkpoints").glob("step-*"))[0]
    assert ckpt.name.endswith("2")
    extra = torch.load(ckpt / "extra.pt", weights_only=False)
    assert extra["sampler"]["position"] == 8 and extra["buffer_rollout"] == 1
    # resumed from that checkpoint (the run's only one: the last step writes final/), steps 3 and 4 train on
    # rollouts 2 and 3 sampled again, by step 2's weights
    assert [p.name for p in ckpt.parent.glob("step-*")] == [ckpt.name]
    resumed, _ = _grpo(tmp_path, "a", max_steps=4, max_staleness=2, correction="tis", save_steps=2, resume=True)
    assert [r["step"] for r in resumed][-2:] == [3, 4]
    assert [r["rollout/max_staleness"] for r in resumed][-2:] == [0, 1]
