"""Mechanisms of online RL that the learning tests of ``tests/test_rl_cli.py`` do not see on their own.

Each test here fails when the mechanism it names is removed; ``scripts/mutate.py`` removes them one at a time
and shows it.

- Weight sync: every rollout starts with ``engine.update_weights(policy)``. ``test_rl_cli.py`` rolls out with
  ``rollout_precision=fp32``, where the engine generates with the live model itself, so dropping the sync
  changes nothing there. With ``bf16`` the engine samples from its own copy: without the sync it samples from
  the initial weights for ever, and the sampled rewards cannot rise.
- PPO's trust region: with ``ppo_epochs x mini_batches`` optimizer steps per rollout, only the first one is
  on-policy (ratio exactly 1); the later ones compare with the stored behaviour log-probs, so on a large step
  the ratio leaves 1 and the clip acts. Using the current log-probs as the old ones would never clip.
- The reference: the KL term compares with the initial weights, not with the policy of the rollout.

The runs go through the real CLI on the tiny random model and the max-digit toy (``tests/_toy.py``).
"""

from __future__ import annotations

import pytest
import torch

from alignkit.models.logprobs import unwrap
from alignkit.rl.rollout import LocalEngine
from test_rl_cli import history, rewards, run

LEARN = ["preset=grpo", "prompts_per_step=8", "num_generations=8", "lr=3e-2", "max_steps=16"]


@pytest.fixture
def dense(tmp_path) -> str:
    """``rewards=`` a dense reward (the completion's first byte / 255): the completions of a group almost never
    tie, so every rollout has a gradient and the policy moves from the first step (the toy's reward is 0 for
    most completions of the random model, so a small rollout often has no signal at all)."""
    path = tmp_path / "dense.py"
    path.write_text("def first_byte(prompts, completions, **_):\n"
                    "    return [c.encode()[0] / 255 if c else 0.0 for c in completions]\n")
    return f"rewards={path}:first_byte"


def test_bf16_rollouts_learn_the_toy(tmp_path):
    """As ``test_preset_learns_the_toy[grpo]``, but the engine samples from its bf16 copy of the policy."""
    out = run(tmp_path, "grpo", *LEARN, "rollout_precision=bf16")
    r = rewards(out)
    start, end = sum(r[:3]) / 3, sum(r[-5:]) / 5
    assert start < 0.08 and end > start + 0.1, [round(x, 2) for x in r]


def _engine_weights(engine: LocalEngine) -> dict[str, torch.Tensor]:
    """The weights the bf16 engine generates with: its copy's parameters and its prepacked linears."""
    return engine.held_weights()


def test_engine_generates_with_the_current_policy_weights(tmp_path, monkeypatch, dense):
    """At every rollout the bf16 copy holds exactly the policy's weights cast to bf16 (prepacked linears
    included), and the policy has moved since the previous rollout (so the comparison is not vacuous)."""
    policies, checks = [], []
    init, generate = LocalEngine.__init__, LocalEngine.generate

    def recording_init(self, model, *a, **kw):
        policies.append(model)
        init(self, model, *a, **kw)

    def checked_generate(self, prompts, n, sampling, seeds=None, version=None):
        assert self.precision == "bf16"
        policy = {k: v.detach().clone() for k, v in unwrap(policies[0]).named_parameters()}
        engine = _engine_weights(self)
        assert set(engine) == set(policy)
        stale = sorted(k for k in policy if not torch.equal(engine[k], policy[k].to(torch.bfloat16)))
        checks.append((policy, stale))
        return generate(self, prompts, n, sampling, seeds, version)

    monkeypatch.setattr(LocalEngine, "__init__", recording_init)
    monkeypatch.setattr(LocalEngine, "generate", checked_generate)
    # 3 rollouts of 2 optimizer steps each
    run(tmp_path, "grpo", dense, "rollout_precision=bf16", "prompts_per_step=4", "num_generations=4", "mini_batches=2",
        "lr=1e-2", "max_steps=6")
    assert len(policies) == 1 and len(checks) == 3
    for i, (policy, stale) in enumerate(checks):
        assert not stale, f"rollout {i}: the engine generates with stale {stale[:4]} ..."
        if i:
            before = checks[i - 1][0]
            moved = [k for k in policy if not torch.equal(policy[k].to(torch.bfloat16), before[k].to(torch.bfloat16))]
            assert len(moved) > len(policy) // 2, f"rollout {i}: the policy barely moved ({len(moved)} tensors)"


def test_later_updates_of_a_rollout_are_clipped(tmp_path, dense):
    """ppo_epochs=2 x mini_batches=2: per rollout the first update is on-policy (ratio exactly 1, nothing
    clipped); at lr=5e-2 the policy moves far past the clip range of 0.2 after it, so the three later updates,
    which compare with the stored behaviour log-probs, have ratios away from 1 and clip some tokens."""
    out = run(tmp_path, "grpo", dense, "preset=grpo", "ppo_epochs=2", "mini_batches=2", "prompts_per_step=8",
              "num_generations=4", "lr=5e-2", "max_steps=8")
    h = history(out)
    assert len(h) == 8 and all("policy/ratio_mean" in x for x in h)
    for rollout in range(2):
        first, *later = h[4 * rollout : 4 * rollout + 4]
        assert first["policy/ratio_mean"] == 1.0 and first["policy/clip_frac"] == 0.0, first
        for x in later:
            assert abs(x["policy/ratio_mean"] - 1.0) > 1e-3 and x["policy/clip_frac"] > 0.0, \
                [(y["policy/ratio_mean"], y["policy/clip_frac"]) for y in h]


def test_kl_is_measured_against_the_initial_weights(tmp_path, dense):
    """GRPO's k3 term: 0 on the first update (policy == reference), then growing as the policy leaves the
    initial weights. Against the rollout's own policy it would be 0 on every (on-policy) update."""
    out = run(tmp_path, "grpo", dense, "preset=grpo", "prompts_per_step=4", "num_generations=4", "lr=3e-2", "max_steps=4")
    kl = [x["kl"] for x in history(out)]
    assert kl[0] == pytest.approx(0.0, abs=1e-6)
    assert all(k > 1e-3 for k in kl[1:]), kl
