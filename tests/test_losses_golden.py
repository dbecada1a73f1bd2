"""Golden values for the losses, computed by hand on plain floats, and a conformance test over the
preference-loss registry.

The golden batch G (see alignkit/losses/preference.py):
pair 0: chosen -5, rejected -7, ref_chosen -6, ref_rejected -6.5, tokens 2 and 4;
pair 1: chosen -8, rejected -6, ref_chosen -7, ref_rejected -7.5, tokens 4 and 3.
So rho_w = (1, -1), rho_l = (-0.5, 1.5), Delta = (1.5, -2.5),
avg_logp_w = (-2.5, -2), avg_logp_l = (-1.75, -2).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.losses import (
    PREFERENCE_LOSSES,
    BeliefLogps,
    PairLogps,
    UnpairedLogps,
    cdpo,
    dpo,
    get_loss,
    hinge,
    ipo,
    kto,
    kto_reference_point,
    nll_sum,
    orpo,
    robust,
    simpo,
)

F64 = torch.float64


def softplus(z: float) -> float:
    return math.log1p(math.exp(z))


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def t(*xs: float, dtype=F64) -> torch.Tensor:
    return torch.tensor(xs, dtype=dtype)


def golden_batch(dtype=F64) -> PairLogps:
    return PairLogps(
        chosen=t(-5, -8, dtype=dtype),
        rejected=t(-7, -6, dtype=dtype),
        chosen_tokens=t(2, 4, dtype=dtype),
        rejected_tokens=t(4, 3, dtype=dtype),
        ref_chosen=t(-6, -7, dtype=dtype),
        ref_rejected=t(-6.5, -7.5, dtype=dtype),
    )


def close(actual: torch.Tensor, expected: list[float], tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=0, atol=tol)


# ---------------------------------------------------------------- golden values


def test_dpo_golden():
    # beta = 0.5: beta * Delta = (0.75, -1.25); loss = -log sigma(m) = softplus(-m)
    out = dpo(golden_batch(), beta=0.5)
    close(out.losses, [softplus(-0.75), softplus(1.25)])
    close(out.losses, [0.3868710061, 1.5019290813], tol=1e-9)
    close(out.chosen_rewards, [0.5 * 1, 0.5 * -1])
    close(out.rejected_rewards, [0.5 * -0.5, 0.5 * 1.5])


def test_cdpo_golden():
    # -(1 - eps) log sigma(m) - eps log sigma(-m) with eps = 0.1
    out = cdpo(golden_batch(), beta=0.5, label_smoothing=0.1)
    close(out.losses, [0.9 * softplus(-0.75) + 0.1 * softplus(0.75), 0.9 * softplus(1.25) + 0.1 * softplus(-1.25)])
    # the identity in the docstring: cdpo = dpo + eps * beta * Delta
    close(out.losses, [softplus(-0.75) + 0.1 * 0.75, softplus(1.25) + 0.1 * -1.25])
    close(cdpo(golden_batch(), beta=0.5).losses, dpo(golden_batch(), beta=0.5).losses.tolist())


def test_robust_golden():
    out = robust(golden_batch(), beta=0.5, label_smoothing=0.1)
    close(
        out.losses,
        [(0.9 * softplus(-0.75) - 0.1 * softplus(0.75)) / 0.8, (0.9 * softplus(1.25) - 0.1 * softplus(-1.25)) / 0.8],
    )
    # robust = dpo - eps / (1 - 2 eps) * beta * Delta
    close(out.losses, [softplus(-0.75) - 0.125 * 0.75, softplus(1.25) + 0.125 * 1.25])


def test_cdpo_per_pair_smoothing_golden():
    """A tensor label_smoothing is one eps_i per pair: eps = (0.25, 0.6), i.e. soft labels s = 1 - eps =
    (0.75, 0.4), the second leaning towards the rejected response (allowed per pair, up to 1)."""
    eps = t(0.25, 0.6)
    out = cdpo(golden_batch(), beta=0.5, label_smoothing=eps)
    close(out.losses, [0.75 * softplus(-0.75) + 0.25 * softplus(0.75), 0.4 * softplus(1.25) + 0.6 * softplus(-1.25)])
    # cdpo = dpo + eps_i * beta * Delta_i = dpo + (0.1875, -0.75)
    close(out.losses, [softplus(-0.75) + 0.1875, softplus(1.25) - 0.75])
    close(out.losses, [0.5743710061, 0.7519290813], tol=1e-9)
    # each pair as its own float eps gives the same value, and a constant tensor is the float
    for i, e in enumerate((0.25, 0.6)):
        one = PairLogps(**{k: v[i : i + 1] for k, v in vars(golden_batch()).items()})
        close(cdpo(one, beta=0.5, label_smoothing=t(e)).losses, [out.losses[i].item()], tol=1e-12)
    close(cdpo(golden_batch(), beta=0.5, label_smoothing=t(0.1, 0.1)).losses,
          cdpo(golden_batch(), beta=0.5, label_smoothing=0.1).losses.tolist(), tol=1e-12)
    # eps = 0 per pair is DPO, eps = 1 is DPO on the flipped pair
    close(cdpo(golden_batch(), beta=0.5, label_smoothing=t(0.0, 1.0)).losses, [softplus(-0.75), softplus(-1.25)], tol=1e-12)


def test_robust_per_pair_smoothing_golden():
    # eps = (0.25, 0.4): eps / (1 - 2 eps) = (0.5, 2), robust = dpo - (0.5 * 0.75, 2 * -1.25)
    out = robust(golden_batch(), beta=0.5, label_smoothing=t(0.25, 0.4))
    close(out.losses, [(0.75 * softplus(-0.75) - 0.25 * softplus(0.75)) / 0.5,
                       (0.6 * softplus(1.25) - 0.4 * softplus(-1.25)) / 0.2])
    close(out.losses, [softplus(-0.75) - 0.375, softplus(1.25) + 2.5])
    close(out.losses, [0.0118710061, 4.0019290813], tol=1e-9)


@pytest.mark.parametrize("fn,eps,words", [
    (cdpo, t(0.1, 1.5), r"\[0, 1.0\]"),
    (cdpo, t(-0.1, 0.2), r"\[0, 1.0\]"),
    (cdpo, t(0.1, float("nan")), r"\[0, 1.0\]"),
    (cdpo, t(0.1, 0.2, 0.3), "shape"),
    (robust, t(0.1, 0.5), r"\[0, 0.5\)"),
], ids=["above-1", "negative", "nan", "shape", "robust-half"])
def test_per_pair_smoothing_is_checked(fn, eps, words):
    with pytest.raises(ValueError, match=words):
        fn(golden_batch(), beta=0.5, label_smoothing=eps)


def test_robust_is_unbiased_under_label_flips():
    """Chowdhury et al.: if the label is flipped with probability eps, the expected robust loss of
    the observed pair equals the clean DPO loss, for every Delta."""
    eps, beta = 0.2, 0.5
    clean = golden_batch()
    flipped = PairLogps(
        clean.rejected, clean.chosen, clean.rejected_tokens, clean.chosen_tokens, clean.ref_rejected, clean.ref_chosen
    )
    expected = (1 - eps) * robust(clean, beta=beta, label_smoothing=eps).losses + eps * robust(
        flipped, beta=beta, label_smoothing=eps
    ).losses
    close(expected, dpo(clean, beta=beta).losses.tolist(), tol=1e-12)
    # and by hand for Delta = 1.5: softplus(-0.75)
    assert expected[0].item() == pytest.approx(softplus(-0.75), abs=1e-12)
    # cdpo is not unbiased: its expectation is biased towards 0 margin
    cdpo_expected = (1 - eps) * cdpo(clean, beta=beta, label_smoothing=eps).losses + eps * cdpo(
        flipped, beta=beta, label_smoothing=eps
    ).losses
    assert abs(cdpo_expected[0].item() - softplus(-0.75)) > 1e-2


def test_hinge_golden():
    out = hinge(golden_batch(), beta=0.5)
    close(out.losses, [max(0.0, 1 - 0.75), max(0.0, 1 + 1.25)])


def test_ipo_golden():
    # 1 / (2 beta) = 1
    close(ipo(golden_batch(), beta=0.5).losses, [(1.5 - 1) ** 2, (-2.5 - 1) ** 2])
    # average version: rho_w = (1/2, -1/4), rho_l = (-0.5/4, 1.5/3)
    d0 = (-5 + 6) / 2 - (-7 + 6.5) / 4
    d1 = (-8 + 7) / 4 - (-6 + 7.5) / 3
    out = ipo(golden_batch(), beta=0.5, ipo_average=True)
    close(out.losses, [(d0 - 1) ** 2, (d1 - 1) ** 2])
    close(out.losses, [0.140625, 3.0625])
    # rewards stay beta * summed rho
    close(out.chosen_rewards, [0.5, -0.5])


def test_simpo_golden():
    out = simpo(golden_batch(), beta=2.0, gamma=0.5)
    m0 = 2 * (-5 / 2) - 2 * (-7 / 4) - 0.5  # = -2
    m1 = 2 * (-8 / 4) - 2 * (-6 / 3) - 0.5  # = -0.5
    close(out.losses, [softplus(-m0), softplus(-m1)])
    close(out.chosen_rewards, [-5.0, -4.0])
    close(out.rejected_rewards, [-3.5, -4.0])
    # no reference needed
    no_ref = golden_batch()
    no_ref.ref_chosen = no_ref.ref_rejected = None
    close(simpo(no_ref, beta=2.0, gamma=0.5).losses, out.losses.tolist())


def test_orpo_golden():
    batch = PairLogps(chosen=t(-1.0), rejected=t(-3.0), chosen_tokens=t(2.0), rejected_tokens=t(2.0))
    out = orpo(batch, beta=0.1, orpo_lambda=0.1)
    a_w, a_l = -0.5, -1.5
    lo_w = a_w - math.log(1 - math.exp(a_w))
    lo_l = a_l - math.log(1 - math.exp(a_l))
    close(out.losses, [-a_w + 0.1 * softplus(-(lo_w - lo_l))])
    close(out.losses, [0.5170859217], tol=1e-9)
    close(out.metrics["nll"], [0.5])
    close(out.metrics["log_odds_ratio"], [lo_w - lo_l])
    close(out.chosen_rewards, [0.1 * a_w])
    close(out.rejected_rewards, [0.1 * a_l])


def test_orpo_log_odds_accurate_near_zero():
    # a = -1e-9: log(1 - e^a) = log(1e-9 - 5e-19 + ...) ~ log(1e-9); log_odds ~ -log(1e-9) = 20.723
    batch = PairLogps(chosen=t(-3e-9), rejected=t(-3.0), chosen_tokens=t(3.0), rejected_tokens=t(3.0))
    a = -1e-9
    lo_w = a - math.log(-math.expm1(a))
    lo_l = -1.0 - math.log(1 - math.exp(-1.0))
    close(orpo(batch).metrics["log_odds_ratio"], [lo_w - lo_l], tol=1e-9)


def test_kto_golden():
    batch = UnpairedLogps(
        logps=t(-5, -8, -3), tokens=t(2, 4, 1), ref_logps=t(-6, -7, -3.5), desirable=torch.tensor([True, False, True])
    )
    out = kto(batch, reference_point=torch.tensor(0.2, dtype=F64), beta=0.5, kto_lambda_d=1.0, kto_lambda_u=2.0)
    # rho = (1, -1, 0.5)
    close(
        out.losses,
        [1 - sigmoid(0.5 * (1 - 0.2)), 2 * (1 - sigmoid(0.5 * (0.2 - -1))), 1 - sigmoid(0.5 * (0.5 - 0.2))],
    )
    close(out.chosen_rewards, [0.5, 0.25])
    close(out.rejected_rewards, [-0.5])


def test_kto_reference_point():
    assert kto_reference_point(t(0.5, -0.1, 0.2)).item() == pytest.approx(0.2)
    assert kto_reference_point(t(-1.0, 0.5)).item() == 0.0
    rho = t(1.0, 2.0).requires_grad_()
    assert not kto_reference_point(rho).requires_grad


def test_nll_sum_golden_and_accumulation():
    logps = t(-1.0, -2.0, -0.5, float("-inf"), -3.0, -0.25).reshape(2, 3)
    mask = torch.tensor([[False, True, True], [False, True, True]])
    # row 1 has a -inf log-prob at a masked (padding) position: it must not make the sum NaN
    assert nll_sum(logps, mask).item() == pytest.approx(2.0 + 0.5 + 3.0 + 0.25)
    # accumulation: sum per micro-batch / global count == whole-batch mean, whatever the split
    tokens = mask.sum()
    whole = nll_sum(logps, mask) / tokens
    accumulated = sum(nll_sum(logps[i : i + 1], mask[i : i + 1]) for i in range(2)) / tokens
    assert accumulated.item() == pytest.approx(whole.item())
    assert nll_sum(logps.to(torch.bfloat16), mask).dtype == torch.float32


# ---------------------------------------------------------------- registry


def test_registry_keys_and_flags():
    assert set(PREFERENCE_LOSSES) == {"dpo", "cdpo", "robust", "hinge", "ipo", "kto", "orpo", "simpo", "gdpo"}
    assert {n for n, s in PREFERENCE_LOSSES.items() if not s.needs_reference} == {"orpo", "simpo"}
    assert {n for n, s in PREFERENCE_LOSSES.items() if not s.paired} == {"kto"}
    for name, spec in PREFERENCE_LOSSES.items():
        assert spec.name == name and get_loss(name) is spec


def test_get_loss_unknown_names_choices():
    with pytest.raises(ConfigError, match="dpo.*simpo"):
        get_loss("dpoo")


def test_label_smoothing_is_checked():
    with pytest.raises(ValueError):
        robust(golden_batch(), label_smoothing=0.5)


def test_reference_losses_require_reference():
    batch = golden_batch()
    batch.ref_chosen = None
    with pytest.raises(ValueError, match="reference"):
        dpo(batch)


# ---------------------------------------------------------------- conformance over every entry


def default_hparams(spec) -> dict:
    """Each hparam at the function's own default, read off its signature (eps 0.1 for the two
    label-smoothing losses, whose default 0 makes them DPO)."""
    params = inspect.signature(spec.fn).parameters
    hp = {k: params[k].default for k in spec.hparams if k in params}  # gdpo passes the others to its inner loss
    if spec.name in ("cdpo", "robust"):
        hp["label_smoothing"] = 0.1
    return hp


def call(spec, logps: dict[str, torch.Tensor], **hp):
    """Call ``spec.fn`` on a batch built from ``logps``: paired losses read the first four keys
    as a pair; KTO reads chosen/rejected as two halves of a batch of 2B examples."""
    hp = hp or default_hparams(spec)
    if spec.name == "gdpo":  # three beliefs per pair, the last one padding; the pair conditioned on belief 1
        like = logps["chosen"].detach()
        beliefs = BeliefLogps(torch.stack([like / 4, like / 2, like], -1), torch.tensor([[True, True, False]] * len(like)),
                              torch.tensor([[0.7, 0.3, 0.0]] * len(like), dtype=like.dtype), torch.ones(len(like), dtype=torch.long))
        return spec.fn(PairLogps(**logps), beliefs=beliefs, **hp)
    if spec.paired:
        return spec.fn(PairLogps(**logps), **hp)
    batch = UnpairedLogps(
        logps=torch.cat([logps["chosen"], logps["rejected"]]),
        tokens=torch.cat([logps["chosen_tokens"], logps["rejected_tokens"]]),
        ref_logps=torch.cat([logps["ref_chosen"], logps["ref_rejected"]]),
        desirable=torch.arange(2 * len(logps["chosen"])) < len(logps["chosen"]),
    )
    z0 = kto_reference_point(batch.logps - batch.ref_logps.roll(1))
    return spec.fn(batch, reference_point=z0, **hp)


def make_logps(dtype, values: dict[str, list[float]], grad: bool = True) -> dict[str, torch.Tensor]:
    out = {k: torch.tensor(v, dtype=dtype) for k, v in values.items()}
    for k in ("chosen", "rejected"):
        out[k].requires_grad_(grad)
    return out


# exactly representable in bfloat16 (multiples of 1/8 below 16, integers), so bf16 and fp32 see
# the same inputs and any difference comes from the computation
ORDINARY = {
    "chosen": [-12.5, -3.25, -7.0, -1.5],
    "rejected": [-13.0, -2.75, -9.5, -4.0],
    "chosen_tokens": [10.0, 3.0, 7.0, 2.0],
    "rejected_tokens": [12.0, 2.0, 8.0, 4.0],
    "ref_chosen": [-12.0, -3.5, -8.0, -1.25],
    "ref_rejected": [-12.75, -3.0, -9.0, -3.5],
}
EXTREME = {
    # huge margins both ways, and average log-probs at and near 0 (ORPO's log1p(-exp(a)))
    "chosen": [-1e4, -10.0, -1e-9, 0.0],
    "rejected": [-10.0, -1e4, -5.0, -1e-9],
    "chosen_tokens": [100.0, 1.0, 1.0, 3.0],
    "rejected_tokens": [1.0, 100.0, 5.0, 1.0],
    "ref_chosen": [-10.0, -1e4, -2.0, -1.0],
    "ref_rejected": [-1e4, -10.0, -1e-9, -20.0],
}
SPECS = list(PREFERENCE_LOSSES.values())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_conformance_shapes_detached_finite(spec):
    logps = make_logps(torch.float32, ORDINARY)
    out = call(spec, logps)
    n = 8 if not spec.paired else 4
    assert out.losses.shape == (n,)
    assert out.losses.requires_grad
    rewards = [out.chosen_rewards, out.rejected_rewards, *out.metrics.values()]
    assert all(not r.requires_grad for r in rewards)
    assert out.chosen_rewards.shape == out.rejected_rewards.shape == (4,)
    out.losses.sum().backward()
    for k in ("chosen", "rejected"):
        assert logps[k].grad is not None and torch.isfinite(logps[k].grad).all()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_conformance_unreduced(spec):
    """Each entry of ``losses`` depends on its own pair only (no hidden mean over the batch)."""
    logps = make_logps(F64, ORDINARY, grad=False)
    whole = call(spec, logps).losses
    if spec.paired:
        for i in range(4):
            one = call(spec, {k: v[i : i + 1] for k, v in logps.items()}).losses
            torch.testing.assert_close(one, whole[i : i + 1])
    else:
        # KTO: fixed reference point, then per-example losses are independent
        z0 = torch.tensor(0.3, dtype=F64)
        batch = UnpairedLogps(logps["chosen"], logps["chosen_tokens"], logps["ref_chosen"], torch.tensor([1, 0, 1, 0]).bool())
        whole = kto(batch, reference_point=z0).losses
        for i in range(4):
            one = UnpairedLogps(*(getattr(batch, f)[i : i + 1] for f in ("logps", "tokens", "ref_logps", "desirable")))
            torch.testing.assert_close(kto(one, reference_point=z0).losses, whole[i : i + 1])


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_conformance_bf16_close_to_fp32(spec):
    out32 = call(spec, make_logps(torch.float32, ORDINARY))
    out16 = call(spec, make_logps(torch.bfloat16, ORDINARY))
    torch.testing.assert_close(out16.losses.float(), out32.losses, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out16.chosen_rewards.float(), out32.chosen_rewards, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out16.rejected_rewards.float(), out32.rejected_rewards, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64], ids=str)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_conformance_extreme_inputs_finite(spec, dtype):
    logps = make_logps(dtype, EXTREME)
    out = call(spec, logps)
    assert torch.isfinite(out.losses).all(), out.losses
    assert torch.isfinite(out.chosen_rewards).all() and torch.isfinite(out.rejected_rewards).all()
    assert all(torch.isfinite(v).all() for v in out.metrics.values())
    out.losses.sum().backward()
    for k in ("chosen", "rejected"):
        assert torch.isfinite(logps[k].grad).all(), (k, logps[k].grad)
