"""What ``gpushare setup`` and ``disable`` change, worked out before anything is written.

A plan holds the ConfigMap before and after, a merge patch for the ClusterPolicy,
patches for node labels, and for every GPU node its sharing before and after and
whether its device plugin must restart. Planning twice on the result plans
nothing, and ``disable`` after any number of ``setup`` runs puts back what the
first one found. Configs are judged the way the device plugin reads them
(:mod:`.pluginconfig`), strictly only where a node selects them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .cluster import (
    CLUSTER_POLICY_GROUP,
    CLUSTER_POLICY_PLURAL,
    CONFIG_MAP_NAME,
    COUNT_LABEL,
    CREATED_ANNOTATION,
    NODE_CONFIG_LABEL,
    NODE_RECORD_ANNOTATION,
    OPERATOR_NAMESPACE,
    OWNED_KEYS_ANNOTATION,
    POLICY_RECORD_ANNOTATION,
    GpuNode,
    annotations,
    config_map_name,
    device_plugin_enabled,
    mismatches,
    node_limit,
    node_sharing,
    owned_keys,
    policy_config,
    policy_name,
    policy_record,
    selected_key,
    why_broken,
)
from .pluginconfig import (
    SHARED_RESOURCE,
    ConfigError,
    PluginReading,
    Sharing,
    config_key,
    fails_requests_above_one,
    read_config,
    render_config,
)


# -- JSON merge patches (RFC 7386) -------------------------------------------------------
def merge_patch(current: Any, desired: Any) -> Any:
    """A merge patch that turns ``current`` into ``desired`` ({} when they are equal).

    ``None`` inside ``desired`` cannot be expressed (it means "delete"), so keys
    whose value is None are treated as absent.
    """
    if not isinstance(current, dict) or not isinstance(desired, dict):
        return desired
    patch: dict = {}
    for key in current:
        if desired.get(key) is None and current[key] is not None:
            patch[key] = None
    for key, value in desired.items():
        if value is None:
            continue
        old = current.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            sub = merge_patch(old, value)
            if sub:
                patch[key] = sub
        elif old != value:
            patch[key] = value
    return patch


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """Apply a merge patch the way the API server does (returns a new object)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


# -- plans -----------------------------------------------------------------------------
@dataclass
class NodeChange:
    """One node's before and after, and whether its device plugin must restart."""

    name: str
    before: Sharing | None  # None: its device plugin cannot start now
    after: Sharing
    problems: list[str]  # how the node differs from ``after`` right now
    key_changed: bool
    # A change of the ClusterPolicy's device plugin config makes the operator roll
    # the whole DaemonSet, so every node's plugin restarts, changed or not.
    policy_changed: bool = False

    @property
    def affected(self) -> bool:
        return (
            self.key_changed
            or self.policy_changed
            or self.before != self.after
            or bool(self.problems)
        )


@dataclass
class Plan:
    """What ``setup`` or ``disable`` will change; empty when there is nothing to do."""

    action: str
    namespace: str
    policy_name: str
    config_map_name: str
    config_map_before: dict | None  # {"metadata": {...}, "data": {...}} or None
    config_map_after: dict | None  # None: delete it (or leave it absent)
    policy_patch: dict
    node_patches: dict[str, dict]
    nodes: list[NodeChange]
    notes: list[str] = field(default_factory=list)  # what happens, for the record
    warnings: list[str] = field(default_factory=list)  # what the admin should look at
    adopted: str | None = None  # an existing key that already gives the sharing

    @property
    def config_map_action(self) -> str | None:
        before, after = self.config_map_before, self.config_map_after
        if before is None:
            return None if after is None else "create"
        if after is None:
            return "delete"
        same = before.get("data") == after.get("data") and annotations(before) == annotations(after)
        return None if same else "update"

    @property
    def writes(self) -> bool:
        return bool(self.config_map_action or self.policy_patch or self.node_patches)

    @property
    def affected(self) -> list[NodeChange]:
        return [n for n in self.nodes if n.affected]

    @property
    def changes_anything(self) -> bool:
        return self.writes or bool(self.affected)

    def to_json(self) -> dict:
        return {
            "action": self.action,
            "cluster_policy": self.policy_name,
            "config_map": {
                "namespace": self.namespace,
                "name": self.config_map_name,
                "change": self.config_map_action,
                "object": self.config_map_after,
            },
            "cluster_policy_patch": self.policy_patch or None,
            "node_patches": self.node_patches,
            "restart_nodes": [n.name for n in self.affected],
            "expected": {
                n.name: {
                    "strategy": n.after.strategy,
                    "replicas": n.after.replicas,
                    "resource": n.after.resource,
                }
                for n in self.nodes
            },
            "adopted": self.adopted,
            "notes": self.notes,
            "warnings": self.warnings,
        }


def read_configs(config_map: Mapping | None) -> dict[str, PluginReading] | None:
    """Every config of a ConfigMap as the device plugin reads it; None without a ConfigMap."""
    if config_map is None:
        return None
    data = (config_map.get("data") or {}) if isinstance(config_map, Mapping) else {}
    return {key: read_config(text) for key, text in data.items()}


def gives(reading: PluginReading | None, sharing: Sharing) -> bool:
    """Whether a config gives exactly ``sharing``, as the config gpushare writes would."""
    return (
        reading is not None
        and reading.usable
        and reading.sharing == sharing
        and reading.devices_per_gpu == sharing.replicas
        and reading.fail_requests_greater_than_one == fails_requests_above_one(sharing)
    )


def _config_map_object(
    name: str, namespace: str, data: dict[str, str], notes: dict[str, str]
) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "annotations": notes},
        "data": data,
    }


@dataclass
class _Broken:
    node: str
    why: str
    ours: bool  # this change makes the node select the config


def _node_changes(
    nodes: list[GpuNode],
    after_labels: Mapping[str, Mapping[str, str]],
    config_before: Mapping,
    config_after: Mapping,
    readings_before: Mapping[str, PluginReading] | None,
    readings_after: Mapping[str, PluginReading] | None,
    where: str,
    targets: set[str],
) -> tuple[list[NodeChange], list[_Broken]]:
    """Each node's sharing before and after; nodes whose plugin could not start after."""
    policy_changed = bool(merge_patch(dict(config_before), dict(config_after)))
    changes, broken = [], []
    for node in nodes:
        labels_after = after_labels.get(node.name, node.labels)
        key_before = selected_key(node.labels, config_before)
        key_after = selected_key(labels_after, config_after)
        before = node_sharing(node.labels, config_before, readings_before)
        after = node_sharing(labels_after, config_after, readings_after)
        ours = key_before != key_after or node.name in targets
        if after is None:
            why = why_broken(labels_after, config_after, readings_after, where)
            broken.append(_Broken(node.name, why or "its config is broken", ours))
            continue
        reading = (readings_after or {}).get(key_after) if key_after else None
        if reading is not None and reading.refusal is not None:
            broken.append(_Broken(node.name, f'config "{key_after}": {reading.problem}', ours))
            if ours:
                continue
        change = NodeChange(node.name, before, after, [], key_before != key_after, policy_changed)
        change.problems = mismatches(node, after)
        if change.affected and node.gpus is None:
            raise ConfigError(
                f"node {node.name} has no {COUNT_LABEL} label, so its capacity cannot be "
                "checked: is GPU feature discovery running there?"
            )
        changes.append(change)
    return changes, broken


def _unselected_warnings(
    readings: Mapping[str, PluginReading] | None,
    nodes: list[GpuNode],
    after_labels: Mapping[str, Mapping[str, str]],
    config: Mapping,
    where: str,
) -> tuple[list[str], list[str]]:
    """Notes on the configs nodes select, warnings on those no node selects."""
    selected: dict[str, list[str]] = {}
    for node in nodes:
        key = selected_key(after_labels.get(node.name, node.labels), config)
        if key:
            selected.setdefault(key, []).append(node.name)
    notes, warnings = [], []
    for key, reading in sorted((readings or {}).items()):
        if key in selected:
            for note in reading.notes:
                notes.append(f'config "{key}" ({", ".join(selected[key])}): {note}')
        elif reading.problem:
            warnings.append(f'config "{key}" in {where}, which no node selects: {reading.problem}')
    return notes, warnings


def plan_setup(
    policy: Mapping,
    config_map: Mapping | None,
    nodes: list[GpuNode],
    sharing: Sharing,
    namespace: str = OPERATOR_NAMESPACE,
    selected: set[str] | None = None,
) -> Plan:
    """The changes that make ``sharing`` the config of all GPU nodes (or of ``selected``).

    ``config_map`` is the ConfigMap the policy names (or ``time-slicing-config``),
    None if it does not exist. A config the nodes already select that gives the
    same sharing is kept as it is. Raises ConfigError, having changed nothing, for
    anything we must not build on.
    """
    name = policy_name(policy)
    if not device_plugin_enabled(policy):
        raise ConfigError(
            f"ClusterPolicy {name} has spec.devicePlugin.enabled: false, so the operator runs "
            "no device plugin and no config can share anything: enable it first"
        )
    config = policy_config(policy)
    record = policy_record(policy)
    cm_name = config.get("name") or (record or {}).get("configMap") or CONFIG_MAP_NAME
    where = f"ConfigMap {namespace}/{cm_name}"
    data = dict((config_map or {}).get("data") or {})
    owned = owned_keys(config_map)
    readings = read_configs(config_map)
    if selected is not None and not selected:
        raise ConfigError("--nodes matches no GPU node")

    # the nodes this is for: every GPU node without a config of its own, or --nodes
    if selected is None:
        targets = [n for n in nodes if not n.labels.get(NODE_CONFIG_LABEL)]
    else:
        targets = [n for n in nodes if n.name in selected]
    for node in targets:
        limit = node_limit(node, sharing)
        if limit:
            raise ConfigError(limit)

    def already_gives(key: str | None) -> bool:
        return key is not None and readings is not None and gives(readings.get(key), sharing)

    key, text = config_key(sharing), render_config(sharing)
    new_config = dict(config)
    node_patches: dict[str, dict] = {}
    after_labels = {n.name: dict(n.labels) for n in nodes}
    adopted: set[str] = set()
    uses_key = False
    if selected is None:
        default = selected_key({}, config)
        if already_gives(default):
            adopted.add(default)
        else:
            new_config.update(name=cm_name, default=key)
            uses_key = True
    else:
        for node in targets:
            current = selected_key(node.labels, config)
            if already_gives(current):
                adopted.add(current)
                continue
            uses_key = True
            patch: dict[str, dict] = {}
            if node.labels.get(NODE_CONFIG_LABEL) != key:
                patch["labels"] = {NODE_CONFIG_LABEL: key}
                after_labels[node.name][NODE_CONFIG_LABEL] = key
            if NODE_RECORD_ANNOTATION not in node.annotations:
                patch["annotations"] = {
                    NODE_RECORD_ANNOTATION: json.dumps(node.labels.get(NODE_CONFIG_LABEL))
                }
            if patch:
                node_patches[node.name] = {"metadata": patch}
        if uses_key:
            new_config["name"] = cm_name  # the config-manager needs the ConfigMap

    new_data = dict(data)
    mine = set(owned)
    if uses_key and not already_gives(key):
        if key in data and key not in owned:
            raise ConfigError(
                f'{where} already has a key "{key}" that gpushare did not write; '
                "rename or remove it, then run gpushare again"
            )
        new_data[key] = text
        mine.add(key)
    # keys of ours that nothing selects any more (an earlier replica count) go
    referenced = {selected_key({}, new_config)} | {
        labels.get(NODE_CONFIG_LABEL) for labels in after_labels.values()
    }
    for old in owned:
        if old in new_data and old not in referenced:
            del new_data[old]
    new_owned = sorted(mine & set(new_data))
    notes_after = dict(annotations(config_map))
    if new_owned:
        notes_after[OWNED_KEYS_ANNOTATION] = json.dumps(new_owned)
    else:
        notes_after.pop(OWNED_KEYS_ANNOTATION, None)
    if config_map is None:
        notes_after[CREATED_ANNOTATION] = "true"
    cm_before = (
        _config_map_object(cm_name, namespace, data, annotations(config_map))
        if config_map is not None
        else None
    )
    cm_after = (
        _config_map_object(cm_name, namespace, new_data, notes_after)
        if config_map is not None or new_data
        else None
    )
    readings_after = None
    if cm_after is not None:
        readings_after = {
            k: readings[k] if readings is not None and data.get(k) == v else read_config(v)
            for k, v in new_data.items()
        }

    changes, broken = _node_changes(
        nodes,
        after_labels,
        config,
        new_config,
        readings,
        readings_after,
        where,
        {n.name for n in targets},
    )
    for problem in broken:
        if problem.ours:
            raise ConfigError(f"after this change node {problem.node} {problem.why}")
    policy_patch: dict = {}
    config_patch = merge_patch(config, new_config)
    if config_patch:
        policy_patch["spec"] = {"devicePlugin": {"config": config_patch}}
        if record is None:
            spec = policy.get("spec") or {}
            original = {
                "configMap": cm_name,
                "config": spec["devicePlugin"].get("config")
                if isinstance(spec.get("devicePlugin"), dict)
                else None,
                "devicePlugin": "devicePlugin" in spec,
            }
            policy_patch["metadata"] = {
                "annotations": {POLICY_RECORD_ANNOTATION: json.dumps(original, sort_keys=True)}
            }
    plan = Plan(
        "setup",
        namespace,
        name,
        cm_name,
        cm_before,
        cm_after,
        policy_patch,
        node_patches,
        changes,
        adopted=", ".join(sorted(adopted)) or None,
    )
    plan.notes, plan.warnings = _unselected_warnings(
        readings_after, nodes, after_labels, new_config, where
    )
    plan.warnings += [
        f"node {b.node} keeps a config of its own that cannot work: {b.why}" for b in broken
    ]
    if selected is None:
        labelled = [n.name for n in nodes if n.labels.get(NODE_CONFIG_LABEL)]
        if len(labelled) == 1:
            plan.notes.append(
                f"node {labelled[0]} keeps its own config (label {NODE_CONFIG_LABEL})"
            )
        elif labelled:
            plan.notes.append(
                f"nodes {', '.join(labelled)} keep their own configs (label {NODE_CONFIG_LABEL})"
            )
    if adopted:
        plan.notes.append(
            f"config {', '.join(f'{k!r}' for k in sorted(adopted))} in {where} already gives "
            f"{sharing.describe()}: gpushare keeps it"
        )
    if sharing.renamed and plan.changes_anything:
        plan.notes.append(
            f"pods must now ask for {SHARED_RESOURCE} (c.GPUShareSpawner.gpu_resource_name); "
            f"those asking for nvidia.com/gpu will not be scheduled on these nodes"
        )
    return plan


def plan_disable(
    policy: Mapping,
    config_map: Mapping | None,
    nodes: list[GpuNode],
    namespace: str = OPERATOR_NAMESPACE,
    unshared: bool = False,
) -> Plan:
    """The changes that put back what was there before the first ``setup``.

    If that would stop the device plugin on some node (its ConfigMap or key is
    gone, or the plugin refuses it), ConfigError says so, unless ``unshared``:
    then the ClusterPolicy's device plugin config is removed, and every GPU
    node goes back to no sharing.
    """
    name = policy_name(policy)
    config = policy_config(policy)
    try:
        record = policy_record(policy)
    except ConfigError:
        if not unshared:
            raise
        record = {}  # unreadable: --unshared removes it together with the config
    cm_name = config_map_name(policy, "disable")
    where = f"ConfigMap {namespace}/{cm_name}"
    data = dict((config_map or {}).get("data") or {})
    owned = owned_keys(config_map) & set(data)
    recorded_nodes = [n for n in nodes if NODE_RECORD_ANNOTATION in n.annotations]
    if record is None and not owned and not recorded_nodes:
        current = (
            _config_map_object(cm_name, namespace, data, annotations(config_map))
            if config_map is not None
            else None
        )
        plan = Plan("disable", namespace, name, cm_name, current, current, {}, {}, [])
        plan.notes.append(f"gpushare has not set up GPU sharing through ClusterPolicy {name}")
        return plan
    readings = read_configs(config_map)

    spec = policy.get("spec") or {}
    restored = config
    if record is not None or unshared:
        original = None if unshared else (record or {}).get("config")
        restored = dict(original) if isinstance(original, dict) else {}
        device_plugin = dict(spec.get("devicePlugin") or {})
        if isinstance(original, dict):
            device_plugin["config"] = original
        else:
            device_plugin.pop("config", None)
        if record is not None and not record.get("devicePlugin", True) and not device_plugin:
            new_spec = {k: v for k, v in spec.items() if k != "devicePlugin"}
        else:
            new_spec = {**spec, "devicePlugin": device_plugin}
    else:
        new_spec = spec
    policy_patch: dict = {}
    spec_patch = merge_patch(spec, new_spec)
    if spec_patch:
        policy_patch["spec"] = spec_patch
    if record is not None:
        policy_patch["metadata"] = {"annotations": {POLICY_RECORD_ANNOTATION: None}}

    new_data = {k: v for k, v in data.items() if k not in owned}
    readings_after = (
        {k: r for k, r in readings.items() if k in new_data} if readings is not None else None
    )
    node_patches: dict[str, dict] = {}
    after_labels = {n.name: dict(n.labels) for n in nodes}
    for node in recorded_nodes:
        try:
            original_label = json.loads(node.annotations[NODE_RECORD_ANNOTATION])
        except ValueError:
            original_label = None
        if (
            unshared
            and original_label
            and (readings_after is None or original_label not in readings_after)
        ):
            original_label = None  # it names a config that is gone
        patch: dict[str, dict] = {"annotations": {NODE_RECORD_ANNOTATION: None}}
        if node.labels.get(NODE_CONFIG_LABEL) != original_label:
            patch["labels"] = {NODE_CONFIG_LABEL: original_label}
            if original_label is None:
                after_labels[node.name].pop(NODE_CONFIG_LABEL, None)
            else:
                after_labels[node.name][NODE_CONFIG_LABEL] = original_label
        node_patches[node.name] = {"metadata": patch}

    notes_before = annotations(config_map)
    notes_after = {
        k: v
        for k, v in notes_before.items()
        if k not in (OWNED_KEYS_ANNOTATION, CREATED_ANNOTATION)
    }
    created = notes_before.get(CREATED_ANNOTATION) == "true"
    cm_before = (
        _config_map_object(cm_name, namespace, data, notes_before)
        if config_map is not None
        else None
    )
    if config_map is None or (created and not new_data):
        cm_after = None
    elif notes_before.get(OWNED_KEYS_ANNOTATION) is None and not owned:
        cm_after = cm_before  # never ours: leave it exactly as it is
    else:
        cm_after = _config_map_object(cm_name, namespace, new_data, notes_after)
    if cm_after is None and restored.get("name") == cm_name and config_map is not None:
        # the original config names this ConfigMap: keep it, even empty
        cm_after = _config_map_object(cm_name, namespace, new_data, notes_after)
    if cm_after is None:
        readings_after = None

    changes, broken = _node_changes(
        nodes, after_labels, config, restored, readings, readings_after, where, set()
    )
    ours = [b for b in broken if b.ours]
    if ours:
        nodes_named = ", ".join(b.node for b in ours)
        raise ConfigError(
            f"putting back the device plugin config that ClusterPolicy {name} had before "
            f"gpushare set up sharing would stop the device plugin on {nodes_named}: "
            f"{ours[0].why}. Restore that config, or run `gpushare disable --unshared` to go "
            "back to no sharing instead (it removes spec.devicePlugin.config)"
        )
    plan = Plan(
        "disable",
        namespace,
        name,
        cm_name,
        cm_before,
        cm_after,
        policy_patch,
        node_patches,
        changes,
    )
    plan.notes, plan.warnings = _unselected_warnings(
        readings_after, nodes, after_labels, restored, where
    )
    plan.warnings += [
        f"node {b.node} keeps a config of its own that cannot work: {b.why}" for b in broken
    ]
    if unshared:
        own = sorted(n for n, labels in after_labels.items() if labels.get(NODE_CONFIG_LABEL))
        plan.notes.append(
            f"--unshared: ClusterPolicy {name} loses spec.devicePlugin.config, so every GPU node "
            "runs the device plugin without sharing"
            + (f" (also {', '.join(own)}, which select configs of their own)" if own else "")
        )
    elif record is None and (owned or node_patches):
        plan.notes.append(
            f"ClusterPolicy {name} carries no record of its earlier config; it is left as it is"
        )
    return plan


# -- permissions ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Access:
    """One RBAC verb on one resource that a command needs."""

    verb: str
    resource: str
    group: str = ""
    namespace: str | None = None

    def describe(self) -> str:
        resource = f"{self.resource}.{self.group}" if self.group else self.resource
        place = f"in namespace {self.namespace}" if self.namespace else "(cluster-wide)"
        return f"{self.verb} {resource} {place}"


def read_access(namespace: str) -> list[Access]:
    """What ``setup``/``disable`` read before they decide anything."""
    return [
        Access("list", CLUSTER_POLICY_PLURAL, CLUSTER_POLICY_GROUP),
        Access("get", "configmaps", namespace=namespace),
        Access("list", "nodes"),
        Access("list", "pods"),
    ]


def write_access(plan: Plan) -> list[Access]:
    """What applying ``plan`` needs, in the order it happens."""
    needed = []
    verb = {"create": "create", "update": "update", "delete": "delete"}.get(
        plan.config_map_action or ""
    )
    if verb:
        needed.append(Access(verb, "configmaps", namespace=plan.namespace))
    if plan.node_patches:
        needed.append(Access("patch", "nodes"))
    if plan.policy_patch:
        needed.append(Access("patch", CLUSTER_POLICY_PLURAL, CLUSTER_POLICY_GROUP))
    if plan.affected:
        needed.append(Access("delete", "pods", namespace=plan.namespace))
    return needed
