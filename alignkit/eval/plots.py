"""Plots of a run's ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_training(metrics_path: Path, png: Path, keys: tuple[str, ...] = ("loss", "rewards/margin")) -> Path:
    """One panel per metric over optimizer steps (raw values and a moving average)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    keys = tuple(k for k in keys if any(k in r for r in rows))
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        steps, vals = zip(*pts)
        ax.plot(steps, vals, color="#9ab", lw=1, label="per step")
        w = max(1, len(vals) // 10)
        smooth = [sum(vals[max(0, i - w + 1) : i + 1]) / len(vals[max(0, i - w + 1) : i + 1]) for i in range(len(vals))]
        ax.plot(steps, smooth, color="#14a", lw=2, label=f"mean of {w}")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# Panels for a training run's overview, each a title and the metric keys drawn in it. A key ending in "/"
# stands for every key that starts with it (the per-reward-function evaluation keys, say).
TRAINING_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss", "policy/loss", "value/loss")),
    ("reward", ("reward/mean", "eval/reward/", "eval/reward")),
    ("preference margin", ("rewards/margin",)),
    ("KL to reference", ("kl", "objective/kl")),
    ("completion length (tokens)", ("completion/length/mean", "eval/length")),
    ("entropy", ("entropy",)),
    ("PPO clip fraction", ("policy/clip_frac",)),
)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def training_panels(rows: list[dict], panels=TRAINING_PANELS, max_panels: int = 6) -> list[tuple[str, list[str]]]:
    """The panels of ``panels`` with at least one numeric key present in ``rows`` and the keys found for each."""
    present = sorted({k for r in rows for k, v in r.items() if _is_number(v)})
    out = []
    for title, wanted in panels:
        keys: list[str] = []
        for w in wanted:
            hits = [k for k in present if k.startswith(w)] if w.endswith("/") else [w] if w in present else []
            keys += [k for k in hits if k not in keys]
        if keys:
            out.append((title, keys))
    return out[:max_panels]


def plot_training_panels(metrics_path: Path, png: Path, panels=TRAINING_PANELS) -> Path | None:
    """A grid of panels (loss, reward, KL, length, ...) over steps, only for the keys the run logged.

    Dense per-step series get a moving average on top; sparse ones (evaluations every N steps) are drawn
    with markers. Returns ``None`` when the file has none of the keys.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    chosen = training_panels(rows, panels)
    if not chosen:
        return None
    ncols = min(3, len(chosen))
    nrows = (len(chosen) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.3 * nrows), squeeze=False)
    colors = ["#1f4e9c", "#c0392b", "#2e8b57", "#8e44ad", "#d68910"]
    for ax, (title, keys) in zip(axes.flat, chosen):
        for i, key in enumerate(keys):
            pts = [(r.get("step", n), r[key]) for n, r in enumerate(rows) if _is_number(r.get(key))]
            steps, vals = zip(*pts)
            color = colors[i % len(colors)]
            if len(vals) >= 10:
                w = max(1, len(vals) // 10)
                smooth = [sum(vals[max(0, j - w + 1) : j + 1]) / len(vals[max(0, j - w + 1) : j + 1]) for j in range(len(vals))]
                ax.plot(steps, vals, color=color, alpha=0.3, lw=1)
                ax.plot(steps, smooth, color=color, lw=2, label=f"{key} (mean of {w})" if w > 1 else key)
            else:
                ax.plot(steps, vals, color=color, lw=1.5, marker="o", ms=4, label=key)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(chosen) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)
