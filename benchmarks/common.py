"""Helpers shared by the benchmark scripts: machine description, where results go, JSON, tables.

Results are kept per date and hardware, as torchtitan keeps them: a script writes into
``benchmarks/results/<date>_<machine>/`` (`results_dir`), ``<machine>`` naming the hardware the
figures depend on (`machine_name`: ``cpu-2core``, ``h100-80gb-hbm3``).

Nothing here imports torch: a benchmark's launching process can use these helpers and stay small
(a child started with exec inherits its parent's peak RSS in ``ru_maxrss``, see
`peak_rss_mib`).
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

__all__ = [
    "RESULTS_ROOT",
    "command_line",
    "machine_info",
    "machine_name",
    "markdown_table",
    "peak_rss_mib",
    "results_dir",
    "rss_mib",
    "vm_hwm_mib",
    "write_json",
    "write_results",
]

RESULTS_ROOT = Path(__file__).resolve().parent / "results"

# Distributions whose versions decide benchmark figures on this stack.
_PACKAGES = ("torch", "torchrec", "fbgemm-gpu-cpu", "fbgemm-gpu", "lightning", "numpy")


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_state(repo: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
        ).stdout

    try:
        return {
            "commit": git("rev-parse", "HEAD").strip(),
            "dirty": bool(git("status", "--porcelain").strip()),
        }
    except (OSError, subprocess.CalledProcessError):
        return {}


def machine_info(repo: Optional[Path] = None) -> dict[str, Any]:
    """CPU, RAM, OS, Python and package versions, date, and (given ``repo``) the git commit."""
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "os": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": round(_ram_bytes() / 2**30, 2),
        "python": sys.version.split()[0],
        "versions": {p: v for p in _PACKAGES if (v := _version(p)) is not None},
    }
    if repo is not None:
        info["git"] = _git_state(repo)
    return info


def machine_name(accelerator: Optional[str] = None) -> str:
    """The hardware as a folder name: the accelerator's name, or ``cpu-<n>core`` for a CPU run.

    Args:
        accelerator: the device name of a GPU run (``torch.cuda.get_device_name()``, e.g. ``"NVIDIA
            H100 80GB HBM3"`` -> ``"h100-80gb-hbm3"``); None for a CPU run (the cores this process
            may use).
    """
    if accelerator is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return f"cpu-{cores}core"
    name = re.sub(r"^nvidia\s+", "", accelerator.strip().lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def results_dir(machine: Optional[str] = None) -> Path:
    """``benchmarks/results/<today, UTC>_<machine>/``, where a run writes its results by default.

    Args:
        machine: `machine_name` of the hardware; None: this machine's CPU (`machine_name()`).
    """
    today = datetime.now(timezone.utc).date().isoformat()
    return RESULTS_ROOT / f"{today}_{machine or machine_name()}"


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """The command that ran this process, quoted so that it can be pasted into a shell."""
    argv = sys.argv if argv is None else argv
    return "python " + " ".join(shlex.quote(a) for a in argv)


def peak_rss_mib() -> float:
    """This process's peak resident set, ``getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux), in MiB.

    Linux keeps the larger of the process's own peak and its pre-exec peak, so a process started by
    ``subprocess`` from a big parent reports at least the parent's peak. Compare with `vm_hwm_mib`.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _proc_status_mib(field: str) -> Optional[float]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # the kernel reports kB
    except OSError:
        pass
    return None


def vm_hwm_mib() -> Optional[float]:
    """Peak resident set of this process's current address space (``VmHWM``), in MiB; None off Linux."""
    return _proc_status_mib("VmHWM")


def rss_mib() -> Optional[float]:
    """Resident set of this process now (``VmRSS``), in MiB; None off Linux."""
    return _proc_status_mib("VmRSS")


def write_results(path: Path, record: dict, report: Callable[[dict], str]) -> None:
    """Write ``record`` as JSON at ``path``, its ``report`` as Markdown and its plot as SVG beside it.

    Prints the report. The plot (`plot.write_plot`) comes last, so a run whose plot fails keeps
    its JSON and Markdown; ``python benchmarks/plot.py JSON`` draws it again from the JSON.
    """
    from plot import write_plot  # matplotlib: imported only when a run has results to draw

    write_json(path, record)
    markdown = report(record)
    path.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {path}, {path.with_suffix('.md')} and {write_plot(record, path)}")


def write_json(path: Union[str, Path], record: Any) -> None:
    """Write ``record`` as indented JSON, creating the folder; replaces the file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-2):
            return f"{value:.3g}"
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value).replace("|", "\\|")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats get a sensible number of digits, None prints as ``-``."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)
