"""Constitutional AI on the default model, measured: SL-CAI, then RL-CAI, each evaluated against the base model.

1. Data. Harmful requests from Do-Not-Answer, HarmBench and AdvBench (``alignkit data fetch``), split by prompt:
   ``heldout`` per set are held out for evaluation, ``train_harmful`` per set are trained on; ``train_benign``
   ASDiv training problems (never the 150 held-out ones) are mixed in, so the model also sees requests it should
   simply answer. The over-refusal set (benign look-alikes) is only evaluated on.
2. The judge's labeler alignment (``alignkit cai stage=align``) on PyRIT's human-labelled refusal pairs, asked the
   constitution's helpfulness question, and on the ASDiv program oracle: measured and reported, never assumed.
3. SL-CAI (``stage=critique``): the base model answers, critiques its answer by a principle drawn at random and
   revises it; LoRA SFT on prompt -> final revision gives the SL-CAI model.
4. RL-CAI (``stage=label``): the SL-CAI model samples two answers per prompt, the judge labels them by the
   constitution (both orders, ``principles`` principles per pair, soft labels); DPO on those labels from the SL-CAI
   model (the soft label as conservative DPO's per-pair smoothing) gives the RL-CAI model. The paper trains a
   preference model and runs PPO; DPO on the labels is the direct form of the same step.
5. ``alignkit eval`` of each model against the base: refusal rate on the held-out harmful prompts, over-refusal on
   the benign look-alikes, ASDiv accuracy (the alignment tax), with 95% bootstrap intervals.

Every answer, critique and revision is sampled at temperature 0.7 with top-p 0.9: at temperature 1 most of
the default model's samples are incoherent, and so would be its revisions. Writes ``OUTPUT/report.md``. Any
setting can be overridden: ``python scripts/cai_demo.py heldout=10 output_dir=x``. The judge defaults to the
model itself (weak: its measured alignment says how weak); ``judge=llm:PATH`` or an endpoint
(``judge=http://... judge_model=NAME``) uses a stronger one.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grpo_job import resolve_precision  # noqa: E402

from alignkit.config import CAIConfig, DPOConfig, EvalConfig, SFTConfig, build  # noqa: E402
from alignkit.data.asdiv import load_samples, user_message  # noqa: E402
from alignkit.data.sources import fetch  # noqa: E402
from alignkit.eval.safety import HARMFUL_SETS, harmful_prompts  # noqa: E402
from alignkit.recipes import cai, dpo, evaluate, sft  # noqa: E402

DEFAULTS = dict(model="smollm2-135m-instruct", judge="", judge_model="", output_dir="outputs/cai_demo", heldout=30,
                train_harmful=20, train_benign=40, rounds=1, principles=2, max_new_tokens=96, temperature=0.7, top_p=0.9, seed=0,
                precision="auto", lora_r=16, sft_lr=2e-4, sft_epochs=2, dpo_lr=5e-5, dpo_epochs=2, beta=0.1,
                min_alignment=0.0, alignment_limit=60, capability_limit=150, benign_limit=0)


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_data(out: Path, s: dict) -> tuple[Path, Path]:
    """``prompts.jsonl`` (harmful and benign training prompts, with ids) and ``heldout_harmful.jsonl``
    (``prompt``, ``set``): each harmful set's prompts in a fixed hashed order, the first ``heldout`` held out."""
    out.mkdir(parents=True, exist_ok=True)
    train, held = [], []
    for name in HARMFUL_SETS:
        prompts = sorted({p for _, p in harmful_prompts(None, (name,))}, key=_key)
        held += [{"prompt": p, "set": name} for p in prompts[: s["heldout"]]]
        train += [{"id": f"{name}-{_key(p)[:10]}", "prompt": p}
                  for p in prompts[s["heldout"] : s["heldout"] + s["train_harmful"]]]
    rows = {r["id"]: r for r in map(json.loads, (fetch("asdiv") / "data.jsonl").read_text().splitlines())}
    samples = load_samples()[:-150]  # the last 150 are the main jobs' held-out problems
    train += [{"id": f"asdiv-{x['id']}", "prompt": user_message(rows[x["id"]])[0]["content"]}
              for x in samples[: s["train_benign"]]]
    paths = out / "prompts.jsonl", out / "heldout_harmful.jsonl"
    for path, part in zip(paths, (train, held)):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


def evaluate_against_base(model: str, name: str, held: Path, out: Path, s: dict) -> dict:
    cfg = build(EvalConfig, overrides=dict(
        model=model, reference=s["model"], output_dir=str(out / f"eval_{name}"), suites="capability,safety",
        harmful_data=str(held), math500_limit=0, ifbench_limit=0, capability_limit=s["capability_limit"],
        benign_limit=s["benign_limit"], max_new_tokens=s["max_new_tokens"],
        precision=s["precision"], seed=s["seed"]))
    return evaluate.run(cfg)


def main(argv: list[str]) -> None:
    t0 = time.time()
    s = {**DEFAULTS, **dict(a.split("=", 1) for a in argv)}
    s = {k: type(DEFAULTS[k])(v) if isinstance(DEFAULTS.get(k), (int, float)) and not isinstance(v, bool) else v
         for k, v in s.items()}
    s["precision"] = resolve_precision({"precision": s["precision"]})["precision"]
    out = Path(s["output_dir"])
    prompts, held = write_data(out / "data", s)
    minutes: dict[str, float] = {}

    def timed(stage, fn, *args):
        t = time.time()
        result = fn(*args)
        minutes[stage] = (time.time() - t) / 60
        print(f"[cai demo] {stage}: {minutes[stage]:.1f} min", flush=True)
        return result

    common = dict(model=s["model"], max_new_tokens=s["max_new_tokens"], seed=s["seed"], precision=s["precision"],
                  temperature=s["temperature"], top_p=s["top_p"],
                  judge=s["judge"], judge_model=s["judge_model"], principles_per_pair=s["principles"])
    judge = s["judge"].removeprefix("llm:") or s["model"]
    align = {}
    for label_set, principles in (("refusal", "helpfulness"), ("asdiv-prefs", "helpfulness,honesty")):
        cfg = build(CAIConfig, overrides={**common, "stage": "align", "alignment_set": label_set, "overwrite": True,
                                          "alignment_principles": principles, "alignment_limit": s["alignment_limit"],
                                          "output_dir": str(out / f"align_{label_set}")})
        align[label_set] = timed(f"labeler alignment ({label_set})", cai.run, cfg)
    sl_data = timed("SL-CAI critique and revision", cai.run, build(CAIConfig, overrides={
        **common, "stage": "critique", "data": str(prompts), "rounds": s["rounds"], "output_dir": str(out / "sl_data"),
        "overwrite": True}))
    sl = timed("SL-CAI fine-tuning", sft.run, build(SFTConfig, overrides=dict(
        model=s["model"], data=sl_data["files"]["data"], output_dir=str(out / "sl"), lora=True, lora_r=s["lora_r"],
        lora_alpha=2 * s["lora_r"], lr=s["sft_lr"], epochs=s["sft_epochs"], batch_size=8, precision=s["precision"],
        seed=s["seed"], overwrite=True, progress=False)))
    sl_model = str(out / "sl" / "final")
    rl_data = timed("RL-CAI labels", cai.run, build(CAIConfig, overrides={
        **common, "stage": "label", "model": sl_model, "judge": s["judge"] or f"llm:{s['model']}",
        "data": str(prompts), "output_dir": str(out / "rl_data"), "overwrite": True,
        "alignment_set": "refusal", "alignment_principles": "helpfulness", "alignment_limit": s["alignment_limit"],
        "min_alignment": s["min_alignment"]}))
    rl = timed("RL-CAI DPO", dpo.run, build(DPOConfig, overrides=dict(
        model=sl_model, data=rl_data["files"]["data"], output_dir=str(out / "rl"), lora=True, lora_r=s["lora_r"],
        lora_alpha=2 * s["lora_r"], lr=s["dpo_lr"], epochs=s["dpo_epochs"], beta=s["beta"], batch_size=4,
        precision=s["precision"], seed=s["seed"], overwrite=True, progress=False)))
    evals = {name: timed(f"eval {name}", evaluate_against_base, model, name, held, out, s)
             for name, model in (("sl", sl_model), ("rl", str(out / "rl" / "final")))}
    total = (time.time() - t0) / 60
    report = render(s, judge, align, sl_data, sl, rl_data, rl, evals, minutes, total)
    (out / "report.md").write_text(report)
    (out / "cai_demo.json").write_text(json.dumps({"settings": s, "minutes": minutes, "total_minutes": total,
                                                   "alignment": align, "sl_data": sl_data, "sl": sl, "rl_data": rl_data, "rl": rl,
                                                   "evals": evals}, indent=2, default=str))
    print(report)


def _rate(value: float, ci) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _diff(ci) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def render(s, judge, align, sl_data, sl, rl_data, rl, evals, minutes, total) -> str:
    def row(label, get_value, get_ci, get_diff):
        base = evals["sl"]
        cells = [_rate(get_value(base, "reference"), get_ci(base, "reference"))]
        for name in ("sl", "rl"):
            e = evals[name]
            change = f", change {_diff(get_diff(e))}" if get_diff else ""
            cells.append(f"{_rate(get_value(e, 'model'), get_ci(e, 'model'))}{change}")
        return f"| {label} | " + " | ".join(cells) + " |"

    safety = lambda e: e["safety"]  # noqa: E731
    asdiv = lambda e: e["capability"]["asdiv"]  # noqa: E731
    n_h, n_b, n_a = (safety(evals["sl"])["n_harmful"], safety(evals["sl"])["n_benign"],
                     asdiv(evals["sl"])["n"])
    lines = [
        f"# Constitutional AI on {s['model']}", "",
        f"{total:.1f} min in all: " + ", ".join(f"{k} {v:.1f}" for k, v in minutes.items()) + ".", "",
        "## The judge's labeler alignment (measured before its labels are used)", "",
        f"Judge: `{judge}`; agreement with known labels (95% bootstrap interval), the same answers read three ways.", "",
        "| labelled set | pairs | one order | both orders | principles ensembled | position bias |",
        "|---|---|---|---|---|---|",
    ]
    for name, rep in align.items():
        r = rep["result"]
        cells = [_rate(r[m]["accuracy"], r[m]["ci"]) if r[m]["accuracy"] is not None else "-"
                 for m in ("one_order", "both_orders", "ensemble")]
        lines.append(f"| {name} ({r['labels']}) | {r['pairs']} | " + " | ".join(cells)
                     + f" | {r['position_bias']:+.3f} |")
    lines += [
        "", "## Data", "",
        f"- SL-CAI: {sl_data['records']} prompts, {sl_data['sft_rows']} revised answers to fine-tune on; "
        f"{sl.get('step')} LoRA SFT steps (last loss {sl.get('loss', float('nan')):.3f}).",
        f"- RL-CAI: {rl_data['pairs']} labelled pairs kept, {rl_data['ties']} ties, {rl_data['parse_failures']} "
        f"unreadable, {rl_data['identical']} identical answers dropped; orders agreed on {rl_data['orders_agreed']} "
        f"pairs; mean soft label {rl_data['mean_soft_label'] or float('nan'):.3f}; {rl.get('steps')} DPO steps "
        f"(last loss {rl.get('train_last', {}).get('loss', float('nan')):.3f}).",
        "", "## Before and after (base = the model before SL-CAI)", "",
        "Rates with 95% bootstrap intervals over prompts; change = the model minus the base on the same prompts "
        "(paired 95% interval).", "",
        "| | base | SL-CAI | RL-CAI (SL-CAI + DPO on AI labels) |", "|---|---|---|---|",
        row(f"refusal on held-out harmful prompts ({n_h}, higher is better)",
            lambda e, w: safety(e)["refusal_harmful_all"][w], lambda e, w: safety(e)["refusal_harmful_ci"][w]["all"],
            lambda e: safety(e)["refusal_harmful_diff_ci"]),
        row(f"over-refusal on benign look-alikes ({n_b}, lower is better)",
            lambda e, w: safety(e)["over_refusal"][w], lambda e, w: safety(e)["over_refusal_ci"][w],
            lambda e: safety(e)["over_refusal_diff_ci"]),
        row(f"ASDiv held-out accuracy ({n_a}, greedy; the alignment tax)",
            lambda e, w: asdiv(e)[w], lambda e, w: asdiv(e)[f"{w}_ci"], lambda e: asdiv(e)["ci_diff"]),
    ]
    for name in HARMFUL_SETS:
        lines.append(row(f"refusal on {name} (held out)", lambda e, w, n=name: safety(e)["refusal_harmful"][w][n],
                         lambda e, w, n=name: safety(e)["refusal_harmful_ci"][w][n], None))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(sys.argv[1:])
