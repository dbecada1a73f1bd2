"""The main job's candidates side by side at about equal training time, on the same problems and the same test.

Each candidate trains SmolLM2-135M-Instruct (LoRA r 16, bf16) on the main job's training problems (the 63 ASDiv
problems some shipped sample solves) from the base model, with the correctness reward as its only signal:

- ``iterative-dpo``: the main job itself (``alignkit iterative-dpo``, 2 iterations of 8 samples a problem, DPO with
  the chosen answer's NLL);
- ``grpo``: ``alignkit grpo`` as in ``scripts/grpo_job.py`` (8 problems x 8 samples a step), ``grpo_steps`` steps;
- ``rest-em``: ``alignkit rejection mode=rest_em`` as in ``scripts/rest_em_job.py``, ``rest_iterations`` rounds
  of ``rest_samples`` samples a problem.

The step and round counts are sized so that each candidate trains for about as long as the main job (what the
table reports as minutes, measured). Then ``alignkit eval suites=capability`` answers the main job's held-out
problems greedily with each trained model against the base model: accuracy with the paired bootstrap interval of
the change. Writes ``OUTPUT/candidates.md`` and ``OUTPUT/candidates.json``. Settings as ``key=value``:
``python scripts/main_job_candidates.py only=grpo grpo_steps=8``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grpo_job import DEFAULTS as GRPO  # noqa: E402
from main_job import DEFAULTS as IDPO, write_data  # noqa: E402
from rest_em_job import DEFAULTS as REST  # noqa: E402

from alignkit.config import EvalConfig, IterativeDPOConfig, RejectionConfig, RLConfig, build  # noqa: E402
from alignkit.recipes import evaluate, iterative_dpo, rejection, rl  # noqa: E402

SETTINGS = dict(model=IDPO["model"], output_dir="outputs/main_candidates", held=400, grpo_steps=10, rest_iterations=2, rest_samples=8,
                only="iterative-dpo,grpo,rest-em")
PRECISION = dict(precision="bf16", rollout_precision="bf16")


def train(name: str, s: dict, data: Path, out: Path) -> str:
    """Train candidate ``name``; the path of its final model."""
    if name == "iterative-dpo":
        cfg = build(IterativeDPOConfig, overrides={**IDPO, "model": s["model"], "data": str(data),
                                                      "output_dir": str(out)})
        return iterative_dpo.run(cfg)["final_model"]
    if name == "grpo":
        cfg = build(RLConfig, overrides={**GRPO, **PRECISION, "model": s["model"], "data": str(data), "output_dir": str(out),
                                         "max_steps": s["grpo_steps"]})
        rl.run(cfg)
        return str(out / "final")
    if name == "rest-em":
        cfg = build(RejectionConfig, overrides={**REST, **PRECISION, "model": s["model"], "data": str(data), "output_dir": str(out),
                                                "iterations": s["rest_iterations"],
                                                "num_generations": s["rest_samples"]})
        return rejection.run(cfg)["final_model"]
    raise SystemExit(f"unknown candidate {name!r}: choose from iterative-dpo, grpo, rest-em")


def main(argv: list[str]) -> None:
    s = {**SETTINGS, **dict(a.split("=", 1) for a in argv)}
    s = {k: type(SETTINGS[k])(v) for k, v in s.items()}
    out = Path(s["output_dir"])
    train_path, test_path, n_train, n_test = write_data(out / "data", s["held"])
    results = {}
    for name in s["only"].split(","):
        t0 = time.time()
        model = train(name, s, train_path, out / name)
        minutes = (time.time() - t0) / 60
        cap = evaluate.run(build(EvalConfig, overrides=dict(
            model=model, reference=s["model"], output_dir=str(out / f"eval_{name}"), suites="capability",
            capability_data=str(test_path), capability_limit=0, math500_limit=0, ifbench_limit=0,
            precision="bf16", max_new_tokens=IDPO["max_new_tokens"])))["capability"][test_path.stem]
        results[name] = dict(train_minutes=minutes, before=cap["reference"], after=cap["model"],
                             ci_diff=cap["ci_diff"], n=cap["n"])
        print(f"[candidates] {name}: {minutes:.1f} min training, {cap['reference']:.3f} -> {cap['model']:.3f} "
              f"{cap['ci_diff']}", flush=True)
        (out / "candidates.json").write_text(json.dumps({"settings": s, "results": results}, indent=2))
    lines = [f"| candidate ({n_train} training problems) | training (min) | held-out ASDiv ({n_test}) before | after | "
             "change (95% CI) |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lo, hi = r["ci_diff"]
        lines.append(f"| {name} | {r['train_minutes']:.1f} | {r['before']:.3f} | {r['after']:.3f} | "
                     f"{r['after'] - r['before']:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    (out / "candidates.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
