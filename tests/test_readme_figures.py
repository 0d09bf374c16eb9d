"""Every figure the README (and docs/) quotes next to a results file appears in that file (issue 16).

Convention (stated in the README's Benchmarks section): a paragraph, list item or table row that
quotes measured figures names the results file they come from in backticks, e.g.
`` `quality.md` `` or `` `benchmarks/results/quality.md` ``. Each number in such a block (integers,
decimals, ``1,664``-style thousands, ``43%``, ``1.44x``) must occur as a number in one of the files
it cites; a percentage may also occur as its fraction (``43%`` as ``0.43``). Blocks that cite no
results file are not checked, so a figure without a source is a review matter, not a pass.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CITE = re.compile(r"`(?:benchmarks/results/)?([\w.-]+\.md)`")
PATH = re.compile(r"`benchmarks/results/([\w.-]+)`")
NUMBER = re.compile(r"(?<![\w.])(\d[\d,]*(?:\.\d+)?)(%|x)?(?![\w])")


def _blocks(text: str) -> list[str]:
    """Paragraphs (blank-line separated), with each table row and list item a block of its own."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        if lines and all(line.lstrip().startswith("|") for line in lines):
            out += lines
            continue
        item: list[str] = []
        for line in lines:
            if re.match(r"\s*(?:[-*]|\d+\.)\s", line) and item:
                out.append("\n".join(item))
                item = []
            item.append(line)
        if item:
            out.append("\n".join(item))
    return out


def _numbers_in(text: str) -> set[str]:
    text = text.replace("\u2212", "-")
    return {m.group(1).replace(",", "") for m in NUMBER.finditer(text)}


def _spellings(value: str, unit: str | None) -> set[str]:
    """How a README figure may be written in a results file."""
    out = {value}
    if unit == "%":  # the same digits as a fraction: 31.7% is 0.317, 43% is 0.43, 1.3% is 0.013
        decimals = len(value.partition(".")[2]) + 2
        out.add(f"{float(value) / 100:.{decimals}f}")
    return out


def _readme_text() -> str:
    """The README and the reference pages it links under docs/ (where the long sections live)."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    return "\n\n".join(page.read_text(encoding="utf-8") for page in pages)


def _cited_blocks() -> list[tuple[str, list[str]]]:
    readme = _readme_text()
    # code spans are names, not figures; the citations themselves are taken out before numbers are read
    blocks = [(b, [n for n in CITE.findall(b) if (RESULTS / n).is_file()]) for b in _blocks(readme)]
    return [(b, names) for b, names in blocks if names]


def test_the_readme_cites_results_files_that_exist():
    readme = _readme_text()
    assert {name for _, names in _cited_blocks() for name in names} >= {"quality.md", "embed_throughput.md"}
    assert not sorted(n for n in PATH.findall(readme) if not (RESULTS / n).exists())


@pytest.mark.parametrize("block,names", _cited_blocks(), ids=lambda v: v[:40] if isinstance(v, str) else None)
def test_every_quoted_figure_is_in_the_cited_results_file(block, names):
    files = [RESULTS / n for n in names if (RESULTS / n).is_file()]
    have = set().union(*(_numbers_in(f.read_text(encoding="utf-8")) for f in files))
    prose = re.sub(r"`[^`]*`", " ", block)  # paths, commands and code are not figures
    missing = []
    for m in NUMBER.finditer(prose.replace("\u2212", "-")):
        value, unit = m.group(1).replace(",", ""), m.group(2)
        if not (_spellings(value, unit) & have):
            missing.append(m.group(0))
    assert not missing, f"figures not found in {names}: {missing}\nin: {block[:300]}"


def test_the_checker_catches_a_figure_that_is_not_in_the_file():
    """The check can fail: a changed digit and a made-up percentage are both reported."""
    have = _numbers_in((RESULTS / "quality.md").read_text(encoding="utf-8"))
    assert "1277.5" not in have and "1277.4" in have
    assert not (_spellings("34.4", "%") & have) and _spellings("34.3", "%") & have
