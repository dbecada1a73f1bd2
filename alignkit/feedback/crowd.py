"""A simulated crowd for the feedback loop: annotators whose votes come from a hidden utility.

Each honest annotator prefers response a over b with the Bradley-Terry probability
``sigmoid((u(a) - u(b)) / temperature)`` of a hidden utility ``u`` (any reward function alignkit knows: a
registry name, ``module:function`` or ``file.py:function``, with weights), so ``temperature`` is the noise; equal
utilities give a tie. An adversarial annotator reports the opposite of the vote it drew. Votes go through the
store's own :meth:`~alignkit.feedback.store.SQLiteStore.next_task` and
:meth:`~alignkit.feedback.store.SQLiteStore.submit`, the same path as the app's, so overlap, leases and gold items
apply to them as to people.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

from alignkit.feedback.store import SQLiteStore

Utility = Callable[[Sequence, Sequence[str]], list[float]]


def utility_from_spec(spec: str, weights: str = "", max_new_tokens: int = 256) -> Utility:
    """The hidden utility: the weighted sum of reward functions (``spec`` as ``rewards=`` takes it); a response
    a function does not score counts 0 for it. Columns a function needs (``answer``) come from the prompt row,
    which :class:`SimulatedCrowd` passes as ``columns``."""
    from alignkit.rl.rewards import RewardContext, build_reward_set

    rewards = build_reward_set(spec, weights, RewardContext(max_new_tokens=max_new_tokens, timeout=0))

    def utility(prompts: Sequence, texts: Sequence[str], columns: dict | None = None) -> list[float]:
        scores = rewards(list(prompts), list(texts), columns or {})
        return [0.0 if v is None else float(v) for v in scores.total]

    return utility


def prefer(u_a: float, u_b: float, temperature: float, rng: random.Random) -> str:
    """An honest annotator's vote: ``a`` with probability ``sigmoid((u_a - u_b) / temperature)``, a tie when the
    utilities are equal."""
    if u_a == u_b:
        return "tie"
    z = (u_a - u_b) / temperature
    p = 1 / (1 + math.exp(-z)) if z > -700 else 0.0
    return "a" if rng.random() < p else "b"


class SimulatedCrowd:
    """``n`` annotators (``prefix-0`` ...), of whom ``round(adversarial * n)`` vote against their draw."""

    def __init__(self, store: SQLiteStore, project: str, utility: Utility, *, n: int = 8, adversarial: float = 0.0,
                 temperature: float = 1.0, seed: int = 0, prefix: str = "crowd"):
        self.store, self.project, self.utility, self.temperature = store, project, utility, temperature
        self.rng = random.Random(seed)
        known = {a["name"]: a["id"] for a in store.annotators()}
        self.members: list[tuple[int, str, bool]] = []
        n_bad = round(adversarial * n)
        for i in range(n):
            name = f"{prefix}-{i}"
            if name not in known:
                store.add_annotator(name)
                known = {a["name"]: a["id"] for a in store.annotators()}
            self.members.append((known[name], name, i < n_bad))
        self._items: dict[int, dict] = {}

    @property
    def adversaries(self) -> list[str]:
        return [name for _, name, bad in self.members if bad]

    def _item(self, item_id: int) -> dict:
        if item_id not in self._items:
            self._items = {it["id"]: it for it in self.store.items(self.project)}
        return self._items[item_id]

    def utilities(self, item_id: int) -> list[float]:
        """The hidden utility of each of the item's responses (columns such as ``answer`` from ``meta.columns``)."""
        item = self._item(item_id)
        if "_u" not in item:
            texts = [r["text"] for r in item["responses"]]
            cols = {k: [v] * len(texts) for k, v in item["meta"].get("columns", {}).items()}
            item["_u"] = self.utility([item["prompt"]] * len(texts), texts, cols)
        return item["_u"]

    def vote(self, task: dict, adversarial: bool) -> str:
        """The vote on a task as shown (``a`` = the first response shown)."""
        item = self._item(task["item"])
        u = dict(zip((r["text"] for r in item["responses"]), self.utilities(task["item"])))
        choice = prefer(u[task["responses"][0]], u[task["responses"][1]], self.temperature, self.rng)
        if adversarial and choice != "tie":
            choice = "b" if choice == "a" else "a"
        return choice

    def collect(self, max_votes: int | None = None) -> int:
        """Annotators take turns (in a random order each pass) answering tasks until ``max_votes`` votes are cast
        or none of them has anything left; returns the votes cast."""
        cast = 0
        while max_votes is None or cast < max_votes:
            turn = self.rng.sample(self.members, len(self.members))
            progressed = False
            for aid, _, bad in turn:
                if max_votes is not None and cast >= max_votes:
                    break
                task = self.store.next_task(aid, self.project)
                if task is None:
                    continue
                self.store.submit(aid, task["lease"], {"choice": self.vote(task, bad)})
                cast, progressed = cast + 1, True
            if not progressed:
                break
        return cast
