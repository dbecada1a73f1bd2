#!/usr/bin/env python
"""Reasoning distillation with thinking-mode fusion on the default model, then the eval's thinking suite.

1. A program writes two- and three-step arithmetic word problems and their worked solutions (the steps as the
   reasoning, "The answer is N." as the answer). It stands in as the teacher (``teacher=this_file.py:teacher``)
   and, like a real teacher, is sometimes wrong, drifts into another language or thinks far too long (``--noise``
   of its traces each), so that the verifier and DeepSeek-R1's rules have something to drop. A third of the
   training prompts are two-turn conversations whose first turn may carry a flag and is answered in that mode, so
   the model sees that a flag stands until the next one.
2. ``alignkit distill`` into SmolLM2-135M-Instruct (full fine-tuning, bf16 autocast): correctness against the
   row's answer, the mixed-language and over-long rules, ``no_think_fraction`` of the rows as no-think with
   ``/no_think``, ``flag_fraction`` of the think rows with ``/think``.
3. ``alignkit eval suites=thinking`` on held-out problems (other seeds, so other numbers and stories): mode
   following over multi-turn conversations, accuracy against the thinking budget with the hard stop, thinking on
   against off, the share of samples within the budget.

    OMP_NUM_THREADS=2 python scripts/reasoning_demo.py --out outputs/reasoning_demo
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

NAMES = ("Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jo")
THINGS = ("apples", "marbles", "stickers", "pens", "cards", "shells", "coins", "books")
ADD = ("{n} finds {x} more {t}.", "{n} gets {x} more {t} from a friend.", "{n} buys {x} more {t}.")
SUB = ("{n} gives {x} {t} away.", "{n} loses {x} {t}.", "{n} uses {x} of the {t}.")
MUL = ("{n} then has {x} times as many {t}.", "The number of {t} {n} has grows {x} times.")


def problem(rng: random.Random) -> dict:
    """A word problem of two or three steps on small numbers: ``prompt`` (a user turn), ``answer``, ``steps``."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    value = rng.randint(2, 20)
    story, steps = [f"{name} has {value} {thing}."], []
    for _ in range(rng.choice((2, 3))):
        op = rng.choice("+-*") if value <= 20 else rng.choice("+-")
        if op == "+":
            x = rng.randint(2, 15)
            story.append(rng.choice(ADD).format(n=name, x=x, t=thing))
            steps.append(f"{value} + {x} = {value + x}.")
            value += x
        elif op == "-" and value > 2:
            x = rng.randint(1, value - 1)
            story.append(rng.choice(SUB).format(n=name, x=x, t=thing))
            steps.append(f"{value} - {x} = {value - x}.")
            value -= x
        else:
            x = rng.choice((2, 3))
            story.append(rng.choice(MUL).format(n=name, x=x, t=thing))
            steps.append(f"{value} * {x} = {value * x}.")
            value *= x
    story.append(f"How many {thing} does {name} have now?")
    return {"prompt": [{"role": "user", "content": " ".join(story)}], "answer": str(value), "steps": steps}


def teacher(row: dict):
    """The worked solution of a row's problem: its steps as the reasoning. A share ``row["noise"]`` of the traces
    is spoilt on purpose (seeded by the problem): a slip in the last step, a sentence in Chinese, or the steps
    checked again and again."""
    reasoning, answer = "\n".join(row["steps"]), f"The answer is {row['answer']}."
    rng = random.Random(row["prompt"][-1]["content"])
    u, noise = rng.random(), row.get("noise", 0.0)
    if u < noise:
        answer = f"The answer is {int(row['answer']) + rng.choice((-2, -1, 1, 2))}."
    elif u < 2 * noise:
        reasoning += "\n所以答案是" + row["answer"] + "。"
    elif u < 3 * noise:
        reasoning += "\nLet me check every step again." * 60
    return reasoning, answer


def with_history(rng: random.Random, row: dict, first: dict) -> dict:
    """``row`` as the second turn of a conversation whose first turn is ``first``, with a flag or none, answered in
    the mode it asks for (thinking when it asks nothing)."""
    flag = rng.choice((None, "/think", "/no_think"))
    user = first["prompt"][0]["content"] + (f" {flag}" if flag else "")
    reasoning = "" if flag == "/no_think" else "\n".join(first["steps"])
    turn = [{"role": "user", "content": user},
            {"role": "assistant", "content": f"The answer is {first['answer']}.", "reasoning_content": reasoning}]
    return {**row, "prompt": turn + row["prompt"]}


def write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def alignkit(*args: str) -> None:
    cmd = [sys.executable, "-m", "alignkit.cli", *args]
    print("$ alignkit " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/reasoning_demo")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--train", type=int, default=600, help="training problems")
    ap.add_argument("--heldout", type=int, default=100, help="held-out problems")
    ap.add_argument("--noise", type=float, default=0.04, help="share of traces the teacher spoils in each way")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--budgets", default="12,16,24,32,48")
    ap.add_argument("--conversations", type=int, default=100)
    ap.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all weights")
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.time()
    rng = random.Random(0)
    train = [{**problem(rng), "noise": args.noise} for _ in range(args.train)]
    train = [with_history(rng, r, problem(rng)) if i % 3 == 0 else r for i, r in enumerate(train)]
    seen = {r["prompt"][-1]["content"] for r in train}
    held_rng = random.Random(12345)
    held = []
    while len(held) < args.heldout:
        p = problem(held_rng)
        if p["prompt"][-1]["content"] not in seen:
            held.append({"prompt": p["prompt"], "answer": p["answer"]})
    data, heldout = write(out / "train_prompts.jsonl", train), write(out / "heldout.jsonl", held)

    run = out / "distill"
    alignkit("distill", f"model={args.model}", f"teacher={Path(__file__).resolve()}:teacher", f"data={data}",
             f"output_dir={run}", "rewards=correctness", "thinking_limit=96", "min_language=0.99",
             "no_think_fraction=0.3", "flag_fraction=0.5", f"epochs={args.epochs}", f"lr={args.lr}",
             "batch_size=16", "warmup_steps=5", "precision=bf16", "max_length=320", "progress=false",
             *(["lora=true", "lora_r=32", "lora_alpha=64"] if args.lora else []), "resume=true")
    t1 = time.time()
    done = json.loads((run / "iter_1" / "done.json").read_text())
    print("distill:", json.dumps({k: v for k, v in done.items() if k.startswith(("traces", "kept", "dropped", "rows"))}))

    ev = out / "eval"
    alignkit("eval", f"model={run / 'iter_1' / 'final'}", "reference=", "suites=thinking", f"output_dir={ev}",
             f"thinking_data={heldout}", f"thinking_limit={args.heldout}", f"thinking_budgets={args.budgets}",
             "thinking_answer_tokens=24", f"thinkfollow_conversations={args.conversations}", "thinkfollow_turns=3",
             "precision=bf16", "batch_size=64", "bootstrap=2000")
    t2 = time.time()
    th = json.loads((ev / "summary.json").read_text())["thinking"]["model"]
    f, b = th["following"], th["budget"]
    print(f"mode following {f['accuracy']:.3f} {f['ci']} (n={f['n']}); after /think "
          f"{f['by_mode']['think']['accuracy']:.3f} (n={f['by_mode']['think']['n']}), after /no_think "
          f"{f['by_mode']['no_think']['accuracy']:.3f} (n={f['by_mode']['no_think']['n']})")
    for p in b["curve"]:
        print(f"budget {p['budget']:>4}: accuracy {p['accuracy']:.3f} {p['ci']}, within budget {p['within_budget']:.3f}, "
              f"mean thinking tokens {p['thinking_tokens']:.1f}, stopped by the budget {p['cut']:.2f}")
    print(f"thinking on (budget {b['on']['budget']}) {b['on']['accuracy']:.3f} vs off {b['off']['accuracy']:.3f}: "
          f"{b['on_minus_off']:+.3f} {b['on_minus_off_ci']} (paired bootstrap); within budget {b['within_budget']:.3f} "
          f"of {b['samples']} samples")
    print(f"times: distill {t1 - t0:.0f} s, eval {t2 - t1:.0f} s, total {t2 - t0:.0f} s; report {ev / 'report.html'}")


if __name__ == "__main__":
    main()
