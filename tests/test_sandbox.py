"""The code sandbox (alignkit.rl.sandbox): hostile programs are contained, end in time and leave nothing behind.

Each hostile program runs twice: as the code reward runs it (every layer, the audit hook included) and with the
audit hook off, so that the kernel's layers are shown to contain it alone. After every run no process of a
sandbox user or launcher is left, no temporary directory remains, nothing was written outside and nothing
reached the listening socket. The fork bombs run only where containment is known to hold (a user id of the
run's own as root, or RLIMIT_NPROC counting the user's processes otherwise) and, where the machine allows it,
inside a pids cgroup capped at 512 tasks as an outer guard.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from alignkit.rl import sandbox
from alignkit.rl.sandbox import SANDBOX_UID_BASE, run_python

ROOT = os.geteuid() == 0
SLACK = 2.5  # seconds past a limit for the kill, the sweep and the clean-up on a busy 2-core machine
LIMIT = 2.0  # the hostile programs' wall-clock limit
NAMESPACES = {"pid-namespace", "mount-namespace", "network-namespace", "tmpfs-workdir", "read-only-mounts"}


def _uid_of(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def leftovers() -> list[str]:
    """Processes of a sandbox user (zombies included) or a sandbox launcher still running."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        uid = _uid_of(pid)
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if (uid is not None and SANDBOX_UID_BASE <= uid < SANDBOX_UID_BASE + 256) or b"sandbox_child.py" in cmd:
            out.append(f"{pid} uid={uid} {cmd[:80]!r}")
    return out


def workdirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "alignkit-sandbox-*")))


@pytest.fixture
def clean():
    """Checks after the test that the runs left no process and no temporary directory. What another process's
    sandboxes hold at that moment is gone within their limit, so the check waits up to 8 s for it."""
    before = workdirs()
    yield
    for _ in range(80):
        left, new = leftovers(), workdirs() - before
        if not left and not new:
            return
        time.sleep(0.1)
    for line in left:  # a failed test still ends what it started, and removes what it left
        try:
            os.kill(int(line.split()[0]), 9)
        except OSError:
            pass
    for folder in new:
        shutil.rmtree(folder, ignore_errors=True)
    assert not left, f"processes left behind: {left}"
    assert not new, f"temporary directories left behind: {new}"


@pytest.fixture
def outside():
    """A path outside the sandbox's directory, in a directory every user may write to; removed afterwards."""
    path = Path(tempfile.gettempdir()) / f"outside-{uuid.uuid4().hex}"
    yield path
    path.unlink(missing_ok=True)


class Listener:
    """A TCP server on 127.0.0.1 that records every connection and every byte it receives."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.settimeout(1)
            try:
                self.received.append(conn.recv(1024))
            except OSError:
                pass
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


@pytest.fixture(scope="module")
def layers() -> set[str]:
    return set(run_python("pass").layers)


@pytest.fixture
def fork_guard(layers):
    """Fork bombs run only where they are known to be contained, and inside a capped pids cgroup where possible."""
    if ROOT and not any(x.startswith("uid:") for x in layers):
        pytest.skip("as root without a user id of the run's own, RLIMIT_NPROC would not bound a fork bomb")
    group = Path("/sys/fs/cgroup/pids") / f"alignkit-test-{os.getpid()}"
    try:
        group.mkdir()
        (group / "pids.max").write_text("512")
        (group / "cgroup.procs").write_text(str(os.getpid()))
    except OSError:
        group = None
    yield
    if group is not None:
        (group.parent / "cgroup.procs").write_text(str(os.getpid()))
        for _ in range(100):  # the cgroup empties once every process of the run has been reaped
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.05)
        else:
            pytest.fail(f"{group} still holds processes: {(group / 'cgroup.procs').read_text()}")


# --------------------------------------------------------------------------------------------- hostile programs

FORK_BOMB = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
HOSTILE = {  # name -> (program, the statuses it may end with)
    "infinite_loop": ("while True:\n    pass\n", {"timeout"}),
    "memory_bomb": ("chunks = []\nwhile True:\n    chunks.append(b'x' * (1 << 24))\n", {"memory"}),
    "print_gigabytes": ("import sys\nwhile True:\n    sys.stdout.write('x' * (1 << 20))\n", {"output"}),
    "os_system": ("import os\nassert os.system('touch {outside}') == 0\n", {"error", "failed"}),
    "write_outside": ("open('{outside}', 'w').write('escaped')\n", {"error"}),
    "socket": ("import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'leak')\n",
               {"error"}),
}


@pytest.mark.parametrize("audit", [True, False], ids=["all-layers", "kernel-only"])
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_is_contained(name, audit, clean, outside, listener):
    code, statuses = HOSTILE[name]
    code = code.format(outside=outside, port=listener.port)
    r = run_python(code, timeout=LIMIT, memory_mb=256, audit=audit)
    assert not r.passed and r.status in statuses, (r.status, r.error, r.stderr_tail[-300:])
    assert r.seconds < LIMIT + SLACK
    assert not outside.exists()
    time.sleep(0.3)  # a connection would have been accepted by now
    assert listener.connections == 0 and listener.received == []


@pytest.mark.parametrize("audit", [True, False], ids=["all-layers", "kernel-only"])
def test_fork_bomb_is_contained(audit, clean, fork_guard):
    r = run_python(FORK_BOMB, timeout=LIMIT, max_processes=16, audit=audit)
    assert not r.passed and r.status == "timeout" and r.seconds < LIMIT + SLACK


def test_fork_bomb_hits_the_process_limit(clean, fork_guard):
    """Without the audit hook, fork fails with EAGAIN once the run's user has max_processes tasks: RLIMIT_NPROC
    took effect (a root process is never limited by it)."""
    r = run_python("import os\nwhile True:\n    os.fork()\n", timeout=LIMIT, max_processes=16, audit=False)
    assert r.status == "error" and r.error.startswith("BlockingIOError"), r.error
    assert r.seconds < LIMIT


def test_hostile_programs_in_parallel(clean, fork_guard, outside, listener):
    """Concurrent runs each get their own user id and are each contained."""
    from concurrent.futures import ThreadPoolExecutor

    programs = [FORK_BOMB] + [code.format(outside=outside, port=listener.port) for code, _ in HOSTILE.values()]
    start = time.monotonic()
    with ThreadPoolExecutor(len(programs)) as pool:
        results = list(pool.map(lambda c: run_python(c, timeout=LIMIT, memory_mb=256), programs))
    assert not any(r.passed for r in results)
    assert time.monotonic() - start < LIMIT + 2 * SLACK
    uids = [x for r in results for x in r.layers if x.startswith("uid:")]
    assert len(set(uids)) == len(uids)
    assert not outside.exists() and listener.connections == 0


# --------------------------------------------------------------------------------------------- each mechanism


def test_memory_limit(clean):
    """A 1 GiB allocation (calloc: no page is touched) fails under a 256 MiB address-space limit."""
    r = run_python("x = bytes(1 << 30)\n", memory_mb=256)
    assert r.status == "memory" and r.error.startswith("MemoryError")
    assert run_python("x = bytes(1 << 20)\n", memory_mb=256).passed


def test_output_cap(clean):
    code = "import sys\nwhile True:\n    sys.stdout.write('y' * 4096)\n"
    r = run_python(code, timeout=LIMIT, max_output_bytes=100_000)
    assert r.status == "output" and r.seconds < LIMIT and r.stdout_tail.endswith("y" * 100)
    assert len(r.stdout_tail) <= 4000


def test_wall_clock_limit_on_a_sleeping_program(clean):
    """A program that does not use the CPU (so RLIMIT_CPU never fires) is killed at the wall-clock limit."""
    r = run_python("import time\ntime.sleep(30)\n", timeout=1.0)
    assert r.status == "timeout" and r.seconds < 1.0 + SLACK


def test_group_kill_alone_ends_a_run_at_its_limit(clean, monkeypatch):
    """With the sweeps switched off, killing the process group (launcher, init and the program) still ends the run
    at its limit: the program sleeps 8 s, the run must return after about 1."""
    monkeypatch.setattr(sandbox, "_kill_all", lambda *a, **k: None)
    r = run_python("import time\ntime.sleep(8)\n", timeout=1.0)
    assert r.status == "timeout" and r.seconds < 1.0 + SLACK


@pytest.mark.skipif(not ROOT, reason="the user sweep needs a user id of the run's own (root)")
def test_user_sweep_kills_what_left_the_group(clean):
    """Without namespaces, a child that left the session with setsid is out of reach of the process-group kill;
    the sweep over the run's user id finds it."""
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\ntime.sleep(30)\n"
    r = run_python(code, timeout=1.0, audit=False, namespaces=False)
    assert r.status == "timeout" and "pid-namespace" not in r.layers


def test_escaped_daemon_is_killed_with_namespaces(clean):
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\nprint('left a daemon')\n"
    r = run_python(code, audit=False)
    assert r.passed and "left a daemon" in r.stdout_tail


def test_writes_stay_in_the_working_directory(clean):
    code = ("import os\nopen('a.txt', 'w').write('kept')\nos.mkdir('d')\nopen('d/b.txt', 'w').write('x')\n"
            "assert open('a.txt').read() == 'kept' and os.getcwd() == os.environ['HOME']\n")
    assert run_python(code).passed


def test_file_size_and_disk_limits(clean):
    big = run_python("f = open('big', 'wb')\nwhile True:\n    f.write(b'0' * (1 << 20))\n", max_file_mb=4, audit=False)
    assert big.status == "error" and "File too large" in big.error
    many = run_python("i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'0' * (1 << 20))\n    i += 1\n",
                      max_file_mb=4, disk_mb=8, timeout=LIMIT)
    assert many.status == "error" and ("No space left" in many.error or "File too large" in many.error)


def test_threads_count_as_processes(clean):
    code = "import threading, time\nfor _ in range(64):\n    threading.Thread(target=time.sleep, args=(2,)).start()\n"
    r = run_python(code, max_processes=8, audit=False)
    assert r.status == "error" and "can't start new thread" in r.error


@pytest.mark.parametrize("exit_code", ["import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n",
                                       "raise SystemExit\n", "import os, signal\nos.kill(os.getpid(), 9)\n"])
def test_leaving_early_is_not_passing(exit_code, clean):
    r = run_python(exit_code + "x = 1\n", tests="assert x == 1\n", audit=False)
    assert not r.passed and r.status == "error"


def test_printing_the_report_format_does_not_pass(clean):
    """The harness's lines carry a nonce the program does not know: printing look-alikes changes nothing."""
    code = ("import os\nfor fd in (1, 2, 3, 4, 5):\n    try:\n        os.write(fd, b'x done \\n')\n"
            "    except OSError:\n        pass\nos._exit(0)\n")
    assert not run_python(code, audit=False).passed


def test_tests_see_the_program_and_record(clean):
    code = "def add(a, b):\n    return a + b\n"
    tests = "sandbox_record('ok', add(1, 2) == 3)\nsandbox_record('bad', add(1, 2) == 4)\nsandbox_record('ok', True)\n"
    r = run_python(code, tests=tests)
    assert r.passed and r.records == {"ok": True, "bad": False}
    assert not run_python("sandbox_record('x', True)\n").passed  # the program cannot reach it
    failed = run_python(code, tests="assert add(1, 1) == 3\n")
    assert failed.status == "failed" and failed.error.startswith("AssertionError")


def test_environment_is_empty(clean):
    code = ("import os, sys\nassert set(os.environ) <= {'PATH', 'HOME', 'TMPDIR', 'LANG', 'LC_CTYPE'}, os.environ\n"
            "assert sys.flags.isolated and sys.flags.no_site\nprint(os.getuid(), os.getpid())\n")
    r = run_python(code)
    assert r.passed, r.error
    uid, pid = map(int, r.stdout_tail.split())
    if ROOT:
        assert SANDBOX_UID_BASE <= uid < SANDBOX_UID_BASE + 256
    if "pid-namespace" in r.layers:
        assert pid == 2  # its own pid namespace, after the init that reaps for it


def test_audit_hook_refuses(clean, outside):
    for code in ("import os\nos.system('true')\n", "import subprocess\nsubprocess.run(['true'])\n",
                 "import os\nos.fork()\n", f"open('{outside}', 'a')\n", f"import os\nos.remove('{outside}')\n",
                 "import ctypes\nctypes.CDLL(None)\n", "import socket\nsocket.socket()\n",
                 "import os\nos.kill(1, 9)\n"):
        r = run_python(code)
        assert r.status == "error" and r.error.startswith("PermissionError: sandbox:"), (code, r.error)
    assert run_python("import json, re, typing, collections, hashlib, math, dataclasses, enum\n").passed


@pytest.mark.skipif(not ROOT, reason="namespaces and a user id of the run's own need root here")
def test_layers_in_effect_as_root(layers):
    """What docs/code_rewards.md reports for a root run on a kernel that allows unshare."""
    if any(x.startswith("namespaces-unavailable") for x in layers):
        pytest.skip(f"unshare is not allowed here: {layers}")
    assert NAMESPACES | {"rlimits", "audit-hook", "private-proc"} <= layers
    assert any(x.startswith("uid:") for x in layers)


def test_network_can_be_kept(clean, listener):
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {listener.port}), timeout=2)\ns.sendall(b'hi')\n"
    r = run_python(code, network=True, audit=False)
    assert r.passed, r.error
    for _ in range(20):
        if listener.received:
            break
        time.sleep(0.1)
    assert listener.received == [b"hi"]


def test_python_is_the_running_interpreter(clean):
    r = run_python("import sys\nprint(sys.version)\n")
    assert r.passed and r.stdout_tail.strip() == sys.version
