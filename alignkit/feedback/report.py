"""What the admin page shows: a project's counts, agreement, each annotator's quality, the models' Bradley-Terry
ratings, and plots of them (PNG, drawn with matplotlib)."""

from __future__ import annotations

import io
import math

import numpy as np

from alignkit.feedback import agreement, ratings
from alignkit.feedback.export import FORMATS, battles, rating_matrix
from alignkit.feedback.store import NotFound, SQLiteStore

PLOTS = ("annotators", "items", "models")


def _num(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def project_stats(store: SQLiteStore, project: str, bootstrap_rounds: int = 200, leaderboard: bool = True) -> dict:
    """Counts, agreement (Krippendorff's alpha, Fleiss' kappa where every unit has as many ratings, pairwise
    agreement), the annotators' agreement with the consensus and with the gold items, and the leaderboard."""
    m = rating_matrix(store, project)
    x = m["ratings"]
    level = "nominal"
    stats: dict = {"project": project, "kind": m["kind"], "counts": store.counts(project), "formats": list(FORMATS),
                   "plots": [p for p in PLOTS if p != "models"]}
    agree = {"annotators": len(m["annotators"]), "units": len(m["units"]), "alpha": None,
             "pairwise_agreement": None, "fleiss_kappa": None}
    if x.size:
        agree["alpha"] = _num(agreement.krippendorff_alpha(x, level))
        agree["pairwise_agreement"] = _num(agreement.pairwise_agreement(x))
        counts = (~np.isnan(x)).sum(axis=0)
        multi = counts >= 2
        if multi.any() and len(set(counts[multi])) == 1:
            agree["fleiss_kappa"] = _num(agreement.fleiss_kappa(x[:, multi]))
    if m["kind"] == "ranking":
        agree["kendall_tau"] = _num(ranking_tau(store, project))
    stats["agreement"] = agree
    report = agreement.annotator_report(x, gold=m["gold"], level=level) if x.size else []
    stats["annotators"] = [{**{k: _num(v) if isinstance(v, float) else v for k, v in r.items()}, "annotator": name}
                           for name, r in zip(m["annotators"], report)]
    fights = battles(store, project) if leaderboard else []
    stats["leaderboard"] = (ratings.leaderboard_rows(ratings.bootstrap_ratings(fights, rounds=bootstrap_rounds))
                            if len({f["model_a"] for f in fights} | {f["model_b"] for f in fights}) >= 2 else [])
    if stats["leaderboard"]:  # votes between two named models: their ratings are plotted too
        stats["plots"].append("models")
    return stats


def ranking_tau(store: SQLiteStore, project: str) -> float:
    """Mean over items of the mean Kendall tau-b between every two annotators' rankings of the item."""
    positions: dict[int, list[list[int]]] = {}
    for v in store.votes(project):
        order = v["answer"]["ranking"]
        positions.setdefault(v["item"], []).append([order.index(r) for r in range(len(order))])
    taus = [agreement.mean_pairwise_tau(np.array(p, dtype=float)) for p in positions.values() if len(p) >= 2]
    taus = [t for t in taus if not math.isnan(t)]
    return float(np.mean(taus)) if taus else float("nan")


def plot_png(store: SQLiteStore, project: str, name: str) -> bytes:
    """One of :data:`PLOTS` as PNG bytes: the annotators' agreement with the consensus and with gold, the
    distribution of per-item agreement, or the models' ratings with their intervals."""
    if name not in PLOTS:
        raise NotFound(f"no plot {name!r}; plots: {', '.join(PLOTS)}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4), dpi=100)
    if name == "annotators":
        rows = project_stats(store, project, leaderboard=False)["annotators"]
        names = [r["annotator"] for r in rows]
        pos = np.arange(len(names))
        for k, (key, label) in enumerate((("agreement", "agreement with the others' consensus"),
                                          ("gold_accuracy", "accuracy on gold items"))):
            values = [r.get(key) if r.get(key) is not None else np.nan for r in rows]
            ax.bar(pos + (k - 0.5) * 0.4, values, width=0.4, label=label)
        ax.set_xticks(pos, names, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        ax.set_title("Annotators")
    elif name == "items":
        m = rating_matrix(store, project)
        per_unit = agreement.item_agreement(m["ratings"]) if m["ratings"].size else np.array([])
        ax.hist(per_unit[~np.isnan(per_unit)], bins=np.linspace(0, 1, 11), color="#1f6feb")
        ax.set_xlabel("share of agreeing pairs of judgements in the item")
        ax.set_ylabel("items")
        ax.set_title("Per-item agreement")
    else:
        rows = project_stats(store, project)["leaderboard"]
        y = np.arange(len(rows))[::-1]
        # a percentile interval need not contain the full-data fit (an unbeaten model): bars stop at the point
        ax.errorbar([r["rating"] for r in rows], y, xerr=[[max(0.0, r["rating"] - r["lower"]) for r in rows],
                                                         [max(0.0, r["upper"] - r["rating"]) for r in rows]], fmt="o")
        ax.set_yticks(y, [r["model"] for r in rows])
        ax.set_xlabel("Bradley-Terry rating (95% bootstrap interval)")
        ax.set_title("Models")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
