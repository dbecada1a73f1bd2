"""Reasoning distillation with thinking-mode fusion: ``alignkit distill teacher=... data=prompts.jsonl``.

1. The teacher (:mod:`alignkit.feedback.teachers`: a model, an OpenAI-compatible endpoint, or a program) writes
   ``num_generations`` traces, ``(reasoning, answer)``, for every training prompt, a chunk of ``rollout_batch``
   prompts at a time; each trace is scored by the verifier (``rewards``, e.g. ``correctness`` against the row's
   ``answer``; the whole ``<think>`` text is the completion, with the supplied columns ``reasoning``,
   ``answer_text``, ``thinking_tokens``, ``answer_tokens`` and ``lengths``) and its reasoning's tokens are counted
   in the student's tokenizer;
2. the traces that pass the verifier and DeepSeek-R1's rules (mixed languages, over-long thinking) are kept
   (:mod:`alignkit.rl.distill`); the counts kept and dropped per rule are logged and recorded;
3. the kept traces become SFT rows with ``reasoning_content``, ``no_think_fraction`` of them as no-think rows and
   ``/think`` flags on ``flag_fraction`` of the others (:func:`alignkit.rl.distill.fusion_rows`);
4. the SFT recipe trains the student (``model``) on them (every SFT key of this config applies, ``thinking_loss``
   and ``lora`` included).

Files in ``output_dir/iter_1``: ``traces.jsonl`` (every trace with its reward, token counts and, once filtered, the
rules it failed), ``kept.jsonl``, ``train.jsonl``, the SFT run's files and ``done.json``; ``summary.json`` as for
``alignkit rejection``. With ``resume=true`` the traces already written are reused (the teacher is asked only for
the prompts it had not answered) and the SFT run resumes from its last checkpoint. Held-out prompts
(``eval_data``, ``eval_fraction``) are answered greedily by the student before and after, under ``thinking`` and
``max_thinking_tokens``, and scored by the rewards.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path

from alignkit.config import DistillConfig, SFTConfig
from alignkit.data.thinking import join_thinking
from alignkit.feedback.teachers import build_teacher
from alignkit.models.loading import load_tokenizer
from alignkit.recipes import sft
from alignkit.recipes.common import split_eval
from alignkit.recipes.sampled import iterate, start, sub_config
from alignkit.rl.distill import fusion_rows, keep, mix_counts
from alignkit.rl.trainer import rollout_seed, sampling_params
from alignkit.train.iterations import prepare_iterations, write_jsonl

log = logging.getLogger("alignkit")


def run(cfg: DistillConfig) -> dict:
    rewards, examples = start(cfg, scored=False)
    train_ex, held_ex = split_eval(cfg, examples, "prompt")
    out = prepare_iterations(cfg)
    return iterate(cfg, out, "distill", lambda k, it, current: _distill(cfg, it, train_ex, rewards), held_ex, rewards)


def _distill(cfg: DistillConfig, it: Path, train_ex, rewards) -> dict:
    tok = load_tokenizer(cfg.model)
    traces = collect(cfg, it / "traces.jsonl", train_ex, rewards, tok)
    kept, counts = keep(traces, verified=rewards is not None, threshold=cfg.threshold, language=cfg.language,
                        min_language=cfg.min_language, thinking_limit=cfg.thinking_limit)
    write_jsonl(it / "traces.jsonl", traces)  # now with the rules each failed
    write_jsonl(it / "kept.jsonl", kept)
    rows = fusion_rows(kept, train_ex, cfg.no_think_fraction, cfg.flag_fraction, cfg.seed)
    write_jsonl(it / "train.jsonl", rows)
    record = {"iteration": 1, "teacher": cfg.teacher, "prompts": len(train_ex), **counts, **mix_counts(rows),
              "prompts_kept": len({t["prompt_index"] for t in kept})}
    log.info("distill: %d traces of %d prompts, kept %d, dropped %d (%s); %d rows: %d no-think, %d think with "
             "/think, %d think without a flag", counts["traces"], len(train_ex), counts["kept"], counts["dropped"],
             ", ".join(f"{k.split('/')[1]} {v}" for k, v in counts.items() if k.startswith("dropped/")),
             len(rows), record["rows/no_think"], record["rows/think_flagged"], record["rows/think_default"])
    if rows:
        sub = sub_config(SFTConfig, cfg, data=str(it / "train.jsonl"), output_dir=str(it), eval_data="",
                         eval_fraction=0.0, resume=True, overwrite=False)
        record["train"] = sft.run(sub)
        record["model"] = str(it / "final")
    else:
        log.warning("distill kept no trace: nothing to fine-tune on, the model stays %s", cfg.model)
        record["model"] = cfg.model
    return record


def collect(cfg: DistillConfig, path: Path, examples, rewards, tok) -> list[dict]:
    """Every trace of every prompt, scored: those in ``path`` from an interrupted run, then the teacher's for the
    prompts without them, a chunk at a time, each chunk appended to ``path`` as it is done."""
    done = _read_traces(path, cfg.num_generations)
    have = {t["prompt_index"] for t in done}
    todo = [i for i in range(len(examples)) if i not in have]
    if not todo:
        return done
    write_jsonl(path, done)  # without a torn line, so that appends start on a line of their own
    teacher = build_teacher(cfg, dataclasses.replace(sampling_params(cfg), thinking=True))
    try:
        for a in range(0, len(todo), cfg.rollout_batch):
            chunk = todo[a:a + cfg.rollout_batch]
            rows = [{"prompt": examples[i].prompt, **examples[i].extra} for i in chunk]
            out = teacher.traces(rows, cfg.num_generations, [rollout_seed(cfg.seed, 1, 0, i) for i in chunk])
            new = [{"prompt_index": i, "sample": j, "reasoning": r, "answer": ans}
                   for i, group in zip(chunk, out) for j, (r, ans) in enumerate(group)]
            score(new, examples, rewards, tok)
            with path.open("a") as f:  # one write a chunk: an interruption leaves whole chunks (and a torn line)
                f.write("".join(json.dumps(t) + "\n" for t in new))
            done += new
            log.info("distill: the teacher answered %d of %d prompts", len(have) + a + len(chunk), len(examples))
    finally:
        teacher.close()
    return sorted(done, key=lambda t: (t["prompt_index"], t["sample"]))


def _read_traces(path: Path, n: int) -> list[dict]:
    """The traces of the prompts ``path`` holds all ``n`` of (a torn last line loses its prompt, asked again)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            break
    whole = {i for i, c in Counter(t["prompt_index"] for t in out).items() if c == n}
    return [t for t in out if t["prompt_index"] in whole]


def score(traces: list[dict], examples, rewards, tok) -> None:
    """In place: each trace's ``thinking_tokens``, ``answer_tokens`` (the student's tokenizer) and ``reward`` (the
    verifier's total, None without one or when no reward function gave a value) with ``rewards_per_function``."""
    count = lambda s: len(tok(s, add_special_tokens=False)["input_ids"]) if s else 0  # noqa: E731
    for t in traces:
        t["thinking_tokens"], t["answer_tokens"] = count(t["reasoning"]), count(t["answer"])
        t["reward"] = None
    if rewards is None or not traces:
        return
    exs = [examples[t["prompt_index"]] for t in traces]
    texts = [join_thinking(t["reasoning"], t["answer"]) for t in traces]
    columns = {k: [ex.extra.get(k) for ex in exs] for k in sorted({k for ex in exs for k in ex.extra})}
    columns.update(lengths=[count(x) for x in texts], thinking_tokens=[t["thinking_tokens"] for t in traces],
                   answer_tokens=[t["answer_tokens"] for t in traces], reasoning=[t["reasoning"] for t in traces],
                   answer_text=[t["answer"] for t in traces])
    scores = rewards([ex.prompt for ex in exs], texts, columns)
    for k, t in enumerate(traces):
        t["reward"] = scores.total[k]
        t["rewards_per_function"] = {name: v[k] for name, v in scores.per_function.items()}
