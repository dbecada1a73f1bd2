"""Inter-annotator agreement and annotator quality, for human feedback (votes, rankings, thumbs, scores).

Every function takes ratings as a 2-D array-like of shape ``(annotators, items)`` (the ``reliability_data``
convention of the ``krippendorff`` package): row ``a`` holds annotator ``a``'s rating of each item, ``nan`` (or
``None``) where the annotator did not rate it. Ratings are numbers; encode categories as integers (a pairwise
vote as 0/1, thumbs as -1/+1, a Likert scale as 1..5). Undefined quantities are ``nan`` (``None`` in the
JSON-ready reports), never an exception, so a dashboard can show them as they are.

Krippendorff's alpha is computed per item (unit): the coincidence matrix pairs ratings within each item, and an
item with fewer than two ratings contributes nothing. Pooling all items of a question into one unit instead makes
the observed and expected coincidences identical, so alpha comes out 0 whatever the annotators did.

Levels of measurement (``level``): ``"nominal"`` (labels are unordered), ``"ordinal"`` (ordered, distances by
rank), ``"interval"`` (differences are meaningful), ``"ratio"`` (ratios are meaningful, values >= 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "LEVELS",
    "annotator_report",
    "cohen_kappa",
    "consensus",
    "filter_ratings",
    "fleiss_kappa",
    "fleiss_kappa_counts",
    "item_agreement",
    "item_alpha",
    "kendall_tau",
    "krippendorff_alpha",
    "mean_pairwise_tau",
    "pairwise_agreement",
]

LEVELS = ("nominal", "ordinal", "interval", "ratio")


def _ratings(ratings: npt.ArrayLike) -> np.ndarray:
    """``ratings`` as a float (annotators, items) array with nan for missing (None becomes nan)."""
    try:
        x = np.array(ratings, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            "ratings must be numbers (encode categories as integers), nan or None for missing"
        ) from exc
    if x.ndim != 2:
        raise ValueError(f"ratings must be 2-D (annotators, items), got shape {x.shape}")
    if np.isinf(x).any():
        raise ValueError("ratings must be finite (nan or None for missing)")
    return x


def _check_level(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")


def _value_counts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values ``(V,)`` and counts ``(items, V)``: how many annotators gave item ``u`` value ``c``."""
    observed = ~np.isnan(x)
    values = np.unique(x[observed])
    n_items = x.shape[1]
    item = np.broadcast_to(np.arange(n_items), x.shape)[observed]
    code = np.searchsorted(values, x[observed])
    counts = np.bincount(item * len(values) + code, minlength=n_items * len(values))
    return values, counts.reshape(n_items, len(values)).astype(float)


def _distances(values: np.ndarray, n_c: np.ndarray, level: str) -> np.ndarray:
    """Krippendorff's squared difference ``delta[c, k]`` between values ``c`` and ``k`` at ``level``.

    nominal ``[c != k]``; ordinal ``(sum_{g=c..k} n_g - (n_c + n_k) / 2)^2``, i.e. the squared difference of the
    values' mid-ranks ``cumsum(n)_c - n_c / 2`` in the pairable marginals ``n_c``; interval ``(c - k)^2``;
    ratio ``((c - k) / (c + k))^2`` (0 where ``c + k = 0``).
    """
    if level == "nominal":
        return 1.0 - np.eye(len(values))
    if level == "ordinal":
        mid_rank = np.cumsum(n_c) - n_c / 2
        return (mid_rank[:, None] - mid_rank[None, :]) ** 2
    diff = values[:, None] - values[None, :]
    if level == "interval":
        return diff**2
    total = values[:, None] + values[None, :]
    return np.divide(diff, total, out=np.zeros_like(diff), where=total != 0) ** 2


def _pairable(x: np.ndarray, level: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """The items with >= 2 ratings: their value counts and indices, the coincidence matrix and the distances."""
    _check_level(level)
    values, counts = _value_counts(x)
    items = np.flatnonzero(counts.sum(axis=1) >= 2)
    if len(items) == 0:
        return None
    counts = counts[items]
    m_u = counts.sum(axis=1)
    # Coincidence matrix o[c, k] = sum_u (n_uc n_uk - [c = k] n_uc) / (m_u - 1): ordered pairs of ratings
    # within each item, each item's pairs weighted 1 / (m_u - 1) so that an item contributes its m_u values.
    weighted = counts / (m_u - 1)[:, None]
    coincidences = weighted.T @ counts - np.diag(weighted.sum(axis=0))
    n_c = coincidences.sum(axis=0)
    return counts, items, coincidences, _distances(values, n_c, level)


def _expected_disagreement(n_c: np.ndarray, delta: np.ndarray) -> float:
    """D_e = sum_ck e_ck delta_ck / n with e_ck = (n_c n_k - [c = k] n_c) / (n - 1): all pairable values paired."""
    n = n_c.sum()
    return float(n_c @ delta @ n_c / (n * (n - 1)))


def krippendorff_alpha(ratings: npt.ArrayLike, level: str = "nominal") -> float:
    """Krippendorff's alpha, ``1 - D_o / D_e``, over items (units) with missing ratings.

    ``ratings``: (annotators, items), nan/None for missing. Per item ``u`` with ``m_u >= 2`` ratings and value
    counts ``n_uc``, the coincidence matrix is ``o_ck = sum_u (n_uc n_uk - [c = k] n_uc) / (m_u - 1)``; its
    marginals ``n_c`` (pairable values only, ``n = sum n_c``) give ``e_ck = (n_c n_k - [c = k] n_c) / (n - 1)``.
    ``D_o = sum o_ck delta_ck / n`` and ``D_e = sum e_ck delta_ck / n`` with the level's ``delta`` (nominal
    ``[c != k]``, ordinal by mid-ranks in ``n_c``, interval ``(c - k)^2``, ratio ``((c - k) / (c + k))^2``).

    Returns nan when undefined: no item has two ratings, or ``D_e = 0``, which is the case when every pairable
    rating is the same value (no variation to agree on). There the ``krippendorff`` package raises ``ValueError``
    ("more than one value in the domain"; nan, from 0/0, if an unpaired rating holds another value) and NLTK's
    ``AnnotationTask.alpha`` returns 1.
    """
    parts = _pairable(_ratings(ratings), level)
    if parts is None:
        return float("nan")
    _, _, coincidences, delta = parts
    n_c = coincidences.sum(axis=0)
    d_e = _expected_disagreement(n_c, delta)
    if d_e == 0:
        return float("nan")
    d_o = float((coincidences * delta).sum() / n_c.sum())
    return 1.0 - d_o / d_e


def item_alpha(ratings: npt.ArrayLike, level: str = "nominal") -> np.ndarray:
    """Each item's share of alpha: ``alpha_u = 1 - D_u / D_e`` (nan for items with < 2 ratings).

    ``D_u = sum_ck n_uc n_uk delta_ck / (m_u (m_u - 1))`` is the mean distance between two of the item's ratings;
    ``D_e`` is the whole data set's expected disagreement. ``krippendorff_alpha`` is the mean of ``alpha_u``
    weighted by the item's number of ratings ``m_u``. All nan when alpha is undefined.
    """
    x = _ratings(ratings)
    out = np.full(x.shape[1], np.nan)
    parts = _pairable(x, level)
    if parts is None:
        return out
    counts, items, coincidences, delta = parts
    d_e = _expected_disagreement(coincidences.sum(axis=0), delta)
    if d_e == 0:
        return out
    m_u = counts.sum(axis=1)
    d_u = np.einsum("uc,ck,uk->u", counts, delta, counts) / (m_u * (m_u - 1))
    out[items] = 1.0 - d_u / d_e
    return out


def item_agreement(ratings: npt.ArrayLike) -> np.ndarray:
    """Per item, the share of its pairs of ratings that are equal: ``sum_c C(n_uc, 2) / C(m_u, 2)``.

    nan for items with fewer than two ratings.
    """
    _, counts = _value_counts(_ratings(ratings))
    m_u = counts.sum(axis=1)
    agreeing = (counts * (counts - 1)).sum(axis=1)
    pairs = m_u * (m_u - 1)
    return np.divide(agreeing, pairs, out=np.full(len(m_u), np.nan), where=pairs > 0)


def pairwise_agreement(ratings: npt.ArrayLike) -> float:
    """Share of agreeing pairs of ratings over all pairs within items: ``sum_u sum_c C(n_uc, 2) / sum_u C(m_u, 2)``.

    Items count by their number of pairs; the raw (not chance-corrected) observed agreement. nan with no pairs.
    """
    _, counts = _value_counts(_ratings(ratings))
    m_u = counts.sum(axis=1)
    pairs = (m_u * (m_u - 1)).sum()
    return float((counts * (counts - 1)).sum() / pairs) if pairs > 0 else float("nan")


def _two_rows(a: npt.ArrayLike, b: npt.ArrayLike) -> np.ndarray:
    """Two annotators' ratings of the same items as a (2, items) array."""
    if np.ndim(a) != 1 or np.shape(a) != np.shape(b):
        raise ValueError(f"expected two 1-D sequences of the same length, got shapes {np.shape(a)} and {np.shape(b)}")
    return _ratings([a, b])


def _label_codes(
    a: npt.ArrayLike, b: npt.ArrayLike, labels: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Both annotators' ratings of the items both rated, as positions in the ordered label set."""
    pair = _two_rows(a, b)
    pair = pair[:, ~np.isnan(pair).any(axis=0)]
    if labels is None:
        label_set = np.unique(pair)
    else:
        label_set = np.unique(np.asarray(labels, dtype=float))
        if not np.isin(pair, label_set).all():
            raise ValueError("a or b holds a rating that is not in labels")
    codes = np.searchsorted(label_set, pair)
    return codes[0], codes[1], len(label_set)


def cohen_kappa(
    a: npt.ArrayLike,
    b: npt.ArrayLike,
    weights: str | None = None,
    labels: Sequence[float] | None = None,
) -> float:
    """Cohen's kappa between two annotators' labels on the same items, ``1 - sum(W * O) / sum(W * E)``.

    Items either annotator left missing (nan/None) are dropped. ``O`` is the confusion matrix of proportions over
    the ordered label set (``labels``, default the sorted labels seen), ``E`` the outer product of its marginals.
    ``weights``: None ``W_ij = [i != j]`` (so ``(p_o - p_e) / (1 - p_e)``), ``"linear"`` ``|i - j|``,
    ``"quadratic"`` ``(i - j)^2``, with ``i, j`` the labels' positions in the label set (as sklearn and
    statsmodels do); pass ``labels`` to put unused scale points in between. nan when no item is left or
    ``sum(W * E) = 0`` (both annotators always gave the one same label).
    """
    if weights not in (None, "linear", "quadratic"):
        raise ValueError(f"weights must be None, 'linear' or 'quadratic', got {weights!r}")
    code_a, code_b, k = _label_codes(a, b, labels)
    if len(code_a) == 0:
        return float("nan")
    observed = np.bincount(code_a * k + code_b, minlength=k * k).reshape(k, k) / len(code_a)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0))
    position = np.arange(k)
    diff = np.abs(position[:, None] - position[None, :]).astype(float)
    w = {None: (diff > 0).astype(float), "linear": diff, "quadratic": diff**2}[weights]
    chance = (w * expected).sum()
    return 1.0 - float((w * observed).sum() / chance) if chance > 0 else float("nan")


def fleiss_kappa_counts(counts: npt.ArrayLike) -> float:
    """Fleiss' kappa from an (items, categories) table of how many annotators put each item in each category.

    Every item must have the same number ``n`` of ratings. ``P_i = (sum_j n_ij^2 - n) / (n (n - 1))``,
    ``p_j = sum_i n_ij / (N n)``, ``kappa = (mean P_i - sum p_j^2) / (1 - sum p_j^2)``. nan when ``n < 2``, there
    are no items, or every rating is in one category.
    """
    table = np.asarray(counts, dtype=float)
    if table.ndim != 2:
        raise ValueError(f"counts must be 2-D (items, categories), got shape {table.shape}")
    n_per_item = table.sum(axis=1)
    if len(n_per_item) and not np.all(n_per_item == n_per_item[0]):
        raise ValueError(
            "Fleiss' kappa needs the same number of ratings on every item; got "
            f"{int(n_per_item.min())} to {int(n_per_item.max())} (krippendorff_alpha allows missing ratings)"
        )
    if len(n_per_item) == 0 or n_per_item[0] < 2:
        return float("nan")
    n = n_per_item[0]
    p_item = ((table**2).sum(axis=1) - n) / (n * (n - 1))
    p_cat = table.sum(axis=0) / table.sum()
    p_e = float((p_cat**2).sum())
    return (float(p_item.mean()) - p_e) / (1 - p_e) if p_e < 1 else float("nan")


def fleiss_kappa(ratings: npt.ArrayLike) -> float:
    """Fleiss' kappa from (annotators, items) ratings; see :func:`fleiss_kappa_counts` for the formula.

    Missing ratings (nan/None) are allowed only if every item still has the same number of ratings (different
    annotators may rate different items); otherwise ``ValueError``.
    """
    return fleiss_kappa_counts(_value_counts(_ratings(ratings))[1])


def _tau_matrix(rankings: np.ndarray) -> np.ndarray:
    """Kendall's tau-b between every two rows of ``rankings`` (annotators, K), each pair over items both rated.

    With ``s_a[i, j] = sign(r_a[i] - r_a[j])`` (0 where a value is missing) and ``v_a[i, j] = 1`` where annotator
    ``a`` rated both ``i`` and ``j``: ``tau_ab = sum s_a s_b / sqrt(sum s_a^2 v_b * sum s_b^2 v_a)``, i.e.
    ``(n_c - n_d) / sqrt((n_0 - n_1)(n_0 - n_2))`` over the common items. Memory is O(annotators K^2).
    """
    rated = ~np.isnan(rankings)
    filled = np.where(rated, rankings, 0.0)
    sign = np.sign(filled[:, :, None] - filled[:, None, :])
    both = (rated[:, :, None] & rated[:, None, :]).astype(float)
    sign *= both
    concordance = np.einsum("aij,bij->ab", sign, sign)
    untied = np.einsum("aij,bij->ab", sign**2, both)
    norm = np.sqrt(untied * untied.T)
    return np.divide(concordance, norm, out=np.full_like(norm, np.nan), where=norm > 0)


def kendall_tau(r1: npt.ArrayLike, r2: npt.ArrayLike) -> float:
    """Kendall's tau-b between two rankings or scores, ``(n_c - n_d) / sqrt((n_0 - n_1)(n_0 - n_2))``.

    ``n_c``/``n_d`` are the concordant/discordant pairs, ``n_0 = K(K-1)/2``, ``n_1``/``n_2`` the pairs tied in
    ``r1``/``r2``. Positions missing (nan/None) in either are dropped (``scipy.stats.kendalltau`` with
    ``nan_policy="omit"``; equal to its default without missing values). nan when fewer than two positions are
    left or either is constant on them. O(K^2) memory: meant for rankings of K responses.
    """
    return float(_tau_matrix(_two_rows(r1, r2))[0, 1])


def mean_pairwise_tau(rankings: npt.ArrayLike) -> float:
    """Mean Kendall tau-b over every two annotators' rankings of the same K responses ((annotators, K) array).

    Each pair is compared on the responses both ranked; pairs whose tau is undefined are left out of the mean.
    nan when no pair is defined.
    """
    x = _ratings(rankings)
    upper = np.triu_indices(x.shape[0], k=1)
    taus = _tau_matrix(x)[upper]
    taus = taus[~np.isnan(taus)]
    return float(taus.mean()) if len(taus) else float("nan")


def consensus(ratings: npt.ArrayLike, level: str = "nominal") -> np.ndarray:
    """Each item's consensus rating (nan for items nobody rated).

    nominal: the majority label, ties broken by the smallest label; ordinal: the lower median (the smaller of the
    two middle ratings for an even count, so the consensus is always one of the ratings); interval and ratio: the
    mean.
    """
    _check_level(level)
    x = _ratings(ratings)
    out = np.full(x.shape[1], np.nan)
    rated = (~np.isnan(x)).sum(axis=0)
    has = rated > 0
    if level == "nominal":
        values, counts = _value_counts(x)
        if len(values):
            out[has] = values[np.argmax(counts[has], axis=1)]  # argmax takes the first, i.e. smallest, label
    elif level == "ordinal":
        ordered = np.sort(x, axis=0)  # nan sorts last
        lower_middle = (rated[has] - 1) // 2
        out[has] = ordered[lower_middle, np.flatnonzero(has)]
    else:
        out[has] = np.nansum(x[:, has], axis=0) / rated[has]
    return out


def _share(hits: np.ndarray) -> float | None:
    return float(hits.mean()) if len(hits) else None


def annotator_report(
    ratings: npt.ArrayLike, gold: npt.ArrayLike | None = None, level: str = "nominal"
) -> list[dict[str, Any]]:
    """Per annotator (row): how many ratings, agreement with the other annotators, accuracy on gold items.

    Each dict (JSON-ready; None where undefined):

    - ``annotator``: row index; ``n_ratings``: items rated;
    - ``n_compared``: items this annotator rated that at least one other annotator rated;
    - ``agreement``: on those items, the share of ratings equal to the leave-one-out :func:`consensus` of the
      *other* annotators (so an annotator is never compared with itself);
    - ``mad``: mean absolute deviation from that consensus (None for nominal);
    - ``gold_count``: items rated that have a gold label (``gold`` has one entry per item, nan where none);
    - ``gold_accuracy``: share of those rated equal to the gold label.
    """
    x = _ratings(ratings)
    _check_level(level)
    gold_labels = None
    if gold is not None:
        gold_labels = np.array(gold, dtype=float)
        if gold_labels.shape != (x.shape[1],):
            raise ValueError(f"gold must have one entry per item ({x.shape[1]}), got shape {gold_labels.shape}")
    report = []
    for a in range(x.shape[0]):
        own = x[a]
        rated = ~np.isnan(own)
        others = consensus(np.delete(x, a, axis=0), level)
        compared = rated & ~np.isnan(others)
        row: dict[str, Any] = {
            "annotator": a,
            "n_ratings": int(rated.sum()),
            "n_compared": int(compared.sum()),
            "agreement": _share(own[compared] == others[compared]),
            "mad": None if level == "nominal" else _share(np.abs(own[compared] - others[compared])),
            "gold_count": 0,
            "gold_accuracy": None,
        }
        if gold_labels is not None:
            on_gold = rated & ~np.isnan(gold_labels)
            row["gold_count"] = int(on_gold.sum())
            row["gold_accuracy"] = _share(own[on_gold] == gold_labels[on_gold])
        report.append(row)
    return report


def filter_ratings(
    ratings: npt.ArrayLike,
    min_item_alpha: float | None = None,
    min_annotator_agreement: float | None = None,
    gold_min_accuracy: float | None = None,
    gold: npt.ArrayLike | None = None,
    level: str = "nominal",
    min_item_agreement: float | None = None,
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Which annotators and items to keep: ``(kept_annotator_mask, kept_item_mask, reasons)``.

    Two steps, each threshold optional (None skips it):

    1. Annotators: from :func:`annotator_report` on all ratings, drop an annotator whose ``agreement`` with the
       other annotators' consensus is below ``min_annotator_agreement``, or whose ``gold_accuracy`` is below
       ``gold_min_accuracy`` (needs ``gold``). An annotator whose figure is undefined (no overlap, no gold
       item rated) is kept.
    2. Items, among the kept annotators' ratings only: drop an item whose :func:`item_agreement` (share of equal
       pairs of ratings) is below ``min_item_agreement`` or whose :func:`item_alpha` is below ``min_item_alpha``.
       Items with fewer than two kept ratings have no agreement figure and are kept.

    ``reasons`` lists each drop as ``{"kind": "annotator" | "item", "index": int, "reason": str}``.
    """
    x = _ratings(ratings)
    if gold_min_accuracy is not None and gold is None:
        raise ValueError("gold_min_accuracy needs gold labels (gold=...)")
    keep_annotators = np.ones(x.shape[0], dtype=bool)
    keep_items = np.ones(x.shape[1], dtype=bool)
    reasons: list[dict[str, Any]] = []

    checks = [("agreement", min_annotator_agreement, "agreement with the others' consensus"),
              ("gold_accuracy", gold_min_accuracy, "gold accuracy")]
    if any(threshold is not None for _, threshold, _ in checks):
        for row in annotator_report(x, gold=gold, level=level):
            for key, threshold, what in checks:
                if threshold is not None and row[key] is not None and row[key] < threshold:
                    keep_annotators[row["annotator"]] = False
                    reasons.append({"kind": "annotator", "index": row["annotator"],
                                    "reason": f"{what} {row[key]:.3f} < {threshold}"})

    kept = x[keep_annotators]
    item_checks = [(min_item_agreement, "agreement", lambda: item_agreement(kept)),
                   (min_item_alpha, "alpha", lambda: item_alpha(kept, level))]
    for threshold, what, measure in item_checks:
        if threshold is None:
            continue
        values = measure()
        for u in np.flatnonzero(values < threshold):  # nan compares False: undefined items are kept
            if keep_items[u]:
                keep_items[u] = False
                reason = f"item {what} {values[u]:.3f} < {threshold}"
                reasons.append({"kind": "item", "index": int(u), "reason": reason})
    return keep_annotators, keep_items, reasons
