"""Teachers for reasoning distillation (``alignkit distill``): where the traces come from.

A teacher answers prompt rows with traces, each a ``(reasoning, answer)`` pair of stripped strings (reasoning ``""``
when the teacher did not think). :func:`teacher_kind` reads the spec:

- ``http://...`` / ``https://...``: an OpenAI-compatible chat-completions server, asked through the judges' client
  (:func:`~alignkit.feedback.judges.post_chat`: the API key from ``OPENAI_API_KEY``, retries with backoff). The
  reasoning is the reply message's ``reasoning_content`` (vLLM's and DeepSeek's reasoning parsers; ``reasoning``
  on some servers), else a ``<think>`` block at the start of its content;
- ``package.module:function`` or ``path/to/file.py:function``: a program standing in as the teacher, called once
  per trace with the prompt row (a dict: ``prompt`` and the row's other columns, e.g. ``answer``) and returning
  ``(reasoning, answer)``, a dict with those keys, or one text with a ``<think>`` block;
- anything else: a model alignkit loads (a name, a directory, a hub id, ``tiny``), sampled by the rollout engine
  with thinking on (``<think>`` opened after the generation prompt) and the run's thinking budget, seeded per
  prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from alignkit.data.thinking import split_thinking

Trace = tuple[str, str]


def teacher_kind(spec: str) -> str:
    """``endpoint``, ``program`` or ``model`` (module docstring)."""
    if spec.startswith(("http://", "https://")):
        return "endpoint"
    target, sep, attr = spec.rpartition(":")
    if sep and attr.isidentifier() and (target.endswith(".py") or all(p.isidentifier() for p in target.split("."))):
        return "program"
    return "model"


def as_trace(value, spec: str) -> Trace:
    """A teacher's output as ``(reasoning, answer)``: a pair, a dict with those keys, or text with ``<think>``."""
    if isinstance(value, dict):
        value = (value.get("reasoning") or value.get("reasoning_content") or "", value.get("answer", ""))
    if isinstance(value, str):
        value = split_thinking(value)
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        raise TypeError(f"teacher {spec!r} returned {str(value)[:120]!r}: expected (reasoning, answer) strings, a "
                        f"dict with those keys, or a text with a <think> block")
    return value[0].strip(), value[1].strip()


class ProgramTeacher:
    """A Python function as the teacher: ``fn(row) -> (reasoning, answer)``."""

    def __init__(self, spec: str):
        from alignkit.rl.rewards import _import_function

        target, _, attr = spec.rpartition(":")
        self.spec, self.fn = spec, _import_function(spec, target, attr, what="teacher")

    def traces(self, rows: list[dict], n: int, seeds: Sequence[int]) -> list[list[Trace]]:
        return [[as_trace(self.fn(dict(row)), self.spec) for _ in range(n)] for row in rows]

    def close(self) -> None:
        pass


class EndpointTeacher:
    """An OpenAI-compatible server (module docstring); ``workers`` requests at a time."""

    def __init__(self, url: str, model: str, sampling, *, workers: int = 4, api_key_env: str = "OPENAI_API_KEY"):
        from alignkit.feedback.judges import _chat_url

        self.url, self.model_name, self.sampling, self.workers = _chat_url(url), model, sampling, max(1, workers)
        self.api_key_env = api_key_env

    def _one(self, job) -> Trace:
        from alignkit.feedback.judges import JudgeError, post_chat

        prompt, seed = job
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        body = {"model": self.model_name, "messages": messages, "temperature": self.sampling.temperature,
                "top_p": self.sampling.top_p, "max_tokens": self.sampling.max_new_tokens, "seed": int(seed) % 2**31}
        payload = post_chat(self.url, body, api_key_env=self.api_key_env)
        try:
            message = payload["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"teacher endpoint {self.url} returned no choices[0].message: {str(payload)[:300]}") from None
        content = str(message.get("content") or "")
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        return as_trace((str(reasoning), content) if reasoning else content, self.url)

    def traces(self, rows: list[dict], n: int, seeds: Sequence[int]) -> list[list[Trace]]:
        jobs = [(row["prompt"], seed * 1000003 + j) for row, seed in zip(rows, seeds) for j in range(n)]
        with ThreadPoolExecutor(max_workers=min(self.workers, max(1, len(jobs)))) as pool:
            flat = list(pool.map(self._one, jobs))
        return [flat[i * n:(i + 1) * n] for i in range(len(rows))]

    def close(self) -> None:
        pass


class ModelTeacher:
    """A model in this process, sampled by :class:`~alignkit.rl.rollout.LocalEngine` with thinking on."""

    def __init__(self, name: str, sampling, *, precision: str = "bf16", batch: int = 64, max_prompt_length: int = 512,
                 seed: int = 0, device: str = "auto"):
        from alignkit.models.loading import load_model
        from alignkit.rl.rollout import LocalEngine
        from alignkit.train import strategy

        self.model, self.tok = load_model(name, seed=seed)
        self.model.eval().requires_grad_(False)
        strategy.place(self.model, device)
        self.engine = LocalEngine(self.model, self.tok, precision=precision, max_batch=batch)
        self.sampling = dataclasses.replace(sampling, thinking=True)
        self.max_prompt_length = max_prompt_length

    def traces(self, rows: list[dict], n: int, seeds: Sequence[int]) -> list[list[Trace]]:
        from alignkit.data.tokenize import prompt_ids

        ids = [prompt_ids(self.tok, r["prompt"])[-self.max_prompt_length:] for r in rows]
        done = self.engine.generate(ids, n, self.sampling, seeds=list(seeds))
        return [[(c.reasoning.strip(), c.answer.strip()) for c in group] for group in done]

    def close(self) -> None:
        self.engine.close()


def build_teacher(cfg, sampling):
    """The teacher ``cfg.teacher`` names (a :class:`~alignkit.config.DistillConfig`); ``sampling``: how a model or
    endpoint teacher samples (:class:`~alignkit.rl.rollout.SamplingParams`)."""
    kind = teacher_kind(cfg.teacher)
    if kind == "program":
        return ProgramTeacher(cfg.teacher)
    if kind == "endpoint":
        return EndpointTeacher(cfg.teacher, cfg.teacher_model, sampling)
    return ModelTeacher(cfg.teacher, sampling, precision=cfg.rollout_precision, batch=cfg.rollout_batch,
                        max_prompt_length=cfg.max_prompt_length or cfg.max_length // 2, seed=cfg.seed,
                        device=cfg.device)
