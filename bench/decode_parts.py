"""The parts of the rollout engine's decode step at batch 8 on SmolLM2-135M-Instruct, each against what it
replaced, interleaved A B A B in one process (medians):

- the trunk's 210 linear layers and the head, plain bf16 ``F.linear`` against prepacked weights
  (``alignkit.models.prepacked``), and q/k/v and gate/up fused into one prepacked matmul each;
- sampling 8 x 49,152 logits: ``torch.multinomial`` (the engine's sampler before) against ``sample_next``'s
  inverse CDF;
- a decode step (8 ASDiv chat prompts, 1 sample each): the lean step (``alignkit.rl.decode``) against
  transformers' forward, from calls of 1 and ``1 + --steps`` new tokens; the 1-token call is the prefill;
- ``update_weights`` (the bf16 copy's refresh) with and without prepacking.

    python bench/decode_parts.py --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import alignkit.rl.rollout as rollout
from alignkit.models.loading import load_model
from alignkit.models.prepacked import PrepackedLinear
from alignkit.rl.rollout import LocalEngine, SamplingParams, sample_next

sys.path.insert(0, str(Path(__file__).parent))
from generate import chat_prompts  # noqa: E402


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, called in turn ``repeats`` times after one warm-up call each."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(repeats + 1):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if rep:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def show(title: str, med: dict[str, float]) -> None:
    """Each median in ms, with the first one's time over it."""
    base = next(iter(med.values()))
    print(title)
    for k, v in med.items():
        print(f"  {k}: {v * 1e3:.1f} ms ({base / v:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_model("smollm2-135m-instruct")
    model.eval()
    fast = LocalEngine(model, tok, precision="bf16")
    slow = LocalEngine(model, tok, precision="bf16", fast_decode=False)
    for e in (fast, slow):
        e.eos_ids = set()

    # linear layers
    g = torch.Generator().manual_seed(0)
    packed = {n: m for n, m in slow._packed.items()}  # the copy without the lean forward keeps q/k/v, gate/up apart
    head = packed.pop("lm_head")
    plain = {n: m.weight for n, m in packed.items()}
    xs = {k: torch.randn(8, k, generator=g).to(torch.bfloat16) for k in {w.shape[1] for w in plain.values()}}
    fused = []
    for i in range(model.config.num_hidden_layers):
        for parts in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            w = torch.cat([plain[f"model.layers.{i}.{p}"] for p in parts])
            layer = PrepackedLinear(w.shape[1], w.shape[0], None)
            layer.load(w)
            fused.append(layer)
        for p in ("self_attn.o_proj", "mlp.down_proj"):
            fused.append(packed[f"model.layers.{i}.{p}"])
    head_w = head.weight
    med = interleaved({
        f"trunk, {len(plain)} plain F.linear": lambda: [F.linear(xs[w.shape[1]], w) for w in plain.values()],
        f"trunk, {len(packed)} prepacked": lambda: [m(xs[m.in_features]) for m in packed.values()],
        f"trunk, {len(fused)} prepacked with q/k/v and gate/up fused": lambda: [m(xs[m.in_features]) for m in fused],
    }, args.repeats)
    show("linear layers at batch 8", med)
    show("head at batch 8", interleaved({"plain F.linear": lambda: F.linear(xs[head.in_features], head_w),
                                         "prepacked": lambda: head(xs[head.in_features])}, args.repeats))

    # sampling
    logits = torch.randn(8, model.config.vocab_size, generator=g) * 3
    gen = torch.Generator().manual_seed(0)
    sp = SamplingParams(temperature=1.0)

    def multinomial():
        logp = logits.log_softmax(-1)
        return torch.multinomial(logp.softmax(-1), 1, generator=gen)

    show("sampling 8 rows", interleaved({"torch.multinomial": multinomial,
                                         "inverse CDF (sample_next)": lambda: sample_next(
                                             logits, sp, torch.rand(8, dtype=torch.float64, generator=gen))},
                                        args.repeats))

    # decode steps and prefill
    prompts = chat_prompts(tok)
    one, many = SamplingParams(max_new_tokens=1, seed=0), SamplingParams(max_new_tokens=1 + args.steps, seed=0)
    med = interleaved({
        "lean, 1 token": lambda: fast.generate(prompts, 1, one),
        f"lean, {1 + args.steps} tokens": lambda: fast.generate(prompts, 1, many),
        "transformers, 1 token": lambda: slow.generate(prompts, 1, one),
        f"transformers, {1 + args.steps} tokens": lambda: slow.generate(prompts, 1, many),
    }, max(3, args.repeats // 3))
    v = list(med.values())
    print(f"8 prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens: prefill (the 1-token call) "
          f"{v[0]:.2f} s lean, {v[2]:.2f} s transformers")
    lean, hf = (v[1] - v[0]) / args.steps, (v[3] - v[2]) / args.steps
    print(f"decode step at batch 8: lean {lean * 1e3:.1f} ms, transformers {hf * 1e3:.1f} ms ({hf / lean:.2f}x)")

    # weight refresh
    orig = rollout.prepack_linears
    rollout.prepack_linears = lambda m: {}
    unpacked = LocalEngine(model, tok, precision="bf16")
    rollout.prepack_linears = orig
    show("update_weights", interleaved({"with prepacking": lambda: fast.update_weights(model),
                                        "without": lambda: unpacked.update_weights(model)}, max(3, args.repeats // 3)))


if __name__ == "__main__":
    main()
