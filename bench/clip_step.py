"""Gradient clipping and the AdamW step on SmolLM2-135M-Instruct's parameters: ``clip_grad_norm_`` then
``optimizer.step()`` against alignkit's ``clip_and_step`` (the coefficient folded into the fused kernel).

Random gradients with a global norm above ``max_grad_norm`` (so clipping is active, as in the benchmarked SFT and
DPO steps), torch's fused AdamW on both sides, interleaved A B A B in one process; medians.

    python bench/clip_step.py --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from alignkit.models.loading import load_model
from alignkit.train.loop import clip_and_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, _ = load_model("smollm2-135m-instruct")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-9, fused=True)  # a tiny lr: the weights barely move between repeats
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in params]

    def plain():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def folded():
        clip_and_step(opt, params, 1.0)

    times: dict[str, list[float]] = {"clip_grad_norm_ + step": [], "clip_and_step": []}
    for rep in range(args.repeats + 1):  # repeat 0 warms up
        for name, fn in zip(times, (plain, folded)):
            for p, grad in zip(params, grads):
                p.grad = grad.clone()
            t0 = time.perf_counter()
            fn()
            if rep:
                times[name].append(time.perf_counter() - t0)
    n = sum(p.numel() for p in params)
    base = statistics.median(times["clip_grad_norm_ + step"])
    print(f"{n / 1e6:.1f}M parameters, median of {args.repeats}")
    for name, ts in times.items():
        print(f"{name}: {statistics.median(ts) * 1e3:.1f} ms ({base / statistics.median(ts):.2f}x)")


if __name__ == "__main__":
    main()
