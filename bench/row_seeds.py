"""What per-row generators cost the rollout engine (``LocalEngine.generate(..., seeds=...)``), and how far they make
a sample independent of its batch.

With ``seeds`` every sample has a ``torch.Generator`` of its own, so its uniforms do not depend on the batch it
runs in (what lets several processes split a rollout). Measured, interleaved A B A B in one process (medians):

- the uniforms alone, for R rows and T decode steps: one shared generator, ``rand(active)`` each step (the
  engine without seeds), against per-row generators drawing each row's T uniforms up front (the engine with
  seeds: R generator calls per chunk), and against per-row ``rand(1)`` at every step (R calls per step);
- whole ``generate`` calls, P prompts x G samples, without and with ``seeds``: the difference is what a
  rollout pays;
- batch invariance (not timed): seeded rows whose tokens differ from the whole call's when their prompts come
  in other company (the odd prompts in a call of their own, as a process's share; each prompt alone, with no
  padding), with batches of many prompts (``max_batch = P x G``) and of one prompt (``max_batch = G``).

    python bench/row_seeds.py --repeats 5                       # SmolLM2-135M-Instruct, bf16 copy
    python bench/row_seeds.py --no-timing --precision fp32    # only the batch-invariance counts
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from alignkit.models.loading import load_model
from alignkit.rl.rollout import LocalEngine, SamplingParams, row_seed

sys.path.insert(0, str(Path(__file__).parent))
from generate import chat_prompts  # noqa: E402


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, called in turn ``repeats`` times after one warm-up call each."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(repeats + 1):
        for k, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if rep:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def uniforms(rows: int, steps: int, device: torch.device, repeats: int) -> dict[str, float]:
    """Seconds per chunk to make the uniforms of ``rows`` rows over ``steps`` steps, all rows active."""
    seeds = [row_seed(0, r) for r in range(rows)]
    idx = torch.arange(rows, device=device)

    def shared():
        g = torch.Generator(device=device).manual_seed(0)
        for _ in range(steps):
            torch.rand(rows, dtype=torch.float64, generator=g, device=device)

    def per_row_up_front():  # what the engine does with seeds
        table = torch.stack([torch.rand(steps, dtype=torch.float64, device=device,
                                        generator=torch.Generator(device=device).manual_seed(s)) for s in seeds])
        for t in range(steps):
            table[idx, t]

    def per_row_each_step():
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        for _ in range(steps):
            torch.cat([torch.rand(1, dtype=torch.float64, generator=g, device=device) for g in gens])

    return interleaved({"shared generator": shared, "per row, drawn up front": per_row_up_front,
                        "per row, rand(1) each step": per_row_each_step}, repeats)


def differing_rows(model, tok, prompts, samples: int, sp, precision: str, max_batch: int, calls: list[list[int]]):
    """``(differing, rows)``: seeded rows whose tokens differ between the whole call and calls of the prompts
    ``calls`` (lists of prompt indices), with the engine's ``max_batch``."""
    engine = LocalEngine(model, tok, precision=precision, max_batch=max_batch)
    whole = engine.generate(prompts, samples, sp, seeds=list(range(len(prompts))))
    pairs = []
    for idx in calls:
        part = engine.generate([prompts[i] for i in idx], samples, sp, seeds=idx)
        pairs += [(a.token_ids, b.token_ids) for i, g in zip(idx, part) for a, b in zip(whole[i], g)]
    return sum(a != b for a, b in pairs), len(pairs)


def timings(model, tok, prompts, args) -> None:
    """The uniforms alone, then whole generate calls without and with seeds."""
    device = next(model.parameters()).device
    rows, steps = args.prompts * args.samples, args.new_tokens
    med = uniforms(rows, steps, device, args.repeats * 4)
    print(f"uniforms for {rows} rows x {steps} steps on {device.type} (per chunk; per step in brackets)")
    for k, v in med.items():
        print(f"  {k}: {v * 1e3:.2f} ms ({v / steps * 1e6:.0f} us)")
    sp = SamplingParams(temperature=1.0, max_new_tokens=steps, seed=0)
    engine = LocalEngine(model, tok, precision=args.precision, max_batch=rows)
    engine.eos_ids = set()  # every row runs all steps: equal work on both sides
    seeds = list(range(args.prompts))
    med = interleaved({"one generator": lambda: engine.generate(prompts, args.samples, sp),
                       "per-row generators (seeds)": lambda: engine.generate(prompts, args.samples, sp, seeds=seeds)},
                      args.repeats)
    base = med["one generator"]
    print(f"generate {args.prompts} prompts x {args.samples} samples x {steps} tokens, {args.model} "
          f"{args.precision} on {device.type}, {args.threads} threads")
    for k, v in med.items():
        print(f"  {k}: {v:.3f} s ({v / steps * 1e3:.1f} ms a step; {100 * (v - base) / base:+.1f}%)")


def invariance(model, tok, prompts, args) -> None:
    """Seeded rows whose tokens differ from the whole call's when their prompts come in other company."""
    P, G = args.prompts, args.samples
    sp = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens)
    print(f"batch invariance, {args.model} {args.precision}: seeded rows whose tokens differ from the whole call's")
    for label, max_batch, calls in (
        ("the odd prompts in a call of their own (a process's share)", P * G, [list(range(1, P, 2))]),
        ("each prompt in a call of its own (no padding)", P * G, [[i] for i in range(P)]),
        ("max_batch = samples: the odd prompts in a call of their own", G, [list(range(1, P, 2))]),
        ("max_batch = samples: each prompt in a call of its own", G, [[i] for i in range(P)]),
    ):
        n, total = differing_rows(model, tok, prompts, G, sp, args.precision, max_batch, calls)
        print(f"  {label}: {n} of {total}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-timing", action="store_true", help="only the batch-invariance counts")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    prompts = (chat_prompts(tok) * args.prompts)[: args.prompts]
    if not args.no_timing:
        timings(model, tok, prompts, args)
    invariance(model, tok, prompts, args)


if __name__ == "__main__":
    main()
