"""Write ``benchmarks/README.md`` from ``README.template.md`` and the results files.

    python -m benchmarks readme     # ``make bench`` runs it after the benchmarks

The template is prose; every figure comes from ``results/<name>.json``, the
file each benchmark's one command writes. Placeholders:

- ``{{results:NAME}}``: the main table of ``results/NAME.json`` as Markdown,
  with the date, the command and the machine it ran on (or a line saying it has
  not been run);
- ``{{table:NAME:N}}``: its N-th further table (1 is the first after the main one);
- ``{{figure:NAME:FIGURE}}``: one figure, formatted with its unit.

A test checks that the committed README is what this writes, so nobody edits
a figure in it by hand.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from .common import RESULTS_DIR, fmt

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "README.template.md"
README = HERE / "README.md"
PLACEHOLDER = re.compile(r"\{\{(results|table|figure):([\w.-]+)(?::([\w.-]+))?\}\}")


class MissingResult(LookupError):
    """A placeholder names a result that the results files do not hold."""


def _load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _markdown(headers: list[str], rows: list[list[str]]) -> str:
    def row(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    align = ["---"] + ["---:"] * (len(headers) - 1)
    return "\n".join([row(headers), row(align), *(row(r) for r in rows)])


def _results(data: dict | None, name: str, results: Path) -> str:
    if data is None:
        return f"*Not measured yet: run `python -m benchmarks {name.replace('_', '-')}`.*"
    machine = data["machine"]
    lead = (
        f"Measured {data['date']} with `{data['command']}` "
        f"({machine['cpus']} CPUs, load {'/'.join(str(v) for v in machine['load_average'])} "
        f"at the end; `results/{name}.json`):"
    )
    if "tables" in data:
        main = data["tables"][0]
        table = _markdown(main["headers"], main["rows"])
    else:  # written before results carried their tables: the printed one
        table = "```text\n" + (results / f"{name}.txt").read_text().rstrip() + "\n```"
    parts = [lead, "", table]
    if data.get("notes"):
        parts += ["", *(f"- {note}" for note in data["notes"])]
    return "\n".join(parts)


def _figure(data: dict | None, name: str, figure: str) -> str:
    if data is None:
        return "(not measured yet)"
    for item in data["figures"]:
        if item["name"] == figure:
            value, unit = item["value"], item["unit"]
            if unit == "share":
                return f"{100 * value:.2g} %"
            return f"{fmt(value)} {unit}".strip()
    raise MissingResult(f"results/{name}.json has no figure {figure!r}")


def render(template: str, results: Path = RESULTS_DIR) -> str:
    cache: dict[str, dict | None] = {}

    def replace(match: re.Match) -> str:
        kind, name, extra = match.groups()
        if name not in cache:
            cache[name] = _load(results, name)
        data = cache[name]
        if kind == "results":
            return _results(data, name, results)
        if kind == "figure":
            return _figure(data, name, extra)
        if data is None or "tables" not in data:
            return ""
        index = int(extra)
        if index >= len(data["tables"]):
            raise MissingResult(f"results/{name}.json has no table {index}")
        table = data["tables"][index]
        title = f"{table['title']}:\n\n" if table["title"] else ""
        return title + _markdown(table["headers"], table["rows"])

    header = (
        "<!-- Written by `python -m benchmarks readme` from README.template.md and "
        "results/*.json: edit those, not this file. -->\n\n"
    )
    return header + PLACEHOLDER.sub(replace, template)


def main(argv: list[str] | None = None) -> int:
    README.write_text(render(TEMPLATE.read_text()))
    print(f"wrote {README}", file=sys.stderr)
    return 0
