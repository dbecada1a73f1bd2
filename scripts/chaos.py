#!/usr/bin/env python
"""Chaos test of checkpoints and resume: kill real training runs at random moments and check that resuming them
reproduces the uninterrupted run bit for bit.

For each method (SFT, DPO, GRPO on the toy data of ``tests/_toy.py``, the tiny model, a checkpoint every step):

- a reference run, uninterrupted;
- kill trials: start the run and ``kill -9`` it at a seeded random moment (while a checkpoint is being written or
  old ones deleted, after a random step, at a random time, while ``final/`` is written, or during start-up; the
  first kill of the trials cycles through these, :data:`KILL_MODES`); check what is left in
  ``checkpoints/``; rerun the same command with ``resume=true``, killed again 0 or 1 more times; let it finish;
- a SIGTERM trial: exit code 143, a checkpoint at the step where it stopped, a message naming ``resume=true``;
- a full-disk trial: a checkpoint write fails with ENOSPC (a small tmpfs when this process may mount one, else a
  writer made to fail); the run must exit 1 with a message saying so and no traceback, keep the previous
  checkpoint intact, leave no partial directory, and resume once the space is back.

Checked after every kill: every ``step-*`` directory under ``checkpoints/`` holds all its files and they load
(the tensors match the reference's names, shapes and dtypes). Checked for every finished run: ``metrics.jsonl``
has one line per step 1..N whose values (all keys but timings) equal the reference's bit for bit,
``final/model.safetensors`` holds the reference's tensors bit for bit, no ``.tmp-*`` directory is left behind, and
a resumed run said it resumed from the newest complete checkpoint.

Runs are ``python -m alignkit.cli ...`` processes (``--launch exec``, the default) or, with ``--launch fork``, the
same ``alignkit.cli.main`` in processes forked from a server that imported alignkit once, which start in a
fraction of a second instead of 10-20 s of imports (``tests/test_chaos.py`` uses that).

    python scripts/chaos.py --trials 20 [--seed 0] [--methods sft,dpo,grpo] [--keep] [--launch exec|fork]

Exit code 0 when every check passed, 1 otherwise (each failed check is listed under the table).
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parents[1]
TOY = ROOT / "tests" / "_toy.py"
CKPT_FILES = ("trainable.safetensors", "optimizer.pt", "rng.pt", "state.json")
TIMING = re.compile(r"(^|/)(seconds|tokens_per_s)$|^time/")  # metric keys that measure time: not compared
# write: as soon as a checkpoint's .tmp-step-* directory appears; write+: 0-4 ms later (another file, the rename);
# rotate: as soon as it is renamed into place (older checkpoints are being deleted); step: after a random step;
# time: at a random time of the training; final: while final/ is written; startup: before training starts.
KILL_MODES = ("write", "write+", "rotate", "step", "time", "final", "startup")
PAGE = 4096


# ------------------------------------------------------------------------------------------------ the runs


@dataclass
class Method:
    name: str
    argv: list[str]  # the CLI arguments, output_dir excepted
    steps: int
    extra: bool  # checkpoints hold extra.pt (the rollout source's state)


def _toy():
    spec = importlib.util.spec_from_file_location("_chaos_toy", TOY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def methods(data_dir: Path) -> dict[str, Method]:
    """The three runs, on toy data written into ``data_dir``; a checkpoint every step (kills land in writes)."""
    toy = _toy()
    common = ["model=tiny", "progress=false", "seed=1", "save_steps=1"]
    sft = ["sft", f"data={toy.sft_jsonl(data_dir, n=32)}", *common, "batch_size=4", "lr=1e-3", "max_steps=10"]
    dpo = ["dpo", f"data={toy.preference_jsonl(data_dir, n=32)}", *common, "batch_size=4", "lr=1e-3", "max_steps=10"]
    # two passes of two mini-batches over each rollout: kills land in the middle of a rollout too
    grpo = ["grpo", f"data={toy.prompt_jsonl(data_dir, n=32)}", *common, f"rewards={TOY}:max_digit_reward",
            "max_new_tokens=2", "rollout_precision=fp32", "prompts_per_step=4", "num_generations=4", "ppo_epochs=2",
            "mini_batches=2", "lr=3e-2", "scheduler=constant", "max_steps=12"]
    return {"sft": Method("sft", sft, 10, False), "dpo": Method("dpo", dpo, 10, False),
            "grpo": Method("grpo", grpo, 12, True)}


def _install_fault(fault: str) -> None:
    """``enospc:K``: the K-th checkpoint's optimizer.pt is half written, then the write fails with ENOSPC."""
    kind, k = fault.split(":")
    assert kind == "enospc", fault
    import torch

    real, calls = torch.save, {"n": 0}

    def save(obj, f, *args, **kwargs):
        p = Path(f) if isinstance(f, (str, os.PathLike)) else None
        if p is not None and p.name == "optimizer.pt" and p.parent.name.startswith(".tmp-step-"):
            calls["n"] += 1
            if calls["n"] == int(k):
                real(obj, f, *args, **kwargs)
                with open(p, "r+b") as fh:
                    fh.truncate(p.stat().st_size // 2)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(p))
        return real(obj, f, *args, **kwargs)

    torch.save = save  # checkpoint.py calls torch.save through the module


def _child(argv: list[str], out_path: str, err_path: str, fault: str | None) -> None:
    """A forked run: stdout/stderr to files, ``alignkit.cli.main(argv)``, exit with its code."""
    for fd, path in ((1, out_path), (2, err_path)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    code = 1
    try:
        if fault:
            _install_fault(fault)
        from alignkit.cli import main

        code = main(list(argv))
    except BaseException:  # noqa: BLE001 (reported like the interpreter would)
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class _Popen:
    def __init__(self, p: subprocess.Popen):
        self.p, self.pid = p, p.pid

    def poll(self):
        return self.p.poll()

    def wait(self, timeout: float):
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def send(self, sig: int) -> None:
        self.p.send_signal(sig)


class _Forked:
    def __init__(self, p):
        self.p, self.pid = p, p.pid

    def poll(self):
        return self.p.exitcode

    def wait(self, timeout: float):
        self.p.join(timeout)
        return self.p.exitcode

    def send(self, sig: int) -> None:
        if self.p.exitcode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # it ended in between
                pass


class ExecLauncher:
    """Each run is ``python -m alignkit.cli ARGS`` (with a fault: this script's ``--child`` entry)."""

    name = "exec"
    timeout = 900.0

    def start(self, argv: list[str], log: Path, fault: str | None = None):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "alignkit.cli", *argv]
        if fault:
            cmd = [sys.executable, str(SCRIPT), "--child", fault, "--", *argv]
        with open(f"{log}.out", "ab") as out, open(f"{log}.err", "ab") as err:
            return _Popen(subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=ROOT))

    def close(self) -> None:
        pass


class ForkLauncher:
    """Each run is ``alignkit.cli.main(ARGS)`` in a process forked from a server that has imported alignkit."""

    name = "fork"
    timeout = 300.0

    def __init__(self):
        import multiprocessing

        os.environ["OMP_NUM_THREADS"] = "1"  # before the server starts: it and its children inherit it
        if str(SCRIPT.parent) not in sys.path:
            sys.path.insert(0, str(SCRIPT.parent))  # the server imports this module to run _child
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["torch", "safetensors.torch", "alignkit.cli", "alignkit.recipes.sft",
                                         "alignkit.recipes.dpo", "alignkit.recipes.rl"])

    def start(self, argv: list[str], log: Path, fault: str | None = None):
        p = self.ctx.Process(target=_child, args=(list(argv), f"{log}.out", f"{log}.err", fault))
        p.start()
        return _Forked(p)

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------ what a run left


def history(out: Path) -> list[dict]:
    """metrics.jsonl's records (a line still being written is skipped)."""
    rows = []
    try:
        text = (out / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return rows
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def last_step(out: Path) -> int:
    h = history(out)
    return int(h[-1]["step"]) if h else 0


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def compare_metrics(ref: list[dict], got: list[dict], steps: int) -> list[str]:
    """Problems: a missing or repeated step, a metric that differs from the reference's by any amount."""
    problems = []
    got_steps = [r.get("step") for r in got]
    if got_steps != list(range(1, steps + 1)):
        problems.append(f"metrics.jsonl steps are {got_steps}, not 1..{steps} once each")
    by_step = {r.get("step"): r for r in got}
    for r in ref:
        g = by_step.get(r["step"])
        if g is None:
            continue
        keys = {k for k in r if not TIMING.search(k)} | {k for k in g if not TIMING.search(k)}
        diff = [f"{k}: {r.get(k)!r} vs {g.get(k)!r}" for k in sorted(keys) if not _same(r.get(k), g.get(k))]
        if diff:
            problems.append(f"step {r['step']} differs from the reference: {'; '.join(diff[:4])}")
    return problems


def compare_weights(ref_file: Path, got_file: Path) -> list[str]:
    """Problems: a tensor of ``got_file`` that is not bit for bit the one in ``ref_file``."""
    import torch
    from safetensors.torch import load_file

    if not got_file.exists():
        return [f"{got_file} is missing"]
    a, b = load_file(str(ref_file)), load_file(str(got_file))
    if sorted(a) != sorted(b):
        return [f"{got_file} holds other tensors than the reference: {sorted(set(a) ^ set(b))[:4]}"]
    diff = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    return [f"{got_file}: {len(diff)} tensors differ from the reference, e.g. {diff[:3]}"] if diff else []


def check_checkpoints(root: Path, template: Path | None, extra: bool) -> list[str]:
    """Problems with the ``step-*`` directories under ``root``: a missing file, a file that does not load, a
    state.json that does not name its step, tensors unlike ``template``'s (a reference checkpoint's trainable
    file), and a listed checkpoint (``list_checkpoints``) that is not complete."""
    import torch
    from safetensors.torch import load_file

    from alignkit.train.checkpoint import list_checkpoints

    problems = []
    if not root.is_dir():
        return problems
    want = CKPT_FILES + (("extra.pt",) if extra else ())
    shapes = None
    if template is not None:
        shapes = {k: (v.dtype, tuple(v.shape)) for k, v in load_file(str(template)).items()}
    complete = set()
    for d in sorted(p for p in root.iterdir() if p.name.startswith("step-")):
        missing = [f for f in want if not (d / f).is_file()]
        if missing:
            problems.append(f"{d.name} lacks {', '.join(missing)} (has {sorted(p.name for p in d.iterdir())})")
            continue
        try:
            tensors = load_file(str(d / "trainable.safetensors"))
            if shapes is not None and {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} != shapes:
                problems.append(f"{d.name}/trainable.safetensors holds other tensors than the reference's")
            opt = torch.load(d / "optimizer.pt", weights_only=False)
            assert "state" in opt and "param_groups" in opt, "not an optimizer state"
            rng = torch.load(d / "rng.pt", weights_only=False)
            assert set(rng) == {"torch", "python", "numpy"}, f"rng.pt keys {sorted(rng)}"
            state = json.loads((d / "state.json").read_text())
            assert state["step"] == int(d.name.split("-")[1]), f"state.json says step {state['step']}"
            assert "settings_hash" in state, "state.json records no settings"
            if extra:
                torch.load(d / "extra.pt", weights_only=False)
        except Exception as e:  # noqa: BLE001
            problems.append(f"{d.name} does not load: {type(e).__name__}: {str(e)[:200]}")
            continue
        complete.add(d)
    for d in list_checkpoints(root):
        if d not in complete:
            problems.append(f"list_checkpoints() takes {d.name}, which is not complete")
    return problems


def newest_checkpoint(root: Path) -> int:
    from alignkit.train.checkpoint import list_checkpoints

    ckpts = list_checkpoints(root)
    return int(ckpts[-1].name.split("-")[1]) if ckpts else 0


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob(".tmp-*")) if root.is_dir() else []


def disk_bytes(path: Path) -> int:
    """What the files under ``path`` take on a tmpfs (whole pages)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in files)


# ------------------------------------------------------------------------------------------------ trials


@dataclass
class Reference:
    out: Path
    metrics: list[dict]
    weights: Path
    template: Path  # a checkpoint's trainable.safetensors
    t_start: float  # launch -> training starts (metrics.jsonl written)
    t_train: float  # training starts -> last step logged
    t_final: float  # last step logged -> exit


@dataclass
class Trial:
    method: str
    kind: str  # kill, sigterm, enospc-tmpfs, enospc-inject
    kills: int = 0
    in_write: int = 0  # kills that left this process's .tmp-* behind: it died inside checkpoint.save()
    resumes: int = 0
    modes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Lab:
    """Runs the trials of one session in ``work`` with one launcher; references are made once per method."""

    def __init__(self, work: Path, launcher, seed: int = 0, log=print):
        self.work, self.launcher, self.log = Path(work), launcher, log
        self.rng = random.Random(seed)
        self.methods = methods(self.work / "data")
        self.refs: dict[str, Reference] = {}
        self.counter = 0

    # ---- running
    def _dir(self, method: str, kind: str) -> Path:
        self.counter += 1
        d = self.work / method / f"{self.counter:03d}-{kind}"
        (d / "logs").mkdir(parents=True)
        return d

    def _argv(self, method: str, out: Path, *more: str) -> list[str]:
        return [*self.methods[method].argv, f"output_dir={out}", *more]

    def _start(self, argv: list[str], log: Path, fault: str | None = None):
        proc = self.launcher.start(argv, log, fault)
        return proc, time.time_ns(), time.monotonic()

    def _finish(self, proc, t0: float, trial: Trial, what: str) -> int | None:
        rc = proc.wait(max(1.0, self.launcher.timeout - (time.monotonic() - t0)))
        if rc is None:
            proc.send(signal.SIGKILL)
            proc.wait(30)
            trial.problems.append(f"{what}: still running after {self.launcher.timeout:.0f} s (a hang): killed")
        return rc

    def reference(self, method: str) -> Reference:
        if method in self.refs:
            return self.refs[method]
        d = self._dir(method, "reference")
        out, m = d / "out", self.methods[method]
        proc, launch_ns, t0 = self._start(self._argv(method, out), d / "logs" / "run")
        t_start = t_last = None
        while proc.poll() is None:
            now = time.monotonic()
            if t_start is None and _started(out, launch_ns):
                t_start = now
            if t_last is None and last_step(out) >= m.steps:
                t_last = now
            if now - t0 > self.launcher.timeout:
                break
            time.sleep(0.005)
        rc = proc.wait(30)
        t_end = time.monotonic()
        if rc != 0:
            raise RuntimeError(f"{method} reference run failed (exit {rc}): {_tail(d / 'logs' / 'run.err')}")
        t_start = t_start or t_end
        t_last = t_last or t_end
        ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
        ref = Reference(out, history(out), out / "final" / "model.safetensors", ckpt / "trainable.safetensors",
                        t_start - t0, max(t_last - t_start, 0.05), max(t_end - t_last, 0.05))
        self.log(f"  {method}: reference run {t_end - t0:.1f} s (start-up {ref.t_start:.1f} s, "
                 f"{m.steps} steps {ref.t_train:.2f} s, final/ and exit {ref.t_final:.2f} s)")
        self.refs[method] = ref
        return ref

    def _check_finished(self, trial: Trial, ref: Reference, out: Path, rc, err: Path, resumed_from: int | None):
        m = self.methods[trial.method]
        if rc != 0:
            trial.problems.append(f"the last run exited {rc}: {_tail(err)}")
            return
        trial.problems += compare_metrics(ref.metrics, history(out), m.steps)
        trial.problems += compare_weights(ref.weights, out / "final" / "model.safetensors")
        trial.problems += check_checkpoints(out / "checkpoints", ref.template, m.extra)
        left = leftovers(out / "checkpoints")
        if left:
            trial.problems.append(f"a finished run left partial checkpoint directories behind: {left}")
        if resumed_from is not None:
            text = err.read_text(errors="replace")
            said = re.findall(r"resumed from step-(\d+)", text)
            if resumed_from == 0 and said:
                trial.problems.append(f"resumed from step-{said[-1]} though no complete checkpoint existed")
            elif resumed_from > 0 and (not said or int(said[-1]) != resumed_from):
                trial.problems.append(f"resumed from {('step-' + said[-1]) if said else 'nothing'}, "
                                      f"not the newest complete checkpoint step-{resumed_from:08d}")

    def _kill(self, proc, launch_ns: int, t0: float, out: Path, mode: str, ref: Reference, steps: int,
              r: list[float]) -> bool:
        """Wait for the moment ``mode`` names (``r``: this kill's random numbers), then SIGKILL; False when the
        run ended first."""
        ckpts = out / "checkpoints"
        tag = f"-{proc.pid}"

        def wait(cond, fast: bool, limit: float) -> bool:
            end = time.monotonic() + limit
            while proc.poll() is None and time.monotonic() < end:
                if cond():
                    return True
                time.sleep(0.0002 if fast else 0.01)
            return False

        started = lambda: _started(out, launch_ns)  # noqa: E731
        if mode == "startup":
            time.sleep(r[0] * ref.t_start)
        elif not wait(started, False, self.launcher.timeout):
            return False
        elif mode in ("write", "write+", "rotate"):
            def writing():
                try:
                    return any(n.startswith(".tmp-step-") and n.endswith(tag) for n in os.listdir(ckpts))
                except FileNotFoundError:
                    return False
            if not wait(writing, True, self.launcher.timeout):
                return False
            if mode == "write+":
                time.sleep(r[0] * 0.004)
            elif mode == "rotate" and not wait(lambda: not writing(), True, self.launcher.timeout):
                return False
        elif mode == "step":
            s0 = last_step(out)
            k = min(steps - 1, s0 + 1 + int(r[0] * max(0, steps - 1 - s0)))
            if not wait(lambda: last_step(out) >= k, True, self.launcher.timeout):
                return False
            time.sleep(r[1] * ref.t_train / steps)
        elif mode == "time":
            time.sleep(r[0] * (ref.t_train + ref.t_final))
        elif mode == "final":
            if not wait(lambda: last_step(out) >= steps, True, self.launcher.timeout):
                return False
            time.sleep(r[0] * ref.t_final)
        if proc.poll() is not None:
            return False
        proc.send(signal.SIGKILL)
        return True

    def kill_trial(self, method: str, modes: list[str] | None = None) -> Trial:
        """``kill -9`` the run (once or twice, ``modes`` or random), resuming after each kill, then finish it."""
        ref, m = self.reference(method), self.methods[method]
        rng = random.Random(self.rng.random())
        if modes is None:
            modes = [rng.choice(KILL_MODES) for _ in range(rng.randint(1, 2))]
        trial, d, t_trial = Trial(method, "kill", modes=list(modes)), self._dir(method, "kill"), time.monotonic()
        out, resume, resumed_from = d / "out", [], None
        for i, mode in enumerate(modes):
            r = [rng.random() for _ in range(2)]
            proc, launch_ns, t0 = self._start(self._argv(method, out, *resume), d / "logs" / f"run{i}")
            killed = self._kill(proc, launch_ns, t0, out, mode, ref, m.steps, r)
            rc = self._finish(proc, t0, trial, f"run {i}")
            if killed and rc == -signal.SIGKILL:
                trial.kills += 1
                if any(n.endswith(f"-{proc.pid}") for n in leftovers(out / "checkpoints")):
                    trial.in_write += 1
                problems = check_checkpoints(out / "checkpoints", ref.template, m.extra)
                trial.problems += [f"after kill {i + 1} ({mode}): {p}" for p in problems]
            elif rc != 0:
                trial.problems.append(f"run {i} ({mode}) exited {rc}: {_tail(d / 'logs' / f'run{i}.err')}")
            if resume:
                trial.resumes += 1
            self._check_resumed(trial, resumed_from, d / "logs" / f"run{i}.err", killed)
            resume, resumed_from = ["resume=true"], newest_checkpoint(out / "checkpoints")
        proc, _, t0 = self._start(self._argv(method, out, "resume=true"), d / "logs" / "last")
        rc = self._finish(proc, t0, trial, "the last run")
        trial.resumes += 1
        self._check_finished(trial, ref, out, rc, d / "logs" / "last.err", resumed_from)
        trial.seconds = time.monotonic() - t_trial
        return trial

    def _check_resumed(self, trial: Trial, resumed_from: int | None, err: Path, killed: bool) -> None:
        """A killed resumed run must still have taken the newest complete checkpoint (if it got that far)."""
        if resumed_from is None or not resumed_from:
            return
        said = re.findall(r"resumed from step-(\d+)", err.read_text(errors="replace"))
        if said and int(said[-1]) != resumed_from:
            trial.problems.append(f"resumed from step-{said[-1]}, not the newest complete step-{resumed_from:08d}")
        elif not said and not killed:
            trial.problems.append(f"a resumed run did not say it resumed from step-{resumed_from:08d}")

    def sigterm_trial(self, method: str) -> Trial:
        """SIGTERM after a random step: exit 143, a checkpoint at the step it stopped, resume=true named; the
        resumed run equals the reference."""
        ref, m = self.reference(method), self.methods[method]
        rng = random.Random(self.rng.random())
        trial, d, t_trial = Trial(method, "sigterm"), self._dir(method, "sigterm"), time.monotonic()
        out, k = d / "out", rng.randint(1, m.steps - 3)  # the stop lands at step k+1 <= steps-2: not the last
        proc, launch_ns, t0 = self._start(self._argv(method, out), d / "logs" / "run")
        while proc.poll() is None and last_step(out) < k and time.monotonic() - t0 < self.launcher.timeout:
            time.sleep(0.0002 if _started(out, launch_ns) else 0.01)
        proc.send(signal.SIGTERM)
        rc = self._finish(proc, t0, trial, "the SIGTERM run")
        err = (d / "logs" / "run.err").read_text(errors="replace")
        stopped = last_step(out)
        trial.kills = 1
        if rc != 128 + signal.SIGTERM:
            trial.problems.append(f"SIGTERM after step {k}: exit {rc}, not 143: {_tail(d / 'logs' / 'run.err')}")
        for needle in ("SIGTERM", "resume=true", f"step-{stopped:08d}"):
            if needle not in err:
                trial.problems.append(f"the SIGTERM message does not name {needle!r}: {_tail(d / 'logs' / 'run.err')}")
        if "Traceback" in err:
            trial.problems.append("SIGTERM printed a traceback")
        if newest_checkpoint(out / "checkpoints") != stopped or stopped <= k - 1:
            trial.problems.append(f"stopped after step {stopped} (signal after step {k}) but the newest checkpoint "
                                  f"is step {newest_checkpoint(out / 'checkpoints')}")
        trial.problems += check_checkpoints(out / "checkpoints", ref.template, m.extra)
        proc, _, t0 = self._start(self._argv(method, out, "resume=true"), d / "logs" / "last")
        rc = self._finish(proc, t0, trial, "the resumed run")
        trial.resumes = 1
        self._check_finished(trial, ref, out, rc, d / "logs" / "last.err", stopped)
        trial.seconds = time.monotonic() - t_trial
        return trial

    def disk_full_trial(self, method: str, how: str = "auto") -> Trial:
        """A checkpoint write fails with ENOSPC: ``tmpfs`` (output_dir on a tmpfs too small for the K-th
        checkpoint; needs root), ``inject`` (the K-th checkpoint's optimizer.pt half written, then OSError
        ENOSPC), or ``auto`` (tmpfs when it can be mounted)."""
        if how == "auto":
            how = "tmpfs" if can_mount_tmpfs(self.work) else "inject"
        ref, m = self.reference(method), self.methods[method]
        rng = random.Random(self.rng.random())
        trial, d, t_trial = Trial(method, f"enospc-{how}"), self._dir(method, f"enospc-{how}"), time.monotonic()
        k = rng.randint(3, m.steps - 2)  # the checkpoint that fails; k-1 earlier ones exist
        mnt, fault, keep_all = None, None, ["save_total_limit=0"]  # keep every checkpoint: the disk fills at step k
        out = d / "out"
        try:
            if how == "tmpfs":
                mnt = d / "mnt"
                mnt.mkdir()
                ckpt = disk_bytes(ref.template.parent)
                base = disk_bytes(ref.out) - disk_bytes(ref.out / "checkpoints") - disk_bytes(ref.out / "final")
                size = base + 8 * PAGE + (k - 1) * ckpt + int(rng.uniform(0.1, 0.9) * ckpt)
                _mount(mnt, size)
                out = mnt / "out"
            else:
                fault = f"enospc:{k}"
            proc, _, t0 = self._start(self._argv(method, out, *keep_all), d / "logs" / "run", fault)
            rc = self._finish(proc, t0, trial, "the full-disk run")
            err = (d / "logs" / "run.err").read_text(errors="replace")
            newest = newest_checkpoint(out / "checkpoints")
            if rc != 1:
                trial.problems.append(f"full disk at checkpoint {k}: exit {rc}, not 1: {_tail(d / 'logs' / 'run.err')}")
            if newest != k - 1:
                trial.problems.append(f"the newest checkpoint is step {newest}, not {k - 1} (the one before the "
                                      f"failed write): {_tail(d / 'logs' / 'run.err')}")
            message = [ln for ln in err.splitlines() if "could not write checkpoint" in ln]
            if not message:
                trial.problems.append(f"no message says a checkpoint could not be written: "
                                      f"{_tail(d / 'logs' / 'run.err')}")
            else:
                for needle in ("No space left on device", f"step-{k - 1:08d}", "resume=true"):
                    if needle not in message[-1]:
                        trial.problems.append(f"the error does not say {needle!r}: {message[-1][:300]}")
            if "Traceback" in err:
                n = err.count("\n", err.index("Traceback"))
                trial.problems.append(f"the full-disk error comes with a traceback ({n} lines), not just a message")
            left = leftovers(out / "checkpoints")
            if left:
                trial.problems.append(f"the failed write left {left} on the full disk")
            trial.problems += check_checkpoints(out / "checkpoints", ref.template, m.extra)
            if mnt is not None:
                _mount(mnt, 1 << 30, remount=True)  # space is back
            proc, _, t0 = self._start(self._argv(method, out, *keep_all, "resume=true"), d / "logs" / "last")
            rc = self._finish(proc, t0, trial, "the resumed run")
            trial.resumes = 1
            self._check_finished(trial, ref, out, rc, d / "logs" / "last.err", newest)
        finally:
            if mnt is not None:
                if os.environ.get("CHAOS_KEEP"):
                    shutil.copytree(mnt / "out", d / "out", dirs_exist_ok=True)
                subprocess.run(["umount", str(mnt)], check=False)
        trial.seconds = time.monotonic() - t_trial
        return trial


def _started(out: Path, launch_ns: int) -> bool:
    """Training has begun in this run: metrics.jsonl was (re)written since it was launched."""
    try:
        return (out / "metrics.jsonl").stat().st_mtime_ns >= launch_ns
    except FileNotFoundError:
        return False


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except FileNotFoundError:
        return "(no output)"
    return " | ".join(lines[-n:])[-600:]


def _mount(mnt: Path, size: int, remount: bool = False) -> None:
    size = -(-size // PAGE) * PAGE
    opts = f"remount,size={size}" if remount else f"size={size}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], check=True, capture_output=True)


def can_mount_tmpfs(work: Path) -> bool:
    probe = Path(tempfile.mkdtemp(prefix="tmpfs-probe-", dir=work))
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True)
        if r.returncode != 0:
            return False
        subprocess.run(["umount", str(probe)], check=False)
        return True
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        shutil.rmtree(probe, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ the session


def table(trials: list[Trial]) -> str:
    rows = [("method", "trial", "trials", "kills", "in write", "resumes", "all equal", "seconds")]
    for method in dict.fromkeys(t.method for t in trials):
        for kind in dict.fromkeys(t.kind for t in trials if t.method == method):
            ts = [t for t in trials if t.method == method and t.kind == kind]
            rows.append((method, kind, str(len(ts)), str(sum(t.kills for t in ts)), str(sum(t.in_write for t in ts)),
                         str(sum(t.resumes for t in ts)), "no" if any(t.problems for t in ts) else "yes",
                         f"{sum(t.seconds for t in ts):.0f}"))
    rows.append(("all", "", str(len(trials)), str(sum(t.kills for t in trials)), str(sum(t.in_write for t in trials)),
                 str(sum(t.resumes for t in trials)), "no" if any(t.problems for t in trials) else "yes",
                 f"{sum(t.seconds for t in trials):.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:  # exec launcher with a fault: install it, then be the CLI
        fault, rest = argv[1], argv[3:]
        _install_fault(fault)
        from alignkit.cli import main as cli

        return cli(rest)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20, help="kill trials in all, split over the methods")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="sft,dpo,grpo")
    p.add_argument("--keep", action="store_true", help="keep the work directory (its path is printed)")
    p.add_argument("--launch", choices=("exec", "fork"), default="exec",
                   help="exec: python -m alignkit.cli per run; fork: forked from a server that imported alignkit")
    p.add_argument("--disk", choices=("auto", "tmpfs", "inject"), default="auto",
                   help="how the full-disk trial fills the disk (auto: tmpfs when it can be mounted)")
    args = p.parse_args(argv)
    names = [m for m in args.methods.split(",") if m]
    os.environ["OMP_NUM_THREADS"] = "1"
    work = Path(tempfile.mkdtemp(prefix="alignkit-chaos-"))
    if args.keep:
        os.environ["CHAOS_KEEP"] = "1"
    launcher = ExecLauncher() if args.launch == "exec" else ForkLauncher()
    t0 = time.monotonic()
    print(f"chaos: {args.trials} kill trials over {', '.join(names)}, seed {args.seed}, launch={launcher.name}, "
          f"work dir {work}", flush=True)
    lab = Lab(work, launcher, args.seed, log=lambda s: print(s, flush=True))
    unknown = [n for n in names if n not in lab.methods]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {sorted(lab.methods)}")
    trials: list[Trial] = []

    def record(t: Trial) -> None:
        trials.append(t)
        mark = "ok" if not t.problems else f"{len(t.problems)} PROBLEMS"
        detail = f" modes={','.join(t.modes)}" if t.modes else ""
        print(f"  {t.method} {t.kind}{detail}: kills={t.kills} in_write={t.in_write} resumes={t.resumes} "
              f"{t.seconds:.1f} s {mark}", flush=True)
        for problem in t.problems:
            print(f"    - {problem}", flush=True)

    try:
        per = [args.trials // len(names) + (i < args.trials % len(names)) for i in range(len(names))]
        for name, n in zip(names, per):
            print(f"{name}:", flush=True)
            lab.reference(name)
            for i in range(n):
                first = KILL_MODES[i % len(KILL_MODES)]  # every mode is tried; the second kill (if any) is random
                rng = random.Random(lab.rng.random())
                modes = [first] + ([rng.choice(KILL_MODES)] if rng.random() < 0.5 else [])
                record(lab.kill_trial(name, modes))
            record(lab.sigterm_trial(name))
            record(lab.disk_full_trial(name, args.disk))
    finally:
        launcher.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(trials))
    bad = [t for t in trials if t.problems]
    print(f"\n{len(trials)} trials, {len(bad)} with problems, {time.monotonic() - t0:.0f} s"
          + (f"; work dir kept: {work}" if args.keep else ""))
    for t in bad:
        print(f"\n{t.method} {t.kind} {','.join(t.modes)}:")
        for problem in t.problems:
            print(f"  - {problem}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
