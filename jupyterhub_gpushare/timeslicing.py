"""Pure logic of ``gpushare setup|status|disable``: no Kubernetes I/O here.

The NVIDIA device plugin reads one YAML config per node from a ConfigMap that
the GPU operator's ClusterPolicy names (``spec.devicePlugin.config``): a node's
``nvidia.com/device-plugin.config`` label picks a key, otherwise the policy's
``default`` does, otherwise the plugin runs unshared (the operator sets the
config-manager's fallback to ``empty``). A label or default naming a key that
does not exist makes the config-manager exit, so the plugin never starts.

This module builds the config we write, validates existing ones *strictly*
(the plugin silently ignores unknown keys), plans the changes that ``setup``
and ``disable`` make (so that running them twice changes nothing), works out
what every node must show afterwards, and formats summaries.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

# -- names the GPU operator, the device plugin and GFD use ---------------------
OPERATOR_NAMESPACE = "gpu-operator"
CONFIG_MAP_NAME = "time-slicing-config"
CLUSTER_POLICY_NAME = "cluster-policy"
CLUSTER_POLICY_GROUP = "nvidia.com"
CLUSTER_POLICY_VERSION = "v1"
CLUSTER_POLICY_PLURAL = "clusterpolicies"
DEVICE_PLUGIN_SELECTOR = "app=nvidia-device-plugin-daemonset"
NODE_CONFIG_LABEL = "nvidia.com/device-plugin.config"
GPU_PRESENT_LABEL = "nvidia.com/gpu.present"
COUNT_LABEL = "nvidia.com/gpu.count"
REPLICAS_LABEL = "nvidia.com/gpu.replicas"
STRATEGY_LABEL = "nvidia.com/gpu.sharing-strategy"
PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_RESOURCE = "nvidia.com/gpu"
SHARED_RESOURCE = "nvidia.com/gpu.shared"
SHARED_SUFFIX = "-SHARED"
STRATEGIES = ("time-slicing", "mps")

# -- what gpushare records so that ``disable`` can undo exactly -----------------
# On the ClusterPolicy: JSON {"configMap": name, "config": <spec.devicePlugin.config
# before the first setup, or null>, "devicePlugin": <whether spec.devicePlugin existed>}.
POLICY_RECORD_ANNOTATION = "gpushare.dev/original-device-plugin-config"
# On a node that setup --nodes labelled: JSON of the label's earlier value (or null).
NODE_RECORD_ANNOTATION = "gpushare.dev/original-device-plugin-config"
# On the ConfigMap: JSON list of the keys gpushare wrote; other keys are never touched.
OWNED_KEYS_ANNOTATION = "gpushare.dev/owned-keys"
# On a ConfigMap gpushare created: "true", so disable may delete it once it is empty.
CREATED_ANNOTATION = "gpushare.dev/created"
KEY_PREFIX = "gpushare-"


class ConfigError(ValueError):
    """Bad input or a cluster we must not touch; the message is one line for the user."""


def parse_replicas(text: object) -> int:
    """``--replicas`` as an int >= 2, the smallest count the device plugin accepts."""
    value = str(text).strip()
    try:
        replicas = int(value, 10)
    except ValueError:
        raise ConfigError(
            f"--replicas must be a whole number of at least 2, not {value!r}"
        ) from None
    if replicas < 2:
        raise ConfigError(
            f"--replicas must be at least 2, not {replicas}: the device plugin rejects fewer "
            "(run `gpushare disable` to stop sharing)"
        )
    return replicas


# -- the sharing a config gives ------------------------------------------------
@dataclass(frozen=True)
class Sharing:
    """How a node's full GPUs are shared: what GFD labels and capacity show."""

    strategy: str = "none"  # "none", "time-slicing" or "mps"
    replicas: int = 1
    renamed: bool = False

    @property
    def resource(self) -> str:
        return SHARED_RESOURCE if self.renamed and self.replicas > 1 else GPU_RESOURCE

    @property
    def shared(self) -> bool:
        return self.replicas > 1

    def describe(self) -> str:
        if not self.shared:
            return "not shared"
        return f"{self.strategy}, {self.replicas} replicas per GPU as {self.resource}"


NOT_SHARED = Sharing()


def build_config(sharing: Sharing) -> dict:
    """The device plugin config (api/config/v1) for ``sharing``."""
    if not sharing.shared or sharing.strategy not in STRATEGIES:
        raise ConfigError("a sharing config needs time-slicing or mps and at least 2 replicas")
    section: dict[str, Any] = {}
    if sharing.renamed:
        section["renameByDefault"] = True
    section["resources"] = [{"name": GPU_RESOURCE, "replicas": sharing.replicas}]
    key = "timeSlicing" if sharing.strategy == "time-slicing" else "mps"
    return {"version": "v1", "sharing": {key: section}}


def render_config(sharing: Sharing) -> str:
    """The config as the YAML text we store; stable, so equal text means no change."""
    return yaml.safe_dump(build_config(sharing), sort_keys=False, default_flow_style=False)


def config_key(sharing: Sharing) -> str:
    """The ConfigMap key for a config: the same sharing always gets the same key."""
    key = f"{KEY_PREFIX}{sharing.strategy}-{sharing.replicas}"
    return key + "-renamed" if sharing.renamed else key


# -- strict validation ----------------------------------------------------------
class _StrictLoader(yaml.SafeLoader):
    """Safe loader that refuses duplicate keys (the device plugin's parser does too)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep=False):
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)

# Leaf types of the schema; None values are allowed everywhere (null means unset).
_STR, _BOOL, _INT, _ANY = "a string", "true or false", "a whole number", "anything"

_REPLICATED_RESOURCE = {"name": _STR, "rename": _STR, "devices": _ANY, "replicas": _INT}
_REPLICATED = {
    "renameByDefault": _BOOL,
    "failRequestsGreaterThanOne": _BOOL,
    "resources": [_REPLICATED_RESOURCE],
}
_NAMED_PATTERN = {"pattern": _STR, "name": _STR}
# k8s-device-plugin api/config/v1 (Config, Flags, Sharing, ReplicatedResources, Imex)
_SCHEMA: dict = {
    "version": _STR,
    "flags": {
        "migStrategy": _STR,
        "failOnInitError": _BOOL,
        "mpsRoot": _STR,
        "nvidiaDriverRoot": _STR,
        "nvidiaDevRoot": _STR,
        "gdrcopyEnabled": _BOOL,
        "gdsEnabled": _BOOL,
        "mofedEnabled": _BOOL,
        "useNodeFeatureAPI": _BOOL,
        "deviceDiscoveryStrategy": _STR,
        "plugin": {
            "passDeviceSpecs": _BOOL,
            "deviceListStrategy": _ANY,  # a string or a list of strings
            "deviceIDStrategy": _STR,
            "cdiAnnotationPrefix": _STR,
            "nvidiaCTKPath": _STR,
            "containerDriverRoot": _STR,
            "sharedDevicesAllocationPolicy": _STR,
        },
        "gfd": {
            "oneshot": _BOOL,
            "noTimestamp": _BOOL,
            "sleepInterval": _ANY,  # a duration
            "outputFile": _STR,
            "machineTypeFile": _STR,
        },
    },
    "resources": {"gpus": [_NAMED_PATTERN], "mig": [_NAMED_PATTERN]},
    "sharing": {"timeSlicing": _REPLICATED, "mps": _REPLICATED},
    "imex": {"channelIDs": [_INT], "required": _BOOL},
}


def _type_ok(value: object, leaf: str) -> bool:
    if leaf == _ANY:
        return True
    if leaf == _STR:
        return isinstance(value, str)
    if leaf == _BOOL:
        return isinstance(value, bool)
    # YAML true is a bool, and bool is an int in Python: not a number here
    return isinstance(value, int) and not isinstance(value, bool)


def _check_schema(value: object, schema: object, path: str) -> None:
    if value is None:
        return
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise ConfigError(f'"{path or "the config"}" must be a mapping')
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if key not in schema:
                raise ConfigError(
                    f'unknown field "{where}" (the device plugin would silently ignore it)'
                )
            _check_schema(item, schema[key], where)
    elif isinstance(schema, list):
        if not isinstance(value, list):
            raise ConfigError(f'"{path}" must be a list')
        for index, item in enumerate(value):
            _check_schema(item, schema[0], f"{path}[{index}]")
    elif not _type_ok(value, schema):
        raise ConfigError(f'"{path}" must be {schema}, not {value!r}')


def _resource_name(name: str) -> str:
    # the plugin puts the nvidia.com/ prefix on bare names
    return name if "/" in name else f"nvidia.com/{name}"


def _check_replicated(section: dict, path: str) -> int | None:
    """Check one ``sharing.<strategy>`` section; return the full-GPU replicas in it."""
    resources = section.get("resources")
    if not resources:
        raise ConfigError(f'"{path}.resources" is missing or empty (the device plugin fails)')
    renamed = bool(section.get("renameByDefault"))
    gpu_replicas = None
    for index, resource in enumerate(resources):
        where = f"{path}.resources[{index}]"
        if not isinstance(resource, dict):
            raise ConfigError(f'"{where}" must be a mapping')
        for required in ("name", "replicas"):
            if resource.get(required) is None:
                raise ConfigError(f'"{where}.{required}" is missing (the device plugin fails)')
        name = _resource_name(resource["name"])
        if name != GPU_RESOURCE and not name.startswith("nvidia.com/mig-"):
            raise ConfigError(
                f'"{where}.name" is {resource["name"]!r}: only nvidia.com/gpu and '
                "nvidia.com/mig-* resources can be shared"
            )
        if resource["replicas"] < 2:
            raise ConfigError(
                f'"{where}.replicas" is {resource["replicas"]}: the device plugin needs '
                "at least 2 (leave the resource out to stop sharing it)"
            )
        devices = resource.get("devices", "all")
        if devices not in ("all", None):
            raise ConfigError(
                f'"{where}.devices" is not supported: the device plugin ignores it and '
                "shares all GPUs"
            )
        rename = resource.get("rename")
        if rename and (not renamed or _resource_name(rename) != name + ".shared"):
            raise ConfigError(
                f'"{where}.rename" is not supported: the device plugin ignores it '
                "(use renameByDefault)"
            )
        if name == GPU_RESOURCE:
            gpu_replicas = resource["replicas"]
    return gpu_replicas


def parse_config(text: str) -> Sharing:
    """Validate a device plugin config strictly and return the sharing it gives.

    Raises ConfigError for anything the device plugin would reject *and* for
    what it would silently ignore: unknown or misplaced keys, duplicate keys,
    options it does not support.
    """
    try:
        # yaml.safe_load's loader, plus a refusal of duplicate keys
        config = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"not valid YAML{where}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}") from None
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ConfigError("not a YAML mapping")
    _check_schema(config, _SCHEMA, "")
    version = config.get("version")
    if version not in (None, "", "v1"):
        raise ConfigError(f'version {version!r} is unknown; the device plugin only knows "v1"')
    if config.get("resources"):
        raise ConfigError(
            '"resources" is set, which the device plugin does not support yet and ignores'
        )
    sharing = config.get("sharing") or {}
    time_slicing, mps = sharing.get("timeSlicing"), sharing.get("mps")
    if "timeSlicing" in sharing and "mps" in sharing:
        raise ConfigError(
            '"sharing" has both timeSlicing and mps; they are mutually exclusive '
            "(the device plugin would pick mps)"
        )
    for key, section in (("timeSlicing", time_slicing), ("mps", mps)):
        if key in sharing:
            if not isinstance(section, dict):
                raise ConfigError(f'"sharing.{key}.resources" is missing (the device plugin fails)')
            replicas = _check_replicated(section, f"sharing.{key}")
            if replicas:
                strategy = "mps" if key == "mps" else "time-slicing"
                return Sharing(strategy, replicas, bool(section.get("renameByDefault")))
    return NOT_SHARED


def check_config(text: str, key: str, where: str) -> Sharing:
    """:func:`parse_config` with the config's place put in front of the message."""
    try:
        return parse_config(text)
    except ConfigError as e:
        raise ConfigError(
            f'config "{key}" in {where}: {e}; fix or remove it, then run gpushare again'
        ) from None


# -- JSON merge patches (RFC 7386) ------------------------------------------------
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


# -- nodes ------------------------------------------------------------------------
def parse_count(quantity: object) -> int:
    """An extended-resource quantity ("4", 4, "0") as an int; odd values count as 0."""
    try:
        return int(str(quantity))
    except (TypeError, ValueError):
        try:
            return int(float(str(quantity)))
        except ValueError:
            return 0


@dataclass
class GpuNode:
    """What we need of a GPU node, from its API object."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    allocatable: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_api(cls, node: Mapping) -> GpuNode:
        meta = node.get("metadata") or {}
        status = node.get("status") or {}
        return cls(
            name=meta["name"],
            labels=dict(meta.get("labels") or {}),
            annotations=dict(meta.get("annotations") or {}),
            allocatable={
                k: parse_count(v)
                for k, v in (status.get("allocatable") or {}).items()
                if k.startswith("nvidia.com/")
            },
        )

    @property
    def gpus(self) -> int | None:
        """Physical GPUs (GFD's count label), None when GFD has not labelled the node."""
        try:
            return int(self.labels[COUNT_LABEL])
        except (KeyError, ValueError):
            return None

    @property
    def product(self) -> str:
        product = self.labels.get(PRODUCT_LABEL, "")
        return product.removesuffix(SHARED_SUFFIX)

    @property
    def replicas(self) -> int:
        try:
            return int(self.labels.get(REPLICAS_LABEL, "1"))
        except ValueError:
            return 1

    @property
    def strategy(self) -> str:
        return self.labels.get(STRATEGY_LABEL, "none")

    @property
    def resource(self) -> str:
        return SHARED_RESOURCE if self.allocatable.get(SHARED_RESOURCE, 0) > 0 else GPU_RESOURCE

    @property
    def slices(self) -> int:
        return self.allocatable.get(self.resource, 0)


def selected_key(labels: Mapping[str, str], policy_config: Mapping) -> str | None:
    """The ConfigMap key the operator's config-manager picks for a node, or None."""
    if not policy_config.get("name"):
        return None  # no config at all: the operator runs the plugin without one
    return labels.get(NODE_CONFIG_LABEL) or policy_config.get("default") or None


def node_sharing(
    labels: Mapping[str, str], policy_config: Mapping, configs: Mapping[str, Sharing]
) -> Sharing:
    """The sharing a node gets from a policy config and the validated ConfigMap."""
    key = selected_key(labels, policy_config)
    if key is None:
        return NOT_SHARED
    if key not in configs:
        raise ConfigError(
            f'selects config "{key}", which the ConfigMap {policy_config.get("name")} does '
            "not have (the device plugin would not start)"
        )
    return configs[key]


def mismatches(node: GpuNode, sharing: Sharing) -> list[str]:
    """How the node differs from what ``sharing`` makes the plugin and GFD show."""
    gpus = node.gpus
    if gpus is None:
        return [f"has no {COUNT_LABEL} label"]
    problems = []
    want = gpus * sharing.replicas
    have = node.allocatable.get(sharing.resource, 0)
    if have != want:
        problems.append(f"{sharing.resource} allocatable {have}, expected {want}")
    other = GPU_RESOURCE if sharing.resource == SHARED_RESOURCE else SHARED_RESOURCE
    if node.allocatable.get(other, 0) > 0:
        problems.append(f"{other} allocatable {node.allocatable[other]}, expected 0")
    if node.labels.get(REPLICAS_LABEL) != str(sharing.replicas):
        problems.append(
            f"label {REPLICAS_LABEL}={node.labels.get(REPLICAS_LABEL)}, expected {sharing.replicas}"
        )
    if node.strategy != sharing.strategy:
        problems.append(f"label {STRATEGY_LABEL}={node.strategy}, expected {sharing.strategy}")
    product = node.labels.get(PRODUCT_LABEL)
    if product is not None:
        want_suffix = sharing.shared and not sharing.renamed
        if product.endswith(SHARED_SUFFIX) != want_suffix:
            problems.append(f"label {PRODUCT_LABEL}={product}")
    return problems


def _split_selector(selector: str) -> list[str]:
    terms, depth, start = [], 0, 0
    for index, char in enumerate(selector):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(selector[start:index])
            start = index + 1
    terms.append(selector[start:])
    return [t.strip() for t in terms]


def selector_variants(selector: str) -> list[str]:
    """``selector``, plus a variant with the shared product name where it pins one.

    GFD appends ``-SHARED`` to ``nvidia.com/gpu.product`` once a GPU is shared,
    so ``--nodes nvidia.com/gpu.product=Tesla-T4`` would find nothing the second
    time; the variant lets a repeated ``setup`` select the same nodes.
    """
    terms = _split_selector(selector)
    changed = []
    for term in terms:
        for operator in ("==", "="):
            name, sep, value = term.partition(operator)
            if sep and name.strip() == PRODUCT_LABEL and "!" not in name:
                value = value.strip()
                if not value.endswith(SHARED_SUFFIX):
                    term = f"{PRODUCT_LABEL}={value}{SHARED_SUFFIX}"
                break
        changed.append(term)
    variant = ",".join(changed)
    return [selector] if variant == ",".join(terms) else [selector, variant]


# -- pods ---------------------------------------------------------------------------
def _container_requests(container: Mapping) -> dict[str, int]:
    resources = container.get("resources") or {}
    # for extended resources requests equal limits; either may be given alone
    merged = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
    return {k: parse_count(v) for k, v in merged.items() if k.startswith("nvidia.com/")}


def pod_gpu_requests(pod: Mapping) -> dict[str, int]:
    """The NVIDIA resources a pod holds: max(sum of containers, largest init container)."""
    spec = pod.get("spec") or {}
    total: dict[str, int] = {}
    for container in spec.get("containers") or []:
        for name, count in _container_requests(container).items():
            total[name] = total.get(name, 0) + count
    for container in spec.get("initContainers") or []:
        for name, count in _container_requests(container).items():
            total[name] = max(total.get(name, 0), count)
    return {k: v for k, v in total.items() if v > 0}


def pod_name(pod: Mapping) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


def is_terminal(pod: Mapping) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def selector_matches(node_selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in (node_selector or {}).items())


def pending_gpu_pods(pods: Iterable[Mapping], nodes: Mapping[str, Mapping[str, str]]) -> list[str]:
    """Pending pods wanting GPUs that could be admitted on one of ``nodes`` (name: labels).

    Both those already bound to such a node (being admitted) and unscheduled ones
    whose nodeSelector fits such a node count: when the plugin re-registers, the
    scheduler may place them there, and the kubelet then rejects them for good.
    """
    found = []
    for pod in pods:
        if (pod.get("status") or {}).get("phase") != "Pending":
            continue
        if (pod.get("metadata") or {}).get("deletionTimestamp") or not pod_gpu_requests(pod):
            continue
        spec = pod.get("spec") or {}
        node = spec.get("nodeName")
        if node:
            if node in nodes:
                found.append(pod_name(pod))
        elif any(selector_matches(spec.get("nodeSelector"), labels) for labels in nodes.values()):
            found.append(pod_name(pod))
    return sorted(found)


# -- plans --------------------------------------------------------------------------
@dataclass
class NodeChange:
    """One node's before and after, and whether its device plugin must restart."""

    name: str
    before: Sharing | None  # None: the current config is broken or unknown
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
    config_map_name: str
    config_map_before: dict | None  # {"metadata": {...}, "data": {...}} or None
    config_map_after: dict | None  # None: delete it (or leave it absent)
    policy_patch: dict
    node_patches: dict[str, dict]
    nodes: list[NodeChange]
    notes: list[str] = field(default_factory=list)

    @property
    def config_map_action(self) -> str | None:
        before, after = self.config_map_before, self.config_map_after
        if before is None:
            return None if after is None else "create"
        if after is None:
            return "delete"
        same = before.get("data") == after.get("data") and _annotations(before) == _annotations(
            after
        )
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
            "notes": self.notes,
        }


def _annotations(obj: Mapping | None) -> dict:
    return dict(((obj or {}).get("metadata") or {}).get("annotations") or {})


def _policy_config(policy: Mapping) -> dict:
    return dict(((policy.get("spec") or {}).get("devicePlugin") or {}).get("config") or {})


def _policy_record(policy: Mapping) -> dict | None:
    raw = _annotations(policy).get(POLICY_RECORD_ANNOTATION)
    if not raw:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        raise ConfigError(
            f"the ClusterPolicy annotation {POLICY_RECORD_ANNOTATION} is not JSON; "
            "someone edited it: fix or remove it by hand"
        ) from None
    if not isinstance(record, dict):
        raise ConfigError(f"the ClusterPolicy annotation {POLICY_RECORD_ANNOTATION} is malformed")
    return record


def config_map_name(policy: Mapping, action: str = "setup") -> str:
    """The ConfigMap that holds (or will hold) our configs.

    The one the ClusterPolicy already names, so that keys others put there keep
    working; for ``disable`` the one the first ``setup`` recorded.
    """
    record = _policy_record(policy) or {}
    named = _policy_config(policy).get("name")
    if action == "disable":
        return record.get("configMap") or named or CONFIG_MAP_NAME
    return named or record.get("configMap") or CONFIG_MAP_NAME


def _owned_keys(config_map: Mapping | None) -> set[str]:
    raw = _annotations(config_map).get(OWNED_KEYS_ANNOTATION)
    try:
        keys = json.loads(raw) if raw else []
    except ValueError:
        keys = []
    return {k for k in keys if isinstance(k, str)} if isinstance(keys, list) else set()


NO_POLICY_MESSAGE = (
    f"no GPU operator ClusterPolicy {CLUSTER_POLICY_NAME!r} "
    f"({CLUSTER_POLICY_PLURAL}.{CLUSTER_POLICY_GROUP}) in this cluster. With the plain "
    "NVIDIA device plugin Helm chart instead, give the plugin the config directly: "
    "gpushare setup --replicas N --print-config > sharing.yaml && helm upgrade -i nvdp "
    "nvdp/nvidia-device-plugin -n nvidia-device-plugin --reuse-values "
    "--set-file config.map.gpushare=sharing.yaml --set config.default=gpushare"
)


def _validated_configs(data: Mapping[str, str], where: str) -> dict[str, Sharing]:
    return {key: check_config(text, key, where) for key, text in sorted(data.items())}


def _node_changes(
    nodes: list[GpuNode],
    after_labels: Mapping[str, Mapping[str, str]],
    policy_before: Mapping,
    policy_after: Mapping,
    configs_before: Mapping[str, Sharing],
    configs_after: Mapping[str, Sharing],
) -> list[NodeChange]:
    policy_changed = bool(merge_patch(dict(policy_before), dict(policy_after)))
    changes = []
    for node in nodes:
        labels_after = after_labels.get(node.name, node.labels)
        key_before = selected_key(node.labels, policy_before)
        key_after = selected_key(labels_after, policy_after)
        try:
            before = node_sharing(node.labels, policy_before, configs_before)
        except ConfigError:
            before = None
        try:
            after = node_sharing(labels_after, policy_after, configs_after)
        except ConfigError as e:
            if key_before == key_after and before is None:
                continue  # broken before us and untouched by us: not ours to judge
            raise ConfigError(f"after this change node {node.name} {e}") from None
        change = NodeChange(node.name, before, after, [], key_before != key_after, policy_changed)
        change.problems = mismatches(node, after)
        if change.affected and node.gpus is None:
            raise ConfigError(
                f"node {node.name} has no {COUNT_LABEL} label, so its capacity cannot be "
                "checked: is GPU feature discovery running there?"
            )
        changes.append(change)
    return changes


def _config_map_object(
    name: str, namespace: str, data: dict[str, str], annotations: dict[str, str]
) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
        "data": data,
    }


def plan_setup(
    policy: Mapping | None,
    config_map: Mapping | None,
    nodes: list[GpuNode],
    sharing: Sharing,
    namespace: str = OPERATOR_NAMESPACE,
    selected: set[str] | None = None,
) -> Plan:
    """The changes that make ``sharing`` the config of all GPU nodes (or of ``selected``).

    ``config_map`` is the ConfigMap the policy names (or ``time-slicing-config``),
    None if it does not exist. Raises ConfigError, having changed nothing, for
    anything we must not build on.
    """
    if policy is None:
        raise ConfigError(NO_POLICY_MESSAGE)
    policy_config = _policy_config(policy)
    record = _policy_record(policy)
    cm_name = policy_config.get("name") or (record or {}).get("configMap") or CONFIG_MAP_NAME
    where = f"ConfigMap {namespace}/{cm_name}"
    data = dict((config_map or {}).get("data") or {})
    owned = _owned_keys(config_map)
    configs = _validated_configs(data, where)

    key, text = config_key(sharing), render_config(sharing)
    if key in data and key not in owned:
        raise ConfigError(
            f'{where} already has a key "{key}" that gpushare did not write; '
            "rename or remove it, then run gpushare again"
        )
    if selected is not None and not selected:
        raise ConfigError("--nodes matches no GPU node")

    new_config = {**policy_config, "name": cm_name}
    node_patches: dict[str, dict] = {}
    after_labels = {n.name: dict(n.labels) for n in nodes}
    if selected is None:
        new_config["default"] = key
    else:
        for node in nodes:
            if node.name not in selected:
                continue
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

    new_data = {**data, key: text}
    # keys of ours that nothing selects any more (an earlier replica count) go
    referenced = {new_config.get("default")} | {
        labels.get(NODE_CONFIG_LABEL) for labels in after_labels.values()
    }
    for old in owned:
        if old != key and old in new_data and old not in referenced:
            del new_data[old]
    new_owned = sorted((owned & set(new_data)) | {key})
    annotations = {**_annotations(config_map), OWNED_KEYS_ANNOTATION: json.dumps(new_owned)}
    if config_map is None:
        annotations[CREATED_ANNOTATION] = "true"
    cm_after = _config_map_object(cm_name, namespace, new_data, annotations)
    cm_before = (
        _config_map_object(cm_name, namespace, data, _annotations(config_map))
        if config_map is not None
        else None
    )

    configs_after = {**configs, key: sharing}
    changes = _node_changes(nodes, after_labels, policy_config, new_config, configs, configs_after)

    policy_patch: dict = {}
    config_patch = merge_patch(policy_config, new_config)
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
        "setup", namespace, cm_name, cm_before, cm_after, policy_patch, node_patches, changes
    )
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
    if sharing.renamed:
        plan.notes.append(
            f"pods must now ask for {SHARED_RESOURCE} (c.GPUShareSpawner.gpu_resource_name); "
            f"those asking for {GPU_RESOURCE} will not be scheduled on these nodes"
        )
    return plan


def plan_disable(
    policy: Mapping | None,
    config_map: Mapping | None,
    nodes: list[GpuNode],
    namespace: str = OPERATOR_NAMESPACE,
) -> Plan:
    """The changes that put back what was there before the first ``setup``."""
    if policy is None:
        raise ConfigError(NO_POLICY_MESSAGE)
    policy_config = _policy_config(policy)
    record = _policy_record(policy)
    cm_name = config_map_name(policy, "disable")
    where = f"ConfigMap {namespace}/{cm_name}"
    data = dict((config_map or {}).get("data") or {})
    owned = _owned_keys(config_map) & set(data)
    recorded_nodes = [n for n in nodes if NODE_RECORD_ANNOTATION in n.annotations]
    if record is None and not owned and not recorded_nodes:
        plan = Plan("disable", namespace, cm_name, None, None, {}, {}, [])
        plan.notes.append("gpushare has not set up GPU sharing in this cluster")
        return plan
    configs = _validated_configs(data, where)

    policy_patch: dict = {}
    restored = policy_config
    if record is not None:
        original = record.get("config")
        restored = dict(original) if isinstance(original, dict) else {}
        spec = policy.get("spec") or {}
        device_plugin = dict(spec.get("devicePlugin") or {})
        if original is None:
            device_plugin.pop("config", None)
        else:
            device_plugin["config"] = original
        if not record.get("devicePlugin", True) and not device_plugin:
            new_spec = {k: v for k, v in spec.items() if k != "devicePlugin"}
        else:
            new_spec = {**spec, "devicePlugin": device_plugin}
        spec_patch = merge_patch(spec, new_spec)
        if spec_patch:
            policy_patch["spec"] = spec_patch
        policy_patch["metadata"] = {"annotations": {POLICY_RECORD_ANNOTATION: None}}

    node_patches: dict[str, dict] = {}
    after_labels = {n.name: dict(n.labels) for n in nodes}
    for node in recorded_nodes:
        try:
            original_label = json.loads(node.annotations[NODE_RECORD_ANNOTATION])
        except ValueError:
            original_label = None
        patch: dict[str, dict] = {"annotations": {NODE_RECORD_ANNOTATION: None}}
        if node.labels.get(NODE_CONFIG_LABEL) != original_label:
            patch["labels"] = {NODE_CONFIG_LABEL: original_label}
            if original_label is None:
                after_labels[node.name].pop(NODE_CONFIG_LABEL, None)
            else:
                after_labels[node.name][NODE_CONFIG_LABEL] = original_label
        node_patches[node.name] = {"metadata": patch}

    new_data = {k: v for k, v in data.items() if k not in owned}
    annotations = {
        k: v
        for k, v in _annotations(config_map).items()
        if k not in (OWNED_KEYS_ANNOTATION, CREATED_ANNOTATION)
    }
    created = _annotations(config_map).get(CREATED_ANNOTATION) == "true"
    cm_before = (
        _config_map_object(cm_name, namespace, data, _annotations(config_map))
        if config_map is not None
        else None
    )
    if config_map is None or (created and not new_data):
        cm_after = None
    elif _annotations(config_map).get(OWNED_KEYS_ANNOTATION) is None and not owned:
        cm_after = cm_before  # never ours: leave it exactly as it is
    else:
        cm_after = _config_map_object(cm_name, namespace, new_data, annotations)

    configs_after = {k: v for k, v in configs.items() if k in new_data}
    if cm_after is None and restored.get("name") == cm_name and config_map is not None:
        # the original config names this ConfigMap: keep it, even empty
        cm_after = _config_map_object(cm_name, namespace, new_data, annotations)
    changes = _node_changes(nodes, after_labels, policy_config, restored, configs, configs_after)
    plan = Plan(
        "disable", namespace, cm_name, cm_before, cm_after, policy_patch, node_patches, changes
    )
    if record is None and (owned or node_patches):
        plan.notes.append(
            "the ClusterPolicy carries no record of its earlier config; it is left as it is"
        )
    return plan


# -- permissions --------------------------------------------------------------------
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
        Access("get", CLUSTER_POLICY_PLURAL, CLUSTER_POLICY_GROUP),
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


# -- reports ------------------------------------------------------------------------
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


def summary_lines(figures: Mapping) -> list[str]:
    replicas = figures["replicas"]
    if isinstance(replicas, list):
        replicas = ", ".join(map(str, replicas)) + " (differs per node)" if replicas else "-"
    rows = [
        ("Physical GPUs", figures["physical_gpus"]),
        ("Replicas per GPU", replicas),
        ("Virtual GPUs", figures["virtual_gpus"]),
        ("Max concurrent users", figures["max_concurrent_users"]),
    ]
    return [f"  {name + ':':<22}{value}" for name, value in rows]


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """A plain text table, columns padded to their widest cell."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells
    )


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


def status_report(
    nodes: Iterable[GpuNode], pods: Iterable[Mapping], policy: Mapping | None
) -> dict:
    """Per node: GPUs, sharing, slices allocatable/used/free, holders; and what waits."""
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
    rows = []
    for node in nodes:
        used = sum(h["requests"].get(node.resource, 0) for h in holders[node.name])
        rows.append(
            {
                **node_row(node),
                "config": selected_key(node.labels, _policy_config(policy or {})),
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
            "name": (policy.get("metadata") or {}).get("name"),
            "config": _policy_config(policy) or None,
            "set_up_by_gpushare": POLICY_RECORD_ANNOTATION in _annotations(policy),
        }
    return {"cluster_policy": policy_info, "nodes": rows, "pending": pending, "summary": figures}


# -- plan presentation ----------------------------------------------------------------
class _BlockDumper(yaml.SafeDumper):
    """safe_dump, with multi-line strings (device plugin configs) as literal blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _represent_str)


def to_yaml(obj: object) -> str:
    return yaml.dump(obj, Dumper=_BlockDumper, sort_keys=False, default_flow_style=False)


def _compact(obj: object) -> str:
    return json.dumps(obj, separators=(", ", ": "))


def plan_lines(plan: Plan, full: bool = False) -> list[str]:
    """What a plan does, one line per object; ``full`` adds the objects and patches."""
    lines: list[str] = []
    action = plan.config_map_action
    if action:
        before = (plan.config_map_before or {}).get("data") or {}
        after = (plan.config_map_after or {}).get("data") or {}
        parts = []
        for verb, keys in (
            ("add", sorted(set(after) - set(before))),
            ("update", sorted(k for k in set(after) & set(before) if after[k] != before[k])),
            ("remove", sorted(set(before) - set(after))),
        ):
            if keys:
                parts.append(f"{verb} {', '.join(keys)}")
        detail = f" ({'; '.join(parts)})" if parts and action != "delete" else ""
        lines.append(f"ConfigMap {plan.namespace}/{plan.config_map_name}: {action}{detail}")
        if full and action != "delete":
            lines += ["    " + line for line in to_yaml(plan.config_map_after).splitlines()]
    if plan.policy_patch:
        if full:
            lines.append(f"ClusterPolicy {CLUSTER_POLICY_NAME}: merge patch")
            lines += ["    " + line for line in to_yaml(plan.policy_patch).splitlines()]
        else:
            config = (plan.policy_patch.get("spec") or {}).get("devicePlugin")
            what = f"spec.devicePlugin {_compact(config)}" if config else "annotations only"
            lines.append(f"ClusterPolicy {CLUSTER_POLICY_NAME}: patch {what}")
    for node, patch in sorted(plan.node_patches.items()):
        lines.append(f"node {node}: patch {_compact(patch['metadata'])}")
    for change in plan.affected:
        before = change.before.describe() if change.before else "unknown or broken config"
        why = "" if change.before != change.after else " (restart only)"
        lines.append(
            f"node {change.name}: restart the device plugin; {before} -> "
            f"{change.after.describe()}{why}"
        )
    return lines
