"""Benchmark 2, capacity at scale: 1,000 GPU nodes x 8 slices and 8,000 GPU pods.

The nodes and pods are objects only: the nodes' names start with
``objects-only-``, so the simulated kubelet runs nothing and every pod stays
bound and Pending, holding its slice. Our service (``python -m
jupyterhub_gpushare.service``, on its own, asked with the hub's secret as the
spawners ask it) is compared with the naive way, benchmarks/naive_capacity.py,
which lists every node and pod for each answer and does the same arithmetic.

Measured for both, under a steady (open-loop) rate of ``GET api/capacity``:

- answer latency p50/p99, and the answers per second achieved;
- API-server requests per answer, from the API server's own
  ``apiserver_request_total`` (the goal for ours is zero: answers come from
  the watch caches);
- CPU seconds per answer of the answering process and of the API server;
- resident memory of the answering process;
- time from a (re)start of the process to its first consistent answer.

The naive way cannot keep up with the rate our service is measured at, so it
is measured twice: at its own lower rate, and beside ours at that same rate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from kubernetes_asyncio import client

from jupyterhub_gpushare.service.handlers import HUB_SECRET_HEADER
from jupyterhub_gpushare.testing.cluster import Component, LocalCluster, free_port
from jupyterhub_gpushare.testing.kubelet import OBJECTS_ONLY_PREFIX
from jupyterhub_gpushare.testing.nodes import create_gpu_node

from .common import (
    OURS,
    REPO_ROOT,
    Report,
    api_requests,
    core_api,
    cpu_seconds,
    create_namespace,
    local_cluster,
    log,
    memory_bytes,
    percentile,
    request_delta,
)

NAME = "scale"
NAIVE = "same arithmetic, listing per answer (no caches)"
CAPACITY_PATH = "/services/gpushare/api/capacity"
RESOURCE = "nvidia.com/gpu"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=1000, help="simulated GPU nodes")
    parser.add_argument("--slices", type=int, default=8, help="slices per node")
    parser.add_argument("--pods", type=int, default=8000, help="GPU pods holding one slice each")
    parser.add_argument(
        "--rate", type=float, default=20, help="capacity requests per second for our service"
    )
    parser.add_argument(
        "--naive-rate",
        type=float,
        default=0.5,
        help="requests per second for the naive way, and for ours beside it",
    )
    parser.add_argument("--duration", type=float, default=30, help="seconds of each load phase")
    parser.add_argument("--restarts", type=int, default=3, help="restarts timed per server")
    parser.add_argument(
        "--create-concurrency", type=int, default=24, help="parallel creates while setting up"
    )


def run(args: argparse.Namespace) -> Report:
    if args.pods > args.nodes * args.slices:
        raise SystemExit("scale: --pods must fit on --nodes x --slices")
    report = Report(
        NAME,
        f"Capacity at scale: {args.nodes} GPU nodes x {args.slices} slices, "
        f"{args.pods} GPU pods: watch caches vs listing per answer",
        {
            "nodes": args.nodes,
            "slices_per_node": args.slices,
            "pods": args.pods,
            "rate_per_s": args.rate,
            "naive_rate_per_s": args.naive_rate,
            "phase_seconds": args.duration,
            "restarts": args.restarts,
        },
        other=NAIVE,
        other_key="naive",
        ours="our service (watch caches)",
    )
    with local_cluster("scale") as cluster:
        asyncio.run(_measure(cluster, args, report))
    return report


# -- objects ---------------------------------------------------------------------


def node_name(i: int) -> str:
    return f"{OBJECTS_ONLY_PREFIX}gpu-{i:04d}"


def gpu_pod(i: int, node: str) -> dict:
    """A pod shaped like a KubeSpawner user pod (labels, env, resources), bound to ``node``."""
    user = f"user{i:05d}"
    env = [
        {"name": name, "value": value}
        for name, value in {
            "JUPYTERHUB_USER": user,
            "JUPYTERHUB_SERVER_NAME": "",
            "JUPYTERHUB_API_URL": "http://hub:8081/hub/api",
            "JUPYTERHUB_ACTIVITY_URL": f"http://hub:8081/hub/api/users/{user}/activity",
            "JUPYTERHUB_BASE_URL": "/",
            "JUPYTERHUB_SERVICE_PREFIX": f"/user/{user}/",
            "JUPYTERHUB_SERVICE_URL": "http://0.0.0.0:8888/user/{user}/",
            "JUPYTERHUB_OAUTH_CALLBACK_URL": f"/user/{user}/oauth_callback",
            "JUPYTERHUB_CLIENT_ID": f"jupyterhub-user-{user}",
            "JUPYTER_IMAGE": "quay.io/jupyter/pytorch-notebook:cuda12-latest",
            "MEM_GUARANTEE": "1073741824",
            "MEM_LIMIT": "8589934592",
            "GPUSHARE_MEMORY_FRACTION": "0.1015",
        }.items()
    ]
    return {
        "metadata": {
            "name": f"jupyter-{user}",
            "labels": {
                "app": "jupyterhub",
                "component": "singleuser-server",
                "heritage": "jupyterhub",
                "hub.jupyter.org/network-access-hub": "true",
                "hub.jupyter.org/servername": "",
                "hub.jupyter.org/username": user,
            },
            "annotations": {
                "hub.jupyter.org/username": user,
                "hub.jupyter.org/servername": "",
            },
        },
        "spec": {
            "nodeName": node,
            "restartPolicy": "OnFailure",
            "containers": [
                {
                    "name": "notebook",
                    "image": "quay.io/jupyter/pytorch-notebook:cuda12-latest",
                    "args": ["jupyterhub-singleuser"],
                    "ports": [{"containerPort": 8888, "name": "notebook-port"}],
                    "env": env,
                    "resources": {
                        "limits": {RESOURCE: "1", "memory": "8Gi"},
                        "requests": {RESOURCE: "1", "cpu": "500m", "memory": "1Gi"},
                    },
                    "volumeMounts": [{"name": "home", "mountPath": "/home/jovyan"}],
                }
            ],
            "volumes": [{"name": "home", "emptyDir": {}}],
        },
    }


async def _bounded(concurrency: int, jobs) -> None:
    semaphore = asyncio.Semaphore(concurrency)

    async def one(job):
        async with semaphore:
            await job

    await asyncio.gather(*(one(j) for j in jobs))


async def _create_pod(core: client.CoreV1Api, namespace: str, body: dict) -> None:
    # raw response: turning 8,000 answers into V1Pod objects would cost minutes
    response = await core.create_namespaced_pod(namespace, body, _preload_content=False)
    await response.read()


async def populate(core: client.CoreV1Api, args: argparse.Namespace, report: Report) -> str:
    namespace = await create_namespace(core, "scale")
    started = time.monotonic()
    await _bounded(
        args.create_concurrency,
        (
            create_gpu_node(core, node_name(i), gpus=1, replicas=args.slices)
            for i in range(args.nodes)
        ),
    )
    nodes_s = time.monotonic() - started
    log(f"created {args.nodes} nodes in {nodes_s:.0f}s")
    started = time.monotonic()
    await _bounded(
        args.create_concurrency,
        (
            _create_pod(core, namespace, gpu_pod(i, node_name(i // args.slices)))
            for i in range(args.pods)
        ),
    )
    pods_s = time.monotonic() - started
    log(f"created {args.pods} pods in {pods_s:.0f}s")
    report.details["setup_seconds"] = {"nodes": round(nodes_s, 1), "pods": round(pods_s, 1)}
    return namespace


# -- the two servers -----------------------------------------------------------------


class Server:
    """Our service or the naive one, as a process we can load, measure and restart."""

    def __init__(self, label: str, cluster: LocalCluster, run_dir: Path, ours: bool):
        self.label, self.cluster, self.ours = label, cluster, ours
        self.run_dir = run_dir
        self.port = free_port()
        self.secret = secrets.token_hex(16)
        self.component: Component | None = None
        self.url = f"http://127.0.0.1:{self.port}{CAPACITY_PATH}"
        self.headers = {HUB_SECRET_HEADER: self.secret} if ours else {}

    def argv(self) -> list[str]:
        if self.ours:
            return [
                sys.executable,
                "-m",
                "jupyterhub_gpushare.service",
                f"--port={self.port}",
                "--ip=127.0.0.1",
                f"--kubeconfig={self.cluster.kubeconfig}",
                f"--state-file={self.run_dir / 'queue.json'}",
                "--log-level=WARN",
            ]
        return [
            sys.executable,
            "-m",
            "benchmarks.naive_capacity",
            f"--port={self.port}",
            f"--kubeconfig={self.cluster.kubeconfig}",
        ]

    @property
    def pid(self) -> int | None:
        return self.component.process.pid if self.component and self.component.process else None

    def start(self) -> float:
        """Start the process; the monotonic time it was started at."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT),
            "GPUSHARE_HUB_SECRET": self.secret,
            "JUPYTERHUB_SERVICE_PREFIX": "/services/gpushare/",
            # HubOAuth wants a token; no hub is asked, as every request carries the secret
            "JUPYTERHUB_API_TOKEN": secrets.token_hex(16),
        }
        self.component = Component(
            self.label, self.argv(), self.run_dir / "server.log", env=env, cwd=self.run_dir
        )
        started = time.monotonic()
        self.component.start()
        return started

    def stop(self) -> None:
        if self.component is not None:
            self.component.stop()


def consistent(answer: dict, total: int, used: int) -> bool:
    """The answer counts every slice and every pod: a complete view of the cluster."""
    if not answer.get("ready"):
        return False
    pool = next((p for p in answer.get("pools", []) if p["key"] == RESOURCE), None)
    return bool(pool) and pool["slices_total"] == total and pool["slices_used"] == used


async def time_to_consistent(
    server: Server, session: aiohttp.ClientSession, total: int, used: int, timeout: float = 300
) -> tuple[float, float | None]:
    """(Re)start ``server``; seconds to its first consistent answer, and to its first answer."""
    started = server.start()
    first_answer = None
    deadline = started + timeout
    last: object = None
    while time.monotonic() < deadline and server.component.running:
        try:
            async with session.get(
                server.url, headers=server.headers, timeout=aiohttp.ClientTimeout(total=60)
            ) as response:
                last = answer = await response.json(content_type=None)
            if first_answer is None:
                first_answer = time.monotonic() - started
            if consistent(answer, total, used):
                return time.monotonic() - started, first_answer
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as e:
            last = e
        await asyncio.sleep(0.05)
    raise RuntimeError(
        f"{server.label} gave no consistent answer (last: {last!r}; "
        f"its log: {server.component.last_log_line()})"
    )


class Load:
    """Figures of one load phase against one server."""

    def __init__(self, server: Server, rate: float, duration: float):
        self.server, self.rate, self.duration = server, rate, duration
        self.latencies: list[float] = []
        self.errors = 0
        self.skipped = 0
        self.inconsistent = 0
        self.requests: dict[str, int] = {}
        self.server_cpu = 0.0
        self.apiserver_cpu = 0.0
        self.elapsed = 0.0
        self.rss = 0

    @property
    def answers(self) -> int:
        return len(self.latencies)

    def per_answer(self, value: float) -> float | None:
        return value / self.answers if self.answers else None


async def steady_load(
    server: Server,
    session: aiohttp.ClientSession,
    rate: float,
    duration: float,
    expected: tuple[int, int],
    max_in_flight: int = 64,
) -> Load:
    """Open-loop load: a request every 1/rate seconds, whether or not earlier ones finished.

    Requests that would exceed ``max_in_flight`` are counted as skipped rather
    than queued in the client, so a server that cannot keep up shows it.
    """
    load = Load(server, rate, duration)
    cluster = server.cluster
    apiserver = cluster.components["kube-apiserver"].process.pid
    before = api_requests(cluster)
    cpu_server, cpu_api = cpu_seconds(server.pid), cpu_seconds(apiserver)
    in_flight = 0

    async def one() -> None:
        nonlocal in_flight
        in_flight += 1
        sent = time.perf_counter()
        try:
            async with session.get(
                server.url, headers=server.headers, timeout=aiohttp.ClientTimeout(total=120)
            ) as response:
                answer = await response.json(content_type=None)
            load.latencies.append(time.perf_counter() - sent)
            if not consistent(answer, *expected):
                load.inconsistent += 1
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError):
            load.errors += 1
        finally:
            in_flight -= 1

    tasks = []
    started = time.monotonic()
    for i in range(max(int(rate * duration), 1)):
        await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
        if in_flight >= max_in_flight:
            load.skipped += 1
            continue
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    load.elapsed = time.monotonic() - started
    load.requests = dict(request_delta(before, api_requests(cluster)))
    load.server_cpu = cpu_seconds(server.pid) - cpu_server
    load.apiserver_cpu = cpu_seconds(apiserver) - cpu_api
    load.rss = memory_bytes(server.pid)
    return load


async def idle_apiserver_cpu(cluster: LocalCluster, seconds: float) -> float:
    """The API server's CPU use with nobody asking for capacity, in CPU s per s."""
    pid = cluster.components["kube-apiserver"].process.pid
    before, started = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.monotonic() - started)


# -- the run -------------------------------------------------------------------------


async def _measure(cluster: LocalCluster, args: argparse.Namespace, report: Report) -> None:
    total, used = args.nodes * args.slices, args.pods
    expected = (total, used)
    async with core_api(cluster) as core:
        await populate(core, args, report)
    run_dir = Path(tempfile.mkdtemp(prefix="gpushare-bench-scale-", dir=cluster.run_dir))
    ours = Server(OURS, cluster, run_dir / "service", ours=True)
    naive = Server(NAIVE, cluster, run_dir / "naive", ours=False)
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            log("starting our service and the naive server")
            cold = {
                s.label: await time_to_consistent(s, session, total, used) for s in (ours, naive)
            }
            await asyncio.sleep(2)  # let start-up work settle before measuring
            idle = await idle_apiserver_cpu(cluster, min(args.duration, 10))
            log(f"same load on both: {args.naive_rate}/s for {args.duration:.0f}s each")
            same = {}
            for server in (ours, naive):
                same[server.label] = await steady_load(
                    server, session, args.naive_rate, args.duration, expected
                )
            log(f"our service alone at {args.rate}/s for {args.duration:.0f}s")
            steady = await steady_load(ours, session, args.rate, args.duration, expected)
            rss_peak = {s.label: memory_bytes(s.pid, "VmHWM") for s in (ours, naive)}
            restarts: dict[str, list[tuple[float, float | None]]] = {}
            for server in (ours, naive):
                restarts[server.label] = []
                for i in range(args.restarts):
                    log(f"restart {i + 1}/{args.restarts} of {server.label}")
                    server.stop()
                    restarts[server.label].append(
                        await time_to_consistent(server, session, total, used)
                    )
        finally:
            ours.stop()
            naive.stop()
    _report(report, args, cold, same, steady, restarts, rss_peak, idle)


def _report(report, args, cold, same, steady: Load, restarts, rss_peak, idle: float) -> None:
    a, b = same[OURS], same[NAIVE]
    mib = 2**20

    def requests_per_answer(load: Load) -> float | None:
        return load.per_answer(sum(load.requests.values()))

    n = f"n = {len(steady.latencies)}"
    report.single(
        "capacity_latency_p50",
        f"capacity answer latency p50 at {args.rate:g}/s ({n})",
        percentile(steady.latencies, 50),
        "s",
    )
    report.single(
        "capacity_latency_p99",
        f"capacity answer latency p99 at {args.rate:g}/s ({n})",
        percentile(steady.latencies, 99),
        "s",
    )
    report.single(
        "capacity_answers_per_s",
        f"answers per second at {args.rate:g}/s offered",
        steady.answers / steady.elapsed,
        "1/s",
    )
    report.single(
        "api_requests_per_answer",
        f"API-server requests per answer at {args.rate:g}/s",
        requests_per_answer(steady),
        "requests",
    )
    report.single(
        "service_cpu_per_answer",
        f"service CPU per answer at {args.rate:g}/s",
        steady.per_answer(steady.server_cpu),
        "CPU s",
    )
    rate = f"both at {args.naive_rate:g}/s"
    n = f"n = {len(a.latencies)} / {len(b.latencies)}"
    for q in (50, 99):
        report.compare(
            f"same_load_latency_p{q}",
            f"latency p{q}, {rate} ({n})",
            percentile(a.latencies, q),
            percentile(b.latencies, q),
            "s",
        )
    report.compare(
        "same_load_api_requests_per_answer",
        f"API-server requests per answer, {rate}",
        requests_per_answer(a),
        requests_per_answer(b),
        "requests",
    )
    report.compare(
        "same_load_apiserver_cpu_use",
        f"API-server CPU use, {rate}",
        a.apiserver_cpu / a.elapsed,
        b.apiserver_cpu / b.elapsed,
        "CPU s/s",
    )
    report.single(
        "apiserver_cpu_use_at_rate",
        f"API-server CPU use, ours at {args.rate:g}/s",
        steady.apiserver_cpu / steady.elapsed,
        "CPU s/s",
    )
    report.single("idle_apiserver_cpu_use", "API-server CPU use, nobody asking", idle, "CPU s/s")
    report.compare(
        "same_load_server_cpu_per_answer",
        f"answering process CPU per answer, {rate}",
        a.per_answer(a.server_cpu),
        b.per_answer(b.server_cpu),
        "CPU s",
    )
    report.compare(
        "resident_memory",
        "resident memory after the load phases",
        a.rss / mib if a.rss else None,
        b.rss / mib if b.rss else None,
        "MiB",
    )
    report.compare(
        "peak_resident_memory",
        "peak resident memory (VmHWM)",
        rss_peak[OURS] / mib,
        rss_peak[NAIVE] / mib,
        "MiB",
    )
    report.compare(
        "cold_start_to_consistent",
        "first start to first consistent answer",
        cold[OURS][0],
        cold[NAIVE][0],
        "s",
    )
    ours_restarts = [r[0] for r in restarts[OURS]]
    naive_restarts = [r[0] for r in restarts[NAIVE]]
    report.compare(
        "restart_to_consistent_median",
        f"restart to first consistent answer, median of {args.restarts}",
        percentile(ours_restarts, 50),
        percentile(naive_restarts, 50),
        "s",
    )
    report.compare(
        "restart_to_consistent_max",
        f"restart to first consistent answer, max of {args.restarts}",
        max(ours_restarts),
        max(naive_restarts),
        "s",
    )

    rows = []
    for label, load in (
        (f"{OURS} at {args.rate:g}/s", steady),
        *((f"{k} at {args.naive_rate:g}/s", v) for k, v in same.items()),
    ):
        rows.append(
            [
                label,
                load.answers,
                load.skipped,
                load.errors,
                load.inconsistent,
                percentile(load.latencies, 50),
                percentile(load.latencies, 99),
                max(load.latencies) if load.latencies else None,
                requests_per_answer(load),
            ]
        )
    report.table(
        "Load phases (open loop; 'skipped' = not sent because 64 were already in flight)",
        [
            "phase",
            "answers",
            "skipped",
            "errors",
            "inconsistent",
            "p50 s",
            "p99 s",
            "max s",
            "API req/answer",
        ],
        rows,
    )
    report.table(
        "Restarts: seconds from process start to first answer / first consistent answer",
        ["server", *(f"#{i + 1}" for i in range(len(ours_restarts)))],
        [
            [
                label,
                *(
                    f"{first:.2f} / {full:.2f}" if first else f"- / {full:.2f}"
                    for full, first in restarts[label]
                ),
            ]
            for label in (OURS, NAIVE)
        ],
    )
    report.details["api_requests"] = {
        f"{OURS} at {args.rate:g}/s": steady.requests,
        **{f"{k} at {args.naive_rate:g}/s": v.requests for k, v in same.items()},
    }
    report.details["restarts"] = dict(restarts)
    report.note(
        "the naive way: a server that lists all nodes and pods per answer "
        "(benchmarks/naive_capacity.py) with the same capacity arithmetic as the service"
    )
    report.note(
        "both answer on loopback without the hub or proxy in between, as the hub's spawners "
        "ask the service; requests carry the hub's secret"
    )
    report.note(
        "API-server requests per answer count every request the API server served during the "
        "phase (without its own upkeep), so anything else running in the cluster would show; "
        "the objects-only nodes run nothing"
    )
    report.note(
        "the service's own upkeep is two watches (nodes, pods) renewed every 300 s "
        "(ResourceWatcher.watch_timeout) and a re-list when a watch's version expires; "
        "none fell inside these phases"
    )
    report.note(
        "a consistent answer is ready and counts every node's slices and every pod's slice; "
        "restart times include Python's start-up and the first list of all nodes and pods"
    )
