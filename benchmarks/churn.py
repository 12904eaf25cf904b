"""Churn: what a pod event costs the service core on a big, busy cluster, beside
the full-recompute core it replaced, in one run.

1,000 GPU nodes x 8 slices, 8,000 GPU pods holding every slice, 200 users
waiting for any GPU (each followed, as the hub follows its spawns), and pod
events arriving open-loop at 50/s and at 200/s. Most events are pod updates
that change nothing capacity depends on (status details), as in a real
cluster; a tenth are releases: a pod ends, the head of the line is admitted
onto its node, the admitted spawn's pod appears there (an event too), and a
new user joins the back of the line, so 200 always wait.

Each core runs in a fresh process of its own, driven the same way with the same
seeded events: the service's core (``Dispatcher``: incremental cluster view,
one global order) and ``baseline_recompute.FullRecompute`` (the core of
2026-11-29). No API server is involved: the watchers' objects are handed to
the core directly, which is what the watchers do.

Per event: the time from its arrival until the core has dealt with it (the
update, admission and every follower's status queued); per release: the time
until every waiting user's follower has received a status after it; event-loop
lag (a 5 ms ticker's lateness); process CPU seconds per event over the whole
phase; resident memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import Report, log, percentile

GPU = "nvidia.com/gpu"
RESOURCES = (GPU, "nvidia.com/gpu.shared")
PRODUCTS = ("NVIDIA-GeForce-RTX-5090-SHARED", "NVIDIA-H200-SHARED")
CORES = {"incremental": "the service's core", "full-recompute": "the core it replaced"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--slices", type=int, default=8, help="slices per node")
    parser.add_argument("--waiting", type=int, default=200)
    parser.add_argument("--rates", default="50,200", help="pod events per second, comma-separated")
    parser.add_argument("--events", type=int, default=2000, help="events per core and rate")
    parser.add_argument("--release-share", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=120,
        help="a phase stops after this long even if not all events were sent (a core "
        "that cannot keep up shows as a lower rate achieved)",
    )


def run(args: argparse.Namespace) -> Report:
    rates = [int(r) for r in str(args.rates).split(",")]
    report = Report(
        name="churn",
        title="Churn: one pod event's cost on 1,000 nodes, incremental core vs full recompute",
        parameters={
            "nodes": args.nodes,
            "slices_per_node": args.slices,
            "pods": args.nodes * args.slices,
            "waiting": args.waiting,
            "rates_per_second": rates,
            "events_per_phase": args.events,
            "release_share": args.release_share,
            "seed": args.seed,
        },
        other="full-recompute core (2026-11-29)",
        other_key="full_recompute",
        ours="incremental core",
    )
    results: dict[tuple[str, int], dict] = {}
    for rate in rates:
        for core in CORES:
            log(f"churn: {core} at {rate} events/s")
            results[(core, rate)] = _run_worker(core, rate, args)
    for rate in rates:
        ours, old = results[("incremental", rate)], results[("full-recompute", rate)]
        n = ours["events"]
        for key, label in (
            ("update_ms", "event dealt with"),
            ("all_followers_ms", "every waiting user has the new status"),
            ("lag_ms", "event-loop lag"),
        ):
            for q in ("p50", "p99", "max"):
                report.compare(
                    f"{key}.{q}.at_{rate}",
                    f"{label}, {q} @ {rate}/s",
                    ours[key][q],
                    old[key][q],
                    "ms",
                )
        report.compare(
            f"cpu_per_event.at_{rate}",
            f"CPU per event @ {rate}/s",
            ours["cpu_ms_per_event"],
            old["cpu_ms_per_event"],
            "ms",
        )
        report.compare(
            f"achieved_rate.at_{rate}",
            f"events dealt with per second @ {rate}/s",
            ours["achieved_rate"],
            old["achieved_rate"],
            "1/s",
        )
        report.compare(
            f"missed.at_{rate}",
            f"waiting users never shown a release @ {rate}/s",
            ours["missed"],
            old["missed"],
            "updates",
        )
        report.compare(
            f"rss.at_{rate}", f"resident memory @ {rate}/s", ours["rss_mib"], old["rss_mib"], "MiB"
        )
        report.table(
            f"samples @ {rate}/s",
            ["core", "events", "releases", "follower updates", "lag samples"],
            [
                [core, r["events"], r["releases"], r["follower_updates"], r["lag_samples"]]
                for core, r in ((c, results[(c, rate)]) for c in CORES)
            ],
        )
        report.figure(f"events.at_{rate}", n, "events")
    report.note(
        "goal (issue 12): p99 under 2 ms per event and event-loop lag p99 under 20 ms at "
        "200 events/s, nothing missed"
    )
    report.details = {f"{core}@{rate}": r for (core, rate), r in results.items()}
    return report


def _run_worker(core: str, rate: int, args: argparse.Namespace) -> dict:
    spec = {
        "core": core,
        "rate": rate,
        "nodes": args.nodes,
        "slices": args.slices,
        "waiting": args.waiting,
        "events": args.events,
        "release_share": args.release_share,
        "seed": args.seed,
        "max_seconds": args.max_seconds,
    }
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.churn", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"churn worker failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- the worker: one core, one rate, in a process of its own ------------------------


def _cluster(spec: dict) -> tuple[dict[str, dict], dict[str, dict]]:
    nodes, pods = {}, {}
    for i in range(spec["nodes"]):
        name = f"node-{i:04d}"
        nodes[name] = {
            "metadata": {
                "name": name,
                "labels": {"nvidia.com/gpu.product": PRODUCTS[i % 2], "zone": f"z{i % 4}"},
            },
            "spec": {"unschedulable": False},
            "status": {
                "allocatable": {GPU: str(spec["slices"])},
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }
        for j in range(spec["slices"]):
            key = f"jobs/job-{i:04d}-{j}"
            pods[key] = _pod(key, name)
    return nodes, pods


def _pod(key: str, node: str, ticket: str | None = None, phase: str = "Running") -> dict:
    namespace, name = key.split("/")
    annotations = {"gpushare.jupyter.org/ticket": ticket} if ticket else {}
    return {
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
        "spec": {"nodeName": node, "containers": [{"resources": {"limits": {GPU: "1"}}}]},
        "status": {"phase": phase, "startTime": "2026-12-01T00:00:00Z"},
    }


def _make_core(kind: str, state_dir: str):
    if kind == "incremental":
        from traitlets.config import Config

        from jupyterhub_gpushare.service.dispatcher import Dispatcher

        config = Config({"QueueStore": {"state_file": os.path.join(state_dir, "queue.json")}})
        core = Dispatcher(api=None, config=config)
        core.log.setLevel(logging.WARNING)
        core.nodes.synced.set()
        core.pods.synced.set()
        return core
    from .baseline_recompute import FullRecompute

    return FullRecompute(RESOURCES, os.path.join(state_dir, "queue.json"))


def _rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def _done(core) -> float | None:
    """Now, if the core has dealt with the event it was just handed; None if that
    takes a cycle still to come (then the cycle's end counts)."""
    pending = getattr(core, "_cycle_scheduled", False) or getattr(core, "_pending", False)
    return None if pending else time.perf_counter()


def _admitted(core) -> list[tuple[str, str]]:
    """(ticket, node) of every admitted spawn, whatever the core."""
    return [(t.id, t.node) for t in core.queue.tickets.values() if t.state == "admitted"]


async def _drive(spec: dict) -> dict:
    from jupyterhub_gpushare.capacity import PoolSpec
    from jupyterhub_gpushare.fairqueue import Ticket
    from jupyterhub_gpushare.tickets import TicketRequest

    rng = random.Random(spec["seed"])
    state_dir = tempfile.mkdtemp(prefix="gpushare-churn-")
    core = _make_core(spec["core"], state_dir)
    nodes, pods = _cluster(spec)
    core.replace("nodes", nodes)
    core.replace("pods", pods)
    await asyncio.sleep(0)

    received: dict[str, list[float]] = {}
    consumers: list[asyncio.Task] = []
    serial = 0

    async def consume(ticket: str) -> None:
        """A follower, as the hub's event stream is one: note when each status arrives."""
        times = received.setdefault(ticket, [])
        if spec["core"] == "incremental":
            async for status in core.statuses(ticket, keepalive=3600):
                if status is not None:
                    times.append(time.perf_counter())
        else:  # the old core pushed every status into a queue per follower
            follower = core.follow(ticket)
            while True:
                await follower.get()
                times.append(time.perf_counter())

    waiting: set[str] = set()  # the driver's own record of who waits

    def join(setup: bool = False) -> str:
        nonlocal serial
        serial += 1
        ticket = f"t{serial:06d}"
        waiting.add(ticket)
        request = TicketRequest(
            id=ticket,
            user=f"user{serial}",
            server="",
            slices=1,
            pool=PoolSpec(GPU),
            requested_at=time.time(),
        )
        if setup and spec["core"] != "incremental":
            # the old core recomputed everything on every join: the line it starts
            # with is filled in one go (not measured either way)
            core.queue.join(Ticket.from_request(request))
        else:
            core.join(request)
        consumers.append(asyncio.ensure_future(consume(ticket)))
        return ticket

    for _ in range(spec["waiting"]):
        join(setup=True)
    if spec["core"] != "incremental":
        core.cycle()
    await asyncio.sleep(0.5)  # first statuses delivered
    await asyncio.sleep(0)

    # time every cycle: an event is dealt with when the cycle after it ends
    cycle_ends: list[float] = []
    original_cycle = core.cycle

    def timed_cycle() -> None:
        original_cycle()
        cycle_ends.append(time.perf_counter())

    core.cycle = timed_cycle

    lags: list[float] = []
    stop_ticker = asyncio.Event()

    async def ticker() -> None:
        period = 0.005
        expected = time.perf_counter() + period
        while not stop_ticker.is_set():
            await asyncio.sleep(max(expected - time.perf_counter(), 0))
            now = time.perf_counter()
            lags.append(max(now - expected, 0))
            expected = max(expected + period, now)

    ticker_task = asyncio.ensure_future(ticker())
    for times in received.values():
        times.clear()  # count updates of the measured phase only
    interval = 1 / spec["rate"]
    keys = list(pods)
    arrivals: list[float] = []
    done_at_once: list[float | None] = []  # for events that needed no cycle
    releases: list[tuple[float, set[str]]] = []
    podded: set[str] = set()
    cpu_before = time.process_time()
    started = time.perf_counter()
    due = started
    pending_pods: list[tuple[str, str]] = []
    for _ in range(spec["events"]):
        if time.perf_counter() - started > spec["max_seconds"]:
            break
        due += interval
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            await asyncio.sleep(0)
        arrivals.append(time.perf_counter())
        if pending_pods:
            # the admitted spawn's pod appears on its node
            ticket, node = pending_pods.pop(0)
            key = f"users/jupyter-{ticket}"
            pods[key] = _pod(key, node, ticket=ticket)
            keys.append(key)
            core.apply("pods", key, pods[key])
            done_at_once.append(_done(core))
        elif rng.random() < spec["release_share"]:
            key = keys.pop(rng.randrange(len(keys)))
            del pods[key]
            releases.append((arrivals[-1], set(waiting)))
            core.apply("pods", key, None)
            done_at_once.append(_done(core))
            await asyncio.sleep(0)  # the cycle runs: someone is admitted
            for ticket, node in _admitted(core):
                if ticket not in podded and node:
                    podded.add(ticket)
                    waiting.discard(ticket)
                    pending_pods.append((ticket, node))
                    join()  # a new user joins the back of the line
        else:
            key = keys[rng.randrange(len(keys))]
            # a status update that changes nothing capacity depends on
            core.apply("pods", key, dict(pods[key]))
            done_at_once.append(_done(core))
    await asyncio.sleep(0.5)
    elapsed_until = max(cycle_ends[-1], arrivals[-1]) if cycle_ends else arrivals[-1]
    cpu = time.process_time() - cpu_before
    stop_ticker.set()
    await ticker_task

    update = []
    j = 0
    for t, done in zip(arrivals, done_at_once, strict=True):
        if done is not None:
            update.append(done - t)
            continue
        while j < len(cycle_ends) and cycle_ends[j] < t:
            j += 1
        if j < len(cycle_ends):
            update.append(cycle_ends[j] - t)
    all_followers, missed = [], 0
    for t, waiting_now in releases:
        worst = 0.0
        for ticket in waiting_now:
            after = next((r for r in received.get(ticket, ()) if r >= t), None)
            if after is None:
                missed += 1
            else:
                worst = max(worst, after - t)
        all_followers.append(worst)
    for task in consumers:
        task.cancel()

    def quantiles(values: list[float]) -> dict:
        ms = [v * 1000 for v in values]
        return {
            "p50": percentile(ms, 50),
            "p99": percentile(ms, 99),
            "max": max(ms) if ms else None,
            "n": len(ms),
        }

    return {
        "core": spec["core"],
        "rate": spec["rate"],
        "events": len(arrivals),
        "releases": len(releases),
        "follower_updates": sum(len(v) for v in received.values()),
        "lag_samples": len(lags),
        "update_ms": quantiles(update),
        "all_followers_ms": quantiles(all_followers),
        "lag_ms": quantiles(lags),
        "missed": missed,
        "cpu_ms_per_event": 1000 * cpu / len(arrivals),
        "achieved_rate": len(arrivals) / (elapsed_until - started),
        "rss_mib": _rss_mib(),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(_drive(json.loads(sys.argv[1])))))
