"""Sampling speed of the rollout engine (bf16 copy) against ``model.generate`` on SmolLM2-135M-Instruct.

Both sides sample at temperature 1 without truncation and always produce ``--new-tokens`` tokens (the engine
ignores EOS, ``generate`` gets ``min_new_tokens``), so token counts are equal. ``generate`` runs twice: on the
fp32 model under bf16 autocast (how the trainer's model is run) and on a bf16-cast copy (the same weights
format as the engine). The engine also runs with ``fast_decode=False`` (its decode steps through transformers'
forward), to show what the lean decode step adds. Workloads: 1 prompt; 8 different prompts, 1 sample each; 2 prompts x 4 samples (the
engine prefills each prompt once, ``generate`` prefills every returned sequence). The methods are interleaved
A B C A B C ... in one process after a warm-up run each; the table gives medians.

    python bench/generate.py --repeats 5 --new-tokens 32
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from alignkit.data.asdiv import PROMPT_SUFFIX
from alignkit.models.loading import load_model
from alignkit.models.logprobs import autocast
from alignkit.rl.rollout import LocalEngine, SamplingParams

QUESTIONS = [  # ASDiv-style problems (written for this benchmark)
    "Tom has 12 apples and gives 5 of them to Anna. How many apples does Tom have left?",
    "A box holds 24 pencils. How many pencils are there in 6 boxes?",
    "Sara read 35 pages on Monday and 48 pages on Tuesday. How many pages did she read in all?",
    "There are 56 students in a class and they sit in rows of 8. How many rows are there?",
    "A shirt costs 18 dollars and a hat costs 7 dollars less. How much does the hat cost?",
    "Ben walks 3 miles every day. How many miles does he walk in 2 weeks?",
    "A farmer had 90 eggs and sold 2 dozen of them. How many eggs does he have now?",
    "Lily has 4 bags with 9 marbles in each bag. She loses 6 marbles. How many marbles does she have?",
]
WORKLOADS = [("1 prompt x 1", 1, 1), ("8 prompts x 1", 8, 1), ("2 prompts x 4", 2, 4), ("32 prompts x 1", 32, 1)]


def chat_prompts(tok) -> list[list[int]]:
    """The questions as chat prompts (token ids), as the ASDiv recipes ask them."""
    return [tok.apply_chat_template([{"role": "user", "content": q + PROMPT_SUFFIX}], tokenize=True,
                                    add_generation_prompt=True, return_dict=True)["input_ids"] for q in QUESTIONS]


def run_engine(engine, prompts, n, new_tokens, seed) -> int:
    out = engine.generate(prompts, n, SamplingParams(temperature=1.0, max_new_tokens=new_tokens, seed=seed))
    return sum(len(c.token_ids) for group in out for c in group)


def run_generate(model, tok, prompts, n, new_tokens, seed, precision) -> int:
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    with torch.inference_mode(), autocast(precision):
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_return_sequences=n,
                             pad_token_id=tok.pad_token_id, use_cache=True)
    return gen[:, width:].numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(2)

    model, tok = load_model("smollm2-135m-instruct")
    model.eval()
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    engine = LocalEngine(model, tok, precision="bf16")
    hf_steps = LocalEngine(model, tok, precision="bf16", fast_decode=False)
    for e in (engine, hf_steps):
        e.eos_ids = set()  # run every sample to --new-tokens, like min_new_tokens does for generate
    prompts = chat_prompts(tok)
    methods = {
        "engine (bf16 copy)": lambda p, n, s: run_engine(engine, p, n, args.new_tokens, s),
        "engine, transformers steps": lambda p, n, s: run_engine(hf_steps, p, n, args.new_tokens, s),
        "generate (bf16 autocast)": lambda p, n, s: run_generate(model, tok, p, n, args.new_tokens, s, "bf16"),
        "generate (bf16 model)": lambda p, n, s: run_generate(model_bf16, tok, p, n, args.new_tokens, s, "fp32"),
    }
    times: dict[tuple[str, str], list[float]] = {}
    tokens: dict[str, int] = {}
    for rep in range(args.repeats + 1):  # repeat 0 warms up
        for label, n_prompts, n in WORKLOADS:
            for name, fn in methods.items():
                t0 = time.perf_counter()
                count = fn((prompts * 4)[:n_prompts], n, rep)  # 32 prompts: the 8 questions four times
                elapsed = time.perf_counter() - t0
                assert tokens.setdefault(label, count) == count == n_prompts * n * args.new_tokens, (name, count)
                if rep > 0:
                    times.setdefault((label, name), []).append(elapsed)

    print(f"\n{args.new_tokens} new tokens, median of {args.repeats}; prompt lengths "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens\n")
    names = list(methods)
    print("| workload | " + " | ".join(f"{m} tok/s" for m in names) + " | engine / autocast | engine / bf16 model |")
    print("|---" * (len(names) + 3) + "|")
    for label, _, _ in WORKLOADS:
        rate = {m: tokens[label] / statistics.median(times[(label, m)]) for m in names}
        cells = " | ".join(f"{rate[m]:.0f}" for m in names)
        print(f"| {label} | {cells} | {rate[names[0]] / rate[names[2]]:.2f}x | {rate[names[0]] / rate[names[3]]:.2f}x |")


if __name__ == "__main__":
    main()
