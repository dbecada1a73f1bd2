"""Reward models: a causal-LM trunk plus a linear head per aspect, read at the last real token.

The network is a transformers ``*ForSequenceClassification`` model (``num_labels`` = number of aspects, its
``score`` layer is the head), so a saved reward model loads in transformers as
``AutoModelForSequenceClassification``. alignkit pools with the attention mask (the last position whose mask is
1), which is right under left and right padding alike and does not depend on a pad token id; transformers
finds the last token through ``pad_token_id``, which agrees whenever the pad token is not also the response's
last token (the saved config sets ``pad_token_id`` to the tokenizer's).

A saved reward model is a directory with the transformers files plus ``alignkit_rm.json``: the aspect names,
their weights when used as one reward, the reward mean and standard deviation on the training set (for
normalisation), and for process reward models the step separator and aggregation.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from alignkit.data.collate import pad
from alignkit.data.tokenize import render, render_steps
from alignkit.errors import ConfigError, UserError
from alignkit.models.loading import LoraSettings, resolve_model, load_tokenizer, tiny_model, tiny_tokenizer
from torch import Tensor

from alignkit.models.device import model_device, to_device
from alignkit.models.logprobs import autocast, hidden_states, unwrap
from alignkit.train import dist, strategy

META = "alignkit_rm.json"
STEP_AGGREGATIONS = ("min", "prod")


@dataclass
class RewardMeta:
    aspects: list[str] = field(default_factory=lambda: ["reward"])
    weights: list[float] = field(default_factory=lambda: [1.0])
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    process: bool = False
    step_separator: str = "\n"
    aggregate: str = "min"


def load_reward_backbone(name: str, n_heads: int, *, lora: LoraSettings | None = None, seed: int = 0):
    """A sequence-classification model with ``n_heads`` outputs on the trunk of the causal LM ``name``.

    The heads start from small random weights (seeded); the trunk's weights are the language model's. ``name``
    may be a reward model alignkit saved (its directory, with ``alignkit_rm.json``): then the heads keep their
    trained weights too (a warm start, as the feedback loop retrains each round's reward model).
    """
    from transformers import AutoModelForSequenceClassification

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if name == "tiny":
            from transformers import LlamaForSequenceClassification

            lm = tiny_model(seed=seed)
            lm.config.num_labels = n_heads
            model = LlamaForSequenceClassification(lm.config)
            model.model.load_state_dict(lm.model.state_dict())
            tok = tiny_tokenizer()
        else:
            try:
                model = AutoModelForSequenceClassification.from_pretrained(resolve_model(name), num_labels=n_heads, dtype=torch.float32)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot load model '{name}' as a reward model: {e}") from None
            tok = load_tokenizer(name)
        if not (name != "tiny" and (Path(str(resolve_model(name))) / META).is_file()):  # a trained RM: warm start
            torch.nn.init.normal_(model.score.weight, std=1.0 / (model.config.hidden_size + 1) ** 0.5)
    model.config.pad_token_id = tok.pad_token_id
    model.config.use_cache = False
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=lora.target_modules, task_type="SEQ_CLS"))
    return model, tok


def last_token_index(attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """Index ``[B]`` of the last position whose mask is 1: right for left padding, right padding, or none."""
    T = attention_mask_BT.shape[1]
    return (attention_mask_BT.long() * torch.arange(1, T + 1, device=attention_mask_BT.device)).argmax(-1)


def head(model):
    return unwrap(model).score


def sequence_rewards(model, input_ids_BT, attention_mask_BT) -> torch.Tensor:
    """Rewards ``[B, K]`` read at each sequence's last real token."""
    h_BTD = hidden_states(model, input_ids_BT, attention_mask_BT)
    idx_B = last_token_index(attention_mask_BT)
    pooled_BD = h_BTD[torch.arange(h_BTD.shape[0], device=h_BTD.device), idx_B]
    return head(model)(pooled_BD).float()


def shared_rewards(model, batch: dict) -> torch.Tensor:
    """Rewards ``[S, K]`` at the last token of every response of a ``collate_shared`` batch (row-major)."""
    h_BTD = hidden_states(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    return head(model)(h_BTD.reshape(-1, h_BTD.shape[-1])[batch["ends"]]).float()


def position_rewards(model, input_ids_BT, attention_mask_BT, positions: list[list[int]]) -> list[torch.Tensor]:
    """Head outputs ``[n_b, K]`` at the given positions of each row (process reward models: step ends)."""
    h_BTD = hidden_states(model, input_ids_BT, attention_mask_BT)
    rows_N = torch.tensor([b for b, pos in enumerate(positions) for _ in pos], dtype=torch.long, device=h_BTD.device)
    cols_N = torch.tensor([p for pos in positions for p in pos], dtype=torch.long, device=h_BTD.device)
    out = head(model)(h_BTD[rows_N, cols_N]).float()
    return list(out.split([len(p) for p in positions]))


class RewardScorer:
    """Score responses with a trained reward model: ``score(prompts, responses) -> rewards``.

    Requests are sorted by length and batched, so similar lengths share a batch and padding stays small. Each
    batch goes to the model's device; the rewards come back on the CPU.
    """

    def __init__(self, model, tokenizer, meta: RewardMeta, *, precision: str = "fp32", batch_size: int = 16):
        self.model, self.tok, self.meta = model.eval(), tokenizer, meta
        self.precision, self.batch_size = precision, batch_size

    @classmethod
    def load(cls, path: str | Path, *, device: torch.device | str | None = None, **kwargs) -> "RewardScorer":
        """The reward model saved in ``path``, on ``device`` (the CPU when None)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if not (path / META).is_file():
            raise UserError(f"{path} is not an alignkit reward model (no {META})")
        meta = RewardMeta(**json.loads((path / META).read_text()))
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        if device is not None:
            model.to(device)
        return cls(model, AutoTokenizer.from_pretrained(path), meta, **kwargs)

    def _batched(self, seqs: list[list[int]], fn) -> list:
        """``fn(batch, idx)`` over the sequences in batches of similar length; the values in the input order.

        A model sharded with FSDP2 over several processes (``rewards=rm:PATH`` under ``strategy=fsdp2``) runs
        each pass as a collective: the processes first agree on the largest number of batches any of them has,
        and one with fewer makes up the difference with passes over a one-token filler (results dropped)."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out: list = [None] * len(seqs)
        dev = model_device(self.model)
        starts = list(range(0, len(order), self.batch_size))
        passes = len(starts)
        if dist.world() > 1 and strategy.is_sharded(self.model):  # agreed before the first pass
            passes = int(dist.all_reduce_max(torch.tensor([passes], dtype=torch.int64)).item())
        with torch.no_grad(), autocast(self.precision, dev):
            for start in starts:
                idx = order[start : start + self.batch_size]
                batch = to_device(pad([(seqs[i], [True] * len(seqs[i])) for i in idx], self.tok.pad_token_id), dev)
                for i, value in zip(idx, strategy.call(self.model, fn, batch, idx)):
                    out[i] = value
            for _ in range(passes - len(starts)):
                filler = to_device(pad([([self.tok.pad_token_id], [True])], self.tok.pad_token_id), dev)
                strategy.call(self.model, sequence_rewards, self.model, filler["input_ids"], filler["attention_mask"])
        return out

    def score_aspects(self, prompts: list, responses: list) -> torch.Tensor:
        """Raw head outputs ``[N, K]``, one column per aspect."""
        seqs = [sum(render(self.tok, p, r), []) for p, r in zip(prompts, responses)]
        rows = self._batched(seqs, lambda b, _: sequence_rewards(self.model, b["input_ids"], b["attention_mask"]).cpu())
        return torch.stack(rows) if rows else torch.empty(0, len(self.meta.weights))

    def score(self, prompts: list, responses: list, *, normalize: bool = True) -> torch.Tensor:
        """One reward ``[N]`` per response: the aspects (normalised by the training mean and std) weighted."""
        r_NK = self.score_aspects(prompts, responses)
        if normalize:
            r_NK = (r_NK - torch.tensor(self.meta.mean)) / torch.tensor(self.meta.std)
        return r_NK @ torch.tensor(self.meta.weights, dtype=r_NK.dtype)

    def score_steps(self, prompts: list[str], steps: list[list[str]]) -> list[tuple[list[float], float]]:
        """Process reward model: per-step probabilities of being correct, and their aggregate (min or prod)."""
        encoded = [render_steps(self.tok, p, s, self.meta.step_separator) for p, s in zip(prompts, steps)]
        seqs = [p + r for p, r, _ in encoded]
        starts = [len(p) for p, _, _ in encoded]

        def fn(batch, idx):
            pos = [[starts[i] + q for q in encoded[i][2]] for i in idx]
            return [torch.sigmoid(v[:, 0]).tolist() for v in position_rewards(self.model, batch["input_ids"], batch["attention_mask"], pos)]

        probs = self._batched(seqs, fn)
        return [(p, aggregate_steps(p, self.meta.aggregate)) for p in probs]


def aggregate_steps(step_probs: list[float] | Tensor, how: str = "min") -> float:
    """One score for a solution from its steps' probabilities of being correct (PRM ``sigma(z)`` per step).

    ``"min"``: the weakest step (Wang et al. 2023, Math-Shepherd, arXiv:2312.08935); ``"prod"``: the
    probability that every step is correct, as Lightman et al. (arXiv:2305.20050) rank solutions.
    Example: ``(0.9, 0.5, 0.8)`` gives ``min = 0.5``, ``prod = 0.36``.
    """
    if how not in STEP_AGGREGATIONS:
        raise ConfigError(f"unknown step aggregation {how!r}; expected one of {', '.join(STEP_AGGREGATIONS)}")
    probs = step_probs.detach().flatten().tolist() if isinstance(step_probs, Tensor) else list(step_probs)
    if not probs:
        raise ValueError("aggregate_steps needs at least one step")
    return float(min(probs)) if how == "min" else float(math.prod(probs))


def save_meta(path: Path, meta: RewardMeta) -> None:
    (Path(path) / META).write_text(json.dumps(asdict(meta), indent=2))
