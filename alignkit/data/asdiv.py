"""The ASDiv preference set used by the main job (``alignkit data fetch asdiv-prefs``).

Problems come from the ASDiv data set (``alignkit data fetch asdiv``). For each problem the default model
(SmolLM2-135M-Instruct) was sampled 4 times (bf16, temperature 0.8, at most 48 new tokens) by
``scripts/sample_asdiv.py``; the samples ship in ``builtin/asdiv_samples.jsonl``. Each sample is judged by a
rule: its last number equals the reference answer. A pair takes a correct sample as chosen (the first one) or,
when no sample is correct, the reference answer written as ``"The answer is N."``; the rejected response is
the shortest wrong sample (so that chosen and rejected differ in correctness more than in length; most
samples run to the 48-token limit). Problems whose samples are all correct give no pair.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from alignkit.data.answers import is_correct, parse_number

PROMPT_SUFFIX = "\nGive the final answer as a number at the end."
SAMPLES = Path(__file__).parent / "builtin" / "asdiv_samples.jsonl"
N_EVAL = 150  # the last N_EVAL sampled problems are held out


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
        bad.sort(key=len)
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



def solved_ids(rows: dict[int, dict], samples: list[dict]) -> list[int]:
    """The ids of the sampled problems of which at least one shipped sample is correct, in the samples' order: a
    curriculum's "drop the prompts never solved", measured beforehand (about 3% of the default model's samples are
    correct, so most groups sampled on an arbitrary problem are all wrong and give no gradient)."""
    return [s["id"] for s in samples if any(t and is_correct(t, rows[s["id"]]["answer"]) for t in s["samples"])]

def fetch_prefs(force: bool = False) -> Path:
    """Build ``cache_dir()/data/asdiv-prefs/{train,test}.jsonl`` with a data card; cached unless ``force``."""
    import os
    import shutil

    from alignkit.data.sources import fetch
    from alignkit.paths import cache_dir

    out = cache_dir() / "data" / "asdiv-prefs"
    samples = load_samples()
    if not force and (out / "card.json").is_file() and json.loads((out / "card.json").read_text())["samples"] == len(samples):
        return out
    src = fetch("asdiv")
    asdiv_card = json.loads((src / "card.json").read_text())
    rows = {r["id"]: r for r in map(json.loads, (src / "data.jsonl").read_text().splitlines())}
    pairs = build_pairs(rows, samples)
    tmp = out.with_name(f".asdiv-prefs.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = {}
    for split in ("train", "test"):
        part = [p for p in pairs if p["split"] == split]
        counts[split] = len(part)
        with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in part)
    n_ref = sum(p["chosen_source"] == "reference" for p in pairs)
    card = {
        "name": "asdiv-prefs",
        "source": f"ASDiv from {asdiv_card['package']} {asdiv_card['version']} (alignkit data fetch asdiv); "
                  f"responses sampled from SmolLM2-135M-Instruct ({SAMPLES.name}, shipped with alignkit)",
        "data_license": asdiv_card["data_license"],
        "samples": len(samples),
        "rows": counts,
        "chosen_from_reference": n_ref,
        "conversion": __doc__.strip(),
    }
    (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (tmp / "README.md").write_text(
        "# asdiv-prefs\n\n" + card["conversion"] + "\n\n"
        f"- Source: {card['source']}\n- License of the problems: {card['data_license']}\n"
        f"- Problems sampled: {len(samples)}; pairs: {counts['train']} train, {counts['test']} test "
        f"(the last {N_EVAL} sampled problems are the test split)\n"
        f"- Pairs whose chosen response is the reference answer (no correct sample): {n_ref}\n"
    )
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def heldout_problems() -> list[dict]:
    """The 150 held-out problems of the main jobs (the last sampled ones): ``prompt`` (a user message asking for
    a final number), ``answer`` and ``id``."""
    from alignkit.data.sources import fetch

    rows = {r["id"]: r for r in map(json.loads, (fetch("asdiv") / "data.jsonl").read_text().splitlines())}
    held = sorted(s["id"] for s in load_samples()[-N_EVAL:])
    return [{"prompt": user_message(rows[i]), "answer": rows[i]["answer"], "id": i} for i in held]
