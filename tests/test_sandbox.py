"""The code sandbox: hostile programs end in the right status and never harm the runner."""

from __future__ import annotations

import os
import time

import pytest

from lightning_smc.evaluation.sandbox import STATUSES, SandboxResult, run_code, run_many

TIMEOUT = 2.0


def test_correct_code_passes_and_failing_assert_fails():
    ok = run_code("def f(x):\n    return x + 1\n\nassert f(1) == 2\n", timeout=TIMEOUT)
    assert isinstance(ok, SandboxResult)
    assert (ok.passed, ok.status) == (True, "passed")
    bad = run_code("def f(x):\n    return x\n\nassert f(1) == 2\n", timeout=TIMEOUT)
    assert (bad.passed, bad.status) == (False, "failed")
    assert "AssertionError" in bad.stderr_tail
    broken = run_code("def f(:\n", timeout=TIMEOUT)
    assert broken.status == "error" and "SyntaxError" in broken.stderr_tail


def test_infinite_loop_times_out_within_the_limit():
    start = time.monotonic()
    result = run_code("while True:\n    pass\n", timeout=1.0)
    elapsed = time.monotonic() - start
    assert result.status == "timeout" and not result.passed
    assert elapsed < 1.0 + 2.0  # the kill is immediate; 2 s of slack for process start/teardown


def test_unbounded_allocation_is_stopped_and_the_runner_survives():
    hog = "blocks = []\nwhile True:\n    blocks.append(bytearray(10**7))\n"
    result = run_code(hog, timeout=TIMEOUT, memory_mb=256)
    assert result.status in ("killed", "error") and not result.passed
    assert result.status == "killed" or "MemoryError" in result.stderr_tail
    # the runner is alive and the next program runs normally
    assert run_code("assert sum(range(10)) == 45\n", timeout=TIMEOUT).passed


@pytest.mark.parametrize(
    "program",
    ["import os\nos.fork()\n", "import os\nos.forkpty()\n", "import multiprocessing\n"],
    ids=["fork", "forkpty", "multiprocessing"],
)
def test_fork_is_blocked(program):
    result = run_code(program, timeout=TIMEOUT)
    assert result.status == "error" and not result.passed


def _deleters(path: str, folder: str) -> dict[str, str]:
    return {
        "os.remove": f"import os\nos.remove({path!r})\n",
        "alias.unlink": f"import os as o\no.unlink({path!r})\n",
        "from-import": f"from os import unlink\nunlink({path!r})\n",
        "shutil.rmtree": f"import shutil\nshutil.rmtree({folder!r})\n",
        "pathlib.unlink": f"import pathlib\npathlib.Path({path!r}).unlink()\n",
        "posix.unlink": f"import posix\nposix.unlink({path!r})\n",
        "reload(os)": f"import importlib, os\nimportlib.reload(os)\nos.unlink({path!r})\n",
        "os.rename": f"import os\nos.rename({path!r}, {path + '.moved'!r})\n",
        "open-truncate": f"open({path!r}, 'w').write('overwritten')\n",
        "ctypes": f"import ctypes\nctypes.CDLL(None).unlink({path.encode()!r})\n",
    }


def test_files_outside_the_temp_dir_survive(tmp_path):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    for name, program in _deleters(str(sentinel), str(tmp_path)).items():
        result = run_code(program, timeout=TIMEOUT)
        assert not result.passed, f"{name}: {result}"
        assert sentinel.read_text() == "keep me", f"{name} changed the sentinel"
    assert sorted(os.listdir(tmp_path)) == ["sentinel.txt"]


def test_shell_and_subprocess_escapes_are_blocked(tmp_path):
    target = tmp_path / "pwned"
    programs = {
        "os.system": f"import os\nos.system('touch {target}')\n",
        "os.popen": f"import os\nos.popen('touch {target}').read()\n",
        "subprocess.run": f"import subprocess\nsubprocess.run(['touch', '{target}'])\n",
        "subprocess.Popen": f"import subprocess\nsubprocess.Popen(['touch', '{target}']).wait()\n",
        "os.execv": f"import os\nos.execv('/usr/bin/touch', ['touch', '{target}'])\n",
    }
    for name, program in programs.items():
        result = run_code(program, timeout=TIMEOUT)
        assert result.status == "error", f"{name}: {result}"
        assert not target.exists(), f"{name} created {target}"


@pytest.mark.parametrize(
    "program",
    [
        "import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', 9))\n",
        "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n",
        "import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', 9))\n",
        "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9', timeout=1)\n",
    ],
    ids=["socket", "create_connection", "_socket", "urllib"],
)
def test_network_is_blocked(program):
    result = run_code(program, timeout=TIMEOUT)
    assert result.status == "error" and not result.passed


def test_exit_cannot_fake_a_pass():
    for program in ["import sys\nsys.exit(0)\n", "exit(0)\n", "import os\nos._exit(0)\n"]:
        result = run_code(program + "assert False\n", timeout=TIMEOUT)
        assert not result.passed and result.status == "error", program


def test_temp_dir_is_private_and_removed():
    # the program may write in its working directory; the directory is gone afterwards
    program = "import os, sys\nopen('scratch.txt', 'w').write('x')\nsys.stderr.write(os.getcwd())\n"
    result = run_code(program, timeout=TIMEOUT)
    assert result.passed
    workdir = result.stderr_tail.strip()
    assert os.path.basename(workdir).startswith("lsmc_sandbox_")
    assert not os.path.exists(workdir)


def test_run_many_keeps_order_and_runs_in_parallel():
    programs = ["assert True\n", "assert False\n", "while True: pass\n", "assert 1 + 1 == 2\n"]
    results = run_many(programs, timeout=1.0, workers=2)
    assert [r.status for r in results] == ["passed", "failed", "timeout", "passed"]
    assert all(r.status in STATUSES for r in results)


def test_bad_arguments_are_rejected():
    with pytest.raises(TypeError, match="program"):
        run_code(b"assert True")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        run_code("pass", timeout=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_code("pass", memory_mb=8)
    with pytest.raises(ValueError, match="workers"):
        run_many(["pass"], workers=0)
