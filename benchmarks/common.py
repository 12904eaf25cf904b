"""What every benchmark shares: the local cluster and hubs, process and API-server
counters, percentiles, and the report (a printed table, a JSON file of figures
and a .txt copy of the table under benchmarks/results/).

Benchmarks measure and report; nothing here asserts on a number. Each figure of
ours is set beside plain KubeSpawner's from the same run, because absolute
times on shared machines drift from run to run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from kubernetes_asyncio import client, config, watch

from jupyterhub_gpushare.testing.cluster import LocalCluster, build_binaries
from jupyterhub_gpushare.testing.hub import LocalHub

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
OURS = "GPUShareSpawner"
PLAIN = "KubeSpawner"
KEEP_LOGS = bool(os.environ.get("GPUSHARE_KEEP_CLUSTER_LOGS"))
USER_ANNOTATION = "hub.jupyter.org/username"


# -- statistics -------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation; None for no values."""
    data = sorted(values)
    if not data:
        return None
    rank = (len(data) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return data[low] + (data[high] - data[low]) * (rank - low)


def ratio(ours: float | None, plain: float | None) -> float | None:
    """ours / plain, or None where it means nothing (a zero, missing or non-numeric side)."""
    numbers = (int, float)
    if not isinstance(ours, numbers) or not isinstance(plain, numbers) or plain == 0:
        return None
    return ours / plain


def fmt(value: object, digits: int = 3) -> str:
    """A table cell: 3 significant digits, whole numbers from 100 up, '-' for none."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def fmt_ratio(value: float | None) -> str:
    """Two decimals, or two significant digits for small ratios (0.0035, not 0.00)."""
    if value is None:
        return "-"
    return f"{value:.2f}" if value >= 0.1 or value == 0 else f"{value:.2g}"


# -- the report -------------------------------------------------------------------


@dataclass
class Figure:
    name: str
    value: float | int | str | None
    unit: str
    note: str = ""


@dataclass
class Report:
    """Figures, tables and notes of one benchmark run, printed and written out."""

    name: str
    title: str
    parameters: dict
    # what ours is compared with: its column header and its suffix in figure names
    other: str = PLAIN
    other_key: str = "kubespawner"
    ours: str = OURS  # our column's header
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    _comparison: list[list[str]] = field(default_factory=list)
    _tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def figure(self, name: str, value, unit: str, note: str = "") -> None:
        self.figures.append(Figure(name, value, unit, note))

    def compare(self, name: str, label: str, ours, plain, unit: str, note: str = "") -> None:
        """One row of the main table: ours, the other's (plain KubeSpawner's) and their ratio."""
        self.figure(f"{name}.gpushare", ours, unit, note)
        self.figure(f"{name}.{self.other_key}", plain, unit, note)
        r = ratio(ours, plain)
        if r is not None:
            self.figure(f"{name}.ratio", r, f"gpushare/{self.other_key}")
        self._comparison.append([label, unit, fmt(ours), fmt(plain), fmt_ratio(r)])

    def single(self, name: str, label: str, value, unit: str, note: str = "") -> None:
        """A row of ours alone (the other has no such thing)."""
        self.figure(name, value, unit, note)
        self._comparison.append([label, unit, fmt(value), "-", "-"])

    def table(self, title: str, headers: list[str], rows: list[list[object]]) -> None:
        self._tables.append((title, headers, [[fmt(c) for c in row] for row in rows]))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def render(self) -> str:
        lines = [self.title, "=" * len(self.title)]
        params = ", ".join(f"{k}={v}" for k, v in self.parameters.items())
        lines.append(f"parameters: {params}")
        lines.append(f"machine: {machine_line()}")
        lines.append("")
        if self._comparison:
            lines += _format_table(
                ["figure", "unit", self.ours, self.other, "ratio"],
                self._comparison,
                first_left=True,
            )
            lines.append(f"ratio = {self.ours} / {self.other}, both measured in this run")
            lines.append("")
        for title, headers, rows in self._tables:
            lines.append(title)
            lines += _format_table(headers, rows, first_left=True)
            lines.append("")
        for text in self.notes:
            lines.append(f"note: {text}")
        return "\n".join(lines).rstrip() + "\n"

    def write(self, out_dir: Path, command: str) -> str:
        text = self.render()
        print(text, flush=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        data = {
            "benchmark": self.name,
            "title": self.title,
            "command": command,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started)),
            "duration_seconds": round(time.time() - self.started, 1),
            "machine": machine(),
            "parameters": self.parameters,
            "figures": [asdict(f) for f in self.figures],
            # the printed tables, so that README and docs are made from this file alone
            "tables": [
                {
                    "title": "",
                    "headers": ["figure", "unit", self.ours, self.other, "ratio"],
                    "rows": self._comparison,
                },
                *({"title": t, "headers": h, "rows": r} for t, h, r in self._tables),
            ],
            "notes": self.notes,
            "details": self.details,
        }
        (out_dir / f"{self.name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
        (out_dir / f"{self.name}.txt").write_text(text)
        return text


def _format_table(headers: list[str], rows: list[list[str]], first_left: bool) -> list[str]:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        parts = []
        for i, (cell, width) in enumerate(zip(cells, widths, strict=True)):
            parts.append(
                str(cell).ljust(width) if i == 0 and first_left else str(cell).rjust(width)
            )
        return "  ".join(parts).rstrip()

    return [line(headers), "-" * len(line(headers)), *(line(r) for r in rows)]


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def machine_line() -> str:
    m = machine()
    load = "/".join(str(v) for v in m["load_average"])
    return f"{m['cpus']} CPUs, load {load} (1/5/15 min) at the end, Python {m['python']}"


# -- processes ----------------------------------------------------------------------


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds the process has used (0 when it is gone)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # fields after the command name: state is [0], utime [11], stime [12]
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_bytes(pid: int | None, key: str = "VmRSS") -> int:
    """A line of /proc/<pid>/status in bytes: VmRSS now, VmHWM the peak."""
    if pid is None:
        return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def child_pid(parent: int, needle: str) -> int | None:
    """A child of ``parent`` whose command line contains ``needle``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = re.search(r"^PPid:\s+(\d+)", status, re.M)
        if ppid and int(ppid.group(1)) == parent and needle in cmdline:
            return int(entry.name)
    return None


# -- the API server's own request counter --------------------------------------------

METRIC_LINE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="([^"]*)"')
# The API server's own upkeep (its identity lease every 10 s, health and OpenAPI
# reads by the scheduler): counted apart, as no client of ours makes them.
BACKGROUND = ("PUT leases", "GET leases", "GET /readyz", "GET /livez", "GET /healthz")


def api_requests(cluster: LocalCluster) -> Counter:
    """apiserver_request_total from the API server's /metrics, keyed 'VERB resource'."""
    status, body = cluster.api_get("/metrics", timeout=30)
    if status != 200:
        raise RuntimeError(f"cannot read the API server's /metrics: HTTP {status}")
    counts: Counter = Counter()
    for line in body.decode().splitlines():
        match = METRIC_LINE.match(line)
        if not match:
            continue
        labels = dict(LABEL.findall(match.group("labels")))
        verb = labels.get("verb", "?")
        what = labels.get("resource") or labels.get("subresource") or "?"
        if labels.get("resource") and labels.get("subresource"):
            what += "/" + labels["subresource"]
        if verb in ("LIST", "WATCH"):
            # a namespaced list (KubeSpawner's reflectors) is not a cluster-wide one (ours)
            what += f" [{labels.get('scope', '?')}]"
        counts[f"{verb} {what}"] += int(float(match.group("value")))
    return counts


def is_background(key: str) -> bool:
    return key.startswith(BACKGROUND) or key.endswith("openapi/v3") or key.endswith("openapi/v2")


def request_delta(before: Counter, after: Counter) -> Counter:
    """Requests made between two snapshots, without the API server's own upkeep."""
    delta = Counter({k: after[k] - before.get(k, 0) for k in after})
    return Counter({k: v for k, v in delta.items() if v > 0 and not is_background(k)})


# -- the local cluster ----------------------------------------------------------------


@contextlib.contextmanager
def local_cluster(label: str) -> Iterator[LocalCluster]:
    """A fresh LocalCluster of our own (not pytest's), removed afterwards."""
    bin_dir, _ = build_binaries()
    # each LocalCluster picks a loopback /16 of its own for its pods, so this
    # cluster and a test run's can live side by side
    run_dir = Path(tempfile.mkdtemp(prefix=f"gpushare-bench-{label}-"))
    cluster = LocalCluster(run_dir=run_dir, bin_dir=bin_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        if KEEP_LOGS:
            cluster.stop()
            print(f"cluster logs kept in {run_dir}", file=sys.stderr)
        else:
            cluster.remove()


@contextlib.asynccontextmanager
async def core_api(cluster: LocalCluster) -> AsyncIterator[client.CoreV1Api]:
    configuration = client.Configuration()
    await config.load_kube_config(
        config_file=str(cluster.kubeconfig), client_configuration=configuration
    )
    api = client.ApiClient(configuration)
    try:
        yield client.CoreV1Api(api)
    finally:
        await api.close()


# -- hubs ---------------------------------------------------------------------------

# Both kinds of hub, on z2jh's hub settings (LocalHub's), with stand-in user
# servers (a tiny HTTP server, so hundreds fit on two cores) and INFO logs
# (DEBUG costs the hub CPU we want to measure).
COMMON_CONFIG = f"""
c.JupyterHub.log_level = "INFO"
c.KubeSpawner.cmd = [{sys.executable!r}, "-m", "jupyterhub_gpushare.testing.standin_server"]
c.KubeSpawner.args = []
"""

# A hub as it would be without gpushare: KubeSpawner asking for one GPU, and
# neither our service nor its role (configure(c) in LocalHub's config adds
# them), with JupyterHub's own spawn limit back where configure(c) took it from.
PLAIN_CONFIG = """
c.JupyterHub.concurrent_spawn_limit = c.GPUShareSpawner.concurrent_start_limit
c.JupyterHub.spawner_class = "kubespawner.KubeSpawner"
c.KubeSpawner.extra_resource_limits = {"nvidia.com/gpu": "1"}
c.JupyterHub.services = [s for s in c.JupyterHub.services if s["name"] != "gpushare"]
c.JupyterHub.load_roles = [r for r in c.JupyterHub.load_roles if r["name"] != "gpushare-service"]
c.JupyterHub.extra_user_scopes = set()
"""


def hub_config(plain: bool, extra: str = "") -> str:
    return COMMON_CONFIG + (PLAIN_CONFIG if plain else "") + extra


@contextlib.asynccontextmanager
async def running_hub(
    cluster: LocalCluster, namespace: str, plain: bool, extra: str = "", before_configure: str = ""
) -> AsyncIterator[LocalHub]:
    """A real JupyterHub (+ CHP, + our service unless plain), stopped afterwards.

    ``before_configure`` runs before ``configure(c)``: where settings of the
    service (``c.Reclaimer.*``) go, so that ``configure(c)`` forwards them."""
    run_dir = Path(tempfile.mkdtemp(prefix="gpushare-bench-hub-"))
    hub = LocalHub(
        run_dir,
        cluster.kubeconfig,
        namespace,
        hub_config(plain, extra),
        before_configure=before_configure,
    )
    try:
        # LocalHub.start blocks while it polls; keep our event loop free
        await asyncio.to_thread(hub.start)
        yield hub
    finally:
        await asyncio.to_thread(hub.stop)
        if KEEP_LOGS:
            print(f"hub logs kept in {run_dir}", file=sys.stderr)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)


def hub_pid(hub: LocalHub) -> int | None:
    return hub.component.process.pid if hub.component and hub.component.process else None


def service_pid(hub: LocalHub) -> int | None:
    """Our managed service, a child process of the hub."""
    pid = hub_pid(hub)
    return child_pid(pid, "jupyterhub_gpushare.service") if pid else None


class HubAPI:
    """The hub's REST API with the admin-scoped token of LocalHub."""

    def __init__(self, hub: LocalHub, timeout: float = 60):
        self.hub = hub
        self.http = httpx.AsyncClient(
            base_url=hub.api_url,
            headers={"Authorization": f"token {hub.api_token}"},
            timeout=timeout,
            limits=httpx.Limits(max_connections=50),
        )

    async def close(self) -> None:
        await self.http.aclose()

    async def create_users(self, names: Sequence[str]) -> None:
        for start in range(0, len(names), 100):
            response = await self.http.post(
                "/users", json={"usernames": list(names[start : start + 100])}
            )
            if response.status_code not in (201, 409):
                response.raise_for_status()

    async def start(self, name: str) -> int:
        return (await self.http.post(f"/users/{name}/server", json={})).status_code

    async def stop(self, name: str) -> int:
        return (await self.http.delete(f"/users/{name}/server")).status_code

    async def servers(self) -> dict[str, dict]:
        """Each user's default server as the hub sees it (only users that have one)."""
        response = await self.http.get("/users", params={"limit": 1000})
        response.raise_for_status()
        return {u["name"]: u["servers"][""] for u in response.json() if "" in u["servers"]}

    async def ready(self) -> set[str]:
        response = await self.http.get("/users", params={"state": "ready", "limit": 1000})
        response.raise_for_status()
        return {u["name"] for u in response.json()}

    async def admin_token(self, name: str = "admin") -> str:
        """A token of an admin user (LocalHub's admin_users), for the service's admin view."""
        await self.create_users([name])
        response = await self.http.post(f"/users/{name}/tokens", json={"note": "benchmark"})
        response.raise_for_status()
        return response.json()["token"]

    async def stop_all(self, names: Iterable[str], timeout: float = 180) -> None:
        """Stop every server of ``names`` and wait until the hub has none left."""
        names = list(names)
        for start in range(0, len(names), 20):
            await asyncio.gather(*(self.stop(n) for n in names[start : start + 20]))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not set(await self.servers()) & set(names):
                return
            await asyncio.sleep(1)
        print("warning: some servers did not stop in time", file=sys.stderr)


class PodClock:
    """When each user's pod was first seen created, unschedulable, bound, Ready and gone.

    Times are time.monotonic() on receipt of the watch event. One clock per
    namespace, keyed by user name (each user's default server).
    """

    def __init__(self, core: client.CoreV1Api, namespace: str):
        self.core, self.namespace = core, namespace
        self.created: dict[str, float] = {}
        self.unschedulable: dict[str, float] = {}
        self.bound: dict[str, float] = {}
        self.ready: dict[str, float] = {}
        self.gone: dict[str, float] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def forget(self, user: str) -> None:
        """The user asks again: the next pod's times are its own."""
        for times in (self.created, self.unschedulable, self.bound, self.ready, self.gone):
            times.pop(user, None)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        version = None
        while True:
            try:
                stream = watch.Watch().stream(
                    self.core.list_namespaced_pod,
                    self.namespace,
                    resource_version=version,
                    timeout_seconds=240,
                )
                async with stream:
                    async for event in stream:
                        pod = event["raw_object"]
                        version = pod.get("metadata", {}).get("resourceVersion", version)
                        self._record(event["type"], pod, time.monotonic())
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a lost watch: resume from the last version seen
                log(f"pod watch: {e!r}; resuming")
                await asyncio.sleep(0.5)

    def _record(self, kind: str, pod: dict, now: float) -> None:
        user = (pod["metadata"].get("annotations") or {}).get(USER_ANNOTATION)
        if not user:
            return
        if kind == "DELETED":
            self.gone.setdefault(user, now)
            return
        self.created.setdefault(user, now)
        if pod["spec"].get("nodeName"):
            self.bound.setdefault(user, now)
        for condition in (pod.get("status") or {}).get("conditions") or []:
            if condition["type"] == "PodScheduled" and condition["status"] == "False":
                self.unschedulable.setdefault(user, now)
            if condition["type"] == "Ready" and condition["status"] == "True":
                self.ready.setdefault(user, now)


async def create_namespace(core: client.CoreV1Api, name: str) -> str:
    await core.create_namespace({"metadata": {"name": name}})
    return name


def log(message: str) -> None:
    """Progress on stderr, so the tables on stdout stay clean."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
