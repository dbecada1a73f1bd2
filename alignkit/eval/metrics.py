"""Evaluation metrics for comparing a model with its reference: pure functions of numbers and
strings (numpy and plain Python; no models, no torch).

Sections:

1. pairwise judging with order swaps (:func:`combine_swapped`, :func:`win_rate`,
   :func:`position_bias`);
2. length-controlled win rate (:func:`lc_win_rate`);
3. percentile-bootstrap confidence intervals over prompts (:func:`bootstrap_ci`,
   :func:`bootstrap_ci_paired`);
4. diversity / mode collapse (:func:`distinct_n`, :func:`self_bleu`, :func:`mean_entropy`);
5. reward-hacking probes (:func:`pearson`, :func:`spearman`, :func:`proxy_gold_divergence`);
6. KL to the reference from samples (:func:`sequence_kl`);
7. binary (e.g. refusal) classification scores (:func:`binary_scores`).

Every function raises :class:`ValueError` with a message naming the function on empty input.
Texts are tokenised on whitespace (``str.split``) wherever n-grams are counted.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "Divergence",
    "LCWinRate",
    "SequenceKL",
    "Verdict",
    "WinRate",
    "binary_scores",
    "bootstrap_ci",
    "bootstrap_ci_paired",
    "combine_swapped",
    "distinct_n",
    "lc_win_rate",
    "mean_entropy",
    "pearson",
    "position_bias",
    "proxy_gold_divergence",
    "self_bleu",
    "sequence_kl",
    "spearman",
    "win_rate",
]

#: A judge's verdict on one ordered pair: the probability (or score) in [0, 1] that the answer
#: shown FIRST is the better one (1 = first better, 0 = second better, 0.5 = tie).
Verdict = float

_TIE_TOL = 1e-9


# --------------------------------------------------------------------------------------------
# input helpers
# --------------------------------------------------------------------------------------------


def _as_1d(values, name: str, fn: str) -> np.ndarray:
    """``values`` as a non-empty float64 vector without NaN; ValueError otherwise."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{fn}: {name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{fn}: {name} is empty")
    if np.isnan(arr).any():
        raise ValueError(f"{fn}: {name} contains NaN")
    return arr


def _check_unit(arr: np.ndarray, name: str, fn: str) -> None:
    if ((arr < 0.0) | (arr > 1.0)).any():
        raise ValueError(f"{fn}: {name} must lie in [0, 1], got min {arr.min():g}, max {arr.max():g}")


def _same_length(a: np.ndarray, b: np.ndarray, names: str, fn: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{fn}: {names} must have the same length, got {a.size} and {b.size}")


def _sigmoid(x):
    """``1 / (1 + exp(-x))`` written as ``(1 + tanh(x/2)) / 2``: no overflow for any x."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


# --------------------------------------------------------------------------------------------
# 1. pairwise win rate with order swaps
# --------------------------------------------------------------------------------------------


def combine_swapped(v_ab: Verdict, v_ba: Verdict) -> float:
    """The model's preference on one prompt from a judge asked in both orders.

    ``v_ab``: verdict with the MODEL's answer shown first (A) and the reference second (B);
    ``v_ba``: verdict with the order swapped (reference first). In the swapped call the model
    wins with probability ``1 - v_ba``, so the order-averaged preference is
    ``pref = (v_ab + (1 - v_ba)) / 2``.

    Position bias cancels: write each verdict as ``v = q + b`` with ``q`` the judge's
    order-free opinion of the first answer and ``b`` a constant pull towards the first slot;
    then ``v_ab = q + b`` and ``v_ba = (1 - q) + b`` and ``pref = (q + b + q - b)/2 = q``.
    A judge that always answers "first" (``v_ab = v_ba = 1``) gives ``(1 + 0)/2 = 0.5``.

    Golden: ``v_ab = 0.9``, ``v_ba = 0.3`` -> ``(0.9 + 0.7)/2 = 0.8``.
    """
    a, b = float(v_ab), float(v_ba)
    for name, v in (("v_ab", a), ("v_ba", b)):
        if not 0.0 <= v <= 1.0:  # also rejects NaN
            raise ValueError(f"combine_swapped: {name} must lie in [0, 1], got {v!r}")
    return (a + (1.0 - b)) / 2.0


class WinRate(NamedTuple):
    """``mean``: mean per-prompt preference in [0, 1] (a tie counts as half a win); ``wins``,
    ``ties``, ``losses``: prompts with preference above, equal to (within 1e-9) and below 0.5;
    ``n``: prompts."""

    mean: float
    wins: int
    ties: int
    losses: int
    n: int


def win_rate(prefs: Sequence[float]) -> WinRate:
    """Win rate of the model over the reference from per-prompt preferences in [0, 1] (usually
    :func:`combine_swapped` outputs).

    ``mean = (1/n) sum_i pref_i``. Ties count as HALF a win: a tied prompt has ``pref = 0.5``
    and contributes 0.5 to the sum, so for hard verdicts (preferences in {0, 0.5, 1})
    ``mean = (wins + ties/2) / n``. Soft preferences enter the mean as they are; the counts
    classify each prompt by the side of 0.5 its preference falls on (``|pref - 0.5| <= 1e-9``
    is a tie), so a swapped pair of verdicts that disagree (e.g. ``v_ab = v_ba = 1``) is a tie.

    Golden: ``prefs = [1, 0.5, 0, 1]`` -> ``mean = (2 + 0.5)/4 = 0.625``, 2 wins, 1 tie,
    1 loss, n = 4.
    """
    p = _as_1d(prefs, "prefs", "win_rate")
    _check_unit(p, "prefs", "win_rate")
    tie = np.abs(p - 0.5) <= _TIE_TOL
    wins = int(((p > 0.5) & ~tie).sum())
    losses = int(((p < 0.5) & ~tie).sum())
    return WinRate(float(p.mean()), wins, int(tie.sum()), losses, int(p.size))


def position_bias(v_ab: Sequence[Verdict], v_ba: Sequence[Verdict]) -> float:
    """How often the FIRST position wins, over all ``2n`` judge calls:
    ``(1/(2n)) sum_i (v_ab_i + v_ba_i)``.

    An order-consistent judge has ``v_ba_i = 1 - v_ab_i`` and scores exactly 0.5; a judge that
    always picks the first answer scores 1, one that always picks the second scores 0. Report it
    next to :func:`win_rate`; the swapped preference of :func:`combine_swapped` already removes a
    constant bias.

    Golden: ``v_ab = [1, 0.5]``, ``v_ba = [1, 0]`` -> ``(1 + 0.5 + 1 + 0)/4 = 0.625``.
    """
    a = _as_1d(v_ab, "v_ab", "position_bias")
    b = _as_1d(v_ba, "v_ba", "position_bias")
    _same_length(a, b, "v_ab and v_ba", "position_bias")
    _check_unit(a, "v_ab", "position_bias")
    _check_unit(b, "v_ba", "position_bias")
    return float((a.sum() + b.sum()) / (2 * a.size))


# --------------------------------------------------------------------------------------------
# 2. length-controlled win rate
# --------------------------------------------------------------------------------------------


class LCWinRate(NamedTuple):
    """``value``: length-controlled win rate, ``sigmoid(intercept)``; ``slope``: fitted log-odds
    change per standard deviation of the length difference (> 0: longer answers are preferred);
    ``raw``: the plain mean preference."""

    value: float
    slope: float
    raw: float


def lc_win_rate(
    prefs: Sequence[float],
    len_diff: Sequence[float],
    *,
    l2: float = 1e-3,
    n_iter: int = 50,
    tol: float = 1e-10,
) -> LCWinRate:
    """Length-controlled win rate in the spirit of AlpacaEval 2 (Dubois et al. 2404.04475): the
    win rate the judge would give if the model's answers were as long as the reference's.

    Model: ``P(model preferred | z) = sigmoid(a + b*z)`` with ``z_i = d_i / std(d)``, ``d_i`` the
    length difference (model minus reference, tokens or characters) and ``std`` the population
    standard deviation. ``z`` is SCALED but not centred, so ``z = 0`` still means "equal
    lengths" and the LC win rate is ``sigmoid(a)``. The per-prompt preferences ``y_i`` in
    [0, 1] are soft labels of the penalised mean cross-entropy

        ``L(a, b) = (1/n) sum_i [softplus(a + b z_i) - y_i (a + b z_i)] + (l2/2) b^2``

    (only the slope is penalised, which keeps the fit finite when length separates the
    labels). ``L`` is convex; it is minimised by Newton's method (IRLS): with ``X = [1, z]``,
    ``p = sigmoid(X theta)``, ``W = diag(p(1-p))``, the gradient is
    ``X^T (p - y)/n + (0, l2 b)`` and the Hessian ``X^T W X / n + diag(0, l2)``; at most
    ``n_iter`` steps, stopping when the largest step is below ``tol``. If ``d`` is constant the
    length effect cannot be separated from the intercept: ``z = 0`` and the LC value equals the
    raw one.

    Simplifications against AlpacaEval 2: no ``tanh`` squashing of the length term and no
    per-instruction difficulty term; one model against one reference.

    Golden (``l2 = 0``): ``d = [-1, 1]`` (std 1, so ``z = d``), ``y = [sigmoid(-0.5),
    sigmoid(1.5)] = [0.377541, 0.817574]`` is fitted exactly by ``a = 0.5``, ``b = 1``:
    ``value = sigmoid(0.5) = 0.622459``, ``slope = 1``, ``raw = 0.597558``.
    """
    y = _as_1d(prefs, "prefs", "lc_win_rate")
    d = _as_1d(len_diff, "len_diff", "lc_win_rate")
    _same_length(y, d, "prefs and len_diff", "lc_win_rate")
    _check_unit(y, "prefs", "lc_win_rate")
    if l2 < 0:
        raise ValueError(f"lc_win_rate: l2 must be >= 0, got {l2}")
    scale = float(d.std())
    z = d / scale if scale > 0 else np.zeros_like(d)
    X = np.stack([np.ones_like(z), z], axis=1)
    n = y.size
    raw = float(y.mean())
    m = min(max(raw, 1e-6), 1.0 - 1e-6)
    theta = np.array([math.log(m / (1.0 - m)), 0.0])
    penalty = np.diag([0.0, l2])
    for _ in range(n_iter):
        p = _sigmoid(X @ theta)
        grad = X.T @ (p - y) / n + penalty @ theta
        hess = (X * (p * (1.0 - p))[:, None]).T @ X / n + penalty + 1e-12 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        big = np.abs(step).max()
        if big > 10.0:  # near-separable data: bounded steps, the objective still decreases
            step *= 10.0 / big
        theta = theta - step
        if big < tol:
            break
    return LCWinRate(float(_sigmoid(theta[0])), float(theta[1]), raw)


# --------------------------------------------------------------------------------------------
# 3. bootstrap confidence intervals
# --------------------------------------------------------------------------------------------

_BOOT_CHUNK = 2_000_000  # resampled values held in memory at once


def _check_boot_args(n_boot: int, level: float, fn: str) -> None:
    if n_boot < 1:
        raise ValueError(f"{fn}: n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"{fn}: level must lie in (0, 1), got {level}")


def _apply_stat(stat: Callable, samples: np.ndarray) -> np.ndarray:
    """``stat`` of every row of ``samples`` [R, n]; one vectorised call when ``stat`` takes an
    ``axis`` keyword (``np.mean``, ``np.median``, ...), a Python loop otherwise."""
    try:
        out = np.asarray(stat(samples, axis=1), dtype=np.float64)
        if out.shape == (samples.shape[0],):
            return out
    except TypeError:
        pass
    return np.array([float(stat(row)) for row in samples])


def _bootstrap(arrays: list[np.ndarray], stat: Callable, n_boot: int, seed: int) -> list[np.ndarray]:
    """Statistic of each array over ``n_boot`` resamples of the prompt indices, the SAME indices
    for all arrays (pairing)."""
    n = arrays[0].size
    rng = np.random.default_rng(seed)
    rows = max(1, _BOOT_CHUNK // n)
    outs: list[list[np.ndarray]] = [[] for _ in arrays]
    done = 0
    while done < n_boot:
        r = min(rows, n_boot - done)
        idx = rng.integers(0, n, size=(r, n))
        for k, arr in enumerate(arrays):
            outs[k].append(_apply_stat(stat, arr[idx]))
        done += r
    return [np.concatenate(o) for o in outs]


def _percentile_interval(boot: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(boot, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def bootstrap_ci(
    values: Sequence[float],
    stat: Callable = np.mean,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval (Efron 1979; Efron & Tibshirani 1993, ch. 13) for
    ``stat(values)``, resampling prompts with replacement.

    Draw ``n_boot`` index vectors ``I_r`` of length n uniformly with replacement, compute
    ``t_r = stat(values[I_r])`` and return the empirical ``(1 - level)/2`` and
    ``(1 + level)/2`` quantiles of ``t_1..t_R`` (linear interpolation). Deterministic given
    ``seed``. ``stat`` is called once on an [R, n] array with ``axis=1`` when it accepts that
    keyword, else once per resample.

    Golden: a constant vector gives ``(c, c)``. ``values = [0, 1]``: the resampled mean is
    0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so (with 2000 resamples) the 2.5% and 97.5%
    quantiles are 0 and 1 -> ``(0.0, 1.0)``.
    """
    x = _as_1d(values, "values", "bootstrap_ci")
    _check_boot_args(n_boot, level, "bootstrap_ci")
    (boot,) = _bootstrap([x], stat, n_boot, seed)
    return _percentile_interval(boot, level)


def bootstrap_ci_paired(
    a: Sequence[float],
    b: Sequence[float],
    stat: Callable = np.mean,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap interval for the CHANGE ``stat(b) - stat(a)`` between two
    measurements on the SAME prompts (``a`` before, ``b`` after; ``a[i]`` and ``b[i]`` belong to
    prompt i).

    Each resample draws one index vector ``I_r`` and uses it for both: ``t_r = stat(b[I_r]) -
    stat(a[I_r])``. Keeping the pairs together removes the between-prompt variance that the two
    measurements share, so the interval is narrower than one from independent resampling when
    ``a`` and ``b`` are positively correlated. For ``stat = np.mean`` this equals
    :func:`bootstrap_ci` of ``b - a``.

    Golden: ``b = a + 1`` for any ``a`` -> every ``t_r = 1`` -> ``(1.0, 1.0)``.
    """
    x = _as_1d(a, "a", "bootstrap_ci_paired")
    y = _as_1d(b, "b", "bootstrap_ci_paired")
    _same_length(x, y, "a and b", "bootstrap_ci_paired")
    _check_boot_args(n_boot, level, "bootstrap_ci_paired")
    ta, tb = _bootstrap([x, y], stat, n_boot, seed)
    return _percentile_interval(tb - ta, level)


# --------------------------------------------------------------------------------------------
# 4. diversity / mode collapse
# --------------------------------------------------------------------------------------------


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _check_texts(texts: Sequence[str], fn: str) -> list[str]:
    if isinstance(texts, str):
        raise ValueError(f"{fn}: texts must be a sequence of strings, not one string")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{fn}: texts is empty")
    return texts


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 1510.03055): the number of DIFFERENT n-grams divided by the total
    number of n-grams, both counted over all texts together (whitespace tokens; n-grams never
    cross text boundaries). 1 means no n-gram repeats; a collapsed model that repeats itself
    scores near 0. Texts shorter than n contribute nothing; if no text has n tokens the result
    is 0.0.

    Golden: ``["a b a b", "a b c"]``: n = 1: 7 tokens, 3 distinct (a, b, c) -> 3/7;
    n = 2: bigrams ``ab, ba, ab | ab, bc`` = 5, distinct {ab, ba, bc} = 3 -> 3/5.
    """
    texts = _check_texts(texts, "distinct_n")
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1, got {n}")
    total: Counter = Counter()
    for t in texts:
        total.update(_ngrams(t.split(), n))
    count = sum(total.values())
    return len(total) / count if count else 0.0


def _sentence_bleu(hyp: list[str], hyp_counts: list[Counter], refs_max: list[Counter],
                   ref_lens: list[int], n_max: int) -> float:
    c = len(hyp)
    if c == 0:
        return 0.0
    log_p = 0.0
    for k in range(n_max):
        counts = hyp_counts[k]
        total = sum(counts.values())
        matched = sum(min(v, refs_max[k][g]) for g, v in counts.items())
        if k == 0:
            if matched == 0:
                return 0.0
            log_p += math.log(matched / total)
        else:  # Lin & Och (2004) add-one smoothing for n >= 2
            log_p += math.log((matched + 1) / (total + 1))
    r = min(ref_lens, key=lambda L: (abs(L - c), L))  # closest reference length, ties -> shorter
    bp = 1.0 if c > r else math.exp(1.0 - r / c)
    return bp * math.exp(log_p / n_max)


def self_bleu(texts: Sequence[str], n_max: int = 4) -> float:
    """Self-BLEU (Zhu et al. 1802.01886): the mean over texts of the sentence BLEU of text i
    against ALL the other texts as references. High (-> 1) means the samples repeat one
    another (mode collapse); low means diverse samples.

    Sentence BLEU (Papineni et al. 2002) of a hypothesis h with references R, whitespace tokens:

    - clipped n-gram precision ``p_n = sum_g min(c_h(g), max_{r in R} c_r(g)) / sum_g c_h(g)``;
    - smoothing of Lin & Och (2004): for ``n >= 2`` add one to both the matched and the total
      count, ``p_n = (matched + 1)/(total + 1)`` (so an order with no n-grams at all gives 1);
      the unigram precision is left unsmoothed, so texts sharing no word score exactly 0;
    - ``BLEU = BP * exp((1/N) sum_{n=1..N} log p_n)``, ``N = n_max``, with brevity penalty
      ``BP = 1`` if ``c > r`` else ``exp(1 - r/c)``, ``c = |h|`` and ``r`` the reference length
      closest to ``c`` (ties to the shorter); an empty hypothesis scores 0.

    Identical texts score exactly 1 (every ``p_n`` is 1 and ``BP = 1``). Cost O(texts^2).
    Needs at least two texts (one text has no references).

    Golden (``n_max = 2``): ``["the cat sat", "the cat ran"]``. For text 0: unigrams the, cat,
    sat, 2 matched -> ``p1 = 2/3``; bigrams "the cat", "cat sat", 1 matched ->
    ``p2 = (1+1)/(2+1) = 2/3``; ``c = r = 3`` so ``BP = 1``; ``BLEU = sqrt(2/3 * 2/3) = 2/3``.
    Text 1 is symmetric, so self-BLEU = 2/3.

    Golden (``n_max = 4``, brevity): ``["a b c d", "a b c"]``. Text 0 (c = 4, r = 3, BP = 1):
    ``p1 = 3/4``, ``p2 = (2+1)/(3+1) = 3/4``, ``p3 = (1+1)/(2+1) = 2/3``,
    ``p4 = (0+1)/(1+1) = 1/2``, ``BLEU = (3/16)^(1/4) = 0.658037``. Text 1 (c = 3, r = 4):
    all matched, ``p1 = p2 = p3 = 1``, no 4-grams so ``p4 = 1/1``, ``BP = exp(1 - 4/3)``,
    ``BLEU = exp(-1/3) = 0.716531``. Self-BLEU = 0.687284.
    """
    texts = _check_texts(texts, "self_bleu")
    if len(texts) < 2:
        raise ValueError("self_bleu: needs at least 2 texts (each text is scored against the others)")
    if n_max < 1:
        raise ValueError(f"self_bleu: n_max must be >= 1, got {n_max}")
    toks = [t.split() for t in texts]
    counts = [[_ngrams(tk, k + 1) for k in range(n_max)] for tk in toks]
    scores = []
    for i, hyp in enumerate(toks):
        refs_max: list[Counter] = [Counter() for _ in range(n_max)]
        for j in range(len(toks)):
            if j != i:
                for k in range(n_max):
                    refs_max[k] |= counts[j][k]  # Counter union keeps the max count
        ref_lens = [len(toks[j]) for j in range(len(toks)) if j != i]
        scores.append(_sentence_bleu(hyp, counts[i], refs_max, ref_lens, n_max))
    return float(np.mean(scores))


def mean_entropy(token_logps_per_text: Sequence[Sequence[float]]) -> float:
    """Per-token entropy of the policy estimated from its own samples, in nats/token.

    For a text y sampled from pi, ``-log pi(y_t | y_<t)`` is an unbiased one-sample estimate of
    the entropy of the next-token distribution at step t (``E_y[-log pi(y)] = H(pi)``). Per text
    ``H_i = -(1/T_i) sum_t logp_{i,t}``; the result is the mean of ``H_i`` over texts (every
    prompt weighs the same, whatever its length). A falling value during training is a sign
    of mode collapse. The log-probs must be those of the sampled tokens under the sampling
    distribution (temperature included), each <= 0.

    Golden: ``[[log 0.5, log 0.5], [log 0.25]]`` -> ``(log 2 + log 4)/2 = 1.5 log 2 = 1.039721``.
    """
    seqs = list(token_logps_per_text)
    if not seqs:
        raise ValueError("mean_entropy: token_logps_per_text is empty")
    per_text = []
    for i, s in enumerate(seqs):
        lp = np.asarray(s, dtype=np.float64).reshape(-1)
        if lp.size == 0:
            raise ValueError(f"mean_entropy: text {i} has no tokens")
        if np.isnan(lp).any() or (lp > 1e-6).any():
            raise ValueError(f"mean_entropy: text {i} has log-probs that are NaN or > 0")
        per_text.append(-lp.mean())
    return float(np.mean(per_text))


# --------------------------------------------------------------------------------------------
# 5. reward-hacking probes
# --------------------------------------------------------------------------------------------


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation ``r = sum (x - mx)(y - my) / sqrt(sum (x - mx)^2 sum (y - my)^2)``,
    e.g. of reward against response length (a strong positive value on a proxy reward suggests
    it pays for length). Needs n >= 2; NaN when either input is constant (undefined).

    Golden: ``x = [1, 2, 3]``, ``y = [1, 3, 2]``: deviations ``(-1, 0, 1)`` and ``(-1, 1, 0)``,
    cross sum 1, squared sums 2 and 2 -> ``r = 1/2``.
    """
    a = _as_1d(x, "x", "pearson")
    b = _as_1d(y, "y", "pearson")
    _same_length(a, b, "x and y", "pearson")
    if a.size < 2:
        raise ValueError("pearson: needs at least 2 points")
    da, db = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(da @ da) * float(db @ db))
    if denom == 0.0:
        return float("nan")
    return float(np.clip(da @ db / denom, -1.0, 1.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of the ranks they span."""
    uniq, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])  # ranks before each distinct value
    return (start + (counts + 1) / 2.0)[inverse]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: :func:`pearson` of the ranks, tied values getting the average of
    the ranks they occupy (robust to monotone transforms of reward or length). NaN when either
    input is constant.

    Golden with ties: ``x = [1, 2, 2, 3]``, ``y = [1, 2, 3, 4]``: ranks ``(1, 2.5, 2.5, 4)`` and
    ``(1, 2, 3, 4)``, deviations ``(-1.5, 0, 0, 1.5)`` and ``(-1.5, -0.5, 0.5, 1.5)``, cross
    sum 4.5, squared sums 4.5 and 5 -> ``rho = sqrt(0.9) = 0.948683``.
    """
    a = _as_1d(x, "x", "spearman")
    b = _as_1d(y, "y", "spearman")
    _same_length(a, b, "x and y", "spearman")
    if a.size < 2:
        raise ValueError("spearman: needs at least 2 points")
    return pearson(_average_ranks(a), _average_ranks(b))


class Divergence(NamedTuple):
    """``proxy_delta`` and ``gold_delta``: after minus before; ``flagged``: the proxy rose while
    the gold fell (see :func:`proxy_gold_divergence`)."""

    proxy_delta: float
    gold_delta: float
    flagged: bool


def _mean_of(v, name: str) -> float:
    return float(_as_1d(v, name, "proxy_gold_divergence").mean())


def proxy_gold_divergence(proxy_before, proxy_after, gold_before, gold_after, *, tol: float = 0.0) -> Divergence:
    """Reward-hacking probe (Gao et al. 2210.10760): training against a proxy reward model that
    raises the proxy while a gold measure (a stronger judge, human labels, a verifier) falls.

    Each argument is a number or a sequence of per-prompt scores (its mean is used).
    ``proxy_delta = proxy_after - proxy_before``, ``gold_delta = gold_after - gold_before``.
    Rule: ``flagged = proxy_delta > tol and gold_delta < -tol`` (strictly; ``tol >= 0`` ignores
    changes within noise, e.g. a bootstrap half-width). Both rising, both falling, or the gold
    rising are not flagged.

    Golden: proxy 1.0 -> 1.5, gold 0.60 -> 0.55 -> ``(0.5, -0.05, True)``.
    """
    if tol < 0:
        raise ValueError(f"proxy_gold_divergence: tol must be >= 0, got {tol}")
    dp = _mean_of(proxy_after, "proxy_after") - _mean_of(proxy_before, "proxy_before")
    dg = _mean_of(gold_after, "gold_after") - _mean_of(gold_before, "gold_before")
    return Divergence(dp, dg, bool(dp > tol and dg < -tol))


# --------------------------------------------------------------------------------------------
# 6. KL to the reference
# --------------------------------------------------------------------------------------------


class SequenceKL(NamedTuple):
    """``mean``: estimated KL(pi || pi_ref) per sequence, in nats; ``stderr``: its standard error
    (NaN for one sequence); ``n``: sequences."""

    mean: float
    stderr: float
    n: int


def sequence_kl(
    logp_policy_per_token: Sequence[Sequence[float]], logp_ref_per_token: Sequence[Sequence[float]]
) -> SequenceKL:
    """Sequence-level KL(pi || pi_ref) from responses sampled from the policy pi.

    Per sequence ``s_i = sum_t (logp_pi(y_t|y_<t) - logp_ref(y_t|y_<t)) = log pi(y_i)/pi_ref(y_i)``
    (the k1 estimator of Schulman, "Approximating KL divergence", 2020, summed over tokens;
    see ``alignkit.losses.policy.kl_k1``). Since ``E_{y~pi}[log pi(y)/pi_ref(y)] =
    KL(pi||pi_ref)``, the mean is unbiased; single values can be negative. Returns
    ``mean = (1/n) sum_i s_i`` and ``stderr = std(s, ddof=1)/sqrt(n)``. Sequences may have
    different lengths (a ragged list, only the real response tokens).

    Golden: policy ``[[-1, -2], [-0.5]]``, ref ``[[-1.5, -1.5], [-1]]``: ``s = (0, 0.5)``,
    ``mean = 0.25``, ``std = sqrt(0.125)``, ``stderr = sqrt(0.125)/sqrt(2) = 0.25``.
    """
    pol, ref = list(logp_policy_per_token), list(logp_ref_per_token)
    if not pol:
        raise ValueError("sequence_kl: no sequences")
    if len(pol) != len(ref):
        raise ValueError(f"sequence_kl: {len(pol)} policy sequences but {len(ref)} reference sequences")
    sums = np.empty(len(pol))
    for i, (p, r) in enumerate(zip(pol, ref)):
        p_arr = np.asarray(p, dtype=np.float64).reshape(-1)
        r_arr = np.asarray(r, dtype=np.float64).reshape(-1)
        if p_arr.shape != r_arr.shape:
            raise ValueError(f"sequence_kl: sequence {i} has {p_arr.size} policy and {r_arr.size} reference tokens")
        sums[i] = (p_arr - r_arr).sum()
    n = sums.size
    stderr = float(sums.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return SequenceKL(float(sums.mean()), stderr, n)


# --------------------------------------------------------------------------------------------
# 7. binary classification scores
# --------------------------------------------------------------------------------------------


def _as_bools(v: Sequence[bool], name: str) -> np.ndarray:
    arr = np.asarray(list(v))
    if arr.size and not np.isin(arr, [0, 1]).all():
        raise ValueError(f"binary_scores: {name} must hold booleans (or 0/1)")
    return arr.astype(bool)


def binary_scores(pred: Sequence[bool], gold: Sequence[bool]) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of binary predictions (e.g. "refused?") with True as
    the positive class.

    With ``tp, fp, fn, tn`` the confusion counts: ``accuracy = (tp + tn)/n``,
    ``precision = tp/(tp + fp)``, ``recall = tp/(tp + fn)``,
    ``f1 = 2 precision recall / (precision + recall) = 2tp/(2tp + fp + fn)``. A ratio whose
    denominator is 0 (no predicted or no gold positives) is reported as 0.0; ``n`` is returned
    as an int.

    Golden: ``pred = [T, T, F, F, T]``, ``gold = [T, F, F, T, T]``: tp = 2, fp = 1, fn = 1,
    tn = 1 -> accuracy 3/5, precision 2/3, recall 2/3, f1 2/3, n 5.
    """
    p = _as_bools(pred, "pred")
    g = _as_bools(gold, "gold")
    if p.size == 0:
        raise ValueError("binary_scores: pred is empty")
    if p.shape != g.shape:
        raise ValueError(f"binary_scores: pred and gold must have the same length, got {p.size} and {g.size}")
    tp = int((p & g).sum())
    fp = int((p & ~g).sum())
    fn = int((~p & g).sum())
    tn = int((~p & ~g).sum())

    def ratio(num: int, den: int) -> float:
        return num / den if den else 0.0

    return {
        "accuracy": (tp + tn) / p.size,
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "n": int(p.size),
    }
