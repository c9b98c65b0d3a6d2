"""Generated reports included as sections of RESULTS.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmencoders.cli import main
from lmencoders.sections import as_section, place_sections

BENCHMARK_REPORT = """# A benchmark

Made by `python run.py`, see [the guide](https://example.org/guide.md) or [notes](#notes).

```
# a shell comment, not a heading; ![not](a-link.png)
```

![curves](curves-a.png) and [runs](runs/a.json) and [up](../other.md)

## Statistics
"""


def _write_report(root: Path, text: str = BENCHMARK_REPORT) -> Path:
    report = root / "results" / "bench" / "RESULTS.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text)
    return report


def test_a_section_has_deeper_headings_and_links_from_the_results_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_report(tmp_path)
    block = as_section("results/bench/RESULTS.md", "RESULTS.md").splitlines()
    assert block[0].startswith("<!-- begin section: results/bench/RESULTS.md")
    assert block[-1] == "<!-- end section: results/bench/RESULTS.md -->"
    assert "## A benchmark" in block and "### Statistics" in block
    assert "# a shell comment, not a heading; ![not](a-link.png)" in block  # code kept as is
    assert (
        "![curves](results/bench/curves-a.png) and [runs](results/bench/runs/a.json)"
        " and [up](results/other.md)" in block
    )
    assert "[the guide](https://example.org/guide.md) or [notes](#notes)" in "\n".join(block)


def test_placing_a_section_again_replaces_its_block(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = _write_report(tmp_path)
    results = "# Results\n\nthe grid\n\n## The paper's numbers, for comparison\n\n| a |\n"
    once = place_sections(results, ["results/bench/RESULTS.md"], "RESULTS.md")
    assert once.index("## A benchmark") < once.index("## The paper's numbers")
    report.write_text(BENCHMARK_REPORT.replace("# A benchmark", "# A benchmark, rerun"))
    twice = place_sections(once, ["results/bench/RESULTS.md"], "RESULTS.md")
    assert twice.count("begin section:") == 1 and "## A benchmark, rerun" in twice
    assert twice.startswith("# Results\n\nthe grid\n\n") and twice.endswith("| a |\n")
    no_anchor = place_sections("# Results\n", ["results/bench/RESULTS.md"], "RESULTS.md")
    assert no_anchor.rstrip().endswith("<!-- end section: results/bench/RESULTS.md -->")


def test_report_refreshes_sections_only_and_names_what_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _write_report(tmp_path)
    command = ["report", "--sections", "results/bench/RESULTS.md", "--sections-only"]
    assert main(command) == 2  # no RESULTS.md to refresh
    assert "no RESULTS.md to refresh" in capsys.readouterr().err
    Path("RESULTS.md").write_text("# Results\n\n## The paper's numbers, for comparison\n")
    assert main(command) == 0
    assert "## A benchmark" in Path("RESULTS.md").read_text()
    assert main(["report", "--sections", "results/none.md", "--sections-only"]) == 2
    assert "section results/none.md: no such report" in capsys.readouterr().err


def test_a_missing_section_is_named():
    with pytest.raises(FileNotFoundError, match="section nowhere.md: no such report"):
        as_section("nowhere.md", "RESULTS.md")
