"""Asynchronous rollouts (``max_staleness=k``): the rollouts of later steps are generated while a step trains.

The trainer takes rollout ``r`` when its weights are version ``V_r`` (the optimizer steps taken so far). With
``max_staleness = k`` the :class:`Pipeline` then hands the weights of now to a background thread and asks it for
rollout ``r + k``; the thread syncs the rollout engine to that snapshot, samples, scores and returns the groups,
while the main thread trains on rollout ``r``. So rollout ``r`` was sampled by the weights of rollout ``r - k``
(``max(0, r - k)``: the first ``k + 1`` rollouts all come from the initial weights), and no completion trained on
is more than ``k`` rollouts older than the policy that trains on it. Each completion carries the weight version
that sampled it (:attr:`~alignkit.rl.rollout.Completion.weight_version`); ``rollout/staleness`` and
``rollout/max_staleness`` log how many optimizer steps older than the trainer it is.

The policy that sampled is not the one that trains: its log-probs (kept on every row) are what the off-policy
corrections of :mod:`alignkit.losses.off_policy` weigh against (``correction=tis`` etc. in the decoupled mode,
where the old policy is the trainer's weights when the rollout is taken: AReaL's decoupled PPO). The
``mismatch/*`` figures then measure the lag as well as any precision gap.

``max_staleness = 0`` runs the same machinery with no lag: rollout ``r`` is asked for and waited on at once, with
the weights of now, which is the synchronous loop; a test checks they give the same run bit for bit.

How it stays exact and safe:

- the weights are copied in the main thread, between optimizer steps (:func:`snapshot`: the trainable tensors;
  frozen ones never change) and loaded into a **shadow** copy of the policy that the engine syncs from, so the
  background thread never reads weights the optimizer is writing (the shadow shares the frozen tensors, so with
  LoRA it costs only the adapters);
- one thread does every job, in rollout order, so the prompt sampler, dynamic sampling and the curriculum evolve
  exactly as in the synchronous loop (what a round draws does not depend on the weights);
- the engine is behind a lock (:class:`Serialised`): a held-out evaluation between steps waits for the job in
  flight, and a job's sync and generation are not split by another caller;
- a checkpoint stores the sampler's state from *before* the first rollout not yet trained on was drawn, so a
  resumed run draws the same prompts; it samples them again with the resumed weights (the rollouts that were in
  flight are not saved), so a resumed asynchronous run is not bit-equal to an uninterrupted one, as it is with
  ``max_staleness = 0``;
- an error in the thread is raised in the main thread when that rollout is taken; one training process only
  (the collector's gathers are collectives, which cannot run beside the training step's).
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


ASYNC_FROM = 1  # the smallest max_staleness that runs the pipeline (0: the synchronous loop; tests lower it)


def pipelined(cfg) -> bool:
    """Whether a run generates its rollouts in the background (:class:`Pipeline`)."""
    return getattr(cfg, "max_staleness", 0) >= ASYNC_FROM


def snapshot(policy) -> dict[str, torch.Tensor]:
    """Copies of the policy's trainable tensors, by name: what changes between two weight versions."""
    with torch.no_grad():
        return {name: p.detach().clone() for name, p in policy.named_parameters() if p.requires_grad}


def shadow_of(policy):
    """A copy of ``policy`` for the engine to read while the policy trains: trainable tensors copied, frozen ones
    (a LoRA base) shared, since nothing writes them."""
    memo = {id(p): p for p in policy.parameters() if not p.requires_grad}
    with torch.no_grad():
        shadow = copy.deepcopy(policy, memo)
    return shadow.requires_grad_(False)


def load_snapshot(shadow, weights: dict[str, torch.Tensor]) -> None:
    params = dict(shadow.named_parameters())
    unknown = weights.keys() - params.keys()
    if unknown:
        raise RuntimeError(f"weight snapshot does not fit the shadow policy: {sorted(unknown)[:5]}")
    with torch.no_grad():
        for name, t in weights.items():
            params[name].copy_(t)


class Serialised:
    """An engine behind a re-entrant lock: every call waits for the one in progress (another thread's), and
    :meth:`held` keeps the engine for a sequence of calls (a sync and the generation that must use it)."""

    def __init__(self, engine):
        self.engine = engine
        self._lock = threading.RLock()

    @contextmanager
    def held(self):
        with self._lock:
            yield self.engine

    def _locked(name):  # noqa: N805
        def call(self, *args, **kwargs):
            with self._lock:
                return getattr(self.engine, name)(*args, **kwargs)

        call.__name__ = name
        return call

    generate = _locked("generate")
    update_weights = _locked("update_weights")
    sleep = _locked("sleep")
    wake = _locked("wake")
    close = _locked("close")
    del _locked

    def __getattr__(self, name):  # version, last_sync_bytes, logprob_semantics, ...
        return getattr(self.engine, name)


@dataclass
class _Job:
    rollout: int
    weights: dict
    version: int
    result: Future = field(default_factory=Future)
    started: threading.Event = field(default_factory=threading.Event)
    sampler_state: dict | None = None  # the prompt sampler's state before this rollout drew


class Pipeline:
    """Rollouts generated up to ``depth`` ahead of training by one background thread (module docstring).

    ``generate(model, rollout, version) -> (groups, metrics)`` is one rollout's work (sync the engine to ``model``
    as ``version``, sample, score), run in the thread with the shadow policy holding the job's weights and the
    engine held; ``sampler`` is the prompt sampler it draws from; ``last`` is the run's last rollout (none is
    asked for past it).
    """

    def __init__(self, engine: Serialised, policy, generate, sampler, depth: int, last: int):
        self.engine, self.generate, self.sampler, self.depth, self.last = engine, generate, sampler, depth, last
        self.shadow = shadow_of(policy)
        self.jobs: dict[int, _Job] = {}
        self.next = 0  # the first rollout not yet asked for
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="alignkit-rollouts", daemon=True)
        self._thread.start()

    def take(self, rollout: int, policy, version: int) -> tuple[list, object, float]:
        """Rollout ``rollout``'s ``(groups, metrics)``, asking first for what may now be generated: every rollout up
        to ``rollout + depth``, with the weights of now (``version``). Returns also the seconds spent waiting."""
        self.next = max(self.next, rollout)  # a resumed run: what was in flight is asked for again
        weights = None
        while self.next <= min(rollout + self.depth, self.last):
            weights = weights if weights is not None else snapshot(policy)
            job = _Job(self.next, weights, version)
            self.jobs[self.next] = job
            self._queue.put(job)
            self.next += 1
        job = self.jobs.pop(rollout)
        t0 = time.perf_counter()
        groups, metrics = job.result.result()  # raises what the thread raised
        if rollout >= self.last:  # nothing more to generate: the thread ends and the shadow copy is freed
            self.close()
        return groups, metrics, time.perf_counter() - t0

    def sampler_state(self, first_untrained: int) -> dict | None:
        """The prompt sampler's state before rollout ``first_untrained`` drew (None: it was not asked for yet, so
        the sampler's state is current)."""
        job = self.jobs.get(first_untrained)
        if job is None:
            return None
        job.started.wait()
        return job.sampler_state

    def close(self) -> None:
        self._queue.put(None)
        self.shadow = None

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            job.sampler_state = copy.deepcopy(self.sampler.state_dict())
            job.started.set()
            try:
                with self.engine.held():
                    load_snapshot(self.shadow, job.weights)
                    job.weights = None
                    job.result.set_result(self.generate(self.shadow, job.rollout, job.version))
            except BaseException as e:  # noqa: BLE001  handed to the main thread, which raises it
                job.result.set_exception(e)


__all__ = ["ASYNC_FROM", "Pipeline", "Serialised", "load_snapshot", "pipelined", "shadow_of", "snapshot"]
