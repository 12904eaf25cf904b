"""What ``gpushare setup``, ``disable`` and ``status`` do, step by step.

``setup`` and ``disable`` share one path: find the ClusterPolicy, read, plan
(:mod:`.plan`), check that the device plugin runs where it must restart, ask,
wait until no GPU pod is Pending where it restarts, write (:mod:`.kube`, undone
if a write fails), restart the device plugin, and wait until every restarted
node advertises what its config gives. ``status`` reads and reports
(:mod:`.health`). Every message names the ClusterPolicy it used.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from . import report
from .cluster import (
    DEVICE_PLUGIN_SELECTOR,
    GPU_PRESENT_LABEL,
    GpuNode,
    active_policy,
    choose_policy,
    config_map_name,
    ignored_note,
    is_terminal,
    mismatches,
    pending_gpu_pods,
    plugin_pods_by_node,
    pod_gpu_requests,
    pod_ready,
    pod_state,
    policy_config,
    policy_name,
    selector_variants,
)
from .health import node_row, status_report, summary
from .kube import Kube, apply_plan, delete_plugin_pods
from .output import Failure, Output, Progress
from .plan import Access, Plan, read_access, write_access
from .pluginconfig import ConfigError

log = logging.getLogger("gpushare")

POLL_SECONDS = 0.5


@dataclass
class Options:
    namespace: str
    dry_run: bool = False
    yes: bool = False
    force: bool = False
    wait_pending: bool = False
    timeout: float = 300
    policy: str | None = None
    selector: str | None = None


Build = Callable[[dict, dict | None, list[GpuNode], set[str] | None], Plan]


async def find_policy(kube: Kube, wanted: str | None) -> tuple[dict, list[dict]]:
    """The ClusterPolicy to work on (the only one, or --policy), and all of them."""
    policies = await kube.policies()
    try:
        return choose_policy(policies, wanted), policies
    except ConfigError as e:
        raise Failure(str(e)) from None


def _naming(policy: str, message: str) -> str:
    return message if f"ClusterPolicy {policy}" in message else f"ClusterPolicy {policy}: {message}"


async def change(kube: Kube, out: Output, opts: Options, action: str, build: Build, title: str):
    """The common path of setup and disable; every failure names the ClusterPolicy."""
    await kube.require(read_access(opts.namespace))
    policy, policies = await find_policy(kube, opts.policy)
    name = policy_name(policy)
    try:
        return await _change(kube, out, opts, action, build, title, policy, policies)
    except Failure as e:
        raise Failure(_naming(name, str(e)), e.code) from None
    except ConfigError as e:
        raise Failure(_naming(name, str(e))) from None


async def _change(
    kube: Kube,
    out: Output,
    opts: Options,
    action: str,
    build: Build,
    title: str,
    policy: dict,
    policies: list[dict],
) -> dict:
    name = policy_name(policy)
    ignored = ignored_note(policy, policies)
    if ignored and action == "setup":
        active = policy_name(active_policy(policies))
        raise Failure(f"{ignored}, so changing it shares nothing: use --policy {active}")
    if ignored:
        out.warn(ignored)
    nodes = await kube.gpu_nodes()
    if not nodes:
        raise Failure(f"no GPU nodes (label {GPU_PRESENT_LABEL}=true) in this cluster")
    selected = None
    if opts.selector is not None:
        selected = set()
        for selector in selector_variants(opts.selector):
            selected |= {n.name for n in await kube.gpu_nodes(selector)}
    config_map = await kube.config_map(opts.namespace, config_map_name(policy, action))
    plan = build(policy, config_map, nodes, selected)
    result: dict[str, Any] = {
        "ok": True,
        "action": plan.action,
        "cluster_policy": name,
        "dry_run": opts.dry_run,
    }
    out.step(f"ClusterPolicy {name}, ConfigMap {opts.namespace}/{plan.config_map_name}")
    for note in plan.notes:
        out.item(note)
    for warning in plan.warnings:
        out.warn(warning)
    if not plan.changes_anything:
        out.ok(f"nothing to change: {title} is already in place (ClusterPolicy {name})")
        out.line()
        out.line(report.node_table(nodes, set(), None))
        figures = summary(nodes)
        out.line()
        out.lines(report.summary_lines(figures))
        return {**result, "changed": False, "plan": plan.to_json(), "summary": figures}

    await _check_plugin_pods(kube, plan, opts, out)
    out.step(f"{'plan' if opts.dry_run else 'changes'} for {title}:")
    for line in report.plan_lines(plan, full=opts.dry_run):
        if line.startswith("    "):
            out.line(line)  # a line of an object or patch
        else:
            out.item(line)
    for warning in _usage_warnings(plan, nodes, await kube.pods()):
        out.warn(warning)
    if opts.dry_run:
        pending = await _pending(kube, plan)
        if pending:
            out.warn(
                f"GPU pods are Pending ({', '.join(pending)}): a real run would refuse to "
                "restart the device plugin until they start or go (or with --wait, --force)"
            )
        out.ok("dry run: nothing was changed")
        return {**result, "changed": False, "plan": plan.to_json()}

    await kube.require(write_access(plan))
    _confirm(opts, out)
    # the last look for pending GPU pods comes right before the first write
    await _check_pending(kube, plan, opts, out)
    await apply_plan(kube, plan, policy, nodes)
    out.ok(f"configuration written (ClusterPolicy {name})")
    verified: set[str] = set()
    if plan.affected:
        restart = {c.name for c in plan.affected}
        deleted = await delete_plugin_pods(kube, opts.namespace, restart)
        out.step(f"restarted the device plugin on {', '.join(sorted(restart))}")
        nodes = await _wait_for_capacity(kube, plan, deleted, opts)
        verified = restart
        out.ok(f"capacity verified on {', '.join(sorted(verified))}")
    else:
        nodes = await kube.gpu_nodes()
    out.line()
    out.line(report.node_table(nodes, verified, plan))
    figures = summary(nodes)
    out.line()
    out.lines(report.summary_lines(figures))
    return {
        **result,
        "changed": True,
        "plan": plan.to_json(),
        "nodes": [{**node_row(n), "verified": n.name in verified} for n in nodes],
        "summary": figures,
    }


async def _check_plugin_pods(kube: Kube, plan: Plan, opts: Options, out: Output) -> None:
    """Every node we restart needs a device-plugin pod, or its capacity can never change."""
    by_node = plugin_pods_by_node(await kube.plugin_pods(opts.namespace))
    lacking = []
    for change in list(plan.nodes):
        if not change.affected or change.name in by_node:
            continue
        if change.before == change.after and not change.problems and not change.key_changed:
            # only the operator's rollout would touch it, and it has no plugin to roll
            change.policy_changed = False
            continue
        lacking.append(change.name)
    if lacking:
        message = (
            f"no device-plugin pod ({DEVICE_PLUGIN_SELECTOR}) in namespace {opts.namespace} "
            f"on {', '.join(lacking)}: is the GPU operator's device plugin running there?"
        )
        if not (opts.force or opts.dry_run):
            raise Failure(message + " (--force goes ahead anyway)")
        out.warn(message)


async def _pending(kube: Kube, plan: Plan) -> list[str]:
    """Pending GPU pods the scheduler could place on a node whose plugin restarts."""
    affected = {c.name for c in plan.affected}
    if not affected:
        return []
    nodes = {n.name: n.labels for n in await kube.gpu_nodes() if n.name in affected}
    return pending_gpu_pods(await kube.pods(field_selector="status.phase=Pending"), nodes)


async def _check_pending(kube: Kube, plan: Plan, opts: Options, out: Output) -> None:
    """Refuse (or wait) while GPU pods wait to be admitted where the plugin restarts."""
    started = time.monotonic()
    progress = Progress()
    try:
        while True:
            pending = await _pending(kube, plan)
            if not pending:
                return
            names = ", ".join(pending)
            if opts.force:
                out.warn(
                    f"going ahead although GPU pods are Pending ({names}): if the scheduler "
                    "places one while the device plugin restarts, it fails with "
                    "UnexpectedAdmissionError and must be recreated"
                )
                return
            elapsed = time.monotonic() - started
            if not opts.wait_pending or elapsed > opts.timeout:
                waited = f" after waiting {elapsed:.0f}s" if opts.wait_pending else ""
                raise Failure(
                    f"refusing to restart the device plugin{waited}: GPU pods are Pending "
                    f"({names}) and would fail for good with UnexpectedAdmissionError if "
                    "admitted during the restart; let them start, delete them, use --wait, "
                    "or use --force"
                )
            progress.update(f"waiting for Pending GPU pods: {names}", elapsed, opts.timeout)
            await asyncio.sleep(POLL_SECONDS)
    finally:
        progress.close()


def _confirm(opts: Options, out: Output) -> None:
    if opts.yes:
        return
    if not sys.stdin.isatty():
        raise Failure("nothing changed: pass --yes to apply without a terminal to confirm on")
    if out.as_json or not click.confirm("Apply these changes?", default=False, err=True):
        raise Failure("nothing changed: not confirmed")


async def _wait_for_capacity(
    kube: Kube, plan: Plan, deleted: set[str], opts: Options
) -> list[GpuNode]:
    """Wait until each restarted node runs a new plugin and shows what the plan expects."""
    targets = {c.name: c.after for c in plan.affected}
    started = time.monotonic()
    progress = Progress()
    try:
        while True:
            nodes = await kube.gpu_nodes()
            by_name = {n.name: n for n in nodes}
            plugin_pods = plugin_pods_by_node(await kube.plugin_pods(opts.namespace))
            waiting = {}
            for name, sharing in sorted(targets.items()):
                node = by_name.get(name)
                if node is None:
                    waiting[name] = "the node is gone"
                    continue
                fresh = [
                    p for p in plugin_pods.get(name, []) if p["metadata"]["uid"] not in deleted
                ]
                if not fresh:
                    waiting[name] = "device plugin restarting"
                elif not any(pod_ready(p) for p in fresh):
                    state = pod_state(fresh[0])
                    waiting[name] = (
                        "device plugin starting"
                        if state in ("Pending", "Running")
                        else f"device plugin {state}"
                    )
                else:
                    problems = mismatches(node, sharing)
                    if problems:
                        waiting[name] = "; ".join(problems)
            elapsed = time.monotonic() - started
            if not waiting:
                return nodes
            if elapsed > opts.timeout:
                details = "; ".join(f"{n}: {why}" for n, why in waiting.items())
                raise Failure(
                    f"timed out after {opts.timeout:.0f}s waiting for the new capacity "
                    f"({details}). The config is written: check kubectl -n {opts.namespace} "
                    f"get pods -l {DEVICE_PLUGIN_SELECTOR} and gpushare status, then run the "
                    "command again, or gpushare disable to undo"
                )
            done = len(targets) - len(waiting)
            first = next(iter(waiting.items()))
            progress.update(
                f"{done}/{len(targets)} nodes ready; {first[0]}: {first[1]}",
                elapsed,
                opts.timeout,
            )
            await asyncio.sleep(POLL_SECONDS)
    finally:
        progress.close()


def _usage_warnings(plan: Plan, nodes: list[GpuNode], pods: list[dict]) -> list[str]:
    """Nodes that will have fewer slices than are in use (running pods keep running)."""
    warnings = []
    by_name = {n.name: n for n in nodes}
    for change in plan.affected:
        node = by_name.get(change.name)
        if node is None or node.gpus is None:
            continue
        capacity = node.gpus * change.after.replicas
        used = sum(
            pod_gpu_requests(p).get(change.after.resource, 0)
            for p in pods
            if (p.get("spec") or {}).get("nodeName") == node.name and not is_terminal(p)
        )
        if used > capacity:
            warnings.append(
                f"node {node.name} will have {capacity} slices but {used} are in use: running "
                "pods keep running, new ones wait until enough are free"
            )
    return warnings


# -- status -------------------------------------------------------------------------------
async def status(kube: Kube, opts: Options) -> dict:
    """Slices per node, holders, waiters, and the health of the set-up."""
    await kube.require([Access("list", "nodes"), Access("list", "pods")])
    notes = []
    try:
        policies = await kube.policies()
    except Failure as e:
        # status works with the plain device plugin too, or without the right to read it
        log.info("no ClusterPolicy: %s", e)
        policies = []
        notes.append(f"cannot list ClusterPolicies: {e}")
    policy = None
    if opts.policy is not None:
        try:
            policy = choose_policy(policies, opts.policy)
        except ConfigError as e:
            raise Failure(str(e)) from None
    elif len(policies) == 1:
        policy = policies[0]
    elif policies:
        policy = active_policy(policies)
        notes.append(
            f"{len(policies)} ClusterPolicies; showing {policy_name(policy)}, the one the GPU "
            "operator uses (--policy picks another)"
        )
    config_map, readable = None, True
    if policy is not None and policy_config(policy).get("name"):
        try:
            config_map = await kube.config_map(opts.namespace, policy_config(policy)["name"])
        except Failure as e:
            readable = False
            notes.append(f"cannot read the ClusterPolicy's ConfigMap: {e}")
    try:
        plugin_pods = await kube.plugin_pods(opts.namespace)
    except Failure as e:
        plugin_pods = None
        notes.append(f"cannot list device-plugin pods: {e}")
    nodes = await kube.gpu_nodes()
    pods = await kube.pods(field_selector="status.phase!=Succeeded,status.phase!=Failed")
    result = status_report(
        nodes,
        pods,
        policy if readable else None,
        policies,
        config_map,
        plugin_pods,
        opts.namespace,
    )
    if not readable and policy is not None:
        result["cluster_policy"] = {"name": policy_name(policy), "config": policy_config(policy)}
        result["cluster_policy"]["set_up_by_gpushare"] = False
    result["notes"] = notes + result["notes"]
    return result


def print_status(out: Output, result: dict) -> None:
    out.item(report.policy_line(result))
    for note in result["notes"]:
        out.item(note)
    if not result["nodes"]:
        out.warn(f"no GPU nodes (label {GPU_PRESENT_LABEL}=true)")
    out.line()
    out.line(report.status_table(result))
    holders = [(r["node"], p) for r in result["nodes"] for p in r["pods"]]
    if holders:
        out.line()
        out.line("Pods holding slices:")
        for node, pod in holders:
            out.item(f"{pod} on {node}")
    if result["pending"]:
        out.line()
        out.line("Pending GPU pods:")
        for pod in result["pending"]:
            asks = ", ".join(f"{v} {k}" for k, v in pod["requests"].items())
            why = "lack of slices" if pod["lack_of_slices"] else pod["reason"]
            out.item(f"{pod['pod']} wants {asks}: {why}")
    out.line()
    out.lines(report.summary_lines(result["summary"]))
    out.line(
        f"  {'Slices in use:':<22}{result['summary']['used_slices']}"
        f" ({result['summary']['free_slices']} free)"
    )
    out.line()
    if result["health"]:
        out.line("Problems:")
        for finding in result["health"]:
            out.problem(finding["problem"], finding["fix"])
    else:
        out.ok("no problems found: every config resolves and every node shows what it selects")
