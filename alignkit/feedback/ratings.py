"""Bradley-Terry ratings of compared models from pairwise votes, with bootstrap intervals (Chatbot Arena style).

Model
-----
Each model ``m`` has a strength ``theta_m`` (natural-log scale). In a battle of ``a`` against ``b``::

    P(a beats b) = sigmoid(theta_a - theta_b) = 1 / (1 + exp(theta_b - theta_a))

and the rating shown is ``R_m = init + scale * theta_m / ln(base)``, so that
``P(a beats b) = 1 / (1 + base ** ((R_b - R_a) / scale))`` (Elo's form; 400, 10 and 1000 as in LMSYS
Chatbot Arena's ``compute_mle_elo``).

Likelihood
----------
A battle ``k`` of ``a_k`` against ``b_k`` with weight ``w_k`` has the outcome ``y_k`` = 1 (``a`` won), 0 (``b``
won) or 1/2 (a tie, or "both bad", which counts as a tie). Ties count as half a win for each side, the same as
Chatbot Arena's duplicated battles. The fit minimises the weighted negative log-likelihood::

    NLL(theta) = -sum_k w_k [y_k log sigmoid(d_k) + (1 - y_k) log sigmoid(-d_k)] + reg/2 * ||theta||^2,
    d_k = theta_{a_k} - theta_{b_k}

which is convex; it is minimised by Newton's method with a backtracking line search (analytic gradient and
Hessian, a weighted graph Laplacian). The L2 term (``reg``, default 1e-6, on the natural-log strengths; the
counterpart of Chatbot Arena's ``C=1e6``) is there only so that the optimum exists when a model never lost or
never won, or the comparison graph is disconnected: such a model gets a large but finite rating, and each
disconnected group of models is centred on its own (their ratings are not comparable across groups). With
``reg=0`` the fit is the plain MLE, which is finite only when the data are connected and every model has
both won and lost (ties count as both).

Ratings are centred so that their mean is ``init``, or, with ``anchor``, so that that model's rating is
``init``. :func:`bootstrap_ratings` adds percentile intervals from refits on battles resampled with
replacement; :func:`win_rate` is the win rate of one policy against another with a Wilson score interval;
:func:`leaderboard_rows` makes the JSON-ready table.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = [
    "Battle",
    "bootstrap_ratings",
    "bradley_terry",
    "leaderboard_rows",
    "predict_win_rate",
    "win_rate",
]

# Outcome for model_a; Chatbot Arena's raw values are accepted too.
_OUTCOME = {
    "a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5,
    "model_a": 1.0, "model_b": 0.0, "tie (bothbad)": 0.5,
}


@dataclass(frozen=True)
class Battle:
    """One vote: ``winner`` is ``"a"`` (model_a won), ``"b"``, ``"tie"`` or ``"both_bad"`` (a tie)."""

    model_a: str
    model_b: str
    winner: str
    weight: float = 1.0


class _Data:
    """Battles as arrays: models sorted by name, each battle on its unordered pair ``(lo, hi)`` with the
    outcome for ``lo``."""

    def __init__(self, battles: Iterable[Battle | Mapping[str, Any]]):
        rows = [b if isinstance(b, Battle) else Battle(b["model_a"], b["model_b"], b["winner"], b.get("weight", 1.0))
                for b in battles]
        if not rows:
            raise ValueError("no battles to rate")
        for k, b in enumerate(rows):
            if b.winner not in _OUTCOME:
                raise ValueError(f"battle {k}: winner {b.winner!r} is not one of 'a', 'b', 'tie', 'both_bad'")
            if b.model_a == b.model_b:
                raise ValueError(f"battle {k}: model {b.model_a!r} against itself")
            if not (isinstance(b.weight, (int, float)) and math.isfinite(b.weight) and b.weight >= 0):
                raise ValueError(f"battle {k}: weight {b.weight!r} is not a finite number >= 0")
        self.models = sorted({m for b in rows for m in (b.model_a, b.model_b)})
        index = {m: i for i, m in enumerate(self.models)}
        ia = np.array([index[b.model_a] for b in rows])
        ib = np.array([index[b.model_b] for b in rows])
        y = np.array([_OUTCOME[b.winner] for b in rows])
        self.weight = np.array([float(b.weight) for b in rows])
        self.battle_lo, self.battle_hi = np.minimum(ia, ib), np.maximum(ia, ib)
        self.y_lo = np.where(ia < ib, y, 1.0 - y)
        n = len(self.models)
        pairs, self.pair_of = np.unique(self.battle_lo * n + self.battle_hi, return_inverse=True)
        self.lo, self.hi = pairs // n, pairs % n
        self.battles = np.bincount(ia, minlength=n) + np.bincount(ib, minlength=n)

    def wins(self, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weighted wins of ``lo`` over ``hi`` and of ``hi`` over ``lo``, per pair."""
        m = len(self.lo)
        return (np.bincount(self.pair_of, weight * self.y_lo, m),
                np.bincount(self.pair_of, weight * (1.0 - self.y_lo), m))

    def present(self, weight: np.ndarray) -> np.ndarray:
        n = len(self.models)
        return (np.bincount(self.battle_lo, weight, n) + np.bincount(self.battle_hi, weight, n)) > 0


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _fit(lo, hi, w_lo, w_hi, n: int, reg: float, theta: np.ndarray | None = None, max_iter: int = 200):
    """Newton's method on NLL (module docstring), pairs aggregated: ``w_lo`` wins of ``lo`` over ``hi``."""
    theta = np.zeros(n) if theta is None else theta.copy()
    total = w_lo + w_hi

    def nll(t: np.ndarray) -> float:
        d = t[lo] - t[hi]
        return float(np.sum(w_lo * np.logaddexp(0.0, -d) + w_hi * np.logaddexp(0.0, d)) + 0.5 * reg * t @ t)

    f = nll(theta)
    for _ in range(max_iter):
        p = _sigmoid(theta[lo] - theta[hi])
        r = total * p - w_lo  # d NLL / d (theta_lo - theta_hi)
        grad = np.bincount(lo, r, n) - np.bincount(hi, r, n) + reg * theta
        h = total * p * (1.0 - p)
        hess = reg * np.eye(n)
        np.add.at(hess, (lo, lo), h)
        np.add.at(hess, (hi, hi), h)
        np.add.at(hess, (lo, hi), -h)
        np.add.at(hess, (hi, lo), -h)
        # Minimum-norm step: with reg=0 the Hessian is singular along shifts of all strengths (and of each
        # disconnected group), directions the NLL does not depend on.
        step = -np.linalg.lstsq(hess, grad, rcond=None)[0]
        slope = grad @ step
        if not slope < 0:
            break
        t = 1.0
        while True:
            f_new = nll(theta + t * step)
            if f_new <= f + 1e-4 * t * slope or t < 1e-10:
                break
            t *= 0.5
        if f_new > f:
            break  # no decrease left at floating-point resolution
        theta, f = theta + t * step, f_new
        if np.max(np.abs(t * step)) < 1e-12:
            break
    return theta


def _ratings(theta: np.ndarray, present: np.ndarray, anchor: int | None,
             scale: float, base: float, init: float) -> np.ndarray:
    """Ratings from strengths; NaN for models with no battles (and for all when the anchor has none)."""
    if anchor is None:
        shift = theta[present].mean()
    else:
        shift = theta[anchor] if present[anchor] else np.nan
    return np.where(present, init + scale / math.log(base) * (theta - shift), np.nan)


def _anchor_index(data: _Data, anchor: str | None) -> int | None:
    if anchor is None:
        return None
    if anchor not in data.models:
        raise ValueError(f"anchor {anchor!r} is not among the rated models")
    return data.models.index(anchor)


def bradley_terry(battles: Iterable[Battle | Mapping[str, Any]], scale: float = 400.0, base: float = 10.0,
                  init: float = 1000.0, anchor: str | None = None, reg: float = 1e-6) -> dict[str, float]:
    """Maximum-likelihood Bradley-Terry ratings (model and likelihood in the module docstring).

    ``battles``: :class:`Battle` objects or dicts with ``model_a``, ``model_b``, ``winner`` and optionally
    ``weight``. Returns ``{model: rating}``, models sorted by name. Raises ValueError on an unknown winner, a
    model against itself, a negative or non-finite weight, no battles, or an anchor that never played."""
    data = _Data(battles)
    a = _anchor_index(data, anchor)
    theta = _fit(data.lo, data.hi, *data.wins(data.weight), len(data.models), reg)
    r = _ratings(theta, np.ones(len(data.models), bool), a, scale, base, init)
    return dict(zip(data.models, r.tolist()))


def bootstrap_ratings(battles: Iterable[Battle | Mapping[str, Any]], rounds: int = 1000, seed: int = 0,
                      alpha: float = 0.05, *, scale: float = 400.0, base: float = 10.0, init: float = 1000.0,
                      anchor: str | None = None, reg: float = 1e-6) -> dict[str, dict[str, float]]:
    """Ratings with ``1 - alpha`` percentile bootstrap intervals.

    ``rating`` is the fit on all battles; ``lower``/``upper`` are the ``alpha/2`` and ``1 - alpha/2`` quantiles of
    the ratings refitted on ``rounds`` resamples of the battles (drawn with replacement, same size). A model
    absent from a resample is left out of that round (and the whole round when it is the anchor); ``battles``
    is how many battles the model played. Returns ``{model: {"rating", "lower", "upper", "battles"}}``."""
    data = _Data(battles)
    a = _anchor_index(data, anchor)
    n, count = len(data.models), len(data.weight)
    theta = _fit(data.lo, data.hi, *data.wins(data.weight), n, reg)
    point = _ratings(theta, np.ones(n, bool), a, scale, base, init)
    rng = np.random.default_rng(seed)
    samples = np.empty((rounds, n))
    for k in range(rounds):
        w = data.weight * np.bincount(rng.integers(0, count, count), minlength=count)
        th = _fit(data.lo, data.hi, *data.wins(w), n, reg, theta=theta)
        samples[k] = _ratings(th, data.present(w), a, scale, base, init)
    lower, upper = np.nanpercentile(samples, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return {m: {"rating": float(point[i]), "lower": float(lower[i]), "upper": float(upper[i]),
                "battles": int(data.battles[i])} for i, m in enumerate(data.models)}


def predict_win_rate(ratings: Mapping[str, float], a: str, b: str, scale: float = 400.0,
                     base: float = 10.0) -> float:
    """P(a beats b) = 1 / (1 + base ** ((R_b - R_a) / scale)); a tie counts as half a win."""
    return 1.0 / (1.0 + base ** ((ratings[b] - ratings[a]) / scale))


def win_rate(outcomes: Sequence[float], alpha: float = 0.05) -> dict[str, float]:
    """Win rate of a new policy against the previous one with a ``1 - alpha`` Wilson score interval.

    ``outcomes``: 1 (new won), 0 (previous won), 0.5 (tie); any value in [0, 1] (a soft verdict) is accepted.
    The rate is the mean, ties counting half. The Wilson interval (the score test's inversion with variance
    ``p(1 - p) / n``) is used rather than a bootstrap: it is closed-form and deterministic, keeps its coverage at
    small ``n``, and does not collapse to zero width when every outcome is the same. It is exact-form for
    win/loss outcomes; with ties (or soft verdicts) the true variance of one outcome, ``p(1 - p) - t/4`` for a tie
    rate ``t``, is smaller than ``p(1 - p)``, so the interval is conservative (wider than needed, never
    narrower). Returns ``{"win_rate", "lower", "upper", "n"}``."""
    x = np.asarray(outcomes, dtype=float)
    if x.size == 0:
        raise ValueError("no outcomes")
    if not np.all((x >= 0) & (x <= 1)):
        raise ValueError("outcomes must lie in [0, 1] (1: new wins, 0: previous wins, 0.5: tie)")
    n, p = x.size, float(x.mean())
    z = NormalDist().inv_cdf(1 - alpha / 2)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return {"win_rate": p, "lower": max(0.0, centre - half), "upper": min(1.0, centre + half), "n": n}


def leaderboard_rows(boot: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
    """Rows of :func:`bootstrap_ratings` sorted by rating, best first, for JSON.

    ``rank`` is Chatbot Arena's: 1 + the number of models whose lower bound is above this model's upper bound
    (models whose intervals overlap share a rank). Missing bounds (a model absent from every resample) are
    ``None``."""
    def num(v: float) -> float | None:
        return float(v) if math.isfinite(v) else None

    order = sorted(boot, key=lambda m: (-boot[m]["rating"], m))
    return [{"rank": 1 + sum(boot[o]["lower"] > boot[m]["upper"] for o in boot), "model": m,
             "rating": num(boot[m]["rating"]), "lower": num(boot[m]["lower"]), "upper": num(boot[m]["upper"]),
             "battles": int(boot[m].get("battles", 0))} for m in order]
