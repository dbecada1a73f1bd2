"""DPO with LoRA on the ASDiv preference set (reference answers as chosen), with SmolLM2-135M-Instruct: the
lesson kept from the first main job (the README: preference metrics rise, answer accuracy falls).

Prints held-out preference accuracy and answer accuracy before and after training, and writes
``OUTPUT/report.md`` with a plot of the loss and the reward margin over steps. Any config key can be
overridden: ``python scripts/dpo_reference_job.py max_steps=20 output_dir=outputs/quick``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from alignkit.config import DPOConfig, build
from alignkit.data.answers import is_correct
from alignkit.data.sources import fetch
from alignkit.eval.generate import generate
from alignkit.eval.plots import plot_training
from alignkit.models.loading import load_model
from alignkit.recipes import dpo

DEFAULTS = dict(
    model="smollm2-135m-instruct", loss="dpo", beta=0.5, lora=True, lora_r=16, lora_alpha=32, lr=2e-4,
    batch_size=8, epochs=1.0, warmup_steps=5, precision="bf16", max_length=256, output_dir="outputs/dpo_reference",
    overwrite=True,  # a re-run of the job replaces its previous output
)


def answer_accuracy(model, tok, rows: list[dict], tag: str) -> tuple[float, list[str]]:
    answers = generate(model, tok, [r["prompt"] for r in rows], max_new_tokens=48, batch_size=50, desc=f"answers ({tag})")
    return sum(is_correct(a, r["answer"]) for a, r in zip(answers, rows)) / len(rows), answers


def main(argv: list[str]) -> None:
    t0 = time.time()
    data = fetch("asdiv-prefs")
    cfg = build(DPOConfig, overrides={**DEFAULTS, "data": str(data / "train.jsonl"), "eval_data": str(data / "test.jsonl"),
                                      **dict(a.split("=", 1) for a in argv)})
    test = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    base, tok = load_model(cfg.model)
    acc_before, _ = answer_accuracy(base, tok, test, "before")
    del base
    summary = dpo.run(cfg)
    out = Path(cfg.output_dir)
    tuned, tok = load_model(str(out / "final"))
    acc_after, answers = answer_accuracy(tuned, tok, test, "after")
    before, after = summary["eval_before"], summary["eval_after"]
    plot_training(out / "metrics.jsonl", out / "training.png")
    minutes = (time.time() - t0) / 60
    lines = [
        f"# DPO (LoRA) on asdiv-prefs with {cfg.model}",
        "",
        f"{summary['steps']} steps of {cfg.batch_size} pairs, loss={cfg.loss}, beta={cfg.beta}, lr={cfg.lr}, "
        f"LoRA r={cfg.lora_r}, {cfg.precision}; {minutes:.1f} min in all.",
        "",
        f"| held out ({len(test)} problems) | before | after |",
        "|---|---|---|",
        f"| preference accuracy (log p(chosen) > log p(rejected)) | {before['logp_accuracy']:.3f} | {after['logp_accuracy']:.3f} |",
        f"| length-normalised preference accuracy (mean token log p) | {before['avg_logp_accuracy']:.3f} | {after['avg_logp_accuracy']:.3f} |",
        f"| implicit-reward accuracy (beta * log-ratio) | - | {after['rewards/accuracy']:.3f} |",
        f"| answer accuracy (greedy, last number = reference) | {acc_before:.3f} | {acc_after:.3f} |",
        "",
        "![loss and reward margin](training.png)",
        "",
        "Sample answers after training:",
        "",
        *[f"- {r['prompt'][0]['content'].splitlines()[0]} -> {a!r} (reference {r['answer']})" for r, a in list(zip(test, answers))[:5]],
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "dpo_reference_job.json").write_text(json.dumps({"answer_accuracy_before": acc_before, "answer_accuracy_after": acc_after,
                                                   "minutes": minutes, **summary}, indent=2))
    print("\n".join(lines[4:10]))
    print(f"report: {out / 'report.md'} ({minutes:.1f} min)")


if __name__ == "__main__":
    main(sys.argv[1:])
