"""The one training loop every method uses.

A method supplies a :class:`Task`: how much each row weighs in the step's normaliser (response tokens for SFT,
one per pair for DPO) and the *summed* loss of a micro-batch. The loop divides every micro-batch's sum by the
total weight of the whole optimizer step, counted over all micro-batches and all processes, before calling
backward. So batch 8 x accumulation 1, batch 1 x accumulation 8 and 2 processes x batch 4 all take the same
step, and padding or the grouping of rows into micro-batches changes nothing.

Data order: step ``s`` takes positions ``[s*G, (s+1)*G)`` of the concatenated per-epoch permutations
(epoch ``e`` shuffled with seed ``seed + e``), where G is the global batch; process ``r`` of ``W`` takes every
W-th of those rows. The order depends only on the seed and the step, which is what makes resume exact.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from alignkit.config import TrainConfig
from alignkit.data.tokenize import Encoded
from alignkit.errors import Stopped, TrainingDiverged
from alignkit.models.logprobs import autocast
from alignkit.train import checkpoint, dist, strategy
from alignkit.train.in_backward import OptimizerInBackward, check_supported, per_parameter_groups
from alignkit.train.optim import AdamWBf16State

log = logging.getLogger(__name__)

Metrics = dict[str, tuple[float, float]]
"""Metric name -> (sum, count); the loop adds these up over micro-batches and processes and reports sum/count.
A name whose last part starts with ``max_`` (``mismatch/max_abs``) carries ``(value, 1)`` instead, and the loop
reports the largest value over micro-batches and processes (:func:`is_max_metric`)."""


def is_max_metric(name: str) -> bool:
    """Whether the loop reduces metric ``name`` by its maximum instead of its mean."""
    return name.rsplit("/", 1)[-1].startswith("max_")


def add_metric(sums: dict[str, list[float]], name: str, total: float, count: float) -> None:
    """Add one ``(sum, count)`` pair (or keep the larger ``(value, 1)`` of a ``max_`` metric) into ``sums``."""
    if is_max_metric(name) and name in sums:
        if total > sums[name][0]:
            sums[name] = [total, count]
        return
    s = sums.setdefault(name, [0.0, 0.0])
    s[0] += total
    s[1] += count


class Task(Protocol):
    def weight(self, row: Encoded) -> float:
        """This row's share of the step's normaliser."""

    def loss(self, model, rows: list[Encoded], normaliser: float) -> tuple[torch.Tensor, Metrics]:
        """The micro-batch's loss already divided by ``normaliser`` (the whole step's weight), and metrics."""

    # Optional: ``begin_step(model, rows)`` runs before the step's micro-batches with this process's rows of the
    # step, for statistics the whole step shares (KTO's reference point). ``end_step(step, record)`` runs after
    # the step's record (reduced over processes, the same on each) is written; it may warn, or raise to stop the
    # run (online RL's mismatch alarm).


class StepSource(Protocol):
    """Where each optimizer step's rows come from when they are made during training (online RL rollouts).

    ``rows(step, model)`` returns THIS process's rows of optimizer step ``step``; ``metrics()`` what the source
    measured since it was last asked (``name -> (sum, count)``, reduced like the task's metrics);
    ``state_dict()``/``load_state_dict()`` go into checkpoints so a resumed run continues exactly.
    """

    n_steps: int

    def rows(self, step: int, model) -> list: ...

    def metrics(self) -> Metrics: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class FixedRows:
    """A :class:`StepSource` over a fixed list of rows, in the seeded order described in the module docstring."""

    def __init__(self, rows: list[Encoded], cfg: TrainConfig):
        self.all_rows = rows
        self.n_steps = total_steps(cfg, len(rows))
        self.schedule = Schedule(len(rows), cfg.batch_size * cfg.grad_accum * dist.world(), cfg.seed)

    def rows(self, step: int, model) -> list[Encoded]:
        step_rows = [self.all_rows[i] for i in self.schedule.rows_of_step(step)]
        return step_rows[dist.rank() :: dist.world()]

    def metrics(self) -> Metrics:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class Schedule:
    n_rows: int
    global_batch: int
    seed: int

    def rows_of_step(self, step: int) -> list[int]:
        """Row indices of optimizer step ``step`` (0-based), across all processes."""
        out: list[int] = []
        pos = step * self.global_batch
        while len(out) < self.global_batch:
            epoch, offset = divmod(pos, self.n_rows)
            perm = self._perm(epoch)
            take = min(self.global_batch - len(out), self.n_rows - offset)
            out += perm[offset : offset + take]
            pos += take
        return out

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n_rows, generator=g).tolist()


def clip_and_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the gradients to a global L2 norm of ``max_norm`` (0: no clipping), take the optimizer step, and return
    the norm before clipping: ``clip_grad_norm_`` then ``optimizer.step()``, one memory pass shorter.

    The coefficient is ``clip_grad_norm_``'s, ``min(1, max_norm / (norm + 1e-6))``. Steps it does not clip run
    exactly as before. When it clips and the optimizer is torch's fused AdamW, the coefficient goes to the kernel
    as its gradient divisor (``grad_scale``, the hook ``GradScaler`` uses to unscale), so the gradients are not
    rewritten in a pass of their own: on SmolLM2-135M's gradients clipping and the step take 115 ms instead of 138
    (``bench/clip_step.py``).
    Dividing by ``1 / coefficient`` instead of multiplying by it can move a gradient by an ulp.

    A non-finite norm (a NaN or inf anywhere in the gradients) takes no step at all, so AdamW never writes NaN
    into the weights or its moments; the caller sees the norm and decides what to do.
    """
    grads = [p.grad for p in params if p.grad is not None]
    norm = grad_norm(grads)
    if not torch.isfinite(norm):
        return norm
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0) if max_norm > 0 else None
    clipping = coef is not None and bool(coef < 1.0)
    fused = all(g.get("fused") for g in optimizer.param_groups)
    if clipping and not fused:
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    optimizer.grad_scale = coef.reciprocal().to(grads[0].device) if clipping and fused else None
    try:
        optimizer.step()
    finally:
        optimizer.grad_scale = None
    return norm


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of ``grads`` as a plain tensor; sharded (FSDP2) gradients give their whole norm."""
    if not grads:
        return torch.tensor(0.0)
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.scheduler == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        if cfg.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def total_steps(cfg: TrainConfig, n_rows: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    g = cfg.batch_size * cfg.grad_accum * dist.world()
    return max(1, math.ceil(cfg.epochs * n_rows / g))


def micro_batches(rows: list[Encoded], size: int, by_length: bool) -> list[list[Encoded]]:
    if by_length:
        rows = sorted(rows, key=lambda r: r.length, reverse=True)
    return [rows[i : i + size] for i in range(0, len(rows), size)]


@dataclass
class Result:
    history: list[dict] = field(default_factory=list)
    steps: int = 0


class MetricsWriter:
    """metrics.jsonl (one JSON object per optimizer step), optional TensorBoard, on the main process only."""

    def __init__(self, out: Path, resume_step: int, tensorboard: bool):
        self.active = dist.rank() == 0
        self.path = out / "metrics.jsonl"
        self.tb = None
        if not self.active:
            return
        kept = []
        if resume_step > 0 and self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
        tmp = self.path.with_name(".metrics.jsonl.tmp")  # replaced in one rename: a kill here loses no line
        tmp.write_text("".join(ln + "\n" for ln in kept))
        os.replace(tmp, self.path)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class _StopRequests:
    """SIGTERM and SIGINT ask the loop to stop after the step in progress (the first signal only: a second one
    has the default effect, so a stuck run can still be killed). Installed only in the main thread."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))  # the next one stops at once
        if dist.rank() == 0:
            # os.write, not print: the signal may land while logging is writing to the same buffered stderr, and a
            # second buffered write from the handler is a "reentrant call" error (found by the chaos test)
            msg = (f"\nalignkit: {signal.Signals(signum).name}: stopping after this step (a checkpoint is written); "
                   "send it again to stop at once\n")
            os.write(sys.stderr.fileno(), msg.encode())

    def requested(self) -> bool:
        flag = 1.0 if self.signum is not None else 0.0
        return _global_sum(flag) > 0  # every process stops at the same step

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(
    task: Task,
    model,
    rows: list[Encoded] | StepSource,
    cfg: TrainConfig,
    *,
    evaluate: Callable[[], dict] | None = None,
) -> Result:
    """Run the optimizer steps of ``cfg`` over ``rows`` (a list, or a :class:`StepSource` that makes each step's
    rows); writes metrics and checkpoints under ``cfg.output_dir``.

    Guards (a run never saves a broken model): a step whose rows weigh nothing (no response tokens, no valid
    completion) makes no update and is logged with ``skipped=1``; a step whose loss or gradient norm is not
    finite makes no update either (with ``optimizer_in_backward``: a non-finite loss gets no backward, and only
    the parameters whose own gradient is not finite go without their update), with a warning, and
    ``cfg.max_bad_steps`` of those in a row raise :class:`TrainingDiverged`. SIGTERM or Ctrl-C finish the step in
    progress, write a checkpoint and raise :class:`Stopped`.
    """
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = dist.rank(), dist.world()
    layout = strategy.prepare(model, cfg)  # on its device; sharded under strategy=fsdp2
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer_in_backward:
        check_supported(cfg, world)
    groups = per_parameter_groups(params) if cfg.optimizer_in_backward else params
    adam = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer_state == "bf16":
        optimizer = AdamWBf16State(groups, **adam, seed=cfg.seed)
    else:  # the fused kernel (one pass over each tensor) is about 6x torch's default per-tensor loop on CPU
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        optimizer = torch.optim.AdamW(groups, **adam, fused=fused or None)
    source = FixedRows(rows, cfg) if isinstance(rows, list) else rows
    n_steps = source.n_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, n_steps))
    settings = checkpoint.run_settings(cfg)

    start = 0
    ckpts = checkpoint.list_checkpoints(out / "checkpoints")
    if cfg.resume and ckpts:
        checkpoint.check_resumable(ckpts[-1], settings, n_steps)
        start = checkpoint.load(ckpts[-1], model, optimizer)
        source.load_state_dict(checkpoint.load_extra(ckpts[-1]))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, n_steps), last_epoch=start - 1)
        log.info("resumed from %s (step %d of %d)", ckpts[-1].name, start, n_steps)
    elif cfg.resume:
        log.info("resume=true but no checkpoint in %s: starting from step 0", out / "checkpoints")
    writer = MetricsWriter(out, start, cfg.tensorboard)
    result = Result(steps=start)

    def save_checkpoint(step: int) -> Path | None:
        return checkpoint.save(out / "checkpoints", step, model, optimizer, keep=cfg.save_total_limit,
                               extra=source.state_dict(), settings=settings)

    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    model.train()
    bad_in_a_row = 0
    in_backward = OptimizerInBackward(optimizer) if cfg.optimizer_in_backward else None
    with _StopRequests() as stop:
        try:
            for step in range(start, n_steps):
                t0 = time.perf_counter()
                mine = source.rows(step, model)
                t_update = time.perf_counter()
                normaliser = _global_sum(sum(task.weight(r) for r in mine))
                sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
                for k, (s, c) in source.metrics().items():
                    sums[k] = [s, c]
                n_tokens, loss_total = 0, 0.0
                lr = scheduler.get_last_lr()[0]  # the rate this step's update uses
                skipped = None
                if normaliser > 0:
                    if hasattr(task, "begin_step"):
                        with layout.autocast():
                            strategy.call(model, task.begin_step, model, mine)
                    batches = micro_batches(mine, cfg.batch_size, cfg.group_by_length)
                    for i, mb in enumerate(layout.even_out(batches, mine or _filler(source))):
                        with layout.autocast():
                            if mb.filler:  # a sharded forward is a collective: this process joins with no weight
                                loss = strategy.call(model, task.loss, model, mb.rows, normaliser)[0] * 0.0
                                loss.backward()
                                continue
                            loss, metrics = strategy.call(model, task.loss, model, mb.rows, normaliser)
                        if in_backward is None:
                            loss.backward()
                        elif math.isfinite(loss_total) and math.isfinite(float(loss.detach())):
                            # an update in backward cannot be undone: a non-finite loss never gets a backward
                            in_backward.armed = i == len(batches) - 1
                            loss.backward()
                        loss_total += float(loss.detach())
                        for k, (s, c) in metrics.items():
                            add_metric(sums, k, s, c)
                        n_tokens += sum(len(r.prompt) * len(r.responses) + sum(map(len, r.responses)) for r in mb.rows)
                    layout.sync_gradients(params)
                    record = _reduce(sums, n_tokens)
                    finite_loss = math.isfinite(_global_sum(loss_total))  # the loss itself, not a task's metric
                    if in_backward is not None:  # already stepped, or (a non-finite loss) no backward at all
                        grad_norm = in_backward.finish() if finite_loss else float("nan")
                    elif finite_loss:
                        grad_norm = float(clip_and_step(optimizer, params, cfg.max_grad_norm))  # no step if not finite
                    else:
                        grads = [p.grad for p in params if p.grad is not None]
                        grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
                    if not (finite_loss and math.isfinite(grad_norm)):
                        skipped = "non-finite"
                    record["grad_norm"] = grad_norm
                else:  # nothing to learn from (every row weighs 0): no update, no NaN from 0/0
                    record = _reduce(sums, n_tokens)
                    skipped = "empty"
                with warnings.catch_warnings():  # a skipped step still advances the schedule (the steps are counted)
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if skipped == "non-finite":
                    bad_in_a_row += 1
                    log.warning("step %d: loss %s, gradient norm %s: not finite, the step was skipped (%d in a row; "
                                "the run stops at max_bad_steps=%d)%s", step + 1, record.get("loss"), record["grad_norm"],
                                bad_in_a_row, cfg.max_bad_steps,
                                "; optimizer_in_backward: the parameters whose own gradient was finite were updated"
                                if in_backward is not None and math.isfinite(loss_total) else "")
                    if bad_in_a_row >= cfg.max_bad_steps:
                        diverged = TrainingDiverged(
                            f"{bad_in_a_row} steps in a row (up to step {step + 1}) had a non-finite loss or gradient "
                            f"norm, so the run stopped without writing a final model; the last good state is the "
                            f"newest checkpoint in {out / 'checkpoints'}, if any. Try a lower lr, precision=fp32 or "
                            f"check the data and reward functions (max_bad_steps={cfg.max_bad_steps}).")
                        writer.write({**{k: v for k, v in record.items() if k != "tokens"}, "skipped": 1, "step": step + 1, "lr": lr})
                        raise diverged
                elif skipped is None:
                    bad_in_a_row = 0
                if skipped:
                    record["skipped"] = 1
                    if skipped == "empty":
                        log.info("step %d: no row carries weight (no response token or valid completion): "
                                 "skipped, no update", step + 1)
                now = time.perf_counter()
                record.update(
                    step=step + 1, lr=lr, seconds=now - t0,
                    tokens_per_s=record.pop("tokens") / (now - t_update), **{"time/update": now - t_update},
                )
                periodic = cfg.eval_steps > 0 and (step + 1) % cfg.eval_steps == 0
                if evaluate is not None and (periodic or step + 1 == n_steps):
                    with layout.autocast():
                        record.update({f"eval/{k}": v for k, v in evaluate().items()})
                    model.train()
                result.history.append(record)
                writer.write(record)
                result.steps = step + 1
                if hasattr(task, "end_step"):
                    task.end_step(step + 1, record)
                if bar is not None:
                    bar.update(1)
                    if "loss" in record:
                        bar.set_postfix(loss=f"{record['loss']:.4f}")
                    else:
                        bar.set_postfix(skipped="no rows")
                if rank == 0 and (step + 1) % cfg.log_every == 0 and bar is None:
                    log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
                last = step + 1 == n_steps
                if stop.requested() and not last:
                    path = save_checkpoint(step + 1)
                    dist.barrier()
                    name = signal.Signals(stop.signum or signal.SIGTERM).name
                    raise Stopped(f"stopped by {name} after step {step + 1} of {n_steps}; checkpoint {path} written: "
                                  f"run the same command with resume=true to continue", stop.signum or signal.SIGTERM)
                if cfg.save_steps > 0 and (step + 1) % cfg.save_steps == 0 and not last:
                    save_checkpoint(step + 1)
                dist.barrier()
        finally:
            if in_backward is not None:
                in_backward.remove()
            if bar is not None:
                bar.close()
            writer.close()
    skipped_steps = sum(1 for r in result.history if r.get("skipped"))
    if skipped_steps and rank == 0:
        log.warning("%d of %d steps made no update (skipped=1 in metrics.jsonl)", skipped_steps, len(result.history))
    return result


def _filler(source) -> list:
    """A row for a process that holds none this step to run a weightless micro-batch on (``source.filler()``)."""
    row = source.filler() if hasattr(source, "filler") else None
    return [row] if row is not None else []


def _global_sum(x: float) -> float:
    if dist.world() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce_sum(t)
    return t.item()


def _reduce(sums: dict[str, list[float]], n_tokens: int) -> dict:
    names = sorted(sums)
    if dist.world() > 1:  # a process with no rows this step has none of the task's names: reduce over the union
        names = sorted(set().union(*dist.all_gather_object(names)))
    added = [k for k in names if not is_max_metric(k)]
    t = torch.tensor([sums.get(k, [0.0, 0.0]) for k in added] + [[float(n_tokens), 0.0]], dtype=torch.float64)
    dist.all_reduce_sum(t)
    record = {k: (t[i, 0] / t[i, 1]).item() if t[i, 1] > 0 else float("nan") for i, k in enumerate(added)}
    maxed = [k for k in names if is_max_metric(k)]
    if maxed:
        mx = torch.tensor([sums.get(k, [-math.inf, 0.0]) for k in maxed], dtype=torch.float64)
        dist.all_reduce_max(mx)
        record.update({k: mx[i, 0].item() if mx[i, 1] > 0 else float("nan") for i, k in enumerate(maxed)})
    record = derive_std(record)
    record["tokens"] = t[-1, 0].item()
    return record


def evaluate(task: Task, model, rows: list[Encoded], batch_size: int) -> dict:
    """The task's metrics over ``rows`` (no gradient, eval mode), each averaged over the whole set."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        if hasattr(task, "begin_step"):
            strategy.call(model, task.begin_step, model, rows)
        for mb in micro_batches(rows, batch_size, True):
            for k, (s, c) in strategy.call(model, task.loss, model, mb, 1.0)[1].items():
                add_metric(sums, k, s, c)
    model.train(was_training)
    return derive_std({k: s / c for k, (s, c) in sums.items() if c > 0})


def derive_std(record: dict) -> dict:
    """A metric ``x/sumsq`` (mean of squares, reported beside ``x/mean``) becomes ``x/std``."""
    for key in [k for k in record if k.endswith("/sumsq")]:
        mean_key = key[: -len("sumsq")] + "mean"
        if mean_key in record:
            record[key[: -len("sumsq")] + "std"] = math.sqrt(max(0.0, record.pop(key) - record[mean_key] ** 2))
    return record
