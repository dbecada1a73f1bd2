"""The online-RL defects found by review, each pinned by a test that failed before its fix: the adaptive KL
controller's step size, scoring at the sampling temperature, group statistics over the completions that got a
reward, DAPO's overlong filtering, the rollout seeds, and the configurations that used to run to the end with
nothing to learn or with a confusing error."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from _toy import prompt_jsonl
from alignkit.cli import main
from alignkit.config import RLConfig, build
from alignkit.models.logprobs import project_logps
from alignkit.rl.advantages import dr_grpo, grpo, rloo
from alignkit.rl.objective import compute_advantages, preset
from alignkit.rl.trainer import Group, Prompt, Rollouts, rollout_seed

REWARD = f"rewards={Path(__file__).parent / '_toy.py'}:max_digit_reward"
COMMON = ["model=tiny", REWARD, "max_new_tokens=2", "scheduler=constant", "rollout_precision=fp32", "progress=false",
          "seed=1", "prompts_per_step=4", "num_generations=4"]


# ------------------------------------------------------------------------------------------------ item 6


def test_group_statistics_leave_out_missing_rewards():
    """``[1, None, None, 0]``: mean 0.5 and unbiased std sqrt(0.5) over the two rewards, so +-0.7071; filling the
    missing ones with the mean gave std sqrt(1/6) and +-1.2247."""
    r = torch.tensor([[1.0, 0.5, 0.5, 0.0]])  # the 0.5s are whatever a caller filled in: they must not matter
    valid = torch.tensor([[True, False, False, True]])
    torch.testing.assert_close(grpo(r, valid), torch.tensor([[0.707107, 0.0, 0.0, -0.707107]]), rtol=0, atol=2e-6)
    torch.testing.assert_close(grpo(torch.tensor([[1.0, 9.0, -3.0, 0.0]]), valid), grpo(r, valid))
    torch.testing.assert_close(dr_grpo(r, valid), torch.tensor([[0.5, 0.0, 0.0, -0.5]]))
    torch.testing.assert_close(rloo(r, valid), torch.tensor([[1.0, 0.0, 0.0, -1.0]]))  # 1 - 0 and 0 - 1
    one = torch.tensor([[True, False, False, False]])  # a single valid completion has no baseline: 0
    assert not grpo(r, one).any() and not rloo(r, one).any()
    # all valid: the plain estimators (the golden values of test_rl_losses)
    full = torch.ones_like(valid)
    torch.testing.assert_close(grpo(r, full), grpo(r))


def test_compute_advantages_takes_group_statistics_over_scored_completions():
    obj = preset("grpo")
    mask = torch.tensor([[1, 1], [0, 0], [0, 0], [1, 0]], dtype=torch.float32)  # completions 1 and 2 unscored
    a, _ = compute_advantages(obj, torch.tensor([1.0, 7.0, -7.0, 0.0]), mask, group_size=4)
    torch.testing.assert_close(a[:, 0], torch.tensor([0.707107, 0.0, 0.0, -0.707107]), rtol=0, atol=2e-6)
    # scored but masked from the loss (a truncated completion under overlong filtering): in the statistics
    scored = torch.tensor([True, True, False, True])
    a, _ = compute_advantages(obj, torch.tensor([1.0, 1.0, -7.0, 0.0]), mask, group_size=4, scored_B=scored)
    # rewards 1, 1, 0: mean 2/3, std sqrt(1/3); completion 1 has no token to carry its advantage
    torch.testing.assert_close(a[:, 0], torch.tensor([(1 - 2 / 3) / math.sqrt(1 / 3), 0.0, 0.0, (-2 / 3) / math.sqrt(1 / 3)]),
                               rtol=0, atol=2e-6)


def _completion(n: int, reason: str):
    return SimpleNamespace(token_ids=list(range(1, n + 1)), text="x", logps=[-0.5] * n, finish_reason=reason)


@pytest.mark.parametrize("mask_truncated", [True, False])
def test_overlong_filtering_masks_truncated_completions_but_keeps_their_rewards(mask_truncated):
    cfg = SimpleNamespace(use_mask_truncated=mask_truncated, ppo_epochs=1, mini_batches=1)
    source = Rollouts.__new__(Rollouts)
    source.cfg = cfg
    g = Group(0, Prompt([5, 6], "p"), [_completion(2, "stop"), _completion(3, "length"), _completion(1, "stop")],
              [1.0, 0.0, None], {})
    row = source._row(g)
    assert row.extra["valid"].tolist() == [True, True, not mask_truncated, not mask_truncated, not mask_truncated, False]
    assert row.extra["scored"].tolist() == [True, True, False]
    assert row.extra["scores"].tolist() == [1.0, 0.0, 0.0]


def test_dapo_turns_on_overlong_filtering_and_says_what_it_turns_on(capsys):
    assert build(RLConfig, overrides={"preset": "dapo", "data": "x"}).use_mask_truncated
    assert not build(RLConfig, overrides={"preset": "grpo", "data": "x"}).use_mask_truncated
    assert not build(RLConfig, overrides={"preset": "dapo", "data": "x", "mask_truncated": "false"}).use_mask_truncated
    assert main(["grpo", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for technique in ("clip-higher", "token-level loss", "dynamic sampling", "overlong filtering", "`overlong` reward"):
        assert technique in text, technique


# ------------------------------------------------------------------------------------------------ item 5


def test_project_logps_scores_at_a_temperature():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    model = SimpleNamespace(get_output_embeddings=lambda: head, config=SimpleNamespace())
    h, target = torch.randn(5, 8), torch.randint(0, 11, (5,))
    with torch.no_grad():
        got = project_logps(model, h, target, temperature=0.6)
        want = torch.log_softmax(head(h) / 0.6, -1).gather(-1, target[:, None]).squeeze(-1)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, project_logps(model, h, target).detach())


def test_policy_old_and_reference_are_scored_at_the_sampling_temperature(tmp_path, monkeypatch):
    """Every log-prob the trainer takes (the policy with gradient, the behaviour policy for later PPO epochs, the
    reference for the KL) is at the temperature the sampler used, not at 1."""
    import alignkit.rl.trainer as trainer

    seen = []
    real = trainer.project_logps

    def spy(*args, **kwargs):
        seen.append((kwargs.get("temperature", 1.0), torch.is_grad_enabled()))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "project_logps", spy)
    data = prompt_jsonl(tmp_path)
    assert main(["grpo", f"data={data}", f"output_dir={tmp_path / 'o'}", *COMMON, "temperature=0.7", "ppo_epochs=2",
                 "max_steps=2", "lr=1e-2"]) == 0
    assert {t for t, _ in seen} == {0.7}
    assert any(grad for _, grad in seen) and sum(not grad for _, grad in seen) >= 2  # old + reference


# ------------------------------------------------------------------------------------------------ item 4


def test_the_kl_controller_moves_by_the_samples_of_a_rollout(tmp_path):
    """With the default horizon, beta moves by 0.2 x (samples in the rollout) / 10000 per rollout below target;
    passing 1 instead of the sample count left it at 0.05 * (1 - 0.2 / 10000)."""
    import json

    data = prompt_jsonl(tmp_path)
    out = tmp_path / "o"
    assert main(["grpo", f"data={data}", f"output_dir={out}", *COMMON, "preset=rloo", "kl_target=1.0", "max_steps=2",
                 "lr=1e-3"]) == 0
    betas = [json.loads(x)["kl_coef"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    # the first rollout: KL 0 (policy == reference) -> error clipped to -0.2, 16 samples
    assert betas[0] == pytest.approx(0.05 * (1 - 0.2 * 16 / 10000), rel=1e-12)


# ------------------------------------------------------------------------------------------------ item 7


def test_rollout_seeds_never_collide():
    """The old formula ((rollout * 101 + round) * 64 + rank) gave rollout r, round 101 the seed of rollout r+1,
    round 0, and rank 64 the seed of the next round's rank 0. The last part now names a prompt's position in the
    round's draw over all processes, not a rank (tests/test_rl_distributed.py)."""
    seeds = {rollout_seed(0, r, k, pos) for r, k, pos in itertools.product(range(12), range(0, 300, 7), range(0, 200, 3))}
    assert len(seeds) == 12 * len(range(0, 300, 7)) * len(range(0, 200, 3))
    assert rollout_seed(0, 0, 101, 0) != rollout_seed(0, 1, 0, 0) and rollout_seed(0, 0, 0, 64) != rollout_seed(0, 0, 1, 0)
    assert rollout_seed(1, 0, 0, 0) != rollout_seed(0, 0, 0, 0) and 0 <= rollout_seed(5, 9, 9, 9) < 2**63


@pytest.mark.parametrize("args, words", [
    (["temperature=0"], ["temperature", "> 0"]),
    (["grad_accum=2"], ["grad_accum", "prompts_per_step"]),
])
def test_configs_that_would_learn_nothing_exit_2(tmp_path, capsys, args, words):
    assert main(["grpo", f"data={prompt_jsonl(tmp_path)}", *args]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def test_yaml_lists_for_stop_rewards_and_weights(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data: x\nstop: [\"\\n\\n\", 'Question:']\nrewards: [correctness, format]\nreward_weights: [1, 0.5]\n")
    cfg = build(RLConfig, str(cfg_file))
    assert cfg.stop_strings == ("\n\n", "Question:") and cfg.rewards == "correctness,format"
    assert cfg.reward_weights == "1,0.5"
    cfg_file.write_text("data: x\nlr: [1, 2]\n")
    assert main(["grpo", "--config", str(cfg_file)]) == 2
    assert "lr: expected a single value" in capsys.readouterr().err
