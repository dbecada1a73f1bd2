"""Which prompts an online-RL step trains on: DAPO dynamic sampling, a pass-rate curriculum, a prompt sampler.

- :class:`DynamicSampler` (Yu et al., DAPO, 2503.14476): a group whose G rewards are all equal has
  advantage 0 under every group baseline (GRPO, RLOO, Dr. GRPO), so it adds no gradient but still
  dilutes the batch; keep drawing groups until the batch holds ``target`` groups with some variance.
- :class:`Curriculum` (Kimi k1.5, 2501.12599): estimate each prompt's pass rate from the rollouts it got;
  drop prompts always solved or never solved (they would give zero-variance groups); sample hard
  prompts more often.
- :class:`PromptSampler`: draws prompt indices, deterministically given its seed, the step, the
  round of dynamic sampling and its state, so a resumed run draws the same prompts.

Typical step::

    def draw(k):
        nonlocal round
        idx = sampler.draw(k, step, round); round += 1
        groups = rollout_and_score(idx)          # objects with .rewards (list of floats)
        for i, g in zip(idx, groups):
            curriculum.update(i, g.rewards)      # every drawn group, kept or dropped
        return groups

    groups, stats = dynamic.fill(draw, target=batch_prompts)
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from alignkit.errors import ConfigError

__all__ = ["Curriculum", "DynamicSampler", "PromptSampler", "zero_variance"]

log = logging.getLogger(__name__)

VARIANCE_TOL = 1e-8  # rewards closer than this count as equal


def zero_variance(rewards_BG: Tensor) -> Tensor:
    """``[B]`` bool: whether all G rewards of each group are equal, i.e. ``max - min <= 1e-8``.

    Golden: ``[[1, 1, 1], [1, 0, 1], [0.5, 0.5 + 1e-9, 0.5]]`` -> ``[True, False, True]``.
    """
    if rewards_BG.dim() != 2:
        raise ValueError(f"group rewards must be [B, G], got shape {tuple(rewards_BG.shape)}")
    if rewards_BG.shape[1] == 0:
        return torch.ones(rewards_BG.shape[0], dtype=torch.bool, device=rewards_BG.device)
    spread = rewards_BG.amax(dim=1) - rewards_BG.amin(dim=1)
    return spread <= VARIANCE_TOL


def _has_variance(rewards: Sequence[float]) -> bool:
    """Same rule as :func:`zero_variance`, for one group given as a list (groups may differ in size)."""
    values = [float(r) for r in rewards]
    return bool(values) and max(values) - min(values) > VARIANCE_TOL


class DynamicSampler:
    """DAPO dynamic sampling (Yu et al. 2503.14476): keep only groups whose rewards are not all equal
    (with a 0/1 correctness reward: drop prompts whose G completions all pass or all fail).

    :meth:`fill` calls ``draw(k)`` for the number of groups still missing, at most ``max_rounds`` times.
    """

    def __init__(self, max_rounds: int = 3):
        if max_rounds < 1:
            raise ConfigError(f"dynamic sampling needs max_rounds >= 1, got {max_rounds}")
        self.max_rounds = max_rounds

    def fill(self, draw: Callable[[int], Sequence[Any]], target: int) -> tuple[list, dict[str, int]]:
        """``(groups, stats)``: up to ``target`` groups, none of zero variance, in the order drawn.

        ``draw(k)`` returns about k new groups, each exposing ``.rewards`` (floats; the caller removed or
        filled ``None``). Groups beyond ``target`` (when ``draw`` returns more than asked) are discarded.
        ``stats``: ``rounds`` (calls to draw), ``drawn`` (groups returned by draw), ``kept`` (groups
        returned here), ``dropped`` (zero-variance groups). Short of ``target`` after ``max_rounds``,
        it logs one warning and returns what it has, possibly nothing (the trainer then skips the step).
        """
        kept: list = []
        stats = {"rounds": 0, "drawn": 0, "kept": 0, "dropped": 0}
        while len(kept) < target and stats["rounds"] < self.max_rounds:
            groups = list(draw(target - len(kept)))
            stats["rounds"] += 1
            stats["drawn"] += len(groups)
            for g in groups:
                if _has_variance(g.rewards):
                    kept.append(g)
                else:
                    stats["dropped"] += 1
        kept = kept[: max(target, 0)]
        stats["kept"] = len(kept)
        if len(kept) < target:
            log.warning(
                "dynamic sampling: only %d of %d groups have rewards that differ after %d rounds "
                "(%d groups drawn, %d had the same reward for every completion)%s. Raise max_sampling_rounds, "
                "set curriculum=true (drops prompts always or never solved), or use data nearer the "
                "model's level.",
                len(kept), target, stats["rounds"], stats["drawn"], stats["dropped"],
                "; this step trains on fewer groups" if kept else "; this step is skipped",
            )
        return kept, stats


class Curriculum:
    """Per-prompt pass rates (Kimi k1.5, 2501.12599): drop prompts always or never solved, favour hard ones.

    A completion passes when its reward ``>= success_threshold``. After ``min_attempts`` attempts a
    prompt with every attempt passed is dropped (``drop_solved``) and one with none passed is dropped
    (``drop_unsolved``). Sampling weights (:meth:`weights`):

        ``w_i = 0`` if dropped, else ``1 + hard_boost * (1 - pass_rate_i)``, unseen prompts ``1 + hard_boost``.

    Example, ``hard_boost=1``: pass rate 0.25 -> 1.75, 0.75 -> 1.25, unseen -> 2.

    Counts are kept over the whole run (a pass rate is all passes over all attempts). If every prompt
    ends up dropped, the counts are reset with a warning, so each prompt is re-measured under the current
    policy instead of the run stalling (``resets`` counts these).
    """

    def __init__(self, n_prompts: int, *, min_attempts: int = 4, success_threshold: float = 1.0,
                 drop_solved: bool = True, drop_unsolved: bool = True, hard_boost: float = 1.0):
        if n_prompts < 1:
            raise ConfigError(f"the curriculum needs at least one prompt, got {n_prompts}")
        if min_attempts < 1:
            raise ConfigError(f"curriculum min_attempts must be >= 1, got {min_attempts}")
        if hard_boost < 0:
            raise ConfigError(f"curriculum hard_boost must be >= 0, got {hard_boost}")
        self.n_prompts = n_prompts
        self.min_attempts = min_attempts
        self.success_threshold = success_threshold
        self.drop_solved, self.drop_unsolved = drop_solved, drop_unsolved
        self.hard_boost = hard_boost
        self.attempts = torch.zeros(n_prompts, dtype=torch.long)
        self.passes = torch.zeros(n_prompts, dtype=torch.long)
        self.resets = 0

    def update(self, prompt_index: int, rewards: Sequence[float | None]) -> None:
        """Count the rollouts of one prompt (``None`` rewards are skipped)."""
        values = [float(r) for r in rewards if r is not None]
        self.attempts[prompt_index] += len(values)
        self.passes[prompt_index] += sum(1 for r in values if r >= self.success_threshold)
        self._revive_if_all_dropped()

    def pass_rate(self, i: int) -> float | None:
        """Passes over attempts of prompt ``i``; None before its first attempt."""
        a = int(self.attempts[i])
        return None if a == 0 else int(self.passes[i]) / a

    def _dropped(self) -> tuple[Tensor, Tensor]:
        judged = self.attempts >= self.min_attempts
        solved = judged & (self.passes == self.attempts) if self.drop_solved else torch.zeros_like(judged)
        unsolved = judged & (self.passes == 0) if self.drop_unsolved else torch.zeros_like(judged)
        return solved, unsolved

    def _revive_if_all_dropped(self) -> None:
        solved, unsolved = self._dropped()
        if bool((solved | unsolved).all()):
            log.warning(
                "curriculum: all %d prompts are dropped (%d always solved, %d never solved after %d attempts); "
                "resetting their counts so they are measured again under the current policy",
                self.n_prompts, int(solved.sum()), int(unsolved.sum()), self.min_attempts,
            )
            self.attempts.zero_()
            self.passes.zero_()
            self.resets += 1

    def weights(self) -> Tensor:
        """``[n_prompts]`` float64 sampling weights (see the class docstring); never all zero."""
        self._revive_if_all_dropped()
        seen = self.attempts > 0
        rate = torch.where(seen, self.passes.double() / self.attempts.clamp_min(1).double(), torch.zeros(()).double())
        w = 1.0 + self.hard_boost * (1.0 - rate)
        solved, unsolved = self._dropped()
        return torch.where(solved | unsolved, torch.zeros_like(w), w)

    def metrics(self) -> dict[str, float]:
        """``curriculum/active``, ``/dropped_solved``, ``/dropped_unsolved``, ``/seen``, ``/resets`` and
        ``/mean_pass_rate`` (over prompts attempted at least once; NaN before any)."""
        solved, unsolved = self._dropped()
        seen = self.attempts > 0
        rates = self.passes[seen].double() / self.attempts[seen].double()
        return {
            "curriculum/active": float((~(solved | unsolved)).sum()),
            "curriculum/dropped_solved": float(solved.sum()),
            "curriculum/dropped_unsolved": float(unsolved.sum()),
            "curriculum/seen": float(seen.sum()),
            "curriculum/resets": float(self.resets),
            "curriculum/mean_pass_rate": float(rates.mean()) if len(rates) else float("nan"),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"n_prompts": self.n_prompts, "attempts": self.attempts.tolist(), "passes": self.passes.tolist(),
                "resets": self.resets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["n_prompts"] != self.n_prompts:
            raise ConfigError(
                f"curriculum state is for {state['n_prompts']} prompts but the data has {self.n_prompts}; "
                "resume with the same prompt set"
            )
        self.attempts = torch.tensor(state["attempts"], dtype=torch.long)
        self.passes = torch.tensor(state["passes"], dtype=torch.long)
        self.resets = int(state["resets"])


def _generator(seed: int, step: int, round: int) -> torch.Generator:
    """A generator seeded by a stable hash of ``(seed, step, round)``: no collisions such as
    ``(step, round) = (1, 0)`` vs ``(0, 1000)`` that a linear formula would have."""
    digest = hashlib.blake2b(f"{seed}:{step}:{round}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


class PromptSampler:
    """Prompt indices for each draw of a run.

    Without a curriculum it walks seeded per-epoch permutations, as ``alignkit.train.loop.Schedule``
    does (epoch e is ``randperm(n)`` seeded ``seed + e``); a position counter, part of
    :meth:`state_dict`, says where the next draw starts. Consecutive draws do not repeat a prompt within
    an epoch (a draw crossing an epoch boundary may hold a prompt twice, as may one asking for more than n).

    With a curriculum it samples k prompts without replacement with probability proportional to
    :meth:`Curriculum.weights` from a generator seeded by ``(seed, step, round)``; asked for more than
    the active prompts, it takes them all and starts another pass without replacement.

    Either way the draw is a function of ``(seed, step, round)`` and the state (position / curriculum
    counts), so a run resumed from :meth:`state_dict` draws the same prompts.
    """

    def __init__(self, n_prompts: int, seed: int, curriculum: Curriculum | None = None):
        if n_prompts < 1:
            raise ConfigError(f"need at least one prompt, got {n_prompts}")
        if curriculum is not None and curriculum.n_prompts != n_prompts:
            raise ConfigError(f"curriculum covers {curriculum.n_prompts} prompts, the sampler {n_prompts}")
        self.n_prompts, self.seed, self.curriculum = n_prompts, seed, curriculum
        self.position = 0  # prompts drawn so far by the epoch walk

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n_prompts, generator=g).tolist()

    def draw(self, k: int, step: int, round: int = 0) -> list[int]:
        """``k`` prompt indices for round ``round`` of dynamic sampling at optimizer step ``step``."""
        if k <= 0:
            return []
        if self.curriculum is None:
            out: list[int] = []
            while len(out) < k:
                epoch, offset = divmod(self.position, self.n_prompts)
                take = min(k - len(out), self.n_prompts - offset)
                out += self._perm(epoch)[offset : offset + take]
                self.position += take
            return out
        w = self.curriculum.weights().float()
        g = _generator(self.seed, step, round)
        n_active = int((w > 0).sum())
        out = []
        while len(out) < k:
            take = min(k - len(out), n_active)
            out += torch.multinomial(w, take, replacement=False, generator=g).tolist()
        return out

    @property
    def epoch(self) -> float:
        """Epochs walked so far (fractional; without a curriculum)."""
        return self.position / self.n_prompts

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "seed": self.seed, "n_prompts": self.n_prompts,
                "curriculum": None if self.curriculum is None else self.curriculum.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["n_prompts"] != self.n_prompts:
            raise ConfigError(f"sampler state is for {state['n_prompts']} prompts but the data has {self.n_prompts}")
        self.position = int(state["position"])
        if self.curriculum is not None and state.get("curriculum") is not None:
            self.curriculum.load_state_dict(state["curriculum"])
