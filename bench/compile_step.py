"""One packed bf16 SFT forward and backward on SmolLM2-135M-Instruct, eager against ``compile=true``
(``alignkit.models.loading.compile_layers``: each decoder layer compiled with ``torch.compile``).

8 rows of 60 prompt + 33 response tokens (random ids, seed 0) run as one packed row of 744 tokens, the SFT
layout. Both models start from the same weights; the compiled one is compiled first (timed), then the two are
interleaved A B A B; medians. Gradients are dropped after each step (no optimizer).

    python bench/compile_step.py --repeats 4
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from alignkit.data.collate import collate_packed
from alignkit.data.tokenize import Encoded
from alignkit.models.loading import compile_layers, load_model
from alignkit.models.logprobs import autocast, token_logps
from alignkit.models.packing import enable_packing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, _ = load_model("smollm2-135m-instruct")
    enable_packing(model)
    model.train()
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(10, 40000, (n,), generator=g).tolist()  # noqa: E731
    batch = collate_packed([Encoded(rand(60), [rand(33)], i) for i in range(8)], 0)

    def step(m) -> float:
        with autocast("bf16"):
            lp = token_logps(m, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                             position_ids_BT=batch["position_ids"], packed_layout=batch["packed_layout"])
            loss = -lp.sum() / batch["loss_mask"].sum()
        loss.backward()
        for p in m.parameters():
            p.grad = None
        return loss.item()

    compiled = copy.deepcopy(model)
    t0 = time.perf_counter()
    compile_layers(compiled)
    loss_c = step(compiled)
    print(f"compilation and first step: {time.perf_counter() - t0:.1f} s")
    print(f"loss: eager {step(model):.6f}, compiled {loss_c:.6f}")
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        for name, m in (("eager", model), ("compiled", compiled)):
            t0 = time.perf_counter()
            step(m)
            times[name].append(time.perf_counter() - t0)
    eager, comp = statistics.median(times["eager"]), statistics.median(times["compiled"])
    print(f"forward + backward, median of {args.repeats}: eager {eager:.3f} s, compiled {comp:.3f} s "
          f"({eager / comp:.2f}x)")


if __name__ == "__main__":
    main()
