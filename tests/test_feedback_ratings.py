"""Bradley-Terry ratings and win-rate intervals (alignkit.feedback.ratings): recovery of known strengths,
agreement with an independent logistic-regression fit, golden values, invariances, errors, interval coverage."""

import json
import math
import random

import numpy as np
import pytest

from alignkit.feedback.ratings import (
    Battle, bootstrap_ratings, bradley_terry, leaderboard_rows, predict_win_rate, win_rate,
)

K = 400.0 / math.log(10.0)  # rating points per unit of natural-log strength
TRUE = {"m0": 1150.0, "m1": 1060.0, "m2": 1000.0, "m3": 950.0, "m4": 840.0}  # mean 1000


def simulate(ratings, n, tie=0.1, seed=0):
    """Battles from the BT model with ties-as-half: a tie with probability ``tie`` (half of them "both_bad"),
    otherwise ``a`` wins with probability q chosen so that P(a wins) + tie/2 = sigmoid(d), the model's
    expected outcome for ``a`` (the fit's estimating equation is then unbiased)."""
    rng = np.random.default_rng(seed)
    models = list(ratings)
    out = []
    for _ in range(n):
        a, b = rng.choice(models, 2, replace=False)
        p = 1 / (1 + math.exp((ratings[b] - ratings[a]) / K))
        q = (p - tie / 2) / (1 - tie)
        u = rng.random()
        winner = ("tie" if u < tie / 2 else "both_bad") if u < tie else ("a" if rng.random() < q else "b")
        out.append(Battle(str(a), str(b), winner))
    return out


def analytic_se(ratings, n):
    """Standard errors of the centred ratings from the inverse Fisher information at the true strengths with
    the expected battle counts (n / pairs per pair). Ties make an outcome's variance smaller than p(1 - p), so
    this is an upper bound on the asymptotic SE."""
    models = list(ratings)
    m = len(models)
    per_pair = n / (m * (m - 1) / 2)
    info = np.zeros((m, m))
    for i in range(m):
        for j in range(i + 1, m):
            p = 1 / (1 + math.exp((ratings[models[j]] - ratings[models[i]]) / K))
            h = per_pair * p * (1 - p)
            info[[i, j], [i, j]] += h
            info[i, j] -= h
            info[j, i] -= h
    cov = np.linalg.pinv(info)  # covariance of the centred strengths
    return {mod: K * math.sqrt(cov[i, i]) for i, mod in enumerate(models)}, cov


def test_recovers_known_ratings_and_bootstrap_covers():
    n = 4000
    battles = simulate(TRUE, n)
    fit = bradley_terry(battles)
    se, cov = analytic_se(TRUE, n)
    models = list(TRUE)
    assert sum(fit.values()) / len(fit) == pytest.approx(1000.0, abs=1e-9)
    # Every pairwise difference within 4 standard errors of the truth (SE about 20 points here).
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            ia, ib = models.index(a), models.index(b)
            se_diff = K * math.sqrt(cov[ia, ia] + cov[ib, ib] - 2 * cov[ia, ib])
            assert abs((fit[a] - fit[b]) - (TRUE[a] - TRUE[b])) < 4 * se_diff, (a, b)
    assert sorted(fit, key=fit.get) == sorted(TRUE, key=TRUE.get)

    boot = bootstrap_ratings(battles, rounds=300, seed=1)
    for m in models:
        row = boot[m]
        assert row["rating"] == pytest.approx(fit[m])
        assert row["lower"] < row["rating"] < row["upper"]
        assert row["lower"] <= TRUE[m] <= row["upper"], m
        # The interval's half-width matches 1.96 analytic SEs (ties shrink it a little).
        assert 0.6 * 1.96 * se[m] < (row["upper"] - row["lower"]) / 2 < 1.2 * 1.96 * se[m], m
        assert row["battles"] == sum(m in (b.model_a, b.model_b) for b in battles)


def test_equals_weighted_logistic_regression():
    sm = pytest.importorskip("statsmodels.api")
    battles = simulate({"A": 1100.0, "B": 1000.0, "C": 980.0, "D": 900.0}, 600, tie=0.2, seed=3)
    rng = np.random.default_rng(4)
    battles = [Battle(b.model_a, b.model_b, b.winner, float(rng.choice([0.5, 1.0, 2.0]))) for b in battles]
    models = ["A", "B", "C", "D"]
    anchor, free = "D", ["A", "B", "C"]
    # Design: +1 for model_a, -1 for model_b, the anchor's column dropped; a tie is two rows (a won, b won)
    # with half the weight each.
    rows, ys, ws = [], [], []
    for b in battles:
        x = [float(b.model_a == m) - float(b.model_b == m) for m in free]
        for y, share in {"a": [(1, 1.0)], "b": [(0, 1.0)]}.get(b.winner, [(1, 0.5), (0, 0.5)]):
            rows.append(x)
            ys.append(y)
            ws.append(b.weight * share)
    glm = sm.GLM(np.array(ys), np.array(rows), family=sm.families.Binomial(), freq_weights=np.array(ws))
    beta = glm.fit(tol=1e-13, maxiter=100).params
    reference = {m: 1000.0 + K * beta[i] for i, m in enumerate(free)} | {anchor: 1000.0}

    fit = bradley_terry(battles, anchor=anchor, reg=0.0)
    assert list(fit) == models
    for m in models:
        assert fit[m] == pytest.approx(reference[m], abs=1e-6), m
    # The default L2 term moves connected, non-separated ratings by far less than a rating point.
    default = bradley_terry(battles, anchor=anchor)
    assert max(abs(default[m] - fit[m]) for m in models) < 1e-2


def test_golden_values():
    # A beats B in 3 of 4: the MLE solves sigmoid(d) = 3/4, so the strength ratio exp(d) = 3 and the rating
    # difference is 400 * log10(3) = 190.848...; centred on 1000: 1000 +- 95.424.
    three_one = [Battle("A", "B", "a")] * 3 + [Battle("A", "B", "b")]
    fit = bradley_terry(three_one, reg=0.0)
    assert fit["A"] - fit["B"] == pytest.approx(190.84850188786498, abs=1e-6)
    assert fit["A"] == pytest.approx(1095.4242509439325, abs=1e-6)
    assert predict_win_rate(fit, "A", "B") == pytest.approx(0.75, abs=1e-12)
    assert bradley_terry(three_one)["A"] - bradley_terry(three_one)["B"] == pytest.approx(190.8485, abs=1e-2)
    # 2 wins, 1 tie, 1 loss: A scores 2.5 of 4 and B 1.5 (the tie is half a win each), so sigmoid(d) = 5/8,
    # the strength ratio is 5/3 and the difference 400 * log10(5/3) = 88.739... (not 0).
    one_tie = [Battle("A", "B", "a")] * 2 + [Battle("A", "B", "tie"), Battle("A", "B", "b")]
    fit = bradley_terry(one_tie, reg=0.0)
    assert fit["A"] - fit["B"] == pytest.approx(88.73949984654254, abs=1e-6)
    # 1 win, 2 ties, 1 loss: 2 of 4 each, difference 0.
    even = [Battle("A", "B", "a"), Battle("A", "B", "tie"), Battle("B", "A", "tie"), Battle("A", "B", "b")]
    assert bradley_terry(even, reg=0.0) == pytest.approx({"A": 1000.0, "B": 1000.0}, abs=1e-9)
    # "both_bad" counts as a tie; a weight of 3 counts as three battles; anchor pins a model at init.
    assert bradley_terry([Battle("A", "B", "a", 3.0), Battle("A", "B", "both_bad"), Battle("B", "A", "tie")],
                         reg=0.0, anchor="B") == pytest.approx({"A": 1000.0 + 400 * math.log10(4), "B": 1000.0})
    # Scale, base and init: base e, scale 1, init 0 gives natural-log strengths centred at 0.
    assert bradley_terry(three_one, reg=0.0, scale=1.0, base=math.e, init=0.0)["A"] == pytest.approx(
        math.log(3) / 2, abs=1e-9)


def test_invariant_to_side_and_order():
    battles = simulate(TRUE, 500, tie=0.2, seed=5)
    fit = bradley_terry(battles)
    swapped = [Battle(b.model_b, b.model_a, {"a": "b", "b": "a"}.get(b.winner, b.winner)) for b in battles]
    shuffled = battles[:]
    random.Random(0).shuffle(shuffled)
    as_dicts = [{"model_a": b.model_a, "model_b": b.model_b, "winner": b.winner} for b in shuffled]
    for other in (swapped, shuffled, as_dicts):
        assert bradley_terry(other) == pytest.approx(fit, abs=1e-8)
    assert bootstrap_ratings(battles, rounds=50) == bootstrap_ratings(battles, rounds=50)


def test_undefeated_and_disconnected_stay_finite():
    battles = [Battle("A", "B", "a")] * 5 + [Battle("B", "C", "a"), Battle("B", "C", "b"), Battle("B", "C", "a")]
    battles += [Battle("X", "Y", "a"), Battle("X", "Y", "b"), Battle("Y", "X", "a")]  # a separate group
    fit = bradley_terry(battles)
    assert all(math.isfinite(v) for v in fit.values())
    assert fit["A"] > fit["B"] + 1000 > fit["C"] + 1000
    # Each group is centred on its own by the L2 term, so the whole set is too.
    assert (fit["X"] + fit["Y"]) / 2 == pytest.approx(1000.0, abs=1e-6)
    assert fit["Y"] - fit["X"] == pytest.approx(400 * math.log10(2), abs=1e-2)  # Y won 2 of 3


@pytest.mark.parametrize("bad, match", [
    (Battle("A", "B", "c"), "winner 'c'"),
    (Battle("A", "A", "a"), "against itself"),
    (Battle("A", "B", "a", -1.0), "weight"),
    ({"model_a": "A", "model_b": "B", "winner": "draw"}, "winner 'draw'"),
])
def test_bad_battles_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        bradley_terry([Battle("A", "B", "a"), bad])
    with pytest.raises(ValueError, match=match):
        bootstrap_ratings([bad], rounds=2)


def test_other_errors():
    with pytest.raises(ValueError, match="no battles"):
        bradley_terry([])
    with pytest.raises(ValueError, match="anchor 'Z'"):
        bradley_terry([Battle("A", "B", "a")], anchor="Z")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        win_rate([1, 0, 2])
    with pytest.raises(ValueError, match="no outcomes"):
        win_rate([])


def test_leaderboard_rows():
    boot = bootstrap_ratings(simulate(TRUE, 3000, seed=7), rounds=100)
    rows = leaderboard_rows(boot)
    assert [r["model"] for r in rows] == ["m0", "m1", "m2", "m3", "m4"]
    assert [r["rating"] for r in rows] == sorted((r["rating"] for r in rows), reverse=True)
    assert rows[0]["rank"] == 1
    for r in rows:  # Arena rank: 1 + models significantly better
        assert r["rank"] == 1 + sum(o["lower"] > r["upper"] for o in rows)
    assert rows[-1]["rank"] > 1
    assert json.loads(json.dumps(rows)) == rows
    assert set(rows[0]) == {"rank", "model", "rating", "lower", "upper", "battles"}


def test_win_rate_point_and_interval():
    r = win_rate([1] * 6 + [0.5] * 2 + [0] * 2)
    assert r["win_rate"] == pytest.approx(0.7) and r["n"] == 10
    # Wilson at p=0.7, n=10, z=1.95996: centre (0.7 + z^2/20) / (1 + z^2/10), computed by hand here.
    z = 1.959963984540054
    centre = (0.7 + z * z / 20) / (1 + z * z / 10)
    half = z / (1 + z * z / 10) * math.sqrt(0.21 / 10 + z * z / 400)
    assert (r["lower"], r["upper"]) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert r["lower"] < r["win_rate"] < r["upper"]
    widths = [(w["upper"] - w["lower"]) for w in (win_rate([1, 0] * k) for k in (10, 100, 1000))]
    assert widths[0] > widths[1] > widths[2] > 0
    assert widths[1] / widths[2] == pytest.approx(math.sqrt(10), rel=0.02)
    allwin = win_rate([1] * 20)  # does not collapse at the edge
    assert allwin["upper"] == 1.0 and 0.8 < allwin["lower"] < 0.9


@pytest.mark.parametrize("probs", [(0.6, 0.0, 0.4), (0.5, 0.1, 0.4)])  # (new wins, tie, old wins)
def test_win_rate_coverage(probs):
    rng = np.random.default_rng(11)
    truth = probs[0] + probs[1] / 2
    hits = 0
    for _ in range(400):
        outcomes = rng.choice([1.0, 0.5, 0.0], size=100, p=probs)
        r = win_rate(outcomes)
        hits += r["lower"] <= truth <= r["upper"]
    assert 0.9 <= hits / 400 <= 0.99
