"""What ``gpushare status`` reports: slices per node, who holds them, who waits, and
what is wrong with the set-up, each problem with the command that fixes it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .cluster import (
    CLUSTER_POLICY_RESOURCE,
    DEVICE_PLUGIN_APP,
    DEVICE_PLUGIN_SELECTOR,
    NODE_CONFIG_LABEL,
    NODE_RECORD_ANNOTATION,
    OPERATOR_NAMESPACE,
    POLICY_RECORD_ANNOTATION,
    GpuNode,
    annotations,
    device_plugin_enabled,
    ignored_note,
    is_terminal,
    mismatches,
    node_sharing,
    owned_keys,
    plugin_pods_by_node,
    pod_gpu_requests,
    pod_name,
    pod_ready,
    pod_state,
    policy_config,
    policy_name,
    policy_record,
    selected_key,
    selector_matches,
)
from .plan import plan_disable, read_configs
from .pluginconfig import ConfigError, PluginReading


@dataclass(frozen=True)
class Finding:
    """One thing wrong with the set-up, and the command that fixes it."""

    problem: str
    fix: str

    def to_json(self) -> dict:
        return {"problem": self.problem, "fix": self.fix}


def summary(nodes: Iterable[GpuNode]) -> dict:
    """The seed's summary: physical GPUs, replicas, virtual GPUs, max concurrent users."""
    nodes = list(nodes)
    physical = sum(n.gpus or 0 for n in nodes)
    virtual = sum(n.slices for n in nodes)
    replicas = sorted({n.replicas for n in nodes})
    return {
        "nodes": len(nodes),
        "physical_gpus": physical,
        "replicas": replicas[0] if len(replicas) == 1 else replicas,
        "virtual_gpus": virtual,
        # one slice per user server
        "max_concurrent_users": virtual,
    }


def node_row(node: GpuNode) -> dict:
    return {
        "node": node.name,
        "product": node.product or None,
        "gpus": node.gpus,
        "strategy": node.strategy,
        "replicas": node.replicas,
        "resource": node.resource,
        "slices": node.slices,
    }


class _Fixes:
    """The commands that fix what is found, worked out once per report."""

    def __init__(self, policy: Mapping, config_map: Mapping | None, nodes, namespace: str):
        self.namespace = namespace
        self.name = policy_name(policy)
        self.config_map = policy_config(policy).get("name")
        self.owned = owned_keys(config_map)
        try:
            recorded = policy_record(policy) is not None
        except ConfigError:
            recorded = False
        self.disable = None
        if recorded or self.owned or any(NODE_RECORD_ANNOTATION in n.annotations for n in nodes):
            try:
                plan_disable(policy, config_map, nodes, namespace)
                self.disable = "gpushare disable"
            except ConfigError:
                self.disable = "gpushare disable --unshared"

    def policy(self) -> str:
        """Back to what was there, or to no sharing: the policy's config is broken."""
        return self.disable or (
            f"kubectl patch {CLUSTER_POLICY_RESOURCE}/{self.name} --type merge "
            '-p \'{"spec":{"devicePlugin":{"config":null}}}\''
        )

    def config(self, key: str) -> str:
        if key in self.owned and self.disable:
            return self.disable
        return f"kubectl -n {self.namespace} edit configmap {self.config_map}  # fix {key!r}"

    def label(self, node: GpuNode) -> str:
        if NODE_RECORD_ANNOTATION in node.annotations and self.disable:
            return self.disable
        return f"kubectl label node {node.name} {NODE_CONFIG_LABEL}-"


def _restart(namespace: str, pods: list[dict]) -> str:
    if pods:
        name = pods[0]["metadata"]["name"]
        return f"kubectl -n {namespace} delete pod {name}  # the DaemonSet starts it again"
    return f"kubectl -n {namespace} rollout restart daemonset/{DEVICE_PLUGIN_APP}"


def health(
    nodes: list[GpuNode],
    policy: Mapping | None,
    policies: list[Mapping],
    config_map: Mapping | None,
    plugin_pods: list[Mapping] | None,
    namespace: str = OPERATOR_NAMESPACE,
) -> tuple[list[Finding], list[str]]:
    """Problems with the set-up, and notes. ``plugin_pods`` None: they could not be read."""
    findings: list[Finding] = []
    notes: list[str] = []
    by_node = plugin_pods_by_node(plugin_pods or [])
    config_problem: dict[str, Finding] = {}  # per node: why its plugin cannot start

    if policy is not None:
        name = policy_name(policy)
        note = ignored_note(policy, policies)
        if note:
            notes.append(note)
        if not device_plugin_enabled(policy):
            notes.append(f"ClusterPolicy {name} has spec.devicePlugin.enabled: false")
        config = policy_config(policy)
        fixes = _Fixes(policy, config_map, nodes, namespace)
        cm = config.get("name")
        where = f"ConfigMap {namespace}/{cm}"
        readings: dict[str, PluginReading] | None = read_configs(config_map) if cm else {}
        default = config.get("default") if cm else None
        unlabelled = [n.name for n in nodes if not n.labels.get(NODE_CONFIG_LABEL)]
        if cm and readings is None:
            problem = Finding(
                f"ClusterPolicy {name} names {where}, which does not exist: the device plugin "
                "cannot start on any GPU node",
                fixes.policy(),
            )
            findings.append(problem)
            config_problem.update(dict.fromkeys((n.name for n in nodes), problem))
        elif default and unlabelled:
            reading = readings.get(default)
            if reading is None:
                problem = Finding(
                    f'ClusterPolicy {name} selects config "{default}" by default, which {where} '
                    f"does not have: the device plugin cannot start on {', '.join(unlabelled)}",
                    fixes.policy(),
                )
            elif reading.problem:
                problem = Finding(
                    f'the default config "{default}" in {where} ({", ".join(unlabelled)}): '
                    f"{reading.problem}",
                    fixes.config(default),
                )
            else:
                problem = None
            if problem:
                findings.append(problem)
                config_problem.update(dict.fromkeys(unlabelled, problem))
        for node in nodes:
            key = node.labels.get(NODE_CONFIG_LABEL)
            if not key or not cm or readings is None:
                continue
            reading = readings.get(key)
            if reading is None:
                problem = Finding(
                    f'node {node.name} selects config "{key}" (label {NODE_CONFIG_LABEL}), which '
                    f"{where} does not have: its device plugin cannot start",
                    fixes.label(node),
                )
            elif reading.problem:
                problem = Finding(
                    f'node {node.name} selects config "{key}" in {where}: {reading.problem}',
                    fixes.config(key),
                )
            else:
                continue
            findings.append(problem)
            config_problem[node.name] = problem

    # device-plugin pods: one Ready pod on every node the DaemonSet covers
    stale: set[str] = set()
    if plugin_pods is not None:
        for node in nodes:
            if not node.runs_device_plugin:
                continue
            pods = by_node.get(node.name, [])
            if any(pod_ready(p) for p in pods):
                continue
            stale.add(node.name)
            cause = config_problem.get(node.name)
            if not pods:
                problem = (
                    f"node {node.name} has no device-plugin pod ({DEVICE_PLUGIN_SELECTOR} in "
                    f"namespace {namespace})"
                )
            else:
                problem = (
                    f"the device-plugin pod {namespace}/{pods[0]['metadata']['name']} on "
                    f"{node.name} is {pod_state(pods[0])}, not running"
                )
            if cause is not None:
                findings.append(Finding(f"{problem}, because of the config above", cause.fix))
            else:
                findings.append(Finding(problem, _restart(namespace, pods)))

    # what each node advertises against its labels and its config
    config = policy_config(policy) if policy is not None else {}
    readings_now = read_configs(config_map) if policy is not None and config.get("name") else {}
    for node in nodes:
        gpus = node.gpus
        if gpus is None or node.name in stale or node.name in config_problem:
            continue
        restart = _restart(namespace, by_node.get(node.name, []))
        expected = gpus * node.replicas
        if node.slices != expected:
            findings.append(
                Finding(
                    f"node {node.name} advertises {node.slices} {node.resource}, but its labels "
                    f"say {gpus} GPUs x {node.replicas} replicas = {expected}: the device plugin "
                    "and GPU feature discovery disagree",
                    restart,
                )
            )
            continue
        if policy is None or not node.runs_device_plugin:
            continue
        want = node_sharing(node.labels, config, readings_now)
        if want is not None and mismatches(node, want):
            key = selected_key(node.labels, config)
            gives = f'its config "{key}" gives' if key else "with no config it should be"
            findings.append(
                Finding(
                    f"node {node.name} shows {node.slices} {node.resource} "
                    f"({node.strategy}, {node.replicas} replicas), but {gives} "
                    f"{want.describe()}: the device plugin has not restarted since the config "
                    "changed",
                    restart,
                )
            )
    return findings, notes


def status_report(
    nodes: Iterable[GpuNode],
    pods: Iterable[Mapping],
    policy: Mapping | None,
    policies: list[Mapping] | None = None,
    config_map: Mapping | None = None,
    plugin_pods: list[Mapping] | None = None,
    namespace: str = OPERATOR_NAMESPACE,
) -> dict:
    """Per node: GPUs, sharing, slices allocatable/used/free, holders; what waits; health."""
    nodes = sorted(nodes, key=lambda n: n.name)
    pods = [p for p in pods if not is_terminal(p)]
    by_node = {n.name: n for n in nodes}
    holders: dict[str, list[dict]] = {n.name: [] for n in nodes}
    pending = []
    for pod in pods:
        requests = pod_gpu_requests(pod)
        if not requests:
            continue
        spec = pod.get("spec") or {}
        node = spec.get("nodeName")
        if node:
            if node in holders:
                holders[node].append(
                    {
                        "pod": pod_name(pod),
                        "phase": (pod.get("status") or {}).get("phase", "Pending"),
                        "requests": requests,
                    }
                )
            continue
        condition = next(
            (
                c
                for c in (pod.get("status") or {}).get("conditions") or []
                if c.get("type") == "PodScheduled"
            ),
            {},
        )
        message = condition.get("message") or ""
        pending.append(
            {
                "pod": pod_name(pod),
                "requests": requests,
                "reason": condition.get("reason") or "waiting for the scheduler",
                "message": message,
                "lack_of_slices": "Insufficient nvidia.com/gpu" in message,
                "candidate_nodes": sorted(
                    n.name for n in nodes if selector_matches(spec.get("nodeSelector"), n.labels)
                ),
            }
        )
    pending.sort(key=lambda p: p["pod"])
    config = policy_config(policy or {})
    rows = []
    for node in nodes:
        used = sum(h["requests"].get(node.resource, 0) for h in holders[node.name])
        rows.append(
            {
                **node_row(node),
                "config": selected_key(node.labels, config),
                "used": used,
                "free": max(node.slices - used, 0),
                "pods": sorted(h["pod"] for h in holders[node.name]),
                "pending": [
                    p["pod"]
                    for p in pending
                    if p["lack_of_slices"] and node.name in p["candidate_nodes"]
                ],
            }
        )
    figures = summary(by_node.values())
    figures["used_slices"] = sum(r["used"] for r in rows)
    figures["free_slices"] = sum(r["free"] for r in rows)
    policy_info = None
    if policy is not None:
        policy_info = {
            "name": policy_name(policy),
            "config": config or None,
            "set_up_by_gpushare": POLICY_RECORD_ANNOTATION in annotations(policy),
            "ignored_by_operator": ignored_note(policy, policies or [policy]) is not None,
        }
    findings, notes = health(nodes, policy, policies or [], config_map, plugin_pods, namespace)
    return {
        "cluster_policy": policy_info,
        "nodes": rows,
        "pending": pending,
        "summary": figures,
        "health": [f.to_json() for f in findings],
        "notes": notes,
    }
