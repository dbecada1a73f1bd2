"""Rollout engines: sample ``n`` completions for each prompt, with the sampler's log-probs, for online RL.

:class:`LocalEngine` runs any transformers causal LM (plain or peft-wrapped) in process, with its own decoding
loop instead of ``model.generate``:

- the prompts of a batch are left-padded (``attention_mask`` 0 on the padding, ``position_ids`` counting only
  real tokens) and prefilled **once** into a ``DynamicCache``; the cache rows are then repeated for the ``n``
  samples of each prompt, and the first token of every sample is drawn from the shared last-position logits;
- each decoding step feeds one token per still-active row; rows that finish (EOS, stop string, token limit)
  are selected out of the cache, so late steps do not pay for finished rows;
- more than ``max_batch`` rows (``prompts x n``) are batched continuously on the lean path (a waiting prompt,
  shortest first, takes the slots of finished rows while the others go on) and in chunks of whole prompts on
  transformers' path.

Sampling at temperature ``T > 0``: ``p = softmax(logits / T)``, truncated to the ``top_k`` most likely tokens,
then to the nucleus (the smallest set of most likely tokens whose renormalized mass is ``>= top_p``, never
empty), renormalized, and sampled by inverse CDF from one uniform a row and step. ``T = 0`` is greedy (argmax).

Where the uniforms come from: by default one ``torch.Generator`` seeded with ``SamplingParams.seed`` serves the
whole call, so a row's tokens depend on the rows that share its batches. With ``seeds`` (one int per prompt),
sample ``j`` of prompt ``i`` has a generator of its own, seeded with :func:`row_seed` ``(seeds[i], j)``: its
uniforms are then a function of its seed alone, whatever the batching, the chunking or the other prompts of the
call. That is what lets several processes split a rollout and still sample what one process would. Its logits
can still differ by rounding with its company: a prompt decoded alone runs without padding, and bf16 kernels
round differently then, which over a long completion often moves a token. With ``max_batch = n`` every
prompt's samples are decoded on their own and a row's tokens are the same in any call (``bench/row_seeds.py``).

The log-prob reported for a token is ``log_softmax(logits / T)[token]`` — the tempered distribution **before**
top-k/top-p truncation (``T = 1`` for greedy). At ``T = 1`` it is what the trainer recomputes with
:func:`alignkit.models.logprobs.token_logps`, up to numerics. It is not the probability of the truncated
sampler, which is ``0`` outside the kept set and larger inside it.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import DynamicCache

from alignkit.models.logprobs import unwrap
from alignkit.models.prepacked import prepack_linears
from alignkit.rl.decode import FastDecoder, fast_decoder, fuse_projections, head_logits, supports_fast_decode
from alignkit.rl.thinking import Thinking, split_completion
from alignkit.train import strategy
from alignkit.weights import WeightVersionError

STOP_MARGIN = 8  # extra tail tokens decoded for the stop check (tokens that decode to no text, split UTF-8)


@dataclass
class SamplingParams:
    """How completions are sampled; see the module docstring for the exact distribution."""

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()  # stop strings
    seed: int | None = None  # seeds a torch.Generator: same seed + same weights (+ same call) -> same samples
    # thinking (alignkit.rl.thinking): True opens a thinking block, False feeds an empty one, None: the model decides
    thinking: bool | None = None
    max_thinking_tokens: int | None = None  # the thinking block's budget in tokens (tags and forced tokens included)
    min_thinking_tokens: int = 0  # s1: an end of thinking before this many tokens becomes "Wait"
    budget_action: str = "force_end"  # at the budget: "force_end" (\n</think>\n\n) or "transition" (Qwen3's)


@dataclass
class Completion:
    """One sampled completion.

    ``token_ids`` include the EOS token if one ended the completion; after a stop string they end with the token
    that completed it. ``text`` is decoded without special tokens and cut just before the (first) stop string.
    ``logps[i]`` is ``log_softmax(logits / T)`` at ``token_ids[i]``: the tempered distribution before top-k/top-p
    truncation (``T = 1`` when greedy). ``finish_reason`` is ``"eos"``, ``"stop"`` or ``"length"``.

    Thinking (:mod:`alignkit.rl.thinking`): the first ``thinking_tokens`` tokens are the thinking block, the other
    ``answer_tokens`` the answer; ``reasoning`` is the block's text without its tags, ``answer`` the answer's text.
    ``forced[i]`` is True where the engine fed ``token_ids[i]`` instead of sampling it (its log-prob is still
    ``logps[i]``). An engine that does not fill them leaves no thinking and every token sampled.
    """

    token_ids: list[int]
    text: str
    logps: list[float]
    finish_reason: str
    weight_version: int = 0  # the version of the weights that sampled it (RolloutEngine.version)
    forced: list[bool] = field(default_factory=list)
    thinking_tokens: int = 0
    answer_tokens: int | None = None  # None: len(token_ids) - thinking_tokens
    reasoning: str = ""
    answer: str | None = None  # None: text

    def __post_init__(self):
        if not self.forced:
            self.forced = [False] * len(self.token_ids)
        if self.answer_tokens is None:
            self.answer_tokens = len(self.token_ids) - self.thinking_tokens
        if self.answer is None:
            self.answer = self.text


class StaleWeights(WeightVersionError):
    """An engine was asked to generate with another weight version than the one it holds."""


class EngineAsleep(RuntimeError):
    """An engine was asked to generate between ``sleep()`` and ``wake()``."""


class RolloutEngine(Protocol):
    """What online RL asks of a rollout engine (:class:`LocalEngine` here, :mod:`alignkit.rl.engines` for the
    others).

    ``logprob_semantics`` names what ``Completion.logps`` holds: ``"tempered_untruncated"`` is
    ``log_softmax(logits / T)`` at the token, before top-k/top-p truncation, as the trainer computes it.
    ``version`` is the weight version the engine holds: set by :meth:`update_weights`, stamped on every
    completion, and checked by :meth:`generate` when the caller says which version it expects.
    """

    logprob_semantics: str
    version: int

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams,
                 seeds: Sequence[int] | None = None, version: int | None = None) -> list[list[Completion]]:
        """``n`` completions of each prompt (token ids), as ``[len(prompts)][n]`` in sample order; with ``seeds``
        (one per prompt) each sample's draws depend only on its prompt's seed and its sample index. With
        ``version``, raises :class:`StaleWeights` unless the engine holds that weight version."""
        ...

    def update_weights(self, model, version: int | None = None) -> None:
        """Make later generations use ``model``'s current weights, as weight ``version`` (default: the next)."""
        ...

    def sleep(self) -> None:
        """Free what the engine holds besides the training model (its weight copy, caches) until :meth:`wake`."""
        ...

    def wake(self) -> None:
        """Restore what :meth:`sleep` freed, with the weights of the version held before."""
        ...

    def close(self) -> None:
        """Release everything (processes, actors, memory); the engine cannot be used afterwards."""
        ...


def check_version(engine, version: int | None) -> None:
    """Raise :class:`StaleWeights` when ``version`` is given and is not the engine's."""
    if version is not None and version != engine.version:
        raise StaleWeights(f"asked to generate with weights version {version}, but the engine holds version "
                           f"{engine.version}: a weight sync was missed")


def check_request(engine, prompts: Sequence[Sequence[int]], seeds: Sequence[int] | None, version: int | None) -> None:
    """What an engine checks before generating: awake, holding ``version`` (when given), a token in every prompt,
    one seed per prompt (when given)."""
    if engine.asleep:
        raise EngineAsleep("the rollout engine is asleep: call wake() before generate()")
    check_version(engine, version)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"seeds needs one int per prompt: {len(seeds)} seeds for {len(prompts)} prompts")


def completion_text(tokenizer, token_ids: list[int], reason: str, stops: Sequence[str]) -> str:
    """A completion's text: decoded without special tokens, cut before the first stop string when one ended it."""
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    if reason == "stop":
        cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
        if cuts:
            text = text[: min(cuts)]
    return text


def sample_next(logits_BV: torch.Tensor, sampling: SamplingParams, u_B: torch.Tensor | None):
    """Next tokens ``[B]`` and their log-probs ``[B]`` (untruncated tempered distribution) from ``logits_BV``.

    ``u_B``: one uniform in [0, 1) per row (float64, on the logits' device), which picks the row's token by
    :func:`inverse_cdf`; unused (None) when greedy (``temperature <= 0``).
    """
    logits_BV = logits_BV.float()
    if sampling.temperature <= 0:
        tokens_B = logits_BV.argmax(-1)
        logp_BV = logits_BV.log_softmax(-1)
    else:
        logp_BV = (logits_BV / sampling.temperature).log_softmax(-1)
        p_BV = logp_BV.exp()
        if 0 < sampling.top_k < p_BV.shape[-1] or sampling.top_p < 1.0:
            p_BV.masked_fill_(~_kept(logp_BV, sampling.top_k, sampling.top_p), 0.0)
        if u_B is None or u_B.shape != p_BV.shape[:1]:
            raise ValueError(f"sampling needs one uniform per row ({p_BV.shape[0]}), got "
                             f"{None if u_B is None else tuple(u_B.shape)}")
        tokens_B = inverse_cdf(p_BV, u_B)
    return tokens_B, logp_BV.gather(-1, tokens_B[:, None]).squeeze(-1)


def row_seed(seed: int, sample: int) -> int:
    """The generator seed of sample ``sample`` of a prompt seeded ``seed``: a hash, so no two (seed, sample)
    pairs share a stream as an arithmetic mix such as ``seed * n + sample`` would."""
    digest = hashlib.blake2b(f"{seed}/{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: any torch.Generator seed


class _Uniforms:
    """The uniforms of a chunk's rows, one per row and decode step.

    Shared: one generator for the whole call, ``rand(rows)`` at each step for the rows still active (what the
    engine always did). Per row: row ``r`` has its own generator, seeded by :func:`row_seed`, and draws its
    ``max_new_tokens`` uniforms up front, one per decode step; step ``t`` of row ``r`` uses the ``t``-th,
    whatever else is in the batch. Drawing them up front costs one generator call per row and chunk instead of
    one per row and step (``bench/row_seeds.py``).
    """

    def __init__(self, generator: torch.Generator | None, row_seeds: list[int] | None, steps: int, device):
        self.generator, self.device = generator, device
        self.table_RT = None
        if row_seeds is not None:
            rows = [torch.rand(steps, dtype=torch.float64, device=device,
                               generator=torch.Generator(device=device).manual_seed(s)) for s in row_seeds]
            self.table_RT = torch.stack(rows) if rows else torch.empty(0, steps, dtype=torch.float64, device=device)

    def draw(self, rows_A: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
        """Uniforms ``[A]`` for the active rows ``rows_A`` (indices into the chunk's rows) at ``step`` (one int, or
        ``[A]``: each row's own step)."""
        if self.table_RT is not None:
            return self.table_RT[rows_A, step]
        return torch.rand(rows_A.shape[0], dtype=torch.float64, generator=self.generator, device=self.device)


def inverse_cdf(p_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """Tokens ``[B]`` drawn from the (unnormalised, non-negative) weights ``p_BV`` given uniforms ``u_B`` in [0, 1).

    Row ``b`` takes the first token whose cumulative weight reaches ``(1 - u) * total``: a point in
    ``(0, total]``, so a token of zero weight is never taken (its cumulative weight equals its predecessor's,
    which is below the point). One uniform a row instead of ``torch.multinomial``'s one random number per
    vocabulary entry: 1.3 against 9.0 ms for 8 rows of 49,152 (``bench/decode_parts.py``).
    The cumulative sum runs in float64 (float32 on MPS), so rounding moves no token's probability by more than
    about 1e-11.
    """
    wide = torch.float32 if p_BV.device.type == "mps" else torch.float64  # MPS has no float64
    cdf_BV = p_BV.to(wide).cumsum(-1)
    point_B1 = ((1.0 - u_B.to(wide)) * cdf_BV[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf_BV, point_B1, side="left").squeeze(-1)


def _kept(logp_BV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Boolean ``[B, V]``: tokens that survive top-k (ties at the k-th value kept), then top-p on the rest."""
    keep_BV = torch.ones_like(logp_BV, dtype=torch.bool)
    if 0 < top_k < logp_BV.shape[-1]:
        kth_B1 = logp_BV.topk(top_k, dim=-1).values[:, -1:]
        keep_BV = logp_BV >= kth_B1
    if top_p < 1.0:
        p_BV = logp_BV.masked_fill(~keep_BV, float("-inf")).softmax(-1)  # renormalized after top-k
        p_sorted_BV, order_BV = p_BV.sort(-1, descending=True)
        # keep a token if the mass strictly before it is < top_p: the smallest prefix reaching top_p
        in_nucleus_BV = (p_sorted_BV.cumsum(-1) - p_sorted_BV) < top_p
        in_nucleus_BV[:, 0] = True
        keep_BV = keep_BV & torch.zeros_like(keep_BV).scatter(-1, order_BV, in_nucleus_BV)
    return keep_BV


class LocalEngine:
    """In-process rollout engine for a transformers causal LM (plain or peft-wrapped).

    ``precision="fp32"`` runs the given model as it is (no copy; it is put in eval mode during generation and its
    train/eval state restored). ``precision="bf16"`` keeps a separate bfloat16 copy of the model, cast once
    (no autocast per step); for a peft model the copy holds the merged weights ``W + sum_a delta_a`` of the active
    adapters, computed without touching the training model. :meth:`update_weights` refreshes that copy in place.
    The copy's linear layers hold oneDNN-prepacked weights where the torch build allows
    (:mod:`alignkit.models.prepacked`).

    Llama-style models (the bf16 copy, or an fp32 model without adapters) are prefilled and decoded by
    :class:`alignkit.rl.decode.FastDecoder`, which does the same arithmetic with less overhead: the copy's q/k/v
    and gate/up are fused into one matmul each (the copy is then run by the lean forward only), keys and values
    sit in per-row slots in the model's dtype (``kv_cache_dtype`` overrides it), and the rows are batched
    continuously (:meth:`_generate_slots`; ``continuous=False`` admits prompts only into an empty batch). Rows
    keep their seeds' uniforms, thinking state and positions wherever they sit, so the samples per seed are
    those of a static batch. ``fast_decode=False`` keeps transformers' forward. These speed paths are CPU ones,
    measured on the CPU (``bench/decode_parts.py``): on another device the copy keeps plain ``nn.Linear``
    layers and every step runs transformers' forward, with its SDPA or flash attention kernels.

    ``eos_ids`` holds the token ids that end a completion: the tokenizer's EOS and the model's
    ``generation_config.eos_token_id`` (set it to an empty set to always run to ``max_new_tokens``).

    ``version`` starts at 0 and follows :meth:`update_weights`. :meth:`sleep` drops the copy (nothing to free in
    fp32 on an unsharded model); :meth:`wake` rebuilds it from the model it last read.
    """

    logprob_semantics = "tempered_untruncated"
    thinking_requests = True  # generate() takes per-prompt thinking modes and budgets

    def __init__(self, model, tokenizer, *, precision: str = "bf16", max_batch: int = 64, fast_decode: bool = True,
                 continuous: bool = True, compile: bool = False):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', not {precision!r}")
        self.tokenizer, self.precision, self.max_batch, self.fast_decode = tokenizer, precision, max_batch, fast_decode
        self.continuous, self.compile = continuous, compile
        self._fast: FastDecoder | None = None  # kept across calls: a compiled step is compiled once
        self.kv_cache_dtype: torch.dtype | None = None  # the lean forward's keys/values (None: the model's dtype)
        self.model = model
        self._copy, self._packed, self._fused = None, {}, {}
        self.version, self.asleep = 0, False
        self.last_sync_bytes = 0  # bytes written into the copy by the last update_weights
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(unwrap(model), "generation_config", None), "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        self.eos_ids = {int(e) for e in eos if e is not None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)
        self.update_weights(model, version=0)

    # ------------------------------------------------------------------------------------------- weights

    def update_weights(self, model, version: int | None = None) -> None:
        """Use ``model``'s current weights, as weight ``version`` (default: the next): fp32 records the model; bf16
        copies its merged weights into the copy.

        A model sharded with FSDP2 (``strategy=fsdp2``) cannot generate by itself (each forward is a collective and
        the processes generate different prompts), so the engine keeps a whole copy in either precision and
        refreshes it from the gathered weights (a collective: every process calls this).
        """
        self.model = model
        self.version = self.version + 1 if version is None else version
        if self.asleep:  # wake() copies them
            return
        sharded = strategy.is_sharded(model)
        if self.precision == "fp32" and not sharded:
            return
        base = unwrap(model)
        if self._copy is None:
            self._copy = _empty_copy(base, torch.bfloat16 if self.precision == "bf16" else torch.float32)
            # only the lean forward runs the copy: its q/k/v and gate/up become one matmul each (held once)
            lean = self.fast_decode and next(self._copy.parameters()).device.type == "cpu"
            self._fused = fuse_projections(self._copy) if lean and supports_fast_decode(self._copy) else {}
            self._packed = prepack_linears(self._copy) if self.precision == "bf16" else {}
        with torch.no_grad(), strategy.gathered(model):
            for name, p in self._copy.named_parameters():
                p.copy_(self._source(base, name))
            for name, layer in self._packed.items():
                layer.load(self._source(base, name + ".weight"))
        self.last_sync_bytes = sum(p.numel() * p.element_size() for p in self._copy.parameters())
        self.last_sync_bytes += sum(layer.in_features * layer.out_features * 2 for layer in self._packed.values())

    def _source(self, base, name: str) -> torch.Tensor:
        """The copy's parameter ``name`` from ``base``: a fused layer's is its parts' concatenated."""
        mod, _, attr = name.rpartition(".")
        if mod not in self._fused:
            return merged_parameter(base, name)
        return torch.cat([merged_parameter(base, f"{part}.{attr}") for part, _ in self._fused[mod]])

    def held_weights(self) -> dict[str, torch.Tensor]:
        """The copy's weights by the plain model's names (prepacked ones unpacked, fused ones split): what the
        engine generates with."""
        got = {n: p.detach() for n, p in self._copy.named_parameters()}
        got.update({f"{name}.weight": layer.weight for name, layer in self._packed.items()})
        for name, parts in self._fused.items():
            for attr in ("weight", "bias"):
                if f"{name}.{attr}" in got:
                    pieces = got.pop(f"{name}.{attr}").split([size for _, size in parts])
                    got.update({f"{part}.{attr}": x for (part, _), x in zip(parts, pieces)})
        return got

    def sleep(self) -> None:
        self._copy, self._packed, self._fused, self._fast, self.asleep = None, {}, {}, None, True

    def wake(self) -> None:
        if self.asleep:
            self.asleep = False
            self.update_weights(self.model, version=self.version)

    def close(self) -> None:
        self.sleep()

    # ------------------------------------------------------------------------------------------ generate

    def generate_text(self, prompts: list[str], n: int, sampling: SamplingParams,
                      seeds: Sequence[int] | None = None) -> list[list[Completion]]:
        """:meth:`generate` on prompt strings (tokenized as they are: ``add_special_tokens=False``)."""
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        return self.generate(ids, n, sampling, seeds)

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams,
                 seeds: Sequence[int] | None = None, version: int | None = None, *,
                 thinking: Sequence[bool | None] | None = None,
                 max_thinking_tokens: Sequence[int | None] | None = None) -> list[list[Completion]]:
        """``n`` completions for each prompt (token ids), ``[len(prompts)][n]`` in sample order.

        A prompt's ``n`` samples always share one batch (so one prefill), even when ``n > max_batch``.
        ``seeds``: one int per prompt; sample ``j`` of prompt ``i`` then draws from its own generator seeded
        :func:`row_seed` ``(seeds[i], j)`` (``sampling.seed`` is not used). Without it, one generator seeded
        ``sampling.seed`` (random when None) serves the whole call. ``version``: the weight version the caller
        expects (:class:`StaleWeights` otherwise). ``thinking``, ``max_thinking_tokens``: one value per prompt,
        overriding ``sampling``'s where not None (:mod:`alignkit.rl.thinking`).
        """
        check_request(self, prompts, seeds, version)
        for name, per in (("thinking", thinking), ("max_thinking_tokens", max_thinking_tokens)):
            if per is not None and len(per) != len(prompts):
                raise ValueError(f"{name} needs one value per prompt: {len(per)} for {len(prompts)} prompts")
        if n <= 0:
            return [[] for _ in prompts]
        net = self._copy if self._copy is not None else self.model
        device = next(net.parameters()).device
        generator = None
        if seeds is None:
            seed = sampling.seed if sampling.seed is not None else int(torch.randint(2**62, ()).item())
            generator = torch.Generator(device=device).manual_seed(seed)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
        per_chunk = max(1, self.max_batch // n)
        out: list[list[Completion]] = [[] for _ in prompts]
        fast = self._lean(net) if self.fast_decode and device.type == "cpu" else None
        modes = [(m, m.training) for m in net.modules()]  # restored module by module (some may be frozen in eval)
        net.eval()
        try:
            # no_grad rather than inference_mode: buffers a model updates in forward (e.g. dynamic RoPE) must stay
            # usable by the training model's autograd afterwards.
            with torch.no_grad():
                # the lean forward batches continuously over the whole call; transformers' in chunks of prompts
                step = max(1, len(order)) if fast is not None else per_chunk
                for start in range(0, len(order), step):
                    idx = order[start : start + step]
                    row_seeds = None
                    if seeds is not None and sampling.temperature > 0:
                        row_seeds = [row_seed(int(seeds[i]), j) for i in idx for j in range(n)]
                    uniforms = _Uniforms(generator, row_seeds, sampling.max_new_tokens, device)
                    chunk = [list(prompts[i]) for i in idx]
                    think = Thinking(self.tokenizer, sampling, chunk, n,
                                     None if thinking is None else [thinking[i] for i in idx],
                                     None if max_thinking_tokens is None else [max_thinking_tokens[i] for i in idx],
                                     self.eos_ids)
                    if fast is not None:
                        done = self._generate_slots(fast, chunk, n, sampling, uniforms, device, think)
                    else:
                        done = self._generate_chunk(net, chunk, n, sampling, uniforms, device, think)
                    for j, i in enumerate(idx):
                        out[i] = done[j * n : (j + 1) * n]
        finally:
            for m, training in modes:
                m.training = training
        return out

    def _lean(self, net) -> FastDecoder | None:
        """The lean forward of ``net`` (None when unsupported), compiled with ``compile=True``."""
        if self._fast is None or self._fast.model is not unwrap(net):
            self._fast = fast_decoder(unwrap(net))
            if self._fast is not None and self.compile:
                self._fast.compile()
        return self._fast

    def _generate_slots(self, fast: FastDecoder, prompts: list[list[int]], n, sampling, uniforms: _Uniforms,
                        device, think: Thinking) -> list[Completion]:
        """Completions of ``len(prompts) * n`` rows (row ``r`` is sample ``r % n`` of prompt ``r // n``) by the
        lean forward, batched continuously.

        ``max(max_batch, n)`` slots: the prompts are admitted in order, whole (their ``n`` rows share one
        prefill), whenever their rows fit in the free slots; a finished row leaves its slot at once, so a waiting
        prompt starts while the others go on, and a batch of uneven lengths does not run at the pace of its
        longest row. A row keeps its own step count (its uniforms), thinking state and position. With
        ``continuous=False`` prompts are admitted only into an empty batch (static chunks of whole prompts)."""
        R, slots = len(prompts) * n, max(self.max_batch, n)
        cache = fast.cache(slots, max(map(len, prompts)) + sampling.max_new_tokens, self.kv_dtype(fast))
        waiting = list(range(len(prompts)))
        live: list[int] = []  # the row in each live slot
        steps = [0] * R  # decode steps each row has taken: its next uniform
        tokens: list[list[int]] = [[] for _ in range(R)]
        logps: list[list[float]] = [[] for _ in range(R)]
        reasons = ["length"] * R
        stops = tuple(s for s in sampling.stop if s)
        logits_LV = torch.empty(0, 0, device=device)
        while True:
            if waiting and (self.continuous or not live):
                take = []
                while waiting and len(live) + (len(take) + 1) * n <= slots:
                    take.append(waiting.pop(0))
                if take:
                    logits_PV, keys, values = fast.prefill([prompts[i] for i in take], cache.keys[0].dtype)
                    src = [k for k in range(len(take)) for _ in range(n)]
                    cache.admit(keys, values, [len(prompts[take[k]]) for k in src], src)
                    live += [i * n + j for i in take for j in range(n)]
                    first_V = logits_PV[torch.tensor(src, device=device)]  # a prompt's samples share its logits
                    logits_LV = torch.cat([logits_LV, first_V]) if logits_LV.numel() else first_V
            if not live:
                break
            at = [steps[r] for r in live]
            u_L = None
            if sampling.temperature > 0:
                u_L = uniforms.draw(torch.tensor(live, device=device), torch.tensor(at, device=device))
            tok_L, lp_L = sample_next(logits_LV, sampling, u_L)
            toks, lps = tok_L.tolist(), lp_L.tolist()
            for j, back in think.choose(live, tokens, logps, toks, lps, logits_LV):
                cache.take_back(j, back)
            last = [a + 1 >= sampling.max_new_tokens for a in at]
            keep = self._append(live, toks, lps, last, tokens, logps, reasons, think, stops)
            order = cache.compact(keep)
            live = [live[j] for j in order]
            logits_LV = torch.empty(0, 0, device=device)
            if live:
                logits_LV = fast.step(torch.tensor([toks[j] for j in order], device=device), cache)
                for r in live:
                    steps[r] += 1
        return [self._completion(tokens[r], logps[r], reasons[r], stops, think, r) for r in range(R)]

    def kv_dtype(self, fast: FastDecoder) -> torch.dtype:
        """The lean forward's key/value dtype: ``kv_cache_dtype`` when set, else the model's. For the bf16 copy that
        halves the attention's reads, and it is what transformers' bf16 cache holds: teacher-forced on SmolLM2's
        fp32 greedy path the logits move by 0.116 on average against 0.113 with float32 keys/values and 0.110
        through transformers' bf16 step (``bench/decode_accuracy.py``)."""
        return self.kv_cache_dtype or fast.dtype

    def _append(self, active: list[int], toks: list[int], lps: list[float], last: list[bool], tokens, logps,
                reasons, think: Thinking, stops) -> list[int]:
        """Append each active row's token and log-prob; returns the positions (in ``active``) of the rows that go
        on: not ended by EOS or a stop string (in the answer), and not at their last step (``last``)."""
        window = max((len(s) for s in stops), default=0) + STOP_MARGIN
        keep = []
        for j, (r, t, lp) in enumerate(zip(active, toks, lps)):
            tokens[r].append(t)
            logps[r].append(lp)
            think.appended(r, tokens[r])
            answer_at = think.answer_start(r)
            if t in self.eos_ids:
                reasons[r] = "eos"
            elif stops and answer_at is not None and self._ends_with_stop(tokens[r][answer_at:][-window:], stops):
                reasons[r] = "stop"
            elif not last[j]:
                keep.append(j)
        return keep

    def _generate_chunk(self, net, prompts: list[list[int]], n, sampling, uniforms: _Uniforms,
                        device, think: Thinking) -> list[Completion]:
        """Completions of ``len(prompts) * n`` rows, row ``r`` being sample ``r % n`` of prompt ``r // n``, by
        transformers' forward.

        A row forcing a token (``think``) is fed it instead of the sampled one; a row taking tokens back masks their
        positions out and reuses their position ids."""
        P, T = len(prompts), max(len(p) for p in prompts)
        ids_PT = torch.full((P, T), self.pad_id, dtype=torch.long)
        mask_PT = torch.zeros((P, T), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's last position is its last prompt token
            ids_PT[i, T - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask_PT[i, T - len(p) :] = 1
        ids_PT, mask_PT = ids_PT.to(device), mask_PT.to(device)
        pos_PT = (mask_PT.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=unwrap(net).config)  # the config gives sliding-window layers their own kind
        logits_PV = _forward(net, ids_PT, mask_PT, pos_PT, cache)

        R = P * n
        prompt_of_R = torch.arange(P, device=device).repeat_interleave(n)
        logits_AV = logits_PV[prompt_of_R]  # the n samples of a prompt share its last-position logits
        cache_rows_A = prompt_of_R  # which cache row each active row continues (first: its prompt's row)
        mask_AS, next_pos_A = mask_PT[prompt_of_R], mask_PT.sum(-1)[prompt_of_R]
        active = list(range(R))
        rows_A = torch.arange(R, device=device)  # ``active`` on the device: which rows' uniforms to take
        tokens: list[list[int]] = [[] for _ in range(R)]
        logps: list[list[float]] = [[] for _ in range(R)]
        reasons = ["length"] * R
        stops = tuple(s for s in sampling.stop if s)
        for step in range(sampling.max_new_tokens):
            u_A = uniforms.draw(rows_A, step) if sampling.temperature > 0 else None
            tok_A, lp_A = sample_next(logits_AV, sampling, u_A)
            sampled, lps = tok_A.tolist(), lp_A.tolist()
            toks = list(sampled)
            for j, back in think.choose(active, tokens, logps, toks, lps, logits_AV):
                mask_AS[j, -back:] = 0
                next_pos_A[j] -= back
            if toks != sampled:
                tok_A = torch.tensor(toks, device=device)
            last = [step + 1 >= sampling.max_new_tokens] * len(active)
            keep = self._append(active, toks, lps, last, tokens, logps, reasons, think, stops)
            if not keep:
                break
            if len(keep) < len(active) or step == 0:
                # At step 0 the cache has one row per prompt: selecting rows [0]*n + [1]*n + ... repeats each
                # prompt's keys/values for its samples (and leaves out samples that already ended) in one copy.
                sel_A = torch.tensor(keep, device=device)
                cache.batch_select_indices(cache_rows_A[sel_A])
                active = [active[j] for j in keep]
                tok_A, mask_AS, next_pos_A, rows_A = tok_A[sel_A], mask_AS[sel_A], next_pos_A[sel_A], rows_A[sel_A]
            mask_AS = torch.cat([mask_AS, mask_AS.new_ones(len(active), 1)], dim=1)
            logits_AV = _forward(net, tok_A[:, None], mask_AS, next_pos_A[:, None], cache)
            cache_rows_A = torch.arange(len(active), device=device)
            next_pos_A = next_pos_A + 1
        return [self._completion(tokens[r], logps[r], reasons[r], stops, think, r) for r in range(R)]

    def _ends_with_stop(self, tail: list[int], stops: tuple[str, ...]) -> bool:
        # Only the tail is decoded, so the check costs O(window) per step, not O(length).
        text = self.tokenizer.decode(tail, skip_special_tokens=True)
        return any(s in text for s in stops)

    def _completion(self, token_ids: list[int], logps: list[float], reason: str, stops, think: Thinking,
                    r: int) -> Completion:
        text_of = lambda ids: completion_text(self.tokenizer, ids, reason, stops)  # noqa: E731
        n_think = think.thinking_tokens(r, len(token_ids))
        if n_think:
            reasoning, answer = split_completion(self.tokenizer, token_ids, n_think, text_of)
            text = text_of(token_ids)
            if reason == "stop":  # stop strings end the answer: one in the thinking block cuts nothing
                text = completion_text(self.tokenizer, token_ids[:n_think], "length", ()) + text_of(token_ids[n_think:])
        else:  # no thinking block: the answer is the whole text, decoded once
            text = text_of(token_ids)
            reasoning, answer = "", text.strip()
        return Completion(token_ids=token_ids, text=text, logps=logps, finish_reason=reason,
                          weight_version=self.version, forced=think.forced(r), thinking_tokens=n_think,
                          answer_tokens=len(token_ids) - n_think, reasoning=reasoning, answer=answer)


def _forward(net, ids_BT, mask_BS, pos_BT, cache) -> torch.Tensor:
    """Float32 next-token logits ``[B, V]`` at the last position; appends the inputs' keys/values to ``cache``.

    Trunk, then the head on the last position only (softcapped as the model's config says), as the trainer's
    :func:`alignkit.models.logprobs.project_logps` does. The head gets a contiguous 2-D input: on a strided 3-D
    input with a frozen weight (``logits_to_keep`` after a prefill), torch's CPU matmul copies the whole weight.
    """
    base = unwrap(net)
    h_BTD = base.get_decoder()(input_ids=ids_BT, attention_mask=mask_BS, position_ids=pos_BT, past_key_values=cache,
                               use_cache=True).last_hidden_state
    return head_logits(base, h_BTD[:, -1].contiguous())


def _empty_copy(base, dtype=torch.bfloat16):
    """A model of ``base``'s class and config with uninitialized ``dtype`` parameters (filled by ``update_weights``).

    Built on the meta device, so no time goes into random initialization. Buffers (e.g. rotary frequencies) are
    taken from ``base`` as they are, as ``from_pretrained(dtype=torch.bfloat16)`` would leave them in float32.
    """
    device = next(base.parameters()).device
    with torch.device("meta"):
        net = type(base)(copy.deepcopy(base.config))
    net.to_empty(device=device)
    net.tie_weights()  # to_empty breaks tying of shared parameters
    for p in net.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    for name, buf in base.named_buffers():
        mod_path, _, attr = name.rpartition(".")
        net.get_submodule(mod_path)._buffers[attr] = buf.detach().clone()
    return net.eval().requires_grad_(False)


def merged_parameter(base, name: str) -> torch.Tensor:
    """Parameter ``name`` (named as in the plain model) of ``base``, with active LoRA deltas added.

    For a peft-injected layer: ``W = W_base + sum over active adapters of B @ A * scaling`` (peft's
    ``get_delta_weight``); nothing is added when adapters are disabled or already merged into ``W_base``.
    """
    mod_path, _, attr = name.rpartition(".")
    mod = base.get_submodule(mod_path)
    if not hasattr(mod, "get_base_layer"):  # a plain module
        return getattr(mod, attr)
    value = getattr(mod.get_base_layer(), attr)
    if attr != "weight" or mod.disable_adapters or mod.merged:
        return value
    for adapter in mod.active_adapters:
        if adapter not in getattr(mod, "lora_A", {}) and adapter not in getattr(mod, "lora_embedding_A", {}):
            continue
        if getattr(mod, "use_dora", {}).get(adapter, False):
            raise NotImplementedError("the bf16 rollout copy does not merge DoRA adapters; use precision='fp32'")
        value = value + mod.get_delta_weight(adapter)
    return value
