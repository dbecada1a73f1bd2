"""Checkpoints written atomically: into a temporary directory, then renamed into place.

A crash while writing leaves only a ``.tmp-*`` directory behind, which is ignored; the previous checkpoint
stays intact. A checkpoint holds the trainable parameters (all weights, or only the LoRA adapter), the
optimizer state, the RNG states, the step and the run's settings (:func:`run_settings`), which must match for
``resume=true`` to continue from it.

The output directory belongs to one run: :func:`prepare_output_dir` refuses a fresh run into a directory that
holds another run's files unless told ``resume=true`` (continue it) or ``overwrite=true`` (start again).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import dataclasses
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from alignkit.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

# Settings that do not change what a run computes: they may differ between a run and its resumption.
# max_steps and epochs may change too (a run can be extended or cut short); start > the new length is refused.
OPERATIONAL = frozenset({
    "output_dir", "resume", "overwrite", "progress", "log_every", "tensorboard", "save_steps", "save_total_limit",
    "eval_steps", "eval_prompts", "max_steps", "epochs", "max_bad_steps", "gradient_checkpointing",
})
# What a run writes into its output_dir (``overwrite=true`` removes exactly these).
RUN_FILES = ("checkpoints", "final", "metrics.jsonl", "config.yaml", "tensorboard", "report", "reference_logps.pt")


def run_settings(cfg) -> dict:
    """The settings a checkpoint must share with the run that resumes from it (all but :data:`OPERATIONAL`)."""
    d = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    return {k: v for k, v in sorted(d.items()) if k not in OPERATIONAL}


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_resumable(path: Path, settings: dict, n_steps: int | None = None) -> int:
    """The step of checkpoint ``path`` after checking that this run may continue it: the same settings (the
    differing keys are named) and a step no later than ``n_steps``. Raises :class:`ConfigError` otherwise."""
    state = json.loads((path / "state.json").read_text())
    step = int(state["step"])
    saved = state.get("settings")
    if saved is None:
        log.warning("%s records no settings (written by an older alignkit): cannot check they match", path)
    elif state.get("settings_hash") != settings_hash(settings):
        keys = sorted(set(saved) | set(settings))
        diff = [f"{k}={saved.get(k)!r} (now {settings.get(k)!r})" for k in keys if saved.get(k) != settings.get(k)]
        raise ConfigError(
            f"cannot resume from {path}: it was written with other settings: {', '.join(diff) or 'unknown'}; "
            f"resume with the same settings, or start again with overwrite=true (or another output_dir)")
    from alignkit.train import dist

    if state.get("sharded") and state.get("world_size") != dist.world():
        raise ConfigError(f"cannot resume from {path}: it holds the shards of {state.get('world_size')} processes "
                          f"and this run has {dist.world()}; resume with the same number of processes")
    if n_steps is not None and step > n_steps:
        raise ConfigError(f"cannot resume from {path}: it is at step {step}, past this run's {n_steps} steps "
                          f"(max_steps/epochs); raise max_steps, or start again with overwrite=true")
    return step


def prepare_output_dir(cfg, n_steps: int | None = None) -> Path | None:
    """Make ``cfg.output_dir`` ready for a run and return the checkpoint it resumes from (None: from step 0).

    - ``overwrite=true``: another run's files (:data:`RUN_FILES`) are removed first;
    - ``resume=true``: the newest checkpoint, if its settings match (:func:`check_resumable`); with no
      checkpoint the run starts from step 0, unless the directory holds a finished run (``final/``);
    - neither: the directory must hold no run's files.
    Only the main process removes files. Raises :class:`ConfigError` (exit 2) naming the way out.
    """
    from alignkit.train import dist

    out = Path(cfg.output_dir)
    if cfg.resume and getattr(cfg, "overwrite", False):
        raise ConfigError("resume=true and overwrite=true contradict each other: choose one")
    used = [name for name in RUN_FILES if (out / name).exists()]
    ckpts = list_checkpoints(out / "checkpoints")
    if getattr(cfg, "overwrite", False):
        if used and dist.rank() == 0:
            log.info("overwrite=true: removing %s from %s", ", ".join(used), out)
            for name in used:
                p = out / name
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        dist.barrier()
        return None
    if cfg.resume:
        if ckpts:
            if n_steps is None and getattr(cfg, "max_steps", -1) > 0:
                n_steps = cfg.max_steps
            check_resumable(ckpts[-1], run_settings(cfg), n_steps)
            return ckpts[-1]
        if (out / "final").exists():
            raise ConfigError(f"output_dir={out} holds a finished run (final/) and no checkpoint to resume from: "
                              f"use overwrite=true to train again there, or another output_dir")
        return None
    if used:
        raise ConfigError(f"output_dir={out} already holds a run ({', '.join(used)}): pass resume=true to continue "
                          f"it, overwrite=true to replace it, or choose another output_dir")
    return None


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def save(root: Path, step: int, model, optimizer, *, keep: int = 2, extra: dict | None = None,
         settings: dict | None = None) -> Path:
    """Write checkpoint ``step-NNNNNNNN`` (every process calls this). A model sharded with FSDP2 is written with
    ``torch.distributed.checkpoint`` (:func:`_save_sharded`: each process writes its shard); otherwise the main
    process writes the whole state (:func:`_save_whole`)."""
    from alignkit.train import dist, strategy

    if strategy.is_sharded(model):
        return _save_sharded(root, step, model, optimizer, keep=keep, extra=extra, settings=settings)
    path = root / f"step-{step:08d}"
    if dist.rank() == 0:
        path = _save_whole(root, step, model, optimizer, keep=keep, extra=extra, settings=settings)
    return path


def _save_whole(root: Path, step: int, model, optimizer, *, keep: int = 2, extra: dict | None = None,
                settings: dict | None = None) -> Path:
    """Write checkpoint ``step-NNNNNNNN``; ``extra`` is any state a data source needs to resume (torch.save),
    ``settings`` the run's :func:`run_settings`.

    Written into a temporary directory and renamed into place, so a crash or a full disk never leaves a
    half-written checkpoint that :func:`list_checkpoints` would take. A failed write (a full disk is an
    ``OSError`` from Python, a ``RuntimeError`` from ``torch.save``, a ``SafetensorError`` from safetensors) removes
    the partial directory and raises a :class:`~alignkit.errors.CheckpointError` (an ``OSError``) saying what
    happened and which checkpoint is still the newest.
    ``.tmp-*`` directories left by a process killed while writing are removed first (only the main process writes).
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        if extra:
            torch.save(extra, tmp / "extra.pt")
        state = {"step": step}
        if settings is not None:
            state.update(settings=settings, settings_hash=settings_hash(settings))
        (tmp / "state.json").write_text(json.dumps(state, default=str))
    except (OSError, RuntimeError, SafetensorError) as e:
        code = e.errno if isinstance(e, OSError) else None
        if code is None and shutil.disk_usage(root).free < 2**20:  # torch and safetensors keep no errno
            code = errno.ENOSPC
        reason = (e.strerror if isinstance(e, OSError) else None) or str(e)
        if code == errno.ENOSPC and os.strerror(code) not in reason:
            reason = f"{os.strerror(code)} ({reason})"
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(root)
        kept = (f"the newest complete checkpoint is still {previous[-1]}: fix that and run the same command with "
                f"resume=true to continue from it" if previous else "no earlier checkpoint exists")
        raise CheckpointError(code or errno.EIO, f"could not write checkpoint {final}: {reason}; {kept}") from e
    if final.exists():
        _remove(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        _remove(old)
    return final


def _save_sharded(root: Path, step: int, model, optimizer, *, keep: int, extra: dict | None,
                  settings: dict | None) -> Path:
    """A sharded checkpoint: the model's and the optimizer's shards through ``torch.distributed.checkpoint``
    (each process writes its own files, the main process the metadata), each process's RNG states, then the
    main process's ``extra.pt`` and ``state.json``. All of it goes into a temporary directory that the main
    process renames into place once every process has finished, so a crash mid-write leaves the previous
    checkpoint the newest complete one. ``root`` must be on a file system all processes share."""
    import torch.distributed.checkpoint as dcp

    from alignkit.train import dist

    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if dist.rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    model_sd, optim_sd = _sharded_state(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng-{dist.rank()}.pt")
    dist.barrier()
    if dist.rank() == 0:
        if extra:
            torch.save(extra, tmp / "extra.pt")
        state = {"step": step, "sharded": True, "world_size": dist.world()}
        if settings is not None:
            state.update(settings=settings, settings_hash=settings_hash(settings))
        (tmp / "state.json").write_text(json.dumps(state, default=str))
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            _remove(old)
    dist.barrier()
    return final


def _sharded_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from alignkit.train import strategy

    # the trainable parameters only (a LoRA run saves its adapter), as the unsharded checkpoints do
    return get_state_dict(strategy.root_of(model), optimizer, options=StateDictOptions(ignore_frozen_params=True))


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])


def _load_sharded(path: Path, model, optimizer) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from alignkit.train import dist, strategy

    state = json.loads((path / "state.json").read_text())
    model_sd, optim_sd = _sharded_state(model, optimizer)
    both = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(both, checkpoint_id=str(path))
    set_state_dict(strategy.root_of(model), optimizer, model_state_dict=both["model"],
                   optim_state_dict=both["optimizer"], options=StateDictOptions(ignore_frozen_params=True))
    _set_rng_state(torch.load(path / f"rng-{dist.rank()}.pt", weights_only=False))
    return int(state["step"])


def _remove(path: Path) -> None:
    """Delete a checkpoint directory: renamed to ``.tmp-*`` first, so a kill while deleting leaves no ``step-*``
    directory missing files (with its state.json it would still be listed), only one that the next save removes."""
    trash = path.with_name(f".tmp-old-{path.name}-{os.getpid()}")
    try:
        os.replace(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "state.json").exists())


def load(path: Path, model, optimizer) -> int:
    """Restore parameters, optimizer and RNG from ``path``; returns its step."""
    from alignkit.train import strategy

    sharded = json.loads((path / "state.json").read_text()).get("sharded", False)
    if sharded != strategy.is_sharded(model):
        raise ConfigError(f"cannot resume from {path}: it was written with strategy="
                          f"{'fsdp2' if sharded else 'ddp'}; resume with the same strategy")
    if sharded:
        return _load_sharded(path, model, optimizer)
    state = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint {path} has parameters the model lacks: {missing[:3]}")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "state.json").read_text())["step"]


def load_extra(path: Path) -> dict:
    """The ``extra`` state saved with the checkpoint at ``path`` ({} when there is none)."""
    f = path / "extra.pt"
    return torch.load(f, weights_only=False) if f.exists() else {}
