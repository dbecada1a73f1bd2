"""alignkit and TRL side by side: the same SFT, DPO or GRPO steps on SmolLM2-135M-Instruct.

Both tools get the same model (the converted SmolLM2 directory), the same rows (the first ``--rows`` pairs of the
DPO main job's ``asdiv-prefs`` set, chat-formatted; SFT trains on prompt + chosen), the same batch (all rows in
one optimizer step, so every step is the same work), precision, AdamW with a constant learning rate, gradient
clipping at 1.0 (not with alignkit's ``optimizer_in_backward=true``, which cannot clip by the global norm), and
the same number of steps. Each tool runs through its real entry point: ``alignkit``'s
recipe ``run()`` (what the CLI calls) and TRL's ``SFTTrainer``/``DPOTrainer``.``train()``. TRL runs in its own
virtual environment with the same pinned CPU torch (``--setup`` makes it). Every run is its own process (peak
RSS is per process) and the runs are interleaved A B A B; the medians are reported with their ratio.

    python bench/vs_trl.py --setup                      # once: the TRL environment
    python bench/vs_trl.py check                        # fp32 losses of steps 1 and 2 side by side
    python bench/vs_trl.py dpo --precision bf16 --repeats 3
    python bench/vs_trl.py sft --precision bf16 --repeats 3
    python bench/vs_trl.py grpo --repeats 2             # 4 ASDiv prompts x 4 samples of up to 64 tokens a step

GRPO: both sample at temperature 1 from bf16 weights with no KL term (TRL's default ``beta=0``, so neither loads a
reference) and are scored by the same last-number correctness rule; each step generates, scores and trains
once. Samples end at EOS, so the two do not generate exactly the same number of tokens: the table reports the
mean completion length beside the step time.

A step's time is the wall time between two consecutive step ends (data, forward, backward, optimizer, logging);
step 1 is warm-up and is left out. Tokens are counted as TRL counts them: every sequence's length without
padding (a DPO pair is ``2 x prompt + chosen + rejected``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRL_VERSION = "1.16.0"
TORCH_VERSION = "2.13.0"
VENV = Path(os.environ.get("ALIGNKIT_TRL_VENV", Path.home() / ".cache/alignkit/bench/trl-venv"))
TRL_PYTHON = VENV / "bin" / "python"


def setup() -> None:
    """A virtual environment with the pinned CPU torch and TRL, beside (not inside) alignkit's."""
    if not TRL_PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(TRL_PYTHON), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run(pip + [f"trl=={TRL_VERSION}", "peft", "psutil"], check=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def last_number_reward(completions, answer, **_) -> list[float]:
    """1 when the last number in the answer equals the reference answer (TRL's reward-function signature)."""
    import re

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    found = [re.findall(r"-?\d+(?:\.\d+)?", t.replace(",", "")) for t in texts]
    return [float(bool(f) and float(f[-1]) == float(a)) for f, a in zip(found, answer)]


def sequence_tokens(kind: str, rows: list[dict]) -> int:
    """Tokens a step processes, counted without padding, from the token ids TRL reports."""
    if kind == "grpo":
        return 0
    if kind == "sft":
        return sum(len(r["input_ids"]) for r in rows)
    return sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)


# ------------------------------------------------------------------------------------------------ workers


def trl_worker(a: dict) -> dict:
    """Runs inside the TRL environment: imports nothing from alignkit."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    torch.set_num_threads(a["threads"])
    rows = [json.loads(line) for line in Path(a["data"]).read_text().splitlines()][: a["rows"]]
    tok = AutoTokenizer.from_pretrained(a["model"])
    model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32)
    common = dict(
        output_dir=a["out"], per_device_train_batch_size=len(rows), max_steps=a["steps"], learning_rate=a["lr"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
        report_to="none", save_strategy="no", use_cpu=True, seed=a.get("seed", 0), bf16=a["precision"] == "bf16",
        gradient_checkpointing=a["gradient_checkpointing"], dataloader_num_workers=0, max_length=1024,
    )
    peft_config = None
    if a["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    if a["kind"] == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        common.update(per_device_train_batch_size=a["prompts"] * a["generations"])
        common.pop("max_length")
        data = Dataset.from_list([json.loads(line) for line in Path(a["prompts_file"]).read_text().splitlines()])
        args = GRPOConfig(**common, num_generations=a["generations"], max_completion_length=a["new_tokens"],
                          temperature=1.0, beta=0.0)
        trainer = GRPOTrainer(model=model, reward_funcs=last_number_reward, args=args, train_dataset=data,
                              processing_class=tok, peft_config=peft_config)
        ids = []
    elif a["kind"] == "dpo":
        from trl import DPOConfig, DPOTrainer

        data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
        trainer = DPOTrainer(model=model, args=DPOConfig(**common, beta=0.1, loss_type=["sigmoid"]),
                             train_dataset=data, processing_class=tok, peft_config=peft_config)
        ids = [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in trainer.train_dataset]
    else:
        from trl import SFTConfig, SFTTrainer

        data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])
        trainer = SFTTrainer(model=model, args=SFTConfig(**common, packing=a["packing"], completion_only_loss=True),
                             train_dataset=data, processing_class=tok, peft_config=peft_config)
        ids = [{"input_ids": r["input_ids"]} for r in trainer.train_dataset]

    ends: list[float] = []
    threads: set[int] = set()  # what torch uses during the steps, to show TRL ran with the same threads

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            ends.append(time.perf_counter())

        def on_step_end(self, *args, **kwargs):
            ends.append(time.perf_counter())
            threads.add(torch.get_num_threads())

    losses: list[float] = []
    compute_loss = trainer.compute_loss

    def recorded(*args, **kwargs):  # the logged loss is rounded to 4 decimals: keep the exact one
        out = compute_loss(*args, **kwargs)
        losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
        return out

    trainer.compute_loss = recorded
    generation: list[float] = []
    if a["kind"] == "grpo":  # sampling time: TRL's one generation call per step (steps_per_generation = 1)
        generate = trainer._generate

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = generate(*args, **kwargs)
            generation.append(time.perf_counter() - t0)
            return out

        trainer._generate = timed
    trainer.add_callback(Clock())
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"step_s": [b - e for e, b in zip(ends, ends[1:])], "losses": losses, "completion_len": lengths, "gen_s": generation,
            "threads": sorted(threads), "tokens": sequence_tokens(a["kind"], ids), "peak_rss_mib": peak_rss_mib(),
            "ids": ids if a.get("return_ids") else None}


def alignkit_worker(a: dict) -> dict:
    import torch

    from alignkit.config import DPOConfig, SFTConfig, build

    torch.set_num_threads(a["threads"])
    if a["kind"] == "grpo":
        return alignkit_grpo(a)
    rows = [json.loads(line) for line in Path(a["data"]).read_text().splitlines()][: a["rows"]]
    data = Path(a["out"]) / "data.jsonl"
    if a["kind"] == "sft":
        rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = dict(
        data=str(data), output_dir=a["out"], batch_size=len(rows), max_steps=a["steps"], lr=a["lr"],
        scheduler="constant", warmup_steps=0, weight_decay=0.0, precision=a["precision"],
        lora=a["lora"], progress=False, save_merged=False, gradient_checkpointing=a["gradient_checkpointing"],
        seed=a.get("seed", 0), compile=a.get("compile", False),
        # the step in backward cannot clip by the global norm (the one difference from the other runs)
        optimizer_in_backward=a.get("optimizer_in_backward", False), optimizer_state=a.get("optimizer_state", "fp32"),
        max_grad_norm=0.0 if a.get("optimizer_in_backward") else 1.0,
    )
    if a["kind"] == "dpo":
        from alignkit.recipes.dpo import run

        cfg = build(DPOConfig, overrides=dict(overrides, beta=0.1, loss="dpo"))
    else:
        from alignkit.recipes.sft import run

        cfg = build(SFTConfig, overrides=dict(overrides, packing=a["packing"]))
    run(cfg)
    history = [json.loads(line) for line in (Path(a["out"]) / "metrics.jsonl").read_text().splitlines()]
    return {"step_s": [h["seconds"] for h in history], "losses": [h["loss"] for h in history],
            "peak_rss_mib": peak_rss_mib(), "ids": alignkit_ids(a["kind"], data) if a.get("return_ids") else None}


def encoded_rows(kind: str, data: str, n: int) -> list[dict]:
    """The first ``n`` rows of the benchmark's data as alignkit tokenizes them (SFT: prompt + chosen)."""
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()][:n]
    if kind == "sft":
        rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return alignkit_ids(kind, path, split=True)


def alignkit_ids(kind: str, data: Path, split: bool = False) -> list[dict]:
    """The token ids alignkit trains on, in TRL's layout (what ``prepare`` tokenizes, without the model); with
    ``split``, an SFT row's prompt and response apart."""
    from alignkit.data.formats import load_examples
    from alignkit.data.tokenize import encode_all
    from alignkit.models.loading import load_tokenizer

    examples = load_examples(str(data), "sft" if kind == "sft" else "preference").examples
    rows = encode_all(examples, load_tokenizer("smollm2-135m-instruct"), max_length=1024, max_prompt_length=None,
                      truncation="truncate").rows
    if kind == "sft":
        if split:
            return [{"prompt_ids": r.prompt, "response_ids": r.responses[0]} for r in rows]
        return [{"input_ids": r.prompt + r.responses[0]} for r in rows]
    return [{"prompt_ids": r.prompt, "chosen_ids": r.responses[0], "rejected_ids": r.responses[1]} for r in rows]


def alignkit_grpo(a: dict) -> dict:
    from alignkit.config import RLConfig, build
    from alignkit.recipes.rl import run

    cfg = build(RLConfig, overrides=dict(
        data=a["prompts_file"], output_dir=a["out"], preset="grpo", kl_in="none", kl_coef=0.0,
        prompts_per_step=a["prompts"], num_generations=a["generations"], batch_size=a["prompts"],
        max_new_tokens=a["new_tokens"], temperature=1.0, max_steps=a["steps"], lr=a["lr"], scheduler="constant",
        precision=a["precision"], rollout_precision="bf16", lora=a["lora"], progress=False, save_merged=False,
    ))
    run(cfg)
    history = [json.loads(line) for line in (Path(a["out"]) / "metrics.jsonl").read_text().splitlines()]
    return {"step_s": [h["seconds"] for h in history], "losses": [h.get("loss", 0.0) for h in history],
            "completion_len": [h["completion/length/mean"] for h in history],
            "gen_s": [h["time/generate"] for h in history], "peak_rss_mib": peak_rss_mib()}


# ------------------------------------------------------------------------------------------------ driver


def model_dir() -> str:
    from alignkit.models.loading import resolve_model

    return str(resolve_model("smollm2-135m-instruct"))


def data_file() -> str:
    from alignkit.data.sources import fetch

    return str(fetch("asdiv-prefs") / "train.jsonl")


def spawn(tool: str, args: dict) -> dict:
    python = str(TRL_PYTHON) if tool == "trl" else sys.executable
    with tempfile.TemporaryDirectory() as out:
        payload = json.dumps(dict(args, out=out))
        proc = subprocess.run([python, __file__, "--worker", tool, payload], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{tool} worker failed:\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(kind: str, variants: list[tuple[str, str, dict]], base: dict, repeats: int) -> dict[str, list[dict]]:
    """Run every variant ``repeats`` times, interleaved; returns the results by label."""
    results: dict[str, list[dict]] = {label: [] for label, _, _ in variants}
    for rep in range(repeats):
        for label, tool, extra in variants:
            r = spawn(tool, dict(base, kind=kind, **extra))
            results[label].append(r)
            print(f"repeat {rep + 1} {label}: step {statistics.median(r['step_s'][1:]):.2f} s, "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB, losses {[round(x, 5) for x in r['losses'][:2]]}"
                  + (f", torch threads {r['threads']}" if r.get("threads") else ""), file=sys.stderr)
    return results


def grpo_prompts(n: int = 64) -> str:
    from alignkit.data.asdiv import user_message
    from alignkit.data.sources import fetch

    rows = [json.loads(line) for line in (fetch("asdiv") / "data.jsonl").read_text().splitlines()][:n]
    path = Path(tempfile.mkdtemp(prefix="vs-trl-")) / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": user_message(r), "answer": r["answer"]}) + "\n" for r in rows))
    return str(path)


def grpo_table(results: dict[str, list[dict]], reference: str) -> None:
    def med(label: str, key: str) -> float:
        return statistics.median(statistics.median(r[key][1:]) for r in results[label])

    ref = med(reference, "step_s") / med(reference, "completion_len")
    print("\n| run | step (s) | generation (s) | the rest (s) | mean completion length | step per completion token "
          "| vs " + reference + " | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, rs in results.items():
        step, gen = med(label, "step_s"), med(label, "gen_s")
        per_token = step / med(label, "completion_len")
        rss = statistics.median(r["peak_rss_mib"] for r in rs)
        print(f"| {label} | {step:.2f} | {gen:.2f} | {step - gen:.2f} | {med(label, 'completion_len'):.1f} | "
              f"{per_token:.3f} s | {ref / per_token:.2f}x | {rss:.0f} |")


def matmul_peak(precision: str, threads: int, n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of a square ``n x n`` matmul in ``precision`` on ``threads`` threads: the best of ``repeats``."""
    import torch

    torch.set_num_threads(threads)
    return 2 * n**3 / _matmul_seconds(n, n, n, precision, repeats) / 1e9


def linear_shapes(model: str) -> tuple[list[tuple[int, int]], int, tuple[int, int]]:
    """The decoder layer's linears as ``(in, out)``, the layer count, and the LM head's ``(in, vocab)``."""
    c = json.loads((Path(model) / "config.json").read_text())
    d, f, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c.get("head_dim", 64)
    return [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)], c["num_hidden_layers"], (d, c["vocab_size"])


def _matmul_seconds(m: int, k: int, n: int, precision: str, repeats: int = 5) -> float:
    """Best time of an ``[m, k] @ [k, n]`` matmul."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


def needed_work(kind: str, rows: list[dict], model: str, precision: str) -> tuple[float, float]:
    """``(FLOPs, matmul seconds)`` of the training step's needed work for ``rows`` (alignkit's ids): the trunk's
    linears over every token a step must run through the model once (SFT: prompt + response; DPO: the prompt once,
    both responses), the LM head only over the positions that carry a loss (the response tokens), forward and
    backward (6 FLOPs per weight and token); attention's score matmuls (a few percent here) are not counted. The
    seconds are those same matmuls (forward, input gradient, weight gradient) timed alone at their shapes: the
    step's time if it did nothing but its matmuls, each as fast as this machine runs it."""
    layers, n_layers, (d, vocab) = linear_shapes(model)
    if kind == "sft":
        trunk = sum(len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows)
        head = sum(len(r["response_ids"]) for r in rows)
    else:
        trunk = sum(len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
        head = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    flops = 6 * (n_layers * sum(i * o for i, o in layers) * trunk + d * vocab * head)
    seconds = 0.0
    for m, shapes, count in ((trunk, layers, n_layers), (head, [(d, vocab)], 1)):
        for i, o in shapes:  # forward, input gradient, weight gradient
            seconds += count * (_matmul_seconds(m, i, o, precision) + _matmul_seconds(m, o, i, precision)
                                + _matmul_seconds(o, m, i, precision))
    return flops, seconds


def table(kind: str, results: dict[str, list[dict]], tokens: int, references: list[str], peak: float,
          work: tuple[float, float] | None) -> None:
    """The medians as a markdown table, with ratios to each run in ``references``, and where ``work`` (the step's
    needed FLOPs and matmul seconds, :func:`needed_work`) is given, MFU: those FLOPs over the step time, over the
    matmul peak. Both tools are credited with the same needed work, whatever else they compute (TRL's DPO runs the
    prompt twice and the reference model every step; both SFTs' gradient checkpointing recomputes the forward)."""
    def med(label: str, key: str) -> float:
        if key == "step_s":
            return statistics.median(statistics.median(r["step_s"][1:]) for r in results[label])
        return statistics.median(r[key] for r in results[label])

    show_mfu = work is not None
    print(f"\n{kind.upper()} step, {tokens} tokens a step (as TRL counts them)\n")
    if show_mfu:
        flops, seconds = work
        print(f"Model FLOP utilisation: the step's needed work, {flops / 1e9:.0f} GFLOP (trunk over the tokens it "
              f"must see once, LM head over the loss positions, forward and backward), over the step time, over the "
              f"{peak:.0f} GFLOP/s matmul peak measured before the runs (a 2048 x 2048 matmul). Those matmuls alone "
              f"at the step's own shapes take {seconds:.2f} s: {flops / seconds / 1e9:.0f} GFLOP/s, "
              f"{flops / seconds / 1e9 / peak:.0%} of the peak, the MFU of a step that did nothing else\n")
    speed = "".join(f" speed vs {r} |" for r in references)
    memory = "".join(f" RSS vs {r} |" for r in references)
    print(f"| run | step (s) | tokens/s |{speed} peak RSS (MiB) |{memory}" + (" MFU |" if show_mfu else ""))
    print("|---|---|---|" + "---|" * (2 * len(references) + 1) + ("---|" if show_mfu else ""))
    for label in results:
        step, rss = med(label, "step_s"), med(label, "peak_rss_mib")
        speed = "".join(f" {med(r, 'step_s') / step:.2f}x |" for r in references)
        memory = "".join(f" {rss / med(r, 'peak_rss_mib'):.2f}x |" for r in references)
        mfu = f" {work[0] / step / 1e9 / peak:.0%} |" if show_mfu else ""
        print(f"| {label} | {step:.2f} | {tokens / step:.0f} |{speed} {rss:.0f} |{memory}{mfu}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", nargs="?", choices=("sft", "dpo", "grpo", "check", "peak"))
    ap.add_argument("--setup", action="store_true", help="create the TRL environment")
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--rows", type=int, default=8, help="rows (pairs) in the one batch every step trains on")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="seeds the LoRA initialisation (and data order)")
    ap.add_argument("--skip", action="append", default=[], metavar="LABEL",
                    help="leave out the runs whose label contains LABEL (repeatable), to fit a busy machine's time")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.kind == "peak":
        for prec in ("fp32", "bf16"):
            print(f"{prec} matmul peak: {matmul_peak(prec, args.threads):.0f} GFLOP/s on {args.threads} threads")
        return
    if args.worker:
        tool, payload = args.worker
        print(json.dumps((trl_worker if tool == "trl" else alignkit_worker)(json.loads(payload))))
        return
    if args.setup:
        setup()
        if not args.kind:
            return
    if not TRL_PYTHON.exists():
        raise SystemExit(f"no TRL environment at {VENV}: run `python bench/vs_trl.py --setup` first")
    if args.kind is None:
        ap.error("choose sft, dpo or check")
    base = dict(model=model_dir(), data=data_file(), rows=args.rows, steps=args.steps, threads=args.threads,
                precision=args.precision, lora=args.lora, lr=1e-5, gradient_checkpointing=False, packing=False,
                seed=args.seed)
    if args.kind == "check":
        check(dict(base, precision=args.precision if "--precision" in sys.argv else "fp32"))
        return
    if args.kind == "grpo":
        base.update(prompts_file=grpo_prompts(), prompts=4, generations=4, new_tokens=64, lr=1e-6)
    pack = {"packing": args.kind == "sft"}  # SFT: both pack (TRL's BFD, alignkit's padding-free batches)
    variants = [("TRL (defaults: checkpointing on)", "trl", dict(pack, gradient_checkpointing=True)),
                ("TRL (checkpointing off)", "trl", pack),
                ("alignkit", "alignkit", pack)]
    if args.kind != "grpo":
        variants.append(("alignkit (checkpointing on)", "alignkit", dict(pack, gradient_checkpointing=True)))
    if args.kind == "sft":  # TRL's own torch_compile option is not run
        variants.append(("alignkit (compile=true)", "alignkit", dict(pack, compile=True)))
        inb = dict(pack, optimizer_in_backward=True)  # each option alone, then all three together
        variants += [("alignkit (optimizer_in_backward=true)", "alignkit", inb),
                     ("alignkit (in backward + checkpointing)", "alignkit", dict(inb, gradient_checkpointing=True)),
                     ("alignkit (in backward + checkpointing + compile)", "alignkit",
                      dict(inb, gradient_checkpointing=True, compile=True)),
                     ("alignkit (in backward + checkpointing + bf16 moments)", "alignkit",
                      dict(inb, gradient_checkpointing=True, optimizer_state="bf16")),
                     ("alignkit (checkpointing + bf16 moments)", "alignkit",
                      dict(pack, gradient_checkpointing=True, optimizer_state="bf16"))]
    variants = [v for v in variants if not any(s in v[0] for s in args.skip)]
    references = [label for label, tool, _ in variants if tool == "trl"][:2]
    peak = matmul_peak(args.precision, args.threads)
    results = compare(args.kind, variants, base, args.repeats)
    if args.kind == "grpo":
        print(f"\ngrpo, {args.precision} training, bf16 sampling, {'LoRA r16' if args.lora else 'full fine-tune'}, "
              f"median of {args.repeats} processes x steps 2-{args.steps}, {args.threads} threads")
        grpo_table(results, references[-1])
        return
    first = results[variants[0][0]][0]
    print(f"\n{args.kind}, {args.precision}, {'LoRA r16' if args.lora else 'full fine-tune'}, {args.rows} rows, "
          f"median of {args.repeats} processes x steps 2-{args.steps}, {args.threads} threads")
    work = None if args.lora else needed_work(args.kind, encoded_rows(args.kind, base["data"], args.rows), base["model"],
                                                args.precision)
    table(args.kind, results, first["tokens"], references, peak, work)


def check(base: dict) -> None:
    """No checkpointing: the token ids and the losses of steps 1 and 2 (after one AdamW update), in
    ``--precision`` (fp32 unless given) and with ``--lora`` if given. TRL's SFT runs without packing (padded
    rows), alignkit's with its default padding-free batches, which must give the same losses."""
    base = dict(base, steps=2, return_ids=True)
    for kind in ("sft", "dpo"):
        t, k = spawn("trl", dict(base, kind=kind)), spawn("alignkit", dict(base, kind=kind, packing=kind == "sft"))
        diffs = [abs(x - y) for x, y in zip(t["losses"], k["losses"])]
        print(f"{kind}: the same token ids: {t['ids'] == k['ids']} ({t['tokens']} tokens); TRL losses {t['losses']}, "
              f"alignkit losses {k['losses']}, |diff| {[f'{d:.2e}' for d in diffs]}")


if __name__ == "__main__":
    main()
