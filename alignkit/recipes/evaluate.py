"""``alignkit eval``: did the aligned model get better, and what did it break?

The model and its reference answer the same prompts (greedy unless a probe samples), through the rollout engine.
Every prompt is a user turn rendered with the chat template. Suites:

- ``capability``: accuracy on held-out math (ASDiv, the MATH-500 subset) with the verifiable checker, pass@1 on
  code (HumanEval: the greedy answer's code run against the tests in the sandbox, :mod:`alignkit.rl.code_reward`),
  and strict IFBench instruction following where a rule checker exists (:mod:`alignkit.eval.ifbench`), each with
  the paired bootstrap interval of the difference (the alignment tax when it is negative);
- ``winrate``: the judge compares the two answers to each prompt in both orders (position bias cancels); raw and
  length-controlled win rate with a bootstrap interval;
- ``safety``: refusal rate on harmful prompts (Do-Not-Answer, HarmBench, AdvBench) and on benign prompts that
  only look dangerous (over-refusal), with the refusal detector's accuracy on a human-labelled set;
- ``probes``: mode collapse (distinct-2, self-BLEU and entropy of sampled answers), KL to the reference,
  sycophancy (does a correct ASDiv answer flip when the user pushes back?), and reward hacking (a proxy reward
  against length, and against the judge);
- ``pluralistic`` (GDPO): the belief distribution each model states on held-out questions against the group's
  (JS distance, recall, majority mass, next to the uniform, majority-only and sampling-floor reference points),
  and whether the response agrees with the stated belief (:mod:`alignkit.eval.pluralistic`).
- ``thinking`` (reasoning models): ThinkFollow-style mode following over multi-turn conversations with ``/think``
  and ``/no_think`` at random turns, accuracy against the thinking budget with the engine's hard stop, thinking
  on against off (paired bootstrap), and the share of samples within the budget (:mod:`alignkit.eval.thinking`).

Writes ``summary.json``, the plots and ``report.html`` to ``output_dir``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import torch

from alignkit.config import EvalConfig
from alignkit.data.collate import pad
from alignkit.data.tokenize import prompt_ids
from alignkit.models.loading import load_model
from alignkit.models.logprobs import autocast, token_logps
from alignkit.recipes.common import seed_everything, setup_logging
from alignkit.rl.rollout import LocalEngine, SamplingParams
from alignkit.rl.verifiable import correctness_reward

log = logging.getLogger("alignkit")


@dataclass
class Contestant:
    name: str
    model: object
    tok: object
    engine: LocalEngine
    greedy: dict = field(default_factory=dict)  # (prompt ids, token limit) -> greedy completion, shared by suites

    def answer(self, prompts: list, cfg: EvalConfig, *, n: int = 1, temperature: float = 0.0, seed: int = 0,
               max_new_tokens: int | None = None):
        """Completions ``[len(prompts)][n]`` to user-turn prompts (strings or message lists).

        Greedy answers are kept: a prompt that another suite already answered with the same token limit (the
        win rate on the capability set's problems) is not generated again.
        """
        ids = [prompt_ids(self.tok, as_messages(p)) for p in prompts]
        sampling = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens or cfg.max_new_tokens, seed=seed)
        if temperature > 0 or n != 1:
            return self.engine.generate(ids, n, sampling)
        keys = [(tuple(x), sampling.max_new_tokens) for x in ids]
        todo = list({k: None for k in keys if k not in self.greedy})
        for k, done in zip(todo, self.engine.generate([list(k[0]) for k in todo], 1, sampling) if todo else []):
            self.greedy[k] = done
        return [self.greedy[k] for k in keys]


def as_messages(prompt) -> list[dict]:
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]


def first_turn(prompt) -> str:
    return prompt[0]["content"] if isinstance(prompt, list) else str(prompt)


def load_contestant(name: str, label: str, cfg: EvalConfig) -> Contestant:
    model, tok = load_model(name, seed=cfg.seed)
    model.eval()
    return Contestant(label, model, tok, LocalEngine(model, tok, precision=cfg.precision, max_batch=cfg.batch_size))


def read_rows(spec: str, limit: int) -> list[dict]:
    """Prompt rows from a named set or a JSONL file (``prompt`` plus columns such as ``answer``)."""
    from alignkit.data.asdiv import heldout_problems
    from alignkit.data.sources import fetch

    if spec == "asdiv-heldout":
        rows = heldout_problems()
    elif spec == "math500":
        rows = [r for r in map(json.loads, (fetch("mmath") / "data.jsonl").read_text().splitlines())
                if r["subset"] == "MATH500"]
    elif spec in ("mt-bench", "ifbench", "humaneval"):
        rows = [json.loads(line) for line in (fetch(spec) / "data.jsonl").read_text().splitlines()]
    else:
        from alignkit.data.formats import load_examples

        rows = [{"prompt": ex.prompt, **ex.extra} for ex in load_examples(spec, "prompt").examples]
    return rows[:limit] if limit > 0 else rows


# ------------------------------------------------------------------------------------------------- suites


def capability(cfg: EvalConfig, players: list[Contestant], out: dict, samples: list) -> dict:
    from alignkit.eval.metrics import bootstrap_ci, bootstrap_ci_paired

    sets = [("asdiv" if cfg.capability_data == "asdiv-heldout" else Path(cfg.capability_data).stem,
             read_rows(cfg.capability_data, cfg.capability_limit))]
    if cfg.math500_limit > 0 and cfg.capability_data != "math500":
        sets.append(("math500", read_rows("math500", cfg.math500_limit)))
    if cfg.humaneval_limit > 0 and cfg.capability_data != "humaneval":
        sets.append(("humaneval", read_rows("humaneval", cfg.humaneval_limit)))
    result, answers = {}, {}
    for name, rows in sets:
        code = bool(rows) and "tests" in rows[0]
        entry: dict = {"n": len(rows), "metric": "pass@1" if code else "accuracy"}
        scores = {}
        for p in players:
            limit = cfg.code_max_new_tokens if code else None
            texts = [c[0].text for c in p.answer([r["prompt"] for r in rows], cfg, max_new_tokens=limit)]
            answers[(name, p.name)] = texts
            ok = score_answers(rows, texts)
            scores[p.name] = ok
            entry[p.name] = float(np.mean(ok))
            entry[f"{p.name}_ci"] = list(bootstrap_ci(ok, n_boot=cfg.bootstrap, seed=cfg.seed))
        if len(players) == 2:
            # model minus reference on the same problems: the alignment tax when negative
            entry["ci_diff"] = list(bootstrap_ci_paired(scores["reference"], scores["model"], n_boot=cfg.bootstrap,
                                                        seed=cfg.seed))
        result[name] = entry
        if name == "asdiv":
            out["_asdiv"] = (rows, answers)
    if cfg.ifbench_limit > 0:
        result["ifbench"] = instruction_following(cfg, players)
    for (name, who), texts in answers.items():
        if who == "model" and name == sets[0][0]:
            ref = answers.get((name, "reference"), [""] * len(texts))
            samples += [{"prompt": first_turn(r["prompt"]), "model": t, "reference": f, "set": name}
                        for r, t, f in list(zip(sets[0][1], texts, ref))[:4]]
    return result


def score_answers(rows: list[dict], texts: list[str]) -> list[float]:
    """1.0 or 0.0 per answer: its final answer against the row's ``answer`` (math), or, for rows with ``tests``
    (code), the greedy answer's code run against them in the sandbox (pass@1)."""
    if rows and "tests" in rows[0]:
        from alignkit.rl.code_reward import CodeReward

        cols = {k: [r.get(k) for r in rows] for k in ("tests", "entry_point", "code_prefix")}
        return [float(v or 0.0) for v in CodeReward()(None, texts, **cols)]
    return [float(v or 0.0) for v in correctness_reward(None, texts, [r.get("answer") for r in rows])]


def instruction_following(cfg: EvalConfig, players: list[Contestant]) -> dict:
    """Strict IFBench accuracy on a fixed seeded sample of prompts; prompts with an unchecked constraint are
    answered but not counted at the prompt level (``coverage`` says how much was checked)."""
    import random

    from alignkit.eval.ifbench import score
    from alignkit.eval.metrics import bootstrap_ci, bootstrap_ci_paired

    rows = read_rows(cfg.ifbench_data, 0)
    rows = random.Random(cfg.seed).sample(rows, min(cfg.ifbench_limit, len(rows)))
    entry: dict = {}
    counted = {}
    for p in players:
        answers = p.answer([r["prompt"] for r in rows], cfg, max_new_tokens=cfg.ifbench_max_new_tokens)
        s = score(rows, [c[0].text for c in answers])
        counted[p.name] = [x for x in s["per_prompt"] if x is not None]  # the same rows for every player
        entry.update({"n": s["n_prompts"], "n_instructions": s["n_instructions"], "coverage": s["coverage"],
                      "unchecked": s["unchecked"], p.name: s["prompt_accuracy"],
                      f"{p.name}_instruction_accuracy": s["instruction_accuracy"]})
        if counted[p.name]:
            entry[f"{p.name}_ci"] = list(bootstrap_ci(counted[p.name], n_boot=cfg.bootstrap, seed=cfg.seed))
    if len(players) == 2 and entry["n"]:
        entry["ci_diff"] = list(bootstrap_ci_paired(counted["reference"], counted["model"], n_boot=cfg.bootstrap,
                                                    seed=cfg.seed))
    return entry


def winrate(cfg: EvalConfig, players: list[Contestant], out: dict, samples: list) -> dict:
    from alignkit.eval.metrics import bootstrap_ci, combine_swapped, lc_win_rate, position_bias, win_rate
    from alignkit.feedback.judges import judge_both_orders, judge_from_spec

    rows = read_rows(cfg.winrate_data, cfg.winrate_limit)
    prompts = [r["prompt"] for r in rows]
    model_c = [c[0] for c in players[0].answer(prompts, cfg)]
    ref_c = [c[0] for c in players[1].answer(prompts, cfg)]
    a, b = [c.text for c in model_c], [c.text for c in ref_c]
    judge = judge_from_spec(cfg.judge, judge_model=cfg.judge_model or None)
    columns = {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"}  # e.g. `answer` for correctness
    texts = [first_turn(p) for p in prompts]
    v_ab, v_ba = judge_both_orders(judge, texts, a, b, **columns)
    prefs = [combine_swapped(x, y) for x, y in zip(v_ab, v_ba)]
    wr = win_rate(prefs)
    len_diff = [len(x.token_ids) - len(y.token_ids) for x, y in zip(model_c, ref_c)]
    lc = lc_win_rate(prefs, len_diff)
    out["_winrate"] = (texts, a, b, prefs)
    samples += [{"prompt": t, "model": x, "reference": y, "set": "win rate", "preference": p}
                for t, x, y, p in list(zip(texts, a, b, prefs))[:4]]
    return {"judge": cfg.judge, "data": cfg.winrate_data, "n": wr.n, "win_rate": wr.mean, "wins": wr.wins,
            "ties": wr.ties, "losses": wr.losses, "ci": list(bootstrap_ci(prefs, n_boot=cfg.bootstrap, seed=cfg.seed)),
            "lc_win_rate": lc.value, "length_slope": lc.slope, "position_bias": position_bias(v_ab, v_ba),
            "lengths": {"model": [len(c.token_ids) for c in model_c], "reference": [len(c.token_ids) for c in ref_c]}}


def safety(cfg: EvalConfig, players: list[Contestant], out: dict, samples: list) -> dict:
    from alignkit.eval.safety import RefusalDetector, benign_prompts, harmful_prompts, validate_on_labelled

    detector = RefusalDetector()
    if cfg.harmful_data:
        harmful = [(r.get("set", "harmful"), first_turn(r["prompt"])) for r in read_rows(cfg.harmful_data, 0)]
    else:
        harmful = harmful_prompts(cfg.harmful_limit)
    benign = benign_prompts()
    if cfg.benign_limit > 0:
        benign = benign[: cfg.benign_limit]
    labelled = None if cfg.refusal_data == "refusal" else read_labelled(cfg.refusal_data)
    from alignkit.eval.metrics import bootstrap_ci, bootstrap_ci_paired

    result: dict = {"refusal_harmful": {}, "over_refusal": {}, "detector": validate_on_labelled(detector, labelled),
                    "refusal_harmful_ci": {}, "over_refusal_ci": {}}
    refused: dict[str, tuple[list[float], list[float]]] = {}  # player -> (harmful, benign) refusals, 0/1
    ci = lambda xs: list(bootstrap_ci(xs, n_boot=cfg.bootstrap, seed=cfg.seed))  # noqa: E731
    for p in players:
        texts = [c[0].text for c in p.answer([h[1] for h in harmful], cfg)]
        rates: dict[str, list] = {}
        for (set_name, _), t in zip(harmful, texts):
            rates.setdefault(set_name, []).append(float(detector.is_refusal(t)))
        result["refusal_harmful"][p.name] = {k: float(np.mean(v)) for k, v in rates.items()}
        b_texts = [c[0].text for c in p.answer([r["prompt"] for r in benign], cfg)]
        b_refused = [float(detector.is_refusal(t)) for t in b_texts]
        result["over_refusal"][p.name] = float(np.mean(b_refused))
        # 95% bootstrap intervals over prompts: per harmful set, all harmful prompts pooled, the benign set
        pooled = [x for v in rates.values() for x in v]
        result["refusal_harmful_ci"][p.name] = {**{k: ci(v) for k, v in rates.items()}, "all": ci(pooled)}
        result["refusal_harmful_all"] = {**result.get("refusal_harmful_all", {}), p.name: float(np.mean(pooled))}
        result["over_refusal_ci"][p.name] = ci(b_refused)
        refused[p.name] = (pooled, b_refused)
        if p.name == "model":
            samples += [{"prompt": h[1], "model": t, "reference": "", "set": f"harmful ({h[0]})"}
                        for h, t in list(zip(harmful, texts))[:2]]
    if len(players) == 2:  # model minus reference on the same prompts
        for i, key in enumerate(("refusal_harmful_diff_ci", "over_refusal_diff_ci")):
            result[key] = list(bootstrap_ci_paired(refused["reference"][i], refused["model"][i], n_boot=cfg.bootstrap,
                                                   seed=cfg.seed))
    result["n_harmful"], result["n_benign"] = len(harmful), len(benign)
    return result


def read_labelled(path: str) -> list[dict]:
    from alignkit.errors import DataError

    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            r = json.loads(line)
            if "text" not in r or not isinstance(r.get("refusal"), bool):
                raise DataError("expected `text` and a true/false `refusal`", path=path, line=i)
            rows.append(r)
    return rows


@torch.no_grad()
def sequence_logps(c: Contestant, prompt_ids_list: list[list[int]], completions: list[list[int]], precision: str) -> list[float]:
    """Summed log-probs of each completion after its prompt under ``c``'s model (trainer's computation)."""
    out = []
    for i in range(0, len(completions), 16):
        seqs = [(p + r, [False] * len(p) + [True] * len(r))
                for p, r in zip(prompt_ids_list[i : i + 16], completions[i : i + 16])]
        batch = pad(seqs, c.tok.pad_token_id)
        with autocast(precision):
            lp = token_logps(c.model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        out += lp.sum(-1).tolist()
    return out


def probes(cfg: EvalConfig, players: list[Contestant], out: dict, samples: list) -> dict:
    from alignkit.eval.metrics import distinct_n, mean_entropy, pearson, proxy_gold_divergence, self_bleu, spearman
    from alignkit.eval.probes import sycophancy_conversations, sycophancy_flip_rate

    rows = read_rows(cfg.winrate_data, cfg.probe_prompts)
    prompts = [r["prompt"] for r in rows]
    result: dict = {k: {} for k in ("distinct_2", "self_bleu", "entropy", "length")}
    for p in players:
        groups = p.answer(prompts, cfg, n=cfg.samples, temperature=1.0, seed=cfg.seed)
        texts = [c.text for g in groups for c in g]
        result["distinct_2"][p.name] = distinct_n(texts, 2)
        result["self_bleu"][p.name] = float(np.mean([self_bleu([c.text for c in g]) for g in groups]))
        result["entropy"][p.name] = mean_entropy([c.logps for g in groups for c in g])
        result["length"][p.name] = float(np.mean([len(c.token_ids) for g in groups for c in g]))
        if p.name == "model" and len(players) == 2:
            ids = [prompt_ids(p.tok, as_messages(q)) for q in prompts]
            flat_p = [i for i, g in zip(ids, groups) for _ in g]
            flat_c = [c.token_ids for g in groups for c in g]
            lp = sequence_logps(p, flat_p, flat_c, cfg.precision)
            ref = sequence_logps(players[1], flat_p, flat_c, cfg.precision)
            kl = np.array(lp) - np.array(ref)
            result["kl_to_reference"] = {"mean": float(kl.mean()), "se": float(kl.std(ddof=1) / np.sqrt(len(kl)))}
    if "_asdiv" in out:  # sycophancy: push back on the capability answers
        rows_a, answers = out["_asdiv"]
        result["sycophancy"] = {}
        for p in players:
            first = answers[("asdiv", p.name)]
            convs = sycophancy_conversations(rows_a, first)
            second = [c[0].text for c in p.answer(convs, cfg)]
            result["sycophancy"][p.name] = sycophancy_flip_rate(rows_a, first, second)
    if cfg.reward and "_winrate" in out:  # reward hacking: proxy reward against length and against the judge
        from alignkit.rl.rewards import RewardContext, build_reward_set

        texts, a, b, prefs = out["_winrate"]
        proxy = build_reward_set(cfg.reward, "", RewardContext(max_new_tokens=cfg.max_new_tokens))
        ra = [v if v is not None else float("nan") for v in proxy(texts, a, {}).total]
        rb = [v if v is not None else float("nan") for v in proxy(texts, b, {}).total]
        la = [len(x) for x in a]
        result["reward_hacking"] = {
            "proxy": {"model": float(np.nanmean(ra)), "reference": float(np.nanmean(rb))},
            "reward_length_pearson": pearson(ra + rb, la + [len(x) for x in b]),
            "reward_length_spearman": spearman(ra + rb, la + [len(x) for x in b]),
            "proxy_vs_judge": proxy_gold_divergence(float(np.nanmean(rb)), float(np.nanmean(ra)), 0.5,
                                                    float(np.mean(prefs)))._asdict(),
        }
        out["_reward"] = {"model": ra, "reference": rb}
    return result


def pluralistic(cfg: EvalConfig, players: list[Contestant], out: dict, samples: list) -> dict:
    from alignkit.eval import pluralistic as pl

    questions = pl.read_questions(cfg.pluralistic_data, cfg.pluralistic_questions)
    measured = {p.name: pl.measure(p.model, p.tok, p.engine, questions, template=cfg.belief_template,
                                   n=cfg.pluralistic_samples, max_new_tokens=cfg.pluralistic_max_new_tokens,
                                   precision=cfg.precision, batch_size=cfg.batch_size, seed=cfg.seed)
                for p in players}
    ref = measured.get("reference", {}).get("texts")
    for i, q in enumerate(questions[:2]):  # the first free sample of each: does it state a belief at all?
        samples.append({"prompt": first_turn(q.prompt), "model": measured["model"]["texts"][i][0],
                        "reference": ref[i][0] if ref else "", "set": "pluralistic"})
    return {"data": cfg.pluralistic_data or "pluralistic test.jsonl", "template": cfg.belief_template,
            "plot_questions": cfg.pluralistic_plot_questions,
            **pl.summarise(questions, measured, n=cfg.pluralistic_samples, seed=cfg.seed)}


def thinking(cfg: EvalConfig, players: list[Contestant], out: dict, samples: list) -> dict:
    from alignkit.errors import ConfigError
    from alignkit.eval import thinking as th
    from alignkit.rl.thinking import smallest_budget

    for p in players:  # before any generation: a budget too small for the tags is a setting, not a crash
        need = smallest_budget(p.tok, cfg.budget_action)
        if min(cfg.budgets) < need:
            raise ConfigError(f"thinking_budgets: {min(cfg.budgets)} is below the {need} tokens that opening and "
                              f"closing a thinking block take with the {p.name}'s tokenizer ({cfg.budget_action})")
    rows = read_rows(cfg.thinking_data, cfg.thinking_limit)
    prompts = [as_messages(r["prompt"]) for r in rows]
    convs = th.conversations(prompts, cfg.thinkfollow_conversations, cfg.thinkfollow_turns, cfg.seed)
    result: dict = {"data": cfg.thinking_data, "n": len(rows), "budgets": sorted(cfg.budgets),
                    "conversations": len(convs), "max_turns": cfg.thinkfollow_turns}
    for p in players:
        _, last = th.run_conversations(p.engine, p.tok, convs, budget=max(cfg.budgets),
                                               max_new_tokens=max(cfg.budgets) + cfg.thinking_answer_tokens,
                                               budget_action=cfg.budget_action)
        ids = [prompt_ids(p.tok, m) for m in prompts]
        result[p.name] = {"following": th.score_following(convs, last, cfg.bootstrap, cfg.seed),
                          "budget": th.budget_sweep(p.engine, ids, [r.get("answer") for r in rows], cfg.budgets,
                                                    answer_tokens=cfg.thinking_answer_tokens,
                                                    budget_action=cfg.budget_action, n_boot=cfg.bootstrap,
                                                    seed=cfg.seed)}
        if p.name == "model":
            samples += [{"prompt": "\n".join(c), "model": t, "reference": "", "set": "thinking (mode following)"}
                        for c, t in list(zip(convs, last))[:3]]
    return result


SUITES = {"capability": capability, "winrate": winrate, "safety": safety, "probes": probes, "pluralistic": pluralistic,
          "thinking": thinking}


def run(cfg: EvalConfig) -> dict:
    from alignkit.eval.report import write_report

    setup_logging()
    seed_everything(cfg.seed)
    players = [load_contestant(cfg.model, "model", cfg)]
    if cfg.reference:
        players.append(load_contestant(cfg.reference, "reference", cfg))
    summary: dict = {"model": cfg.model, "reference": cfg.reference or None, "created": date.today().isoformat()}
    scratch: dict = {}
    samples: list = []
    for name in ("capability", "winrate", "safety", "probes", "pluralistic", "thinking"):  # probes reuse capability's
        if name in cfg.suite_names:
            log.info("eval: %s", name)
            summary[name if name != "winrate" else "win_rate"] = SUITES[name](cfg, players, scratch, samples)
    if "win_rate" in summary:
        summary["lengths"] = summary["win_rate"].pop("lengths")
    if "_reward" in scratch:
        summary["reward"] = scratch["_reward"]
    out = Path(cfg.output_dir)
    metrics = Path(cfg.run_dir) / "metrics.jsonl" if cfg.run_dir else None
    html = write_report(out, summary, metrics_path=metrics if metrics and metrics.exists() else None, samples=samples,
                        title=f"{cfg.model} against {cfg.reference or 'nothing'}")
    log.info("report: %s", html)
    shown = {k: v for k, v in summary.items() if k not in ("lengths", "reward")}
    if "pluralistic" in shown:  # its per-question records stay in summary.json
        shown["pluralistic"] = {k: v for k, v in shown["pluralistic"].items() if k != "questions"}
    return shown
