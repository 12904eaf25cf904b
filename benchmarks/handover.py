"""Benchmark 1, slice hand-over: 8 slices, 24 users; who gets a freed slice, and how fast.

For each spawner in turn (GPUShareSpawner with its service, then plain
KubeSpawner asking for one ``nvidia.com/gpu``), on the same local cluster and
the same node with 8 slices:

1. 24 users press Start one after another; the first 8 get servers, each of
   the other 16 is in line (ours: in the service's queue; plain: its pod is
   Pending and the scheduler has found it unschedulable) before the next asks;
2. then, 50 times (enough for a p95): the holder that has run longest stops
   (its DELETE is the start of the clock), and we time until a waiting user's
   server is ready in the hub, and note whether that user is the one who had
   waited longest. The stopped user asks again and joins the back of the line,
   so the line never runs dry.

Between a hand-over and the next stop we pause for a random 0.5-4 s (the same
seeded sequence for both spawners): how long a back-off makes a waiting user
wait (the scheduler's for a Pending pod, KubeSpawner's while it checks whether
the pod runs) depends on how long ago the last try was, so evenly spaced stops
would show one regime only.

Beside the hub-level time we take two pod-level parts from a watch of the
namespace: from the stopped pod being gone to the next pod being bound (the
scheduler's part), and from that pod being Ready to the hub saying the server
is ready (the spawner's part).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

import httpx

from jupyterhub_gpushare.testing.cluster import LocalCluster
from jupyterhub_gpushare.testing.nodes import create_gpu_node
from jupyterhub_gpushare.testing.waiting import wait_for

from .common import (
    OURS,
    PLAIN,
    HubAPI,
    PodClock,
    Report,
    core_api,
    create_namespace,
    local_cluster,
    log,
    percentile,
    running_hub,
)

NAME = "handover"

HUB_EXTRA = """
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slices", type=int, default=8, help="slices of the one GPU node")
    parser.add_argument("--users", type=int, default=24, help="users asking for a server")
    parser.add_argument("--hand-overs", type=int, default=50, help="stops timed per spawner")
    parser.add_argument("--gap-min", type=float, default=0.5, help="shortest pause between stops")
    parser.add_argument("--gap-max", type=float, default=4.0, help="longest pause between stops")
    parser.add_argument("--seed", type=int, default=8, help="seed of the pauses")
    parser.add_argument(
        "--timeout", type=float, default=180, help="longest wait for one hand-over, seconds"
    )


def run(args: argparse.Namespace) -> Report:
    if args.users <= args.slices:
        raise SystemExit("handover: --users must be more than --slices")
    report = Report(
        NAME,
        f"Slice hand-over: {args.slices} slices, {args.users} users, "
        f"{args.users - args.slices} hand-overs per spawner",
        {
            "slices": args.slices,
            "users": args.users,
            "gap_s": f"{args.gap_min:g}-{args.gap_max:g} (seed {args.seed})",
        },
    )
    with local_cluster("handover") as cluster:
        asyncio.run(_measure(cluster, args, report))
    return report


class HandOver:
    def __init__(self, victim: str, winner: str, longest: str, seconds: float):
        self.victim, self.winner, self.longest = victim, winner, longest
        self.seconds = seconds
        # pod-level parts, from the watch: stopped pod gone -> next pod bound,
        # and next pod Ready -> the hub says the server is ready
        self.gone_to_bound: float | None = None
        self.ready_to_hub: float | None = None

    @property
    def fair(self) -> bool:
        return self.winner == self.longest


async def _in_line_ours(hub, token: str, user: str) -> bool:
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.get(
            f"{hub.url}/services/gpushare/api/queue",
            headers={"Authorization": f"token {token}"},
        )
    response.raise_for_status()
    return any(e["user"] == user and e["state"] == "waiting" for e in response.json()["entries"])


async def _one_spawner(
    cluster: LocalCluster, core, args, plain: bool, gaps: list[float]
) -> list[HandOver]:
    namespace = await create_namespace(core, f"handover-{'plain' if plain else 'ours'}")
    clock = PodClock(core, namespace)
    clock.start()
    try:
        return await _hand_overs(cluster, args, plain, gaps, namespace, clock)
    finally:
        await clock.stop()


async def _hand_overs(
    cluster: LocalCluster, args, plain: bool, gaps: list[float], namespace: str, clock: PodClock
) -> list[HandOver]:
    label = PLAIN if plain else OURS
    log(f"{label}: starting the hub")
    async with running_hub(cluster, namespace, plain=plain, extra=HUB_EXTRA) as hub:
        api = HubAPI(hub)
        users = [f"h{i:02d}" for i in range(args.users)]
        try:
            await api.create_users(users)
            token = None if plain else await api.admin_token()
            arrival: dict[str, float] = {}
            holders: list[str] = []
            for i, user in enumerate(users):
                status = await api.start(user)
                if status not in (201, 202):
                    raise RuntimeError(f"starting {user}'s server: HTTP {status}")
                if i < args.slices:
                    await wait_for(lambda u=user: _is_ready(api, u), 120, f"{user}'s server", 0.1)
                    holders.append(user)
                else:
                    await _in_line(hub, api, token, clock, plain, user)
                arrival[user] = time.monotonic()
            log(f"{label}: {args.slices} running, {args.users - args.slices} waiting")

            results = []
            waiting = [u for u in users if u not in holders]
            for n, gap in enumerate(gaps):
                victim = holders.pop(0)
                longest = min(waiting, key=arrival.__getitem__)
                started = time.monotonic()
                stopping = asyncio.create_task(api.stop(victim))
                winner = await wait_for(
                    lambda w=tuple(waiting): _newly_ready(api, w),
                    args.timeout,
                    f"a waiting user's server after {victim} stopped",
                    0.1,
                )
                hub_ready = time.monotonic()
                seconds = hub_ready - started
                await stopping
                handover = HandOver(victim, winner, longest, seconds)
                gone, bound = clock.gone.get(victim), clock.bound.get(winner)
                if gone is not None and bound is not None:
                    handover.gone_to_bound = bound - gone
                if winner in clock.ready:
                    handover.ready_to_hub = hub_ready - clock.ready[winner]
                results.append(handover)
                waiting.remove(winner)
                holders.append(winner)
                log(
                    f"{label}: hand-over {n + 1}/{len(gaps)}: {victim} -> {winner} "
                    f"in {seconds:.2f}s{'' if winner == longest else ' (not the longest waiting)'}"
                )
                await wait_for(
                    lambda v=victim: _is_stopped(api, v), 120, f"{victim}'s server to stop"
                )
                # the stopped user asks again, at the back of the line
                clock.forget(victim)
                status = await api.start(victim)
                if status not in (201, 202):
                    raise RuntimeError(f"starting {victim}'s server again: HTTP {status}")
                await _in_line(hub, api, token, clock, plain, victim)
                arrival[victim] = time.monotonic()
                waiting.append(victim)
                await asyncio.sleep(gap)
            return results
        finally:
            log(f"{label}: stopping all servers")
            await api.stop_all(users)
            await api.close()


async def _true(value: bool) -> bool:
    return value


async def _in_line(hub, api: HubAPI, token, clock: PodClock, plain: bool, user: str) -> None:
    """Until ``user`` waits: in the service's line, or (plain) with a Pending pod
    that the scheduler has found unschedulable."""
    if plain:
        await wait_for(
            lambda: _true(user in clock.unschedulable),
            120,
            f"{user}'s pod to be found unschedulable",
            0.05,
        )
    else:
        await wait_for(lambda: _in_line_ours(hub, token, user), 120, f"{user} in line", 0.1)


async def _is_ready(api: HubAPI, user: str) -> bool:
    return user in await api.ready()


async def _is_stopped(api: HubAPI, user: str) -> bool:
    return user not in await api.servers()


async def _newly_ready(api: HubAPI, waiting: tuple[str, ...]) -> str | None:
    ready = await api.ready()
    return next((u for u in waiting if u in ready), None)


async def _measure(cluster: LocalCluster, args: argparse.Namespace, report: Report) -> None:
    rng = random.Random(args.seed)
    gaps = [rng.uniform(args.gap_min, args.gap_max) for _ in range(args.hand_overs)]
    async with core_api(cluster) as core:
        await create_gpu_node(core, "gpu-0", gpus=1, replicas=args.slices)
        results = {}
        for plain in (False, True):
            results[PLAIN if plain else OURS] = await _one_spawner(cluster, core, args, plain, gaps)
    _report(report, results)


def _report(report: Report, results: dict[str, list[HandOver]]) -> None:
    ours, plain = results[OURS], results[PLAIN]

    def seconds(r: list[HandOver]) -> list[float]:
        return [h.seconds for h in r]

    def pod_level(r: list[HandOver], attribute: str) -> list[float]:
        return [getattr(h, attribute) for h in r if getattr(h, attribute) is not None]

    n = f"n = {len(ours)} / {len(plain)}"
    for q in (50, 95):
        report.compare(
            f"handover_seconds_p{q}",
            f"stop to next server ready, p{q} ({n})",
            percentile(seconds(ours), q),
            percentile(seconds(plain), q),
            "s",
        )
    report.compare(
        "handover_seconds_max",
        "stop to next server ready, max",
        max(seconds(ours)),
        max(seconds(plain)),
        "s",
    )
    report.compare(
        "longest_waiting_share",
        "hand-overs to the longest-waiting user",
        100 * sum(h.fair for h in ours) / len(ours),
        100 * sum(h.fair for h in plain) / len(plain),
        "%",
    )
    for q in (50, 95):
        report.compare(
            f"pod_gone_to_next_bound_p{q}",
            f"stopped pod gone to next pod bound, p{q} ({n})",
            percentile(pod_level(ours, "gone_to_bound"), q),
            percentile(pod_level(plain, "gone_to_bound"), q),
            "s",
        )
    for q in (50, 95):
        report.compare(
            f"pod_ready_to_hub_ready_p{q}",
            f"next pod Ready to hub says ready, p{q} ({n})",
            percentile(pod_level(ours, "ready_to_hub"), q),
            percentile(pod_level(plain, "ready_to_hub"), q),
            "s",
        )
    rows = []
    for i in range(max(len(ours), len(plain))):
        row = [i + 1]
        for r in (ours, plain):
            h = r[i] if i < len(r) else None
            row += (
                [f"{h.victim}->{h.winner}", h.seconds, "yes" if h.fair else f"no ({h.longest})"]
                if h
                else ["-", None, "-"]
            )
        rows.append(row)
    report.table(
        "Each hand-over (seconds from the holder's stop request to the next server ready)",
        ["#", f"{OURS}", "s", "longest?", f"{PLAIN}", "s", "longest?"],
        rows,
    )
    report.details["handovers"] = {
        label: [
            {
                "stopped": h.victim,
                "served": h.winner,
                "longest_waiting": h.longest,
                "seconds": round(h.seconds, 3),
                "pod_gone_to_bound_seconds": h.gone_to_bound,
                "pod_ready_to_hub_ready_seconds": h.ready_to_hub,
            }
            for h in r
        ]
        for label, r in results.items()
    }
    report.note(
        "readiness is polled from the hub's REST API every 0.1 s, so hub-level times are "
        "good to about 0.1 s; pod-level times come from a watch of the namespace"
    )
    report.note(
        "the two pod-level rows split the hand-over: the scheduler's part (stopped pod gone "
        "to next pod bound) and the hub's part (next pod Ready until the hub has noticed: "
        "KubeSpawner checks a starting pod with exponential back-off, 0.2 s doubling to 5 s, "
        "so a pod that has been Pending for long is noticed up to 5 s late)"
    )
    report.note(
        "GPUShareSpawner creates the pod only once admitted, so its hand-over includes "
        "creating, binding and starting the pod; plain KubeSpawner's pod already exists"
    )
    report.note(
        "the two spawners run one after the other on the same cluster and node, each with "
        "its own hub; the same seeded pauses separate the stops"
    )
