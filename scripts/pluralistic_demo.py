"""GDPO against DPO on the default model: does the model keep a group's spread of beliefs, or collapse to the majority?

1. Data: the shipped synthetic pluralistic set (``alignkit data fetch pluralistic``): 150 issues (a family of 2-5
   stances on a topic, with one group's shares), asked in two wordings; held out: the second wording of 60 issues.
2. SFT (LoRA, merged) on the annotators' own answers, ``Belief: <b>`` then a response of that stance: the model
   learns the form. Its belief distribution follows the annotators' frequencies, which are noisy draws from the
   group's shares.
3. From the SFT model, with LoRA and the same steps, learning rate and beta:
   - DPO on the pooled preference: for every two stances of a question, the larger share's answer over the other's
     with soft label p_a / (p_a + p_b) (``pooled_soft_train.jsonl``). That is DPO's expected loss over the
     annotators' pooled pairs, without their noise: the same optimum (the majority takes nearly all the mass at beta
     0.1), reached in the steps a demonstration can afford. ``dpo_pairs=annotators`` trains on the annotators' hard
     pooled pairs (``pooled_train.jsonl``) instead, which drift there far more slowly (each question's annotators
     push both ways);
   - GDPO (``alignkit gdpo``) on the same annotations as belief-conditioned pairs, with the calibration to the
     group's shares.
4. ``alignkit eval suites=pluralistic`` on the held-out questions: GDPO (model) against DPO (reference), and the SFT
   model against itself for its own figures: Jensen-Shannon distance of the belief distribution to the group's
   (from option probabilities, and from N sampled answers), the mass on the majority belief, per-belief recall and
   belief-answer consistency by the keyword rule.

Writes ``OUTPUT/report.md`` and ``OUTPUT/pluralistic_demo.json``; the GDPO-vs-DPO report with its plots is
``OUTPUT/eval_gdpo/report.html``. Any setting can be overridden: ``python scripts/pluralistic_demo.py epochs=1``;
``resume=1`` keeps the stages an interrupted run finished (their final models and evaluations) and runs the rest.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grpo_job import resolve_precision  # noqa: E402

from alignkit.config import DPOConfig, EvalConfig, GDPOConfig, SFTConfig, build  # noqa: E402
from alignkit.data.pluralistic import fetch  # noqa: E402
from alignkit.recipes import dpo, evaluate, gdpo, sft  # noqa: E402

DEFAULTS = dict(model="smollm2-135m-instruct", output_dir="outputs/pluralistic_demo", precision="auto", seed=0,
                lora_r=16, sft_lr=2e-4, sft_epochs=1, lr=1e-4, epochs=1, beta=0.1, batch_size=8,
                calibration_weight=1.0, belief_nll_weight=0.1, samples=16, questions=0, dpo_pairs="soft", resume=0)


def settings(argv: list[str]) -> dict:
    s = {**DEFAULTS, **dict(a.split("=", 1) for a in argv)}
    s = {k: type(DEFAULTS[k])(v) if isinstance(DEFAULTS.get(k), (int, float)) else v for k, v in s.items()}
    if s["dpo_pairs"] not in ("soft", "annotators"):
        raise SystemExit(f"dpo_pairs must be soft or annotators, got {s['dpo_pairs']!r}")
    s["precision"] = resolve_precision({"precision": s["precision"]})["precision"]
    return s


def main(argv: list[str]) -> None:
    t0 = time.time()
    s = settings(argv)
    out = Path(s["output_dir"])
    data = fetch()
    minutes: dict[str, float] = {}

    def timed(stage, fn, *args, done: Path | None = None):
        """Run a stage, or with ``resume=true`` read back the result it wrote (``done``) in an earlier run."""
        if s["resume"] and done is not None and done.exists():
            print(f"[pluralistic demo] {stage}: kept from the earlier run ({done})", flush=True)
            return json.loads(done.read_text())
        t = time.time()
        result = fn(*args)
        minutes[stage] = (time.time() - t) / 60
        print(f"[pluralistic demo] {stage}: {minutes[stage]:.1f} min", flush=True)
        return result

    lora = dict(lora=True, lora_r=s["lora_r"], lora_alpha=2 * s["lora_r"], precision=s["precision"], seed=s["seed"],
                overwrite=True, progress=False, log_every=20)
    timed("SFT", sft.run, build(SFTConfig, overrides=dict(
        model=s["model"], data=str(data / "sft_train.jsonl"), output_dir=str(out / "sft"), lr=s["sft_lr"],
        epochs=s["sft_epochs"], batch_size=16, **lora)), done=out / "sft" / "final" / "alignkit.json")
    sft_model = str(out / "sft" / "final")
    pref = dict(model=sft_model, lr=s["lr"], epochs=s["epochs"], beta=s["beta"], batch_size=s["batch_size"], **lora)
    trained = {
        "dpo": timed("DPO (pooled preference)", dpo.run, build(DPOConfig, overrides=dict(
            data=str(data / ("pooled_soft_train.jsonl" if s["dpo_pairs"] == "soft" else "pooled_train.jsonl")),
            output_dir=str(out / "dpo"), **pref)), done=out / "dpo" / "final" / "alignkit.json"),
        "gdpo": timed("GDPO", gdpo.run, build(GDPOConfig, overrides=dict(
            data=str(data / "train.jsonl"), output_dir=str(out / "gdpo"), calibration_weight=s["calibration_weight"],
            belief_nll_weight=s["belief_nll_weight"], **pref)), done=out / "gdpo" / "final" / "alignkit.json"),
    }

    def evaluate_pair(model: str, reference: str, name: str) -> dict:
        evaluate.run(build(EvalConfig, overrides=dict(
            model=model, reference=reference, output_dir=str(out / f"eval_{name}"), suites="pluralistic",
            pluralistic_data=str(data / "test.jsonl"), pluralistic_samples=s["samples"],
            pluralistic_questions=s["questions"], precision=s["precision"], seed=s["seed"])))
        return json.loads((out / f"eval_{name}" / "summary.json").read_text())  # with the per-question records

    def sft_alone() -> dict:
        result = measure_alone(sft_model, data / "test.jsonl", s)
        (out / "eval_sft.json").write_text(json.dumps(result, indent=2))
        return result

    evals = {"gdpo": timed("eval GDPO vs DPO", evaluate_pair, str(out / "gdpo" / "final"), str(out / "dpo" / "final"),
                           "gdpo", done=out / "eval_gdpo" / "summary.json"),
             "sft": timed("eval SFT", sft_alone, done=out / "eval_sft.json")}
    total = (time.time() - t0) / 60
    plural = {"sft": evals["sft"]["model"], "dpo": evals["gdpo"]["pluralistic"]["reference"],
              "gdpo": evals["gdpo"]["pluralistic"]["model"]}
    report = render(s, plural, evals["gdpo"]["pluralistic"], minutes, total)
    (out / "report.md").write_text(report)
    (out / "pluralistic_demo.json").write_text(json.dumps(
        {"settings": s, "minutes": minutes, "total_minutes": total, "trained": trained, "pluralistic": plural,
         "reference_points": evals["gdpo"]["pluralistic"]["reference_points"]}, indent=2, default=str))
    print(report)


def measure_alone(model_path: str, questions_path: Path, s: dict) -> dict:
    """The eval's pluralistic measures of one model (the SFT starting point), without a second contestant."""
    from alignkit.eval import pluralistic as pl
    from alignkit.models.loading import load_model
    from alignkit.rl.rollout import LocalEngine

    model, tok = load_model(model_path, seed=s["seed"])
    model.eval()
    defaults = EvalConfig()
    engine = LocalEngine(model, tok, precision=s["precision"], max_batch=defaults.batch_size)
    questions = pl.read_questions(str(questions_path), s["questions"])
    measured = pl.measure(model, tok, engine, questions, template=defaults.belief_template, n=s["samples"],
                          max_new_tokens=defaults.pluralistic_max_new_tokens, precision=s["precision"],
                          batch_size=defaults.batch_size, seed=s["seed"])
    return pl.summarise(questions, {"model": measured}, n=s["samples"], seed=s["seed"])


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def render(s: dict, plural: dict, gdpo_eval: dict, minutes: dict, total: float) -> str:
    refs = gdpo_eval["reference_points"]
    majority = sum(max(q["target"]) for q in gdpo_eval["questions"]) / len(gdpo_eval["questions"])
    rows = [("group's shares (target)", 0.0, refs["sampling_floor"]["js_sampled"], majority, 1.0, None, None)]
    for name in ("sft", "dpo", "gdpo"):
        m = plural[name]
        rows.append((name.upper(), m["js_options"], m["js_sampled"], m["majority_mass"], m["recall"],
                     m["consistency_free"], m["consistency_two_stage"]))
    rows += [("uniform", refs["uniform"]["js_options"], None, refs["uniform"]["majority_mass"], refs["uniform"]["recall"], None, None),
             ("majority only", refs["majority_only"]["js_options"], None, refs["majority_only"]["majority_mass"],
              refs["majority_only"]["recall"], None, None)]
    table = "\n".join(f"| {r[0]} | " + " | ".join(_f(x) for x in r[1:]) + " |" for r in rows)
    times = ", ".join(f"{k} {v:.1f} min" for k, v in minutes.items())
    return (
        f"# GDPO against DPO on {s['model']} ({gdpo_eval['n_questions']} held-out questions, {s['samples']} samples "
        f"each)\n\n| model | JS distance (option probabilities) | JS distance ({s['samples']} samples) | mass on the "
        f"majority | per-belief recall | consistency (free) | consistency (two-stage) |\n|---|---|---|---|---|---|---|\n"
        f"{table}\n\nThe target row's sampled JS is the floor: N samples drawn from the group's own shares. "
        f"Settings: {json.dumps(s)}.\n\nTime: {times}; total {total:.1f} min.\n"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
