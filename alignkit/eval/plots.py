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
