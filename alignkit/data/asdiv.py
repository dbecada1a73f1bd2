"""The ASDiv preference set used by the main job (``alignkit data fetch asdiv-prefs``).

Problems come from the ASDiv data set (``alignkit data fetch asdiv``). For each problem the default model
(SmolLM2-135M-Instruct) was sampled 4 times (bf16, temperature 0.8, at most 48 new tokens) by
``scripts/sample_asdiv.py``; the samples ship in ``builtin/asdiv_samples.jsonl``. Each sample is judged by a
rule: its last number equals the reference answer. A pair takes a correct sample as chosen (the first one) or,
when no sample is correct, the reference answer written as ``"The answer is N."``; the rejected response is
the first wrong sample. Problems whose samples are all correct give no pair.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from alignkit.data.answers import is_correct, parse_number

PROMPT_SUFFIX = "\nGive the final answer as a number at the end."
SAMPLES = Path(__file__).parent / "builtin" / "asdiv_samples.jsonl"
N_EVAL = 200  # the last N_EVAL sampled problems are held out


def problem_ids(rows: dict[int, dict], seed: int = 0) -> list[int]:
    """ASDiv ids with one numeric answer, in a fixed shuffled order (the order problems were sampled in)."""
    ids = [i for i, r in sorted(rows.items()) if r.get("answer") and parse_number(r["answer"]) is not None]
    random.Random(seed).shuffle(ids)
    return ids


def user_message(problem: dict) -> list[dict]:
    return [{"role": "user", "content": problem["prompt"] + PROMPT_SUFFIX}]


def build_pairs(rows: dict[int, dict], samples: list[dict]) -> list[dict]:
    """Preference rows (conversational ``prompt``/``chosen``/``rejected`` plus ``id``, ``answer``, ``split``)."""
    out = []
    for k, s in enumerate(samples):
        problem = rows[s["id"]]
        good = [t for t in s["samples"] if t and is_correct(t, problem["answer"])]
        bad = [t for t in s["samples"] if t and not is_correct(t, problem["answer"])]
        if not bad:
            continue
        chosen = good[0] if good else f"The answer is {problem['answer']}."
        out.append({
            "prompt": user_message(problem),
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": bad[0]}],
            "id": problem["id"], "answer": problem["answer"],
            "chosen_source": "sample" if good else "reference",
            "split": "test" if k >= len(samples) - N_EVAL else "train",
        })
    return out


def load_samples(path: Path = SAMPLES) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
