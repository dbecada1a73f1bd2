"""DAPO dynamic sampling, the pass-rate curriculum and the prompt sampler."""

import logging
import random
from collections import Counter
from dataclasses import dataclass

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.rl.sampling import (
    Curriculum,
    DynamicSampler,
    PromptSampler,
    zero_variance,
)


@dataclass
class Group:
    rewards: list
    tag: int = 0


def test_zero_variance_golden():
    r = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.5, 0.5 + 1e-9, 0.5], [0.0, 0.0, 1e-6]], dtype=torch.float64)
    assert zero_variance(r).tolist() == [True, False, True, False]
    assert zero_variance(torch.zeros(2, 1)).tolist() == [True, True]
    with pytest.raises(ValueError):
        zero_variance(torch.zeros(3))


# ------------------------------------------------------------------------------------------ dynamic sampling


def _drawer(rng, p_flat, G=4, log=None):
    """draw(k): k groups; each is all-equal with probability p_flat, else binary with at least one 0 and 1."""

    def draw(k):
        if log is not None:
            log.append(k)
        out = []
        for _ in range(k):
            if rng.random() < p_flat:
                out.append(Group([float(rng.random() < 0.5)] * G))
            else:
                r = [0.0, 1.0] + [float(rng.random() < 0.5) for _ in range(G - 2)]
                rng.shuffle(r)
                out.append(Group(r))
        return out

    return draw


@pytest.mark.parametrize("seed", range(30))
def test_dynamic_sampling_never_returns_zero_variance(seed):
    rng = random.Random(seed)
    target = rng.randint(1, 8)
    max_rounds = rng.randint(1, 5)
    kept, stats = DynamicSampler(max_rounds).fill(_drawer(rng, p_flat=rng.random()), target)
    assert len(kept) <= target and stats["kept"] == len(kept)
    if kept:
        assert not zero_variance(torch.tensor([g.rewards for g in kept])).any()
    assert stats["rounds"] <= max_rounds
    assert stats["drawn"] >= stats["kept"] + stats["dropped"]


def test_dynamic_sampling_fills_to_target_across_rounds():
    asked = []
    # round 1: 3 flat + 1 good; round 2 asks for 3: 1 flat + 2 good; round 3 asks for 1: good
    batches = iter([
        [Group([1, 1], 0), Group([0, 1], 1), Group([0, 0], 2), Group([1.0, 1.0], 3)],
        [Group([0.2, 0.3], 4), Group([5, 5], 5), Group([1, 0], 6)],
        [Group([0, 1, 1], 7), Group([0, 1], 8)],  # more than asked: the extra is discarded
    ])

    def draw(k):
        asked.append(k)
        return next(batches)

    kept, stats = DynamicSampler(max_rounds=5).fill(draw, target=4)
    assert asked == [4, 3, 1]
    assert [g.tag for g in kept] == [1, 4, 6, 7]
    assert stats == {"rounds": 3, "drawn": 9, "kept": 4, "dropped": 4}


def test_dynamic_sampling_stops_at_the_cap_with_one_warning(caplog):
    asked = []
    draw = _drawer(random.Random(0), p_flat=1.0, log=asked)  # every group is flat
    with caplog.at_level(logging.WARNING, logger="alignkit.rl.sampling"):
        kept, stats = DynamicSampler(max_rounds=3).fill(draw, target=5)
    assert kept == [] and stats == {"rounds": 3, "drawn": 15, "kept": 0, "dropped": 15}
    assert asked == [5, 5, 5]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "0 of 5 groups" in warnings[0] and "3 rounds" in warnings[0] and "15 groups drawn" in warnings[0]
    assert "max_sampling_rounds" in warnings[0] and "curriculum" in warnings[0] and "skipped" in warnings[0]


def test_dynamic_sampling_returns_fewer_at_the_cap(caplog):
    groups = iter([[Group([0, 1]), Group([1, 1])], [Group([2, 2]), Group([3, 3])]])
    with caplog.at_level(logging.WARNING, logger="alignkit.rl.sampling"):
        kept, stats = DynamicSampler(max_rounds=2).fill(lambda k: next(groups), target=3)
    assert len(kept) == 1 and stats["kept"] == 1 and stats["rounds"] == 2
    assert "1 of 3 groups" in caplog.text and "fewer groups" in caplog.text


def test_dynamic_sampling_no_warning_when_full(caplog):
    with caplog.at_level(logging.WARNING, logger="alignkit.rl.sampling"):
        kept, stats = DynamicSampler(1).fill(lambda k: [Group([0, 1]) for _ in range(k)], target=2)
    assert len(kept) == 2 and stats["rounds"] == 1 and not caplog.records
    with pytest.raises(ConfigError):
        DynamicSampler(0)


# ------------------------------------------------------------------------------------------ curriculum


def test_curriculum_pass_rates_and_drops():
    c = Curriculum(4, min_attempts=4, success_threshold=1.0)
    c.update(0, [1, 1, 1, 1])  # always solved -> dropped
    c.update(1, [0, 0, 0, 0])  # never solved -> dropped
    c.update(2, [1, 0, 0, 0.99])  # 0.99 < threshold: fails
    c.update(3, [1, 1, None])  # only 2 attempts so far: too early to drop
    assert [c.pass_rate(i) for i in range(4)] == [1.0, 0.0, 0.25, 1.0]
    w = c.weights()
    assert w.tolist() == [0.0, 0.0, 1.75, 1.0]
    m = c.metrics()
    assert m["curriculum/active"] == 2 and m["curriculum/dropped_solved"] == 1
    assert m["curriculum/dropped_unsolved"] == 1 and m["curriculum/mean_pass_rate"] == pytest.approx(2.25 / 4)
    c.update(3, [1, 1])  # now 4 attempts, all passed
    assert c.weights()[3] == 0.0


def test_curriculum_keep_flags_and_unseen_weight():
    c = Curriculum(3, min_attempts=2, drop_solved=False, drop_unsolved=True, hard_boost=2.0, success_threshold=0.5)
    assert c.pass_rate(0) is None
    c.update(0, [0.7, 0.9])
    c.update(1, [0.1, 0.2])
    # solved but kept (drop_solved=False): 1 + 2 * (1 - 1); unsolved dropped; unseen 1 + 2
    assert c.weights().tolist() == [1.0, 0.0, 3.0]


def test_curriculum_weights_favour_hard_prompts():
    c = Curriculum(3, min_attempts=4)
    c.update(0, [1, 1, 1, 0])  # easy: 0.75
    c.update(1, [1, 0, 0, 0])  # hard: 0.25
    w = c.weights()
    assert w[1] > w[0] and w[2] > w[1]  # unseen counts as hardest


def test_curriculum_resets_when_everything_is_dropped(caplog):
    c = Curriculum(2, min_attempts=2)
    c.update(0, [1, 1])
    with caplog.at_level(logging.WARNING, logger="alignkit.rl.sampling"):
        c.update(1, [0, 0])
    assert "all 2 prompts are dropped" in caplog.text
    assert c.weights().tolist() == [2.0, 2.0] and c.resets == 1
    assert c.metrics()["curriculum/resets"] == 1


def test_curriculum_state_dict_round_trip():
    c = Curriculum(5, min_attempts=2)
    for i, rs in enumerate([[1, 0], [1, 1], [0, 0, 1], [0]]):
        c.update(i, rs)
    d = Curriculum(5, min_attempts=2)
    d.load_state_dict(c.state_dict())
    assert torch.equal(c.weights(), d.weights()) and d.metrics() == c.metrics()
    with pytest.raises(ConfigError, match="same prompt set"):
        Curriculum(6).load_state_dict(c.state_dict())


# ------------------------------------------------------------------------------------------ prompt sampler


def test_sampler_epoch_coverage_without_curriculum():
    s = PromptSampler(10, seed=1)
    draws = [s.draw(3, step) for step in range(6)]  # 18 prompts: epoch 0 then 8 of epoch 1
    flat = [i for d in draws for i in d]
    assert sorted(flat[:10]) == list(range(10))
    assert len(set(flat[10:])) == 8
    assert flat[:10] != list(range(10))  # shuffled
    assert s.position == 18 and s.epoch == 1.8


def test_sampler_resume_draws_the_same_prompts():
    a = PromptSampler(7, seed=3)
    for step in range(4):
        a.draw(3, step)
    state = a.state_dict()
    b = PromptSampler(7, seed=3)
    b.load_state_dict(state)
    assert [a.draw(2, s, r) for s in range(4, 8) for r in range(2)] == [b.draw(2, s, r) for s in range(4, 8) for r in range(2)]


def test_sampler_with_curriculum_is_deterministic_and_resumable():
    def make():
        c = Curriculum(20, min_attempts=2)
        for i in range(0, 20, 3):
            c.update(i, [1.0, 0.0, 0.0])
        return PromptSampler(20, seed=5, curriculum=c)

    a, b = make(), make()
    assert a.draw(6, step=3, round=1) == b.draw(6, step=3, round=1)
    assert a.draw(6, step=3, round=1) == a.draw(6, step=3, round=1)  # a function of (seed, step, round, state)
    assert a.draw(6, step=3, round=0) != a.draw(6, step=3, round=1)
    assert len(set(a.draw(6, step=4))) == 6  # without replacement
    a.curriculum.update(1, [1, 1])
    c = make()
    c.load_state_dict(a.state_dict())
    assert c.draw(8, step=9, round=2) == a.draw(8, step=9, round=2)


def test_sampler_skips_dropped_prompts_and_wraps_past_the_active_count():
    c = Curriculum(4, min_attempts=1)
    c.update(0, [1.0])
    c.update(1, [0.0])
    out = PromptSampler(4, seed=0, curriculum=c).draw(5, step=0)
    assert set(out) == {2, 3} and len(out) == 5


def test_weighted_sampling_frequencies_follow_weights():
    c = Curriculum(4, min_attempts=10, hard_boost=3.0)
    c.update(0, [1] * 5)  # pass rate 1 (not yet dropped): weight 1
    c.update(1, [1, 0, 1, 0])  # 0.5: weight 2.5
    c.update(2, [0, 0, 0, 0])  # 0: weight 4
    w = c.weights()
    assert w.tolist() == [1.0, 2.5, 4.0, 4.0]  # prompt 3 unseen: 1 + 3
    s = PromptSampler(4, seed=0, curriculum=c)
    counts = Counter(i for step in range(4000) for i in s.draw(1, step))
    freq = torch.tensor([counts[i] / 4000 for i in range(4)], dtype=torch.float64)
    assert torch.allclose(freq, w / w.sum(), atol=0.025), freq
