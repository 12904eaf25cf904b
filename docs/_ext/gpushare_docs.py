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
  expected shares next to the measured ones; ``bench-<name>.md``: the cluster
  benchmarks' main tables, as ``benchmarks/README.md`` shows them;
  ``memory-*.md`` and ``sharing-comparison.md``: the
  memory guard's and MPS's measurements as tables (escape routes, allocator
  options, what users see, time-slicing against MPS);
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
            f"No measurement in `benchmarks/results/{name}.*` yet. On a machine with an "
            "NVIDIA GPU, run\n"
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
    """Throughput per user and short-step latency from the release measurement."""
    measured = _timeslicing_measurement()
    if not measured:
        note = _not_measured("gpu_timeslicing", "python3 benchmarks/gpu_timeslicing.py")
        return note, note
    alone = measured["throughput"].get(1)
    rows = [
        "| users computing on one GPU | expected share each | measured per user "
        "| of one user alone |",
        "|---|---|---|---|",
    ]
    for n in sorted(measured["throughput"]):
        value = measured["throughput"][n]
        of_alone = f"{100 * value / alone:.1f} %" if alone else ""
        rows.append(f"| {n} | {100 / n:g} % | {value:.1f} TFLOP/s | {of_alone} |")
    throughput = "\n".join(rows) + "\n"
    rows = ["| busy neighbours | p50 / p99 / max |", "|---|---|"]
    for n in sorted(measured["latency"]):
        values = measured["latency"][n]
        rows.append(f"| {n - 1} | " + " / ".join(f"{v:.2f}" for v in values) + " ms |")
    return throughput, "\n".join(rows) + "\n"


def cluster_benchmark(name: str) -> str:
    """A cluster benchmark's main table, as benchmarks/README.md shows it."""
    import sys

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import readme

    return readme.render(f"{{{{results:{name}}}}}\n", RESULTS).split("-->\n\n", 1)[1]


# -- the memory share: tables from the memory guard's and MPS's measurements --------
GiB = 1 << 30


def _results(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        log.warning("cannot read %s: %s", path, e)
        return None


def _not_measured(name: str, command: str) -> str:
    return (
        f"```{{note}}\nNo measurement in `benchmarks/results/{name}.json` yet. On a machine "
        f"with an NVIDIA GPU, run `{command}` and build the docs again.\n```\n"
    )


def _where(data: dict) -> str:
    device = data.get("device") or {}
    name = device.get("nvidia_smi", "") if isinstance(device, dict) else str(device)
    versions = ", ".join(
        f"{module} {device[module]}"
        for module in ("torch", "jax", "cupy")
        if isinstance(device, dict) and device.get(module)
    )
    return f"{data.get('date', '')} on {name}" + (f" ({versions})" if versions else "")


def _route_result(route: dict | None) -> str:
    if route is None:
        return "not measured"
    if "skipped" in route:
        return f"not measured ({route['skipped']})"
    if route.get("prepared") is False:
        return f"did not start ({route.get('error')})"
    if route.get("allocated"):
        return "**gets more**"
    if "allocated" in route:
        return f"refused ({route.get('error')})"
    return f"no answer (exit {route.get('exit_code')})"


# The benchmark's route names as the docs write them; a route missing here is
# shown under its own name.
ROUTE_LABELS = {
    "pytorch: nothing (the share)": "PyTorch, nothing special",
    "pytorch: unset GPUSHARE_MEMORY_FRACTION before import torch": (
        "PyTorch: `del os.environ['GPUSHARE_MEMORY_FRACTION']` before `import torch`"
    ),
    "pytorch: python -E": "PyTorch in `python -E` (ignores `PYTHONPATH`)",
    "pytorch: python -I": "PyTorch in `python -I` (isolated mode)",
    "pytorch: python -I, jupyterhub-gpushare installed in the image": (
        "PyTorch in `python -I`, jupyterhub-gpushare installed in the image"
    ),
    "pytorch: remove the guard's import hook": (
        "PyTorch: removes the guard's finder from `sys.meta_path` before `import torch`"
    ),
    "pytorch: set_per_process_memory_fraction(1.0)": (
        "PyTorch: `torch.cuda.set_per_process_memory_fraction(1.0)`"
    ),
    "pytorch: PYTORCH_ALLOC_CONF=per_process_memory_fraction:1.0 of its own": (
        "PyTorch: `PYTORCH_CUDA_ALLOC_CONF=per_process_memory_fraction:1.0` before `import torch`"
    ),
    "pytorch: adds backend:cudaMallocAsync": (
        "PyTorch: adds `backend:cudaMallocAsync` to `PYTORCH_CUDA_ALLOC_CONF`"
    ),
    "pytorch: adds backend:cudaMallocAsync, pytorch_allocator_fraction on": (
        "PyTorch: adds `backend:cudaMallocAsync`, with `pytorch_allocator_fraction = True`"
    ),
    "pytorch: backend:cudaMallocAsync + allocator key, no guard (spawner refuses)": (
        "PyTorch: `backend:cudaMallocAsync` and the allocator's fraction key, no guard "
        "(a configuration the spawner refuses)"
    ),
    "cupy: nothing (the share)": "CuPy, nothing special",
    "cupy: pool.set_limit(size=0)": "CuPy: `cupy.get_default_memory_pool().set_limit(size=0)`",
    "cupy: raw cudaMalloc, no pool (raw CUDA, Numba, RAPIDS)": (
        "`cudaMalloc` outside any pool (raw CUDA, Numba, RAPIDS)"
    ),
    "jax: nothing (the share)": "JAX, nothing special",
    "jax: XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 before first use": (
        "JAX: `XLA_PYTHON_CLIENT_MEM_FRACTION=0.9` before its first GPU use"
    ),
    "jax: XLA_PYTHON_CLIENT_ALLOCATOR=platform": "JAX: `XLA_PYTHON_CLIENT_ALLOCATOR=platform`",
    "mps: client sets CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=140G, fraction 1.0": (
        "MPS client sets `CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=140G` (and PyTorch's fraction 1.0)"
    ),
    "mps: client drops CUDA_MPS_PIPE_DIRECTORY (leaves MPS), fraction 1.0": (
        "MPS client drops `CUDA_MPS_PIPE_DIRECTORY` and so leaves MPS (and fraction 1.0)"
    ),
}


def _route_label(name: str) -> str:
    return ROUTE_LABELS.get(name, name)


def memory_routes_table() -> str:
    guard, mps = _results("gpu_memory_guard"), _results("gpu_mps")
    if not guard or not guard.get("routes"):
        return _not_measured("gpu_memory_guard", "python3 benchmarks/gpu_memory_guard.py")
    mps_routes = {r["route"]: r for r in (mps or {}).get("routes", [])}
    measured_mps = bool(mps and mps.get("mps_started") and mps_routes)
    head = "| what the user's code does | time-slicing (the memory guard) |"
    rule = "|---|---|"
    if measured_mps:
        head += " MPS (the device plugin's limits) |"
        rule += "---|"
    rows = [head, rule]
    names = [r["route"] for r in guard["routes"]]
    names += [name for name in mps_routes if name not in names]
    ts_routes = {r["route"]: r for r in guard["routes"]}
    for name in names:
        row = f"| {cell(_route_label(name))} | {_route_result(ts_routes.get(name))} |"
        if measured_mps:
            row += f" {_route_result(mps_routes.get(name))} |"
        rows.append(row)
    intro = (
        f"Each route is one process (n = 1 per row) with the environment the spawner builds "
        f"for one slice of a GPU shared {guard.get('replicas')} ways (a share of "
        f"{guard['share_bytes'] / GiB:.1f} GiB), asking for {guard['target_bytes'] / GiB:.1f} "
        "GiB in one allocation: more than its share, and more than MPS allows one client. "
        f"Time-slicing measured {_where(guard)}"
    )
    if measured_mps:
        intro += f"; MPS measured {_where(mps)}, limits set as the device plugin sets them"
    return intro + ".\n\n" + "\n".join(rows) + "\n"


def memory_allocator_table() -> str:
    guard = _results("gpu_memory_guard")
    results = [r for r in (guard or {}).get("allocator", []) if r.get("runs")]
    if not results:
        return _not_measured("gpu_memory_guard", "python3 benchmarks/gpu_memory_guard.py")
    rows = [
        "| `PYTORCH_CUDA_ALLOC_CONF` | in use at the first refusal, median (lowest) |"
        " largest reserved | allocations above the share refused afterwards |",
        "|---|---|---|---|",
    ]
    for r in results:
        runs, share = r["runs"], r["share_bytes"]
        used = sorted(x["allocated_at_refusal"] / share for x in runs)
        reserved = max(x["max_reserved"] for x in runs) / share
        held = sum(bool(x["over_share_refused"]) for x in runs)
        conf = f"`{r['conf']}`" if r["conf"] else "none (PyTorch's defaults)"
        rows.append(
            f"| {conf} | {100 * used[len(used) // 2]:.1f} % ({100 * used[0]:.1f} %) of the share |"
            f" {100 * reserved:.1f} % of the share | {held} of {len(runs)} |"
        )
    return (
        f"Each option ran the same {len(results[0]['runs'])} random sequences (seeds; n = "
        f"{len(results[0]['runs'])} per row) of allocations between 13 MiB and 3 GiB with "
        "random frees, until the first out-of-memory error, in one process with the spawner's "
        f"environment; measured {_where(guard)}.\n\n" + "\n".join(rows) + "\n"
    )


def memory_notice_page() -> str:
    guard = _results("gpu_memory_guard")
    notices = (guard or {}).get("notice") or []
    if not notices:
        return _not_measured("gpu_memory_guard", "python3 benchmarks/gpu_memory_guard.py")
    on = [r for r in notices if r["notices_on"]]
    off = [r for r in notices if not r["notices_on"]]
    frameworks = ", ".join(sorted({r["framework"] for r in on}))
    lines = [
        f"Measured {_where(guard)}: {len(on)} processes at once ({frameworks}), each with the "
        "spawner's environment, used the GPU, then asked for more than its share without "
        f"catching the error. {sum(len(r['notice_lines']) == 1 for r in on)} of {len(on)} "
        f"showed the notice exactly once, {sum(len(r['hint_lines']) == 1 for r in on)} of "
        f"{len(on)} the hint exactly once, under the traceback"
    ]
    if off:
        shown = sum(len(r["notice_lines"]) + len(r["hint_lines"]) for r in off)
        lines[0] += f"; with `memory_notice = False`, {shown} lines"
    lines[0] += ". What they printed:"
    lines += ["", "```text"]
    example = next((r for r in on if r["notice_lines"]), None)
    if example:
        lines.append(example["notice_lines"][0])
    seen = set()
    for r in on:
        if r["hint_lines"] and r["framework"] not in seen:
            seen.add(r["framework"])
            lines.append(r["hint_lines"][0])
    lines += ["```", ""]
    return "\n".join(lines)


def memory_example() -> str:
    from jupyterhub_gpushare import objects

    memory = 81559  # an H100 80GB, as GPU feature discovery labels it
    fraction = objects.memory_fraction(1, 4, memory, objects.DEFAULT_HEADROOM_MIB)
    return (
        f"One slice of an 80 GB H100 ({memory} MiB) shared 4 ways gets "
        f"0.25 - {objects.DEFAULT_HEADROOM_MIB}/{memory} = {fraction:g}, about "
        f"{fraction * memory / 1024:.1f} GiB.\n"
    )


def memory_spawn_message() -> str:
    from jupyterhub_gpushare import messages, objects

    lines = []
    memory = 81559
    fraction = objects.memory_fraction(1, 4, memory, objects.DEFAULT_HEADROOM_MIB)
    for sharing, where in ((objects.TIME_SLICING, "time-slicing"), (objects.MPS, "MPS")):
        share = objects.GPUShare("nvidia.com/gpu", 1, 4, fraction, memory, sharing=sharing)
        lines.append(f"- on {where} nodes: *{messages.share_message(share)}*")
    return "\n".join(lines) + "\n"


def _ms(lat: dict) -> str:
    keys = [k for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms") if k in lat]
    names = " / ".join(k.split("_")[0] for k in keys)
    values = " / ".join(f"{lat[k]:.2f}" for k in keys)
    return f"{names}: {values} ms (n = {lat['calls']})"


def sharing_comparison() -> str:
    """Time-slicing against MPS, side by side, from both measurements."""
    ts, mps = _results("gpu_timeslicing"), _results("gpu_mps")
    if not (mps and mps.get("mps_started") and mps.get("throughput")):
        return _not_measured("gpu_mps", "python3 benchmarks/gpu_mps.py")
    n = mps.get("replicas", 4)
    mps_tp, mps_lat = mps["throughput"], mps.get("latency") or {}

    def mean(values):
        return sum(values) / len(values)

    def tflops(phase, together=False):
        if not phase or "per_process_tflops" not in phase:
            return "not measured"
        if together:
            return f"{phase['aggregate_tflops']:.0f} TFLOP/s"
        return f"{mean(phase['per_process_tflops']):.0f} TFLOP/s"

    ts_tp = (ts or {}).get("throughput") or {}
    ts_lat = (ts or {}).get("latency") or {}
    rows = [
        f"| | time-slicing, {n} slices | MPS, {n} clients (the device plugin's limits) |",
        "|---|---|---|",
        f"| one user computing alone | {tflops(ts_tp.get('1'))} |"
        f" {tflops(mps_tp.get('1 alone'))} |",
        f"| {n} users computing, each | {tflops(ts_tp.get(str(n)))} |"
        f" {tflops(mps_tp.get(f'{n} together'))} |",
        f"| {n} users computing, together | {tflops(ts_tp.get(str(n)), True)} |"
        f" {tflops(mps_tp.get(f'{n} together'), True)} |",
    ]

    def latency(phase):
        lat = (phase or {}).get("interactive")
        return _ms(lat) if lat else "not measured"

    rows.append(
        f"| a short GPU step (1024³ GEMM + sync) beside {n - 1} busy users |"
        f" {latency(ts_lat.get(str(n)))} | {latency(mps_lat.get(f'beside {n - 1} busy'))} |"
    )
    rows.append(
        f"| the same step alone | {latency(ts_lat.get('1'))} | {latency(mps_lat.get('alone'))} |"
    )
    raised = mps_tp.get("1 alone, CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=100")
    if raised and "per_process_tflops" in raised:
        rows.append(
            "| one user alone who sets `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=100` | — |"
            f" {tflops(raised)} |"
        )
    guard = _results("gpu_memory_guard")
    if guard and guard.get("routes") and mps.get("routes"):

        def closed(routes):
            measured = [r for r in routes if "allocated" in r]
            return f"{sum(not r['allocated'] for r in measured)} of {len(measured)} routes refused"

        rows.append(
            f"| memory above the share | cooperative: {closed(guard['routes'])} |"
            f" hard: {closed(mps['routes'])} |"
        )
    limits = mps.get("limits") or {}
    memory, threads = limits.get("pinned_mem_limit"), limits.get("active_thread_percentage")
    return (
        f"bf16 8192³ GEMM loops in separate processes; time-slicing measured "
        f"{_where(ts) if ts else '(not measured)'}, MPS measured {_where(mps)} with a pinned "
        f"memory limit of {memory} and {threads} % of the threads per client.\n\n"
        + "\n".join(rows)
        + "\n"
    )


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
    write(
        "results-gpu_memory_guard.md",
        results_page("gpu_memory_guard", "python3 benchmarks/gpu_memory_guard.py"),
    )
    write("results-gpu_mps.md", results_page("gpu_mps", "python3 benchmarks/gpu_mps.py"))
    write("memory-routes.md", memory_routes_table())
    write("memory-allocator.md", memory_allocator_table())
    write("memory-notice.md", memory_notice_page())
    write("memory-example.md", memory_example())
    write("memory-spawn-message.md", memory_spawn_message())
    write("sharing-comparison.md", sharing_comparison())
    write("results-class_day.md", class_day_page())
    write("screenshots.md", screenshots_page())
    throughput, latency = performance_tables()
    write("performance-throughput.md", throughput)
    for name in ("handover", "queue_updates", "churn", "fairness", "scale", "spawn_cost"):
        write(f"bench-{name}.md", cluster_benchmark(name))
    write("performance-latency.md", latency)


def setup(app):
    app.connect("builder-inited", generate)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
