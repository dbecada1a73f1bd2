"""alignkit.feedback.agreement against reference implementations, golden values and edge cases.

References: the ``krippendorff`` package (alpha, every level), NLTK's ``AnnotationTask`` (alpha, pairwise
Cohen's kappa, weighted kappa, multi-pi = Fleiss), statsmodels (Cohen's and Fleiss' kappa) and scipy (Kendall's
tau-b), all to 1e-9 on random rating matrices with missing values.
"""

from __future__ import annotations

import itertools
import json
import warnings

import numpy as np
import pytest

from alignkit.feedback.agreement import (
    annotator_report,
    cohen_kappa,
    consensus,
    filter_ratings,
    fleiss_kappa,
    fleiss_kappa_counts,
    item_agreement,
    item_alpha,
    kendall_tau,
    krippendorff_alpha,
    mean_pairwise_tau,
    pairwise_agreement,
)

LEVELS = ["nominal", "ordinal", "interval", "ratio"]
TOL = 1e-9

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the 4 observers x 12 units example
# (values 1-5, missing as nan); the paper gives alpha 0.743 nominal, 0.815 ordinal, 0.849 interval, 0.797 ratio.
KRIPPENDORFF_EXAMPLE = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, np.nan, np.nan, np.nan],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, np.nan, 3],
    [np.nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, np.nan],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, np.nan],
]


def random_ratings(seed: int, missing: bool = True, consecutive: bool = False) -> np.ndarray:
    """(annotators, items) ratings that partly agree: each rating copies the item's true value with p = 0.6.

    2-8 annotators, 5-40 items, 3-7 values (consecutive 0..K-1, or K distinct values in 0..19, 0 included
    sometimes so that the ratio metric meets c + k = 0), 0-50% missing.
    """
    rng = np.random.default_rng(seed)
    n_annotators, n_items, k = rng.integers(2, 9), rng.integers(5, 41), rng.integers(3, 8)
    values = np.arange(k) if consecutive else np.sort(rng.choice(20, size=k, replace=False))
    truth = rng.integers(0, k, size=n_items)
    copy = rng.random((n_annotators, n_items)) < 0.6
    codes = np.where(copy, truth, rng.integers(0, k, size=(n_annotators, n_items)))
    x = values[codes].astype(float)
    if missing:
        x[rng.random(x.shape) < rng.uniform(0, 0.5)] = np.nan
    return x


def assert_same(ours: float, reference: float) -> None:
    if np.isnan(reference):
        assert np.isnan(ours)
    else:
        assert ours == pytest.approx(reference, abs=TOL, rel=0)


def nltk_task(x: np.ndarray, distance=None):
    agreement = pytest.importorskip("nltk.metrics.agreement")
    triples = [(f"c{a}", f"i{u}", float(x[a, u])) for a, u in zip(*np.nonzero(~np.isnan(x)))]
    if distance is None:
        return agreement.AnnotationTask(data=triples)
    return agreement.AnnotationTask(data=triples, distance=distance)


# ---------------------------------------------------------------- Krippendorff's alpha


@pytest.mark.parametrize("level", LEVELS)
def test_alpha_matches_krippendorff_package(level):
    krippendorff = pytest.importorskip("krippendorff")
    defined = 0
    for seed in range(30):
        x = random_ratings(seed)
        try:
            with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reference = float(krippendorff.alpha(reliability_data=x, level_of_measurement=level))
        except ValueError:  # no unit with two ratings, or one value only: the package raises, we return nan
            reference = float("nan")
        assert_same(krippendorff_alpha(x, level), reference)
        defined += not np.isnan(reference)
    assert defined >= 25  # the comparison is not vacuous


@pytest.mark.parametrize(("level", "distance_name"), [("nominal", None), ("interval", "interval_distance")])
def test_alpha_matches_nltk(level, distance_name):
    pytest.importorskip("nltk")
    from nltk.metrics import distance as nltk_distance

    distance = getattr(nltk_distance, distance_name) if distance_name else None
    compared = 0
    for seed in range(30):
        x = random_ratings(seed)
        ours = krippendorff_alpha(x, level)
        if np.isnan(ours):  # NLTK returns 1 (one value) or raises (no pairable unit) where alpha is undefined
            continue
        assert ours == pytest.approx(nltk_task(x, distance).alpha(), abs=TOL, rel=0)
        compared += 1
    assert compared >= 25


def test_alpha_textbook_example():
    x = KRIPPENDORFF_EXAMPLE
    assert round(krippendorff_alpha(x, "nominal"), 3) == 0.743
    assert round(krippendorff_alpha(x, "ordinal"), 3) == 0.815
    assert round(krippendorff_alpha(x, "interval"), 3) == 0.849
    assert round(krippendorff_alpha(x, "ratio"), 3) == 0.797
    # Nominal by hand: 40 pairable values (unit 12's single 3 has no pair). Disagreeing ordered pairs over
    # m_u - 1: unit 2 (2,2,3,2) 6/3, unit 6 (1,2,3,4) 12/3, unit 8 (1,1,2,1) 6/3, so D_o = 8/40; marginals
    # n_c = (9, 13, 10, 5, 3) give D_e = (40^2 - sum n_c^2) / (40 * 39); alpha = 1 - 312/1216.
    n_c = np.array([9, 13, 10, 5, 3])
    d_o = (6 / 3 + 12 / 3 + 6 / 3) / 40
    d_e = (40**2 - (n_c**2).sum()) / (40 * 39)
    assert 1 - d_o / d_e == pytest.approx(1 - 312 / 1216, abs=1e-15)
    assert krippendorff_alpha(x, "nominal") == pytest.approx(1 - 312 / 1216, abs=1e-12)


def test_alpha_is_per_item_not_per_question():
    # Every item has its own answer and the annotators nearly always give it, so per-item alpha is high.
    # Pooling all ratings of the question into one unit (what made Argilla's alpha read 0) makes the observed
    # coincidences equal the expected ones, so alpha is 0 whatever the annotators did.
    rng = np.random.default_rng(0)
    truth = np.arange(30) % 3
    x = np.tile(truth, (6, 1)).astype(float)
    x[rng.random(x.shape) < 0.03] = 1  # a few slips
    x[0, 5] = np.nan
    per_item = krippendorff_alpha(x)
    pooled = krippendorff_alpha(x[~np.isnan(x)].reshape(-1, 1))  # one unit holding every rating
    assert per_item > 0.85
    assert abs(pooled) < 1e-12
    assert pairwise_agreement(x) > 0.9


@pytest.mark.parametrize("level", LEVELS)
def test_item_alpha_weighted_mean_is_alpha(level):
    for seed in range(10):
        x = random_ratings(seed)
        per_item = item_alpha(x, level)
        m_u = (~np.isnan(x)).sum(axis=0)
        ok = ~np.isnan(per_item)
        assert np.all(m_u[ok] >= 2) and np.all(np.isnan(per_item[m_u < 2]))
        assert_same(float((per_item[ok] * m_u[ok]).sum() / m_u[ok].sum()), krippendorff_alpha(x, level))


def test_alpha_edge_cases():
    krippendorff = pytest.importorskip("krippendorff")
    all_missing = np.full((3, 4), np.nan)
    one_annotator = [[1, 2, 3, 1]]
    identical = [[2, 2, None, 2], [2, 2, 2, None]]
    for level in LEVELS:
        assert np.isnan(krippendorff_alpha(all_missing, level))
        assert np.isnan(krippendorff_alpha(one_annotator, level))
        assert np.isnan(krippendorff_alpha(identical, level))
        assert np.all(np.isnan(item_alpha(identical, level)))
    # Conventions of the references where every rating is the same: the package raises, NLTK returns 1.
    with pytest.raises(ValueError, match="more than one value"):
        krippendorff.alpha(reliability_data=np.array(identical, dtype=float), level_of_measurement="nominal")
    assert nltk_task(np.array(identical, dtype=float)).alpha() == 1
    # Values that occur only in unpaired ratings do not count: item 3 (rated once, 9) has no pair.
    assert np.isnan(krippendorff_alpha([[1, 1, 9], [1, 1, None]]))
    # Perfect agreement with variation is 1; 2 annotators always disagreeing on binary labels is below 0.
    assert krippendorff_alpha([[0, 1, 0, 1], [0, 1, 0, 1]]) == 1.0
    assert krippendorff_alpha([[0, 1, 0, 1], [1, 0, 1, 0]]) < 0


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        krippendorff_alpha([1, 2, 3])
    with pytest.raises(ValueError, match="numbers"):
        krippendorff_alpha([["a", "b"], ["a", "a"]])
    with pytest.raises(ValueError, match="level"):
        krippendorff_alpha([[1, 2], [1, 2]], level="cardinal")
    with pytest.raises(ValueError, match="same length"):
        cohen_kappa([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="weights"):
        cohen_kappa([1, 2], [1, 2], weights="cubic")
    with pytest.raises(ValueError, match="not in labels"):
        cohen_kappa([1, 2, 3], [1, 2, 2], labels=[1, 2])


# ---------------------------------------------------------------- Cohen's kappa


def confusion(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> np.ndarray:
    keep = ~(np.isnan(a) | np.isnan(b))
    table = np.zeros((len(labels), len(labels)))
    for i, j in zip(np.searchsorted(labels, a[keep]), np.searchsorted(labels, b[keep])):
        table[i, j] += 1
    return table


@pytest.mark.parametrize("weights", [None, "linear", "quadratic"])
def test_cohen_matches_statsmodels(weights):
    inter_rater = pytest.importorskip("statsmodels.stats.inter_rater")
    for seed in range(30):
        x = random_ratings(seed)
        a, b = x[0], x[1]
        both = ~(np.isnan(a) | np.isnan(b))
        seen = np.unique(np.concatenate([a[both], b[both]]))
        full = np.unique(x[~np.isnan(x)])
        # statsmodels: a square table (rows a, columns b) over the label set; `wt` names the weighting and
        # `weights` would be category scores (default 0..k-1, i.e. label positions), not the weighting's name.
        for labels in (None, full):
            table = confusion(a, b, seen if labels is None else full)
            with np.errstate(invalid="ignore", divide="ignore"):
                reference = float(inter_rater.cohens_kappa(table, wt=weights, return_results=False))
            assert_same(cohen_kappa(a, b, weights=weights, labels=labels), reference)


def test_cohen_matches_nltk_pairwise_average():
    pytest.importorskip("nltk")
    for seed in range(15):
        x = random_ratings(seed, missing=False, consecutive=True)
        k = int(np.nanmax(x)) + 1
        pairs = list(itertools.combinations(range(x.shape[0]), 2))
        task = nltk_task(x)
        plain = np.mean([cohen_kappa(x[i], x[j]) for i, j in pairs])
        assert plain == pytest.approx(task.kappa(), abs=TOL, rel=0)
        # NLTK's weighted kappa takes a distance between label values; with labels 0..k-1 given in full,
        # the values are the positions our weights use.
        for weights, distance in (("linear", lambda p, q: abs(p - q)), ("quadratic", lambda p, q: (p - q) ** 2)):
            ours = np.mean([cohen_kappa(x[i], x[j], weights=weights, labels=range(k)) for i, j in pairs])
            assert ours == pytest.approx(nltk_task(x, distance).weighted_kappa(), abs=TOL, rel=0)


def test_cohen_golden_and_edge_cases():
    # 10 items: p_o = 0.7; marginals a = (0.5, 0.5), b = (0.6, 0.4) -> p_e = 0.5; kappa = 0.4.
    a = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    b = [0, 0, 0, 0, 1, 0, 0, 1, 1, 1]
    assert cohen_kappa(a, b) == pytest.approx(0.4, abs=1e-12)
    # Missing in either drops the item: appending disagreeing items with a gap changes nothing.
    assert cohen_kappa(a + [0, None], b + [None, 1]) == pytest.approx(0.4, abs=1e-12)
    assert np.isnan(cohen_kappa([None, 1], [0, None]))  # no item rated by both
    assert np.isnan(cohen_kappa([1, 1, 1], [1, 1, 1]))  # one label only: chance agreement is 1
    assert cohen_kappa([1, 2, 3], [1, 2, 3], weights="quadratic") == 1.0
    # Unused scale points between the labels change the linear weights' spacing.
    spaced = cohen_kappa([1, 2, 5, 5], [1, 5, 5, 2], weights="linear", labels=[1, 2, 3, 4, 5])
    assert spaced != pytest.approx(cohen_kappa([1, 2, 5, 5], [1, 5, 5, 2], weights="linear"))


# ---------------------------------------------------------------- Fleiss' kappa


def test_fleiss_matches_statsmodels_and_nltk_pi():
    inter_rater = pytest.importorskip("statsmodels.stats.inter_rater")
    pytest.importorskip("nltk")
    for seed in range(30):
        x = random_ratings(seed, missing=False)
        table, _ = inter_rater.aggregate_raters(x.T)
        reference = float(inter_rater.fleiss_kappa(table))
        assert fleiss_kappa(x) == pytest.approx(reference, abs=TOL, rel=0)
        assert fleiss_kappa_counts(table) == pytest.approx(reference, abs=TOL, rel=0)
        assert fleiss_kappa(x) == pytest.approx(nltk_task(x).pi(), abs=TOL, rel=0)  # multi-pi is Fleiss' kappa


def test_fleiss_with_missing_but_equal_counts():
    inter_rater = pytest.importorskip("statsmodels.stats.inter_rater")
    rng = np.random.default_rng(3)
    x = random_ratings(3, missing=False)
    while x.shape[0] < 4:
        x = np.vstack([x, x[:1]])
    for u in range(x.shape[1]):  # each item rated by 3 of the annotators, different ones per item
        x[rng.permutation(x.shape[0])[3:], u] = np.nan
    values = np.unique(x[~np.isnan(x)])
    table = np.array([[(x[:, u] == v).sum() for v in values] for u in range(x.shape[1])])
    assert fleiss_kappa(x) == pytest.approx(float(inter_rater.fleiss_kappa(table)), abs=TOL, rel=0)
    x[0, 0] = 5.0 if np.isnan(x[0, 0]) else np.nan
    with pytest.raises(ValueError, match="same number of ratings"):
        fleiss_kappa(x)


def test_fleiss_golden_and_edge_cases():
    # Items (1,1), (2,2), (1,2): P_i = 1, 1, 0; p = (1/2, 1/2); kappa = (2/3 - 1/2) / (1/2) = 1/3.
    assert fleiss_kappa([[1, 2, 1], [1, 2, 2]]) == pytest.approx(1 / 3, abs=1e-12)
    assert np.isnan(fleiss_kappa(np.full((3, 4), np.nan)))
    assert np.isnan(fleiss_kappa([[1, 2, 3]]))  # one rating per item
    assert np.isnan(fleiss_kappa([[1, 1], [1, 1]]))  # one category
    with pytest.raises(ValueError, match="same number of ratings"):
        fleiss_kappa_counts([[2, 0], [1, 2]])


# ---------------------------------------------------------------- pairwise agreement


def test_pairwise_agreement_golden_and_nltk():
    pytest.importorskip("nltk")
    # Item 1: 3 ratings (a, a, b) -> 1 of 3 pairs agree; item 2: (c, c) -> 1 of 1; item 3: one rating, no pair.
    x = [[0, 2, 5], [0, 2, None], [1, None, None]]
    assert pairwise_agreement(x) == pytest.approx(2 / 4, abs=1e-12)
    np.testing.assert_allclose(item_agreement(x), [1 / 3, 1.0, np.nan])
    assert np.isnan(pairwise_agreement(np.full((2, 3), np.nan)))
    assert np.isnan(pairwise_agreement([[1, 2, 3]]))
    assert pairwise_agreement([[4, 4], [4, 4]]) == 1.0
    # With every item fully rated it is NLTK's average observed agreement over coder pairs.
    for seed in range(10):
        x = random_ratings(seed, missing=False)
        assert pairwise_agreement(x) == pytest.approx(nltk_task(x).avg_Ao(), abs=TOL, rel=0)


# ---------------------------------------------------------------- Kendall's tau


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # scipy warns where fewer than two positions are left
def test_kendall_tau_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = rng.integers(2, 30)
        r1, r2 = rng.integers(0, 5, n).astype(float), rng.integers(0, 5, n).astype(float)
        r2 = np.where(rng.random(n) < 0.5, r1, r2)  # correlated, with ties
        assert_same(kendall_tau(r1, r2), float(stats.kendalltau(r1, r2).statistic))
        r1[rng.random(n) < 0.2] = np.nan
        assert_same(kendall_tau(r1, r2), float(stats.kendalltau(r1, r2, nan_policy="omit").statistic))
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert np.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    assert np.isnan(kendall_tau([1, None], [1, 2]))
    with pytest.raises(ValueError):
        kendall_tau([[1, 2]], [[1, 2]])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_mean_pairwise_tau():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for _ in range(20):
        k, n_annotators = rng.integers(3, 9), rng.integers(2, 6)
        rankings = np.array([rng.permutation(k) for _ in range(n_annotators)], dtype=float)
        rankings[rng.random(rankings.shape) < 0.15] = np.nan
        taus = [stats.kendalltau(rankings[i], rankings[j], nan_policy="omit").statistic
                for i, j in itertools.combinations(range(n_annotators), 2)]
        taus = [t for t in taus if not np.isnan(t)]
        assert_same(mean_pairwise_tau(rankings), float(np.mean(taus)) if taus else float("nan"))
    assert mean_pairwise_tau([[1, 2, 3], [1, 2, 3], [3, 2, 1]]) == pytest.approx(-1 / 3, abs=1e-12)
    assert np.isnan(mean_pairwise_tau([[1, 2, 3]]))


# ---------------------------------------------------------------- consensus and annotator quality


def test_consensus():
    x = [[1, 2, 3, None, 0],
         [1, 3, 4, None, 0],
         [2, 2, 5, None, 1],
         [2, 3, 9, None, None]]
    # Nominal: item 0 ties 1-1 vs 2-2 -> the smaller label; item 1 ties 2/3 -> 2; item 4 majority 0.
    np.testing.assert_array_equal(consensus(x), [1, 2, 3, np.nan, 0])
    # Ordinal: the lower median (item 2: 3, 4, 5, 9 -> 4).
    np.testing.assert_array_equal(consensus(x, "ordinal"), [1, 2, 4, np.nan, 0])
    np.testing.assert_allclose(consensus(x, "interval"), [1.5, 2.5, 5.25, np.nan, 1 / 3])
    np.testing.assert_allclose(consensus(x, "ratio"), consensus(x, "interval"))


def test_annotator_report_interval_by_hand():
    x = [[1, 2, 3], [1, 2, 5], [1, 3, 4]]
    report = annotator_report(x, level="interval")
    # Annotator 0 against the others' means (1, 2.5, 4.5): one equal, |dev| = 0, 0.5, 1.5.
    assert report[0]["agreement"] == pytest.approx(1 / 3)
    assert report[0]["mad"] == pytest.approx(2 / 3)
    assert report[0]["n_ratings"] == 3 and report[0]["gold_count"] == 0 and report[0]["gold_accuracy"] is None
    nominal = annotator_report([[1, 2, None], [1, 3, 4]])
    assert nominal[0] == {"annotator": 0, "n_ratings": 2, "n_compared": 2, "agreement": 0.5, "mad": None,
                          "gold_count": 0, "gold_accuracy": None}
    assert nominal[1]["n_compared"] == 2 and nominal[1]["n_ratings"] == 3
    alone = annotator_report([[1, 2]])
    assert alone[0]["agreement"] is None and alone[0]["n_compared"] == 0


def adversarial_set(seed: int = 0):
    """5 honest annotators (10% slips) and one who always gives the opposite of the honest majority (binary)."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, 60).astype(float)
    honest = np.tile(truth, (5, 1))
    slips = rng.random(honest.shape) < 0.1
    honest[slips] = 1 - honest[slips]
    honest[rng.random(honest.shape) < 0.1] = np.nan
    adversary = 1 - consensus(honest)
    gold = np.full(60, np.nan)
    gold[:15] = truth[:15]
    return np.vstack([honest, adversary]), gold


def test_annotator_report_flags_adversary():
    x, gold = adversarial_set()
    report = annotator_report(x, gold=gold)
    json.dumps(report, allow_nan=False)  # JSON-ready: plain ints, floats and None
    honest, adversary = report[:5], report[5]
    assert adversary["agreement"] < 0.1 and adversary["gold_accuracy"] < 0.2
    assert adversary["n_ratings"] == 60 and adversary["gold_count"] == 15
    for row in honest:
        assert row["agreement"] > 0.75 and row["gold_accuracy"] > 0.75
        assert 0 < row["gold_count"] <= 15


def test_filter_ratings_drops_adversary_then_disputed_items():
    x, gold = adversarial_set()
    keep_annotators, keep_items, reasons = filter_ratings(x, min_annotator_agreement=0.5)
    np.testing.assert_array_equal(keep_annotators, [True] * 5 + [False])
    assert keep_items.all()
    assert [(r["kind"], r["index"]) for r in reasons] == [("annotator", 5)]
    assert krippendorff_alpha(x[keep_annotators]) > 0.6 > krippendorff_alpha(x)

    keep_annotators, _, reasons = filter_ratings(x, gold_min_accuracy=0.5, gold=gold)
    np.testing.assert_array_equal(keep_annotators, [True] * 5 + [False])
    assert "gold accuracy" in reasons[0]["reason"]

    # Items: after the adversary is gone, items the honest annotators split on fall below the thresholds.
    keep_annotators, keep_items, reasons = filter_ratings(
        x, min_annotator_agreement=0.5, min_item_agreement=0.99, min_item_alpha=0.0)
    honest_split = item_agreement(x[:5]) < 0.99
    np.testing.assert_array_equal(keep_items, ~honest_split)
    assert honest_split.any() and {r["index"] for r in reasons if r["kind"] == "item"} == set(
        np.flatnonzero(honest_split))
    # min_item_alpha alone drops the items whose share of alpha is below the threshold.
    _, keep_items, _ = filter_ratings(x, min_annotator_agreement=0.5, min_item_alpha=0.5)
    np.testing.assert_array_equal(keep_items, ~(item_alpha(x[:5]) < 0.5))

    # No thresholds: everything kept; items with under two kept ratings have no figure and stay.
    keep_annotators, keep_items, reasons = filter_ratings(x)
    assert keep_annotators.all() and keep_items.all() and reasons == []
    _, keep_items, _ = filter_ratings([[1, 2, 1], [1, 1, None]], min_item_agreement=0.5)
    np.testing.assert_array_equal(keep_items, [True, False, True])
    with pytest.raises(ValueError, match="gold"):
        filter_ratings(x, gold_min_accuracy=0.5)
