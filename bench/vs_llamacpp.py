"""Batch-1 generation: the rollout engine (bf16 copy of the default model, which is converted from
SmolLM2-135M-Instruct's Q4_1 GGUF) against llama.cpp's ``llama-bench`` on that GGUF, interleaved in one run.

``llama-bench -p 0 -n N`` times N generated tokens after an empty prompt (its own sampling-free decode loop); the
engine samples N tokens at temperature 1 after a 60-68 token chat prompt (one prompt, EOS ignored), prefill
included, so the engine's side carries more work. llama.cpp reads the 4-bit Q4_1 weights, the engine bf16 ones
(about 3.4x the bytes a decode step reads).

    python bench/vs_llamacpp.py --llama-bench PATH/llama-bench --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from alignkit.models.loading import load_model
from alignkit.paths import cache_dir
from alignkit.rl.rollout import LocalEngine, SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from generate import chat_prompts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--gguf", default=str(cache_dir() / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m-instruct")
    engine = LocalEngine(model.eval(), tok, precision="bf16", compile=args.compile)
    engine.eos_ids = set()
    prompt = chat_prompts(tok)[:1]
    sp = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, seed=0)
    rates: dict[str, list[float]] = {"engine": [], "llama.cpp": []}
    for rep in range(args.repeats + 1):
        t0 = time.perf_counter()
        engine.generate(prompt, 1, sp)
        engine_rate = args.new_tokens / (time.perf_counter() - t0)
        out = subprocess.run([args.llama_bench, "-m", args.gguf, "-p", "0", "-n", str(args.new_tokens), "-t",
                              str(args.threads), "-r", "1", "-o", "json"], capture_output=True, text=True, check=True)
        if rep:
            rates["engine"].append(engine_rate)
            rates["llama.cpp"].append(float(json.loads(out.stdout)[0]["avg_ts"]))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"batch 1, {args.new_tokens} tokens, {args.threads} threads, median of {args.repeats}: engine "
          f"{med['engine']:.1f} tok/s, llama.cpp {med['llama.cpp']:.1f} tok/s "
          f"(engine / llama.cpp {med['engine'] / med['llama.cpp']:.2f}x)")


if __name__ == "__main__":
    main()
