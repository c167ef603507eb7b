"""The README's quickstart runs as written, on 2 processes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_readme_quickstart_is_the_example_and_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert code == (ROOT / "examples" / "quickstart.py").read_text()
    script = tmp_path / "quickstart.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "`Trainer.fit` stopped: `max_epochs=3` reached." in proc.stderr + proc.stdout
    assert "HybridParallelStrategy sharding plan (2 ranks)" in proc.stderr + proc.stdout
