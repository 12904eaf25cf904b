"""Benchmark 4, cost per spawn: what GPUShareSpawner adds to a spawn when slices are free.

Two hubs run side by side on one local cluster, each in its own namespace: one
with GPUShareSpawner (and our service), one with plain KubeSpawner asking for
one ``nvidia.com/gpu``. Their spawns alternate (ours, plain, ours, ...) so
that drift in the machine's load hits both alike. For each spawn, from the
POST that starts it until its server is ready (plus a short settle for trailing
status updates), we count:

- API-server requests, from the API server's own ``apiserver_request_total``
  (by verb and resource, so every extra request is named);
- CPU seconds of the hub process, and of our service;
- the time until the server is ready.

WATCH requests are left out of the per-spawn count: they are counted when a
watch ends, which is on a timer (KubeSpawner's reflectors renew every few
seconds), not per spawn.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from collections import Counter

from jupyterhub_gpushare.testing.cluster import LocalCluster
from jupyterhub_gpushare.testing.nodes import create_gpu_node
from jupyterhub_gpushare.testing.waiting import wait_for

from .common import (
    OURS,
    PLAIN,
    HubAPI,
    PodClock,
    Report,
    api_requests,
    core_api,
    cpu_seconds,
    create_namespace,
    hub_pid,
    local_cluster,
    log,
    percentile,
    request_delta,
    running_hub,
    service_pid,
)

NAME = "spawn_cost"
NO_GUARD = "GPUShareSpawner, guard off"
# Requests made on timers, whoever spawns: KubeSpawner's pod and event reflectors
# (in every hub, both kinds) re-list their namespace every 10-30 s and renew
# their watches; watches are counted when they end.
TIMER_DRIVEN = ("LIST pods [namespace]", "LIST events [namespace]")


def timer_driven(key: str) -> bool:
    return key.startswith("WATCH ") or key in TIMER_DRIVEN


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--spawns", type=int, default=50, help="measured spawns per spawner (50: enough for a p95)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="spawns per spawner before measuring (not counted)"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="seconds after ready still counted for the spawn (trailing status updates)",
    )
    parser.add_argument(
        "--no-guard-variant",
        action="store_true",
        help="skip the third hub: GPUShareSpawner with its memory guard off",
    )


def run(args: argparse.Namespace) -> Report:
    report = Report(
        NAME,
        "Cost per spawn with free slices: GPUShareSpawner vs plain KubeSpawner",
        {
            "spawns": args.spawns,
            "warmup": args.warmup,
            "settle_s": args.settle,
            "guard_off_variant": not args.no_guard_variant,
        },
    )
    with local_cluster("spawncost") as cluster:
        asyncio.run(_measure(cluster, args, report))
    return report


class Spawner:
    """One hub and the per-spawn figures gathered for it."""

    def __init__(
        self, label: str, cluster: LocalCluster, hub, api: HubAPI, plain: bool, clock: PodClock
    ):
        self.label, self.cluster, self.hub, self.api, self.plain = label, cluster, hub, api, plain
        self.clock = clock
        # the spawn split at the pod's creation and Ready condition (seen by a watch)
        self.to_pod: list[float] = []  # POST until the pod exists: the spawner's own work
        self.pod_to_ready: list[float] = []  # scheduling and starting the server
        self.ready_to_hub: list[float] = []  # until KubeSpawner notices
        self.requests: list[Counter] = []
        self.hub_cpu: list[float] = []
        self.service_cpu: list[float] = []
        self.seconds: list[float] = []
        self.statuses: Counter = Counter()
        self.timer_driven: list[int] = []

    async def spawn(self, user: str, measure: bool, settle: float) -> None:
        hub, service = hub_pid(self.hub), None if self.plain else service_pid(self.hub)
        before = api_requests(self.cluster)
        cpu_hub, cpu_service = cpu_seconds(hub), cpu_seconds(service)
        started = time.monotonic()
        # the hub's default slow_spawn_timeout (10 s): the POST returns once ready
        status = await self.api.start(user)
        if status == 202:
            await wait_for(lambda: _is_ready(self.api, user), 300, f"{user}'s server", 0.05)
        elapsed = time.monotonic() - started
        await asyncio.sleep(settle)
        delta = request_delta(before, api_requests(self.cluster))
        if measure:
            self.statuses[status] += 1
            self.seconds.append(elapsed)
            created, ready = self.clock.created.get(user), self.clock.ready.get(user)
            if created is not None and ready is not None:
                self.to_pod.append(created - started)
                self.pod_to_ready.append(ready - created)
                self.ready_to_hub.append(started + elapsed - ready)
            self.requests.append(Counter({k: v for k, v in delta.items() if not timer_driven(k)}))
            self.timer_driven.append(sum(v for k, v in delta.items() if timer_driven(k)))
            self.hub_cpu.append(cpu_seconds(hub) - cpu_hub)
            self.service_cpu.append(cpu_seconds(service) - cpu_service)
        await self.api.stop(user)
        await wait_for(lambda: _is_stopped(self.api, user), 120, f"{user}'s server to stop")
        await asyncio.sleep(0.5)

    def mean_requests(self) -> Counter:
        total: Counter = Counter()
        for c in self.requests:
            total.update(c)
        return Counter({k: v / len(self.requests) for k, v in total.items()})


async def _is_ready(api: HubAPI, user: str) -> bool:
    return user in await api.ready()


async def _is_stopped(api: HubAPI, user: str) -> bool:
    return user not in await api.servers()


async def _measure(cluster: LocalCluster, args: argparse.Namespace, report: Report) -> None:
    async with core_api(cluster) as core:
        # 2 GPUs x 4 slices: always free, since spawns run one at a time
        await create_gpu_node(core, "gpu-0", gpus=2, replicas=4)
        variants = [(OURS, False, ""), (PLAIN, True, "")]
        if not args.no_guard_variant:
            variants.append((NO_GUARD, False, "c.GPUShareSpawner.memory_guard = False\n"))
        async with contextlib.AsyncExitStack() as stack:
            spawners: list[Spawner] = []
            for i, (label, plain, extra) in enumerate(variants):
                namespace = await create_namespace(core, f"bench-{i}")
                log(f"starting the {label} hub")
                hub = await stack.enter_async_context(
                    running_hub(cluster, namespace, plain=plain, extra=extra)
                )
                api = HubAPI(hub)
                stack.push_async_callback(api.close)
                clock = PodClock(core, namespace)
                clock.start()
                stack.push_async_callback(clock.stop)
                spawners.append(Spawner(label, cluster, hub, api, plain=plain, clock=clock))
            total = args.warmup + args.spawns
            users = [f"cost{i:03d}" for i in range(total)]
            for spawner in spawners:
                await spawner.api.create_users(users)
            for i, user in enumerate(users):
                measure = i >= args.warmup
                log(f"spawn {i + 1}/{total} ({'measured' if measure else 'warm-up'})")
                # rotate who goes first, so that none always follows another
                for spawner in spawners[i % len(spawners) :] + spawners[: i % len(spawners)]:
                    await spawner.spawn(user, measure, args.settle)
    _report(report, spawners)


def _report(report: Report, spawners: list[Spawner]) -> None:
    ours, plain = spawners[0], spawners[1]

    def total(s: Spawner) -> list[int]:
        return [sum(c.values()) for c in s.requests]

    def cpu(s: Spawner) -> float:
        return statistics.fmean(s.hub_cpu) + statistics.fmean(s.service_cpu)

    report.compare(
        "api_requests_per_spawn",
        "API-server requests per spawn (mean)",
        statistics.fmean(total(ours)),
        statistics.fmean(total(plain)),
        "requests",
    )
    report.single(
        "extra_api_requests_per_spawn",
        "extra API-server requests per spawn",
        statistics.fmean(total(ours)) - statistics.fmean(total(plain)),
        "requests",
    )
    report.compare(
        "hub_cpu_per_spawn",
        "hub process CPU per spawn (mean)",
        statistics.fmean(ours.hub_cpu),
        statistics.fmean(plain.hub_cpu),
        "CPU s",
    )
    report.single(
        "service_cpu_per_spawn",
        "gpushare service CPU per spawn (mean)",
        statistics.fmean(ours.service_cpu),
        "CPU s",
    )
    report.compare(
        "hub_and_service_cpu_per_spawn",
        "hub + service CPU per spawn (mean)",
        cpu(ours),
        cpu(plain),
        "CPU s",
    )
    n = f"n = {len(ours.seconds)} / {len(plain.seconds)}"
    for q in (50, 95):
        report.compare(
            f"spawn_seconds_p{q}",
            f"spawn request to ready, p{q} ({n})",
            percentile(ours.seconds, q),
            percentile(plain.seconds, q),
            "s",
        )
    report.compare(
        "spawn_seconds_max",
        "spawn request to ready, max",
        max(ours.seconds),
        max(plain.seconds),
        "s",
    )
    report.compare(
        "spawn_to_pod_seconds_p50",
        "spawn request to pod created, p50",
        percentile(ours.to_pod, 50),
        percentile(plain.to_pod, 50),
        "s",
    )
    report.compare(
        "pod_to_ready_seconds_p50",
        "pod created to pod Ready, p50",
        percentile(ours.pod_to_ready, 50),
        percentile(plain.pod_to_ready, 50),
        "s",
    )
    report.compare(
        "pod_ready_to_hub_seconds_p50",
        "pod Ready to hub says ready, p50",
        percentile(ours.ready_to_hub, 50),
        percentile(plain.ready_to_hub, 50),
        "s",
    )

    if len(spawners) > 2:
        rows = []
        for s in spawners:
            rows.append(
                [
                    s.label,
                    statistics.fmean(total(s)),
                    statistics.fmean(total(s)) - statistics.fmean(total(plain)),
                    cpu(s),
                    percentile(s.seconds, 50),
                    percentile(s.seconds, 50) / percentile(plain.seconds, 50),
                ]
            )
            key = "gpushare_no_guard" if s.label == NO_GUARD else None
            if key:
                report.figure(f"api_requests_per_spawn.{key}", rows[-1][1], "requests")
                report.figure(f"hub_and_service_cpu_per_spawn.{key}", rows[-1][3], "CPU s")
                report.figure(f"spawn_seconds_p50.{key}", rows[-1][4], "s")
                report.figure(f"spawn_seconds_p50.{key}.ratio", rows[-1][5], "x KubeSpawner")
        report.table(
            "The three hubs (the memory guard adds a ConfigMap volume and its start-up hook)",
            ["spawner", "requests", "extra", "CPU s (hub+svc)", "p50 s", "p50 vs plain"],
            rows,
        )

    means = [s.mean_requests() for s in spawners]
    rows = []
    for key in sorted(set().union(*means)):
        values = [m.get(key, 0.0) for m in means]
        rows.append([key, *(round(v, 2) for v in values), round(values[0] - values[1], 2)])
    report.table(
        "API-server requests per spawn by verb and resource (mean over the measured spawns)",
        ["request", *(s.label for s in spawners), "extra (first - second)"],
        rows,
    )
    report.details["requests_by_kind"] = {
        s.label: dict(m) for s, m in zip(spawners, means, strict=True)
    }
    report.details["per_spawn"] = {
        s.label: {
            "seconds": s.seconds,
            "to_pod_seconds": s.to_pod,
            "pod_to_ready_seconds": s.pod_to_ready,
            "ready_to_hub_seconds": s.ready_to_hub,
            "requests": total(s),
            "hub_cpu_seconds": s.hub_cpu,
            "service_cpu_seconds": None if s.plain else s.service_cpu,
            "post_status": dict(s.statuses),
            "timer_driven_requests_left_out": s.timer_driven,
        }
        for s in spawners
    }
    report.note(
        "each spawn is counted from its POST until its server is ready plus the settle time; "
        "left out: watches and the namespaced re-lists of KubeSpawner's reflectors, which every "
        "hub makes on timers whether or not it spawns (in the windows: "
        + ", ".join(f"{s.label} {statistics.fmean(s.timer_driven):.2f}" for s in spawners)
        + f" per spawn, from all {len(spawners)} hubs)"
    )
    report.note(
        "counts come from the API server's apiserver_request_total; the API server's own "
        "upkeep (its lease, health and OpenAPI reads) is left out; the rest includes the "
        "scheduler's binding and the simulated kubelet's status updates, alike for both"
    )
    report.note(
        "spawn times are split by a watch of the pods: until the pod exists (the spawner's own "
        "work; GPUShareSpawner: reading the nodes, the guard ConfigMap, joining the line), "
        "until it is Ready (scheduling, the simulated kubelet starting the stand-in server), "
        "and until the hub has noticed (KubeSpawner checks with randomised back-off starting "
        "at 0.2 s, so a small delay can cost a whole extra check)"
    )
    report.note(
        "the hubs run side by side in separate namespaces and take turns, one spawn at a "
        "time, so every spawn finds free slices and no other spawn running"
    )
