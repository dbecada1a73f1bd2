"""The process that :func:`alignkit.rl.sandbox.run_python` starts: it isolates itself, then runs the program.

Run as ``python -I -S sandbox_child.py`` (isolated mode, no ``site``: only the standard library is importable
and no environment variable reaches the interpreter). It imports the standard library only and never imports
alignkit. Its settings arrive as one JSON object on stdin, which is then replaced by ``/dev/null``.

Two processes:

- the LAUNCHER (this process as started, root when alignkit runs as root) enters new namespaces, prepares the
  file system, forks, waits for its child and reports how that child ended;
- the RUNNER (the forked child; pid 1 of a new pid namespace when that could be made) sets its resource limits,
  becomes an unprivileged user, installs the audit hook and runs the program.

Every line written to the result pipe starts with the run's nonce, which only the harness knows, so that output
cannot be mistaken for the harness's report and a program that exits early (``sys.exit``, ``os._exit``) never
reports ``done``. The nonce is kept out of the program's namespace; a program that reads the harness's own
memory could still find it (see docs/code_rewards.md).
"""

import ctypes
import json
import os
import resource
import signal
import stat
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
_PER_MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024,
                    "nodiratime": 2048, "relatime": 1 << 21, "strictatime": 1 << 24, "nosymfollow": 256}
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 36, 38

# Imported before an unprivileged runner would lose access to the standard library (a root interpreter installed
# under a directory others may not enter, with no mount namespace to expose it).
_PRELOAD = ("abc", "array", "bisect", "collections", "copy", "dataclasses", "datetime", "decimal", "enum",
            "fractions", "functools", "hashlib", "heapq", "itertools", "json", "math", "operator", "random", "re",
            "statistics", "string", "textwrap", "typing", "unicodedata")

_libc = ctypes.CDLL(None, use_errno=True)


def _errno_text() -> str:
    return os.strerror(ctypes.get_errno())


def _mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    if _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}: {_errno_text()}")


def _mounts() -> list[tuple[str, int]]:
    """(mount point, its per-mount flags) of every mount this process sees."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")  # \040 for a space, etc.
            flags = 0
            for opt in fields[5].split(","):
                flags |= _PER_MOUNT_FLAGS.get(opt, 0)
            out.append((point, flags))
    return out


def _hidden_ancestor(path: str) -> str | None:
    """The topmost ancestor of ``path`` that other users may not enter, or None."""
    parts = os.path.abspath(path).split(os.sep)[1:]
    for i in range(1, len(parts)):
        a = os.sep + os.sep.join(parts[:i])
        if not os.stat(a).st_mode & stat.S_IXOTH:
            return a
    return None


def _expose(dirs: list[str]) -> list[str]:
    """Make ``dirs`` reachable to an unprivileged user in this mount namespace: each directory others may not
    enter above them is covered by a small tmpfs holding only bind mounts of ``dirs``. Returns what was covered."""
    covered: dict[str, list[str]] = {}
    for d in dirs:
        top = _hidden_ancestor(d)
        if top is not None:
            covered.setdefault(top, []).append(d)
    for top, inside in covered.items():
        fds = [os.open(d, os.O_PATH | os.O_DIRECTORY) for d in inside]
        _mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k,nr_inodes=256")
        for d, fd in zip(inside, fds):
            os.makedirs(d, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", d, None, MS_BIND | MS_REC)
            os.close(fd)
    return list(covered)


def _stdlib_dirs() -> list[str]:
    dirs = sorted(os.path.realpath(p) for p in sys.path if p and os.path.isdir(p))
    return [d for i, d in enumerate(dirs) if not any(d.startswith(o + os.sep) for o in dirs[:i])]


def _isolate_fs(workdir: str, cfg: dict) -> list[str]:
    """Private mounts; the working directory a fresh size-limited tmpfs owned by the runner; the standard library
    exposed; every other mount read-only. Returns the layers that took effect."""
    layers = []
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    if cfg["uid"] is not None:
        covered = _expose(_stdlib_dirs())
        if covered:
            layers.append("stdlib-exposed:" + ",".join(covered))
    _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={cfg['disk_mb']}m,nr_inodes=4096,mode=0700"
           + (f",uid={cfg['uid']},gid={cfg['uid']}" if cfg["uid"] is not None else ""))
    layers.append("tmpfs-workdir")
    failed = []
    for point, flags in _mounts():
        if point == workdir:
            continue
        try:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
        except OSError:
            failed.append(point)
    layers.append("read-only-mounts" if not failed else f"read-only-mounts-except:{','.join(failed)}")
    return layers


def _set_limits(cfg: dict) -> None:
    lim = cfg["limits"]
    for name, value in (("RLIMIT_CORE", 0), ("RLIMIT_CPU", lim["cpu"]), ("RLIMIT_AS", lim["memory"]),
                        ("RLIMIT_FSIZE", lim["file"]), ("RLIMIT_NOFILE", lim["files"]), ("RLIMIT_NPROC", lim["nproc"])):
        hard = value + 1 if name == "RLIMIT_CPU" else value  # SIGXCPU at the soft limit, SIGKILL one second later
        resource.setrlimit(getattr(resource, name), (value, hard))


def _drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl(PR_SET_NO_NEW_PRIVS): {_errno_text()}")


# ------------------------------------------------------------------------------------------- the audit hook

_REFUSED = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen", "pty.spawn",
    "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function",
    "ctypes.cdata", "ctypes.addressof", "socket.__new__", "socket.connect", "socket.bind", "socket.sendto",
    "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "os.chroot",
    "os.setxattr", "os.removexattr", "resource.setrlimit", "resource.prlimit",
})
# events whose arguments are paths that may be changed: they must lie inside the working directory
_PATH_EVENTS = {"os.remove": (0,), "os.rename": (0, 1), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,),
                "os.chown": (0,), "os.link": (0, 1), "os.symlink": (0, 1), "os.truncate": (0,), "os.utime": (0,),
                "shutil.rmtree": (0,), "shutil.move": (0, 1), "shutil.copyfile": (1,), "shutil.copytree": (1,),
                "os.mkfifo": (0,), "os.mknod": (0,)}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _audit_hook(workdir: str):
    """A hook refusing process creation, signals, ctypes, sockets, frame inspection, and changes to files outside
    ``workdir``. Defence in depth only: audit hooks are not a security boundary (C extensions and ctypes-free
    tricks can get round them), which is why the kernel's limits and namespaces come first."""
    inside = workdir.rstrip(os.sep) + os.sep

    def outside(path) -> bool:
        if isinstance(path, int):
            return False  # an open file descriptor
        try:
            p = os.path.abspath(os.fsdecode(path))
        except (TypeError, ValueError):
            return True
        return not (p + os.sep).startswith(inside) and p != "/dev/null"

    def hook(event, args):
        if event in _REFUSED:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
            if (flags & _WRITE_FLAGS or any(c in mode for c in "wax+")) and outside(args[0]):
                raise PermissionError(f"sandbox: writing {args[0]!r} outside the working directory")
        elif event in _PATH_EVENTS:
            for i in _PATH_EVENTS[event]:
                if i < len(args) and outside(args[i]):
                    raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the working directory")

    return hook


# ------------------------------------------------------------------------------------------------- runner


def _run(cfg: dict, layers: list[str], emit) -> None:
    """In the runner: limits, identity, hook, then the program and its tests. Never returns."""
    os.umask(0o077)
    uid = cfg["uid"]
    if uid is not None and any(_hidden_ancestor(d) for d in _stdlib_dirs()):
        for name in _PRELOAD:  # the unprivileged runner will not reach the standard library on disk
            __import__(name)
        layers.append("stdlib-preloaded")
    _set_limits(cfg)
    layers.append("rlimits")
    if uid is not None:
        _drop_privileges(uid)
        layers.append(f"uid:{uid}")
    os.chdir(cfg["workdir"])
    if cfg["audit"]:
        sys.addaudithook(_audit_hook(cfg["workdir"]))
        layers.append("audit-hook")
    emit("layers", " ".join(layers))
    code, tests = cfg["code"], cfg["tests"]
    del cfg["code"], cfg["tests"]
    import builtins

    def record(key, ok) -> None:
        emit("record", f"{json.dumps(str(key))} {1 if ok else 0}")

    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(code, "<program>", "exec"), namespace)  # noqa: S102 - running it is the point
        if tests:
            exec(compile(tests, "<tests>", "exec"), {**namespace, "sandbox_record": record})  # noqa: S102
        ending = ("done", "")
    except BaseException as e:  # noqa: BLE001 - SystemExit too: the program did not run to its end
        ending = ("error", f"{type(e).__name__}: {str(e)[:300]}".replace("\n", " "))
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - the program may have replaced or closed it
            pass
    emit(*ending)
    os._exit(0 if ending[0] == "done" else 1)


def _init(cfg: dict, layers: list[str], emit) -> None:
    """The runner's parent: pid 1 of the pid namespace when there is one. It reaps what the program orphans and,
    when the runner ends, reports how and exits, upon which the kernel kills every process left in the
    namespace. The program never runs as pid 1, which ignores signals it has no handler for (SIGXCPU included)."""
    try:
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # without a pid namespace, orphans are reaped here too
        if "pid-namespace" in layers:
            try:
                _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
                layers.append("private-proc")
            except OSError:
                pass
        runner = os.fork()
        if runner == 0:
            try:
                _run(cfg, layers, emit)
            except BaseException as e:  # noqa: BLE001 - the harness failed before the program ran
                emit("harness", f"{type(e).__name__}: {e}".replace("\n", " "))
                os._exit(3)
        while True:
            pid, status, usage = os.wait4(-1, 0)
            if pid == runner:
                break
        emit("cpu", f"{usage.ru_utime + usage.ru_stime:.3f}")
        if os.WIFSIGNALED(status):
            emit("signal", str(os.WTERMSIG(status)))
        else:
            emit("exit", str(os.WEXITSTATUS(status)))
        if cfg["uid"] is not None and "pid-namespace" not in layers:
            _kill_and_reap(cfg["uid"])
        os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
    finally:
        os._exit(4)


def _kill_and_reap(uid: int) -> None:
    """Without a pid namespace: kill what the program left (as its user, ``kill(-1)`` reaches every process of
    that user and nothing else) and reap it here, the subreaper, instead of leaving zombies to the host's init."""
    if os.fork() == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)  # a killed process cannot fork, so one pass reaches them all
        finally:
            os._exit(0)
    try:
        while True:
            os.wait()  # the helper, then the killed orphans (this process is their subreaper)
    except ChildProcessError:
        pass


def main() -> None:
    cfg = json.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    nonce, fd = cfg.pop("nonce"), cfg.pop("result_fd")

    def emit(kind: str, text: str) -> None:
        os.write(fd, f"{nonce} {kind} {text}\n".encode("utf-8", "replace"))

    layers: list[str] = []
    if cfg["namespaces"] and os.geteuid() == 0:
        flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | (0 if cfg["network"] else CLONE_NEWNET)
        if _libc.unshare(flags) == 0:
            layers += ["pid-namespace", "mount-namespace", "ipc-namespace"]
            if not cfg["network"]:
                layers.append("network-namespace")
            try:
                layers += _isolate_fs(cfg["workdir"], cfg)
            except OSError as e:
                layers.append(f"filesystem-isolation-failed:{e.strerror or e}")
        else:
            layers.append(f"namespaces-unavailable:{_errno_text()}")
    pid = os.fork()
    if pid == 0:
        _init(cfg, layers, emit)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the parent ends this process group with SIGKILL
    _, status = os.waitpid(pid, 0)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


if __name__ == "__main__":
    main()
