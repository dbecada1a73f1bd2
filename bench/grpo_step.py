"""GRPO step time on SmolLM2-135M-Instruct, split into generation, the rest of the rollout and training.

Runs the real ``alignkit grpo`` (in a subprocess per configuration) on ASDiv prompts, 4 prompts x 4 samples,
a fixed number of new tokens, and reads the per-step timings the trainer writes to ``metrics.jsonl``:
``time/generate`` (sampling), ``time/rollout`` (sampling, rewards, reference and behaviour log-probs,
advantages) and ``seconds`` (the whole step); training is ``seconds - time/rollout``. The first step is left
out (warm-up) and the medians of the others are printed.

    python bench/grpo_step.py --steps 4 --new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from alignkit.data.asdiv import user_message
from alignkit.data.sources import fetch

CONFIGS = {
    "full fp32": ["precision=fp32"],
    "full bf16": ["precision=bf16"],
    "LoRA bf16": ["precision=bf16", "lora=true", "lora_r=16"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    args = ap.parse_args()
    rows = [json.loads(line) for line in (fetch("asdiv") / "data.jsonl").read_text().splitlines()][:64]
    tmp = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": user_message(r), "answer": r["answer"]}) + "\n" for r in rows))
    print("| configuration | step (s) | generation (s) | other rollout work (s) | training (s) | sampler tokens/s |")
    print("|---|---|---|---|---|---|")
    for name in args.configs.split(","):
        out = tmp / name.replace(" ", "_")
        cmd = [sys.executable, "-m", "alignkit.cli", "grpo", "model=smollm2-135m-instruct", f"data={data}",
               f"output_dir={out}", "prompts_per_step=4", "num_generations=4", f"max_new_tokens={args.new_tokens}",
               f"max_steps={args.steps}", "rollout_precision=bf16", "batch_size=2", "progress=false", "lr=1e-6",
               *CONFIGS[name]]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        h = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
        med = lambda key: statistics.median(x[key] for x in h)  # noqa: E731
        step, gen, roll = med("seconds"), med("time/generate"), med("time/rollout")
        print(f"| {name} | {step:.1f} | {gen:.1f} | {roll - gen:.1f} | {step - roll:.1f} | "
              f"{med('rollout/tokens_per_s'):.0f} |", flush=True)


if __name__ == "__main__":
    main()
