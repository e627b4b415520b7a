"""Run untrusted generated code (HumanEval / MBPP candidates) in a separate, limited process.

``run_code(program, timeout=3.0, memory_mb=512)`` -> ``SandboxResult(passed, status,
stderr_tail, returncode, seconds)`` with ``status`` one of

``"passed"``   the program ran to its end (every assert held);
``"failed"``   an ``AssertionError`` escaped (a test did not hold);
``"error"``    any other exception: syntax / name errors, ``MemoryError``, a blocked call
               (``SandboxViolation``), ``SystemExit`` raised by the program;
``"timeout"``  still running after ``timeout`` wall seconds: its process group is killed;
``"killed"``   ended by a signal (the CPU-time limit, the kernel).

Layers of protection, from the outside in:

1. **A fresh process**: ``python -I`` (isolated: no user site, no ``PYTHON*`` variables, the
   working directory is not on ``sys.path``), a new session (its own process group, so a
   timeout kills everything it started), an environment with only ``PATH`` and ``LANG`` (no
   proxies, no tokens), stdin closed, stdout / stderr into files in the temp dir.
2. **A fresh temporary directory** as working directory, deleted afterwards.
3. **No network**: when ``unshare --net`` works here (root or user namespaces) the process runs
   in an empty network namespace (no interface but a down loopback).
4. **Resource limits**, set by the child on itself before any candidate code:
   ``RLIMIT_AS`` = ``memory_mb``, ``RLIMIT_CPU`` = ``ceil(timeout) + 1`` s, ``RLIMIT_FSIZE``
   (16 MiB), ``RLIMIT_CORE`` = 0, ``RLIMIT_NPROC`` = 0 (no fork / no thread).
5. **Dropped privileges**: when the runner is root, the child switches to ``nobody`` (uid and
   gid 65534, no supplementary groups), so files it does not own stay out of its reach; the temp
   dir is handed to ``nobody`` for the run.
6. **A guard** (``_GUARD``, run before the candidate): process-, file- and network-changing
   functions of ``os`` / ``posix`` / ``shutil`` / ``subprocess`` / ``socket`` / ``pathlib`` are
   replaced by a function raising ``SandboxViolation``; ``exit`` / ``quit`` / ``os._exit`` too;
   ``open`` / ``os.open`` refuse to write outside the temp dir;
   and ``ctypes`` and similar modules cannot be imported. This is a seat belt, not a wall: in-
   process Python cannot be fully confined, which is why 1-5 exist.

``run_many(programs, timeout=, memory_mb=, workers=)`` runs several programs at once with a
small thread pool (each thread waits on its own child process).

Example::

    from lightning_smc.evaluation.sandbox import run_code
    run_code("def f(x):\\n    return x + 1\\nassert f(1) == 2\\n").status     # 'passed'
    run_code("while True: pass", timeout=1.0).status                         # 'timeout'
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

STATUSES = ("passed", "failed", "timeout", "error", "killed")
NOBODY = 65534
FSIZE_BYTES = 16 * 2**20
STDERR_TAIL = 2000
_EXIT_FAILED, _EXIT_ERROR = 3, 4  # the guard's exit codes for AssertionError / other errors

# Runs in the child before the candidate; its own small Python file (``guard.py``). The limits
# and privilege drop come first, the function blocking after (it needs ``os`` intact until then).
_GUARD = r"""
import builtins, os, resource, sys, traceback
_mem, _cpu, _fsize, _drop = (int(a) for a in sys.argv[1:5])
resource.setrlimit(resource.RLIMIT_AS, (_mem, _mem))
resource.setrlimit(resource.RLIMIT_DATA, (_mem, _mem))
resource.setrlimit(resource.RLIMIT_CPU, (_cpu, _cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (_fsize, _fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if _drop and os.getuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
_source = open("candidate.py", encoding="utf-8").read()
_exit_now = os._exit


class SandboxViolation(RuntimeError):
    pass


def _blocked(name):
    def blocked(*args, **kwargs):
        raise SandboxViolation(f"{name} is disabled in the sandbox")
    return blocked


import posix, shutil, socket, subprocess, pathlib, _socket
_BLOCK = {
    os: ["system", "fork", "forkpty", "kill", "killpg", "remove", "unlink", "rmdir",
         "removedirs", "rename", "renames", "replace", "truncate", "ftruncate", "chmod",
         "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "chdir", "fchdir",
         "link", "symlink", "mkfifo", "mknod", "putenv", "unsetenv", "setuid", "setgid",
         "popen", "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp",
         "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve",
         "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "_exit", "abort",
         "register_at_fork", "setsid", "setpgid", "nice", "plock"],
    shutil: ["rmtree", "move", "chown", "copy", "copy2", "copyfile", "copytree"],
    subprocess: ["Popen", "run", "call", "check_call", "check_output", "getoutput",
                 "getstatusoutput"],
    socket: ["socket", "create_connection", "create_server", "socketpair", "fromfd",
             "getaddrinfo"],
    _socket: ["socket", "socketpair", "getaddrinfo"],
    builtins: ["exit", "quit", "help"],
}
_BLOCK[posix] = [n for n in _BLOCK[os] if hasattr(posix, n)]
for _module, _names in _BLOCK.items():
    for _name in _names:
        if hasattr(_module, _name):
            setattr(_module, _name, _blocked(f"{_module.__name__}.{_name}"))
for _name in ["unlink", "rmdir", "rename", "replace", "chmod", "touch", "symlink_to",
              "hardlink_to", "write_text", "write_bytes"]:
    if hasattr(pathlib.Path, _name):
        setattr(pathlib.Path, _name, _blocked(f"pathlib.Path.{_name}"))
_HOME = os.path.realpath(os.getcwd())
_real_open, _real_os_open = builtins.open, os.open
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _inside(path):
    real = os.path.realpath(os.fsdecode(path))
    return real == _HOME or real.startswith(_HOME + os.sep)


def _open(file, mode="r", *args, **kwargs):
    if not isinstance(file, int) and any(c in mode for c in "wax+") and not _inside(file):
        raise SandboxViolation(f"open({file!r}, {mode!r}): writing outside the sandbox")
    return _real_open(file, mode, *args, **kwargs)


def _os_open(path, flags, *args, **kwargs):
    if flags & _WRITE_FLAGS and not _inside(path):
        raise SandboxViolation(f"os.open({path!r}): writing outside the sandbox")
    return _real_os_open(path, flags, *args, **kwargs)


import io
builtins.open = io.open = _open
os.open = posix.open = _os_open
for _name in ["ctypes", "_ctypes", "cffi", "multiprocessing", "_posixsubprocess", "pty",
              "resource", "signal", "_signal", "faulthandler", "psutil", "tkinter", "ipdb"]:
    sys.modules[_name] = None
del _module, _names, _name, _BLOCK
sys.argv = ["candidate.py"]
try:
    exec(compile(_source, "candidate.py", "exec"), {"__name__": "__main__"})
except AssertionError:
    traceback.print_exc()
    sys.stderr.flush()
    _exit_now(3)
except BaseException:
    traceback.print_exc()
    sys.stderr.flush()
    _exit_now(4)
sys.stdout.flush()
sys.stderr.flush()
_exit_now(0)
"""


@dataclass(frozen=True)
class SandboxResult:
    """The outcome of one program: ``passed`` iff ``status == "passed"``."""

    passed: bool
    status: str
    stderr_tail: str = ""
    returncode: int | None = None
    seconds: float = 0.0


@functools.lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """Whether ``unshare --net`` can start a process here (probed once)."""
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        done = subprocess.run([exe, "--net", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _status(returncode: int, timed_out: bool) -> str:
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "passed"
    if returncode == _EXIT_FAILED:
        return "failed"
    if returncode < 0:
        return "killed"
    return "error"  # _EXIT_ERROR, or 1 when the interpreter itself failed


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - STDERR_TAIL))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


@functools.lru_cache(maxsize=1)
def privilege_drop_available() -> bool:
    """Whether a child switched to ``nobody`` can still import the standard library.

    False when the interpreter lives where ``nobody`` cannot read (e.g. under a ``/root`` of mode
    700): then the sandbox keeps the runner's uid and relies on the other layers.
    """
    if os.geteuid() != 0:
        return False
    probe = "import collections, heapq, json, math, re, shutil\n"
    return _run(probe, timeout=10.0, memory_mb=512, drop=True, isolate_network=False).passed


def run_code(
    program: str,
    timeout: float = 3.0,
    memory_mb: int = 512,
    drop_privileges: bool = True,
    isolate_network: bool = True,
) -> SandboxResult:
    """Run ``program`` (Python source) in a sandbox; see the module docstring."""
    if not isinstance(program, str):
        raise TypeError(f"program must be a str of Python source, got {type(program).__name__}")
    if not timeout > 0:
        raise ValueError(f"timeout={timeout!r} must be > 0 seconds")
    if not memory_mb >= 64:
        raise ValueError(f"memory_mb={memory_mb!r} must be >= 64 (the interpreter needs ~30 MB)")
    drop = drop_privileges and privilege_drop_available()
    return _run(program, timeout, memory_mb, drop, isolate_network)


def _run(
    program: str, timeout: float, memory_mb: int, drop: bool, isolate_network: bool
) -> SandboxResult:
    workdir = tempfile.mkdtemp(prefix="lsmc_sandbox_")
    try:
        with open(os.path.join(workdir, "candidate.py"), "w", encoding="utf-8") as f:
            f.write(program)
        with open(os.path.join(workdir, "guard.py"), "w", encoding="utf-8") as f:
            f.write(_GUARD)
        if drop:  # nobody must be able to read the files and write its own scratch files
            for name in ("", "candidate.py", "guard.py"):
                os.chown(os.path.join(workdir, name), NOBODY, NOBODY)
        limits = [memory_mb * 2**20, math.ceil(timeout) + 1, FSIZE_BYTES, int(drop)]
        cmd = [sys.executable, "-I", "guard.py", *map(str, limits)]
        if isolate_network and network_namespace_available():
            cmd = [shutil.which("unshare") or "unshare", "--net", "--", *cmd]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        err_path = os.path.join(workdir, "stderr.txt")
        start = time.monotonic()
        with open(err_path, "wb") as err, open(os.devnull, "wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, close_fds=True,
            )  # fmt: skip
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                proc.wait()
            else:
                _kill_group(proc)  # anything it left behind in its group goes too
        seconds = time.monotonic() - start
        status = _status(proc.returncode, timed_out)
        return SandboxResult(status == "passed", status, _tail(err_path), proc.returncode, seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_many(
    programs: Sequence[str], timeout: float = 3.0, memory_mb: int = 512, workers: int = 2
) -> list[SandboxResult]:
    """``run_code`` over ``programs`` with ``workers`` at a time; results in input order."""
    if workers < 1:
        raise ValueError(f"workers={workers!r} must be >= 1")
    run = functools.partial(run_code, timeout=timeout, memory_mb=memory_mb)
    if workers == 1 or len(programs) <= 1:
        return [run(p) for p in programs]
    with ThreadPoolExecutor(max_workers=min(workers, len(programs))) as pool:
        return list(pool.map(run, programs))
