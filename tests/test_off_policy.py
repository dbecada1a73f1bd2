"""Off-policy corrections and the sampler/trainer mismatch (``alignkit.losses.off_policy``, docs/off_policy.md).

Golden values are derived by hand in the comments. The bandit tests train the tabular bandit of
``test_rl_objective.py`` with the trainer's own functions while the samples come from a TEMPERED copy of the
policy, the way a rollout engine that is not the trainer would give them. The CLI tests run a tiny GRPO job and
read the mismatch metrics it logs.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from _toy import prompt_jsonl
from alignkit.cli import main
from alignkit.config import RLConfig, build
from alignkit.errors import ConfigError, MismatchAlarm
from alignkit.losses.off_policy import CORRECTIONS, get_correction, mismatch_metrics
from alignkit.losses.policy import get_kl_estimator, normaliser
from alignkit.rl.objective import KLController, Objective, compute_advantages, policy_objective
from alignkit.rl.rollout import Completion
from alignkit.rl.trainer import Group, PolicyTask, Prompt, Rollouts
from alignkit.train.loop import _reduce, add_metric
from test_rl_objective import PI_REF, PI_REF64, R, R64, tv

LN = math.log


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def weights(name: str, delta, mask=None, **hp) -> torch.Tensor:
    """The correction's weights for log-ratios ``delta = old - rollout`` (old = 0, rollout = -delta)."""
    delta = torch.as_tensor(delta, dtype=torch.float32)
    mask = torch.ones_like(delta) if mask is None else torch.as_tensor(mask, dtype=torch.float32)
    return CORRECTIONS[name].fn(torch.zeros_like(delta), -delta, mask, **hp).weights


# ------------------------------------------------------------------ golden values of each entry


def test_tis_golden():
    # rho = exp(delta) = (3, 0.5, 1); min(rho, 2) = (2, 0.5, 1); one of three tokens truncated
    out = CORRECTIONS["tis"].fn(torch.zeros(1, 3), -t([LN(3), LN(0.5), 0.0]), torch.ones(1, 3), clip=2.0)
    assert torch.allclose(out.weights, t([2.0, 0.5, 1.0]))
    assert out.metrics["clipped_frac"].item() == pytest.approx(1 / 3)
    assert out.metrics["weight_mean"].item() == pytest.approx(3.5 / 3)


def test_icepop_golden():
    # rho = (3, 0.25, 6): 3 in [0.5, 5] keeps its weight 3; 0.25 < 0.5 and 6 > 5 are masked to 0
    out = CORRECTIONS["icepop"].fn(torch.zeros(1, 3), -t([LN(3), LN(0.25), LN(6)]), torch.ones(1, 3), low=0.5, high=5.0)
    assert torch.allclose(out.weights, t([3.0, 0.0, 0.0]))
    assert out.metrics["masked_frac"].item() == pytest.approx(2 / 3)


def test_seq_mask_tis_golden():
    # sequence 1: rho = (4, 0.25, 1), geometric mean (4 * 0.25 * 1)^(1/3) = 1 in [0.5, 5]: kept, token TIS
    # min(rho, 2) = (2, 0.25, 1). Sequence 2: rho = (8, 8, 8), geometric mean 8 > 5: masked whole, (0, 0, 0) though
    # TIS alone gives (2, 2, 2). Sequence 3: rho = (3, 3, 3), geometric mean 3: kept, (2, 2, 2) (its product, 27,
    # would have masked it: the mean does not grow with the length)
    w = weights("seq_mask_tis", [[LN(4), LN(0.25), 0.0], [LN(8)] * 3, [LN(3)] * 3], clip=2.0, low=0.5, high=5.0)
    assert torch.allclose(w, t([2.0, 0.25, 1.0], [0.0, 0.0, 0.0], [2.0, 2.0, 2.0]))


def test_mis_golden():
    # sequence 1: rho_seq = 2 * 1.5 = 3 in [0.5, 5]: weight 3 on both tokens. Sequence 2: rho_seq = 4 * 2 = 8 > 5:
    # rejected. Sequence 3: rho_seq = 0.5 * 0.5 = 0.25 < 0.5: rejected
    w = weights("mis", [[LN(2), LN(1.5)], [LN(4), LN(2)], [LN(0.5), LN(0.5)]], low=0.5, high=5.0)
    assert torch.allclose(w, t([3.0, 3.0], [0.0, 0.0], [0.0, 0.0]))


@pytest.mark.parametrize("name", sorted(CORRECTIONS))
def test_conformance(name):
    """Every entry: garbage on masked positions (padding, a completion without reward) moves no weight and gets
    weight 0 (the sequence-level entries count only valid tokens); the weights carry no gradient even when the
    old log-probs do; bf16 log-probs give the fp32 weights to bf16's precision."""
    delta = [[LN(1.5), LN(0.8), 0.0], [LN(1.2), 0.0, 0.0]]
    mask = [[1, 1, 0], [1, 0, 0]]
    hp = {k: v for k, v in {"clip": 2.0, "low": 0.5, "high": 5.0}.items() if k in CORRECTIONS[name].hparams}
    clean = weights(name, delta, mask, **hp)
    wild = weights(name, [[LN(1.5), LN(0.8), 30.0], [LN(1.2), -40.0, 7.0]], mask, **hp)
    assert torch.equal(clean, wild)
    assert (clean[torch.tensor(mask) == 0] == 0).all()
    old = (-torch.rand(2, 3, generator=torch.Generator().manual_seed(0)) * 4).requires_grad_(True)
    rollout = old.detach() - torch.tensor(delta)
    m = torch.tensor(mask, dtype=torch.float32)
    w32 = CORRECTIONS[name].fn(old, rollout, m, **hp).weights
    assert not w32.requires_grad
    w16 = CORRECTIONS[name].fn(old.detach().bfloat16(), rollout.bfloat16(), m.bfloat16(), **hp).weights
    assert torch.allclose(w16.float(), w32, rtol=5e-2, atol=1e-3), (w16, w32)


@pytest.mark.parametrize("name", sorted(CORRECTIONS))
def test_zero_mismatch_weights_are_exactly_one_and_loss_is_uncorrected(name):
    """The engine is the trainer's own fp32 model: rollout == old bit for bit, so every weight is exactly 1 and
    the loss and its gradient equal the uncorrected ones exactly (PPO clip and GSPO, KL term in the loss)."""
    g = torch.Generator().manual_seed(0)
    logp0 = -torch.rand(3, 5, generator=g) * 3
    mask = t([1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1])
    adv, ref = torch.randn(3, 5, generator=g), logp0 - 0.1 * torch.randn(3, 5, generator=g)
    old = (logp0 + 0.05 * torch.randn(3, 5, generator=g)).detach()  # a later pass: ratios != 1, some clipped
    out = get_correction(name).fn(old, old.clone(), mask)
    assert (out.weights[mask.bool()] == 1.0).all()
    for loss_name, eps in (("ppo_clip", 0.2), ("gspo", 3e-4)):
        results = []
        for corr in ("none", name):
            obj = Objective(policy_loss=loss_name, kl_estimator="k2", kl_in="loss", kl_coef=0.3, eps_low=eps,
                            eps_high=eps, correction=corr).validate()
            logp = logp0.clone().requires_grad_(True)
            loss, _ = policy_objective(obj, logp, old, adv, mask, step_normaliser=3.0, ref_logp_BT=ref,
                                       rollout_logp_BT=old.clone())
            loss.backward()
            results.append((loss.detach(), logp.grad))
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1]), loss_name


def test_decoupled_weight_multiplies_the_whole_token_loss():
    """Decoupled TIS, first pass (logp == old, ratio 1), one sequence of 2 tokens, token_mean over N = 2.

    delta = old - rollout = (log 3, log 0.5) -> w = (min(3, 2), 0.5) = (2, 0.5). A = (1, -1): PPO loss -A = (-1, 1).
    k2 in the loss, l = logp - ref = (0.2, 0.4), kl_coef 0.5: 0.5 * l^2 / 2 = (0.01, 0.04).
    loss = ((-1 + 0.01) * 2 + (1 + 0.04) * 0.5) / 2 = (-1.98 + 0.52) / 2 = -0.73.
    Gradient in logp: w * (-A * ratio + kl_coef * l) / N = (2 * (-1 + 0.1), 0.5 * (1 + 0.2)) / 2 = (-0.9, 0.3): the
    weight is a constant (its function detaches ``old`` even when it is given with its graph).
    """
    logp = t([-1.0, -2.0]).requires_grad_(True)
    rollout = logp.detach() - t([LN(3), LN(0.5)])
    ref = logp.detach() - t([0.2, 0.4])
    assert not get_correction("tis").fn(logp, rollout, torch.ones(1, 2)).weights.requires_grad
    obj = Objective(aggregation="token_mean", kl_estimator="k2", kl_in="loss", kl_coef=0.5, correction="tis")
    loss, metrics = policy_objective(obj, logp, logp.detach(), t([1.0, -1.0]), torch.ones(1, 2), step_normaliser=2.0,
                                     ref_logp_BT=ref, rollout_logp_BT=rollout)
    assert loss.item() == pytest.approx(-0.73, abs=1e-6)
    loss.backward()
    assert torch.allclose(logp.grad, t([-0.9, 0.3]), atol=1e-6)
    s, n = metrics["correction/weight_mean"]
    assert s / n == pytest.approx(1.25) and metrics["correction/clipped_frac"] == (pytest.approx(1.0), 2.0)


def test_bypass_is_ppo_against_the_sampler():
    """Bypass: the old log-probs are replaced by the sampler's; the loss (and gradient) equal PPO computed with
    old := rollout, whatever the trainer's old log-probs were. Golden: ratio exp(log 1.1) = 1.1 is inside the clip
    range, A = 1: loss -1.1; ratio exp(log 1.5) = 1.5 with A = 1 is clipped at 1.2: -1.2; mean -1.15."""
    logp = t([-1.0, -1.0]).requires_grad_(True)
    rollout = logp.detach() - t([LN(1.1), LN(1.5)])
    bypass = Objective(aggregation="token_mean", kl_in="none", correction_mode="bypass")
    loss, _ = policy_objective(bypass, logp, torch.full((1, 2), -7.0), t([1.0, 1.0]), torch.ones(1, 2),
                               step_normaliser=2.0, rollout_logp_BT=rollout)
    assert loss.item() == pytest.approx(-1.15, abs=1e-6)
    g = torch.Generator().manual_seed(1)
    logp0, old, roll = (-torch.rand(4, 6, generator=g) * 2 for _ in range(3))
    adv, mask = torch.randn(4, 6, generator=g), (torch.rand(4, 6, generator=g) > 0.2).float()
    obj = Objective(kl_in="none")
    grads = []
    for o, kw in ((replace(obj, correction_mode="bypass"), {"rollout_logp_BT": roll}), (obj, {})):
        lp = logp0.clone().requires_grad_(True)
        loss, _ = policy_objective(o, lp, roll if not kw else old, adv, mask, step_normaliser=4.0, **kw)
        loss.backward()
        grads.append((loss.detach(), lp.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_corrections_need_the_sampler_log_probs():
    for obj in (Objective(correction="tis"), Objective(correction_mode="bypass")):
        with pytest.raises(ValueError, match="rollout_logp_BT"):
            policy_objective(obj, torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2),
                             step_normaliser=1.0)


def test_mismatch_metrics_golden():
    # l = rollout - trainer = (0.1, -0.3) on the valid tokens; the third token is padding
    trainer = t([-1.0, -1.0, -1.0])
    rollout = trainer + t([0.1, -0.3, 9.0])
    m = mismatch_metrics(trainer, rollout, t([1, 1, 0]), threshold=0.2)
    mean = {k: s / c for k, (s, c) in m.items()}
    assert mean["mismatch/k1"] == pytest.approx(-0.1)
    assert mean["mismatch/abs"] == pytest.approx(0.2)
    assert mean["mismatch/max_abs"] == pytest.approx(0.3) and m["mismatch/max_abs"][1] == 1.0
    assert mean["mismatch/max_ratio"] == pytest.approx(math.exp(0.3))  # pi_trainer / pi_rollout on token 2
    assert mean["mismatch/frac_over"] == pytest.approx(0.5)
    # k3 = exp(-l) - 1 + l: (exp(-0.1) - 0.9, exp(0.3) - 1.3), averaged
    assert mean["mismatch/k3"] == pytest.approx((math.exp(-0.1) - 0.9 + math.exp(0.3) - 1.3) / 2)


def test_the_loop_keeps_the_largest_max_metric():
    """``max_*`` metrics are (value, 1) pairs the loop reduces by their maximum; the others by sum / count."""
    sums: dict = {}
    for s, c in ((0.3, 1.0), (0.7, 1.0), (0.2, 1.0)):
        add_metric(sums, "mismatch/max_abs", s, c)
        add_metric(sums, "mismatch/abs", s, c)
    record = _reduce(sums, 0)
    assert record["mismatch/max_abs"] == pytest.approx(0.7) and record["mismatch/abs"] == pytest.approx(0.4)


def test_rollout_log_probs_are_kept_on_the_row():
    """``Rollouts._row`` stores the sampler's log-probs flat, completion by completion, as float32 on the CPU."""
    comps = [Completion([5, 6], "a", [-0.5, -1.25], "eos"), Completion([7], "b", [-2.0], "length")]
    cfg = SimpleNamespace(ppo_epochs=1, mini_batches=1, use_mask_truncated=False)
    rollouts = Rollouts(None, Objective(), KLController(0.0), cfg, pad_id=0, n_steps=1)
    row = rollouts._row(Group(0, Prompt([1, 2], "p"), comps, [1.0, 0.0], {}))
    r = row.extra["rollout"]
    assert r.dtype == torch.float32 and r.device.type == "cpu"
    assert r.tolist() == [-0.5, -1.25, -2.0] and r.shape == row.extra["valid"].shape


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize("args, words", [
    (["correction=tis", "top_p=0.9"], ("correction=tis", "top_p=0.9", "truncated")),
    (["correction=mis", "top_k=20"], ("correction=mis", "top_k=20")),
    (["correction=tis", "correction_mode=bypass"], ("bypass", "correction=none")),
    (["correction=icepop", "is_bounds=1.5,5"], ("is_bounds",)),
    (["correction=icepop", "is_bounds=0.5"], ("is_bounds",)),
    (["is_clip=0.5"], ("is_clip",)),
    (["mismatch_strict=true"], ("mismatch_strict", "mismatch_alarm")),
    (["correction=dr_tis"], ("correction",)),
])
def test_config_refusals(args, words):
    with pytest.raises(ConfigError) as e:
        build(RLConfig, None, ["data=x", *args])
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_truncated_sampling_with_a_correction_exits_2_before_a_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("alignkit.recipes.rl.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    rc = main(["grpo", f"data={prompt_jsonl(tmp_path)}", f"output_dir={tmp_path / 'out'}", "model=tiny",
               "correction=tis", "top_k=5"])
    assert rc == 2 and "top_k=5" in capsys.readouterr().err


def test_config_carries_the_correction_into_the_objective():
    obj = build(RLConfig, None, ["data=x", "correction=seq_mask_tis", "is_clip=3", "is_bounds=0.25,4"]).objective()
    assert (obj.correction, obj.correction_mode, obj.is_clip, obj.is_low, obj.is_high) == ("seq_mask_tis", "decoupled",
                                                                                          3.0, 0.25, 4.0)


# ------------------------------------------------------------------ tempered sampler on the tabular bandit

T_SAMPLER = 1.3  # the engine samples from p^(1/1.3) / Z while the trainer's old log-probs are at temperature 1
BETA = 0.2  # a sharper optimum than test_rl_objective's 0.5, so the sampler's bias is well above the tolerance
PI_STAR = PI_REF64 * torch.exp(R64 / BETA) / (PI_REF64 * torch.exp(R64 / BETA)).sum()  # ~ (.61, .06, .00, .34, .00)


def train_tempered(obj: Objective, *, steps: int = 200, seed: int = 0, B: int = 512, G: int = 8) -> torch.Tensor:
    """``softmax(theta)`` trained on the bandit with ``compute_advantages`` and ``policy_objective`` (one inner
    step: old = logp.detach()), its actions drawn from the tempered policy ``q ~ p^(1/T)`` whose log-probs are the
    rollout ones; Adam with lr 0.1 decaying as 1/(1 + step/50), and the Polyak average of the last 50 iterates
    (as ``test_rl_objective.train_bandit``)."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.zeros(len(R), requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s / 50))
    log_ref, kl_fn = PI_REF.log(), get_kl_estimator(obj.kl_estimator).fn
    mask = torch.ones(B, 1)
    n = normaliser(obj.aggregation, [mask])
    avg = torch.zeros(len(R), dtype=torch.float64)
    for step in range(steps):
        logpi = torch.log_softmax(theta, 0)
        logq = torch.log_softmax(logpi.detach() / T_SAMPLER, 0)
        a = torch.multinomial(logq.exp(), B, replacement=True, generator=gen)
        logp, ref, rollout = logpi[a][:, None], log_ref[a][:, None], logq[a][:, None]
        adv, _ = compute_advantages(obj, R[a], mask, group_size=G, kl_BT=kl_fn(logp, ref).detach())
        loss, _ = policy_objective(obj, logp, logp.detach(), adv, mask, step_normaliser=n, ref_logp_BT=ref,
                                   rollout_logp_BT=rollout)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step >= steps - 50:
            avg += torch.softmax(theta.detach().double(), 0) / 50
    return avg


# RLOO advantage with k2 in the loss: on-policy its fixed point is pi* = pi_ref exp(R / beta) / Z
# (test_rl_objective). Drawn from q, the expected gradient in theta_j of the reward part is q_j (R_j - E_q R) and of
# the KL part beta (q_j l_j - p_j E_q l), l = log(p / pi_ref). At pi*, R_j - beta l_j = beta log Z for every j, so
# the sum is beta E_q[l] (p_j - q_j): not zero unless q = p. With the weight w = p/q on every token's loss (the
# ratios stay within [0.49, 1.1] here, under C = 2 and inside [0.5, 5]) both expectations are under p again and
# pi* is the fixed point. Solved exactly, the uncorrected fixed point lies 0.068 from pi* in total variation.
TEMPERED = Objective(advantage="rloo", aggregation="token_mean", kl_estimator="k2", kl_in="loss", kl_coef=BETA)


@pytest.mark.parametrize("correction", ["tis", "icepop", "seq_mask_tis", "mis"])
def test_bandit_tempered_sampler_corrected_reaches_the_optimum(correction):
    """Every entry reaches pi* when its bounds hold the bandit's ratios (p/q falls to 0.13 on the rarest arm at
    pi*, so the masking entries get low = 0.05 here; the test below shows the default bounds at work)."""
    pi = train_tempered(replace(TEMPERED, correction=correction, is_low=0.05))
    assert tv(pi, PI_STAR) < 2e-2, pi


def test_bandit_icepop_masks_the_rare_arms():
    """IcePop with its default bounds [0.5, 5]: the rare arms' ratios p/q fall below 0.5, their samples are
    masked, and nothing pushes them down any further: they stay at least 10x likelier than at pi* (where they
    are 1.4e-3 and 5.5e-5). Masking trades this bias for safety against wild ratios."""
    pi = train_tempered(replace(TEMPERED, correction="icepop"))
    assert pi[2] > 10 * PI_STAR[2] and pi[4] > 10 * PI_STAR[4], pi


def test_bandit_tempered_sampler_uncorrected_misses_the_optimum():
    pi = train_tempered(TEMPERED)
    assert tv(pi, PI_STAR) > 5e-2, pi


def test_bandit_bypass_clips_the_mismatch_away():
    """Bypass (old := rollout): the first step's PPO ratio is p/q itself, 0.1 to 0.6 on the rare arms, below
    1 - eps = 0.8; with their negative advantage the clipped loss is flat there, so they are never pushed down."""
    pi = train_tempered(replace(TEMPERED, correction_mode="bypass"))
    assert tv(pi, PI_STAR) > 0.1 and pi[4] > 100 * PI_STAR[4], pi


def test_bandit_k1_in_the_reward_is_not_moved_by_the_sampler():
    """With the KL as k1 inside the sequence reward and a baseline (GRPO's group mean), the uncorrected gradient
    in theta_j is q_j (R'_j - b) with R' = R - beta log(p / pi_ref): zero exactly where R' is the same for every
    arm, i.e. at pi*, whatever the sampling distribution. The sampler then changes the path, not the optimum."""
    obj = Objective(advantage="grpo", kl_estimator="k1", kl_in="reward", kl_coef=BETA)
    assert tv(train_tempered(obj), PI_STAR) < 2e-2


# ------------------------------------------------------------------ the alarm


def test_alarm_warns_once_per_step_and_strict_stops(caplog):
    task = PolicyTask(Objective(), KLController(0.0), 0, 8, mismatch_alarm=0.5)
    with caplog.at_level(logging.WARNING, logger="alignkit"):
        task.end_step(3, {"mismatch/max_abs": 0.4})
        task.end_step(4, {"mismatch/max_abs": 0.6, "mismatch/abs": 0.1, "mismatch/frac_over": 0.25})
        task.end_step(5, {})  # a step without rows measures nothing
    assert [r.getMessage()[:7] for r in caplog.records] == ["step 4:"]
    strict = PolicyTask(Objective(), KLController(0.0), 0, 8, mismatch_alarm=0.5, mismatch_strict=True)
    strict.end_step(3, {"mismatch/max_abs": 0.4})
    with pytest.raises(MismatchAlarm, match="mismatch_alarm=0.5"):
        strict.end_step(4, {"mismatch/max_abs": 0.6})


# ------------------------------------------------------------------ through the CLI

REWARD = f"rewards={Path(__file__).parent / '_toy.py'}:max_digit_reward"
TINY = ["model=tiny", REWARD, "max_new_tokens=2", "scheduler=constant", "progress=false", "seed=1", "lr=3e-2",
        "prompts_per_step=4", "num_generations=4", "batch_size=2"]


def grpo(tmp_path, name, *args) -> tuple[int, list[dict]]:
    out = tmp_path / name
    rc = main(["grpo", f"data={prompt_jsonl(tmp_path)}", f"output_dir={out}", *TINY, *args])
    path = out / "metrics.jsonl"
    return rc, [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def skipped_sync(monkeypatch):
    """The engine's weight sync does its first call (the initial weights) and then nothing, while still claiming
    the version it was asked for: the bf16 copy keeps sampling with the initial weights."""
    from alignkit.rl.rollout import LocalEngine

    real, calls = LocalEngine.update_weights, []

    def update_weights(self, model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            return real(self, model, *args, **kwargs)
        if hasattr(self, "version"):
            version = kwargs.get("version", args[0] if args else None)
            self.version = self.version + 1 if version is None else version

    monkeypatch.setattr(LocalEngine, "update_weights", update_weights)
    return calls


def test_cli_logs_mismatch_and_a_skipped_sync_trips_the_alarm(tmp_path, skipped_sync, caplog):
    """bf16 engine: step 1 samples with synced weights, a bf16 copy of the fp32 trainer, so the mismatch is small
    but not 0; later steps sample with the initial weights while the trainer has moved (lr 3e-2), and the alarm
    warns once per step (4 micro-batches a step)."""
    with caplog.at_level(logging.WARNING, logger="alignkit"):
        rc, h = grpo(tmp_path, "bf16", "rollout_precision=bf16", "max_steps=4", "mismatch_alarm=0.05")
    assert rc == 0 and len(skipped_sync) >= 4
    first = h[0]
    assert 1e-5 < first["mismatch/abs"] <= first["mismatch/max_abs"] < 0.05, first
    for key in ("mismatch/k1", "mismatch/k3", "mismatch/max_ratio", "mismatch/frac_over"):
        assert math.isfinite(first[key]), key
    stale = [x["mismatch/max_abs"] for x in h[1:]]
    assert min(stale) > 0.05, stale
    alarms = [r.getMessage() for r in caplog.records if "mismatch_alarm=0.05" in r.getMessage()]
    assert [a.split(":")[0] for a in alarms] == ["step 2", "step 3", "step 4"], alarms


def test_cli_strict_alarm_stops_with_exit_1(tmp_path, skipped_sync, capsys):
    rc, h = grpo(tmp_path, "strict", "rollout_precision=bf16", "max_steps=4", "mismatch_alarm=0.05",
                 "mismatch_strict=true")
    assert rc == 1 and "mismatch_strict" in capsys.readouterr().err
    assert [x["step"] for x in h] == [1, 2]  # the step that tripped it is recorded, nothing after
    assert not (tmp_path / "strict" / "final").exists()


def test_cli_fp32_engine_has_no_mismatch_and_tis_weights_one(tmp_path):
    """The fp32 engine runs the trainer's own model: the log-probs differ only by the order of float operations
    (a cached decode against a full forward), and the TIS weights are 1 to that precision. Two passes over each
    rollout: the second measures the stored old log-probs (the weights have moved by then), the first its own."""
    rc, h = grpo(tmp_path, "fp32", "rollout_precision=fp32", "max_steps=4", "ppo_epochs=2", "correction=tis")
    assert rc == 0 and len(h) == 4
    for x in h:
        assert x["mismatch/max_abs"] < 1e-5 and x["mismatch/frac_over"] == 0.0, x
        assert x["correction/weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert h[0]["policy/ratio_mean"] == 1.0 and h[1]["policy/ratio_mean"] != 1.0
