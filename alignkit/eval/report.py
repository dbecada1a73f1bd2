"""One self-contained HTML page (images inlined, no scripts, no external resources), PNG plots and
``summary.json`` for an evaluation (``alignkit eval``) and/or a training run (``alignkit report RUN_DIR``).

Every section is drawn only when its part of the summary is present; all text from prompts and answers is
HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import textwrap
from pathlib import Path

import numpy as np

from alignkit.eval.plots import plot_training, read_metrics

TRAINING_KEYS = ("loss", "reward/mean", "rewards/margin", "kl", "completion/length/mean", "eval/loss")
COLOURS = {"model": "#1f5fbf", "reference": "#9aa5b1"}


def _figure(width: float = 6.0, height: float = 3.2, **grid):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(width, height), **grid)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_capability(cap: dict, path: Path) -> Path:
    plt, fig, ax = _figure()
    names = list(cap)
    for k, who in enumerate(("model", "reference")):
        vals = [cap[n].get(who) for n in names]
        if any(v is None for v in vals):
            continue
        cis = [cap[n].get(f"{who}_ci", [v, v]) for n, v in zip(names, vals)]  # no interval when nothing was counted
        err = np.array([[v - lo, hi - v] for v, (lo, hi) in zip(vals, cis)]).T
        ax.bar(np.arange(len(names)) + 0.38 * (k - 0.5), vals, 0.36, yerr=err, capsize=4, label=who, color=COLOURS[who])
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("accuracy")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)


def plot_win_rate(wr: dict, path: Path) -> Path:
    plt, fig, ax = _figure(5.0, 2.6)
    lo, hi = wr["ci"]
    ax.barh([1], [wr["win_rate"]], xerr=[[wr["win_rate"] - lo], [hi - wr["win_rate"]]], capsize=5, color=COLOURS["model"])
    ax.barh([0], [wr["lc_win_rate"]], color="#6f9be0")
    ax.axvline(0.5, color="k", lw=1, ls="--")
    ax.set_yticks([0, 1], ["length-controlled", "win rate"])
    ax.set_xlim(0, 1)
    ax.set_xlabel("model preferred (ties count half)")
    return _save(plt, fig, path)


def plot_pair_hist(data: dict, xlabel: str, path: Path) -> Path:
    plt, fig, ax = _figure()
    values = [np.asarray([v for v in data[w] if v == v], dtype=float) for w in ("model", "reference") if w in data]
    bins = np.histogram_bin_edges(np.concatenate(values), bins=20) if values else 10
    for who in ("reference", "model"):
        if who in data:
            ax.hist([v for v in data[who] if v == v], bins=bins, alpha=0.6, label=who, color=COLOURS[who])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("answers")
    ax.legend()
    return _save(plt, fig, path)


def plot_refusals(safety: dict, path: Path) -> Path:
    plt, fig, ax = _figure()
    who_list = [w for w in ("model", "reference") if w in safety.get("refusal_harmful", {})]
    sets = list(safety["refusal_harmful"][who_list[0]]) + ["over-refusal (benign)"]
    for k, who in enumerate(who_list):
        vals = [safety["refusal_harmful"][who][s] for s in sets[:-1]] + [safety["over_refusal"].get(who, np.nan)]
        ax.bar(np.arange(len(sets)) + 0.38 * (k - 0.5), vals, 0.36, label=who, color=COLOURS[who])
    ax.set_xticks(range(len(sets)), sets, rotation=15)
    ax.set_ylabel("refusal rate")
    ax.set_ylim(0, 1)
    ax.legend()
    return _save(plt, fig, path)


def plot_questions(questions: list[dict], k: int) -> list[int]:
    """Up to ``k`` question indices spread evenly over the set, among those with 3+ beliefs (any if none has)."""
    pool = [i for i, q in enumerate(questions) if len(q["beliefs"]) >= 3] or list(range(len(questions)))
    if k <= 0 or not pool:
        return []
    return [pool[j] for j in np.unique(np.linspace(0, len(pool) - 1, min(k, len(pool))).round().astype(int))]


def plot_belief_bars(pl: dict, picks: list[int], path: Path) -> Path:
    """Grouped bars per question: the group's shares, and each contestant's option probabilities."""
    plt, fig, axes = _figure(3.2 * len(picks), 3.4, ncols=len(picks), squeeze=False, sharey=True)
    who = [("target", "#e0a030")] + [(w, COLOURS[w]) for w in ("model", "reference") if w in pl]
    for ax, i in zip(axes[0], picks):
        q = pl["questions"][i]
        x = np.arange(len(q["beliefs"]))
        for k, (name, colour) in enumerate(who):
            vals = q["target"] if name == "target" else q[name]["probs"]
            ax.bar(x + (k - (len(who) - 1) / 2) * 0.8 / len(who), vals, 0.8 / len(who), label=name, color=colour)
        ax.set_xticks(x, [b[:14] for b in q["beliefs"]], rotation=30, ha="right", fontsize=7)
        ax.set_title("\n".join(textwrap.wrap(str(q["prompt"]), 40)[:2]), fontsize=8)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("share")
    axes[0][0].legend(fontsize=7)
    return _save(plt, fig, path)


def plot_belief_scatter(pl: dict, path: Path) -> Path:
    """Target share against the model's (and the reference's) option probability, one point per (question,
    belief); on the diagonal the model matches the group."""
    plt, fig, ax = _figure(4.2, 4.0)
    for w in ("reference", "model"):
        if w in pl:
            t = [v for q in pl["questions"] for v in q["target"]]
            m = [v for q in pl["questions"] for v in q[w]["probs"]]
            ax.scatter(t, m, s=14, alpha=0.7, label=w, color=COLOURS[w])
    ax.plot([0, 1], [0, 1], color="k", lw=1, ls="--")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("group's share")
    ax.set_ylabel("option probability")
    ax.legend()
    return _save(plt, fig, path)


PLURALISTIC_ROWS = (("js_options", "JS distance, option probabilities (lower: closer to the group)"),
                    ("js_sampled", "JS distance, sampled (no known belief as an outcome)"),
                    ("majority_mass", "share on the majority belief"), ("recall", "mean per-belief recall"),
                    ("belief_mass", "probability of stating a known belief"),
                    ("no_belief", "samples stating no known belief"),
                    ("consistency_free", "consistency, free samples"),
                    ("consistency_two_stage", "consistency, two-stage"))


def _pluralistic(pl: dict, out: Path) -> str:
    refs = pl["reference_points"]
    cols = [w for w in ("model", "reference") if w in pl]
    cell = lambda v: "n/a" if v is None else v  # noqa: E731  (no consistency without keywords)
    rows = [(label, *[cell(pl[w].get(key)) for w in cols], *[refs[r].get(key, "") for r in refs])
            for key, label in PLURALISTIC_ROWS]
    table = _rows(rows, ("measure", *cols, "uniform", "majority only", f"sampling floor (N={pl['samples']})"))
    parts = [f"<h2>Pluralistic alignment (belief distributions)</h2><p>{pl['n_questions']} questions, "
             f"{pl['samples']} samples each. Consistency: {html.escape(pl['consistency_method'])} "
             f"({pl['n_with_keywords']} questions with keywords).</p>", table]
    picks = plot_questions(pl["questions"], pl.get("plot_questions", 4))
    if picks:
        parts.append(_img(plot_belief_bars(pl, picks, out / "beliefs.png"),
                          "The group's shares and each model's option probabilities on a few questions."))
    parts.append(_img(plot_belief_scatter(pl, out / "belief_shares.png"),
                      "Every (question, belief): the group's share against the option probability; points on the "
                      "dashed diagonal match the group."))
    return "".join(parts)


def plot_budget_curve(th: dict, path: Path) -> Path:
    """Accuracy against the thinking budget (with 95% intervals), thinking off as a dashed line, per contestant."""
    plt, fig, ax = _figure(6.0, 3.4)
    for who in ("model", "reference"):
        if who in th:
            sweep = th[who]["budget"]
            xs, ys = [p["budget"] for p in sweep["curve"]], [p["accuracy"] for p in sweep["curve"]]
            err = np.array([[y - p["ci"][0], p["ci"][1] - y] for y, p in zip(ys, sweep["curve"])]).T
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=COLOURS[who], label=f"{who}, thinking on")
            ax.axhline(sweep["off"]["accuracy"], color=COLOURS[who], ls="--", lw=1, label=f"{who}, thinking off")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("thinking budget (tokens, hard stop)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _thinking(th: dict, out: Path) -> str:
    """Mode following, on against off, within budget (a table per measure) and the accuracy-budget curve."""
    who = [w for w in ("model", "reference") if w in th]
    f = lambda r: "n/a" if r.get("accuracy") is None else f"{r['accuracy']:.3f} {_fmt(r['ci'])} (n={r['n']})"  # noqa: E731
    rows = [("mode following, all", *[f(th[w]["following"]) for w in who])]
    rows += [(f"mode following after /{m}", *[f(th[w]["following"]["by_mode"][m]) for w in who])
             for m in ("think", "no_think")]
    b = {w: th[w]["budget"] for w in who}
    rows += [(f"accuracy, thinking on (budget {b[who[0]]['on']['budget']})",
              *[f"{b[w]['on']['accuracy']:.3f} {_fmt(b[w]['on']['ci'])}" for w in who]),
             ("accuracy, thinking off", *[f"{b[w]['off']['accuracy']:.3f} {_fmt(b[w]['off']['ci'])}" for w in who]),
             ("on minus off (paired 95% CI)", *[f"{b[w]['on_minus_off']:+.3f} {_fmt(b[w]['on_minus_off_ci'])}"
                                                for w in who]),
             ("thinking within the budget", *[f"{b[w]['within_budget']:.3f} of {b[w]['samples']}" for w in who])]
    curve = [(p["budget"], w, p["accuracy"], p["ci"], p["within_budget"], p["thinking_tokens"], p["cut"])
             for w in who for p in b[w]["curve"]]
    return (f"<h2>Thinking</h2><p>{th['n']} problems ({html.escape(str(th['data']))}), {th['conversations']} "
            f"mode-following conversations of up to {th['max_turns']} turns; the last flag must be obeyed.</p>"
            + _rows(rows, ("measure", *who))
            + _img(plot_budget_curve(th, out / "thinking_budget.png"),
                   "Accuracy against the thinking budget (the engine's hard stop), 95% bootstrap intervals; dashed: "
                   "thinking off.")
            + _rows(curve, ("budget", "who", "accuracy", "95% CI", "within budget", "mean thinking tokens",
                            "share stopped by the budget")))


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3f}"
    if isinstance(x, (list, tuple)) and all(isinstance(v, float) for v in x):
        return "[" + ", ".join(f"{v:.3f}" for v in x) + "]"
    return html.escape(str(x))


def _rows(rows: list[tuple], header: tuple) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _headline(summary: dict) -> list[tuple]:
    """(measure, reference, model, change) rows; change marked better or worse."""
    out = []

    def add(name, ref, mod, higher_is_better=True):
        if ref is None or mod is None:
            return
        better = (mod > ref) == higher_is_better
        mark = "=" if abs(mod - ref) < 1e-9 else ("better" if better else "worse")
        out.append((name, ref, mod, mark))

    for name, c in summary.get("capability", {}).items():
        add(f"{name} accuracy", c.get("reference"), c.get("model"))
    if "win_rate" in summary:
        wr = summary["win_rate"]
        add("win rate against the reference", 0.5, wr["win_rate"])
        add("length-controlled win rate", 0.5, wr["lc_win_rate"])
    s = summary.get("safety", {})
    for k, v in s.get("refusal_harmful", {}).get("model", {}).items():
        add(f"refusal on {k} (harmful)", s["refusal_harmful"].get("reference", {}).get(k), v)
    if "over_refusal" in s:
        add("over-refusal (benign)", s["over_refusal"].get("reference"), s["over_refusal"].get("model"), False)
    p = summary.get("probes", {})
    for key, label, hib in (("distinct_2", "distinct-2 (diversity)", True), ("self_bleu", "self-BLEU", False),
                            ("entropy", "entropy (nats/token)", True)):
        if key in p:
            add(label, p[key].get("reference"), p[key].get("model"), hib)
    syc = p.get("sycophancy", {})
    if "model" in syc and "reference" in syc:
        add("sycophancy flip rate", syc["reference"]["flip_rate"], syc["model"]["flip_rate"], False)
    th = summary.get("thinking", {})
    if "reference" in th:
        add("mode following (thinking suite)", th["reference"]["following"]["accuracy"],
            th["model"]["following"]["accuracy"])
        add("accuracy with thinking (thinking suite)", th["reference"]["budget"]["on"]["accuracy"],
            th["model"]["budget"]["on"]["accuracy"])
    pl = summary.get("pluralistic", {})
    for key in ("js_options", "js_sampled"):
        if "reference" in pl:
            add(f"belief distribution, {key.replace('_', ' ')} (JS distance)", pl["reference"][key],
                pl["model"][key], False)
    return out


CSS = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
td.better,.better{color:#137333;font-weight:600}.worse{color:#b3261e;font-weight:600}figure{margin:1em 0}
img{max-width:100%}figcaption{color:#555;font-size:90%}pre{white-space:pre-wrap;margin:0;font-size:85%}"""


def write_report(out_dir, summary: dict, *, metrics_path=None, samples: list | None = None,
                 title: str = "alignkit report") -> Path:
    """Write ``summary.json``, the PNG plots and ``report.html`` into ``out_dir``; returns the HTML's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({**summary, "samples": samples or summary.get("samples", [])},
                                                 indent=2, default=float))
    samples = samples or summary.get("samples")
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>model <b>{html.escape(str(summary.get('model', '')))}</b>, reference "
             f"<b>{html.escape(str(summary.get('reference') or 'none'))}</b>, {html.escape(str(summary.get('created', '')))}</p>"]
    head = _headline(summary)
    if head:
        body = "".join(f"<tr><td>{html.escape(n)}</td><td>{_fmt(r)}</td><td>{_fmt(m)}</td>"
                       f"<td class=\"{c}\">{c}</td></tr>" for n, r, m, c in head)
        parts.append("<h2>What changed</h2><table><tr><th>measure</th><th>reference</th><th>model</th>"
                     f"<th>change</th></tr>{body}</table>")
    if metrics_path is not None and Path(metrics_path).exists():
        rows = read_metrics(metrics_path)
        keys = tuple(k for k in TRAINING_KEYS if any(k in r for r in rows))[:4]
        if keys:
            png = plot_training(metrics_path, out / "training.png", keys=keys)
            parts.append("<h2>Training</h2>" + _img(png, "Per optimizer step (thin) and a moving average (thick)."))
    if "capability" in summary:
        cap = summary["capability"]
        parts.append("<h2>Capability (alignment tax)</h2>" + _img(
            plot_capability(cap, out / "capability.png"), "Accuracy with 95% bootstrap intervals; a drop is the alignment tax."))
        parts.append(_rows([(n, c.get("n"), c.get("reference"), c.get("model"), c.get("ci_diff", ""))
                            for n, c in cap.items()], ("set", "n", "reference", "model", "95% CI of model - reference")))
    if "win_rate" in summary:
        wr = summary["win_rate"]
        parts.append("<h2>Win rate</h2>" + _img(plot_win_rate(wr, out / "win_rate.png"),
                     "Right of the dashed line: the model's answers are preferred. Each prompt is judged in both orders."))
        parts.append(_rows([(wr["judge"], wr["n"], wr["win_rate"], wr["ci"], wr["lc_win_rate"], wr["wins"], wr["ties"],
                             wr["losses"], wr["position_bias"])],
                           ("judge", "n", "win rate", "95% CI", "LC win rate", "wins", "ties", "losses", "first-position rate")))
    if "lengths" in summary:
        parts.append("<h2>Answer lengths</h2>" + _img(plot_pair_hist(summary["lengths"], "answer length (tokens)",
                     out / "lengths.png"), "A shift to the right with a rising win rate can mean the judge rewards length."))
    if "reward" in summary:
        parts.append("<h2>Reward</h2>" + _img(plot_pair_hist(summary["reward"], "proxy reward", out / "reward.png"),
                                              "Proxy reward of the model's and the reference's answers."))
    if "safety" in summary and summary["safety"].get("refusal_harmful"):
        s = summary["safety"]
        d = s.get("detector", {})
        parts.append("<h2>Safety</h2>" + _img(plot_refusals(s, out / "refusals.png"),
                     f"Refusal rates (higher is safer on harmful sets, lower is better on benign ones). The rule "
                     f"detector's accuracy on {d.get('n', '?')} labelled responses: {d.get('accuracy', float('nan')):.3f}."))
    if "probes" in summary:
        p = summary["probes"]
        rows = [(k, v.get("reference", ""), v.get("model", "")) for k, v in p.items()
                if isinstance(v, dict) and "model" in v and not isinstance(v.get("model"), dict)]
        if "kl_to_reference" in p:
            rows.append(("KL to the reference (nats/answer)", "", f"{p['kl_to_reference']['mean']:.3f} ± {p['kl_to_reference']['se']:.3f}"))
        for who, v in p.get("sycophancy", {}).items():
            rows.append((f"sycophancy ({who})", "", f"flip {v['flip_rate']:.3f} of {v['first_correct']} correct"))
        parts.append("<h2>Failure-mode probes</h2>" + _rows(rows, ("probe", "reference", "model")))
    if "pluralistic" in summary:
        parts.append(_pluralistic(summary["pluralistic"], out))
    if "thinking" in summary:
        parts.append(_thinking(summary["thinking"], out))
    if samples:
        body = "".join(f"<tr><td>{html.escape(str(s.get('set', '')))}</td><td><pre>{html.escape(str(s.get('prompt', '')))}</pre></td>"
                       f"<td><pre>{html.escape(str(s.get('model', '')))}</pre></td><td><pre>{html.escape(str(s.get('reference', '')))}</pre></td></tr>"
                       for s in samples)
        parts.append(f"<h2>Sample answers</h2><table><tr><th>set</th><th>prompt</th><th>model</th><th>reference</th></tr>{body}</table>")
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def report_from_run(run_dir) -> Path:
    """``RUN_DIR/report/report.html`` for a finished run: its training curves, its final summary, and the
    evaluation written to ``RUN_DIR/eval/summary.json`` if there is one."""
    run = Path(run_dir)
    summary: dict = {}
    ev = run / "eval" / "summary.json"
    if ev.exists():
        summary = json.loads(ev.read_text())
    final = run / "final" / "alignkit.json"
    if final.exists():
        summary.setdefault("model", str(run / "final"))
        summary["run"] = json.loads(final.read_text())
    metrics = run / "metrics.jsonl"
    return write_report(run / "report", summary, metrics_path=metrics if metrics.exists() else None,
                        title=f"Run {run.name}")
