"""Pages generated from the code at every build, so the docs cannot drift from it.

Before Sphinx reads the sources, this writes MyST files into ``docs/_generated/``
that the pages pull in with ``{include}``:

- ``options.md``: every configurable option our own classes define (not the ones
  they inherit from KubeSpawner or traitlets), from the traits' help texts;
- ``commands.md``: the ``gpushare`` command's help, from its click definitions;
- ``metrics.md``: the service's Prometheus metrics, read from the metrics
  module's source; the monitoring page and the Grafana example may name only
  these (anything else is a build warning, so an error under ``-W``);
- ``results-<name>.md``: the GPU measurements in ``benchmarks/results/`` when they
  exist, else a note that says how to produce them; ``performance-*.md``: the
  expected shares next to the figures measured during design and, once
  measured, with the release;
- ``screenshots.md``: the images in ``_static/screenshots/``, if any.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import json
import os
import pkgutil
import re
import shutil
import textwrap
from pathlib import Path

from sphinx.util import logging

log = logging.getLogger(__name__)

DOCS = Path(__file__).resolve().parents[1]
ROOT = DOCS.parent
OUT = DOCS / "_generated"
# GPUSHARE_DOCS_RESULTS: another folder of results (to preview a measurement)
RESULTS = Path(os.environ.get("GPUSHARE_DOCS_RESULTS") or ROOT / "benchmarks" / "results")
SCREENSHOTS = DOCS / "_static" / "screenshots"
METRICS_SOURCE = ROOT / "jupyterhub_gpushare" / "service" / "metrics.py"
PACKAGE = "jupyterhub_gpushare"
# Files whose metric names must exist in the code.
METRIC_MENTIONS = [DOCS / "monitoring.md", DOCS / "_static" / "grafana-gpushare-panel.json"]
KUBESPAWNER_OPTIONS = "https://jupyterhub-kubespawner.readthedocs.io/en/latest/spawner.html"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp")


def write(name: str, text: str) -> None:
    """Write a generated file, leaving it untouched when nothing changed."""
    OUT.mkdir(exist_ok=True)
    path = OUT / name
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


# -- configuration options ---------------------------------------------------------
TYPE_NAMES = {
    "Int": "integer",
    "Integer": "integer",
    "Float": "number",
    "Unicode": "string",
    "Bool": "true or false",
    "List": "list",
    "Set": "set",
    "Dict": "dict",
    "Callable": "callable",
    "Any": "any value",
    "Enum": "one of a set",
    "CaselessStrEnum": "one of a set",
}
ROLE = re.compile(r":(?:py:)?(\w+):`([^`]+)`")
RST_LINK = re.compile(r"`([^`<]+?)\s*<([^>]+)>`_{1,2}")
DIRECTIVE = re.compile(r"^\.\. (versionadded|versionchanged|deprecated|note|warning)::\s*(.*)$")


def help_to_myst(text: str) -> str:
    """A trait's help (reStructuredText) as MyST: literal blocks, roles, links."""
    lines = inspect.cleandoc(text).splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        directive = DIRECTIVE.match(line)
        ends_literal = line.rstrip().endswith("::")
        if directive or ends_literal:
            block, j = [], i + 1
            while j < len(lines) and (not lines[j].strip() or lines[j][:1] in (" ", "\t")):
                block.append(lines[j])
                j += 1
            body = textwrap.dedent("\n".join(block)).strip("\n")
            if directive:
                out += [f"```{{{directive[1]}}} {directive[2]}".rstrip(), body, "```"]
            else:
                lead = line.rstrip()[:-2]
                if lead.strip():
                    out.append(inline(lead.rstrip() + ("" if lead.endswith(" ") else ":")))
                code = "python" if re.match(r"(c\.|import |from )", body) else "text"
                out += ["", f"```{code}", body, "```"]
            i = j
            continue
        out.append(inline(line))
        i += 1
    return "\n".join(out).strip() + "\n"


def inline(line: str) -> str:
    line = RST_LINK.sub(r"[\1](\2)", line)
    return ROLE.sub(r"`\2`", line)


def our_configurables() -> list[type]:
    """Configurable classes defined in our package, spawner first."""
    from traitlets.config import Configurable

    package = importlib.import_module(PACKAGE)
    classes: dict[str, type] = {}
    for module in pkgutil.walk_packages(package.__path__, PACKAGE + "."):
        if module.name.endswith("__main__"):
            continue  # running it would start the service
        mod = importlib.import_module(module.name)
        for obj in vars(mod).values():
            if (
                isinstance(obj, type)
                and issubclass(obj, Configurable)
                and obj.__module__ == mod.__name__
                and obj.class_own_traits(config=True)
            ):
                classes[f"{obj.__module__}.{obj.__name__}"] = obj
    from jupyterhub.spawner import Spawner
    from traitlets.config import Application

    # the spawner (in the hub) first, then the service: its application, its parts
    return sorted(
        classes.values(),
        key=lambda c: (
            not issubclass(c, Spawner),
            not issubclass(c, Application),
            c.__module__,
            c.__name__,
        ),
    )


def describe_type(trait) -> str:
    kind = TYPE_NAMES.get(type(trait).__name__, type(trait).__name__)
    return f"{kind} or None" if trait.allow_none else kind


def describe_default(cls: type, name: str, trait) -> str:
    """The default, or a note that the class works it out when it starts."""
    generator = getattr(cls, "_trait_default_generators", {}).get(name)
    function = getattr(generator, "func", generator)  # @default wraps the method
    computed = f"_{name}_default" in cls.__dict__ or getattr(
        function, "__qualname__", ""
    ).startswith(cls.__name__ + ".")
    return "worked out at start" if computed else f"`{trait.default_value_repr()}`"


def options_page() -> str:
    parts: list[str] = []
    service_intro_done = False
    from jupyterhub.spawner import Spawner

    for cls in our_configurables():
        in_service = not issubclass(cls, Spawner)  # everything else runs in the service
        if in_service and not service_intro_done:
            parts.append(
                "## The gpushare service\n\n"
                "These options belong to the service process, not to the hub. It is a "
                "traitlets application: give them on its command line "
                "(`--Class.option=value`) or in its own configuration file "
                "(`GPUShareService.config_file`, looked for in the service's working "
                "directory).\n"
            )
            service_intro_done = True
        level = "###" if in_service else "##"
        parts.append(f"{level} {cls.__name__}\n")
        # the class's own words only (not a docstring inherited from traitlets)
        doc = cls.__dict__.get("__doc__") or cls.__dict__.get("description")
        if isinstance(doc, str) and doc.strip():
            parts.append(help_to_myst(inspect.cleandoc(doc).split("\n\n")[0]))
        if cls.__name__ == "GPUShareSpawner":
            parts.append(
                "Set in the hub's configuration as `c.GPUShareSpawner.<option>`; with "
                "zero-to-jupyterhub, under `hub.config.GPUShareSpawner` (static values) or "
                "in `hub.extraConfig`. A profile can change any of them through its "
                "`kubespawner_override`. `GPUShareSpawner` also takes every option of "
                f"[KubeSpawner]({KUBESPAWNER_OPTIONS}), and reads the ones z2jh's "
                "`singleuser` values set.\n"
            )
        for name, trait in sorted(cls.class_own_traits(config=True).items()):
            parts.append(f"{level}# `{name}`\n")
            facts = [
                f"`c.{cls.__name__}.{name}`",
                describe_type(trait),
                f"default {describe_default(cls, name, trait)}",
            ]
            parts.append(" · ".join(facts) + "\n")
            if trait.help:
                parts.append(help_to_myst(trait.help))
            else:
                log.warning("%s.%s has no help text", cls.__name__, name)
    return "\n".join(parts)


# -- the command line -------------------------------------------------------------
def commands_page() -> str:
    import click

    from jupyterhub_gpushare.cli import main

    def help_of(command, ctx) -> str:
        return command.get_help(ctx).rstrip()

    settings = {**main.context_settings, "terminal_width": 88, "max_content_width": 88}
    root = click.Context(main, info_name="gpushare", **settings)
    parts = ["```text", help_of(main, root), "```", ""]
    for name in main.list_commands(root):
        command = main.get_command(root, name)
        ctx = click.Context(command, info_name=name, parent=root, max_content_width=88)
        parts += [f"### `gpushare {name}`", "", "```text", help_of(command, ctx), "```", ""]
    return "\n".join(parts)


# -- metrics ------------------------------------------------------------------------
METRIC_CALLS = {
    "Counter": "counter",
    "Gauge": "gauge",
    "Histogram": "histogram",
    "Summary": "summary",
    "CounterMetricFamily": "counter",
    "GaugeMetricFamily": "gauge",
    "HistogramMetricFamily": "histogram",
    "SummaryMetricFamily": "summary",
}
EXPOSED_SUFFIXES = {
    "counter": ["_total"],
    "gauge": [""],
    "histogram": ["_bucket", "_sum", "_count"],
    "summary": ["", "_sum", "_count"],
}


def _literal(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):  # f"{PREFIX}_gpushare_x": keep the literal part
        text = "".join(
            v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)
        )
        return text.lstrip("_")
    return None


def code_metrics() -> list[dict]:
    """The metrics the service defines: name, type, help and labels, from its source."""
    if not METRICS_SOURCE.exists():
        return []
    metrics = []
    for node in ast.walk(ast.parse(METRICS_SOURCE.read_text())):
        if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) in METRIC_CALLS):
            continue
        name = _literal(node.args[0]) if node.args else None
        if not name:
            continue
        kind = METRIC_CALLS[node.func.id]
        documentation = _literal(node.args[1]) if len(node.args) > 1 else ""
        labels_node = node.args[2] if len(node.args) > 2 else None
        for keyword in node.keywords:
            if keyword.arg in ("labelnames", "labels"):
                labels_node = keyword.value
            if keyword.arg == "documentation":
                documentation = _literal(keyword.value) or ""
        labels = []
        if isinstance(labels_node, (ast.List, ast.Tuple)):
            labels = [_literal(e) for e in labels_node.elts if _literal(e)]
        base = name.removesuffix("_total") if kind == "counter" else name
        metrics.append(
            {
                "name": f"jupyterhub_{base}",
                "type": kind,
                "help": documentation,
                "labels": labels,
                "exposed": [f"jupyterhub_{base}{s}" for s in EXPOSED_SUFFIXES[kind]],
            }
        )
    return sorted(metrics, key=lambda m: m["name"])


def metrics_page(metrics: list[dict]) -> str:
    if not metrics:
        return (
            "```{note}\nThe service's metrics module was not found in this build, so "
            "there is no list of metrics here.\n```\n"
        )
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for m in metrics:
        series = ", ".join(f"`{s}`" for s in m["exposed"])
        labels = ", ".join(f"`{label}`" for label in m["labels"]) or "none"
        meaning = m["help"].replace("|", "\\|")
        rows.append(f"| {series} | {m['type']} | {labels} | {meaning} |")
    return "\n".join(rows) + "\n"


def check_metric_mentions(metrics: list[dict]) -> None:
    """Every jupyterhub_gpushare_* name in the docs must be a series the code exposes,
    and every metric must be documented on the monitoring page."""
    if not metrics:
        return
    # the series Prometheus stores, and the metric families' own names
    exposed = {s for m in metrics for s in m["exposed"]} | {m["name"] for m in metrics}
    for path in METRIC_MENTIONS:
        text = path.read_text()
        for name in sorted(set(re.findall(r"jupyterhub_gpushare_\w+", text))):
            if name not in exposed:
                log.warning(
                    "%s names %s, which the service does not expose (it has: %s)",
                    path.relative_to(DOCS),
                    name,
                    ", ".join(sorted(exposed)),
                )
    monitoring = (DOCS / "monitoring.md").read_text()
    for m in metrics:
        if m["name"] not in monitoring:
            log.warning("monitoring.md does not explain the metric %s", m["name"])


def check_grafana_json() -> None:
    path = DOCS / "_static" / "grafana-gpushare-panel.json"
    try:
        panel = json.loads(path.read_text())
    except ValueError as e:
        log.warning("%s is not valid JSON: %s", path.relative_to(DOCS), e)
        return
    for target in panel.get("targets", []):
        if not target.get("expr"):
            log.warning("%s has a target without a query", path.relative_to(DOCS))


# -- measurements --------------------------------------------------------------------
def cell(value: object) -> str:
    """A value for a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def results_page(name: str, command: str) -> str:
    data_path, text_path = RESULTS / f"{name}.json", RESULTS / f"{name}.txt"
    plot = RESULTS / f"{name}.png"
    if not (data_path.exists() or text_path.exists()):
        return (
            "```{note}\n"
            f"No measurement in `benchmarks/results/{name}.*` yet: the figures above were "
            "measured during design. On a machine with an NVIDIA GPU, run\n"
            f"`{command}` and build the docs again; the measured figures then appear here.\n"
            "```\n"
        )
    parts = []
    if data_path.exists():
        try:
            data = json.loads(data_path.read_text())
        except ValueError:
            data = {}
        device = data.get("device") or {}
        where = device.get("nvidia_smi") if isinstance(device, dict) else device
        lead = [f"Measured {data['date']}" if data.get("date") else "Measured"]
        if where:
            lead.append(f"on {where}")
        parts.append(" ".join(lead) + f" (`benchmarks/results/{name}.json`).\n")
        figures = [f for f in data.get("figures") or [] if isinstance(f, dict) and "name" in f]
        if figures and not text_path.exists():  # the text file has the readable table
            parts += ["| figure | value | unit |", "|---|---|---|"]
            parts += [
                "| " + " | ".join(cell(f.get(k, "")) for k in ("name", "value", "unit")) + " |"
                for f in figures
            ]
            parts.append("")
    if plot.exists():
        OUT.mkdir(exist_ok=True)
        shutil.copyfile(plot, OUT / plot.name)
        parts += [f"```{{image}} /_generated/{plot.name}", f":alt: {name}", "```", ""]
    if text_path.exists():
        parts += [f"`benchmarks/results/{name}.txt`:", "", "```text", text_path.read_text(), "```"]
    return "\n".join(parts) + "\n"


# Measured during design on one H200 (per-process bf16 GEMM TFLOP/s; interactive
# p50/p99/max ms beside N-1 busy processes), shown until a release measurement exists
# and beside it afterwards.
DESIGN_THROUGHPUT = {1: 668.0, 2: 310.5, 4: 155.2, 8: 77.5}
DESIGN_LATENCY = {1: (0.23, 0.35, 0.39), 2: (1.58, 2.43, 2.47), 4: (3.87, 7.14, 7.70)}
DESIGN_LATENCY[8] = (6.19, 17.6, 18.0)


def _timeslicing_measurement() -> dict | None:
    """Per-process throughput and interactive latency per N from the release
    measurement, or None if there is none (or it cannot be read)."""
    path = RESULTS / "gpu_timeslicing.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        throughput = {
            int(n): sum(p["per_process_tflops"]) / len(p["per_process_tflops"])
            for n, p in data["throughput"].items()
        }
        latency = {
            int(n): tuple(p["interactive"][k] for k in ("p50_ms", "p99_ms", "max_ms"))
            for n, p in data["latency"].items()
        }
    except (ValueError, KeyError, TypeError, ZeroDivisionError) as e:
        log.warning("cannot read %s: %s", path, e)
        return None
    return {"throughput": throughput, "latency": latency, "date": data.get("date", "")}


def performance_tables() -> tuple[str, str]:
    measured = _timeslicing_measurement()
    ns = sorted(set(DESIGN_THROUGHPUT) | set((measured or {}).get("throughput", {})))
    head = "| users computing on one GPU | expected share each |"
    rule = "|---|---|"
    if measured:
        head += " measured per user, this release | of one user alone |"
        rule += "---|---|"
    head += " measured per user during design | of one user alone |"
    rule += "---|---|"
    rows = [head, rule]
    for n in ns:
        row = f"| {n} | {100 / n:g} % |"
        if measured:
            alone = measured["throughput"].get(1)
            value = measured["throughput"].get(n)
            if value is None or not alone:
                row += " | |"
            else:
                row += f" {value:.1f} TFLOP/s | {100 * value / alone:.1f} % |"
        design = DESIGN_THROUGHPUT.get(n)
        if design is None:
            row += " | |"
        else:
            row += f" {design:g} TFLOP/s | {100 * design / DESIGN_THROUGHPUT[1]:.1f} % |"
        rows.append(row)
    throughput = "\n".join(rows) + "\n"

    def times(values) -> str:
        return " / ".join(f"{v:.2f}" for v in values) + " ms"

    head = "| busy neighbours |"
    rule = "|---|"
    if measured:
        head += " p50 / p99 / max, this release |"
        rule += "---|"
    head += " p50 / p99 / max, during design |"
    rule += "---|"
    rows = [head, rule]
    for n in sorted(set(DESIGN_LATENCY) | set((measured or {}).get("latency", {}))):
        row = f"| {n - 1} |"
        if measured:
            value = measured["latency"].get(n)
            row += f" {times(value)} |" if value else " |"
        design = DESIGN_LATENCY.get(n)
        row += f" {times(design)} |" if design else " |"
        rows.append(row)
    return throughput, "\n".join(rows) + "\n"


def screenshots_page() -> str:
    images = (
        sorted(p for p in SCREENSHOTS.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if SCREENSHOTS.is_dir()
        else []
    )
    if not images:
        return "```{note}\nNo screenshots yet.\n```\n"
    parts = []
    for image in images:
        caption_file = image.with_suffix(".txt")
        caption = (
            caption_file.read_text().strip()
            if caption_file.exists()
            else image.stem.replace("-", " ").replace("_", " ").capitalize()
        )
        parts += [
            f"```{{figure}} /_static/screenshots/{image.name}",
            f":alt: {caption}",
            "",
            caption,
            "```",
            "",
        ]
    return "\n".join(parts)


def class_day_page() -> str:
    """The class-day benchmark's trace model (its docstring) and its latest figures."""
    source = ROOT / "benchmarks" / "class_day.py"
    model = ""
    if source.exists():
        docstring = ast.get_docstring(ast.parse(source.read_text())) or ""
        model = "\n\n".join(docstring.split("\n\n")[1:])
    results = RESULTS / "class_day.txt"
    if not results.exists():
        figures = (
            "```{note}\nNo run in `benchmarks/results/class_day.*` yet: run "
            "`python -m benchmarks class-day` and build the docs again.\n```\n"
        )
    else:
        data = {}
        with contextlib.suppress(ValueError, OSError):
            data = json.loads((RESULTS / "class_day.json").read_text())
        lead = f"Latest run: {data.get('date', '?')}, `{data.get('command', '')}`"
        figures = f"{lead}\n\n```text\n{results.read_text()}```\n"
    return f"{model}\n\n{figures}"


def generate(app) -> None:
    write("options.md", options_page())
    write("commands.md", commands_page())
    metrics = code_metrics()
    write("metrics.md", metrics_page(metrics))
    check_metric_mentions(metrics)
    check_grafana_json()
    write(
        "results-gpu_timeslicing.md",
        results_page("gpu_timeslicing", "python3 benchmarks/gpu_timeslicing.py"),
    )
    write(
        "results-gpu_memory_caps.md",
        results_page("gpu_memory_caps", "python3 benchmarks/gpu_memory_caps.py"),
    )
    write("results-class_day.md", class_day_page())
    write("screenshots.md", screenshots_page())
    throughput, latency = performance_tables()
    write("performance-throughput.md", throughput)
    write("performance-latency.md", latency)


def setup(app):
    app.connect("builder-inited", generate)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
