"""The second main job: GRPO (LoRA) on ASDiv with SmolLM2-135M-Instruct and the correctness reward, on the CPU.

Trains on ASDiv problems with a numeric answer, holding out the same 150 problems as the DPO main job, and
prints held-out answer accuracy (greedy, the correctness reward's checker) before and after training. Writes
``OUTPUT/report.md`` with a plot of the reward and the completion length over steps. Any config key can be
overridden: ``python scripts/grpo_job.py max_steps=10 output_dir=outputs/quick``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from alignkit.config import RLConfig, build
from alignkit.data.asdiv import load_samples, problem_ids, solved_ids, user_message
from alignkit.data.sources import fetch
from alignkit.eval.plots import plot_training
from alignkit.recipes import rl

DEFAULTS = dict(
    model="smollm2-135m-instruct", preset="grpo", rewards="correctness", lora=True, lora_r=16, lora_alpha=32,
    lr=2e-4, scheduler="constant", warmup_steps=2, prompts_per_step=8, num_generations=8, max_new_tokens=64,
    temperature=0.8, max_steps=30, precision="auto", rollout_precision="auto", batch_size=2, max_length=512,
    output_dir="outputs/grpo", overwrite=True,  # a re-run of the job replaces its previous output
)


def write_data(out: Path, pool: str, extra_held: int = 0) -> tuple[Path, Path, int, int]:
    """train.jsonl and test.jsonl (the DPO job's 150 held-out problems, and ``extra_held`` more drawn from the
    training pool with a fixed seed when a larger held-out set is wanted).

    ``pool="solved"``: the training problems of which at least one of the 4 shipped SmolLM2 samples is correct
    (``alignkit data fetch asdiv-prefs``): a curriculum's "drop prompts never solved", measured beforehand. With
    about 3% of samples correct, most groups of 8 on an arbitrary problem are all wrong and give no gradient.
    ``pool="all"``: every numeric ASDiv problem but the held-out ones.
    """
    rows = {r["id"]: r for r in map(json.loads, (fetch("asdiv") / "data.jsonl").read_text().splitlines())}
    samples = load_samples()
    held = {s["id"] for s in samples[-150:]}
    if pool == "solved":
        train_ids = solved_ids(rows, samples[:-150])
    else:
        train_ids = [i for i in problem_ids(rows) if i not in held]
    if extra_held:
        import random

        moved = set(random.Random(0).sample(train_ids, extra_held))
        held |= moved
        train_ids = [i for i in train_ids if i not in moved]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, ids in (("train", train_ids), ("test", sorted(held))):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": user_message(rows[i]), "answer": rows[i]["answer"], "id": i}) + "\n"
                                for i in ids))
        paths.append((path, len(ids)))
    return paths[0][0], paths[1][0], paths[0][1], paths[1][1]


def resolve_precision(overrides: dict) -> dict:
    """``auto`` precision: bf16 where bf16 matmuls are native (a GPU; a CPU with AVX512-BF16 or AMX, which
    oneDNN's bf16 path needs), fp32 elsewhere, where bf16 is emulated and several times slower than fp32."""
    import torch

    from alignkit.models.prepacked import prepack_available

    native = torch.cuda.is_available() or prepack_available()
    return {k: ("bf16" if native else "fp32") if k in ("precision", "rollout_precision") and v == "auto" else v
            for k, v in overrides.items()}


def main(argv: list[str]) -> None:
    t0 = time.time()
    overrides = resolve_precision({**DEFAULTS, **dict(a.split("=", 1) for a in argv)})
    pool = overrides.pop("pool", "solved")
    train_path, test_path, n_train, n_test = write_data(Path(overrides["output_dir"]) / "data", pool)
    cfg = build(RLConfig, overrides={**overrides, "data": str(train_path), "eval_data": str(test_path)})
    summary = rl.run(cfg)
    out = Path(cfg.output_dir)
    before, after = summary["eval_before"], summary["eval_after"]
    plot_training(out / "metrics.jsonl", out / "training.png", keys=("reward/mean", "completion/length/mean", "kl"))
    minutes = (time.time() - t0) / 60
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    gen = sum(h.get("time/generate", 0.0) for h in history) / 60
    lines = [
        f"# GRPO (LoRA) on ASDiv with {cfg.model}",
        "",
        f"{summary['steps']} steps of {cfg.prompts_per_step} prompts x {cfg.num_generations} samples "
        f"(temperature {cfg.temperature}, {cfg.max_new_tokens} new tokens) from {n_train} training problems "
        f"(pool {pool}); "
        f"preset {cfg.preset}, lr {cfg.lr}, LoRA r {cfg.lora_r}, {cfg.precision}; {minutes:.1f} min in all "
        f"({gen:.1f} min generating rollouts).",
        "",
        f"| held out ({n_test} problems, greedy, {cfg.max_new_tokens} tokens) | before | after |",
        "|---|---|---|",
        f"| answer accuracy (correctness reward) | {before['reward/correctness']:.3f} | {after['reward/correctness']:.3f} |",
        f"| mean answer length (tokens) | {before['length']:.1f} | {after['length']:.1f} |",
        "",
        "![reward, length and KL over steps](training.png)",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "grpo_job.json").write_text(json.dumps({"minutes": minutes, "generate_minutes": gen, **summary}, indent=2))
    print("\n".join(lines[4:9]))
    print(f"report: {out / 'report.md'} ({minutes:.1f} min)")


if __name__ == "__main__":
    main(sys.argv[1:])
