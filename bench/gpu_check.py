"""GPU check: SFT, DPO and GRPO steps of a 0.45B Llama on one GPU in bf16 under ``strategy=fsdp2``, and the
rollout engine's sampler/trainer log-prob mismatch.

    PYTHONPATH=. python bench/gpu_check.py                        # CUDA; about 2-3 minutes on one H200
    PYTHONPATH=. python bench/gpu_check.py --device cpu --small   # a tiny model, a few steps (the test runs this)

Needs no network and no ``datasets``: the model is a ``LlamaConfig`` with random weights (seeded; 24 layers,
hidden 1024, MLP 4096, 16 heads, tied embeddings: 453M parameters) and the default model's tokenizer
(49,152 tokens, carried in ``bench/assets/smollm2_tokenizer``). It is saved as a local transformers directory
and given to the real recipes as ``model=<dir>``, so each method runs as the CLI would run it: loading, placing
the model, FSDP2 sharding with bf16 mixed precision, the loop, the final export.

Printed and written to ``--out`` (JSON), for each method: trainer tokens/s (tokens through the model per second
of the optimizer steps, the first step left out as warm-up), MFU against the bf16 matmul peak measured at the
start (the best of repeated large matmuls), and the run's peak GPU memory (``torch.cuda.max_memory_allocated``
above what was allocated when the run began). Model FLOPs are ``6 x (trunk parameters) x (tokens)`` plus
``6 x vocab x hidden`` for each response token, the only positions alignkit projects to the vocabulary; a shared
prompt is one pass, so its tokens count once; attention's own FLOPs (a few percent at these lengths) are left out.

The mismatch: completions sampled by ``LocalEngine`` (its bf16 copy, temperature 1) are scored again by the
trainer's path (``alignkit.models.logprobs.token_logps``) in fp32, under bf16 autocast, and with bf16 weights
(what FSDP2's mixed precision computes with); reported are the mean ``|delta log p|`` per token and the largest
ratio ``exp(|delta|)``; the fp32 engine against the fp32 trainer is the baseline (float32 rounding only). Random
weights give flat next-token distributions, so these errors are smaller than a trained model's would be.

A part that fails is recorded under ``errors`` (with its traceback) and the others still run; the exit status is
1 when any part failed. ``--parts`` chooses the parts (default: all four). GRPO's figures add the median seconds
of a rollout's generation and of the whole rollout (generation, rewards, the scoring passes) per step.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent / "assets" / "smollm2_tokenizer"

SIZES = {
    "full": dict(num_hidden_layers=24, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                 num_key_value_heads=16),
    "small": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2),
}
DEFAULT_PARTS = "sft,dpo,grpo,mismatch"
# rows per micro-batch, steps, and token lengths of each workload
WORK = {
    "full": dict(steps=8, sft_rows=8, prompt=128, response=384, dpo_pairs=8, dpo_response=256, grpo_steps=5,
                 grpo_prompts=8, grpo_g=8, grpo_new=128, grpo_prompt=64, mismatch_prompts=16, mismatch_g=4,
                 mismatch_new=128, matmul=8192),
    "small": dict(steps=3, sft_rows=4, prompt=16, response=32, dpo_pairs=4, dpo_response=16, grpo_steps=2,
                  grpo_prompts=2, grpo_g=4, grpo_new=8, grpo_prompt=12, mismatch_prompts=2, mismatch_g=2,
                  mismatch_new=8, matmul=256),
}


def text_reward(prompts, completions, **_):
    """A reward that differs between completions (a hash of the text in [0, 1)), so GRPO's groups have
    non-zero advantages with a random model; used as ``rewards=bench/gpu_check.py:text_reward``."""
    return [int.from_bytes(hashlib.blake2b(c.encode(), digest_size=4).digest(), "little") / 2**32
            for c in completions]


# ----------------------------------------------------------------------------------------------- setup


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def matmul_peak(dev: torch.device, n: int, repeats: int = 10) -> float:
    """The best bf16 matmul rate seen, in FLOP/s: ``2 n^3`` per ``n x n`` product."""
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16, generator=g)
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        sync(dev)
        best = min(best, (time.perf_counter() - t0) / 5)
    return 2 * n**3 / best


def build_model(directory: Path, size: str, dev: torch.device) -> dict:
    """A seeded random Llama with the default model's tokenizer, saved as a transformers directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(ASSETS)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, rope_theta=100000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, use_cache=False, **SIZES[size])
    torch.manual_seed(0)
    with torch.device(dev):  # random initialisation where it is fast
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(directory)
    for f in ASSETS.iterdir():
        if f.suffix in (".json", ".jinja"):
            shutil.copy(f, directory / f.name)
    n = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    info = {"parameters": n, "trunk_parameters": n - embed, "vocab": cfg.vocab_size, "hidden": cfg.hidden_size,
            **SIZES[size]}
    del model
    return info


def write_data(directory: Path, tok, w: dict) -> dict[str, Path]:
    """SFT, preference and prompt files of random text (decoded random token ids) of about the set lengths."""
    g = torch.Generator().manual_seed(0)
    specials = set(tok.all_special_ids)

    def text(n: int) -> str:
        ids = [i for i in torch.randint(0, len(tok), (n + 8,), generator=g).tolist() if i not in specials][:n]
        return tok.decode(ids)

    def jsonl(name: str, rows: list[dict]) -> Path:
        path = directory / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    n_sft = w["sft_rows"] * w["steps"]
    n_dpo = w["dpo_pairs"] * w["steps"]
    n_grpo = w["grpo_prompts"] * w["grpo_steps"]
    return {
        "sft": jsonl("sft.jsonl", [{"prompt": text(w["prompt"]), "completion": text(w["response"])}
                                   for _ in range(n_sft)]),
        "dpo": jsonl("dpo.jsonl", [{"prompt": text(w["prompt"]), "chosen": text(w["dpo_response"]),
                                    "rejected": text(w["dpo_response"])} for _ in range(n_dpo)]),
        "grpo": jsonl("grpo.jsonl", [{"prompt": text(w["grpo_prompt"])} for _ in range(n_grpo)]),
    }


# ------------------------------------------------------------------------------------------ measuring


class Counter:
    """Tokens each optimizer step puts through the model: counted from the rows every task's ``loss`` is given,
    cut into steps where the loop clips and steps."""

    def __init__(self):
        self.trunk = self.head = 0
        self.steps: list[tuple[int, int]] = []

    def rows(self, rows) -> None:
        for r in rows:
            self.trunk += len(r.prompt) + sum(map(len, r.responses))
            self.head += sum(map(len, r.responses))

    def step(self) -> None:
        self.steps.append((self.trunk, self.head))
        self.trunk = self.head = 0


def counting(counter: Counter, task_classes: list):
    """Patch the tasks' ``loss`` and the loop's ``clip_and_step`` to feed ``counter``; returns an undo function."""
    from alignkit.train import loop

    undo = []
    for cls in task_classes:
        real = cls.loss

        def loss(self, model, rows, normaliser, _real=real):
            counter.rows(rows)
            return _real(self, model, rows, normaliser)

        cls.loss = loss
        undo.append((cls, "loss", real))
    real_step = loop.clip_and_step

    def clip_and_step(*a, **k):
        out = real_step(*a, **k)
        counter.step()
        return out

    loop.clip_and_step = clip_and_step
    undo.append((loop, "clip_and_step", real_step))

    def restore():
        for obj, name, value in undo:
            setattr(obj, name, value)

    return restore


def figures(out_dir: Path, counter: Counter, info: dict, peak: float, dev: torch.device, seconds: float,
            memory_at_start: int) -> dict:
    """Trainer tokens/s, MFU and memory of a finished run, from its metrics.jsonl and the counted tokens."""
    records = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x]
    trained = [r for r in records if not r.get("skipped")]
    if len(trained) != len(counter.steps):
        raise RuntimeError(f"{len(trained)} optimizer steps in metrics.jsonl, {len(counter.steps)} counted")
    timed = list(zip(trained, counter.steps))[1:] or list(zip(trained, counter.steps))  # step 1 warms up
    secs = sum(r["time/update"] for r, _ in timed)
    trunk = sum(t for _, (t, _) in timed)
    head = sum(h for _, (_, h) in timed)
    flops = 6 * (info["trunk_parameters"] * trunk + info["vocab"] * info["hidden"] * head)
    res = {
        "steps": len(records), "timed_steps": len(timed), "tokens_per_step": trunk / len(timed),
        "tokens_per_s": trunk / secs, "model_tflops_per_s": flops / secs / 1e12, "mfu": flops / secs / peak,
        "step_s_median": statistics.median(r["time/update"] for r, _ in timed), "run_s": seconds,
        "loss_first": records[0].get("loss"), "loss_last": records[-1].get("loss"),
        "skipped_steps": len(records) - len(trained),
    }
    if dev.type == "cuda":  # the run's own peak: a model sharded earlier in this process is still allocated
        res["peak_memory_gib"] = (torch.cuda.max_memory_allocated(dev) - memory_at_start) / 2**30
        res["memory_at_start_gib"] = memory_at_start / 2**30
    gen = [r for r in records if "time/generate" in r][1:]
    if gen:
        res["generate_s_median"] = statistics.median(r["time/generate"] for r in gen)
        res["rollout_s_median"] = statistics.median(r["time/rollout"] for r in gen if "time/rollout" in r)
    return res


def run_method(name: str, args, model_dir: Path, data: dict, w: dict, info: dict, peak: float,
               dev: torch.device, work: Path) -> dict:
    """One method through its recipe (``run(cfg)``), as the CLI runs it, with its figures."""
    common = dict(model=str(model_dir), device=args.device, precision="bf16", strategy="fsdp2", progress=False,
                  output_dir=str(work / name), max_length=2048, seed=0, overwrite=True, log_every=1)
    counter = Counter()
    if name == "sft":
        from alignkit.config import SFTConfig
        from alignkit.recipes import sft as recipe

        cfg = SFTConfig(data=str(data["sft"]), batch_size=w["sft_rows"], max_steps=w["steps"], lr=1e-5, **common)
        tasks = [recipe.SFTTask]
    elif name == "dpo":
        from alignkit.config import DPOConfig
        from alignkit.recipes import dpo as recipe

        cfg = DPOConfig(data=str(data["dpo"]), batch_size=w["dpo_pairs"], max_steps=w["steps"], lr=1e-6, **common)
        tasks = [recipe.PreferenceTask]
    else:
        from alignkit.config import RLConfig
        from alignkit.recipes import rl as recipe
        from alignkit.rl.trainer import PolicyTask

        cfg = RLConfig(data=str(data["grpo"]), preset="grpo", rewards=f"{Path(__file__).resolve()}:text_reward",
                       prompts_per_step=w["grpo_prompts"], num_generations=w["grpo_g"], max_new_tokens=w["grpo_new"],
                       batch_size=2, max_steps=w["grpo_steps"], lr=1e-6, **common)
        tasks = [PolicyTask]
    cfg.validate()
    memory_at_start = 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        memory_at_start = torch.cuda.memory_allocated(dev)
    restore = counting(counter, tasks)
    t0 = time.perf_counter()
    try:
        recipe.run(cfg)
    finally:
        restore()
    return figures(Path(cfg.output_dir), counter, info, peak, dev, time.perf_counter() - t0, memory_at_start)


def mismatch(model_dir: Path, w: dict, dev: torch.device) -> dict:
    """Sampler (LocalEngine, bf16 copy, T=1) against trainer (token_logps) log-probs of the same tokens."""
    from alignkit.data.collate import pad
    from alignkit.models.device import to_device
    from alignkit.models.loading import load_model
    from alignkit.models.logprobs import autocast, token_logps
    from alignkit.rl.rollout import LocalEngine, SamplingParams

    model, tok = load_model(str(model_dir))
    model.to(dev).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, len(tok), (w["grpo_prompt"],), generator=g).tolist()
               for _ in range(w["mismatch_prompts"])]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=w["mismatch_new"])
    out: dict = {}
    for engine_precision in ("bf16", "fp32"):
        engine = LocalEngine(model, tok, precision=engine_precision)
        groups = engine.generate(prompts, w["mismatch_g"], sampling, seeds=list(range(len(prompts))))
        seqs, sampled = [], []
        for p, group in zip(prompts, groups):
            for c in group:
                seqs.append((p + c.token_ids, [False] * len(p) + [True] * len(c.token_ids)))
                sampled.append(torch.tensor(c.logps, dtype=torch.float64))
        batch = to_device(pad(seqs, tok.pad_token_id), dev)
        sampled_N = torch.cat(sampled)
        del engine
        trainer_modes = {"fp32": (model, "fp32"), "bf16_autocast": (model, "bf16")}
        if engine_precision == "bf16":
            import copy

            trainer_modes["bf16_weights"] = (copy.deepcopy(model).to(torch.bfloat16), "fp32")
        for mode, (net, precision) in trainer_modes.items():
            with torch.no_grad(), autocast(precision, dev):
                lp_BT = token_logps(net, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
            trainer_N = lp_BT[batch["loss_mask"]].double().cpu()
            d = (trainer_N - sampled_N).abs()
            out[f"engine_{engine_precision}_vs_trainer_{mode}"] = {
                "tokens": d.numel(), "mean_abs_dlogp": d.mean().item(), "max_abs_dlogp": d.max().item(),
                "max_ratio": math.exp(d.max().item()), "mean_logp": sampled_N.mean().item()}
    return out


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--small", action="store_true", help="a tiny model and a few steps (a test of the script)")
    ap.add_argument("--out", default="gpu_check.json", help="where the JSON goes")
    ap.add_argument("--parts", default=DEFAULT_PARTS, help=f"comma-separated parts to run (default {DEFAULT_PARTS})")
    args = ap.parse_args(argv)
    import transformers

    from alignkit.train import strategy

    size = "small" if args.small else "full"
    w = WORK[size]
    dev = strategy.device(args.device)
    t_start = time.perf_counter()
    report: dict = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "size": size, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "errors": {},
    }
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        report["peak_bf16_tflops"] = matmul_peak(dev, w["matmul"]) / 1e12
        print(f"bf16 matmul peak ({w['matmul']}^3): {report['peak_bf16_tflops']:.1f} TFLOP/s", flush=True)
        model_dir = work / "model"
        report["model"] = build_model(model_dir, size, dev)
        print(f"model: {report['model']['parameters'] / 1e6:.1f}M parameters", flush=True)
        from transformers import AutoTokenizer

        data = write_data(work, AutoTokenizer.from_pretrained(ASSETS), w)
        for part in [p.strip() for p in args.parts.split(",") if p.strip()]:
            t0 = time.perf_counter()
            try:
                if part == "mismatch":
                    report[part] = mismatch(model_dir, w, dev)
                else:
                    report[part] = run_method(part, args, model_dir, data, w, report["model"],
                                              report["peak_bf16_tflops"] * 1e12, dev, work)
                print(f"{part}: {json.dumps(report[part])}", flush=True)
            except Exception as e:  # noqa: BLE001 - record it and go on with the other parts
                report["errors"][part] = "".join(traceback.format_exception(e))[-4000:]
                print(f"{part}: FAILED after {time.perf_counter() - t0:.1f} s\n{report['errors'][part]}",
                      file=sys.stderr, flush=True)
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001 - the set-up failed: still write what is known
        report["errors"]["setup"] = "".join(traceback.format_exception(e))[-4000:]
        print(report["errors"]["setup"], file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = time.perf_counter() - t_start
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
