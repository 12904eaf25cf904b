"""Class day: one seeded day of a class on shared GPU slices, under three policies at once.

The same trace of students is replayed, time-scaled, on one local cluster under
three policies side by side, each with its own hub, its own namespace and its
own GPU node of ``--slices`` slices, so that all three live through the same
machine load:

- ``plain``: KubeSpawner asking for one ``nvidia.com/gpu``, and the idle
  culler at z2jh's defaults (``cull.timeout`` 3600 s, ``cull.every`` 600 s);
- ``queue``: GPUShareSpawner with our queue, and the same culler;
- ``reclaim``: the same, with reclaim on at its shipped idle time (20 min).

The trace model: a class's working day (``--minutes``, 8 hours), with every
draw from one seeded generator per student, so a student does the same under
every policy; only what the policy makes of it differs.

- Arrivals: ``--peak-share`` of the students arrive in the first
  ``--peak-within`` minutes (the morning lab session), the others uniformly
  over the day until an hour before its end.
- Work: each means to work ``--work-min`` to ``--work-max`` minutes in all
  (uniform), in bursts of active work (exponential, mean ``--burst``, at
  least 3 minutes).
- Pauses between bursts, with the server left running: a short one
  (exponential, mean ``--short-break``: reading, thinking, a chat) with
  probability ``--short-share``, else a long one, uniform between
  ``--long-break-min`` and ``--long-break-max`` (a lecture, lunch, another
  course). Long absences are not memoryless: someone away for 20 minutes is
  at a lecture or at lunch, not about to come back.
- Leaving: when done, ``--stop-share`` of them press Stop; the others leave
  their server running, idle.
- Waiting: a student who needs a server and has none (not started yet,
  culled, reclaimed, or their spawn failed) asks for one and waits; a failed
  spawn (plain: ``start_timeout``; ours: ``queue_timeout``) is retried a
  minute later; after ``--patience`` minutes of waiting for one server they
  give up and leave for the day.
- Activity: while working, their server reports activity to the hub every 5
  minutes (as jupyterhub-singleuser does, ``JUPYTERHUB_ACTIVITY_INTERVAL``),
  and once at the start of every burst (the proxy sees their requests);
  during pauses and after leaving, nothing.

Time scaling: one minute of class is ``--scale`` seconds. Every timing that is
part of the model is scaled by the same factor (``value_s / 60 * scale``): the
culler's timeout and interval, KubeSpawner's ``start_timeout`` (z2jh 300 s),
our ``queue_timeout`` (1800 s), reclaim's idle time (1200 s) and activity
refresh (30 s), the hub's ``last_activity_interval`` (z2jh 60 s) and the
activity reports (300 s). What is not part of the model runs at its real
speed: pod start-up and deletion, the hub's and the service's requests, the
service's 2-second loop; so these weigh ``60 / scale`` times more in class
minutes than they would in a real class (a stop that takes 2 s is a minute of
class at the default scale), for every policy alike.

Measured, per policy: the wait of every request for a server (until it is
ready; requests still open at the end count with the time waited so far),
mean and p95; students served at least once; slice-hours held by idle servers
(the student pausing or gone, by the trace) while someone waited; the servers
stopped by the culler or by reclaim, and how many of those were false (the
student came back within 5 minutes). One GPU pool per policy, so everyone who
waits could use every slice.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import re
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import httpx

from jupyterhub_gpushare.testing.nodes import create_gpu_node

from .common import (
    HubAPI,
    Report,
    core_api,
    create_namespace,
    local_cluster,
    log,
    percentile,
    running_hub,
)

NAME = "class_day"
POLICIES = ("plain", "queue", "reclaim")
LABELS = {
    "plain": "KubeSpawner + culler",
    "queue": "queue + culler",
    "reclaim": "queue + reclaim",
}
FALSE_RECLAIM_MINUTES = 5.0
IDLE_MINUTES = 20.0  # reclaim's shipped idle time
POLICY_LABEL = "gpushare.dev/class-policy"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--students", type=int, default=60, help="students in the class")
    parser.add_argument("--slices", type=int, default=8, help="GPU slices (one node per policy)")
    parser.add_argument("--minutes", type=float, default=480, help="length of the day")
    parser.add_argument("--scale", type=float, default=1.0, help="wall seconds per minute of class")
    parser.add_argument("--seed", type=int, default=14, help="seed of the trace")
    parser.add_argument("--peak-within", type=float, default=60, help="the morning session")
    parser.add_argument("--peak-share", type=float, default=0.4, help="share arriving then")
    parser.add_argument("--work-min", type=float, default=20, help="least work, minutes")
    parser.add_argument("--work-max", type=float, default=60, help="most work, minutes")
    parser.add_argument("--burst", type=float, default=10, help="mean active burst, minutes")
    parser.add_argument("--short-break", type=float, default=4, help="mean short pause")
    parser.add_argument("--long-break-min", type=float, default=30, help="shortest long pause")
    parser.add_argument("--long-break-max", type=float, default=90, help="longest long pause")
    parser.add_argument("--short-share", type=float, default=0.7, help="share of short pauses")
    parser.add_argument("--stop-share", type=float, default=0.6, help="share who press Stop")
    parser.add_argument("--patience", type=float, default=60, help="minutes before giving up")


# -- the trace -------------------------------------------------------------------------


@dataclass
class Plan:
    """What one student means to do, in minutes of class."""

    index: int
    arrival: float
    bursts: list[float]
    breaks: list[float]  # after each burst but the last
    stops: bool  # presses Stop when done (else leaves the server running)


def make_trace(args: argparse.Namespace) -> list[Plan]:
    plans = []
    for index in range(args.students):
        rng = random.Random(f"{args.seed}-{index}")
        if rng.random() < args.peak_share:
            arrival = rng.uniform(0, args.peak_within)
        else:
            arrival = rng.uniform(0, max(args.minutes - 60, args.peak_within))
        work = rng.uniform(args.work_min, args.work_max)
        bursts: list[float] = []
        while sum(bursts) < work:
            bursts.append(max(rng.expovariate(1 / args.burst), 3.0))
        bursts[-1] -= sum(bursts) - work
        bursts[-1] = max(bursts[-1], 1.0)
        breaks = [
            rng.expovariate(1 / args.short_break)
            if rng.random() < args.short_share
            else rng.uniform(args.long_break_min, args.long_break_max)
            for _ in bursts[:-1]
        ]
        plans.append(Plan(index, arrival, bursts, breaks, rng.random() < args.stop_share))
    return plans


# -- one policy, replayed ------------------------------------------------------------------


def scaled(seconds: float, scale: float) -> float:
    """A timing of the model, in wall seconds."""
    return seconds / 60 * scale


def hub_settings(policy: str, args: argparse.Namespace) -> tuple[str, str]:
    """The hub's configuration: before configure(c) (the culler, the service's
    settings, so that configure(c) sees and forwards them), and after it."""
    s = args.scale
    culler = [
        sys.executable,
        "-m",
        "jupyterhub_idle_culler",
        f"--timeout={max(round(scaled(3600, s)), 1)}",
        f"--cull-every={max(round(scaled(600, s)), 1)}",
    ]
    before = [
        "c.JupyterHub.services = list(c.JupyterHub.services) + [",
        f"    {{'name': 'jupyterhub-idle-culler', 'command': {culler!r}}}]",
        "c.JupyterHub.load_roles = list(c.JupyterHub.load_roles) + [",
        "    {'name': 'jupyterhub-idle-culler', 'services': ['jupyterhub-idle-culler'],",
        "     'scopes': ['list:users', 'read:users:activity', 'read:servers', 'delete:servers']}]",
    ]
    if policy == "reclaim":
        before += [
            "c.Reclaimer.enabled = True",
            f"c.Reclaimer.idle_seconds = {scaled(1200, s)}",
            f"c.Reclaimer.activity_refresh_seconds = {scaled(30, s)}",
        ]
    after = [
        # in-process stand-ins (no command): sixty servers per hub fit on two cores
        "c.KubeSpawner.cmd = None",
        "c.KubeSpawner.args = []",
        f"c.KubeSpawner.node_selector = {{{POLICY_LABEL!r}: {policy!r}}}",
        f"c.KubeSpawner.start_timeout = {max(round(scaled(300, s)), 5)}",
        f"c.JupyterHub.last_activity_interval = {max(round(scaled(60, s)), 1)}",
        # a hub that exits after five failed spawns in a row (plain KubeSpawner's
        # timeouts) would end the run: Kubernetes would restart it, we cannot
        "c.Spawner.consecutive_failure_limit = 0",
    ]
    if policy != "plain":
        after += [
            "c.GPUShareSpawner.memory_guard = False",
            f"c.GPUShareSpawner.queue_timeout = {scaled(1800, s)}",
        ]
    return "\n".join(before) + "\n", "\n".join(after) + "\n"


def iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class Student:
    plan: Plan
    name: str
    state: str = "away"  # away, waiting, working, pausing, gone
    served: bool = False
    stopping: bool = False  # pressed Stop: the server going away is no policy's doing
    break_ends: float | None = None
    asked: float | None = None  # when the open request for a server was made
    idle_since: float | None = None  # when they last stopped working
    up: bool = False  # their server has been ready since it last started


@dataclass
class Run:
    """One policy's replay: its hub, its students, what happened."""

    policy: str
    args: argparse.Namespace
    hub: object
    api: HubAPI
    started: float = 0.0
    students: list[Student] = field(default_factory=list)
    servers: dict[str, dict] = field(default_factory=dict)  # the hub's view, polled
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    waits: list[tuple[float, float | None]] = field(default_factory=list)  # minutes
    policy_stops: list[tuple[str, float]] = field(default_factory=list)  # who, when
    false_stops: int = 0
    idle_held_slice_minutes: float = 0.0
    long_idle_held_slice_minutes: float = 0.0  # by servers idle for 20 minutes or more
    worked_minutes: float = 0.0
    failed_spawns: int = 0
    ended: float = 0.0
    log_text: str = ""
    reclaims: list[dict] = field(default_factory=list)

    def now(self) -> float:
        """Minutes of class since the start."""
        return (time.monotonic() - self.started) / self.args.scale

    async def sleep_until(self, minute: float) -> None:
        delay = (minute - self.now()) * self.args.scale
        if delay > 0:
            await asyncio.sleep(delay)

    def ready(self, name: str) -> bool:
        server = self.servers.get(name)
        return bool(server and server.get("ready"))


async def poll(run: Run) -> None:
    """The hub's view of every server, twice a (scaled) minute; and the books kept on it."""
    interval = max(run.args.scale / 2, 0.25)
    last = run.now()
    while True:
        try:
            response = await run.api.http.get("/users", params={"state": "active", "limit": 1000})
            response.raise_for_status()
            servers = {
                u["name"]: u["servers"][""] for u in response.json() if "" in u.get("servers", {})
            }
        except (httpx.HTTPError, ValueError) as e:
            log(f"{run.policy}: polling the hub: {e!r}")
            await asyncio.sleep(interval)
            continue
        now = run.now()
        for student in run.students:
            server = servers.get(student.name)
            if server and server.get("ready"):
                student.up = True
            if student.up and server is None:
                # it ran, and is gone now (seen ready, then perhaps stopping, then gone)
                student.up = False
            else:
                continue
            if not student.stopping:
                # stopped, and not by its student: the culler or reclaim. False if
                # the student was at work, or comes back within 5 minutes
                run.policy_stops.append((student.name, now))
                if student.state == "working" or (
                    student.state == "pausing"
                    and student.break_ends is not None
                    and student.break_ends - now <= FALSE_RECLAIM_MINUTES
                ):
                    run.false_stops += 1
        run.servers = servers
        elapsed = now - last
        last = now
        waiting = any(s.state == "waiting" for s in run.students)
        if waiting:
            idle = [s for s in run.students if s.state in ("pausing", "gone") and run.ready(s.name)]
            run.idle_held_slice_minutes += len(idle) * elapsed
            long_idle = [s for s in idle if now - (s.idle_since or now) >= IDLE_MINUTES]
            run.long_idle_held_slice_minutes += len(long_idle) * elapsed
        run.changed.set()
        run.changed = asyncio.Event()
        await asyncio.sleep(interval)


async def changed(run: Run) -> None:
    await run.changed.wait()


async def get_server(run: Run, student: Student) -> bool:
    """Ask for a server until it is ready; False if the student gave up."""
    if run.ready(student.name):
        return True
    student.state = "waiting"
    student.stopping = False
    asked = student.asked = run.now()
    while True:
        status = await run.api.start(student.name)
        if status not in (201, 202, 400):  # 400: already pending
            log(f"{run.policy}: starting {student.name}: HTTP {status}")
        seen_pending = False
        while True:
            await changed(run)
            server = run.servers.get(student.name)
            if server and server.get("ready"):
                run.waits.append((asked, run.now()))
                student.served = True
                return True
            if server:
                seen_pending = True
            elif seen_pending or run.now() - asked > 5:
                break  # the spawn failed (start or queue timeout): the server is gone
        run.failed_spawns += 1
        if run.now() - asked >= run.args.patience:
            run.waits.append((asked, None))
            student.state = "gone"
            return False
        await asyncio.sleep(run.args.scale)  # try again a minute later


async def report_activity(run: Run, student: Student) -> None:
    now = iso(time.time())
    with contextlib.suppress(httpx.HTTPError):
        await run.api.http.post(
            f"/users/{student.name}/activity",
            json={"last_activity": now, "servers": {"": {"last_activity": now}}},
        )


async def work(run: Run, student: Student, minutes: float) -> bool:
    """Work for ``minutes``; False if the server went away meanwhile."""
    student.state = "working"
    end = run.now() + minutes
    start = run.now()
    while run.now() < end:
        if not run.ready(student.name):
            run.worked_minutes += run.now() - start
            return False
        await report_activity(run, student)
        await asyncio.sleep(min(5 * run.args.scale, max((end - run.now()) * run.args.scale, 0)))
    run.worked_minutes += run.now() - start
    return True


async def attend(run: Run, student: Student) -> None:
    plan = student.plan
    await run.sleep_until(plan.arrival)
    for i, burst in enumerate(plan.bursts):
        remaining = burst
        while remaining > 0:
            if not await get_server(run, student):
                return
            started = run.now()
            if await work(run, student, remaining):
                remaining = 0
            else:
                remaining -= run.now() - started
        if i == len(plan.bursts) - 1:
            break
        student.state = "pausing"
        student.idle_since = run.now()
        student.break_ends = run.now() + plan.breaks[i]
        await run.sleep_until(student.break_ends)
        student.break_ends = None
    student.idle_since = run.now()
    if plan.stops:
        student.stopping = True
        await run.api.stop(student.name)
    student.state = "gone"


async def replay(run: Run, start_together: Callable[[], Awaitable[None]]) -> None:
    await run.api.create_users([s.name for s in run.students])
    poller = asyncio.ensure_future(poll(run))
    await changed(run)
    await start_together()  # the three classes begin at the same moment
    run.started = time.monotonic()
    tasks = [asyncio.ensure_future(attend(run, s)) for s in run.students]
    try:
        await asyncio.sleep(run.args.minutes * run.args.scale)
    finally:
        end = run.now()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
        for student in run.students:
            if student.state == "waiting" and student.asked is not None:
                run.waits.append((student.asked, None))  # still waiting at the end
        run.ended = end


async def one_policy(cluster, core, policy: str, args, trace: list[Plan], start_together) -> Run:
    namespace = await create_namespace(core, f"class-{policy}")
    await create_gpu_node(
        core,
        f"gpu-{policy}",
        gpus=max(args.slices // 4, 1),
        replicas=4 if args.slices >= 4 else args.slices,
        labels={POLICY_LABEL: policy},
    )
    log(f"{policy}: starting the hub")
    before, after = hub_settings(policy, args)
    async with running_hub(
        cluster, namespace, plain=policy == "plain", extra=after, before_configure=before
    ) as hub:
        api = HubAPI(hub)
        run = Run(policy, args, hub, api)
        run.students = [Student(p, f"{policy[0]}{p.index:02d}") for p in trace]
        try:
            await replay(run, start_together)
        finally:
            log(f"{policy}: the class is over; stopping every server")
            run.log_text = hub.component.log_path.read_text(errors="replace")
            if policy == "reclaim":
                with contextlib.suppress(httpx.HTTPError):
                    run.reclaims = await _reclaims(hub, api)
            await stop_everything(api, [s.name for s in run.students])
            await api.close()
        return run


async def stop_everything(api: HubAPI, names: list[str], timeout: float = 120) -> None:
    """Stop every server, asking again for those the hub could not stop at once
    (a spawn waiting in line may refuse the first request)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [n for n in await api.servers() if n in names]
        if not left:
            return
        for start in range(0, len(left), 20):
            await asyncio.gather(*(api.stop(n) for n in left[start : start + 20]))
        await asyncio.sleep(2)
    log(f"{api.hub.url}: some servers did not stop in time")


async def _reclaims(hub, api: HubAPI) -> list[dict]:
    token = await api.admin_token()
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.get(
            f"{hub.url}/services/gpushare/api/reclaims",
            headers={"Authorization": f"token {token}"},
        )
    response.raise_for_status()
    return response.json()["reclaims"]


# -- the figures ------------------------------------------------------------------------


def figures(run: Run) -> dict:
    end = run.ended
    waits = [(b if b is not None else end) - a for a, b in run.waits]
    served = [b - a for a, b in run.waits if b is not None]
    culled = len(re.findall(r"Culling server \S+ \(inactive", run.log_text))
    stops = len(run.policy_stops)
    return {
        "requests": len(run.waits),
        "requests_served": len(served),
        "wait_mean_min": sum(waits) / len(waits) if waits else None,
        "wait_p95_min": percentile(waits, 95),
        "served_wait_mean_min": sum(served) / len(served) if served else None,
        "students_served": sum(1 for s in run.students if s.served),
        "idle_held_slice_hours": run.idle_held_slice_minutes / 60,
        "long_idle_held_slice_hours": run.long_idle_held_slice_minutes / 60,
        "policy_stops": stops,
        "culled": culled,
        "reclaimed": sum(1 for r in run.reclaims if r.get("outcome") in ("stopped", "stopping")),
        "false_stops": run.false_stops,
        "false_stop_share": run.false_stops / stops if stops else 0.0,
        "failed_spawns": run.failed_spawns,
        "work_done_hours": run.worked_minutes / 60,
    }


def run(args: argparse.Namespace) -> Report:
    trace = make_trace(args)
    planned = sum(sum(p.bursts) for p in trace)
    report = Report(
        NAME,
        f"Class day: {args.students} students on {args.slices} slices, {args.minutes:g} minutes "
        f"at {args.scale:g} s a minute, three policies side by side",
        {
            "students": args.students,
            "slices": args.slices,
            "minutes": args.minutes,
            "scale_s_per_min": args.scale,
            "seed": args.seed,
            "planned_work_slice_hours": round(planned / 60, 1),
            "capacity_slice_hours": round(args.slices * args.minutes / 60, 1),
        },
        other=LABELS["plain"],
        other_key="plain",
    )
    with local_cluster("class-day") as cluster:
        runs = asyncio.run(_measure(cluster, args, trace))
    results = {policy: figures(r) for policy, r in runs.items()}
    report.details = {"figures": results, "trace": [p.__dict__ for p in trace]}
    for key, value in results["reclaim"].items():
        report.figure(f"{key}.reclaim", value, "")
    rows = []
    for key, label, unit in (
        ("wait_mean_min", "mean wait (open requests counted so far)", "min"),
        ("wait_p95_min", "p95 wait", "min"),
        ("served_wait_mean_min", "mean wait of served requests", "min"),
        ("requests", "requests for a server", ""),
        ("requests_served", "requests served", ""),
        ("students_served", "students served", ""),
        ("idle_held_slice_hours", "slice-hours held idle while someone waited", "h"),
        ("long_idle_held_slice_hours", "  of those, by servers idle 20 min or more", "h"),
        ("work_done_hours", "hours of work done", "h"),
        ("failed_spawns", "spawns that failed (timeouts)", ""),
        ("policy_stops", "servers stopped by culler or reclaim", ""),
        ("culled", "  of those, by the culler", ""),
        ("reclaimed", "  of those, by reclaim", ""),
        ("false_stops", "false stops (back within 5 min)", ""),
    ):
        rows.append([label, unit, *(results[p][key] for p in POLICIES)])
        for policy in POLICIES:
            report.figure(f"{key}.{policy}", results[policy][key], unit)
    report.compare(
        "mean_wait",
        "mean wait",
        results["reclaim"]["wait_mean_min"],
        results["plain"]["wait_mean_min"],
        "min",
    )
    report.compare(
        "idle_held",
        "slice-hours held idle while someone waited",
        results["reclaim"]["idle_held_slice_hours"],
        results["plain"]["idle_held_slice_hours"],
        "h",
    )
    report.table(
        "All three policies (minutes and hours of class)",
        ["figure", "unit", *(LABELS[p] for p in POLICIES)],
        rows,
    )
    plain, ours = results["plain"], results["reclaim"]
    wait_ratio = _times(plain["wait_mean_min"], ours["wait_mean_min"])
    idle_ratio = _times(plain["idle_held_slice_hours"], ours["idle_held_slice_hours"])
    false_share = ours["false_stop_share"]
    report.figure("goal.wait_times_lower", wait_ratio, "x")
    report.figure("goal.idle_held_times_lower", idle_ratio, "x")
    report.figure("goal.false_reclaim_share", false_share, "")
    report.note(
        f"goal: mean wait at least 3x lower than plain KubeSpawner + culler: "
        f"{_fmt_times(wait_ratio)} lower, {'met' if wait_ratio and wait_ratio >= 3 else 'NOT met'}"
    )
    report.note(
        f"goal: idle-held slice-hours at least 5x lower: {_fmt_times(idle_ratio)} lower, "
        f"{'met' if idle_ratio and idle_ratio >= 5 else 'NOT met'}"
    )
    report.note(
        f"goal: false reclaims under 5%: {false_share:.1%} of the servers reclaim and the "
        f"culler stopped, {'met' if false_share < 0.05 else 'NOT met'}"
    )
    long_ratio = _times(plain["long_idle_held_slice_hours"], ours["long_idle_held_slice_hours"])
    report.figure("long_idle_held_times_lower", long_ratio, "x")
    report.note(
        "idle-held counts every minute a student pauses or has left with the server "
        "running while someone waits; reclaim, by design, lets a server idle for 20 minutes "
        f"first. Held by servers idle 20 minutes or more: {_fmt_times(long_ratio)} lower"
    )
    report.note(
        f"trace: {len(trace)} students mean {planned / 60:.1f} slice-hours of work on "
        f"{args.slices * args.minutes / 60:.1f} slice-hours of capacity; "
        "model and scaling in benchmarks/class_day.py's docstring"
    )
    return report


def _times(plain: float | None, ours: float | None) -> float | None:
    if plain is None or ours is None:
        return None
    if ours == 0:
        return math.inf if plain > 0 else None
    return plain / ours


def _fmt_times(value: float | None) -> str:
    if value is None:
        return "-"
    return "infinitely" if value == math.inf else f"{value:.1f}x"


async def _measure(cluster, args, trace: list[Plan]) -> dict[str, Run]:
    arrived = 0
    everyone = asyncio.Event()

    async def start_together() -> None:
        nonlocal arrived
        arrived += 1
        if arrived == len(POLICIES):
            log("every hub is up: the class begins")
            everyone.set()
        await everyone.wait()

    async with core_api(cluster) as core:
        runs = await asyncio.gather(
            *(one_policy(cluster, core, p, args, trace, start_together) for p in POLICIES)
        )
    return dict(zip(POLICIES, runs, strict=True))
