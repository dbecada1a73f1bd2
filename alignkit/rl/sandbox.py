"""Run untrusted Python (a model's completion and its tests) in a sandboxed subprocess.

:func:`run_python` starts ``python -I -S`` on :mod:`alignkit.rl.sandbox_child` in a fresh temporary directory,
waits at most ``timeout`` seconds, and always ends with every process of the run killed and the directory
removed. What contains the program, outermost first (``SandboxResult.layers`` says which took effect):

- **Namespaces** (when alignkit runs as root and the kernel allows ``unshare``): new pid, mount, IPC, UTS and
  network namespaces. The network namespace has no interface up, not even loopback, so every connection fails.
  The program's pid namespace dies with its init process, which takes every process the program started with
  it. In the mount namespace every mount is read-only except the working directory, a fresh tmpfs of
  ``disk_mb`` owned by the program's user, so nothing written there reaches the disk and nothing outside it can
  be written at all; the directories above the Python installation that other users may not enter are covered by
  a tmpfs that holds only the standard library.
- **An unprivileged user of its own** (as root): each concurrent run gets a user id from a pool
  (``SANDBOX_UID_BASE`` + slot, held by a lock file), so ``RLIMIT_NPROC`` counts this run's processes only (for
  root it counts nothing), and at the end every process of that user is killed wherever it went. With no new
  privileges (``PR_SET_NO_NEW_PRIVS``), set-user-id programs give nothing back.
- **Resource limits** (always): CPU seconds (``RLIMIT_CPU``), address space (``RLIMIT_AS``: ``memory_mb``),
  processes and threads (``RLIMIT_NPROC``), file size (``RLIMIT_FSIZE``), open files, no core dumps.
- **The parent's watch**: stdout and stderr are read as they come; past ``max_output_bytes`` in all, or past
  the wall-clock ``timeout``, the process group is killed with SIGKILL, then every process of the run's user
  (or, without one, of its session) is found in ``/proc`` and killed until none is left.
- **An audit hook** (``audit=True``, installed just before the program runs): refuses process creation,
  signals, ``ctypes``, sockets, and writes outside the working directory. Defence in depth only: audit hooks
  are not a security boundary on their own.

Without root (or without ``unshare``), only the limits, the watch and the audit hook apply: ``RLIMIT_NPROC`` is
then set to the user's current process count plus ``max_processes`` (it counts every process of the user), and
the program's processes are found by their session, which a program can leave with ``setsid``.
docs/code_rewards.md says what was measured on which machine.

``passed`` means the program and then the tests ran to their last statement: a program that leaves early
(``sys.exit``, ``os._exit``, a signal) has not passed, whatever its exit code.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SANDBOX_UID_BASE", "STATUSES", "SandboxResult", "run_python"]

SANDBOX_UID_BASE = 1_870_000_000
"""The first user id a root run uses: runs take ``SANDBOX_UID_BASE + slot``, one slot per concurrent run."""
_UID_SLOTS = 256
_CHILD = Path(__file__).with_name("sandbox_child.py")
_TAIL = 4000  # characters of stdout / stderr kept in a result
STATUSES = ("passed", "failed", "timeout", "memory", "output", "error")


@dataclass(frozen=True)
class SandboxResult:
    """How a run ended.

    ``status``: ``passed`` (ran to the end), ``failed`` (ended with an ``AssertionError``), ``timeout`` (wall-clock
    or CPU limit), ``memory`` (``MemoryError`` under the address-space limit), ``output`` (more than
    ``max_output_bytes`` printed) or ``error`` (any other exception, an early exit, a crash, a harness failure).
    ``error``: the exception the program ended with (``"AssertionError: ..."``), or what stopped it.
    ``records``: the tests' ``sandbox_record(key, ok)`` calls, ``key -> ok`` (all calls with that key passed).
    ``layers``: the isolation that took effect (module docstring); ``seconds``: wall time of the whole run.
    """

    passed: bool
    status: str
    stdout_tail: str
    stderr_tail: str
    seconds: float
    error: str = ""
    records: dict[str, bool] = field(default_factory=dict)
    layers: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------ users and processes


class _UidSlot:
    """A sandbox user id held for one run: slot i of the pool is taken by an exclusive ``flock`` on its lock file,
    so concurrent runs (threads or processes) never share a user id."""

    def __init__(self) -> None:
        folder = Path(tempfile.gettempdir()) / "alignkit-uid-locks"
        folder.mkdir(mode=0o700, exist_ok=True)
        start = secrets.randbelow(_UID_SLOTS)
        for k in range(_UID_SLOTS):
            slot = (start + k) % _UID_SLOTS
            fd = os.open(folder / f"{slot}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.fd, self.uid = fd, SANDBOX_UID_BASE + slot
            _kill_all(lambda info: info[0] == self.uid)  # a crashed run's leftovers
            return
        raise RuntimeError(f"all {_UID_SLOTS} sandbox user ids are in use")

    def release(self) -> None:
        os.close(self.fd)


def _proc_info(pid: str) -> tuple[int, int, int] | None:
    """``(real uid, session id, threads)`` of a process, or None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/status", "rb") as f:
            status = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    if fields[0] == b"Z":
        return None
    uid = threads = -1
    for line in status.splitlines():
        if line.startswith(b"Uid:"):
            uid = int(line.split()[1])
        elif line.startswith(b"Threads:"):
            threads = int(line.split()[1])
    return uid, int(fields[3]), threads


def _processes(match) -> list[tuple[int, tuple[int, int, int]]]:
    """``(pid, (uid, session id, threads))`` of the live processes ``match`` selects (zombies excluded)."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            info = _proc_info(pid)
            if info is not None and match(info):
                out.append((int(pid), info))
    return out


def _kill_all(match, rounds: int = 200) -> None:
    """SIGKILL every process ``match`` selects until a scan finds none (a process may fork between two scans,
    but a killed one cannot, and ``RLIMIT_NPROC`` bounds how many there are)."""
    for _ in range(rounds):
        found = _processes(match)
        if not found:
            return
        for pid, _ in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.005)


def _user_threads(uid: int) -> int:
    return sum(max(1, info[2]) for _, info in _processes(lambda i: i[0] == uid))


# ---------------------------------------------------------------------------------------------------- running


def _tail(data: bytearray) -> str:
    return bytes(data[-_TAIL:]).decode("utf-8", "replace")


def run_python(code: str, *, tests: str = "", timeout: float = 5.0, memory_mb: int = 512, max_processes: int = 16,
               max_file_mb: int = 16, max_output_bytes: int = 1 << 20, network: bool = False, audit: bool = True,
               disk_mb: int = 64, namespaces: bool = True) -> SandboxResult:
    """Run ``code`` and then ``tests`` (Python source) in the sandbox (module docstring); never raises for what
    the program does.

    ``tests`` run in a namespace holding the program's names and ``sandbox_record(key, ok)``, whose calls come back
    in ``SandboxResult.records``; the program itself cannot see that function. ``timeout``: wall-clock seconds for
    the whole run (the CPU limit is the same, rounded up); ``memory_mb``: address space of the program's process;
    ``max_processes``: processes and threads of its user; ``max_file_mb``: the largest file it may write;
    ``max_output_bytes``: stdout and stderr together; ``network``: keep the host's network (off by default);
    ``audit``: install the audit hook; ``disk_mb``: size of the working directory's tmpfs (mount namespace only);
    ``namespaces``: enter new namespaces where possible (False measures the other layers alone).
    """
    start = time.monotonic()
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="alignkit-sandbox-"))
    slot = proc = None
    read_fd = write_fd = -1
    stdout, stderr, lines = bytearray(), bytearray(), bytearray()
    killed_for = ""
    try:
        slot = _UidSlot() if os.geteuid() == 0 else None
        if slot is not None:
            os.chown(workdir, slot.uid, slot.uid)
        nproc = max_processes if slot is not None else _user_threads(os.getuid()) + max_processes
        nonce = secrets.token_hex(16)
        read_fd, write_fd = os.pipe()
        cfg = {"code": code, "tests": tests, "nonce": nonce, "result_fd": write_fd, "workdir": workdir,
               "uid": None if slot is None else slot.uid, "namespaces": namespaces, "network": network, "audit": audit,
               "disk_mb": disk_mb,
               "limits": {"cpu": max(1, math.ceil(timeout)), "memory": memory_mb << 20, "file": max_file_mb << 20,
                          "files": 64, "nproc": nproc}}
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", str(_CHILD)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir, env=env,
                                    pass_fds=(write_fd,), start_new_session=True)
        finally:
            os.close(write_fd)
        try:
            proc.stdin.write(json.dumps(cfg).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        killed_for = _watch(proc, read_fd, stdout, stderr, lines, start + timeout, max_output_bytes)
    finally:
        _end(proc, slot)
        for f in ((proc.stdout, proc.stderr) if proc is not None else ()):
            f.close()
        if read_fd >= 0:
            os.close(read_fd)
        if slot is not None:
            slot.release()
        shutil.rmtree(workdir, ignore_errors=True)
    return _result(nonce, bytes(lines), stdout, stderr, killed_for, time.monotonic() - start, cfg["limits"]["cpu"])


def _watch(proc, result_fd: int, stdout: bytearray, stderr: bytearray, lines: bytearray, deadline: float,
           max_output: int) -> str:
    """Read the three pipes until the launcher exits; ``"timeout"`` or ``"output"`` if it had to be killed."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, stdout)
    sel.register(proc.stderr, selectors.EVENT_READ, stderr)
    sel.register(result_fd, selectors.EVENT_READ, lines)
    total = 0
    exited_at = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                return "timeout"
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            elif exited_at is not None and now - exited_at > 0.2:
                return ""  # the launcher is gone; what still holds a pipe is killed in _end
            for key, _ in sel.select(min(deadline - now, 0.05)):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = key.data
                buf += chunk
                if buf is not lines:
                    total += len(chunk)
                    del buf[: max(0, len(buf) - _TAIL)]
                    if total > max_output:
                        return "output"
                elif len(buf) > (1 << 20):  # the harness's own lines are short; more is not ours
                    return "output"
        return ""
    finally:
        sel.close()


def _end(proc, slot: _UidSlot | None) -> None:
    """Kill every process of the run's user (or, without one, of its session), then the process group (the
    launcher and init, which reap what the first sweep killed), and reap the launcher."""
    if proc is None:
        return
    if slot is not None:
        _kill_all(lambda info: info[0] == slot.uid)
    else:
        _kill_all(lambda info: info[1] == proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _result(nonce: str, raw: bytes, stdout: bytearray, stderr: bytearray, killed_for: str, seconds: float,
            cpu_limit: float) -> SandboxResult:
    report: dict[str, str] = {}
    records: dict[str, bool] = {}
    prefix = nonce + " "
    for line in raw.decode("utf-8", "replace").splitlines():
        if not line.startswith(prefix):
            continue
        kind, _, text = line[len(prefix):].partition(" ")
        if kind == "record":
            key, _, ok = text.rpartition(" ")
            try:
                key = json.loads(key)
            except json.JSONDecodeError:
                continue
            records[key] = records.get(key, True) and ok == "1"
        else:
            report.setdefault(kind, text)
    error = report.get("error", "")
    if killed_for:
        status = killed_for
        error = error or ("wall-clock limit" if killed_for == "timeout" else "output limit")
    elif "done" in report:
        status = "passed"
    elif error.startswith("AssertionError"):
        status = "failed"
    elif error.startswith("MemoryError"):
        status = "memory"
    elif report.get("signal") == str(int(signal.SIGXCPU)) or (
            report.get("signal") == str(int(signal.SIGKILL)) and float(report.get("cpu", 0)) >= cpu_limit):
        status, error = "timeout", error or f"CPU limit (signal {report['signal']})"
    else:
        status = "error"
        error = error or report.get("harness") or (f"signal {report['signal']}" if "signal" in report else
                                                   f"exit {report.get('exit', '?')} before the end")
    layers = tuple(report.get("layers", "").split())
    return SandboxResult(status == "passed", status, _tail(stdout), _tail(stderr), seconds, error, records, layers)
