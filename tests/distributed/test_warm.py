"""The warm server runs a script as ``python SCRIPT ARGS`` would (the distributed tests rely on it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from warm import run_script  # noqa: E402

SCRIPT = """
import atexit, os, sys
atexit.register(lambda: print("at exit"))
print(sys.argv[1:], os.getcwd(), os.environ.get("WARM_TEST"), sys.path[0] == os.path.dirname(__file__))
print("to stderr", file=sys.stderr)
if __name__ == "__main__":
    if sys.argv[1] == "raise":
        raise ValueError("raised")
    if sys.argv[1] == "sleep":
        import time
        time.sleep(60)
    if sys.argv[1] == "straggler":  # a process that outlives the script, as a rank outliving its launcher
        if os.fork() == 0:
            import time
            time.sleep(1)
            print("straggler done", flush=True)
            os._exit(0)
        sys.exit(0)
    sys.exit(int(sys.argv[1]))
"""


def test_a_run_gets_its_argv_cwd_environment_streams_and_exit(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "WARM_TEST": "yes"}
    done = run_script(script, ["3", "x y"], cwd=tmp_path, timeout=60, env=env)
    assert done.returncode == 3
    assert done.stdout == f"['3', 'x y'] {tmp_path} yes True\nat exit\n"
    assert done.stderr == "to stderr\n"
    raised = run_script(script, ["raise"], cwd=tmp_path, timeout=60, env=env)
    assert raised.returncode == 1 and "ValueError: raised" in raised.stderr
    with pytest.raises(subprocess.TimeoutExpired):
        run_script(script, ["sleep"], cwd=tmp_path, timeout=1, env=env)
    assert run_script(script, ["0"], cwd=tmp_path, timeout=60, env=env).returncode == 0
    # As a caller reading a real run's pipes would, the run waits for what it left behind.
    assert "straggler done" in run_script(script, ["straggler"], cwd=tmp_path, timeout=60, env=env).stdout
