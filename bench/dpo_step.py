"""Tokens/s and peak RSS of one DPO step (full fine-tuning, AdamW) on SmolLM2-135M-Instruct.

4 pairs, 48-token prompts and ~100-token responses (seeded random tokens), fp32 and bf16 autocast, with the
shared-prompt batching on and off. Each configuration runs in its own process (peak RSS is per process);
the processes are interleaved A B C D A B C D ... and the medians are reported.

    python bench/dpo_step.py --repeats 3 --steps 4

Tokens are counted as TRL counts them: both sequences of a pair, ``2 * prompt + chosen + rejected``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def worker(precision: str, share_prompt: bool, steps: int, pairs: int, prompt_len: int, resp_len: int) -> dict:
    import torch

    from alignkit.config import DPOConfig, build
    from alignkit.data.tokenize import Encoded
    from alignkit.models.loading import load_model
    from alignkit.models.logprobs import autocast
    from alignkit.recipes.dpo import PreferenceTask, Reference

    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m-instruct")
    model.train()
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(100, 40000, (n,), generator=g).tolist()  # noqa: E731
    rows = [Encoded(rand(prompt_len), [rand(resp_len + 3 * i), rand(resp_len - 3 * i)], i) for i in range(pairs)]
    cfg = build(DPOConfig, overrides=dict(data="-", precision=precision, share_prompt=share_prompt, batch_size=pairs))
    ref = Reference(model, "cached", tok.pad_token_id, cfg.logits_chunk, pairs, precision, share_prompt)
    ref.fill(model, rows)
    task = PreferenceTask(cfg, tok.pad_token_id, ref)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    tokens = sum(2 * len(r.prompt) + sum(map(len, r.responses)) for r in rows)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with autocast(precision):
            loss, _ = task.loss(model, rows, float(pairs))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i > 0:  # the first step warms up allocations and creates the optimizer state
            times.append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in model.parameters())
    sec = statistics.median(times)
    return {
        "precision": precision, "share_prompt": share_prompt, "tokens": tokens, "step_s": sec,
        "tokens_per_s": tokens / sec, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # forward + backward of a full fine-tune ~ 6 * params * tokens (TRL-counted tokens; shared prompts do less)
        "model_gflops": 6 * n_params * tokens / sec / 1e9, "loss": float(loss),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--resp-len", type=int, default=100)
    ap.add_argument("--worker", nargs=2, metavar=("PRECISION", "SHARE"))
    args = ap.parse_args()
    if args.worker:
        prec, share = args.worker
        print(json.dumps(worker(prec, share == "1", args.steps, args.pairs, args.prompt_len, args.resp_len)))
        return
    results: dict[tuple, list[dict]] = {c: [] for c in CONFIGS}
    for rep in range(args.repeats):
        for prec, share in CONFIGS:
            cmd = [sys.executable, __file__, "--worker", prec, "1" if share else "0", "--steps", str(args.steps),
                   "--pairs", str(args.pairs), "--prompt-len", str(args.prompt_len), "--resp-len", str(args.resp_len)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[(prec, share)].append(json.loads(out))
            print(f"repeat {rep + 1}: {prec} share_prompt={share}: {results[(prec, share)][-1]['tokens_per_s']:.0f} tok/s",
                  file=sys.stderr)
    base = statistics.median(r["tokens_per_s"] for r in results[("fp32", False)])
    print(f"\nDPO step, SmolLM2-135M full fine-tune, {args.pairs} pairs, prompt {args.prompt_len} + responses "
          f"~{args.resp_len} tokens; median of {args.repeats} processes x {args.steps} steps; {platform.processor() or platform.machine()}\n")
    print("| precision | share_prompt | step (s) | tokens/s | vs fp32 unshared | peak RSS (MiB) | model GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for (prec, share), rs in results.items():
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        print(f"| {prec} | {share} | {med('step_s'):.2f} | {med('tokens_per_s'):.0f} | {med('tokens_per_s') / base:.2f}x "
              f"| {med('peak_rss_mib'):.0f} | {med('model_gflops'):.0f} |")


if __name__ == "__main__":
    main()
