"""How close the rollout engine's two bf16 decode paths are to the fp32 model, on SmolLM2-135M-Instruct.

1. Teacher-forced: 8 ASDiv-style chat prompts, prefilled once, then ``--steps`` decode steps fed the fp32
   model's greedy tokens. At every step the fp32 model's logits are compared with those of the engine's bf16
   copy through transformers' forward and through the lean step (``alignkit.rl.decode``): mean absolute logit
   difference and how often the argmax agrees with fp32's.
2. ``--held-out``: greedy answers (64 tokens) to the GRPO main job's 150 held-out problems through both paths:
   how many are identical, where the others part ways, and each path's answer accuracy.

    python bench/decode_accuracy.py --steps 48 --held-out
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import DynamicCache

from alignkit.models.loading import load_model
from alignkit.rl.decode import fast_decoder
from alignkit.rl.rollout import LocalEngine, SamplingParams, _forward

sys.path.insert(0, str(Path(__file__).parent))
from generate import chat_prompts  # noqa: E402


@torch.no_grad()
def teacher_forced(model, tok, steps: int) -> None:
    copy16 = LocalEngine(model, tok, precision="bf16", fast_decode=False)._copy  # plain layers: transformers runs it
    lean = fast_decoder(LocalEngine(model, tok, precision="bf16")._copy)  # fused and prepacked: the engine's
    prompts = chat_prompts(tok)
    P, T = len(prompts), max(map(len, prompts))
    ids, mask = torch.zeros(P, T, dtype=torch.long), torch.zeros(P, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache32, cache16 = DynamicCache(config=model.config), DynamicCache(config=model.config)
    logits32 = _forward(model, ids, mask, pos, cache32)
    _forward(copy16, ids, mask, pos, cache16)
    caches = {}
    for name, dtype in (("lean, float32 keys/values", torch.float32), ("lean, bf16 keys/values", torch.bfloat16)):
        _, keys, values = lean.prefill(prompts, dtype)
        caches[name] = lean.cache(P, T + steps, dtype)
        caches[name].admit(keys, values, [len(p) for p in prompts], list(range(P)))
    nxt = mask.sum(-1)
    names = ["transformers", *caches]
    err, agree = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)
    for _ in range(steps):
        tokens = logits32.argmax(-1)
        mask = torch.cat([mask, torch.ones(P, 1, dtype=torch.long)], 1)
        logits32 = _forward(model, tokens[:, None], mask, nxt[:, None], cache32)
        got = {"transformers": _forward(copy16, tokens[:, None], mask, nxt[:, None], cache16)}
        got.update({name: lean.step(tokens, cache) for name, cache in caches.items()})
        for k, logits in got.items():
            err[k] += (logits - logits32).abs().mean().item() / steps
            agree[k] += int((logits.argmax(-1) == logits32.argmax(-1)).sum())
        nxt = nxt + 1
    print(f"teacher-forced, {P} prompts x {steps} steps, against the fp32 model:")
    for k in err:
        print(f"  bf16 {k} step: mean |logit difference| {err[k]:.4f}, argmax equal {agree[k]}/{P * steps}")


def held_out() -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    import grpo_job

    from alignkit.config import RLConfig, build
    from alignkit.recipes import rl

    out = Path("outputs/decode_accuracy")
    train_path, test_path, _, _ = grpo_job.write_data(out / "data", "solved")
    cfg = build(RLConfig, overrides={**grpo_job.DEFAULTS, "output_dir": str(out), "data": str(train_path),
                                     "eval_data": str(test_path)})
    o = rl.prepare_online(cfg)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=cfg.max_new_tokens, stop=cfg.stop_strings)
    answers = {}
    for fast in (True, False):
        engine = LocalEngine(o.policy, o.tok, precision=cfg.rollout_precision, max_batch=cfg.rollout_batch,
                             fast_decode=fast)
        score = rl.evaluator(engine, o.rewards, o.held, o.policy, cfg)()["reward/correctness"]
        answers[fast] = [g[0].token_ids for g in engine.generate([p.ids for p in o.held], 1, sampling)]
        print(f"held out, {'lean' if fast else 'transformers'} step: answer accuracy {score:.3f}")
    pairs = list(zip(answers[True], answers[False]))
    parted = sorted(next(i for i, (x, y) in enumerate(zip(a + [-1], b + [-2])) if x != y) for a, b in pairs if a != b)
    print(f"identical greedy answers: {len(pairs) - len(parted)} of {len(pairs)}; the others part at token {parted}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--held-out", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_model("smollm2-135m-instruct")
    teacher_forced(model.eval(), tok, args.steps)
    if args.held_out:
        held_out()


if __name__ == "__main__":
    main()
