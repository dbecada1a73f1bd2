"""The main job: on-policy iterative DPO on ASDiv with SmolLM2-135M-Instruct and a program as the judge, then
``alignkit eval`` of the new model against the old.

Each iteration samples ``num_generations`` answers to every training problem from the current model, pairs a
correct answer (the correctness reward: the final number against the reference) with a wrong one, drops problems
whose answers all score alike, and trains the next model from the current one with DPO plus the chosen answer's
NLL (RPO, 2404.19733; LoRA): the RLHFlow recipe
(``alignkit iterative-dpo``, 2405.07863). The training problems are those of which at least one of the model's 4
shipped samples is correct (``alignkit data fetch asdiv-prefs``: a curriculum's "drop prompts never solved",
measured beforehand). Held out: ``held`` problems none of which is trained on, the DPO lesson's 150 first.

The evaluation (``alignkit eval``) answers every held-out problem greedily with both models and gives the
accuracies with the paired bootstrap interval of the difference, the win rate, safety and the probes, in
``OUTPUT/eval/report.html``; ``OUTPUT/report.md`` holds the table. Any key of the iterative-DPO config can be
overridden, and ``held=N``, ``eval_suites=...``: ``python scripts/main_job.py iterations=1 output_dir=outputs/quick``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from alignkit.config import EvalConfig, IterativeDPOConfig, build
from alignkit.data.asdiv import N_EVAL, load_samples, problem_ids, solved_ids, user_message
from alignkit.data.sources import fetch
from alignkit.recipes import evaluate, iterative_dpo

DEFAULTS = dict(
    model="smollm2-135m-instruct", rewards="correctness", iterations=2, num_generations=8, temperature=0.8,
    max_new_tokens=64, loss="dpo", beta=0.1, rpo_alpha=1.0, lora=True, lora_r=16, lora_alpha=32, lr=2e-4, epochs=2.0,
    batch_size=8, warmup_steps=0, precision="bf16", rollout_precision="bf16", max_length=512, eval_fraction=0.0,
    output_dir="outputs/main", overwrite=True,  # a re-run of the job replaces its previous output
)
# The evaluation, sized to take a few minutes: every held-out problem, and small samples for the other suites.
EVAL = dict(suites="capability,winrate,safety,probes", math500_limit=30, ifbench_limit=20, winrate_limit=0,
            harmful_limit=10, benign_limit=20, probe_prompts=12, samples=4)


def write_data(out: Path, n_held: int) -> tuple[Path, Path, int, int]:
    """``train.jsonl`` (the problems some shipped sample solves, of those the DPO lesson trained on) and
    ``asdiv_heldout.jsonl`` (its stem names the set in the evaluation's report): the lesson's 150 held-out
    problems, then problems never sampled, ``n_held`` in all."""
    rows = {r["id"]: r for r in map(json.loads, (fetch("asdiv") / "data.jsonl").read_text().splitlines())}
    samples = load_samples()
    sampled = {s["id"] for s in samples}
    held = [s["id"] for s in samples[-N_EVAL:]] + [i for i in problem_ids(rows) if i not in sampled]
    held = held[:n_held]
    train = solved_ids(rows, samples[:-N_EVAL])
    assert not set(train) & set(held)
    out.mkdir(parents=True, exist_ok=True)
    for name, ids in (("train", train), ("asdiv_heldout", held)):
        (out / f"{name}.jsonl").write_text("".join(
            json.dumps({"prompt": user_message(rows[i]), "answer": rows[i]["answer"], "id": i}) + "\n" for i in ids))
    return out / "train.jsonl", out / "asdiv_heldout.jsonl", len(train), len(held)


def table(cap: dict) -> list[str]:
    """The before/after rows of the evaluation's capability suite (accuracy, its interval, and the change's)."""
    lines = [f"| held out (greedy, {DEFAULTS['max_new_tokens']} new tokens) | before | after | change (95% CI) |",
             "|---|---|---|---|"]
    for name, entry in cap.items():
        if "reference" not in entry:
            continue
        label = {"asdiv_heldout": f"ASDiv accuracy ({entry['n']} problems)",
                 "ifbench": f"IFBench strict prompt-level accuracy ({entry['n']})"}.get(
            name, f"{name} {entry.get('metric', 'accuracy')} ({entry['n']})")
        lo, hi = entry["ci_diff"]
        ref, mod = entry["reference"], entry["model"]
        lines.append(f"| {label} | {ref:.3f} ({round(ref * entry['n'])}) | {mod:.3f} ({round(mod * entry['n'])}) | "
                     f"{mod - ref:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    return lines


def main(argv: list[str]) -> None:
    t0 = time.time()
    args = dict(a.split("=", 1) for a in argv)
    n_held = int(args.pop("held", 400))
    eval_over = {k[len("eval_"):]: args.pop(k) for k in list(args) if k.startswith("eval_")}
    out = Path(args.get("output_dir", DEFAULTS["output_dir"]))
    train_path, test_path, n_train, n_test = write_data(out / "data", n_held)
    cfg = build(IterativeDPOConfig, overrides={**DEFAULTS, "data": str(train_path), **args})
    summary = iterative_dpo.run(cfg)
    t_train = time.time() - t0
    ecfg = build(EvalConfig, overrides={**EVAL, "model": summary["final_model"], "reference": cfg.model,
                                        "output_dir": str(out / "eval"), "capability_data": str(test_path),
                                        "capability_limit": 0, "winrate_data": str(test_path),
                                        "precision": cfg.rollout_precision, "max_new_tokens": cfg.max_new_tokens,
                                        **eval_over})
    result = evaluate.run(ecfg)
    minutes = (time.time() - t0) / 60
    its = summary["iterations"]
    pairs = ", ".join(f"{r.get('pairs', 0)}" for r in its)
    lines = [
        f"# Iterative DPO on ASDiv with {cfg.model}",
        "",
        f"{cfg.iterations} iterations of {cfg.num_generations} samples (temperature {cfg.temperature}, "
        f"{cfg.max_new_tokens} new tokens) of {n_train} training problems, a correct answer against a wrong one "
        f"({pairs} pairs), DPO beta {cfg.beta} with rpo_alpha {cfg.rpo_alpha:g}, lr {cfg.lr}, {cfg.epochs:g} epochs, LoRA r {cfg.lora_r}, "
        f"{cfg.precision}; {minutes:.1f} min in all ({t_train / 60:.1f} training, {minutes - t_train / 60:.1f} "
        f"evaluating).",
        "",
        *table(result.get("capability", {})),
        "",
        "The evaluation report: [eval/report.html](eval/report.html).",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "main_job.json").write_text(json.dumps({"minutes": minutes, "train_minutes": t_train / 60,
                                                   "training_problems": n_train, "held_out": n_test,
                                                   "iterations": its, "eval": result}, indent=2, default=str))
    print("\n".join(lines[4:-2]))
    print(f"report: {out / 'report.md'}, {out / 'eval' / 'report.html'} ({minutes:.1f} min)")


if __name__ == "__main__":
    main(sys.argv[1:])
