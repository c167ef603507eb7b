"""Runs the distributed tests' worker scripts as ``python SCRIPT ARGS`` would, without the imports.

A new interpreter spends about 5 s of a 2-core machine importing torch, TorchRec and Lightning
before a worker script's first line, and the distributed tests run about a hundred of them. A warm
server imports those once, then forks a fresh process per run. The run gets what
``subprocess.run([python, SCRIPT, *ARGS], capture_output=True, cwd=CWD, env=ENV)`` gives: its own
process group, argv and ``sys.path[0]``, working directory, stdout and stderr, exit status (negative
for a signal), interpreter exit (threads joined, ``atexit`` handlers, flushed streams) and
environment; and as a caller reading a run's pipes would, it waits for processes the run left
behind, up to the timeout, which kills the whole group. What the
imports read from the environment (``OMP_NUM_THREADS`` for OpenMP) is read by the server, so there is
one server per environment asked for, started with it; only ``PYTEST_CURRENT_TEST``, which pytest
changes at every test, may differ between a server and its runs. The server never runs a tensor
operation, so no OpenMP thread exists to break in the forked runs (GNU libgomp does not survive a
fork of a process that has used it).

    run_script(WORKER, ["--out", str(out)], cwd=out, timeout=600)

The server reads one JSON request per line on stdin, replies ``{"pid": ...}`` when the run starts
and ``{"returncode": ...}`` when it ends, and exits when its stdin closes (with the test session).
"""

from __future__ import annotations

import atexit
import ctypes
import importlib
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Mapping, Optional, Sequence

# What every worker imports (the data and meta-learning modules add 0.3 s, and pyarrow where a GPU
# image may lack it).
_PRELOADED = ("torch", "torchrec", "torchrec.distributed", "lightning.pytorch", "lightning_dembed")


# -- the server ------------------------------------------------------------------------------------


def _run_forked(request: dict) -> None:
    """In the forked child: become ``python SCRIPT ARGS`` and never return."""
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        script = request["script"]
        sys.argv = [script, *request["args"]]
        sys.path[0] = str(Path(script).parent)
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - an uncaught exception ends the run as it ends an interpreter
        traceback.print_exc()
    finally:
        # What an interpreter does on its way out: join non-daemon threads, atexit, flush Python's and C's streams.
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        ctypes.CDLL(None).fflush(None)
        os._exit(code)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies hold no pipe: a real run's caller would not wait)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        state, _, pgrp = stat.rpartition(")")[2].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


def _serve() -> None:
    for name in _PRELOADED:
        importlib.import_module(name)
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what the server itself prints is not a reply
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            replies.close()
            os.setpgid(0, 0)  # its own group, so a timeout kills the ranks it starts too
            _run_forked(request)
        os.setpgid(pid, pid)  # here too, so the group exists before the client can kill it
        print(json.dumps({"pid": pid}), file=replies, flush=True)
        _, status = os.waitpid(pid, 0)
        # A real run's caller reads its pipes until every process holding them is gone: processes
        # the run left behind (ranks outliving their launcher) hold it up to its timeout as well.
        while _group_alive(pid):
            time.sleep(0.05)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=replies, flush=True)


# -- the client ------------------------------------------------------------------------------------


class _Server:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, env=dict(env))
        self._buffer = b""

    def send(self, request: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()

    def reply(self, deadline: Optional[float]) -> Optional[dict]:
        """The next reply, or None at the deadline."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if not select.select([fd], [], [], wait)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                self.log.seek(0)
                raise RuntimeError(f"the warm server exited:\n{self.log.read().decode(errors='replace')[-6000:]}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)


_servers: dict[frozenset, _Server] = {}  # by environment, for the test session
_SET_PER_TEST = "PYTEST_CURRENT_TEST"


def run_script(
    script: Path,
    args: Sequence[str],
    cwd: Path,
    timeout: float,
    env: Optional[Mapping[str, str]] = None,
) -> subprocess.CompletedProcess:
    """``subprocess.run([python, script, *args], capture_output=True, text=True, ...)``, forked from a warm server."""
    env = dict(os.environ if env is None else env)
    key = frozenset((name, value) for name, value in env.items() if name != _SET_PER_TEST)
    if key not in _servers or _servers[key].proc.poll() is not None:  # none yet, or it died (killed, OOM)
        _servers[key] = _Server(env)
    server = _servers[key]
    with tempfile.TemporaryDirectory() as captured:
        out, err = Path(captured, "stdout"), Path(captured, "stderr")
        try:
            server.send({"script": str(script), "args": list(args), "cwd": str(cwd), "env": env, "stdout": str(out),
                         "stderr": str(err)})
            pid = server.reply(deadline=None)["pid"]
            done = server.reply(deadline=time.monotonic() + timeout)
            if done is None:
                os.killpg(pid, signal.SIGKILL)
                server.reply(deadline=None)
        except BaseException:
            # Interrupted between a request and its replies (Ctrl-C, an error): the server's next reply
            # would be taken for another run's. Start afresh.
            server.proc.kill()
            del _servers[key]
            raise
        cmd = [sys.executable, str(script), *args]
        stdout, stderr = (p.read_text(errors="replace") if p.exists() else "" for p in (out, err))
        if done is None:
            raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(cmd, done["returncode"], stdout, stderr)


if __name__ == "__main__":
    _serve()
