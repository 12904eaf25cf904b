"""benchmarks/README.md is written from the results files, never edited by hand."""

from __future__ import annotations

import json

import pytest

from benchmarks import readme


def test_the_committed_readme_is_what_the_results_make():
    expected = readme.render(readme.TEMPLATE.read_text())
    assert readme.README.read_text() == expected, (
        "benchmarks/README.md differs from what its template and results/*.json make: "
        "run `python -m benchmarks readme` (and edit README.template.md, not README.md)"
    )


def test_placeholders_take_their_figures_from_the_results(tmp_path):
    (tmp_path / "demo.json").write_text(
        json.dumps(
            {
                "date": "2026-12-01 00:00:00 UTC",
                "command": "python -m benchmarks demo",
                "machine": {"cpus": 2, "load_average": [1.0, 1.0, 1.0]},
                "figures": [
                    {"name": "wait.ratio", "value": 0.25, "unit": "gpushare/kubespawner"},
                    {"name": "cost", "value": 0.0252, "unit": "share"},
                ],
                "tables": [
                    {"title": "", "headers": ["figure", "ours"], "rows": [["wait | p50", "1.5"]]},
                    {"title": "Each release", "headers": ["#", "s"], "rows": [["1", "2"]]},
                ],
                "notes": ["a note"],
            }
        )
    )
    text = readme.render(
        "{{results:demo}}\n{{table:demo:1}}\n{{figure:demo:wait.ratio}} {{figure:demo:cost}}",
        tmp_path,
    )
    assert "| wait \\| p50 | 1.5 |" in text
    assert "Each release:" in text and "| 1 | 2 |" in text
    assert "0.25 gpushare/kubespawner 2.5 %" in text
    assert "- a note" in text
    assert "*Not measured yet" in readme.render("{{results:other}}", tmp_path)
    with pytest.raises(readme.MissingResult):
        readme.render("{{figure:demo:nothing}}", tmp_path)
