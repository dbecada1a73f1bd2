"""The feedback loop on the default model with a simulated crowd: does each round's reward model get better,
does the promoted policy beat the one before, does dropping low-agreement annotators help, and does active
selection need fewer votes?

The crowd's hidden utility (:func:`utility`) on ASDiv word problems: a correct final answer is worth 1, and each
word costs 1/40 (a crowd that wants correct, short answers). ``crowd_size`` annotators vote on each pair with
P(a > b) = sigmoid((u(a) - u(b)) / temperature); a share of them (``adversarial``) vote against their own
judgement. Each round, the current policy answers ``items`` training problems twice, the crowd votes
(``overlap`` annotators per pair), and ``alignkit loop`` trains and compares (see ``alignkit/recipes/loop.py``).

Runs (each one ``alignkit loop`` into OUTPUT/<name>):

- ``main``: DPO on the voted pairs, adversaries dropped (``min_annotator_agreement``), ``rounds`` rounds: the
  reward model's accuracy on the frozen gold set (pairs of held-out answers ordered by the hidden utility) per
  round, the new policy's win rate against the current one by the hidden utility, promoted or rolled back;
- ``keep_all`` and ``filtered``: the reward model only (``align=none``), on the same proposals and the same votes
  (same seeds), without and with dropping low-agreement annotators;
- ``uniform`` and ``uncertain``: the reward model only, ``votes`` votes a round (one annotator per pair, no
  adversaries) on pairs shown in random order or least-certain first out of ``pool`` x ``items`` proposed; their
  gold set is made from ``gold`` held-out problems (the 150 and more drawn from the training pool), so that the
  two runs' accuracies differ by more than the gold set's sampling error (``uncertain`` reads ``uniform``'s
  gold_pairs.jsonl, ``gold_data``, when it is there).

``active_summary=DIR,DIR,...`` runs nothing: it reads the ``uniform`` and ``uncertain`` runs of several seeds
(each ``only=uniform,uncertain seed=S output_dir=DIR``) and writes, into the first DIR, active_selection.md and
active_selection.png: each seed's curves, their mean, and the votes each selection needs to reach ``target``
(default: the mean accuracy of random order after all its votes).

Writes OUTPUT/report.md (with the paired bootstrap of the filter's gain on the gold set), OUTPUT/feedback_demo.json
and OUTPUT/feedback_loop.png; with ``screenshots=1`` also
screenshots of the app on the main run's store (OUTPUT/app_*.png, needs Playwright and Chromium). Settings:
``python scripts/feedback_demo.py rounds=2 items=32``; ``only=main,uniform`` runs some; ``resume=1`` keeps
finished runs' rounds.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grpo_job import resolve_precision, write_data  # noqa: E402

from alignkit.data.answers import is_correct  # noqa: E402

DEFAULTS = dict(model="smollm2-135m-instruct", output_dir="outputs/feedback_demo", precision="auto", seed=0,
                rounds=3, items=48, overlap=3, crowd_size=8, adversarial=0.25, temperature=0.1,
                min_annotator_agreement=0.5, max_new_tokens=96, lr=2e-4, beta=0.1, dpo_epochs=3, rm_lr=5e-5,
                rm_epochs=2, compare_prompts=64, active_rounds=4, votes=24, pool=4, gold=600, only="", resume=0, screenshots=1,
                active_summary="", target=0.0)
RUNS = ("main", "keep_all", "filtered", "uniform", "uncertain")


def utility(prompts, completions, answer, **_):
    """The crowd's hidden utility: 1 for a correct final answer, minus 1/40 per word."""
    return [float(is_correct(c, a)) - len(c.split()) / 40 for c, a in zip(completions, answer)]


def settings(argv: list[str]) -> dict:
    s = {**DEFAULTS, **dict(a.split("=", 1) for a in argv)}
    s = {k: type(DEFAULTS[k])(v) if isinstance(DEFAULTS.get(k), (int, float)) else v for k, v in s.items()}
    s["precision"] = resolve_precision({"precision": s["precision"]})["precision"]
    return s


def loop_args(s: dict, name: str, data: tuple[Path, ...]) -> list[str]:
    common = dict(model=s["model"], data=data[0], eval_data=data[1], output_dir=Path(s["output_dir"]) / name,
                  seed=s["seed"], precision=s["precision"], rollout_precision=s["precision"],
                  crowd=f"{Path(__file__).resolve()}:utility", crowd_size=s["crowd_size"],
                  crowd_temperature=s["temperature"], max_new_tokens=s["max_new_tokens"], temperature=1.0,
                  rm_lr=s["rm_lr"], rm_epochs=s["rm_epochs"], lr=s["lr"], beta=s["beta"], epochs=s["dpo_epochs"],
                  lora=True, lora_r=16, lora_alpha=32, batch_size=8, max_length=512, progress=False, log_every=10,
                  compare_prompts=s["compare_prompts"], min_items=4,
                  **({"resume": True} if s["resume"] else {"overwrite": True}))
    if name in ("uniform", "uncertain"):
        common["data"], common["eval_data"] = data[2], data[3]
        made = Path(s["output_dir"]) / "uniform" / "gold_pairs.jsonl"
        if name == "uncertain" and made.exists():  # the same seed and base policy: the same pairs, made once
            common["gold_data"] = made
    runs = {
        "main": dict(rounds=s["rounds"], items_per_round=s["items"], overlap=s["overlap"],
                     crowd_adversarial=s["adversarial"], min_annotator_agreement=s["min_annotator_agreement"]),
        "keep_all": dict(rounds=s["rounds"], items_per_round=s["items"], overlap=s["overlap"],
                         crowd_adversarial=s["adversarial"], align="none"),
        "filtered": dict(rounds=s["rounds"], items_per_round=s["items"], overlap=s["overlap"],
                         crowd_adversarial=s["adversarial"], min_annotator_agreement=s["min_annotator_agreement"],
                         align="none"),
        "uniform": dict(rounds=s["active_rounds"], items_per_round=s["votes"], pool_factor=s["pool"], overlap=1,
                        crowd_votes=s["votes"], selection="uniform", align="none"),
        "uncertain": dict(rounds=s["active_rounds"], items_per_round=s["votes"], pool_factor=s["pool"], overlap=1,
                          crowd_votes=s["votes"], selection="uncertain", align="none"),
    }
    return [f"{k}={v}" for k, v in {**common, **runs[name]}.items()]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, names, title in ((axes[0], ("main", "keep_all", "filtered"), "adversaries kept or dropped"),
                             (axes[1], ("uniform", "uncertain"), "active selection")):
        for name in names:
            if name in results:
                rounds = results[name]["rounds"]
                ax.plot([r["votes_used"] for r in rounds], [r["rm_gold_accuracy"] for r in rounds], "o-", label=name)
        ax.set_xlabel("votes used")
        ax.set_ylabel("reward model accuracy on the gold set")
        ax.set_title(title)
        ax.legend(fontsize=8)
    if "main" in results:
        rounds = [r for r in results["main"]["rounds"] if r["compare"]]
        ks = [r["round"] for r in rounds]
        rate = [r["compare"]["win_rate"] for r in rounds]
        axes[2].errorbar(ks, rate, yerr=[[w - r["compare"]["lower"] for w, r in zip(rate, rounds)],
                                         [r["compare"]["upper"] - w for w, r in zip(rate, rounds)]], fmt="o")
        axes[2].axhline(0.5, color="grey", lw=0.8)
        axes[2].set_xticks(ks)
        axes[2].set_xlabel("round")
        axes[2].set_ylabel("win rate, new vs current policy")
        axes[2].set_title("hidden-utility win rate (95% Wilson)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def paired_filter_gain(out: Path, rounds: int, resamples: int = 10_000) -> dict:
    """Each round, the gold-set accuracy of the reward model trained without the adversaries (``filtered``) minus
    that of the one trained on every vote (``keep_all``), on the same gold pairs, with a paired bootstrap 95%
    interval."""
    import random

    from alignkit.models.reward import RewardScorer

    gold = [json.loads(line) for line in (out / "keep_all" / "gold_pairs.jsonl").read_text().splitlines()]

    def correct(path: Path) -> list[float]:
        scorer = RewardScorer.load(path, precision="bf16")
        chosen = scorer.score([g["prompt"] for g in gold], [g["chosen"] for g in gold]).tolist()
        rejected = scorer.score([g["prompt"] for g in gold], [g["rejected"] for g in gold]).tolist()
        return [float(c > r) for c, r in zip(chosen, rejected)]

    result = {}
    for k in range(1, rounds + 1):
        kept, dropped = (correct(out / name / f"round_{k}" / "rm" / "final") for name in ("keep_all", "filtered"))
        diff = [b - a for a, b in zip(kept, dropped)]
        rng = random.Random(k)
        boots = sorted(sum(rng.choice(diff) for _ in diff) / len(diff) for _ in range(resamples))
        result[k] = {"keep_all": sum(kept) / len(kept), "filtered": sum(dropped) / len(dropped),
                     "gain": sum(diff) / len(diff), "lower": boots[int(0.025 * resamples)],
                     "upper": boots[int(0.975 * resamples) - 1]}
    return result


def screenshots(store: Path, out: Path) -> list[str]:
    """The annotator's page (a pair to judge) and the admin page on the main run's store."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import shutil

    from _feedback_server import serving
    from playwright.sync_api import sync_playwright

    from alignkit.feedback.store import SQLiteStore

    import sqlite3

    copy = out / "app_store.sqlite"  # a copy: the run's own store stays as the loop left it
    copy.unlink(missing_ok=True)
    with sqlite3.connect(store) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    db = SQLiteStore(copy)
    last = max(db.items("loop"), key=lambda it: it["id"])  # one more pair to judge, as a person would see it
    db.add_items("loop", [{"prompt": last["prompt"], "responses": last["responses"], "meta": {"demo": True}}])
    admin, person = db.add_annotator("admin", "admin"), db.add_annotator("a-person")
    shots = []
    with serving(copy) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        for page_name, token, path, width in (("app_pairwise.png", person, "/", 1100), ("app_admin.png", admin, "/admin", 1100)):
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.goto(server.url + path)
            page.fill("#token", token)
            page.click("#login-form button")
            if path == "/":
                page.click("[data-project]")
                page.wait_for_selector("#responses .card")
            else:
                page.wait_for_selector("#plots img")
                page.wait_for_load_state("networkidle")
            page.screenshot(path=str(out / page_name), full_page=True)
            shots.append(page_name)
            page.close()
        browser.close()
    return shots


def votes_to_reach(rounds: list[dict], target: float) -> int | None:
    """The fewest votes after which the reward model's gold accuracy is at least ``target`` (None: never)."""
    return next((r["votes_used"] for r in rounds if r["rm_gold_accuracy"] >= target), None)


def voted_gaps(run: Path) -> dict[int, dict]:
    """Per round, over the pairs voted on in ``run``'s store: the mean hidden-utility gap ``|u(a) - u(b)|`` and the
    share of pairs with one answer correct and the other not (what the crowd judges surely): what a selection
    shows the annotators."""
    from alignkit.feedback.store import SQLiteStore

    store = SQLiteStore(run / "feedback.sqlite")
    items = {it["id"]: it for it in store.items("loop")}
    rounds: dict[int, list[tuple[float, bool]]] = {}
    for vote in store.votes("loop"):
        it = items[vote["item"]]
        texts, answer = [r["text"] for r in it["responses"]], it["meta"]["columns"]["answer"]
        ua, ub = utility(None, texts, [answer, answer])
        rounds.setdefault(it["meta"]["round"], []).append(
            (abs(ua - ub), is_correct(texts[0], answer) != is_correct(texts[1], answer)))
    return {k: {"gap": sum(g for g, _ in v) / len(v), "one_correct": sum(c for _, c in v) / len(v), "votes": len(v)}
            for k, v in sorted(rounds.items())}


def active_summary(dirs: list[Path], target: float) -> str:
    """Random order against least-certain first over seeds: each seed's accuracies, the mean curve, and the votes
    each needs to reach ``target`` (default: random order's mean accuracy after all its votes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads((d / "feedback_demo.json").read_text()) for d in dirs]
    seeds = [r["settings"]["seed"] for r in runs]
    curves = {name: [r["results"][name]["rounds"] for r in runs] for name in ("uniform", "uncertain")}
    votes = [x["votes_used"] for x in curves["uniform"][0]]
    mean = {name: [sum(c[i]["rm_gold_accuracy"] for c in cs) / len(cs) for i in range(len(votes))]
            for name, cs in curves.items()}
    target = target or mean["uniform"][-1]
    sizes = sorted({r["results"][name]["rounds"][0]["gold_pairs"] for r in runs for name in curves})
    gold = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    lines = [f"# Active selection over {len(runs)} seeds ({gold} gold pairs each)", "",
             "| seed | selection | " + " | ".join(f"{v} votes" for v in votes) + f" | votes to reach {target:.3f} | "
             "mean after round 1 |", "|---|---|" + "---|" * (len(votes) + 2)]

    def row(label: str, name: str, acc: list[float]) -> str:
        points = [{"votes_used": v, "rm_gold_accuracy": a} for v, a in zip(votes, acc)]
        later = acc[1:] or acc  # round 1 shows the same random pairs to both
        return (f"| {label} | {name} | " + " | ".join(f"{a:.3f}" for a in acc)
                + f" | {votes_to_reach(points, target) or 'not reached'} | {sum(later) / len(later):.3f} |")

    for i, seed in enumerate(seeds):
        lines += [row(str(seed), name, [x["rm_gold_accuracy"] for x in curves[name][i]]) for name in curves]
    lines += [row("mean", name, mean[name]) for name in curves]
    if all((d / name / "feedback.sqlite").exists() for d in dirs for name in curves):
        gaps = {name: [voted_gaps(d / name) for d in dirs] for name in curves}
        ks = sorted(gaps["uniform"][0])
        lines += ["", "The pairs voted on, each round (mean over seeds): the hidden-utility gap |u(a) - u(b)|, and the "
                  "share with one answer correct and the other not", "",
                  "| selection | " + " | ".join(f"round {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for name, per_seed in gaps.items():
            cells = [(sum(g[k]["gap"] for g in per_seed) / len(per_seed),
                      sum(g[k]["one_correct"] for g in per_seed) / len(per_seed)) for k in ks]
            lines.append(f"| {name} | " + " | ".join(f"{gap:.2f} ({one:.2f})" for gap, one in cells) + " |")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, color in (("uniform", "tab:blue"), ("uncertain", "tab:orange")):
        for rounds in curves[name]:
            ax.plot(votes, [x["rm_gold_accuracy"] for x in rounds], color=color, alpha=0.3, lw=0.8)
        ax.plot(votes, mean[name], "o-", color=color, label=f"{name} (mean of {len(runs)} seeds)")
    ax.axhline(target, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("votes used")
    ax.set_ylabel(f"reward model accuracy on the gold set ({gold} pairs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dirs[0] / "active_selection.png", dpi=110)
    plt.close(fig)
    text = "\n".join(lines) + "\n\n![active selection](active_selection.png)\n"
    (dirs[0] / "active_selection.md").write_text(text)
    return text


def main(argv: list[str]) -> None:
    from alignkit.cli import main as cli

    s = settings(argv)
    if s["active_summary"]:
        print(active_summary([Path(d) for d in s["active_summary"].split(",")], s["target"]))
        return
    out = Path(s["output_dir"])
    data = write_data(out / "data", "all")[:2] + write_data(out / "data_gold", "all", s["gold"] - 150)[:2]
    results, minutes = {}, {}
    for name in [r for r in RUNS if not s["only"] or r in s["only"].split(",")]:
        t = time.time()
        code = cli(["loop", *loop_args(s, name, data)])
        minutes[name] = (time.time() - t) / 60
        if code != 0:
            raise SystemExit(f"the {name} run failed (exit {code})")
        results[name] = json.loads((out / name / "summary.json").read_text())
        print(f"[feedback demo] {name}: {minutes[name]:.1f} min", flush=True)
    plot(results, out / "feedback_loop.png")
    shots = screenshots(out / "main" / "feedback.sqlite", out) if s["screenshots"] and "main" in results else []
    gain = paired_filter_gain(out, s["rounds"]) if {"keep_all", "filtered"} <= set(results) else {}
    (out / "feedback_demo.json").write_text(json.dumps({"settings": s, "minutes": minutes, "results": results,
                                                        "filter_gain": gain, "screenshots": shots}, indent=2,
                                                       default=str))
    lines = ["# The feedback loop on the default model, simulated crowd", "",
             f"Settings: {json.dumps({k: v for k, v in s.items() if k not in ('only', 'resume')})}", ""]
    for name, res in results.items():
        lines += [f"## {name} ({minutes[name]:.1f} min)", "",
                  "| round | votes used | dropped annotators | RM gold accuracy | win rate [95%] | promoted |",
                  "|---|---|---|---|---|---|"]
        for r in res["rounds"]:
            c = r["compare"]
            win = f"{c['win_rate']:.3f} [{c['lower']:.3f}, {c['upper']:.3f}]" if c else "-"
            lines.append(f"| {r['round']} | {r['votes_used']} | {len(r['dropped_annotators'])} | "
                         f"{r['rm_gold_accuracy']:.3f} | {win} | {r['promoted']} |")
        lines.append("")
    if gain:
        lines += ["## Dropping the adversaries: gold-set accuracy, filtered minus keep_all (paired bootstrap 95%)", "",
                  "| round | keep_all | filtered | gain [95%] |", "|---|---|---|---|"]
        lines += [f"| {k} | {g['keep_all']:.3f} | {g['filtered']:.3f} | {g['gain']:+.3f} [{g['lower']:+.3f}, "
                  f"{g['upper']:+.3f}] |" for k, g in gain.items()]
        lines.append("")
    lines.append("![reward model accuracy and win rates](feedback_loop.png)")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
