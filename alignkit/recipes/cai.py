"""``alignkit cai``: Constitutional AI's data stages (:mod:`alignkit.feedback.cai`, docs/ai_feedback.md).

``stage=critique`` (SL-CAI) writes ``trace.jsonl`` (one record per prompt: response, critiques, revisions,
principle ids), ``sft.jsonl`` (prompt -> final revision, alignkit's ``messages`` SFT format) and
``sft_card.md``. ``stage=label`` (RL-CAI / RLAIF) writes ``label_trace.jsonl`` (every pair, dropped ones too),
``preferences.jsonl`` (alignkit's preference format with ``soft_label`` and provenance) and
``preferences_card.md``. The constitution and the prompts are checked before any model loads; a rerun with the
same output_dir and settings resumes from the trace.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from pathlib import Path

import yaml

from alignkit.config import CAIConfig, to_dict
from alignkit.data.formats import load_examples
from alignkit.errors import ConfigError
from alignkit.feedback import alignment
from alignkit.feedback.cai import JsonlLog, critique_revise, label_pairs, preference_rows, sft_rows
from alignkit.feedback.constitution import Constitution, load_constitution
from alignkit.feedback.lm import ChatLM, EndpointChatLM, LocalChatLM
from alignkit.recipes.common import log_data, setup_logging
from alignkit.rl.rollout import SamplingParams

log = logging.getLogger("alignkit")

FILES = {
    "critique": ("trace.jsonl", "sft.jsonl", "sft_card.md", "critique_config.yaml"),
    "label": ("label_trace.jsonl", "preferences.jsonl", "preferences_card.md", "label_config.yaml"),
}
RESUMABLE_CHANGES = {"limit", "batch_size", "overwrite", "output_dir", "alignment_set", "alignment_principles",
                     "alignment_limit", "min_alignment", "force"}  # settings that do not change a record


def load_prompts(cfg: CAIConfig) -> list[tuple[str, object]]:
    """``(id, prompt)`` pairs: the row's ``id`` column when present, else ``row-N``; ids must be unique."""
    loaded = load_examples(cfg.data, "prompt")
    log_data(loaded)
    seen: set[str] = set()
    items = []
    for ex in loaded.examples:
        pid = ex.extra.get("id")
        pid = f"row-{ex.origin.row}" if pid is None else str(pid)
        if pid in seen:
            raise ex.origin.error(f"id {pid!r} appears twice; prompt ids must be unique (they key the resume)", "id")
        seen.add(pid)
        items.append((pid, ex.prompt))
    return items[: cfg.limit] if cfg.limit else items


def open_output(cfg: CAIConfig) -> dict[str, Path]:
    """This stage's paths; refuses to resume a trace made with other settings (unless ``overwrite``)."""
    out = Path(cfg.output_dir)
    trace, data, card, settings = (out / f for f in FILES[cfg.stage])
    mine = {k: v for k, v in to_dict(cfg).items() if k not in RESUMABLE_CHANGES}
    if cfg.overwrite:
        for f in (trace, data, card, settings):
            f.unlink(missing_ok=True)
    elif settings.exists():
        before = yaml.safe_load(settings.read_text()) or {}
        changed = sorted(k for k in set(mine) | set(before) if mine.get(k) != before.get(k))
        if changed:
            raise ConfigError(f"{out}: its {cfg.stage} trace was made with other settings ({', '.join(changed)}); "
                              "rerun with the same ones to resume, or use overwrite=true or another output_dir")
    elif trace.exists():
        raise ConfigError(f"{trace} exists without {settings.name}: use overwrite=true or another output_dir")
    out.mkdir(parents=True, exist_ok=True)
    settings.write_text(yaml.safe_dump(mine, sort_keys=False))
    return {"trace": trace, "data": data, "card": card}


def build_lm(spec: str, endpoint_model: str, cfg: CAIConfig) -> ChatLM:
    if spec.startswith(("http://", "https://")):
        return EndpointChatLM(spec, endpoint_model, samples=cfg.judge_samples)
    from alignkit.models.loading import load_model

    model, tok = load_model(spec, seed=cfg.seed)
    model.eval()
    return LocalChatLM(model, tok, name=spec, precision=cfg.precision, batch_size=cfg.batch_size)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def _progress(cfg: CAIConfig, total: int, done: int):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=done, desc=f"cai {cfg.stage}", unit="prompt", dynamic_ncols=True)
    return bar, bar.update


ALIGNMENT_KEYS = ("alignment_set", "alignment_principles", "alignment_limit", "principles_per_pair", "chain_of_thought",
                  "judge", "judge_model", "constitution", "seed", "max_new_tokens", "temperature", "top_p")
"""The settings a labeler-alignment report depends on: a report made with the same ones is reused."""


def labeler_alignment(cfg: CAIConfig, constitution: Constitution, judge: ChatLM, sampling: SamplingParams) -> dict:
    """Measure (or reuse the report in output_dir made with the same settings) the judge's alignment with
    ``cfg.alignment_set``, write ``labeler_alignment.json`` and say whether it passes ``min_alignment``."""
    path = Path(cfg.output_dir) / alignment.REPORT_FILE
    settings = {k: getattr(cfg, k) for k in ALIGNMENT_KEYS}
    old = json.loads(path.read_text()) if path.is_file() and not cfg.overwrite else {}
    if old.get("settings") == settings:
        result = old["result"]
        log.info("labeler alignment: reusing %s", path)
    else:
        pairs, how = alignment.labelled_pairs(cfg.alignment_set, limit=cfg.alignment_limit)
        log.info("labeler alignment: %d labelled pairs (%s)", len(pairs), how)
        result = alignment.measure(judge, pairs, constitution, principles=cfg.alignment_principles.split(",")
                                   if cfg.alignment_principles else None, k=cfg.principles_per_pair, seed=cfg.seed,
                                   chain_of_thought=cfg.chain_of_thought, sampling=sampling)
        result["labels"] = how
    mode = alignment.gate_mode(cfg.principles_per_pair)
    accuracy = result[mode]["accuracy"]
    report = {"set": cfg.alignment_set, "mode": mode, "accuracy": accuracy, "min_alignment": cfg.min_alignment,
              "passed": accuracy is not None and accuracy >= cfg.min_alignment, "forced": cfg.force,
              "settings": settings, "result": result}
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    log.info("labeler alignment on %s (%s): %s", cfg.alignment_set, mode,
             ", ".join(f"{m} {result[m]['accuracy']}" for m in alignment.MODES))
    return report


def run(cfg: CAIConfig, *, policy: ChatLM | None = None, judge: ChatLM | None = None) -> dict:
    """Run one stage. ``policy``/``judge``: language models to use instead of loading ``cfg.model``/``cfg.judge``
    (tests pass scripted fakes here)."""
    setup_logging()
    constitution = load_constitution(cfg.constitution)  # both checked before any model loads
    sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                              stop=cfg.stop_strings)
    if cfg.stage == "align":
        if judge is None:
            judge = policy or build_lm(cfg.judge.removeprefix("llm:") or cfg.model, cfg.judge_model or cfg.model_name, cfg)
        return {"stage": "align", **labeler_alignment(cfg, constitution, judge, sampling)}
    prompts = load_prompts(cfg)
    paths = open_output(cfg)
    policy = policy or build_lm(cfg.model, cfg.model_name, cfg)
    gate = None
    if cfg.stage == "label":
        if judge is None:
            judge = policy if not cfg.judge else build_lm(cfg.judge.removeprefix("llm:"), cfg.judge_model, cfg)
        if cfg.alignment_set:
            gate = labeler_alignment(cfg, constitution, judge, sampling)
            if not gate["passed"]:
                if not cfg.force:
                    raise ConfigError(f"the judge's labeler alignment on {cfg.alignment_set} is {gate['accuracy']} "
                                      f"({gate['mode']}), below min_alignment={cfg.min_alignment}: no labels written "
                                      "(use a better judge, or force=true to label anyway)")
                log.warning("labeler alignment %s is below min_alignment=%s: labelling anyway (force=true)",
                            gate["accuracy"], cfg.min_alignment)
    trace = JsonlLog(paths["trace"])
    bar, tick = _progress(cfg, len(prompts), 0)
    started = time.time()
    try:
        if cfg.stage == "critique":
            stats = critique_revise(policy, prompts, constitution, trace, rounds=cfg.rounds, sampling=sampling,
                                    seed=cfg.seed, few_shot=cfg.few_shot, batch_size=cfg.batch_size, on_batch=tick)
        else:
            stats = label_pairs(policy, judge, prompts, constitution, trace, sampling=sampling, seed=cfg.seed,
                                principles_per_pair=cfg.principles_per_pair, chain_of_thought=cfg.chain_of_thought,
                                tie_margin=cfg.tie_margin, batch_size=cfg.batch_size, on_batch=tick)
    finally:
        bar.close()
    wanted = {pid for pid, _ in prompts}
    records = [r for r in trace.recover() if r["id"] in wanted]
    if cfg.stage == "critique":
        rows = sft_rows(records)
        counts = {"prompts": len(prompts), "records": len(records), "resumed": stats.resumed,
                  "written_now": stats.written, "revised": sum(bool(r.get("revised")) for r in records),
                  "sft_rows": len(rows), "principle_draws": dict(Counter(rd["principle"] for r in records for rd in r["rounds"]))}
        kind = "sft"
    else:
        rows = preference_rows(records)
        status = Counter(r["status"] for r in records)
        counts = {"prompts": len(prompts), "records": len(records), "resumed": stats.resumed,
                  "written_now": stats.written, "pairs": len(rows), "ties": status["tie"],
                  "parse_failures": status["unparsed"], "identical": status["identical"],
                  "questions_now": stats.questions, "unreadable_questions_now": stats.parse_failures,
                  "orders_agreed": sum(all(r["agreed"]) for r in rows),
                  "mean_soft_label": sum(r["soft_label"] for r in rows) / len(rows) if rows else None}
        if gate is not None:
            counts["labeler_alignment"] = f"{gate['accuracy']} ({gate['mode']} on {gate['set']}; passed: {gate['passed']})"
        kind = "preference"
    write_jsonl(paths["data"], rows)
    if rows:
        load_examples(str(paths["data"]), kind)  # what we wrote is what `alignkit sft`/`rm`/`dpo` will read
    paths["card"].write_text(data_card(cfg, constitution, counts, policy, judge, paths, time.time() - started))
    log.info("cai %s: %s", cfg.stage, json.dumps(counts))
    return {"stage": cfg.stage, **counts, "files": {k: str(v) for k, v in paths.items()}}


def data_card(cfg: CAIConfig, constitution: Constitution, counts: dict, policy, judge, paths, seconds: float) -> str:
    settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in ("overwrite",)}
    made = ("For each prompt the model answered, then in each of `rounds` rounds a principle was drawn uniformly at "
            "random, the model critiqued its latest answer by the principle's critique request and revised it by its "
            "revision request. The SFT set pairs each prompt with its final revision (records with no non-empty "
            "revision are left out).") if cfg.stage == "critique" else (
            "For each prompt the policy sampled two answers. For each drawn principle the judge was asked the "
            "principle's comparison question with each answer as option (A) in turn; the label is the mean over "
            "principles of (P_ab(A) + 1 - P_ba(A)) / 2, P(A) being the normalised probability of (A) against (B). "
            "The chosen answer is the one with label > 1/2 and `soft_label` is its probability. Identical answers, "
            "ties and unreadable pairs are dropped and counted below.")
    lines = [
        f"# CAI {cfg.stage} data ({'SL-CAI' if cfg.stage == 'critique' else 'RL-CAI labels'})", "",
        f"Made by `alignkit cai stage={cfg.stage}` on {time.strftime('%Y-%m-%d %H:%M')} in {seconds:.1f} s (this run).", "",
        "## How it was made", "", made, "",
        f"- model: `{getattr(policy, 'name', cfg.model)}`",
        *([f"- judge: `{getattr(judge, 'name', cfg.judge)}`"] if cfg.stage == "label" else []),
        f"- constitution: `{constitution.name}` ({constitution.path}), principles: {', '.join(constitution.ids)}; "
        f"{len(constitution.few_shot)} few-shot examples",
        f"- prompts: `{cfg.data}`", "",
        "## Counts", "", *(f"- {k}: {v}" for k, v in counts.items()), "",
        "## Files", "", *(f"- `{p.name}`" for p in paths.values()), "",
        "## Settings", "", "```yaml", yaml.safe_dump(settings, sort_keys=False).rstrip(), "```", "",
    ]
    return "\n".join(lines)
