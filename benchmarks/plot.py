"""Plots of benchmark results, drawn from their JSON: one SVG per results file.

    python benchmarks/plot.py benchmarks/results/2026-12-01_cpu-2core/*.json     # beside each JSON
    python benchmarks/plot.py benchmarks/results/2026-12-01_cpu-2core/*.json \
        --out-dir docs/assets/benchmarks/2026-12-01_cpu-2core                    # into the docs

Every benchmark script calls `write_plot` after writing its JSON (through `common.write_results`),
so a plot never needs the benchmark to run again: this command re-renders them from the JSON, for
instance after a change of style, or into the docs' assets. The SVGs are byte-for-byte
reproducible (no date, fixed ids), so re-rendering unchanged results changes no file.

Which drawing a file gets: its record's ``"benchmark"`` field, else the longest name in `PLOTTERS`
that starts its file name (results written before the field existed, e.g.
``strategy_overhead_interleaved.json``). A new benchmark adds one function to `PLOTTERS`.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

__all__ = ["PLOTTERS", "benchmark_of", "write_plot"]

# Reproducible SVGs: no creation date (savefig metadata), fixed element ids, text kept as text.
_STYLE = {
    "svg.hashsalt": "lightning-dembed",
    "svg.fonttype": "none",
    "font.size": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.axisbelow": True,
}
_COLORS = matplotlib.colormaps["tab10"].colors
_THOUSANDS = FuncFormatter(lambda value, _: f"{value:,.0f}")
# Names the strategy-comparison script used before it was split (strategy_overhead.py).
_LEGACY_PARTS = {"overhead": "separate"}
_STRATEGY_SIDE = "lightning_hybrid"


def _machine_line(record: dict[str, Any]) -> str:
    machine = record.get("machine", {})
    when = str(machine.get("date") or record.get("date", ""))[:10]
    cpus = machine.get("cpu_count")
    return ", ".join(p for p in (when, f"{cpus} CPUs" if cpus else "") if p)


def _hbars(
    ax: Axes,
    labels: Sequence[str],
    values: Sequence[float],
    colors: Sequence[Any],
    runs: Optional[Sequence[Sequence[float]]] = None,
    unit: str = "",
    notes: Optional[Sequence[str]] = None,
) -> None:
    """Horizontal bars, first label on top, each value (and note) written past its bar; ``runs`` as dots."""
    positions = list(range(len(labels)))[::-1]
    ax.barh(positions, values, color=colors, height=0.6)
    for i, (y, value) in enumerate(zip(positions, values, strict=True)):
        end = max([value, *(runs[i] if runs is not None else [])])
        text = f"{value:,.0f}{unit}" + (f"  {notes[i]}" if notes is not None and notes[i] else "")
        ax.annotate(text, (end, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
        if runs is not None:
            ax.plot(runs[i], [y] * len(runs[i]), "k.", markersize=4)
    ax.set_yticks(positions, labels)
    ax.grid(axis="y", visible=False)
    ax.margins(x=0.3)
    ax.xaxis.set_major_formatter(_THOUSANDS)


def _pipeline_labels_and_colors(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """A bar label per (pipeline, workers) row, and one color per pipeline."""
    labels = [f"{r['pipeline']}, {r['num_workers']} worker{'s' * (r['num_workers'] != 1)}" for r in rows]
    pipelines = list(dict.fromkeys(r["pipeline"] for r in rows))
    return labels, [_COLORS[pipelines.index(r["pipeline"]) % len(_COLORS)] for r in rows]


def plot_data_pipeline(record: dict[str, Any]) -> Figure:
    rows = record["results"]
    fig = Figure(figsize=(7.5, 0.45 * len(rows) + 1.2), layout="constrained")
    ax = fig.subplots()
    labels, colors = _pipeline_labels_and_colors(rows)
    _hbars(ax, labels, [r["samples_per_sec"] for r in rows], colors)
    ax.set_xscale("log")
    ax.set_xlabel("samples/s (log scale)")
    ax.set_title(f"Data pipelines, batch {record['batch_size']} ({_machine_line(record)})")
    return fig


def _loader_workers(record: dict[str, Any]) -> Optional[int]:
    if "num_workers" in record:
        return record["num_workers"]
    found = re.search(r"--num-workers (\d+)", record.get("command", ""))
    return int(found.group(1)) if found else None


def plot_dlrm_throughput(records: list[dict[str, Any]]) -> Figure:
    fig = Figure(figsize=(7.5, 0.45 * len(records) + 1.2), layout="constrained")
    ax = fig.subplots()
    labels, colors = [], []
    devices = list(dict.fromkeys(r["device_name"] for r in records))
    for r in records:
        label = (
            f"{r['model'].title()} ({r['tables']} tables, scale {r['scale']}), batch {r['global_batch']:,}, "
            f"{r['devices']} process{'es' * (r['devices'] != 1)}"
        )
        workers = _loader_workers(r)
        if workers:
            label += f", {workers} loader workers"
        labels.append(label)
        colors.append(_COLORS[devices.index(r["device_name"]) % len(_COLORS)])
    values = [r["samples_per_sec"] for r in records]
    _hbars(ax, labels, values, colors)
    if max(values) > 20 * min(values):
        ax.set_xscale("log")
    ax.set_xlabel("training samples/s (all processes)" + (" (log scale)" if ax.get_xscale() == "log" else ""))
    ax.set_title(
        f"DLRM training throughput, HybridParallelStrategy\n{', '.join(devices)}, {records[0]['date']}"
    )
    return fig


def plot_meta_io(record: dict[str, Any]) -> Figure:
    rows = record["pipelines"]
    fig = Figure(figsize=(7.5, 0.45 * len(rows) + 1.4), layout="constrained")
    ax = fig.subplots()
    labels, colors = _pipeline_labels_and_colors(rows)
    _hbars(
        ax,
        labels,
        [r["tasks_per_sec"] for r in rows],
        colors,
        runs=[[x["tasks_per_sec"] for x in r["runs"]] for r in rows],
    )
    training = record.get("training")
    if training:
        consumed = training["tasks_per_sec_per_rank"]
        ax.axvline(
            consumed,
            color="k",
            linestyle="--",
            linewidth=1,
            label=f"training consumes {consumed:,.0f} tasks/s per rank",
        )
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"tasks/s, {record['tasks_per_batch']} tasks per meta-batch (log scale; dots: repetitions)")
    ax.set_title(f"Meta-IO vs per-sample loading ({_machine_line(record)})")
    return fig


def plot_meta_orchestration(record: dict[str, Any]) -> Figure:
    summary = record["summary"]
    tasks = [r["tasks_per_rank"] for r in summary]
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    rate_ax, speedup_ax = fig.subplots(1, 2)
    for i, method in enumerate(("g-meta", "naive")):
        rate_ax.plot(tasks, [r[method] for r in summary], "o-", color=_COLORS[i], label=method)
        for t, r in zip(tasks, summary, strict=True):
            rate_ax.plot(
                [t] * len(r[f"{method}_runs"]), r[f"{method}_runs"], ".", color=_COLORS[i], alpha=0.5
            )
    rate_ax.set_yscale("log")
    rate_ax.set_ylabel(f"tasks/s, all {record['world_size']} ranks (log scale)")
    rate_ax.legend()
    rate_ax.set_title("throughput (median of runs; dots: runs)")
    speedup_ax.plot(tasks, [r["speedup"] for r in summary], "o-", color=_COLORS[2])
    for t, r in zip(tasks, summary, strict=True):
        speedup_ax.annotate(
            f"{r['speedup']:.1f}x",
            (t, r["speedup"]),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=8,
        )
    speedup_ax.axhline(3, color="k", linestyle="--", linewidth=1, label="target at 32 tasks: 3x")
    speedup_ax.set_ylabel("g-meta / naive")
    speedup_ax.legend(loc="upper left")
    speedup_ax.set_title("speed-up")
    for ax in (rate_ax, speedup_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(tasks, [str(t) for t in tasks])
        ax.set_xlabel("tasks per rank and meta-batch")
    fig.suptitle(f"G-Meta orchestration vs naive distributed MAML ({_machine_line(record)})")
    return fig


def _spread(values: list[Optional[float]]) -> list[float]:
    """Error bars from (mean, std) pairs' stds: a single seed has none, drawn as no bar."""
    return [float("nan") if std is None else std for std in values]


def plot_meta_quality(record: dict[str, Any]) -> Figure:
    summary = record["summary"]
    methods = list(dict.fromkeys(r["method"] for r in summary))
    # Levels in order, evenly spaced: heterogeneity values, or the name of a real data set.
    names = list(dict.fromkeys(r["heterogeneity"] for r in summary))
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    auc_ax, gain_ax = fig.subplots(1, 2)
    for i, method in enumerate(methods):
        rows = [r for r in summary if r["method"] == method]
        # Each method a little to the side, so that the seeds' error bars do not hide each other.
        levels = [names.index(r["heterogeneity"]) + 0.06 * (i - (len(methods) - 1) / 2) for r in rows]
        style = dict(color=_COLORS[i % len(_COLORS)], marker="o", capsize=3, label=method)
        auc_ax.errorbar(levels, [r["auc"][0] for r in rows], yerr=_spread([r["auc"][1] for r in rows]), **style)
        if all("auc_gain" in r for r in rows):
            gain_ax.errorbar(
                levels, [r["auc_gain"][0] for r in rows], yerr=_spread([r["auc_gain"][1] for r in rows]), **style
            )
    auc_ax.set_ylabel("cold-start query AUC (mean +- std over seeds)")
    auc_ax.legend(fontsize=7, ncols=2)
    gain_ax.axhline(0.02, color="k", linestyle="--", linewidth=1, label="target +0.02")
    gain_ax.axhline(0, color="k", linewidth=0.5)
    gain_ax.set_ylabel("AUC gain over the best plain baseline")
    gain_ax.legend(fontsize=7)
    for ax in (auc_ax, gain_ax):
        ax.set_xticks(range(len(names)), [str(name) for name in names])
        ax.set_xlabel("heterogeneity of users (or data set)")
    fig.suptitle(f"Cold-start quality: meta-DLRM vs plain DLRM ({_machine_line(record)})")
    return fig


def _ratio(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _strategy_parts(record: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The summary's sides grouped by part (the configuration's prefix), in the order they ran."""
    parts: dict[str, list[dict[str, Any]]] = {}
    for side in record["summary"]["sides"]:
        part = side["config"].split("/")[0]
        parts.setdefault(_LEGACY_PARTS.get(part, part), []).append(side)
    return parts


def plot_strategy(record: dict[str, Any]) -> Figure:
    """Lightning + HybridParallelStrategy against each baseline: samples/s per part, and memory vs DDP."""
    parts = _strategy_parts(record)
    panels: list[tuple[str, str, list[dict[str, Any]]]] = []
    for part, sides in parts.items():
        panels.append((part, "samples_per_s", sides))
        if any(s["side"] == "lightning_ddp" for s in sides):
            panels.append((part, "largest_rank_peak_rss_mib", sides))
    columns = min(len(panels), 2)
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(4.6 * columns, 0.9 + 2.6 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    names = list(dict.fromkeys(s["side"] for sides in parts.values() for s in sides))
    for ax, (part, metric, sides) in zip(axes, panels, strict=False):
        per_side = [s[metric] for s in sides]
        means = [statistics.fmean(v) for v in per_side]
        colors = [_COLORS[names.index(s["side"]) % len(_COLORS)] for s in sides]
        unit = " MiB" if metric.endswith("_mib") else ""
        lead = [m for s, m in zip(sides, means, strict=True) if s["side"] == _STRATEGY_SIDE]
        notes = [
            f"(strategy / this: {_ratio(lead[0] / m)})" if lead and s["side"] != _STRATEGY_SIDE else ""
            for s, m in zip(sides, means, strict=True)
        ]
        _hbars(ax, [s["side"] for s in sides], means, colors, runs=per_side, unit=unit, notes=notes)
        if metric == "samples_per_s" and max(means) > 20 * min(means):
            ax.set_xscale("log")
        ax.set_xlabel(
            "largest rank's peak RSS, MiB" if unit else "global samples/s (mean; dots: repetitions)"
        )
        ax.set_title(f"{part}: {'memory' if unit else 'throughput'}")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    args, title = record["args"], record.get("title", record["benchmark"])
    fig.suptitle(
        f"{title}: {args['devices']} gloo ranks, batch {args['batch_size']} per rank "
        f"({_machine_line(record)})"
    )
    return fig


PLOTTERS: dict[str, Callable[[Any], Figure]] = {
    "data_pipeline": plot_data_pipeline,
    "dlrm_throughput": plot_dlrm_throughput,
    "meta_io": plot_meta_io,
    "meta_orchestration": plot_meta_orchestration,
    "meta_quality": plot_meta_quality,
    "strategy_overhead": plot_strategy,  # the script before it was split in two
    "vs_ddp": plot_strategy,
    "vs_torchrec_loop": plot_strategy,
}


def benchmark_of(record: Any, json_path: Path) -> str:
    """The benchmark that wrote ``record``: its ``"benchmark"`` field, else the file name's prefix.

    ``record`` is one run's dict, or a list of them (``dlrm_throughput`` appends one per run).
    """
    first = record[0] if isinstance(record, list) and record else record
    if isinstance(first, dict) and first.get("benchmark") in PLOTTERS:
        return first["benchmark"]
    prefixes = [name for name in PLOTTERS if json_path.stem.startswith(name)]
    if not prefixes:
        raise ValueError(
            f"{json_path}: no plot for this file; name it after one of {sorted(PLOTTERS)} "
            "or give its record a 'benchmark' field naming one"
        )
    return max(prefixes, key=len)


def write_plot(record: Any, json_path: Union[str, Path], out_dir: Optional[Path] = None) -> Path:
    """Draw ``record`` (read from ``json_path``) as ``<json stem>.svg`` in ``out_dir`` (None: beside it).

    Returns:
        The SVG's path.
    """
    json_path = Path(json_path)
    out = (out_dir or json_path.parent) / f"{json_path.stem}.svg"
    out.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(_STYLE):
        fig = PLOTTERS[benchmark_of(record, json_path)](record)
        fig.savefig(out, metadata={"Date": None})
    return out


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results JSON files")
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="where the SVGs go; default: beside each JSON"
    )
    args = parser.parse_args(argv)
    for path in args.results:
        print(write_plot(json.loads(path.read_text()), path, args.out_dir))


if __name__ == "__main__":
    main()
