"""Golden values, edge cases and simulations for alignkit.eval.metrics.

Expected values are derived by hand in each test's docstring; the simulations (length-controlled
win rate, bootstrap coverage) use fixed seeds and are vectorised to stay fast.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignkit.eval.metrics import (
    Divergence,
    LCWinRate,
    WinRate,
    binary_scores,
    bootstrap_ci,
    bootstrap_ci_paired,
    combine_swapped,
    distinct_n,
    lc_win_rate,
    mean_entropy,
    pearson,
    position_bias,
    proxy_gold_divergence,
    self_bleu,
    sequence_kl,
    spearman,
    win_rate,
)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------ 1. pairwise with swaps


def test_combine_swapped_golden_and_bias_cancels():
    """(v_ab + 1 - v_ba)/2: (0.9 + 0.7)/2 = 0.8. A judge that always says "first" (1, 1) or
    always "second" (0, 0) gives 0.5. An order-consistent judge (v_ba = 1 - v_ab) returns v_ab.
    A judge with a constant +0.1 pull to the first slot and true opinion q = 0.7:
    v_ab = 0.8, v_ba = 0.3 + 0.1 = 0.4 -> (0.8 + 0.6)/2 = 0.7 = q."""
    assert combine_swapped(0.9, 0.3) == pytest.approx(0.8)
    assert combine_swapped(1.0, 1.0) == 0.5
    assert combine_swapped(0.0, 0.0) == 0.5
    assert combine_swapped(0.65, 0.35) == pytest.approx(0.65)
    assert combine_swapped(0.8, 0.4) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="v_ab"):
        combine_swapped(1.2, 0.5)
    with pytest.raises(ValueError, match="v_ba"):
        combine_swapped(0.5, float("nan"))


def test_win_rate_golden_ties_half():
    """prefs [1, 0.5, 0, 1]: 2 wins, 1 tie, 1 loss; mean = (2 + 0.5)/4 = 0.625 (tie = half a
    win). Soft prefs [0.75, 0.25, 0.5 + 1e-12]: mean (0.75 + 0.25 + 0.5)/3 = 0.5, 1 win,
    1 loss and 1 tie (within tolerance)."""
    assert win_rate([1, 0.5, 0, 1]) == WinRate(0.625, 2, 1, 1, 4)
    wr = win_rate([0.75, 0.25, 0.5 + 1e-12])
    assert wr.mean == pytest.approx(0.5)
    assert (wr.wins, wr.ties, wr.losses, wr.n) == (1, 1, 1, 3)
    prefs = [combine_swapped(a, b) for a, b in [(1, 0), (1, 1), (0, 1), (1, 0)]]  # 1, .5, 0, 1
    assert win_rate(prefs) == WinRate(0.625, 2, 1, 1, 4)
    with pytest.raises(ValueError, match="win_rate: prefs is empty"):
        win_rate([])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        win_rate([0.5, 1.5])


def test_position_bias():
    """v_ab = [1, 0.5], v_ba = [1, 0]: first slot wins (1 + 0.5 + 1 + 0)/4 = 0.625. A consistent
    judge (v_ba = 1 - v_ab) scores 0.5; an always-first judge 1."""
    assert position_bias([1, 0.5], [1, 0]) == pytest.approx(0.625)
    assert position_bias([0.9, 0.2, 0.6], [0.1, 0.8, 0.4]) == pytest.approx(0.5)
    assert position_bias([1, 1], [1, 1]) == 1.0
    with pytest.raises(ValueError, match="empty"):
        position_bias([], [])
    with pytest.raises(ValueError, match="same length"):
        position_bias([1, 0], [1])


# ------------------------------------------------------------------ 2. length-controlled


def test_lc_win_rate_exact_fit_golden():
    """With l2 = 0, d = [-1, 1] (population std 1, so z = d) and y = [sig(0.5 - 1), sig(0.5 + 1)],
    the logistic model fits exactly at a = 0.5, b = 1: value sig(0.5) = 0.622459, slope 1,
    raw = (sig(-0.5) + sig(1.5))/2 = 0.597558."""
    out = lc_win_rate([sig(-0.5), sig(1.5)], [-1, 1], l2=0.0)
    assert isinstance(out, LCWinRate)
    assert out.value == pytest.approx(sig(0.5), abs=1e-9)
    assert out.slope == pytest.approx(1.0, abs=1e-8)
    assert out.raw == pytest.approx((sig(-0.5) + sig(1.5)) / 2)
    # scaling d does not change anything (z is standardised)
    assert lc_win_rate([sig(-0.5), sig(1.5)], [-40, 40], l2=0.0).value == pytest.approx(sig(0.5), abs=1e-9)


def test_lc_win_rate_constant_length_gap_equals_raw():
    """Constant d: length cannot be separated from the intercept, z = 0, so the fit is the
    intercept-only one, sigmoid(a) = mean(y) = 3/4; the slope is 0."""
    out = lc_win_rate([1, 0, 1, 1], [5, 5, 5, 5])
    assert out.value == pytest.approx(0.75, abs=1e-9)
    assert out.slope == pytest.approx(0.0, abs=1e-12)
    assert out.raw == 0.75


def test_lc_win_rate_length_only_preference_is_half():
    """Preference depends only on length: P(win) = sig(d/50) with d ~ N(100, 50^2) tokens, so at
    d = 0 the judge is indifferent (LC = 0.5), yet the raw win rate is E[sig(N(2, 1))] ~ 0.85.
    Both soft labels (the probabilities themselves) and hard Bernoulli labels."""
    rng = np.random.default_rng(0)
    d = rng.normal(100.0, 50.0, size=4000)
    p = 1.0 / (1.0 + np.exp(-d / 50.0))
    soft = lc_win_rate(p, d)
    assert soft.raw > 0.8
    assert abs(soft.value - 0.5) < 0.01
    assert soft.slope > 0.5
    hard = lc_win_rate(rng.binomial(1, p).astype(float), d)
    assert hard.raw > 0.8
    assert abs(hard.value - 0.5) < 0.05


def test_lc_win_rate_recovers_true_intercept():
    """True model sig(1 + 0.8 z) with z = d/std(d), d ~ N(0, 30^2): LC ~ sig(1) = 0.731 (hard
    labels, n = 4000, sampling error of the intercept ~0.04 on the logit scale)."""
    rng = np.random.default_rng(1)
    d = rng.normal(0.0, 30.0, size=4000)
    z = d / d.std()
    y = rng.binomial(1, 1.0 / (1.0 + np.exp(-(1.0 + 0.8 * z)))).astype(float)
    out = lc_win_rate(y, d)
    assert abs(out.value - sig(1.0)) < 0.03
    assert abs(out.slope - 0.8) < 0.15


def test_lc_win_rate_edge_cases():
    """All wins (separable labels): the intercept runs off to +inf with bounded steps; the value
    is ~1 and finite. Empty and mismatched inputs raise."""
    out = lc_win_rate([1, 1, 1, 1], [1, 2, 3, -1])
    assert 0.999 < out.value <= 1.0 and math.isfinite(out.slope)
    with pytest.raises(ValueError, match="lc_win_rate: prefs is empty"):
        lc_win_rate([], [])
    with pytest.raises(ValueError, match="same length"):
        lc_win_rate([1, 0], [1])


# ------------------------------------------------------------------ 3. bootstrap


def test_bootstrap_golden():
    """Constant values: every resample has mean c -> (c, c). values [0, 1]: resampled mean is
    0, 0.5, 1 with prob 1/4, 1/2, 1/4, so the 2.5% / 97.5% quantiles of 2000 draws are 0 and 1.
    One value: (v, v). Deterministic for a seed."""
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert bootstrap_ci([0, 1]) == (0.0, 1.0)
    assert bootstrap_ci([3.5]) == (3.5, 3.5)
    x = np.arange(20.0)
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    lo, hi = bootstrap_ci(x, stat=np.median, n_boot=500)
    assert lo <= 9.5 <= hi
    # a stat without an `axis` keyword works through the per-resample fallback
    lo2, hi2 = bootstrap_ci(x, stat=lambda v: float(np.mean(v)), n_boot=500)
    assert (lo2, hi2) == pytest.approx(bootstrap_ci(x, n_boot=500))


def test_bootstrap_errors():
    with pytest.raises(ValueError, match="bootstrap_ci: values is empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1, 2], level=1.0)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci([1, 2], n_boot=0)
    with pytest.raises(ValueError, match="bootstrap_ci_paired: a is empty"):
        bootstrap_ci_paired([], [])
    with pytest.raises(ValueError, match="same length"):
        bootstrap_ci_paired([1, 2], [1])


def test_bootstrap_coverage_bernoulli():
    """300 data sets of n = 100 Bernoulli(0.3); the 95% percentile interval of the mean should
    contain 0.3 in about 95% of them. The Monte-Carlo standard error of the coverage is
    sqrt(0.95*0.05/300) ~ 0.013, so [0.91, 0.98] is roughly +-3 SE."""
    rng = np.random.default_rng(123)
    data = rng.binomial(1, 0.3, size=(300, 100)).astype(float)
    hits = 0
    for rep, x in enumerate(data):
        lo, hi = bootstrap_ci(x, n_boot=1000, seed=rep)
        hits += lo <= 0.3 <= hi
    assert 0.91 <= hits / 300 <= 0.98


def test_bootstrap_paired():
    """b = a + 1: every paired resample gives stat(b) - stat(a) = 1 -> (1, 1). With a shared
    per-prompt effect (b = a + 0.1 + small noise, a widely spread) the paired interval is much
    narrower than the unpaired interval of the same difference and covers 0.1."""
    assert bootstrap_ci_paired([1, 2, 5], [2, 3, 6]) == pytest.approx((1.0, 1.0))
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, size=200)
    b = a + 0.1 + rng.normal(0.0, 0.05, size=200)
    lo, hi = bootstrap_ci_paired(a, b)
    assert lo < 0.1 < hi and hi - lo < 0.05
    # for the mean, paired == bootstrap of the differences (same indices, same seed)
    assert (lo, hi) == pytest.approx(bootstrap_ci(b - a))
    ua, ub = bootstrap_ci(a, seed=1), bootstrap_ci(b, seed=2)
    assert (ub[1] - ub[0]) + (ua[1] - ua[0]) > 5 * (hi - lo)


# ------------------------------------------------------------------ 4. diversity


def test_distinct_n_golden():
    """["a b a b", "a b c"]: n=1: 7 tokens, distinct {a, b, c} -> 3/7. n=2: ab, ba, ab | ab, bc
    (no bigram across texts) = 5, distinct 3 -> 3/5. n=4: only "a b a b" -> 1/1. n=5: none -> 0."""
    texts = ["a b a b", "a b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert distinct_n(texts, 4) == 1.0
    assert distinct_n(texts, 5) == 0.0
    assert distinct_n(["x y", "x y", "x y"], 2) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="distinct_n: texts is empty"):
        distinct_n([], 1)
    with pytest.raises(ValueError, match="n must be"):
        distinct_n(texts, 0)


def test_self_bleu_golden_bigram():
    """n_max = 2, ["the cat sat", "the cat ran"]: p1 = 2/3, p2 = (1+1)/(2+1) = 2/3, BP = 1,
    BLEU = sqrt(4/9) = 2/3 for each text -> 2/3."""
    assert self_bleu(["the cat sat", "the cat ran"], n_max=2) == pytest.approx(2 / 3)


def test_self_bleu_golden_brevity():
    """n_max = 4, ["a b c d", "a b c"]. Text 0 vs ref "a b c" (c=4 > r=3, BP=1): p1 = 3/4,
    p2 = (2+1)/(3+1), p3 = (1+1)/(2+1), p4 = (0+1)/(1+1) -> (3/4 * 3/4 * 2/3 * 1/2)^(1/4) =
    (3/16)^(1/4). Text 1 vs ref "a b c d": p1..p3 = 1, p4 = (0+1)/(0+1) = 1, BP = exp(1 - 4/3).
    Mean = ((3/16)^(1/4) + exp(-1/3))/2 = 0.687284."""
    want = ((3 / 16) ** 0.25 + math.exp(-1 / 3)) / 2
    assert self_bleu(["a b c d", "a b c"]) == pytest.approx(want)
    assert want == pytest.approx(0.687284, abs=1e-6)


def test_self_bleu_multi_reference_clipping():
    """["a a a", "a", "a a"], n_max = 1 (unigram precision times BP only).
    Text 0 (c=3): max ref count of "a" is 2 -> p1 = 2/3; refs lengths 1, 2, closest 2 < 3 -> BP 1.
    Text 1 (c=1): p1 = 1; refs lengths 3, 2, closest 2 -> BP = exp(1 - 2) = e^-1.
    Text 2 (c=2): p1 = 1; refs lengths 3, 1, both at distance 1, tie -> shorter 1 -> BP 1.
    Mean = (2/3 + e^-1 + 1)/3."""
    want = (2 / 3 + math.exp(-1) + 1) / 3
    assert self_bleu(["a a a", "a", "a a"], n_max=1) == pytest.approx(want)


def test_self_bleu_extremes_and_errors():
    """Identical texts -> exactly 1 (also shorter than n_max); disjoint vocabularies -> 0 (the
    unigram precision is not smoothed); an empty text scores 0; one text has no references."""
    assert self_bleu(["the same answer here"] * 3) == 1.0
    assert self_bleu(["ok", "ok"]) == 1.0
    assert self_bleu(["a b c d e", "f g h i j", "k l m n o"]) == 0.0
    assert self_bleu(["", "a b"]) == 0.0
    with pytest.raises(ValueError, match="at least 2 texts"):
        self_bleu(["only one"])
    with pytest.raises(ValueError, match="self_bleu: texts is empty"):
        self_bleu([])
    with pytest.raises(ValueError, match="not one string"):
        self_bleu("a b c")


def test_mean_entropy_golden():
    """[[log .5, log .5], [log .25]]: per text log 2 and log 4 nats/token; mean 1.5 log 2."""
    lp = [[math.log(0.5), math.log(0.5)], [math.log(0.25)]]
    assert mean_entropy(lp) == pytest.approx(1.5 * math.log(2))
    assert mean_entropy(np.zeros((3, 4))) == 0.0  # deterministic policy
    with pytest.raises(ValueError, match="mean_entropy: token_logps_per_text is empty"):
        mean_entropy([])
    with pytest.raises(ValueError, match="text 1 has no tokens"):
        mean_entropy([[-1.0], []])
    with pytest.raises(ValueError, match="> 0"):
        mean_entropy([[0.5]])


# ------------------------------------------------------------------ 5. reward hacking


def test_pearson_spearman_golden():
    """x = [1, 2, 3], y = [1, 3, 2]: cross sum 1, squared sums 2, 2 -> r = 0.5 (no ties, so
    Spearman is the same). Ties: x = [1, 2, 2, 3] ranks (1, 2.5, 2.5, 4), y ranks (1, 2, 3, 4):
    cross 4.5, squared 4.5 and 5 -> sqrt(0.9). Monotone transform: spearman(x, exp(x)) = 1."""
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9))
    x = np.array([0.1, 2.0, -1.0, 3.0, 0.5])
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert pearson(x, -2 * x + 1) == pytest.approx(-1.0)
    assert spearman([3, 3, 1], [1, 2, 0]) == pytest.approx(pearson([2.5, 2.5, 1], [2, 3, 1]))


def test_correlation_edge_cases():
    """Constant input: undefined -> NaN. Fewer than 2 points, empty or mismatched -> ValueError."""
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1, 2, 3], [4, 4, 4]))
    with pytest.raises(ValueError, match="pearson: x is empty"):
        pearson([], [])
    with pytest.raises(ValueError, match="at least 2"):
        spearman([1], [2])
    with pytest.raises(ValueError, match="same length"):
        pearson([1, 2], [1, 2, 3])


def test_proxy_gold_divergence():
    """Proxy 1.0 -> 1.5 (+0.5) while gold 0.60 -> 0.55 (-0.05): flagged. Both rising: not.
    Per-prompt sequences use their means: proxy [0, 1] -> [1, 1] (+0.5), gold [1, 1] -> [0, 1]
    (-0.5): flagged. tol = 0.1 ignores the -0.05 gold drop."""
    out = proxy_gold_divergence(1.0, 1.5, 0.60, 0.55)
    assert isinstance(out, Divergence)
    assert out.proxy_delta == pytest.approx(0.5) and out.gold_delta == pytest.approx(-0.05) and out.flagged
    assert not proxy_gold_divergence(1.0, 1.5, 0.5, 0.6).flagged
    assert not proxy_gold_divergence(1.0, 0.9, 0.6, 0.5).flagged
    assert not proxy_gold_divergence(1.0, 1.0, 0.6, 0.5).flagged  # proxy flat
    assert proxy_gold_divergence([0, 1], [1, 1], [1, 1], [0, 1]) == Divergence(0.5, -0.5, True)
    assert not proxy_gold_divergence(1.0, 1.5, 0.60, 0.55, tol=0.1).flagged
    with pytest.raises(ValueError, match="gold_after is empty"):
        proxy_gold_divergence(1.0, 1.5, 0.6, [])


# ------------------------------------------------------------------ 6. KL


def test_sequence_kl_golden():
    """policy [[-1, -2], [-0.5]], ref [[-1.5, -1.5], [-1]]: s = (0.5 - 0.5, 0.5) = (0, 0.5);
    mean 0.25; std (ddof 1) = sqrt(2 * 0.25^2) = sqrt(0.125); stderr = sqrt(0.125/2) = 0.25."""
    out = sequence_kl([[-1, -2], [-0.5]], [[-1.5, -1.5], [-1]])
    assert out.mean == pytest.approx(0.25) and out.stderr == pytest.approx(0.25) and out.n == 2
    one = sequence_kl([[-1.0, -1.0]], [[-2.0, -2.0]])
    assert one.mean == 2.0 and math.isnan(one.stderr)


def test_sequence_kl_unbiased_on_categorical():
    """One-token sequences drawn from pi = (0.7, 0.2, 0.1), ref uniform: the exact KL is
    sum pi log(3 pi) = 0.297...; the sample mean lies within 4 standard errors of it."""
    pi = np.array([0.7, 0.2, 0.1])
    kl = float((pi * np.log(pi * 3)).sum())
    y = np.random.default_rng(0).choice(3, size=5000, p=pi)
    out = sequence_kl(np.log(pi[y])[:, None], np.full((5000, 1), math.log(1 / 3)))
    assert abs(out.mean - kl) < 4 * out.stderr


def test_sequence_kl_errors():
    with pytest.raises(ValueError, match="sequence_kl: no sequences"):
        sequence_kl([], [])
    with pytest.raises(ValueError, match="reference sequences"):
        sequence_kl([[-1.0]], [[-1.0], [-2.0]])
    with pytest.raises(ValueError, match="sequence 0 has 2 policy and 1 reference"):
        sequence_kl([[-1.0, -1.0]], [[-1.0]])


# ------------------------------------------------------------------ 7. binary scores


def test_binary_scores_golden():
    """pred [T, T, F, F, T], gold [T, F, F, T, T]: tp 2, fp 1, fn 1, tn 1 -> accuracy 3/5,
    precision 2/3, recall 2/3, f1 = 2*2/(4 + 1 + 1) = 2/3. No predicted positives: precision and
    f1 are 0 (zero denominators), recall 0/1 = 0, accuracy 1/2."""
    T, F = True, False
    out = binary_scores([T, T, F, F, T], [T, F, F, T, T])
    assert out == pytest.approx({"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "n": 5})
    assert isinstance(out["n"], int)
    none = binary_scores([F, F], [T, F])
    assert none == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "n": 2}
    assert binary_scores([1, 0, 1], [1, 0, 1])["f1"] == 1.0
    with pytest.raises(ValueError, match="binary_scores: pred is empty"):
        binary_scores([], [])
    with pytest.raises(ValueError, match="same length"):
        binary_scores([T], [T, F])
    with pytest.raises(ValueError, match="booleans"):
        binary_scores([2], [True])
