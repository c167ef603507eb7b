"""The docs site builds with ``--strict``, its diagrams render and its benchmark figures come from results.

Needs the docs extra (``pip install -e '.[docs]'``, or ``make docs``); skipped without it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

for _package in ("mkdocs", "material", "mkdocstrings"):
    pytest.importorskip(_package, reason="the docs extra is not installed: pip install -e '.[docs]'")

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
MERMAID_FENCE = re.compile(r"^(`{3,}|~{3,})mermaid\s*$", re.MULTILINE)
# The first word of every mermaid diagram type (mermaid.js.org, "Diagram Syntax").
MERMAID_TYPES = (
    "flowchart", "graph", "sequenceDiagram", "classDiagram", "stateDiagram", "stateDiagram-v2",
    "erDiagram", "journey", "gantt", "pie", "quadrantChart", "requirementDiagram", "gitGraph",
    "C4Context", "mindmap", "timeline", "sankey-beta", "xychart-beta", "block-beta", "packet-beta",
    "architecture-beta",
)  # fmt: skip
FIGURE = re.compile(r"!\[[^\]]*\]\((assets/benchmarks/[^)]+\.svg)\)")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def page_html(site: Path, page: Path) -> str:
    """The built HTML of ``page`` (docs/x.md -> site/x/index.html; index.md -> site/index.html)."""
    relative = page.relative_to(DOCS).with_suffix("")
    built = site / (relative.parent if relative.name == "index" else relative) / "index.html"
    return built.read_text()


def mermaid_pages() -> list[Path]:
    return [p for p in sorted(DOCS.rglob("*.md")) if MERMAID_FENCE.search(p.read_text())]


def test_site_builds_strictly(site: Path) -> None:
    assert (site / "index.html").exists()


def test_the_docs_have_diagrams() -> None:
    assert mermaid_pages(), "no ```mermaid fence under docs/: this check would check nothing"


@pytest.mark.parametrize("page", mermaid_pages(), ids=lambda p: p.name)
def test_every_mermaid_fence_becomes_a_diagram(site: Path, page: Path) -> None:
    fences = len(MERMAID_FENCE.findall(page.read_text()))
    html = page_html(site, page)
    diagrams = html.count('<pre class="mermaid">')
    # pymdownx.superfences' mermaid custom fence (mkdocs.yml) writes <pre class="mermaid">, which
    # Material for MkDocs turns into a diagram; an unconfigured fence stays highlighted code.
    assert diagrams == fences, (
        f"{page.name}: {fences} mermaid fence(s) but {diagrams} diagram(s) "
        "in the built page: check the pymdownx.superfences custom_fences entry in mkdocs.yml"
    )
    assert "```mermaid" not in html and "language-mermaid" not in html, (
        f"{page.name}: raw mermaid text in the page"
    )


@pytest.mark.parametrize("page", mermaid_pages(), ids=lambda p: p.name)
def test_every_diagram_names_its_type(page: Path) -> None:
    text = page.read_text()
    for fence in MERMAID_FENCE.finditer(text):
        body = text[fence.end() :].lstrip("\n")
        first_word = body.split(None, 1)[0] if body.strip() else ""
        line = text.count("\n", 0, fence.start()) + 1
        assert first_word in MERMAID_TYPES, (
            f"{page.name}:{line}: a mermaid diagram starts with {first_word!r}, which mermaid does not "
            f"draw; start it with its type, one of {', '.join(MERMAID_TYPES)}"
        )


def test_benchmark_figures_are_plots_of_results(site: Path) -> None:
    """Every benchmark figure on the docs is the plot of a results JSON (same date, machine and name)."""
    text = (DOCS / "benchmarks.md").read_text()
    figures = FIGURE.findall(text)
    assert figures, "docs/benchmarks.md shows no plot"
    for figure in figures:
        svg = DOCS / figure
        results = ROOT / "benchmarks" / "results" / svg.parent.name / f"{svg.stem}.json"
        assert svg.exists(), f"docs/benchmarks.md shows {figure}, which does not exist"
        assert results.exists(), (
            f"docs/{figure} has no results file {results.relative_to(ROOT)}: draw it from one with "
            f"python benchmarks/plot.py benchmarks/results/<date>_<machine>/NAME.json --out-dir "
            f"docs/assets/benchmarks/<date>_<machine>"
        )
        assert (site / figure).exists(), f"{figure} is not in the built site"
