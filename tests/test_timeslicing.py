"""The pure logic behind ``gpushare setup|status|disable``: configs, plans, reports."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from jupyterhub_gpushare import timeslicing as ts
from jupyterhub_gpushare.timeslicing import ConfigError, GpuNode, Sharing

GPU_CONFIG = """\
version: v1
sharing:
  timeSlicing:
    resources:
    - name: nvidia.com/gpu
      replicas: {replicas}
"""

sharings = st.builds(
    Sharing,
    strategy=st.sampled_from(ts.STRATEGIES),
    replicas=st.integers(min_value=2, max_value=64),
    renamed=st.booleans(),
)


# -- --replicas ----------------------------------------------------------------------
@given(st.integers(min_value=2, max_value=10**6))
def test_replicas_of_two_or_more_are_accepted(n):
    assert ts.parse_replicas(str(n)) == n
    assert ts.parse_replicas(f" {n} ") == n


@given(st.integers(max_value=1))
def test_replicas_below_two_are_refused(n):
    with pytest.raises(ConfigError, match="at least 2"):
        ts.parse_replicas(str(n))


@pytest.mark.parametrize("text", ["abc", "", "4.0", "2e3", "four", "0x10", "4 4"])
def test_replicas_that_are_not_numbers_are_refused(text):
    with pytest.raises(ConfigError, match="whole number"):
        ts.parse_replicas(text)


# -- the config we write -------------------------------------------------------------------
@given(sharings)
def test_rendered_config_parses_back_strictly(sharing):
    text = ts.render_config(sharing)
    assert ts.parse_config(text) == sharing
    section = "timeSlicing" if sharing.strategy == "time-slicing" else "mps"
    assert yaml.safe_load(text)["sharing"][section]["resources"] == [
        {"name": "nvidia.com/gpu", "replicas": sharing.replicas}
    ]


@given(sharings, sharings)
def test_config_keys_name_one_config_each(a, b):
    assert (ts.config_key(a) == ts.config_key(b)) == (a == b)
    assert ts.config_key(a).startswith(ts.KEY_PREFIX)


def test_seed_config_shape():
    assert yaml.safe_load(ts.render_config(Sharing("time-slicing", 4))) == {
        "version": "v1",
        "sharing": {"timeSlicing": {"resources": [{"name": "nvidia.com/gpu", "replicas": 4}]}},
    }


def test_renamed_resource():
    sharing = Sharing("time-slicing", 4, renamed=True)
    assert sharing.resource == ts.SHARED_RESOURCE
    assert yaml.safe_load(ts.render_config(sharing))["sharing"]["timeSlicing"]["renameByDefault"]


# -- strict validation of existing configs ---------------------------------------------------
@pytest.mark.parametrize(
    ("text", "message"),
    [
        # misplaced: renameByDefault belongs under sharing.timeSlicing (k8s-device-plugin#1433)
        ("version: v1\nflags:\n  renameByDefault: true\n", '"flags.renameByDefault"'),
        (GPU_CONFIG.format(replicas=4) + "      replica: 2\n", "resources[0].replica"),
        ("version: v1\nsharing:\n  timeslicing: {}\n", '"sharing.timeslicing"'),
        ("versoin: v1\n", '"versoin"'),
        ("version: v1\nflags:\n  plugin:\n    passDeviceSpec: true\n", "passDeviceSpec"),
    ],
)
def test_unknown_keys_are_named(text, message):
    with pytest.raises(ConfigError, match="unknown field") as error:
        ts.parse_config(text)
    assert message in str(error.value)
    assert "silently ignore" in str(error.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GPU_CONFIG.format(replicas=1), "at least 2"),
        (GPU_CONFIG.format(replicas='"4"'), "must be a whole number"),
        (GPU_CONFIG.format(replicas="true"), "must be a whole number"),
        ("version: v2\n", "only knows"),
        ("version: 1\n", "must be a string"),
        ("version: v1\nsharing:\n  timeSlicing:\n    resources: []\n", "missing or empty"),
        ("version: v1\nsharing:\n  timeSlicing: {}\n", "missing or empty"),
        ("version: v1\nsharing:\n  mps:\n", "missing"),
        (
            "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n",
            'replicas" is missing',
        ),
        (
            GPU_CONFIG.format(replicas=2)
            + "  mps:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 2\n",
            "mutually exclusive",
        ),
        (GPU_CONFIG.format(replicas=2) + "      devices: [0]\n", "devices"),
        (GPU_CONFIG.format(replicas=2) + "      rename: my-gpu\n", "rename"),
        (GPU_CONFIG.format(replicas=2).replace("nvidia.com/gpu", "nvidia.com/tpu"), "only"),
        ("version: v1\nresources:\n  gpus:\n  - pattern: '*'\n    name: gpu\n", "resources"),
        ("version: v1\nversion: v1\n", "duplicate key"),
        ("version: v1\nsharing: [\n", "not valid YAML at line"),
        ("- a\n- b\n", "mapping"),
        ("version: v1\nflags:\n  failOnInitError: maybe\n", "true or false"),
    ],
)
def test_configs_the_plugin_rejects_or_misreads_are_refused(text, message):
    with pytest.raises(ConfigError) as error:
        ts.parse_config(text)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ts.NOT_SHARED),
        ("version: v1\nflags:\n  migStrategy: none\n  failOnInitError: true\n", ts.NOT_SHARED),
        (
            GPU_CONFIG.format(replicas=3).replace("nvidia.com/gpu", "gpu"),
            Sharing("time-slicing", 3),
        ),
        (
            "sharing:\n  mps:\n    renameByDefault: true\n    resources:\n"
            "    - name: nvidia.com/gpu\n      replicas: 5\n      rename: nvidia.com/gpu.shared\n",
            Sharing("mps", 5, True),
        ),
        (
            "version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
            "    - name: nvidia.com/mig-1g.10gb\n      replicas: 2\n",
            ts.NOT_SHARED,  # only MIG devices are shared; full GPUs are not
        ),
        (
            "version: v1\nflags:\n  plugin:\n    deviceListStrategy: [envvar, cdi-cri]\n",
            ts.NOT_SHARED,
        ),
    ],
)
def test_valid_configs(text, expected):
    assert ts.parse_config(text) == expected


json_keys = st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)


@given(sharings, st.data())
def test_any_unknown_key_anywhere_is_refused(sharing, data):
    config = ts.build_config(sharing)
    mappings = [("", config)]
    section = next(iter(config["sharing"].values()))
    mappings += [
        ("sharing", config["sharing"]),
        ("sharing.x", section),
        ("sharing.x.resources[0]", section["resources"][0]),
    ]
    _, target = data.draw(st.sampled_from(mappings))
    key = data.draw(json_keys.filter(lambda k: k not in target))
    assume(not (target is config and key in ts._SCHEMA))
    target[key] = data.draw(st.one_of(st.booleans(), st.integers(), json_keys))
    with pytest.raises(ConfigError, match=f'unknown field "[^"]*{key}"'):
        ts.parse_config(yaml.safe_dump(config))


def test_check_config_says_where():
    with pytest.raises(
        ConfigError, match='config "t4" in ConfigMap gpu-operator/x: unknown field "x"'
    ):
        ts.check_config("version: v1\nx: 1\n", "t4", "ConfigMap gpu-operator/x")


# -- merge patches --------------------------------------------------------------------------
json_values = st.recursive(
    st.one_of(st.booleans(), st.integers(), json_keys),
    lambda children: (
        st.dictionaries(json_keys, children, max_size=4) | st.lists(children, max_size=3)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(json_keys, json_values, max_size=5)


@given(json_objects, json_objects)
def test_merge_patch_turns_current_into_desired(current, desired):
    patch = ts.merge_patch(current, desired)
    assert ts.apply_merge_patch(current, patch) == desired
    assert ts.merge_patch(current, current) == {}


# -- nodes ----------------------------------------------------------------------------------
def node_api(name="n1", gpus=1, replicas=1, strategy=None, renamed=False, labels=None, **alloc):
    shared = replicas > 1
    resources = {"nvidia.com/gpu": str(0 if renamed and shared else gpus * replicas)}
    if renamed and shared:
        resources["nvidia.com/gpu.shared"] = str(gpus * replicas)
    resources.update(alloc)
    product = "Tesla-T4" + ("-SHARED" if shared and not renamed else "")
    return {
        "metadata": {
            "name": name,
            "labels": {
                ts.GPU_PRESENT_LABEL: "true",
                ts.COUNT_LABEL: str(gpus),
                ts.REPLICAS_LABEL: str(replicas),
                ts.STRATEGY_LABEL: strategy or ("time-slicing" if shared else "none"),
                ts.PRODUCT_LABEL: product,
                **(labels or {}),
            },
        },
        "status": {"allocatable": {"cpu": "8", **resources}},
    }


def test_gpu_node_reads_gfd_labels_and_capacity():
    node = GpuNode.from_api(node_api(gpus=2, replicas=4))
    assert (node.gpus, node.replicas, node.strategy, node.slices) == (2, 4, "time-slicing", 8)
    assert node.product == "Tesla-T4"
    assert "cpu" not in node.allocatable
    renamed = GpuNode.from_api(node_api(gpus=2, replicas=3, renamed=True))
    assert (renamed.resource, renamed.slices) == (ts.SHARED_RESOURCE, 6)


def test_mismatches_list_what_differs():
    node = GpuNode.from_api(node_api(gpus=2, replicas=1))
    assert ts.mismatches(node, ts.NOT_SHARED) == []
    problems = ts.mismatches(node, Sharing("time-slicing", 4))
    assert "nvidia.com/gpu allocatable 2, expected 8" in problems
    assert any(ts.REPLICAS_LABEL in p for p in problems)
    assert any(ts.STRATEGY_LABEL in p for p in problems)
    assert any(ts.PRODUCT_LABEL in p for p in problems)
    shared = GpuNode.from_api(node_api(gpus=2, replicas=4, strategy="mps", renamed=True))
    assert ts.mismatches(shared, Sharing("mps", 4, True)) == []
    assert ts.mismatches(shared, Sharing("mps", 4)) != []
    unlabelled = GpuNode("x", labels={}, allocatable={})
    assert ts.mismatches(unlabelled, ts.NOT_SHARED) == [f"has no {ts.COUNT_LABEL} label"]


def test_selected_key_follows_the_operator():
    configs = {"a": Sharing("time-slicing", 2), "b": Sharing("mps", 4)}
    policy = {"name": "cm", "default": "a"}
    assert ts.selected_key({}, policy) == "a"
    assert ts.selected_key({ts.NODE_CONFIG_LABEL: "b"}, policy) == "b"
    assert ts.selected_key({ts.NODE_CONFIG_LABEL: "b"}, {"default": "a"}) is None
    assert ts.node_sharing({}, {"name": "cm"}, configs) == ts.NOT_SHARED  # fallback: empty
    assert ts.node_sharing({ts.NODE_CONFIG_LABEL: "b"}, policy, configs) == configs["b"]
    with pytest.raises(ConfigError, match="not start"):
        ts.node_sharing({ts.NODE_CONFIG_LABEL: "zz"}, policy, configs)


def test_selector_variants_match_the_shared_product_name():
    assert ts.selector_variants(f"{ts.PRODUCT_LABEL}=Tesla-T4") == [
        f"{ts.PRODUCT_LABEL}=Tesla-T4",
        f"{ts.PRODUCT_LABEL}=Tesla-T4-SHARED",
    ]
    assert ts.selector_variants(f"a in (x,y),{ts.PRODUCT_LABEL}==T4")[1] == (
        f"a in (x,y),{ts.PRODUCT_LABEL}=T4-SHARED"
    )
    assert ts.selector_variants("a=b") == ["a=b"]
    assert ts.selector_variants(f"{ts.PRODUCT_LABEL}!=T4") == [f"{ts.PRODUCT_LABEL}!=T4"]
    assert len(ts.selector_variants(f"{ts.PRODUCT_LABEL}=T4-SHARED")) == 1


# -- pods -----------------------------------------------------------------------------------
def pod(name, phase="Pending", node=None, selector=None, gpus=1, init=0, ns="jh", deleting=False):
    container = {"name": "c", "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}
    spec = {"containers": [container], "nodeSelector": selector or {}}
    if init:
        spec["initContainers"] = [{"resources": {"requests": {"nvidia.com/gpu": str(init)}}}]
    if node:
        spec["nodeName"] = node
    meta = {"name": name, "namespace": ns}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "spec": spec, "status": {"phase": phase}}


def test_pod_gpu_requests():
    assert ts.pod_gpu_requests(pod("a", gpus=2)) == {"nvidia.com/gpu": 2}
    assert ts.pod_gpu_requests(pod("a", gpus=1, init=3)) == {"nvidia.com/gpu": 3}
    assert ts.pod_gpu_requests(pod("a", gpus=0)) == {}
    two = pod("a")
    two["spec"]["containers"].append(copy.deepcopy(two["spec"]["containers"][0]))
    assert ts.pod_gpu_requests(two) == {"nvidia.com/gpu": 2}


def test_pending_gpu_pods_that_could_land_on_restarting_nodes():
    nodes = {"n1": {"model": "a"}, "n2": {"model": "b"}}
    pods = [
        pod("bound", node="n1"),
        pod("bound-elsewhere", node="n9"),
        pod("fits", selector={"model": "b"}),
        pod("anywhere"),
        pod("does-not-fit", selector={"model": "c"}),
        pod("running", phase="Running", node="n1"),
        pod("cpu-only", gpus=0),
        pod("going", deleting=True),
    ]
    assert ts.pending_gpu_pods(pods, nodes) == ["jh/anywhere", "jh/bound", "jh/fits"]
    assert ts.pending_gpu_pods(pods, {}) == []


# -- plans ----------------------------------------------------------------------------------
def policy_object(config=None, device_plugin=True, annotations=None):
    spec: dict = {"operator": {"defaultRuntime": "containerd"}}
    if device_plugin:
        spec["devicePlugin"] = {"enabled": True}
        if config is not None:
            spec["devicePlugin"]["config"] = config
    return {
        "metadata": {"name": ts.CLUSTER_POLICY_NAME, "annotations": annotations or {}},
        "spec": spec,
    }


def test_first_setup_creates_the_config_map_and_records_the_original():
    nodes = [GpuNode.from_api(node_api("n1"))]
    plan = ts.plan_setup(
        policy_object({"name": "", "default": ""}), None, nodes, Sharing("time-slicing", 4)
    )
    assert plan.config_map_action == "create"
    assert plan.config_map_after["data"] == {
        "gpushare-time-slicing-4": ts.render_config(Sharing("time-slicing", 4))
    }
    assert plan.policy_patch["spec"] == {
        "devicePlugin": {
            "config": {"name": ts.CONFIG_MAP_NAME, "default": "gpushare-time-slicing-4"}
        }
    }
    record = json.loads(plan.policy_patch["metadata"]["annotations"][ts.POLICY_RECORD_ANNOTATION])
    assert record == {
        "configMap": ts.CONFIG_MAP_NAME,
        "config": {"name": "", "default": ""},
        "devicePlugin": True,
    }
    assert [c.name for c in plan.affected] == ["n1"]
    assert [a.describe() for a in ts.write_access(plan)] == [
        "create configmaps in namespace gpu-operator",
        "patch clusterpolicies.nvidia.com (cluster-wide)",
        "delete pods in namespace gpu-operator",
    ]
    lines = ts.plan_lines(plan)
    assert (
        lines[0]
        == "ConfigMap gpu-operator/time-slicing-config: create (add gpushare-time-slicing-4)"
    )
    assert any(line.startswith("node n1: restart the device plugin") for line in lines)


def test_no_cluster_policy_points_to_the_helm_chart():
    with pytest.raises(ConfigError, match="helm upgrade") as error:
        ts.plan_setup(None, None, [], Sharing("time-slicing", 4))
    assert "--print-config" in str(error.value)
    with pytest.raises(ConfigError, match="no GPU operator ClusterPolicy"):
        ts.plan_disable(None, None, [])


def test_a_key_with_our_name_that_we_did_not_write_is_not_taken_over():
    cm = {"metadata": {}, "data": {"gpushare-time-slicing-4": GPU_CONFIG.format(replicas=4)}}
    policy = policy_object({"name": ts.CONFIG_MAP_NAME})
    with pytest.raises(ConfigError, match="did not write"):
        ts.plan_setup(policy, cm, [], Sharing("time-slicing", 4))


def test_a_typo_in_someone_elses_config_stops_setup():
    cm = {"metadata": {}, "data": {"t4": GPU_CONFIG.format(replicas=2) + "      replica: 3\n"}}
    policy = policy_object({"name": ts.CONFIG_MAP_NAME})
    with pytest.raises(
        ConfigError, match='config "t4" in ConfigMap gpu-operator/time-slicing-config'
    ):
        ts.plan_setup(policy, cm, [], Sharing("time-slicing", 4))


def test_selection_that_matches_nothing_is_refused():
    with pytest.raises(ConfigError, match="matches no GPU node"):
        ts.plan_setup(policy_object(), None, [], Sharing("time-slicing", 4), selected=set())


def test_disable_without_setup_has_nothing_to_do():
    plan = ts.plan_disable(policy_object({"name": "x", "default": "y"}), None, [])
    assert not plan.changes_anything
    assert "not set up" in plan.notes[0]


# -- a property: any sequence of setups, then disable, restores exactly --------------------
THEIR_CONFIGS = {
    "two": GPU_CONFIG.format(replicas=2),
    "plain": "version: v1\nflags:\n  migStrategy: none\n",
}
ORIGINALS = {
    "no devicePlugin": (policy_object(device_plugin=False), None),
    "no config": (policy_object(), None),
    "empty config": (policy_object({"name": "", "default": ""}), None),
    "their config": (
        policy_object({"name": "theirs", "default": "two"}),
        {"metadata": {"name": "theirs", "annotations": {"keep": "me"}}, "data": THEIR_CONFIGS},
    ),
}


def plugin_restart(node: dict, sharing: Sharing) -> None:
    """What the device plugin and GFD do to a node when they start with ``sharing``."""
    labels = node["metadata"]["labels"]
    gpus = int(labels[ts.COUNT_LABEL])
    product = labels[ts.PRODUCT_LABEL].removesuffix("-SHARED")
    labels[ts.PRODUCT_LABEL] = product + (
        "-SHARED" if sharing.shared and not sharing.renamed else ""
    )
    labels[ts.REPLICAS_LABEL] = str(sharing.replicas)
    labels[ts.STRATEGY_LABEL] = sharing.strategy
    allocatable = {"cpu": "8", sharing.resource: str(gpus * sharing.replicas)}
    if sharing.resource == ts.SHARED_RESOURCE:
        allocatable[ts.GPU_RESOURCE] = "0"
    node["status"]["allocatable"] = allocatable


def effective(node: dict, policy: dict, cm: dict | None) -> Sharing:
    data = (cm or {}).get("data") or {}
    configs = {k: ts.parse_config(v) for k, v in data.items()}
    config = policy["spec"].get("devicePlugin", {}).get("config") or {}
    return ts.node_sharing(node["metadata"]["labels"], config, configs)


def apply(state: dict, plan: ts.Plan) -> dict:
    """The cluster after the CLI wrote ``plan`` and restarted the affected plugins."""
    state = copy.deepcopy(state)
    state["policy"] = ts.apply_merge_patch(state["policy"], plan.policy_patch)
    state["cm"] = copy.deepcopy(plan.config_map_after)
    for node in state["nodes"]:
        patch = plan.node_patches.get(node["metadata"]["name"], {}).get("metadata", {})
        for part in ("labels", "annotations"):
            if part in patch:
                node["metadata"][part] = ts.apply_merge_patch(
                    node["metadata"].get(part) or {}, patch[part]
                )
    restarted = {c.name for c in plan.affected}
    for node in state["nodes"]:
        if node["metadata"]["name"] in restarted:
            plugin_restart(node, effective(node, state["policy"], state["cm"]))
    return state


def plan_for(state: dict, op) -> ts.Plan:
    nodes = [GpuNode.from_api(n) for n in state["nodes"]]
    if op == "disable":
        return ts.plan_disable(state["policy"], state["cm"], nodes)
    sharing, model = op
    selected = None
    if model is not None:
        selected = {n.name for n in nodes if n.labels.get("model") == model}
    return ts.plan_setup(state["policy"], state["cm"], nodes, sharing, selected=selected)


def comparable(state: dict) -> dict:
    cm = state["cm"]
    return {
        "policy": state["policy"],
        "cm": cm and {"data": cm["data"], "annotations": cm["metadata"].get("annotations") or {}},
        # the API server drops an emptied annotations map: {} and absent are the same
        "nodes": [
            {
                **n,
                "metadata": {
                    **n["metadata"],
                    "annotations": n["metadata"].get("annotations") or {},
                },
            }
            for n in state["nodes"]
        ],
    }


operations = st.lists(
    st.tuples(sharings, st.sampled_from([None, "a", "b"])), min_size=1, max_size=4
)


@settings(max_examples=100, deadline=None)
@given(
    original=st.sampled_from(sorted(ORIGINALS)),
    models=st.lists(st.sampled_from("ab"), min_size=1, max_size=3),
    gpus=st.integers(min_value=1, max_value=8),
    steps=operations,
)
def test_setups_are_idempotent_and_disable_restores_exactly(original, models, gpus, steps):
    policy, cm = copy.deepcopy(ORIGINALS[original])
    nodes = [
        node_api(f"n{i}", gpus=gpus, labels={"model": model}) for i, model in enumerate(models)
    ]
    state = {"policy": policy, "cm": cm, "nodes": nodes}
    for node in state["nodes"]:  # the plugin runs with the original config
        plugin_restart(node, effective(node, policy, cm))
    start = copy.deepcopy(state)

    for sharing, model in steps:
        assume(model is None or model in models)
        plan = plan_for(state, (sharing, model))
        state = apply(state, plan)
        # every node shows what its config gives: the plan restarted all it had to
        for node in state["nodes"]:
            assert (
                ts.mismatches(GpuNode.from_api(node), effective(node, state["policy"], state["cm"]))
                == []
            )
        # a cluster-wide setup changes the default; nodes set up one by one keep theirs
        selected = [
            n
            for n in state["nodes"]
            if (model is None and ts.NODE_CONFIG_LABEL not in n["metadata"]["labels"])
            or n["metadata"]["labels"]["model"] == model
        ]
        for node in selected:
            assert effective(node, state["policy"], state["cm"]) == sharing
        again = plan_for(state, (sharing, model))
        assert not again.changes_anything, ts.plan_lines(again)
        # foreign keys are never touched
        if original == "their config":
            assert {k: state["cm"]["data"][k] for k in THEIR_CONFIGS} == THEIR_CONFIGS

    state = apply(state, plan_for(state, "disable"))
    assert comparable(state) == comparable(start)
    assert not plan_for(state, "disable").changes_anything


# -- reports --------------------------------------------------------------------------------
def test_status_report_counts_slices_and_waiters():
    nodes = [
        GpuNode.from_api(node_api("n1", gpus=1, replicas=4, labels={"model": "a"})),
        GpuNode.from_api(node_api("n2", gpus=2, replicas=2, renamed=True, labels={"model": "b"})),
    ]
    waiting = pod("waiter", selector={"model": "a"}, gpus=2)
    waiting["status"]["conditions"] = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.",
        }
    ]
    pods = [
        pod("a", phase="Running", node="n1", gpus=3),
        pod("done", phase="Succeeded", node="n1", gpus=1),
        {
            **pod("s", phase="Running", node="n2"),
            "spec": {
                "nodeName": "n2",
                "containers": [{"resources": {"limits": {"nvidia.com/gpu.shared": "1"}}}],
            },
        },
        waiting,
    ]
    policy = policy_object(
        {"name": "cm", "default": "k"}, annotations={ts.POLICY_RECORD_ANNOTATION: "{}"}
    )
    report = ts.status_report(nodes, pods, policy)
    rows = {r["node"]: r for r in report["nodes"]}
    assert (rows["n1"]["slices"], rows["n1"]["used"], rows["n1"]["free"]) == (4, 3, 1)
    assert rows["n1"]["pods"] == ["jh/a"] and rows["n1"]["pending"] == ["jh/waiter"]
    assert (rows["n2"]["resource"], rows["n2"]["used"], rows["n2"]["free"]) == (
        ts.SHARED_RESOURCE,
        1,
        3,
    )
    assert rows["n2"]["pending"] == []
    assert report["pending"][0]["lack_of_slices"] and report["pending"][0]["candidate_nodes"] == [
        "n1"
    ]
    assert report["summary"] == {
        "nodes": 2,
        "physical_gpus": 3,
        "replicas": [2, 4],
        "virtual_gpus": 8,
        "max_concurrent_users": 8,
        "used_slices": 4,
        "free_slices": 4,
    }
    assert report["cluster_policy"]["set_up_by_gpushare"]


def test_summary_in_the_seed_style():
    nodes = [GpuNode.from_api(node_api("n1", gpus=1, replicas=4))]
    lines = ts.summary_lines(ts.summary(nodes))
    assert lines == [
        "  Physical GPUs:        1",
        "  Replicas per GPU:     4",
        "  Virtual GPUs:         4",
        "  Max concurrent users: 4",
    ]


def test_format_table_pads_columns():
    table = ts.format_table(["A", "BB"], [["xxx", 1], ["y", 22]])
    assert table.splitlines() == ["A    BB", "xxx  1", "y    22"]
