"""The offline preference family: ``alignkit dpo loss=dpo|cdpo|robust|hinge|ipo|kto|orpo|simpo``.

Preference rows hold two responses (chosen, rejected) that go through the model in one forward pass. KTO rows
hold one response with its label plus a *mismatched* response (another row's completion to this prompt), whose
log-ratio gives KTO's reference point z0 over the whole step.

Reference log-probs are computed once before training with the initial model (with LoRA: the base with
adapters off) and kept with the rows, so no reference model stays in memory (``reference=cached``); they are
saved in ``OUTPUT/reference_logps.pt`` so a resumed full fine-tune still compares with the initial model.
``reference=live`` recomputes them every step instead, from a frozen copy or with adapters off.

Soft labels (a ``soft_label`` column, the probability s that chosen is better, as ``alignkit cai stage=label``
writes it) are conservative DPO's per-pair smoothing eps_i = 1 - s_i: cdpo's optimum
``sigma(beta Delta) = eps + (1 - 2 eps) p`` at p = 1 is ``sigma(beta Delta_i) = s_i``, the judge's probability.
That is what loss=dpo means on such rows, and what loss=cdpo uses in place of ``label_smoothing``; another loss
is a config error unless ``soft_labels=ignore``.
"""

from __future__ import annotations

import copy
import hashlib
import contextlib
import logging
from pathlib import Path

import torch

from alignkit.config import DPOConfig
from alignkit.data.collate import collate, collate_shared, soft_labels
from alignkit.data.formats import soft_label
from alignkit.data.tokenize import Encoded
from alignkit.errors import ConfigError
from alignkit.losses.preference import PairLogps, PreferenceOutput, UnpairedLogps, get_loss, kto_reference_point
from alignkit.models.device import model_device, on_model
from alignkit.models.logprobs import autocast, sequence_logps, shared_prompt_logps
from alignkit.recipes.common import prepare, resuming, save_final
from alignkit.train import dist, strategy
from alignkit.train.loop import evaluate, micro_batches, train

log = logging.getLogger("alignkit")


def response_logps(model, rows: list[Encoded], responses: tuple[int, ...], pad_id: int, chunk: int, shared: bool = False):
    """Summed log-probs and token counts ``[B, len(responses)]`` of the given responses of each row, on the
    model's device.

    With ``shared`` (and more than one response) each row's prompt is computed once for all its responses.
    """
    if shared and len(responses) > 1 and responses == tuple(range(len(rows[0].responses))):
        lp, n = shared_prompt_logps(model, on_model(collate_shared(rows, pad_id), model), chunk=chunk)
        return lp.view(len(rows), len(responses)), n.view(len(rows), len(responses))
    lp, n = sequence_logps(model, on_model(collate(rows, responses, pad_id), model), chunk=chunk)
    return lp.view(len(responses), len(rows)).T, n.view(len(responses), len(rows)).T


def reference_off(model):
    """A context in which ``model`` computes the reference: LoRA adapters disabled (or nothing to change)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


class Reference:
    """Reference log-probs ``[B, R]`` for rows: cached on each row (``row.extra['ref']``) or computed live."""

    def __init__(self, model, mode: str, pad_id: int, chunk: int, batch_size: int, precision: str, shared: bool,
                 responses: tuple[int, ...] | None = None):
        """``responses``: the indices the reference is needed for (default: every response of a row)."""
        self.mode, self.pad_id, self.chunk, self.batch_size, self.precision = mode, pad_id, chunk, batch_size, precision
        self.shared, self.responses = shared, responses
        self.frozen = None
        if mode == "live" and not hasattr(model, "disable_adapter"):
            self.frozen = copy.deepcopy(model).eval().requires_grad_(False)

    def _compute(self, model, rows: list[Encoded]) -> torch.Tensor:
        net = self.frozen if self.frozen is not None else model
        ctx = contextlib.nullcontext() if self.frozen is not None else reference_off(model)
        with torch.no_grad(), ctx:
            n_resp = self.responses or tuple(range(len(rows[0].responses)))
            return strategy.call(net, response_logps, net, rows, n_resp, self.pad_id, self.chunk, self.shared)[0]

    def fill(self, model, rows: list[Encoded], cache: Path | None = None, reuse: bool = False, desc: str = "reference",
             progress: bool = True) -> None:
        """Compute and keep reference log-probs on every row; with ``reuse``, read them from ``cache`` if it
        was written for the same rows (a resumed run must compare with the *initial* model)."""
        if self.mode == "live" or not rows:
            return
        key = _fingerprint(rows)
        if reuse and cache is not None and cache.exists():
            saved = torch.load(cache)
            if saved["fingerprint"] == key:
                for row, ref in zip(rows, saved["logps"]):
                    row.extra["ref"] = ref
                log.info("reference log-probs loaded from %s", cache)
                return
            log.warning("%s was written for other rows: recomputing", cache)
        was_training = model.training
        model.eval()
        from tqdm.auto import tqdm

        # each process computes every W-th row and the shares are gathered: the pass is done once in all
        rank, world = dist.rank(), dist.world()
        mine = rows[rank::world]
        batches = micro_batches(mine, self.batch_size, True)
        for mb in tqdm(batches, desc=desc, unit="batch", disable=not progress or rank != 0, dynamic_ncols=True):
            with autocast(self.precision, model_device(model)):
                refs = self._compute(model, mb)
            for row, ref in zip(mb, refs):
                row.extra["ref"] = ref.float().cpu()
        if world > 1:
            shares = dist.all_gather_object([r.extra["ref"] for r in mine])
            for r, share in enumerate(shares):
                for row, ref in zip(rows[r::world], share):
                    row.extra["ref"] = ref
        model.train(was_training)
        if cache is not None and dist.rank() == 0:
            tmp = cache.with_suffix(".tmp")
            torch.save({"fingerprint": key, "logps": torch.stack([r.extra["ref"] for r in rows])}, tmp)
            tmp.replace(cache)

    def logps(self, model, rows: list[Encoded]) -> torch.Tensor:
        """``[B, R]`` on the model's device (cached ones are kept on the CPU, one small tensor a row)."""
        if self.mode == "live":
            return self._compute(model, rows)
        return torch.stack([r.extra["ref"] for r in rows]).to(model_device(model))


def _fingerprint(rows: list[Encoded]) -> str:
    h = hashlib.sha1()
    for r in rows:
        h.update(repr((r.prompt, r.responses)).encode())
    return h.hexdigest()


class PreferenceTask:
    """``soft``: fit each pair's soft label, as cdpo with per-pair eps_i = 1 - s_i (see :func:`uses_soft_labels`)."""

    def __init__(self, cfg: DPOConfig, pad_id: int, reference: Reference | None, soft: bool = False):
        self.batch_size = cfg.batch_size
        self.spec = get_loss("cdpo" if soft else cfg.loss)
        self.hparams = {k: getattr(cfg, k) for k in self.spec.hparams}
        self.soft = soft
        self.pad_id, self.chunk, self.reference = pad_id, cfg.logits_chunk, reference
        self.shared = cfg.share_prompt
        self.rpo_alpha = getattr(cfg, "rpo_alpha", 0.0)
        self.z0 = torch.tensor(0.0)

    def weight(self, row: Encoded) -> float:
        return 1.0

    def begin_step(self, model, rows: list[Encoded]) -> None:
        """KTO: z0 = max(0, mean log-ratio of the step's mismatched pairs), over all processes, no gradient."""
        if self.spec.paired:
            return
        total = 0.0
        with torch.no_grad():
            for mb in micro_batches(rows, self.batch_size, True):
                lp, _ = response_logps(model, mb, (1,), self.pad_id, self.chunk)
                total += (lp[:, 0] - self.reference.logps(model, mb)[:, 1]).sum().item()
        stats = dist.all_reduce_sum(torch.tensor([total, float(len(rows))], dtype=torch.float64))
        self.z0 = kto_reference_point(stats[:1] / stats[1]).float()  # float64 is not on every device (MPS)

    def output(self, model, rows) -> tuple[PreferenceOutput, torch.Tensor, torch.Tensor]:
        """The loss's output on ``rows``, with the policy's summed log-probs and token counts of the scored
        responses ``[B, R]`` (chosen, rejected for pairs; the completion for KTO)."""
        ref = self.reference.logps(model, rows) if self.spec.needs_reference else None
        if self.spec.paired:
            lp, n = response_logps(model, rows, (0, 1), self.pad_id, self.chunk, self.shared)
            batch = PairLogps(lp[:, 0], lp[:, 1], n[:, 0], n[:, 1],
                              ref[:, 0] if ref is not None else None, ref[:, 1] if ref is not None else None)
            hparams = self.hparams
            if self.soft:
                hparams = {**hparams, "label_smoothing": 1 - soft_labels(rows).to(lp.device)}
            return self.spec.fn(batch, **hparams), lp, n
        lp, n = response_logps(model, rows, (0,), self.pad_id, self.chunk)
        desirable = torch.tensor([bool(r.label) for r in rows], device=lp.device)
        out = self.spec.fn(UnpairedLogps(lp[:, 0], n[:, 0], ref[:, 0], desirable),
                           reference_point=self.z0.to(lp.device), **self.hparams)
        return out, lp, n

    def loss(self, model, rows, normaliser):
        out, lp, n = self.output(model, rows)
        total = out.losses.sum()
        metrics = {"loss": (total.item(), float(len(rows))), **reward_metrics(out, self.spec.paired)}
        if self.rpo_alpha and self.spec.paired:
            # RPO (2404.19733): each pair's loss plus alpha times its chosen response's mean token NLL
            nll = -(lp[:, 0] / n[:, 0].clamp(min=1))
            total = total + self.rpo_alpha * nll.sum()
            metrics["nll/chosen"] = (nll.detach().sum().item(), float(len(rows)))
        if self.spec.paired:
            # the model's own preference, without the reference: summed and length-normalised log-probs
            lp, avg = lp[:, :2].detach(), lp[:, :2].detach() / n[:, :2]
            metrics["logp_accuracy"] = (float((lp[:, 0] > lp[:, 1]).sum()), float(len(rows)))
            metrics["avg_logp_accuracy"] = (float((avg[:, 0] > avg[:, 1]).sum()), float(len(rows)))
        return total / normaliser, metrics


def reward_metrics(out: PreferenceOutput, paired: bool) -> dict[str, tuple[float, float]]:
    """Implicit-reward metrics as (sum, count): chosen and rejected means, and for pairs the margin and accuracy."""
    ch, rj = out.chosen_rewards.float(), out.rejected_rewards.float()
    m = {"rewards/chosen": (ch.sum().item(), float(ch.numel())), "rewards/rejected": (rj.sum().item(), float(rj.numel()))}
    if paired:
        margin = ch - rj
        m["rewards/margin"] = (margin.sum().item(), float(margin.numel()))
        m["rewards/accuracy"] = (float((margin > 0).sum()), float(margin.numel()))
    for k, v in out.metrics.items():
        m[k] = (v.float().sum().item(), float(v.numel()))
    return m


def kto_rows(rows: list[Encoded]) -> list[Encoded]:
    """Give each unpaired row a mismatched response: the completion of the row half the data set away."""
    n = len(rows)
    if n < 2:
        return rows
    for i, row in enumerate(rows):
        row.responses = [row.responses[0], rows[(i + n // 2) % n].responses[0][:]]
    return rows


def uses_soft_labels(cfg: DPOConfig, examples: list) -> bool:
    """Whether this run fits the examples' soft labels (``DPOConfig.soft_labels``): true when some carry one,
    ``soft_labels=use`` and loss is dpo or cdpo. Soft labels that the loss has no use for, or loss=cdpo with a
    ``label_smoothing`` they would replace, are a ConfigError (checked before any model loads)."""
    n = sum(soft_label(ex) is not None for ex in examples)
    if not n or cfg.soft_labels == "ignore":
        return False
    if cfg.loss not in ("dpo", "cdpo"):
        raise ConfigError(f"{n} of {len(examples)} examples carry a soft_label, which loss={cfg.loss} has no use for: "
                          "choose loss=dpo or cdpo (per-pair eps_i = 1 - soft_label_i), or soft_labels=ignore to train "
                          "on the hard labels")
    if cfg.loss == "cdpo" and cfg.label_smoothing:
        raise ConfigError(f"loss=cdpo on rows with a soft_label takes eps_i = 1 - soft_label_i per pair in place of "
                          f"label_smoothing={cfg.label_smoothing}: leave label_smoothing at 0, or set soft_labels=ignore")
    log.info("%d of %d pairs carry a soft_label: loss=%s trains as cdpo with per-pair eps_i = 1 - soft_label_i",
             n, len(examples), cfg.loss)
    return True


def run(cfg: DPOConfig, *, kind: str | None = None, check=None, encoder=None, task_cls=None, method: str = "",
        reference_responses: tuple[int, ...] | None = None) -> dict:
    """Train with ``cfg.loss``. A recipe built on this one (GDPO) passes its data ``kind``, a ``check`` of the
    examples, an ``encoder``, its task class (a :class:`PreferenceTask`), the responses of a row the reference is
    needed for, and the ``method`` written with the model."""
    spec = get_loss(cfg.loss)
    soft = []  # set by the check, before the model loads

    def check_all(examples):
        soft.append(uses_soft_labels(cfg, examples))
        if check is not None:
            check(examples)

    p = prepare(cfg, kind or ("preference" if spec.paired else "unpaired"), check=check_all, encoder=encoder)
    if not spec.paired:
        kto_rows(p.train)
        kto_rows(p.eval)
    pad = p.tokenizer.pad_token_id
    reference = None
    if spec.needs_reference:
        reference = Reference(p.model, cfg.reference, pad, cfg.logits_chunk, cfg.batch_size, cfg.precision, cfg.share_prompt,
                              reference_responses)
        if reference.frozen is not None:
            strategy.prepare(reference.frozen, cfg)  # a frozen copy is sharded like the policy (no optimizer state)
        reference.fill(p.model, p.train, p.out / "reference_logps.pt", reuse=resuming(cfg), progress=cfg.progress)
        reference.fill(p.model, p.eval, desc="reference (eval)", progress=cfg.progress)
    task = (task_cls or PreferenceTask)(cfg, pad, reference, soft=soft[0])
    evaluate_fn = (lambda: evaluate(task, p.model, p.eval, cfg.batch_size)) if p.eval else None
    before = {}
    if evaluate_fn is not None and not resuming(cfg):
        with autocast(cfg.precision, model_device(p.model)):
            before = evaluate_fn()
        log.info("before training (held out): %s", _fmt(before))
    result = train(task, p.model, p.train, cfg, evaluate=evaluate_fn)
    after = {k[5:]: v for k, v in (result.history[-1] if result.history else {}).items() if k.startswith("eval/")}
    if after:
        log.info("after training (held out):  %s", _fmt(after))
    summary = {"steps": result.steps, "eval_before": before, "eval_after": after,
               "train_last": {k: v for k, v in (result.history[-1] if result.history else {}).items() if not k.startswith("eval/")}}
    save_final(p.model, p.tokenizer, cfg, method or f"dpo:{cfg.loss}", summary)
    return summary


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
