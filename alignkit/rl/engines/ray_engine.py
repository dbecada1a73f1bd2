"""``rollout_backend=ray``: rollout workers as Ray actors, each a :class:`~alignkit.rl.rollout.LocalEngine` on a
copy of the policy.

The trainer keeps the policy; each worker builds the same architecture from its config (random weights, CPU,
float32) and receives the trainer's weights at every :meth:`RayEngine.update_weights` through
:mod:`alignkit.weights` (a fresh model's names, tied weights once, FSDP2 shards gathered a tensor at a time),
put once into Ray's object store and read by every worker, which writes them by name and refreshes its own
engine (its bf16 copy, prepacked where the CPU allows, as in process). Full fine-tuning sends every weight,
in bf16 with ``rollout_precision=bf16`` (the worker's copy casts them again, which changes nothing, so the
bytes halve for free). LoRA sends the frozen base once, in float32, when a worker starts; the worker wraps it
with the policy's adapter config, and every sync after that carries the adapters alone, which the worker's
engine merges (``W + B A s``) exactly as the in-process engine does.

Generation deals the prompts round-robin over the workers (a prompt's samples stay together) and reassembles
the groups in prompt order. Online RL passes a seed per prompt, so what a worker samples does not depend on
which worker it is or what else it generates (:mod:`alignkit.rl.rollout`): two workers give the tokens and
log-probs the in-process engine gives for the same weights. Called without seeds, the engine derives one seed
per prompt from ``SamplingParams.seed`` (random when None), so a call is still worker-invariant.

A worker that dies (its process killed, its node lost) is replaced: a new actor is started, loads the weights of
the current version from the object store, and generates the dead worker's share again; nothing is dropped.
Ray starts its workers at niceness 15 by default; rollout workers are on the critical path, so alignkit asks
for 0 (``RAY_worker_niceness``, when Ray is started here).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence

import torch

from alignkit.errors import ConfigError
from alignkit.models.logprobs import unwrap
from alignkit.rl.rollout import Completion, LocalEngine, SamplingParams, check_version, row_seed

log = logging.getLogger(__name__)


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("rollout_backend=ray needs Ray: pip install 'alignkit[ray]'") from None
    return ray


def full_weights(model, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` whole, on the CPU, in ``dtype``, under a fresh model's names, LoRA merged and
    FSDP2 shards gathered one at a time (:class:`alignkit.weights.ModuleSource`; a collective under FSDP2:
    every process calls it, and the main one gets the tensors)."""
    from alignkit.weights import ModuleSource

    with torch.no_grad():
        return {name: t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).clone()
                for name, t in ModuleSource(model, lora="merged")}


class RolloutWorker:
    """The body of one rollout actor: a policy copy and its :class:`LocalEngine`."""

    def __init__(self, config, tokenizer, precision: str, max_batch: int, fast_decode: bool, threads: int,
                 lora_config=None):
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(max(1, threads))
        self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().requires_grad_(False)
        self.lora_config, self.engine = lora_config, None
        self.engine_args = (tokenizer, precision, max_batch, fast_decode)

    def load(self, base: dict | None, adapters: dict | None, version: int) -> int:
        """Write a sync and refresh the engine; returns the version held. ``base`` (whole weights under a fresh
        model's names) comes first; with LoRA the model is then wrapped with the policy's adapter config and
        ``adapters`` (peft's names) written into it. Every tensor of the target must arrive (a missing or
        unexpected one fails: :func:`alignkit.weights.apply_weights`)."""
        from alignkit.weights import apply_weights

        if base is not None:
            if hasattr(self.model, "peft_config"):
                raise RuntimeError("base weights sent to a worker that already wrapped its adapters")
            apply_weights(self.model, base.items())
        if self.lora_config is not None and not hasattr(self.model, "peft_config"):
            from peft import get_peft_model

            self.model = get_peft_model(self.model, self.lora_config).eval().requires_grad_(False)
        if adapters is not None:
            apply_weights(self.model, adapters.items())
        if self.engine is None:
            tok, precision, max_batch, fast_decode = self.engine_args
            self.engine = LocalEngine(self.model, tok, precision=precision, max_batch=max_batch,
                                      fast_decode=fast_decode)
        self.engine.update_weights(self.model, version=version)
        return self.engine.version

    def generate(self, prompts, n: int, sampling: SamplingParams, seeds, version: int | None) -> list[list[Completion]]:
        return self.engine.generate(prompts, n, sampling, seeds=seeds, version=version)

    def scramble(self) -> None:
        """Zero every tensor a sync writes (all weights; with LoRA, the adapters) and refresh the engine (tests: the
        next sync must write them all)."""
        from alignkit.weights.sink import target_table

        with torch.no_grad():
            for t in target_table(self.model).values():
                t.zero_()
        self.engine.update_weights(self.model, version=self.engine.version)

    def pid(self) -> int:
        return os.getpid()


class RayEngine:
    """Rollout engine of ``workers`` Ray actors (module docstring); the :class:`RolloutEngine` interface."""

    logprob_semantics = "tempered_untruncated"

    def __init__(self, model, tokenizer, *, workers: int = 2, precision: str = "bf16", max_batch: int = 64,
                 fast_decode: bool = True, address: str = "", cpus_per_worker: int = 1):
        ray = _ray()
        if not ray.is_initialized():
            if not address:
                os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(address=address or None, num_cpus=None if address else max(workers, os.cpu_count() or 1),
                     include_dashboard=False, log_to_driver=False)
        self.precision, self.version, self.asleep = precision, 0, False
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        base = unwrap(model)
        # LoRA: the frozen base travels once (float32, so the workers merge exactly what the trainer would), then
        # the adapters alone at every sync
        peft_config = getattr(model, "peft_config", None)
        self.lora_config = next(iter(peft_config.values())) if peft_config else None
        self._spec = (base.config, tokenizer, precision, max_batch, fast_decode, cpus_per_worker)
        self._actor_cls = ray.remote(num_cpus=cpus_per_worker)(RolloutWorker)
        self._base = None  # object-store reference of the base weights (LoRA), for every new worker
        if self.lora_config is not None:
            with model.disable_adapter():
                self._base = ray.put(full_weights(model, torch.float32))
        self._sync = (None, None)  # object-store references of the current version's sync: (base, adapters)
        self.workers = [self._start() for _ in range(workers)]
        self.model = model
        self.restarts, self.last_sync_bytes = 0, 0
        self.update_weights(model, version=0)
        log.info("rollout: %d Ray workers (%s, %d CPU each)", workers, precision, cpus_per_worker)

    def _start(self):
        """A new worker; with LoRA, loaded with the base weights (its adapters come with the next sync)."""
        worker = self._actor_cls.remote(*self._spec[:5], threads=self._spec[5], lora_config=self.lora_config)
        if self._base is not None:  # runs before any later call to this worker (a caller's calls keep order)
            worker.load.remote(self._base, None, self.version)
        return worker

    def _call(self, i: int, method: str, *args):
        """``ray.get`` of one worker's call; a dead worker is replaced, loaded with the current weights, and the
        call made again."""
        ray = _ray()
        try:
            return ray.get(getattr(self.workers[i], method).remote(*args))
        except ray.exceptions.RayActorError:
            log.warning("rollout worker %d died: starting a new one with weights version %d", i, self.version)
            self.workers[i] = self._start()
            self.restarts += 1
            if self._sync != (None, None):
                ray.get(self.workers[i].load.remote(*self._sync, self.version))
            return ray.get(getattr(self.workers[i], method).remote(*args))

    def _all(self, method: str, *args) -> list:
        ray = _ray()
        refs = [getattr(w, method).remote(*args) for w in self.workers]
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayActorError:
                out.append(self._call(i, method, *args))
        return out

    # ------------------------------------------------------------------------------------------ interface

    def update_weights(self, model, version: int | None = None) -> None:
        """Send ``model``'s weights to every worker as ``version`` (default: the next). Under FSDP2 a collective."""
        self.model = model
        self.version = self.version + 1 if version is None else version
        if self.asleep:
            return
        ray = _ray()
        if self.lora_config is not None:
            from alignkit.weights import ModuleSource

            with torch.no_grad():
                sent = {name: t.detach().cpu().clone() for name, t in ModuleSource(model, lora="adapters")}
            self._sync = (None, ray.put(sent))
        else:
            sent = full_weights(model, self.dtype)
            self._sync = (ray.put(sent), None)
        self.last_sync_bytes = sum(t.numel() * t.element_size() for t in sent.values())
        held = self._all("load", *self._sync, self.version)
        assert all(v == self.version for v in held), held

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams,
                 seeds: Sequence[int] | None = None, version: int | None = None) -> list[list[Completion]]:
        if self.asleep:
            from alignkit.rl.rollout import EngineAsleep

            raise EngineAsleep("the rollout engine is asleep: call wake() before generate()")
        check_version(self, version)
        if not prompts or n <= 0:
            return [[] for _ in prompts]
        if seeds is None and sampling.temperature > 0:
            base = sampling.seed if sampling.seed is not None else random.getrandbits(62)
            seeds = [row_seed(base, i) for i in range(len(prompts))]
        W = len(self.workers)
        ray = _ray()
        refs = {}
        for w in range(W):
            share = list(range(w, len(prompts), W))
            if share:
                refs[w] = (share, self.workers[w].generate.remote(
                    [list(prompts[i]) for i in share], n, sampling, None if seeds is None else [seeds[i] for i in share],
                    self.version))
        out: list[list[Completion]] = [[] for _ in prompts]
        for w, (share, ref) in refs.items():
            try:
                groups = ray.get(ref)
            except ray.exceptions.RayActorError:
                groups = self._call(w, "generate", [list(prompts[i]) for i in share], n, sampling,
                                    None if seeds is None else [seeds[i] for i in share], self.version)
            for i, g in zip(share, groups):
                out[i] = g
        return out

    def sleep(self) -> None:
        """Stop the workers (their memory is freed); :meth:`wake` starts new ones with the current weights."""
        ray = _ray()
        for w in self.workers:
            ray.kill(w)
        self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.asleep = False
            self.workers = [self._start() for _ in self.workers]
            self.update_weights(self.model, version=self.version)  # the weights of now, not of before sleep()

    def close(self) -> None:
        ray = _ray()
        for w in self.workers:
            ray.kill(w)
        self.workers = []
