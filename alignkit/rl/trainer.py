"""Online training on the one training loop: rollouts as a :class:`~alignkit.train.loop.StepSource`, and the
policy-gradient :class:`~alignkit.train.loop.Task`.

A rollout draws ``prompts_per_step`` prompts, samples G completions of each with the rollout engine, scores them
with the reward functions (DAPO dynamic sampling and the curriculum act here), computes the reference
log-probs, the behaviour log-probs and the critic's values without gradient where the objective needs them, and
the advantages over the WHOLE rollout. The rollout is then cut into ``mini_batches`` optimizer steps, repeated
for ``ppo_epochs`` passes. A row is one prompt group: the prompt and its G completions go through the model as
one sequence under a block mask (``alignkit.data.collate.collate_shared``), so the prompt is computed once.

Per-token values of a row (behaviour and reference log-probs, advantages, returns, old values, validity) are
kept FLAT in the order ``collate_shared`` emits targets (completion by completion), so a micro-batch's values
are their concatenation.

On the first optimizer step after a rollout the weights are those that sampled it, so the behaviour
log-probs are taken as ``logp.detach()`` of the same forward pass: the ratio is exactly 1 and the clip
fraction 0 (and no extra forward pass is needed when each rollout is used once).

Every log-prob (policy, behaviour, reference) is taken at the sampling temperature T, i.e. under
``softmax(logits / T)``, the distribution the sampler drew from (as TRL and verl do): the ratios, the KL
penalty and its logged value, and the entropy all refer to the policy that sampled. Top-k and top-p
truncation are not applied when scoring: the sampler draws from the truncated distribution and the trainer
scores under the full one at temperature T, so with ``top_p < 1`` or ``top_k > 0`` the samples are slightly
off-policy, a mismatch that is not corrected (an off-policy correction is refused with them: its ratios would be
biased).

The sampler's own log-probs (``Completion.logps``, same definition) are kept on each row as ``extra["rollout"]``.
Every step logs how far they are from the trainer's (``mismatch/*``, :class:`PolicyTask`), and the objective's
off-policy correction, if any, weights the loss by their ratio (``alignkit.losses.off_policy``, docs/off_policy.md).

Several processes (torchrun) compute exactly what one process computes with the same global settings, by
construction: every process draws the same prompts for a dynamic-sampling round, generates and scores (rewards)
its share ``[rank::world]`` of them, and the round's groups are then gathered to every process in the order of
the draw, so dynamic sampling and the curriculum decide alike everywhere. A prompt's samples are seeded by what
they are (run seed, rollout, round, the prompt's position in the round's draw), never by the process that
generates them, and each sample draws from its own generator (``LocalEngine.generate``'s ``seeds``), so its
randomness does not depend on which process or batch produced it (its logits can, by rounding: a prompt
decoded alone runs without padding, where bf16 kernels round differently; ``rollout_batch = num_generations``
decodes every prompt's samples on their own, which removes that too). The per-token scoring passes are split
over the processes and gathered too, so every process holds the whole rollout and computes the advantages and
the KL controller's update over it; each optimizer step is the mini-batch one process would take, and a
process trains on its share ``[rank::world]`` of it. ``prompts_per_step`` counts the prompts of each process, as
``batch_size`` does: a rollout draws ``prompts_per_step x processes`` prompts.

A completion without a reward (every reward function returned None, raised or timed out) is masked: it gets
no gradient and enters no group statistic (mean, std, leave-one-out baseline). With ``mask_truncated``
(DAPO's overlong filtering) a completion cut at ``max_new_tokens`` gets no gradient either, but its reward
still counts in its group's statistics.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from alignkit.data.collate import collate_shared
from alignkit.data.tokenize import Encoded
from alignkit.errors import MismatchAlarm
from alignkit.losses.off_policy import mismatch_metrics
from alignkit.losses.policy import get_aggregation, get_kl_estimator, value_loss
from alignkit.models.device import model_device, on_model
from alignkit.models.logprobs import autocast, hidden_states, project_logps
from alignkit.rl.objective import KLController, Objective, compute_advantages, policy_objective
from alignkit.rl.pipeline import Pipeline, pipelined
from alignkit.rl.rewards import completion_columns
from alignkit.rl.rollout import SamplingParams
from alignkit.rl.thinking import resolve_mode
from alignkit.train import dist, strategy
from alignkit.train.loop import Metrics, micro_batches

log = logging.getLogger("alignkit")


# ------------------------------------------------------------------------------------------------ models


class ValueHead(nn.Module):
    """A scalar value per position from the last hidden state (zero-initialised, so V starts at 0)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = nn.Linear(hidden, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h_ND: torch.Tensor) -> torch.Tensor:
        return self.proj(h_ND.float()).squeeze(-1)


class ActorCritic(nn.Module):
    """The policy and its critic, trained by one optimizer. ``critic`` is a separate backbone, or None to put
    the value head on the policy's own trunk (one forward pass serves both)."""

    def __init__(self, policy, head: ValueHead, critic=None):
        super().__init__()
        self.policy, self.head, self.critic = policy, head, critic


def policy_of(model):
    return model.policy if isinstance(model, ActorCritic) else model


def unflatten(x_N: torch.Tensor, segment_N: torch.Tensor, n_segments: int) -> torch.Tensor:
    """``[S, T]`` from flat per-token values whose segments are contiguous runs (0 where a segment is shorter)."""
    counts = torch.bincount(segment_N, minlength=n_segments)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(x_N.shape[0], device=x_N.device) - starts[segment_N]
    out = x_N.new_zeros(n_segments, int(counts.max()) if n_segments else 0)
    return out.index_put((segment_N, pos), x_N)


@dataclass
class Forward:
    """One micro-batch of groups through the policy (and critic): flat per-token tensors and their layout."""

    logp_N: torch.Tensor
    values_N: torch.Tensor | None
    segment_N: torch.Tensor
    n_segments: int

    def bt(self, x_N: torch.Tensor) -> torch.Tensor:
        return unflatten(x_N, self.segment_N, self.n_segments)


def forward(model, rows: list[Encoded], pad_id: int, chunk: int, *, values: bool, temperature: float = 1.0) -> Forward:
    policy = policy_of(model)
    batch = on_model(collate_shared(rows, pad_id), policy)
    h_BTD = hidden_states(policy, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    h_ND = h_BTD.reshape(-1, h_BTD.shape[-1])[batch["source"]]
    logp_N = project_logps(policy, h_ND, batch["target"], chunk=chunk, temperature=temperature)
    values_N = None
    if values:
        if model.critic is not None:
            hc = hidden_states(model.critic, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
            h_ND = hc.reshape(-1, hc.shape[-1])[batch["source"]]
        values_N = model.head(h_ND)
    return Forward(logp_N, values_N, batch["segment"], batch["n_segments"])


# ------------------------------------------------------------------------------------------------ rollouts


@dataclass
class Prompt:
    """A training or held-out prompt: its token ids, the prompt as the data gave it, and the row's other columns."""

    ids: list[int]
    prompt: object
    columns: dict = field(default_factory=dict)


@dataclass
class Group:
    """A prompt and its sampled completions with their rewards (None: no reward function gave a value)."""

    index: int
    prompt: Prompt
    completions: list
    raw: list[float | None]
    per_function: dict[str, list]

    @property
    def rewards(self) -> list[float]:
        """The rewards that exist (missing ones are left out: they enter no statistic)."""
        return [r for r in self.raw if r is not None]


class Sums:
    """Metrics as ``name -> [sum, count]``, plus ``x/sumsq`` beside ``x/mean`` for a standard deviation.

    The loop sums every process's pairs. ``shared=True`` marks a value every process holds alike (computed from
    the gathered rollout): it is counted once, on the main process, and the others add zeros under the same
    name (every process must report the same names).
    """

    def __init__(self):
        self.d: dict[str, list[float]] = {}

    def add(self, name: str, total: float, count: float, *, shared: bool = False) -> None:
        if shared and dist.rank() != 0:
            total, count = 0.0, 0.0
        s = self.d.setdefault(name, [0.0, 0.0])
        s[0] += total
        s[1] += count

    def values(self, name: str, xs, *, shared: bool = False) -> None:
        xs = [float(x) for x in xs]
        self.add(f"{name}/mean", sum(xs), len(xs), shared=shared)
        self.add(f"{name}/sumsq", sum(x * x for x in xs), len(xs), shared=shared)

    def out(self) -> Metrics:
        return {k: (v[0], v[1]) for k, v in self.d.items()}


def rollout_seed(seed: int, rollout: int, round_: int, position: int) -> int:
    """The sampling seed of one prompt of a rollout: a hash of (run seed, rollout, dynamic-sampling round, the
    prompt's position in the round's draw over all processes). It names what is sampled, not who samples it, so
    any number of processes sample what one would; and no two prompts of a run share a seed however many
    rounds, rollouts or prompts there are (an arithmetic mix such as ``(rollout * 101 + round) * 64 + position``
    collides past 101 rounds or 64 positions)."""
    digest = hashlib.blake2b(f"{seed}/{rollout}/{round_}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: any torch.Generator seed


def sampling_params(cfg) -> SamplingParams:
    """How a run's config (a :class:`~alignkit.config.RolloutConfig`) samples, thinking mode and budget included."""
    return SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                          max_new_tokens=cfg.max_new_tokens, stop=cfg.stop_strings, thinking=cfg.thinking_mode,
                          max_thinking_tokens=cfg.max_thinking_tokens or None,
                          min_thinking_tokens=cfg.min_thinking_tokens, budget_action=cfg.budget_action)


class Collector:
    """Draws prompts, samples groups, scores them; dynamic sampling and the curriculum act here (module
    docstring: each process samples its share of a round, and every process gets the whole round)."""

    def __init__(self, engine, rewards, prompts: list[Prompt], sampler, cfg, *, dynamic=None, curriculum=None):
        self.engine, self.rewards, self.prompts, self.sampler = engine, rewards, prompts, sampler
        self.cfg, self.dynamic, self.curriculum = cfg, dynamic, curriculum

    def sampling(self) -> SamplingParams:
        """How to sample; the seeds go per prompt to the engine (:func:`rollout_seed`)."""
        return sampling_params(self.cfg)

    def requests(self, idx: list[int]) -> dict:
        """Per-prompt thinking modes from the prompts' soft switches (``/think``, ``/no_think``) where the config
        sets no hard one, for an engine that takes them (the local one; a model trained on the switches also
        reads them from the prompt itself)."""
        if not getattr(self.engine, "thinking_requests", False) or self.cfg.thinking_mode is not None:
            return {}
        modes = [resolve_mode(None, p) if isinstance(p, (str, list)) else None
                 for p in (self.prompts[i].prompt for i in idx)]
        return {"thinking": modes} if any(m is not None for m in modes) else {}

    def score(self, groups_in: list[tuple[int, list]]) -> tuple[list[Group], dict[str, int]]:
        """The groups of ``(prompt index, completions)`` with their rewards, and each reward function's failures."""
        if not groups_in:
            if self.rewards.collective:  # a sharded reward model: this process joins the others' passes
                self.rewards([], [], {"lengths": []})
            return [], {}
        flat_p, flat_c, cols, done = [], [], {}, []
        for idx, comps in groups_in:
            p = self.prompts[idx]
            for c in comps:
                flat_p.append(p.prompt)
                flat_c.append(c.text)
                done.append(c)
                for k, v in p.columns.items():
                    cols.setdefault(k, []).append(v)
        scores = self.rewards(flat_p, flat_c, {**cols, **completion_columns(done)})
        groups, k = [], 0
        for idx, comps in groups_in:
            n = len(comps)
            per = {name: vals[k : k + n] for name, vals in scores.per_function.items()}
            groups.append(Group(idx, self.prompts[idx], comps, scores.total[k : k + n], per))
            k += n
        return groups, dict(scores.failures)

    def collect(self, rollout: int, n_prompts: int, m: Sums, version: int | None = None) -> list[Group]:
        """The rollout's groups over all processes (the same list on each): ``n_prompts`` of them, or with dynamic
        sampling up to ``n_prompts`` with rewards that differ."""
        counter = {"round": 0}

        def draw(k: int) -> list[Group]:
            r = counter["round"]
            counter["round"] += 1
            idx = self.sampler.draw(k, rollout, r)  # the round's draw, the same on every process
            groups = self._sample(idx, [rollout_seed(self.cfg.seed, rollout, r, pos) for pos in range(len(idx))], m,
                                  version)
            if self.curriculum is not None:
                for g in groups:
                    self.curriculum.update(g.index, [r for r in g.raw if r is not None])
            return groups

        if self.dynamic is None:
            groups = draw(n_prompts)
        else:
            groups, stats = self.dynamic.fill(draw, n_prompts)
            for k in ("rounds", "drawn", "kept", "dropped"):
                m.add(f"dynamic_sampling/{k}", float(stats[k]), 1.0, shared=True)
        if self.curriculum is not None:
            for k, v in self.curriculum.metrics().items():
                if v == v:  # not NaN
                    m.add(k, float(v), 1.0, shared=True)
        return groups

    def _sample(self, idx: list[int], seeds: list[int], m: Sums, version: int | None = None) -> list[Group]:
        """Groups of the prompts ``idx`` (one round's draw): this process generates and scores positions
        ``[rank::world]``, then every process gets them all, in the order of ``idx``."""
        world, rank = dist.world(), dist.rank()
        mine = list(range(rank, len(idx), world))
        t0 = time.perf_counter()
        outs = self.engine.generate([self.prompts[idx[p]].ids for p in mine], self.cfg.num_generations,
                                    self.sampling(), seeds=[seeds[p] for p in mine], version=version,
                                    **self.requests([idx[p] for p in mine])) if mine else []
        dt = time.perf_counter() - t0
        m.add("time/generate", dt, 1.0)
        m.add("rollout/tokens_per_s", sum(len(c.token_ids) for g in outs for c in g) / max(dt, 1e-9), 1.0)
        t1 = time.perf_counter()
        local, failures = self.score([(idx[p], comps) for p, comps in zip(mine, outs)])
        m.add("time/reward", time.perf_counter() - t1, 1.0)
        groups: list = [None] * len(idx)
        failed: dict[str, int] = {}
        shares = dist.all_gather_object(([(g.completions, g.raw, g.per_function) for g in local], failures))
        for r, (part, fails) in enumerate(shares):  # process r sampled positions r, r + world, ...
            for j, (comps, raw, per) in enumerate(part):
                p = r + j * world
                groups[p] = Group(idx[p], self.prompts[idx[p]], comps, raw, per)
            for name, n in fails.items():
                failed[name] = failed.get(name, 0) + n
        # the round's statistics from the gathered groups, as one process computes them
        comps = [c for g in groups for c in g.completions]
        m.values("completion/length", [len(c.token_ids) for c in comps], shared=True)
        m.add("completion/truncated", sum(c.finish_reason == "length" for c in comps), len(comps), shared=True)
        for name in groups[0].per_function if groups else ():
            m.values(f"reward/{name}", [v for g in groups for v in g.per_function[name] if v is not None], shared=True)
            m.add(f"reward/{name}/failed", float(failed.get(name, 0)), 1.0, shared=True)
        m.values("reward", [r for g in groups for r in g.raw if r is not None], shared=True)
        return groups


class Rollouts:
    """The :class:`~alignkit.train.loop.StepSource` of online RL (module docstring)."""

    def __init__(self, collector: Collector, obj: Objective, kl: KLController, cfg, pad_id: int, n_steps: int,
                 reference=None):
        self.collector, self.obj, self.kl, self.cfg, self.pad_id = collector, obj, kl, cfg, pad_id
        self.reference = reference  # a frozen model, "adapters" (LoRA off), or None when no KL is used
        self.updates = cfg.ppo_epochs * cfg.mini_batches
        self.n_steps = n_steps
        self.buffer: list[Encoded] = []  # every kept group of the rollout, the same on every process
        self.buffer_rollout = -1
        self._fresh = True
        self._metrics: Metrics = {}
        self.pipeline: Pipeline | None = None  # max_staleness > 0: rollouts generated in the background

    # ---- StepSource
    def rows(self, step: int, model) -> list[Encoded]:
        """This process's share ``[rank::world]`` of the step's mini-batch (the one a single process would take)."""
        rollout, u = divmod(step, self.updates)
        if self.buffer_rollout != rollout:
            self._rollout(rollout, model)
        epoch, part = divmod(u, self.cfg.mini_batches)
        order = list(range(len(self.buffer)))
        if epoch > 0:  # later passes see the groups in a new seeded order
            g = torch.Generator().manual_seed(self.cfg.seed + 7919 * rollout + epoch)
            order = torch.randperm(len(self.buffer), generator=g).tolist()
        step_rows = [self.buffer[i] for i in order[part :: self.cfg.mini_batches]]
        mine = step_rows[dist.rank() :: dist.world()]
        self._fresh = u == 0
        for r in mine:
            r.extra["fresh"] = u == 0
        return mine

    def filler(self) -> Encoded | None:
        """Any one row of the rollout (a copy, marked like this step's rows), for a process that holds no row in a
        step to run a weightless forward on; None when the rollout kept nothing."""
        if not self.buffer:
            return None
        row = self.buffer[0]
        return replace(row, extra={**row.extra, "fresh": self._fresh})

    def metrics(self) -> Metrics:
        m, self._metrics = self._metrics, {}
        return m

    def state_dict(self) -> dict:
        # with rollouts in flight, the sampler's state from before the first of them drew (alignkit.rl.pipeline)
        sampler = self.pipeline.sampler_state(self.buffer_rollout + 1) if self.pipeline is not None else None
        return {"buffer": self.buffer, "buffer_rollout": self.buffer_rollout, "kl": self.kl.state_dict(),
                "sampler": sampler or self.collector.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.buffer, self.buffer_rollout = state["buffer"], state["buffer_rollout"]
        self.kl.load_state_dict(state["kl"])
        self.collector.sampler.load_state_dict(state["sampler"])  # with the curriculum's state

    # ---- one rollout
    def _rollout(self, rollout: int, model) -> None:
        t0 = time.perf_counter()
        policy = policy_of(model)
        version = rollout * self.updates  # the optimizer steps the weights have taken
        if pipelined(self.cfg):
            if self.pipeline is None:
                last = (self.n_steps - 1) // self.updates
                self.pipeline = Pipeline(self.collector.engine, policy, self._generate, self.collector.sampler,
                                         self.cfg.max_staleness, last)
            groups, m, wait = self.pipeline.take(rollout, policy, version)
            m.add("time/wait", wait, 1.0)  # the trainer blocked on the engine
        else:
            groups, m = self._generate(policy, rollout, version)
        # optimizer steps between the weights that sampled a completion and the weights about to train on it
        lag = [version - c.weight_version for g in groups for c in g.completions if c.weight_version is not None]
        if lag:
            m.add("rollout/staleness", float(sum(lag)), float(len(lag)), shared=True)
            m.add("rollout/max_staleness", float(max(lag)), 1.0, shared=True)
        rows = [self._row(g) for g in groups]
        if rows:
            self._score_tokens(model, rows, m)
        else:
            m.add("rollout/skipped", 1.0, 1.0, shared=True)
        self.buffer, self.buffer_rollout = rows, rollout
        m.add("time/rollout", time.perf_counter() - t0, 1.0)
        m.add("kl_coef", self.kl.beta, 1.0, shared=True)
        self._metrics = m.out()

    def _generate(self, model, rollout: int, version: int) -> tuple[list[Group], Sums]:
        """Sync the engine to ``model``'s weights as ``version``, then sample and score rollout ``rollout``."""
        m = Sums()
        t0 = time.perf_counter()
        engine = self.collector.engine
        engine.update_weights(model, version=version)
        m.add("time/sync", time.perf_counter() - t0, 1.0)
        m.add("sync/bytes", float(getattr(engine, "last_sync_bytes", 0)), 1.0)
        groups = self.collector.collect(rollout, self.cfg.prompts_per_step * dist.world(), m, version=version)
        return groups, m

    def _row(self, g: Group) -> Encoded:
        responses = [list(c.token_ids) for c in g.completions]
        scored = [r is not None for r in g.raw]
        drop = [self.cfg.use_mask_truncated and c.finish_reason == "length" for c in g.completions]
        valid = torch.cat([torch.full((len(c.token_ids),), ok and not cut)
                           for c, ok, cut in zip(g.completions, scored, drop)])
        scores = torch.tensor([0.0 if r is None else r for r in g.raw], dtype=torch.float32)
        # the sampler's own log-probs (tempered, untruncated: the trainer's definition), for the mismatch metrics
        # and the off-policy corrections
        rollout = torch.tensor([lp for c in g.completions for lp in c.logps], dtype=torch.float32)
        if rollout.shape != valid.shape:
            raise RuntimeError(f"the rollout engine returned {rollout.numel()} log-probs for {valid.numel()} tokens")
        return Encoded(g.prompt.ids, responses, g.index,
                       extra={"valid": valid, "scores": scores, "scored": torch.tensor(scored), "rollout": rollout})

    @torch.no_grad()
    def _score_tokens(self, model, rows: list[Encoded], m: Sums) -> None:
        obj = replace(self.obj, kl_coef=self.kl.beta)
        need_old = self.updates > 1 or (obj.uses_kl and obj.kl_in == "reward")
        need_values = obj.needs_value_model
        keys = [k for k, on in (("old", need_old or need_values), ("old_values", need_values), ("ref", obj.uses_kl))
                if on]
        if keys:
            self._score_passes(model, rows, obj, need_old or need_values, need_values, keys)
        # advantages over the whole rollout (REINFORCE++ and whitening normalise across it)
        G = len(rows[0].responses)
        segs = torch.cat([torch.arange(len(r.responses)).repeat_interleave(torch.tensor([len(x) for x in r.responses])) + i * G
                          for i, r in enumerate(rows)])
        S = len(rows) * G
        mask = unflatten(torch.cat([r.extra["valid"] for r in rows]).float(), segs, S)
        scores = torch.cat([r.extra["scores"] for r in rows])
        kl_bt = None
        if obj.uses_kl and obj.kl_in == "reward":
            kl_n = get_kl_estimator(obj.kl_estimator).fn(torch.cat([r.extra["old"] for r in rows]),
                                                         torch.cat([r.extra["ref"] for r in rows]))
            kl_bt = unflatten(kl_n, segs, S)
        values = unflatten(torch.cat([r.extra["old_values"] for r in rows]), segs, S) if need_values else None
        scored = torch.cat([r.extra["scored"] for r in rows])
        adv, returns = compute_advantages(obj, scores, mask, group_size=G, kl_BT=kl_bt, values_BT=values,
                                          scored_B=scored)
        real = unflatten(torch.ones(segs.shape[0]), segs, S) > 0  # [S, T] -> flat order: completion by completion
        _split(rows, "adv", adv[real])
        if returns is not None:
            _split(rows, "returns", returns[real])
        valid_adv = adv[mask.bool()]
        if valid_adv.numel():
            m.values("advantage", valid_adv.tolist(), shared=True)
            m.add("advantage/abs", float(valid_adv.abs().sum()), float(valid_adv.numel()), shared=True)
        if obj.uses_kl:
            old = torch.cat([r.extra["old"] for r in rows]) if need_old else None
            if old is not None:
                k1 = unflatten(old - torch.cat([r.extra["ref"] for r in rows]), segs, S) * mask
                seq_kl = k1.sum(-1)
                m.add("rollout/kl", float(seq_kl.sum()), float(S), shared=True)
                # the controller moves by the number of samples in the rollout (Ziegler et al. 1909.08593, TRL,
                # OpenRLHF), with its mean KL per completion: every process holds the whole rollout, so each
                # makes the same update from the global numbers
                total = torch.tensor([float(seq_kl.sum()), float(S)], dtype=torch.float64)
                self.kl.update(float(total[0] / total[1]), int(total[1]))

    def _score_passes(self, model, rows: list[Encoded], obj: Objective, policy_pass: bool, need_values: bool,
                      keys: list[str]) -> None:
        """Behaviour log-probs, old values and reference log-probs of every row, without gradient: process ``r``
        scores rows ``[r::world]`` and every process gets every row's.

        A sharded (FSDP2) forward is a collective, so every process makes the same number of model calls: one
        with fewer micro-batches scores a copy of a row for each missing one and throws the result away.
        """
        world, rank = dist.world(), dist.rank()
        mine = rows[rank::world]
        batches = micro_batches(mine, self.cfg.batch_size, False)
        most = math.ceil(math.ceil(len(rows) / world) / self.cfg.batch_size)  # process 0 holds the most rows
        batches += [[replace(rows[0], extra={})] for _ in range(most - len(batches))]
        was_training = model.training
        model.eval()
        for mb in batches:
            with autocast(self.cfg.precision, model_device(policy_of(model))):
                if policy_pass:
                    fw = strategy.call(model, forward, model, mb, self.pad_id, self.cfg.logits_chunk,
                                       values=need_values, temperature=self.cfg.temperature)
                    _split(mb, "old", fw.logp_N)
                    if need_values:
                        _split(mb, "old_values", fw.values_N)
                if obj.uses_kl:
                    _split(mb, "ref", self._reference_logps(model, mb))
        model.train(was_training)
        if world == 1:
            return
        parts = dist.all_gather_object([{k: r.extra[k] for k in keys} for r in mine])  # kept on the CPU (_split)
        for p, part in enumerate(parts):
            for j, values in enumerate(part):
                rows[p + j * world].extra.update(values)

    def _reference_logps(self, model, rows: list[Encoded]) -> torch.Tensor:
        policy = policy_of(model)
        if self.reference == "adapters":
            ctx = policy.disable_adapter()
            net = policy
        else:
            ctx, net = contextlib.nullcontext(), self.reference
        with ctx:  # the policy with adapters off runs under the training model's sharding, a frozen model its own
            return strategy.call(model if net is policy else net, self._logps, net, rows)

    def _logps(self, net, rows: list[Encoded]) -> torch.Tensor:
        batch = on_model(collate_shared(rows, self.pad_id), net)
        h = hidden_states(net, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        return project_logps(net, h.reshape(-1, h.shape[-1])[batch["source"]], batch["target"],
                             chunk=self.cfg.logits_chunk, temperature=self.cfg.temperature)


def _split(rows: list[Encoded], key: str, flat_N: torch.Tensor) -> None:
    """Store a flat per-token tensor of a micro-batch back on its rows (in ``collate_shared``'s order), on the CPU
    with the rows' other values, whatever device computed it."""
    flat_N = flat_N.detach().float().cpu()
    k = 0
    for r in rows:
        n = sum(len(x) for x in r.responses)
        r.extra[key] = flat_N[k : k + n].clone()
        k += n


# ------------------------------------------------------------------------------------------------ the task


class PolicyTask:
    """The policy-gradient :class:`~alignkit.train.loop.Task` over rollout rows (module docstring).

    Every micro-batch also measures the sampler/trainer mismatch (``alignkit.losses.off_policy.mismatch_metrics``)
    where the trainer's behaviour log-probs meet the sampler's: the stored ``old`` ones, or on the first pass
    after a rollout the forward pass's own. :meth:`end_step` sounds the alarm on the step's reduced record: a
    warning when ``mismatch/max_abs`` exceeds ``mismatch_alarm`` (0: never), and with ``mismatch_strict`` a
    :class:`~alignkit.errors.MismatchAlarm` that stops the run (exit 1).
    """

    def __init__(self, obj: Objective, kl: KLController, pad_id: int, chunk: int, *, vf_coef: float = 0.0,
                 value_clip: float = 0.2, temperature: float = 1.0, mismatch_threshold: float = 0.2,
                 mismatch_alarm: float = 0.0, mismatch_strict: bool = False):
        self.obj, self.kl, self.pad_id, self.chunk, self.temperature = obj, kl, pad_id, chunk, temperature
        self.vf_coef, self.value_clip = vf_coef, value_clip
        self.mismatch_threshold, self.mismatch_alarm, self.mismatch_strict = (mismatch_threshold, mismatch_alarm,
                                                                              mismatch_strict)
        self.counts = get_aggregation(obj.aggregation).counts

    def weight(self, row: Encoded) -> float:
        valid = row.extra["valid"]
        if self.counts == "tokens":
            return float(valid.sum())
        k, n = 0, 0
        for x in row.responses:
            n += bool(valid[k : k + len(x)].any())
            k += len(x)
        return float(n)

    def loss(self, model, rows: list[Encoded], normaliser: float):
        obj = replace(self.obj, kl_coef=self.kl.beta)
        critic = obj.needs_value_model
        fw = forward(model, rows, self.pad_id, self.chunk, values=critic, temperature=self.temperature)
        dev = fw.logp_N.device  # the rows' values rest on the CPU; the loss is computed where the model computes
        cat = lambda key: torch.cat([r.extra[key] for r in rows]).to(dev)  # noqa: E731
        mask = fw.bt(cat("valid").float())
        logp = fw.bt(fw.logp_N)
        old = logp.detach() if rows[0].extra.get("fresh") else fw.bt(cat("old"))
        ref = fw.bt(cat("ref")) if obj.uses_kl else None
        rollout = fw.bt(cat("rollout")) if "rollout" in rows[0].extra else None  # (a checkpoint from before has none)
        loss, metrics = policy_objective(obj, logp, old, fw.bt(cat("adv")), mask, step_normaliser=normaliser,
                                         ref_logp_BT=ref, rollout_logp_BT=rollout)
        if rollout is not None:
            metrics.update(mismatch_metrics(old, rollout, mask, threshold=self.mismatch_threshold))
        n_tok = float(mask.sum())
        # E_{y~pi}[-log pi(y)] is the entropy: the sampled tokens' NLL under the behaviour policy estimates it
        # without the full vocabulary
        behaviour = fw.bt(cat("old")) if "old" in rows[0].extra else logp.detach()
        metrics["entropy"] = (float(-(behaviour * mask).sum()), n_tok)
        if critic:
            vl = value_loss(fw.bt(fw.values_N), fw.bt(cat("old_values")), fw.bt(cat("returns")), mask, eps_v=self.value_clip)
            v = get_aggregation(obj.aggregation).fn(vl.losses, mask, step_normaliser=normaliser,
                                                    constant=obj.aggregation_constant)
            loss = loss + self.vf_coef * v
            metrics["value/loss"] = (float(vl.losses.detach().sum()), n_tok)
            metrics["value/clip_frac"] = (float(vl.metrics["vf_clip_frac"]) * n_tok, n_tok)
            metrics["value/mean"] = (float((fw.bt(fw.values_N).detach() * mask).sum()), n_tok)
        metrics["loss"] = (float(loss.detach()) * normaliser, float(len(rows)))
        return loss, metrics

    def end_step(self, step: int, record: dict) -> None:
        """The mismatch alarm, once per optimizer step on its reduced metrics (the same on every process)."""
        worst = record.get("mismatch/max_abs", float("nan"))
        if not (self.mismatch_alarm > 0 and worst > self.mismatch_alarm):
            return
        what = (f"step {step}: the rollout engine's log-probs differ from the trainer's by up to {worst:.3g} "
                f"(mismatch/max_abs > mismatch_alarm={self.mismatch_alarm:g}; mean |delta log p| "
                f"{record.get('mismatch/abs', float('nan')):.3g}, {100 * record.get('mismatch/frac_over', 0):.1f}% "
                f"of tokens over mismatch_threshold={self.mismatch_threshold:g}): stale engine weights (a weight "
                f"sync that did not happen) or a precision gap")
        if self.mismatch_strict:
            raise MismatchAlarm(f"{what}; the run stopped (mismatch_strict=true) without writing a final model")
        if dist.rank() == 0:
            log.warning("%s; an off-policy correction (correction=tis, ...) or mismatch_strict=true can act on it",
                        what)
