"""Benchmark 3, queue updates: 200 users waiting; each release moves everybody up one place.

A node's slices are all held by pods that are not the hub's (stand-in
"training jobs"); 200 users then ask for a server and wait. Each release
deletes one of those pods: the head of the line is admitted and every other
waiting user's place changes. We follow every waiting user's updates on two
streams at once:

- the service's event stream of the ticket (``api/tickets/{id}/events``, what
  the hub's spawner receives), and
- the hub's progress stream of the spawn (``/hub/api/users/{name}/server/progress``,
  what the spawn page in the browser receives),

and time, from the deletion, until each stream shows the new place (or, for
the head, the admission). The service's and the hub's CPU seconds are read
from /proc around each release, until the admitted user's server is ready.

The benchmark's own 200 followers of the service double the service's
event-stream writes, so the first half of the releases runs with them and the
second half without: the CPU per release of the second half is what the
service spends in production.

The same is done with plain KubeSpawner (200 Pending pods; the scheduler
retries them on every release). It has no places in line to show, so for it
we report what a release costs (hub and scheduler CPU, API-server requests)
and how many progress events each waiting user receives.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import time
from dataclasses import dataclass, field

import aiohttp
import httpx

from jupyterhub_gpushare.service.handlers import HUB_SECRET_HEADER
from jupyterhub_gpushare.testing.cluster import LocalCluster
from jupyterhub_gpushare.testing.nodes import create_gpu_node
from jupyterhub_gpushare.testing.waiting import TimedOut, wait_for

from .common import (
    OURS,
    PLAIN,
    HubAPI,
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

NAME = "queue_updates"
ADMITTED = "admitted"
POSITION = re.compile(r"you are number (\d+) of (\d+) in line")
HUB_EXTRA = """
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}
c.GPUShareSpawner.memory_guard = False
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--waiting", type=int, default=200, help="users waiting in line")
    parser.add_argument(
        "--compare-waiting",
        type=int,
        default=60,
        help="users waiting on both sides for the cost comparison: fewer than z2jh's "
        "concurrent_spawn_limit of 64, so that plain KubeSpawner can have them all pending",
    )
    parser.add_argument("--releases", type=int, default=10, help="slices freed one at a time")
    parser.add_argument(
        "--steady-from",
        type=int,
        default=3,
        help="the first release of the steady phase whose costs are compared (plain "
        "KubeSpawner's first releases carry a one-off burst of scheduling events)",
    )
    parser.add_argument(
        "--hub-streams",
        type=int,
        default=None,
        help="waiting users whose hub progress stream is followed (default: all)",
    )
    parser.add_argument(
        "--pause", type=float, default=2.0, help="seconds between the end of a release and the next"
    )
    parser.add_argument("--no-plain", action="store_true", help="skip plain KubeSpawner")


def run(args: argparse.Namespace) -> Report:
    report = Report(
        NAME,
        f"Queue updates: {args.waiting} users waiting, {args.releases} releases; "
        f"costs compared at {args.compare_waiting} waiting",
        {
            "waiting": args.waiting,
            "compare_waiting": args.compare_waiting,
            "releases": args.releases,
            "steady_from": args.steady_from,
            "hub_streams": args.hub_streams or args.waiting,
            "pause_s": args.pause,
        },
    )
    with local_cluster("queue") as cluster:
        asyncio.run(_measure(cluster, args, report))
    return report


# -- following streams --------------------------------------------------------------


@dataclass
class Stream:
    """What one waiting user's stream said, and when: a place in line or 'admitted'."""

    user: str
    events: list[tuple[float, int | str | None]] = field(default_factory=list)
    failed: str | None = None
    closed: bool = False  # by the benchmark, on purpose

    def last_before(self, moment: float) -> int | str | None:
        value = None
        for when, what in self.events:
            if when > moment:
                break
            if what is not None:
                value = what
        return value

    def first_after(self, moment: float, wanted: int | str) -> float | None:
        for when, what in self.events:
            if when >= moment and what == wanted:
                return when
        return None

    def count_after(self, start: float, end: float) -> int:
        return sum(1 for when, _ in self.events if start <= when < end)


async def _follow(session: aiohttp.ClientSession, url: str, headers: dict, stream: Stream, parse):
    """Read an event stream until cancelled, noting each event's time and meaning."""
    try:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=None)
        async with session.get(url, headers=headers, timeout=timeout) as response:
            if response.status != 200:
                stream.failed = f"HTTP {response.status}"
                return
            async for raw in response.content:
                line = raw.decode(errors="replace").strip()
                if line.startswith("data:"):
                    stream.events.append((time.monotonic(), parse(json.loads(line[5:]))))
    except asyncio.CancelledError:
        raise
    except (aiohttp.ClientError, OSError, ValueError) as e:
        stream.failed = repr(e)


def parse_service(status: dict) -> int | str | None:
    if status.get("state") == ADMITTED:
        return ADMITTED
    if status.get("state") == "waiting":
        return status.get("position")
    return None


def parse_hub(event: dict) -> int | str | None:
    message = event.get("message", "")
    match = POSITION.search(message)
    if match:
        return int(match.group(1))
    if "A GPU slice is free" in message:
        return ADMITTED
    return None


class Followers:
    """Every stream the benchmark follows, with their reader tasks."""

    def __init__(self) -> None:
        self.streams: dict[str, dict[str, Stream]] = {"service": {}, "hub": {}}
        self.tasks: dict[str, list[asyncio.Task]] = {"service": [], "hub": []}

    def add(self, kind: str, session, url: str, headers: dict, user: str, parse) -> None:
        stream = Stream(user)
        self.streams[kind][user] = stream
        self.tasks[kind].append(asyncio.create_task(_follow(session, url, headers, stream, parse)))

    async def close(self, kind: str) -> None:
        for stream in self.streams[kind].values():
            stream.closed = True
        for task in self.tasks[kind]:
            task.cancel()
        for task in self.tasks[kind]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.tasks[kind] = []

    async def close_all(self) -> None:
        for kind in list(self.tasks):
            await self.close(kind)


# -- one release ----------------------------------------------------------------------


@dataclass
class Release:
    """Figures of one release."""

    number: int
    with_service_followers: bool
    window: float = 0.0
    service_cpu: float = 0.0
    hub_cpu: float = 0.0
    scheduler_cpu: float = 0.0
    requests: int = 0
    # per stream kind: delays (s) of the streams that showed the expected state
    delays: dict[str, list[float]] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)
    events_per_user: float | None = None


class Processes:
    """CPU counters of the processes a release makes work."""

    def __init__(self, cluster: LocalCluster, hub):
        self.pids = {
            "hub": hub_pid(hub),
            "service": service_pid(hub),
            "scheduler": cluster.components["kube-scheduler"].process.pid,
        }

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}


def blocker(name: str, node: str) -> dict:
    """A pod that is not the hub's holding one slice: the kubelet's in-process stand-in."""
    return {
        "metadata": {"name": name, "labels": {"app": "training"}},
        "spec": {
            "nodeName": node,
            "containers": [
                {
                    "name": "job",
                    "image": "training-job",
                    "ports": [{"containerPort": 8080}],
                    "resources": {"limits": {"nvidia.com/gpu": "1"}},
                }
            ],
        },
    }


async def _expectations(followers: Followers, moment: float) -> dict[str, dict[str, object]]:
    """What each stream should show after the next release, from what it shows now."""
    wanted: dict[str, dict[str, object]] = {}
    for kind, streams in followers.streams.items():
        wanted[kind] = {}
        for user, stream in streams.items():
            if stream.closed or stream.failed:
                continue
            current = stream.last_before(moment)
            if isinstance(current, int):
                wanted[kind][user] = ADMITTED if current == 1 else current - 1
    return wanted


# -- the run -------------------------------------------------------------------------


async def _setup(core, namespace: str, node: str, slices: int) -> list[str]:
    await create_gpu_node(core, node, gpus=1, replicas=slices)
    names = [f"training-{i:02d}" for i in range(slices)]
    for name in names:
        await core.create_namespaced_pod(namespace, blocker(name, node))

    async def all_running() -> bool:
        pods = await core.list_namespaced_pod(namespace, label_selector="app=training")
        return sum(p.status.phase == "Running" for p in pods.items) == slices

    await wait_for(all_running, 120, "the training pods to run")
    return names


async def _queue(hub, token: str) -> list[dict]:
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.get(
            f"{hub.url}/services/gpushare/api/queue",
            headers={"Authorization": f"token {token}"},
        )
    response.raise_for_status()
    return [e for e in response.json()["entries"] if e["state"] == "waiting"]


async def _one_spawner(
    cluster: LocalCluster,
    core,
    args: argparse.Namespace,
    plain: bool,
    waiting: int,
    suffix: str,
    benchmark_followers: bool,
) -> tuple[list[Release], dict]:
    """One hub, ``waiting`` users in line, ``args.releases`` releases. With
    ``benchmark_followers`` the first half of the releases also has the
    benchmark's own follower of every ticket on the service."""
    label = f"{PLAIN if plain else OURS} ({waiting} waiting)"
    namespace = await create_namespace(core, f"queue-{suffix}")
    node = f"gpu-{suffix}"
    blockers = await _setup(core, namespace, node, args.releases)
    # each hub sees only its own node, so the other run's pods never count
    extra = HUB_EXTRA + f'c.KubeSpawner.node_selector = {{"kubernetes.io/hostname": "{node}"}}\n'
    log(f"{label}: starting the hub")
    async with running_hub(cluster, namespace, plain=plain, extra=extra) as hub:
        api = HubAPI(hub, timeout=120)
        users = [f"q{i:03d}" for i in range(waiting)]
        followers = Followers()
        connector = aiohttp.TCPConnector(limit=0)
        session = aiohttp.ClientSession(connector=connector)
        try:
            await api.create_users(users)
            token = None if plain else await api.admin_token()
            log(f"{label}: {waiting} users ask for a server")
            for user in users:
                status = await api.start(user)
                if status not in (201, 202):
                    raise RuntimeError(f"starting {user}'s server: HTTP {status}")
            if plain:
                await wait_for(
                    lambda: _pending_pods(core, namespace, waiting),
                    600,
                    f"{waiting} Pending pods",
                    1,
                )
            else:
                await wait_for(
                    lambda: _full_line(hub, token, waiting), 600, f"{waiting} users in line", 1
                )
            log(f"{label}: {waiting} waiting; opening their streams")
            hub_users = users[: args.hub_streams or waiting]
            for user in hub_users:
                followers.add(
                    "hub",
                    session,
                    f"{hub.api_url}/users/{user}/server/progress",
                    {"Authorization": f"token {hub.api_token}"},
                    user,
                    parse_hub,
                )
            if benchmark_followers:
                for entry in await _queue(hub, token):
                    followers.add(
                        "service",
                        session,
                        f"http://127.0.0.1:{hub.service_port}/services/gpushare/api/tickets/"
                        f"{entry['ticket']}/events",
                        {HUB_SECRET_HEADER: hub.queue_secret},
                        entry["user"],
                        parse_service,
                    )
            await asyncio.sleep(3)  # first events (the current state) arrive
            processes = Processes(cluster, hub)
            idle = await _idle_rates(processes, 10)
            releases = []
            steady: dict = {}
            for n, name in enumerate(blockers):
                with_service = benchmark_followers and n < (args.releases + 1) // 2
                if not with_service and followers.tasks["service"]:
                    await followers.close("service")
                    await asyncio.sleep(1)
                if n + 1 == args.steady_from:
                    # costs of the steady phase: process times over the whole phase,
                    # not summed per release from 10 ms ticks
                    steady = {
                        "cpu": processes.cpu(),
                        "time": time.monotonic(),
                        "requests": api_requests(cluster),
                    }
                release = await _release(
                    cluster, core, api, namespace, name, followers, processes, n, with_service
                )
                releases.append(release)
                log(
                    f"{label}: release {n + 1}/{len(blockers)}: window {release.window:.2f}s, "
                    + ", ".join(
                        f"{k} max {max(v):.2f}s ({release.missing[k]} missing)"
                        for k, v in release.delays.items()
                        if v
                    )
                )
                await asyncio.sleep(args.pause)
            if steady:
                cpu = processes.cpu()
                seconds = time.monotonic() - steady["time"]
                count = len(releases) - args.steady_from + 1
                steady = {
                    "releases": count,
                    "seconds": seconds,
                    "cpu_per_release": {
                        k: (cpu[k] - steady["cpu"][k] - idle[k] * seconds) / count for k in cpu
                    },
                    "requests_per_release": sum(
                        request_delta(steady["requests"], api_requests(cluster)).values()
                    )
                    / count,
                }
            failed = {
                kind: sum(1 for s in streams.values() if s.failed)
                for kind, streams in followers.streams.items()
            }
            return releases, {"idle": idle, "failed_streams": failed, "steady": steady}
        finally:
            await followers.close_all()
            await session.close()
            log(f"{label}: stopping all servers")
            await api.stop_all(users, timeout=600)
            await api.close()


async def _pending_pods(core, namespace: str, count: int) -> bool:
    pods = await core.list_namespaced_pod(namespace, label_selector="component=singleuser-server")
    return sum(p.status.phase == "Pending" for p in pods.items) >= count


async def _full_line(hub, token: str, count: int) -> bool:
    return len(await _queue(hub, token)) >= count


async def _idle_rates(processes: Processes, seconds: float) -> dict[str, float]:
    """CPU seconds per second of each process while nothing is released."""
    before, started = processes.cpu(), time.monotonic()
    await asyncio.sleep(seconds)
    after, elapsed = processes.cpu(), time.monotonic() - started
    return {k: (after[k] - before[k]) / elapsed for k in before}


async def _release(
    cluster, core, api: HubAPI, namespace, blocker_name, followers, processes, n, with_service
) -> Release:
    release = Release(n + 1, with_service)
    moment = time.monotonic()
    wanted = await _expectations(followers, moment)
    ready_before = await api.ready()
    requests_before = api_requests(cluster)
    cpu_before = processes.cpu()
    started = time.monotonic()
    await core.delete_namespaced_pod(blocker_name, namespace, grace_period_seconds=0)

    async def reached() -> bool:
        return all(
            followers.streams[kind][user].first_after(started, value) is not None
            for kind, expected in wanted.items()
            for user, value in expected.items()
            if not followers.streams[kind][user].failed
        )

    # streams that never show their update are counted as missing below
    with contextlib.suppress(TimedOut):
        await wait_for(reached, 60, "every stream to show its new place", 0.05)

    async def someone_ready():
        return (await api.ready()) - ready_before

    await wait_for(someone_ready, 120, "the admitted user's server", 0.1)
    await asyncio.sleep(1)  # trailing work: the new pod's status updates, their publication
    cpu_after = processes.cpu()
    release.window = time.monotonic() - started
    release.requests = sum(request_delta(requests_before, api_requests(cluster)).values())
    release.service_cpu = cpu_after["service"] - cpu_before["service"]
    release.hub_cpu = cpu_after["hub"] - cpu_before["hub"]
    release.scheduler_cpu = cpu_after["scheduler"] - cpu_before["scheduler"]
    for kind, expected in wanted.items():
        delays, missing = [], 0
        for user, value in expected.items():
            when = followers.streams[kind][user].first_after(started, value)
            if when is None:
                missing += 1
            else:
                delays.append(when - started)
        if expected:
            release.delays[kind] = delays
            release.missing[kind] = missing
    hub_streams = followers.streams["hub"]
    if hub_streams:
        end = started + release.window
        release.events_per_user = sum(
            s.count_after(started, end) for s in hub_streams.values()
        ) / len(hub_streams)
    return release


async def _measure(cluster: LocalCluster, args: argparse.Namespace, report: Report) -> None:
    results: dict[str, tuple[list[Release], dict]] = {}
    async with core_api(cluster) as core:
        results["scale"] = await _one_spawner(
            cluster, core, args, False, args.waiting, "scale", benchmark_followers=True
        )
        results[OURS] = await _one_spawner(
            cluster, core, args, False, args.compare_waiting, "ours", benchmark_followers=False
        )
        if not args.no_plain:
            results[PLAIN] = await _one_spawner(
                cluster, core, args, True, args.compare_waiting, "plain", benchmark_followers=False
            )
    _report(report, args, results)


def _delays(releases: list[Release], kind: str) -> list[float]:
    return [d for r in releases for d in r.delays.get(kind, [])]


def _per_release_max(releases: list[Release], kind: str) -> list[float]:
    return [max(r.delays[kind]) for r in releases if r.delays.get(kind)]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _report(report: Report, args: argparse.Namespace, results) -> None:
    scale, scale_meta = results["scale"]
    streams = (("service", "service event stream"), ("hub", "hub progress stream"))
    for kind, label in streams:
        values = _delays(scale, kind)
        if not values:
            continue
        n = f"n = {len(values)}"
        for q in (50, 95, 99):
            report.single(
                f"position_delay_{kind}_p{q}",
                f"{args.waiting} waiting: new place shown, {label}, p{q} ({n})",
                percentile(values, q),
                "s",
            )
        report.single(
            f"position_delay_{kind}_max",
            f"{args.waiting} waiting: new place shown, {label}, max ({n})",
            max(values),
            "s",
        )
        report.single(
            f"position_updates_missing_{kind}",
            f"{args.waiting} waiting: expected updates never shown ({label})",
            sum(r.missing.get(kind, 0) for r in scale),
            "updates",
        )
    steady_scale = [r for r in scale if not r.with_service_followers]
    doubled = [r for r in scale if r.with_service_followers]

    def above_idle(releases: list[Release], meta: dict, process: str) -> list[float]:
        rate = meta.get("idle", {}).get(process, 0.0)
        return [getattr(r, f"{process}_cpu") - rate * r.window for r in releases]

    report.single(
        "service_cpu_per_release_at_scale",
        f"{args.waiting} waiting: service CPU per release, hub's followers only "
        f"(n = {len(steady_scale)} releases)",
        _mean(above_idle(steady_scale, scale_meta, "service")),
        "CPU s",
    )
    report.single(
        "service_cpu_per_release_with_benchmark_followers",
        f"{args.waiting} waiting: service CPU per release, + the benchmark's {args.waiting} "
        f"followers (n = {len(doubled)} releases)",
        _mean(above_idle(doubled, scale_meta, "service")),
        "CPU s",
    )

    ours, ours_meta = results[OURS]
    plain, plain_meta = results.get(PLAIN, ([], {}))
    if plain:
        steady_ours, steady_plain = ours_meta["steady"], plain_meta["steady"]
        phase = (
            f"{args.compare_waiting} waiting, releases {args.steady_from}-{args.releases} "
            f"(n = {steady_ours['releases']} / {steady_plain['releases']})"
        )
        for process, label in (("hub", "hub"), ("scheduler", "kube-scheduler")):
            report.compare(
                f"{process}_cpu_per_release",
                f"{label} CPU per release, {phase}",
                steady_ours["cpu_per_release"][process],
                steady_plain["cpu_per_release"][process],
                "CPU s",
            )
        ours_total = sum(steady_ours["cpu_per_release"].values())
        plain_total = sum(v for k, v in steady_plain["cpu_per_release"].items() if k != "service")
        report.compare(
            "cpu_per_release",
            f"hub + service + scheduler CPU per release, {phase}",
            ours_total,
            plain_total,
            "CPU s",
        )
        report.compare(
            "api_requests_per_release",
            f"API-server requests per release, {phase}",
            steady_ours["requests_per_release"],
            steady_plain["requests_per_release"],
            "requests",
        )
        first = args.steady_from - 1
        report.compare(
            "progress_events_per_user_per_release",
            f"progress events per waiting user per release, {phase}",
            _mean([r.events_per_user for r in ours[first:] if r.events_per_user is not None]),
            _mean([r.events_per_user for r in plain[first:] if r.events_per_user is not None]),
            "events",
        )
        report.compare("position_shown", "waiting users are shown their place", "yes", "no", "")

    rows = []
    for label, (releases, _) in results.items():
        for r in releases:
            rows.append(
                [
                    f"{label} #{r.number}" + (" +followers" if r.with_service_followers else ""),
                    max(r.delays["service"]) if r.delays.get("service") else None,
                    max(r.delays["hub"]) if r.delays.get("hub") else None,
                    r.missing.get("hub", 0) + r.missing.get("service", 0),
                    r.window,
                    r.service_cpu if label != PLAIN else None,
                    r.hub_cpu,
                    r.scheduler_cpu,
                    r.requests,
                ]
            )
    report.table(
        "Each release (delays: until every waiting user's stream showed its new place; "
        "CPU: raw, from 10 ms ticks, idle not taken off)",
        [
            "release",
            "service max s",
            "hub max s",
            "missing",
            "window s",
            "service CPU",
            "hub CPU",
            "sched CPU",
            "API req",
        ],
        rows,
    )
    idle_rows = [
        [label, meta["idle"].get("service"), meta["idle"]["hub"], meta["idle"]["scheduler"]]
        for label, (_, meta) in results.items()
    ]
    report.table(
        "Idle CPU (CPU s per s, all streams open, nothing released); taken off the steady phase",
        ["run", "service", "hub", "scheduler"],
        idle_rows,
    )
    report.details["releases"] = {
        label: [
            {
                "release": r.number,
                "with_benchmark_service_followers": r.with_service_followers,
                "window_s": round(r.window, 3),
                "service_cpu_s": r.service_cpu,
                "hub_cpu_s": r.hub_cpu,
                "scheduler_cpu_s": r.scheduler_cpu,
                "api_requests": r.requests,
                "delays_s": {k: [round(d, 4) for d in v] for k, v in r.delays.items()},
                "missing": r.missing,
                "progress_events_per_user": r.events_per_user,
            }
            for r in releases
        ]
        for label, (releases, _) in results.items()
    }
    report.details["steady"] = {label: meta["steady"] for label, (_, meta) in results.items()}
    report.details["idle_cpu_per_s"] = {label: meta["idle"] for label, (_, meta) in results.items()}
    report.details["failed_streams"] = {
        label: meta["failed_streams"] for label, (_, meta) in results.items()
    }
    report.note(
        "a release is the deletion of one training pod; its delays run from the deletion "
        "request until each stream showed the user's new place (the head: its admission)"
    )
    report.note(
        f"costs are compared at {args.compare_waiting} waiting, below z2jh's "
        "concurrent_spawn_limit of 64 (beyond it plain KubeSpawner refuses users with 429), "
        f"over the same releases {args.steady_from}-{args.releases} on both sides, with CPU "
        "from the processes' times over that whole phase less their idle rate"
    )
    report.note(
        "plain KubeSpawner shows no place in line: its progress streams carry the pod's "
        "Kubernetes events; its first releases carry a one-off burst of scheduling events "
        "(see the per-release table), left out of the comparison"
    )
