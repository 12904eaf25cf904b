"""Fairness: where one strict order differs from what the scheduler does, and what it costs.

A seeded class day replayed in simulated time on several GPU nodes, with
1- and 2-slice requests mixed, under two policies on the same trace:

- ours: the service's real queue code (``ClusterView`` + ``FairQueue``): one
  request order; a request that does not fit blocks those behind it that need
  the same slices; admission books the fullest node with room (best fit);
- the scheduler: what kube-scheduler does with Pending pods (plain
  KubeSpawner): it retries them oldest first and binds any that fits, so a
  1-slice pod overtakes a 2-slice pod that waits for two slices on one node;
  it places a pod on the node with the most free slices (its default scoring
  spreads).

Reported: waits by request size (mean, p95, with the number of requests),
overtakes (a later request started first although an earlier one, still
waiting, could have used its slices), and the price of strict order:
slice-seconds left free while someone waited.

No cluster is involved: this isolates the policies from everything else
(both take effect at once in the simulation; timing is the other benchmarks').
"""

from __future__ import annotations

import argparse
import heapq
import random
from dataclasses import dataclass

from jupyterhub_gpushare.capacity import PoolSpec
from jupyterhub_gpushare.clusterview import ClusterView
from jupyterhub_gpushare.fairqueue import FairQueue, UserLimits
from jupyterhub_gpushare.tickets import TicketRequest

from .common import Report, percentile

GPU = "nvidia.com/gpu"
POOL = PoolSpec(GPU)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--slices", type=int, default=8, help="slices per node")
    parser.add_argument("--hours", type=float, default=8, help="simulated length of the day")
    parser.add_argument(
        "--arrivals-per-hour",
        type=float,
        default=30,
        help="with the defaults, about 90 %% of the slices are asked for on average",
    )
    parser.add_argument("--two-slice-share", type=float, default=0.3)
    parser.add_argument("--mean-session-minutes", type=float, default=45)
    parser.add_argument("--seeds", type=int, default=20, help="days simulated (one seed each)")


@dataclass
class Request:
    id: str
    arrival: float
    slices: int
    duration: float
    started: float | None = None
    node: str | None = None


def trace(args: argparse.Namespace, seed: int) -> list[Request]:
    """Poisson arrivals over the day; sessions of exponential length."""
    rng = random.Random(seed)
    requests, t, i = [], 0.0, 0
    end = args.hours * 3600
    while True:
        t += rng.expovariate(args.arrivals_per_hour / 3600)
        if t >= end:
            return requests
        slices = 2 if rng.random() < args.two_slice_share else 1
        duration = rng.expovariate(1 / (args.mean_session_minutes * 60))
        requests.append(Request(f"r{i:05d}", t, slices, duration))
        i += 1


class Simulation:
    """Events in simulated time; ``admit`` is the policy under test."""

    def __init__(self, args: argparse.Namespace, requests: list[Request]) -> None:
        self.nodes = {f"node-{n}": args.slices for n in range(args.nodes)}
        self.used = dict.fromkeys(self.nodes, 0)
        self.requests = requests
        self.waiting: list[Request] = []
        self.idle_while_waiting = 0.0  # slice-seconds
        self.now = 0.0

    def free(self) -> int:
        return sum(total - self.used[n] for n, total in self.nodes.items())

    def run(self) -> None:
        events = [(r.arrival, 1, r.id, r) for r in self.requests]
        heapq.heapify(events)
        while events:
            when, kind, _, request = heapq.heappop(events)
            if self.waiting:
                self.idle_while_waiting += self.free() * (when - self.now)
            self.now = when
            if kind == 0:  # a session ends
                self.release(request)
            else:
                self.arrive(request)
            for started in self.admit():
                started.started = self.now
                heapq.heappush(events, (self.now + started.duration, 0, started.id, started))

    def arrive(self, request: Request) -> None:
        self.waiting.append(request)

    def release(self, request: Request) -> None:
        self.used[request.node] -= request.slices

    def start(self, request: Request, node: str) -> None:
        request.node = node
        self.used[node] += request.slices
        self.waiting.remove(request)

    def admit(self) -> list[Request]:
        raise NotImplementedError


class Scheduler(Simulation):
    """Oldest first, any pod that fits is bound; the node with most room."""

    def admit(self) -> list[Request]:
        started = []
        for request in sorted(self.waiting, key=lambda r: r.arrival):
            room = {n: total - self.used[n] for n, total in self.nodes.items()}
            fits = [n for n, free in room.items() if free >= request.slices]
            if fits:
                self.start(request, max(fits, key=lambda n: (room[n], n)))
                started.append(request)
        return started


class StrictOrder(Simulation):
    """The service's queue: its real code decides who starts where."""

    def __init__(self, args: argparse.Namespace, requests: list[Request]) -> None:
        super().__init__(args, requests)
        self.view = ClusterView([GPU])
        for name, total in self.nodes.items():
            self.view.apply_node(name, _node(name, total))
        self.queue = FairQueue(self.view, limits=UserLimits(gpu_servers=0))
        self.by_id = {r.id: r for r in requests}

    def arrive(self, request: Request) -> None:
        super().arrive(request)
        self.queue.join(
            TicketRequest(request.id, request.id, "", request.slices, POOL, request.arrival),
            self.now,
        )

    def release(self, request: Request) -> None:
        super().release(request)
        self.view.apply_pod(f"users/{request.id}", None)

    def admit(self) -> list[Request]:
        started = []
        for ticket in self.queue.admit(self.now):
            request = self.by_id[ticket.id]
            self.start(request, ticket.node)
            # its pod is bound on the booked node: the booking settles
            self.view.apply_pod(f"users/{request.id}", _pod(request, ticket.node))
            self.queue.settle([ticket.id], self.now)
            started.append(request)
        return started


def _node(name: str, slices: int) -> dict:
    return {
        "metadata": {"name": name, "labels": {}},
        "spec": {},
        "status": {
            "allocatable": {GPU: str(slices)},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def _pod(request: Request, node: str) -> dict:
    return {
        "metadata": {
            "name": request.id,
            "namespace": "users",
            "annotations": {"gpushare.jupyter.org/ticket": request.id},
        },
        "spec": {
            "nodeName": node,
            "containers": [{"resources": {"limits": {GPU: str(request.slices)}}}],
        },
        "status": {"phase": "Running"},
    }


def overtakes(requests: list[Request]) -> int:
    """Pairs where a later request started while an earlier one still waited."""
    started = sorted((r for r in requests if r.started is not None), key=lambda r: r.arrival)
    count = 0
    for i, early in enumerate(started):
        for late in started[i + 1 :]:
            if late.arrival >= early.started:
                break  # arrived after the early one started: no overtake possible
            if late.started < early.started:
                count += 1
    return count


def run(args: argparse.Namespace) -> Report:
    report = Report(
        name="fairness",
        title="Fairness: one strict order against the scheduler's backfilling, same class days",
        parameters={
            "nodes": args.nodes,
            "slices_per_node": args.slices,
            "hours": args.hours,
            "arrivals_per_hour": args.arrivals_per_hour,
            "two_slice_share": args.two_slice_share,
            "mean_session_minutes": args.mean_session_minutes,
            "days": args.seeds,
        },
        other="kube-scheduler's backfilling (plain KubeSpawner)",
        other_key="scheduler",
        ours="one strict order (our queue)",
    )
    results: dict[str, dict[str, list[float]]] = {"ours": {}, "scheduler": {}}
    per_day = {"ours": [], "scheduler": []}
    for seed in range(args.seeds):
        for name, policy in (("ours", StrictOrder), ("scheduler", Scheduler)):
            requests = trace(args, seed)
            sim = policy(args, requests)
            sim.run()
            bucket = results[name]
            for r in requests:
                if r.started is not None:
                    bucket.setdefault(f"wait_{r.slices}", []).append(r.started - r.arrival)
            per_day[name].append(
                {
                    "seed": seed,
                    "requests": len(requests),
                    "overtakes": overtakes(requests),
                    "idle_slice_hours_while_waiting": sim.idle_while_waiting / 3600,
                }
            )
    for size in (1, 2):
        key = f"wait_{size}"
        ours, plain = results["ours"].get(key, []), results["scheduler"].get(key, [])
        n = f"n = {len(ours)} / {len(plain)}"
        report.compare(
            f"{key}_mean", f"wait, {size}-slice requests, mean ({n})",
            _minutes(sum(ours) / len(ours)), _minutes(sum(plain) / len(plain)), "min",
        )  # fmt: skip
        report.compare(
            f"{key}_p95", f"wait, {size}-slice requests, p95 ({n})",
            _minutes(percentile(ours, 95)), _minutes(percentile(plain, 95)), "min",
        )  # fmt: skip

    def total(name: str, key: str) -> float:
        return sum(day[key] for day in per_day[name])

    report.compare(
        "overtakes",
        f"overtakes, all {args.seeds} days",
        total("ours", "overtakes"),
        total("scheduler", "overtakes"),
        "pairs",
    )
    report.compare(
        "idle_slice_hours_while_waiting",
        f"slice-hours free while someone waited, per day (mean of {args.seeds})",
        total("ours", "idle_slice_hours_while_waiting") / args.seeds,
        total("scheduler", "idle_slice_hours_while_waiting") / args.seeds,
        "slice-h",
    )
    capacity = args.nodes * args.slices * args.hours
    report.single(
        "strict_order_cost_share",
        "price of strict order: extra free slice-hours while someone waited, of all",
        (
            total("ours", "idle_slice_hours_while_waiting")
            - total("scheduler", "idle_slice_hours_while_waiting")
        )
        / (capacity * args.seeds),
        "share",
    )
    report.details["days"] = per_day
    report.note(
        "an overtake: a later request started while an earlier one still waited; every "
        "request is served in the end (the simulation runs until the line is empty)"
    )
    report.note(
        "free slice-hours while someone waited: slices nobody held at moments when a "
        "request waited (under strict order, slices kept for a 2-slice request at the head)"
    )
    return report


def _minutes(seconds: float | None) -> float | None:
    return None if seconds is None else seconds / 60
