"""The pure logic behind ``gpushare setup|status|disable``: configs, plans, health, text.

No cluster here: plans are applied to API-shaped dicts the way the API server, the
device plugin and GFD would (``apply`` and ``plugin_restart`` below). The reading
of configs is held against the device plugin's own code in test_pluginconfig.py.
"""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from jupyterhub_gpushare.sharing.cluster import (
    COMPUTE_MAJOR_LABEL,
    COMPUTE_MINOR_LABEL,
    CONFIG_MAP_NAME,
    COUNT_LABEL,
    DEPLOY_LABEL,
    GPU_PRESENT_LABEL,
    NODE_CONFIG_LABEL,
    POLICY_RECORD_ANNOTATION,
    PRODUCT_LABEL,
    REPLICAS_LABEL,
    STRATEGY_LABEL,
    GpuNode,
    choose_policy,
    ignored_note,
    mismatches,
    node_limit,
    node_sharing,
    pending_gpu_pods,
    pod_gpu_requests,
    selected_key,
    selector_variants,
)
from jupyterhub_gpushare.sharing.health import health, status_report, summary
from jupyterhub_gpushare.sharing.kube import _spec_change
from jupyterhub_gpushare.sharing.plan import (
    Plan,
    apply_merge_patch,
    merge_patch,
    plan_disable,
    plan_setup,
    read_configs,
    write_access,
)
from jupyterhub_gpushare.sharing.pluginconfig import (
    GPU_RESOURCE,
    KEY_PREFIX,
    MAX_SLICES_PER_NODE,
    NOT_SHARED,
    SHARED_RESOURCE,
    STRATEGIES,
    ConfigError,
    Sharing,
    build_config,
    check_config,
    config_key,
    parse_replicas,
    read_config,
    render_config,
)
from jupyterhub_gpushare.sharing.report import format_table, plan_lines, summary_lines

GPU_CONFIG = """\
version: v1
sharing:
  timeSlicing:
    resources:
    - name: nvidia.com/gpu
      replicas: {replicas}
"""
# the seed's manual set-up, as in helm-snippets/time-slicing-configmap.yaml
SEED_DATA = {"any": GPU_CONFIG.format(replicas=4)}

sharings = st.builds(
    Sharing,
    strategy=st.sampled_from(STRATEGIES),
    replicas=st.integers(min_value=2, max_value=48),
    renamed=st.booleans(),
)


# -- --replicas ----------------------------------------------------------------------
@given(st.integers(min_value=2, max_value=MAX_SLICES_PER_NODE))
def test_replicas_a_node_can_serve_are_accepted(n):
    assert parse_replicas(str(n)) == n
    assert parse_replicas(f" {n} ") == n


@given(st.integers(max_value=1))
def test_replicas_below_two_are_refused(n):
    with pytest.raises(ConfigError, match="at least 2"):
        parse_replicas(str(n))


@given(st.integers(min_value=MAX_SLICES_PER_NODE + 1, max_value=10**30))
def test_replicas_no_node_can_serve_are_refused(n):
    with pytest.raises(ConfigError, match="4 MiB") as error:
        parse_replicas(str(n))
    assert str(MAX_SLICES_PER_NODE) in str(error.value)


def test_mps_replicas_stop_at_what_mps_serves():
    assert parse_replicas("48", "mps") == 48
    with pytest.raises(ConfigError, match="at most 48 clients per GPU"):
        parse_replicas("49", "mps")


@pytest.mark.parametrize("text", ["abc", "", "4.0", "2e3", "four", "0x10", "4 4"])
def test_replicas_that_are_not_numbers_are_refused(text):
    with pytest.raises(ConfigError, match="whole number"):
        parse_replicas(text)


# -- the config we write -------------------------------------------------------------------
@given(sharings)
def test_rendered_config_reads_back_as_written(sharing):
    text = render_config(sharing)
    reading = read_config(text)
    assert reading.usable and reading.notes == []
    assert reading.sharing == sharing
    section = "timeSlicing" if sharing.strategy == "time-slicing" else "mps"
    assert yaml.safe_load(text)["sharing"][section]["resources"] == [
        {"name": "nvidia.com/gpu", "replicas": sharing.replicas}
    ]


@given(sharings, sharings)
def test_config_keys_name_one_config_each(a, b):
    assert (config_key(a) == config_key(b)) == (a == b)
    assert config_key(a).startswith(KEY_PREFIX)


def test_seed_config_shape():
    assert yaml.safe_load(render_config(Sharing("time-slicing", 4))) == yaml.safe_load(
        SEED_DATA["any"]
    )


def test_renamed_resource():
    sharing = Sharing("time-slicing", 4, renamed=True)
    assert sharing.resource == SHARED_RESOURCE
    assert yaml.safe_load(render_config(sharing))["sharing"]["timeSlicing"]["renameByDefault"]


# -- reading existing configs the plugin's way: the messages of issue 13 ---------------------
def test_a_key_given_twice_counts_the_last_time():
    reading = read_config(GPU_CONFIG.format(replicas=2) + "      replicas: 6\n")
    assert reading.usable and reading.sharing == Sharing("time-slicing", 6)
    assert any("given twice: the plugin takes the last one" in n for n in reading.notes)


def test_keys_in_another_case_are_honoured_where_go_matches_them():
    reading = read_config(GPU_CONFIG.format(replicas=3).replace("timeSlicing", "timeslicing"))
    assert reading.usable and reading.sharing == Sharing("time-slicing", 3)
    # inside a sharing section the plugin matches exactly: "Replicas" is not "replicas"
    broken = read_config(GPU_CONFIG.format(replicas=3).replace("replicas:", "Replicas:"))
    assert broken.error == "sharing.timeSlicing.resources[0]: no replicas specified"
    assert any("matches names exactly" in n for n in broken.notes)


def test_mps_null_shares_by_time_slicing():
    reading = read_config(GPU_CONFIG.format(replicas=4) + "  mps: null\n")
    assert reading.usable and reading.sharing == Sharing("time-slicing", 4)


def test_with_both_sections_mps_wins():
    text = GPU_CONFIG.format(replicas=4) + "  mps: {resources: [{name: gpu, replicas: 2}]}\n"
    reading = read_config(text)
    assert reading.usable and reading.sharing == Sharing("mps", 2)
    assert any("timeSlicing is ignored" in n for n in reading.notes)


def test_the_first_entry_labels_and_the_largest_is_advertised():
    text = GPU_CONFIG.format(replicas=2) + "    - {name: gpu, replicas: 8}\n"
    reading = read_config(text)
    assert reading.runs and not reading.usable
    assert reading.sharing.replicas == 2 and reading.devices_per_gpu == 8
    assert reading.refusal[0] == "unequal-duplicate-entries"
    assert "advertises 8 slices per GPU, GPU feature discovery labels 2" in reading.problem


@pytest.mark.parametrize(
    ("text", "ignored", "hint"),
    [
        # misplaced: renameByDefault belongs in a sharing section (k8s-device-plugin#1433)
        ("version: v1\nflags:\n  renameByDefault: true\n", "flags.renameByDefault", "belongs"),
        ("versoin: v1\n", "versoin", "did you mean 'version'"),
        ("version: v1\nflags:\n  plugin:\n    passDeviceSpec: true\n", "passDeviceSpec", "mean"),
        (GPU_CONFIG.format(replicas=4) + "      replica: 2\n", "[0].replica ", "mean 'replicas'"),
    ],
)
def test_fields_the_plugin_ignores_are_named_not_refused(text, ignored, hint):
    reading = read_config(text)
    assert reading.usable
    (note,) = [n for n in reading.notes if ignored in n]
    assert "ignored" in note and hint in note


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GPU_CONFIG.format(replicas=1), "number of replicas must be >= 2"),
        (GPU_CONFIG.format(replicas='"4"'), "must be a whole number, not '4'"),
        (GPU_CONFIG.format(replicas="4.5"), "must be a whole number, not 4.5"),
        ("version: v2\n", "knows only"),
        ("version: v1\nsharing:\n  timeSlicing:\n    resources: []\n", "no resources specified"),
        ("version: v1\nsharing:\n  timeSlicing: {}\n", "no resources specified"),
        ("version: v1\nsharing:\n  timeSlicing:\n", "no resources specified"),
        (GPU_CONFIG.format(replicas=2).replace("nvidia.com/gpu", "nvidia.com/GPU"), "format"),
        ("version: v1\nsharing: [\n", "not valid YAML at line"),
        ("- a\n- b\n", "must be a mapping"),
        ("version: v1\nflags:\n  failOnInitError: maybe\n", "true or false"),
        (GPU_CONFIG.format(replicas=2) + "extra: .nan\n", "no JSON form"),
    ],
)
def test_configs_the_plugin_refuses_say_why_in_one_line(text, message):
    reading = read_config(text)
    assert not reading.runs
    assert message in reading.problem
    assert "\n" not in reading.problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", NOT_SHARED),
        ("version: v1\nflags:\n  migStrategy: none\n  failOnInitError: true\n", NOT_SHARED),
        (
            GPU_CONFIG.format(replicas=3).replace("nvidia.com/gpu", "gpu"),
            Sharing("time-slicing", 3),
        ),
        (GPU_CONFIG.format(replicas="010"), Sharing("time-slicing", 8)),  # YAML 1.1 octal
        (
            "sharing:\n  mps:\n    renameByDefault: yes\n    resources:\n"
            "    - name: nvidia.com/gpu\n      replicas: 5\n      rename: nvidia.com/gpu.shared\n",
            Sharing("mps", 5, True),
        ),
        (
            "version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
            "    - name: nvidia.com/mig-1g.10gb\n      replicas: 2\n",
            NOT_SHARED,  # only MIG devices are shared; full GPUs are not
        ),
        (GPU_CONFIG.format(replicas=2) + "      devices: [0]\n", Sharing("time-slicing", 2)),
    ],
)
def test_what_configs_give(text, expected):
    reading = read_config(text)
    assert reading.usable and reading.sharing == expected


json_keys = st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)


@given(sharings, st.data())
def test_an_unknown_key_anywhere_is_ignored_and_named(sharing, data):
    config = build_config(sharing)
    section = next(iter(config["sharing"].values()))
    targets = [config, config["sharing"], section, section["resources"][0]]
    target = data.draw(st.sampled_from(targets))
    known = {"version", "flags", "resources", "sharing", "imex", "timeslicing", "mps"}
    # words go-yaml reads as booleans or null (y, on, off, null) are not names
    words = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}
    key = data.draw(json_keys.filter(lambda k: k not in target and k.lower() not in known | words))
    assume(key not in ("renamebydefault", "devices", "rename", "name", "replicas"))
    target[key] = data.draw(st.one_of(st.booleans(), st.integers(), json_keys))
    reading = read_config(yaml.safe_dump(config))
    assert reading.usable and reading.sharing == sharing
    assert any(key in note and "ignored" in note for note in reading.notes)


def test_check_config_says_where():
    with pytest.raises(ConfigError, match='config "t4" in ConfigMap gpu-operator/x: the device'):
        check_config("version: v2\n", "t4", "ConfigMap gpu-operator/x")


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
    patch = merge_patch(current, desired)
    assert apply_merge_patch(current, patch) == desired
    assert merge_patch(current, current) == {}


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
                GPU_PRESENT_LABEL: "true",
                COUNT_LABEL: str(gpus),
                REPLICAS_LABEL: str(replicas),
                STRATEGY_LABEL: strategy or ("time-slicing" if shared else "none"),
                PRODUCT_LABEL: product,
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
    assert (renamed.resource, renamed.slices) == (SHARED_RESOURCE, 6)


def test_mismatches_list_what_differs():
    node = GpuNode.from_api(node_api(gpus=2, replicas=1))
    assert mismatches(node, NOT_SHARED) == []
    problems = mismatches(node, Sharing("time-slicing", 4))
    assert "nvidia.com/gpu allocatable 2, expected 8" in problems
    assert any(REPLICAS_LABEL in p for p in problems)
    assert any(STRATEGY_LABEL in p for p in problems)
    assert any(PRODUCT_LABEL in p for p in problems)
    shared = GpuNode.from_api(node_api(gpus=2, replicas=4, strategy="mps", renamed=True))
    assert mismatches(shared, Sharing("mps", 4, True)) == []
    assert mismatches(shared, Sharing("mps", 4)) != []
    unlabelled = GpuNode("x", labels={}, allocatable={})
    assert mismatches(unlabelled, NOT_SHARED) == [f"has no {COUNT_LABEL} label"]


def test_selected_key_follows_the_operator():
    readings = read_configs({"data": {"a": GPU_CONFIG.format(replicas=2), "b": "version: v2\n"}})
    policy = {"name": "cm", "default": "a"}
    assert selected_key({}, policy) == "a"
    assert selected_key({NODE_CONFIG_LABEL: "b"}, policy) == "b"
    assert selected_key({NODE_CONFIG_LABEL: "b"}, {"default": "a"}) is None
    assert node_sharing({}, {"name": "cm"}, readings) == NOT_SHARED  # fallback: empty
    assert node_sharing({}, policy, readings) == Sharing("time-slicing", 2)
    assert node_sharing({NODE_CONFIG_LABEL: "b"}, policy, readings) is None  # refused
    assert node_sharing({NODE_CONFIG_LABEL: "zz"}, policy, readings) is None  # missing
    assert node_sharing({}, policy, None) is None  # no ConfigMap


def test_node_limits_follow_the_gpus_of_each_node():
    old = GpuNode.from_api(node_api(labels={COMPUTE_MAJOR_LABEL: "7", COMPUTE_MINOR_LABEL: "0"}))
    new = GpuNode.from_api(node_api(labels={COMPUTE_MAJOR_LABEL: "9", COMPUTE_MINOR_LABEL: "0"}))
    assert "at most 16 clients" in node_limit(old, Sharing("mps", 17))
    assert node_limit(new, Sharing("mps", 17)) is None
    big = GpuNode.from_api(node_api(gpus=8))
    assert node_limit(big, Sharing("time-slicing", MAX_SLICES_PER_NODE // 8)) is None
    assert "4 MiB" in node_limit(big, Sharing("time-slicing", MAX_SLICES_PER_NODE // 8 + 1))


def test_selector_variants_match_the_shared_product_name():
    assert selector_variants(f"{PRODUCT_LABEL}=Tesla-T4") == [
        f"{PRODUCT_LABEL}=Tesla-T4",
        f"{PRODUCT_LABEL}=Tesla-T4-SHARED",
    ]
    assert selector_variants(f"a in (x,y),{PRODUCT_LABEL}==T4")[1] == (
        f"a in (x,y),{PRODUCT_LABEL}=T4-SHARED"
    )
    assert selector_variants("a=b") == ["a=b"]
    assert selector_variants(f"{PRODUCT_LABEL}!=T4") == [f"{PRODUCT_LABEL}!=T4"]
    assert len(selector_variants(f"{PRODUCT_LABEL}=T4-SHARED")) == 1


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
    assert pod_gpu_requests(pod("a", gpus=2)) == {"nvidia.com/gpu": 2}
    assert pod_gpu_requests(pod("a", gpus=1, init=3)) == {"nvidia.com/gpu": 3}
    assert pod_gpu_requests(pod("a", gpus=0)) == {}
    two = pod("a")
    two["spec"]["containers"].append(copy.deepcopy(two["spec"]["containers"][0]))
    assert pod_gpu_requests(two) == {"nvidia.com/gpu": 2}


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
    assert pending_gpu_pods(pods, nodes) == ["jh/anywhere", "jh/bound", "jh/fits"]
    assert pending_gpu_pods(pods, {}) == []


# -- ClusterPolicies ----------------------------------------------------------------------
def policy_object(config=None, device_plugin=True, annotations=None, name="cluster-policy"):
    spec: dict = {"operator": {"defaultRuntime": "containerd"}}
    if device_plugin:
        spec["devicePlugin"] = {"enabled": True}
        if config is not None:
            spec["devicePlugin"]["config"] = config
    return {
        "metadata": {
            "name": name,
            "annotations": annotations or {},
            "creationTimestamp": "2026-12-01T10:00:00Z",
        },
        "spec": spec,
    }


def test_the_only_policy_is_found_whatever_its_name():
    olm = policy_object(name="gpu-cluster-policy")
    assert choose_policy([olm], None) is olm
    assert choose_policy([olm], "gpu-cluster-policy") is olm
    with pytest.raises(
        ConfigError,
        match=r"no ClusterPolicy named 'cluster-policy' \(there is gpu-cluster-policy\)",
    ):
        choose_policy([olm], "cluster-policy")


def test_without_a_policy_the_plain_device_plugin_chart_is_suggested():
    with pytest.raises(ConfigError, match="helm upgrade") as error:
        choose_policy([], None)
    assert "--print-config" in str(error.value)


def test_several_policies_need_a_choice_and_the_operators_is_named():
    newer = policy_object(name="a-newer")
    newer["metadata"]["creationTimestamp"] = "2026-12-02T10:00:00Z"
    older = policy_object(name="z-older")
    with pytest.raises(ConfigError, match="the GPU operator uses the oldest, z-older") as error:
        choose_policy([newer, older], None)
    assert "--policy z-older" in str(error.value)
    assert ignored_note(newer, [newer, older]) is not None
    assert ignored_note(older, [newer, older]) is None


def test_an_edited_record_is_named_and_unshared_is_the_way_out():
    policy = policy_object(
        {"name": "x", "default": "y"}, annotations={POLICY_RECORD_ANNOTATION: "[1, 2"}
    )
    with pytest.raises(ConfigError, match="ClusterPolicy cluster-policy: the annotation") as error:
        plan_disable(policy, None, [])
    assert "gpushare disable --unshared" in str(error.value)
    plan = plan_disable(policy, None, [], unshared=True)
    after = apply_merge_patch(policy, plan.policy_patch)
    assert "config" not in after["spec"]["devicePlugin"]
    assert POLICY_RECORD_ANNOTATION not in after["metadata"]["annotations"]


# -- plans ----------------------------------------------------------------------------------
def test_first_setup_creates_the_config_map_and_records_the_original():
    nodes = [GpuNode.from_api(node_api("n1"))]
    plan = plan_setup(
        policy_object({"name": "", "default": ""}), None, nodes, Sharing("time-slicing", 4)
    )
    assert plan.config_map_action == "create"
    assert plan.config_map_after["data"] == {
        "gpushare-time-slicing-4": render_config(Sharing("time-slicing", 4))
    }
    assert plan.policy_patch["spec"] == {
        "devicePlugin": {"config": {"name": CONFIG_MAP_NAME, "default": "gpushare-time-slicing-4"}}
    }
    record = json.loads(plan.policy_patch["metadata"]["annotations"][POLICY_RECORD_ANNOTATION])
    assert record == {
        "configMap": CONFIG_MAP_NAME,
        "config": {"name": "", "default": ""},
        "devicePlugin": True,
    }
    assert [c.name for c in plan.affected] == ["n1"]
    assert [a.describe() for a in write_access(plan)] == [
        "create configmaps in namespace gpu-operator",
        "patch clusterpolicies.nvidia.com (cluster-wide)",
        "delete pods in namespace gpu-operator",
    ]
    lines = plan_lines(plan)
    assert (
        lines[0]
        == "ConfigMap gpu-operator/time-slicing-config: create (add gpushare-time-slicing-4)"
    )
    assert lines[1].startswith("ClusterPolicy cluster-policy: patch spec.devicePlugin")
    assert any(line.startswith("node n1: restart the device plugin") for line in lines)


def test_a_key_with_our_name_that_we_did_not_write_is_not_taken_over():
    cm = {"metadata": {}, "data": {"gpushare-time-slicing-4": GPU_CONFIG.format(replicas=2)}}
    policy = policy_object({"name": CONFIG_MAP_NAME})
    with pytest.raises(ConfigError, match="did not write"):
        plan_setup(policy, cm, [], Sharing("time-slicing", 4))


def test_a_broken_key_no_node_selects_is_a_warning_not_a_refusal():
    cm = {
        "metadata": {},
        "data": {"t4": "version: v2\n", "typo": SEED_DATA["any"] + "      replica: 3\n"},
    }
    nodes = [GpuNode.from_api(node_api("n1"))]
    plan = plan_setup(
        policy_object({"name": CONFIG_MAP_NAME}), cm, nodes, Sharing("time-slicing", 4)
    )
    assert plan.changes_anything
    (warning,) = plan.warnings
    assert warning.startswith(
        'config "t4" in ConfigMap gpu-operator/time-slicing-config, which no node'
    )
    assert "unknown version 'v2'" in warning
    assert plan.config_map_after["data"]["typo"] == cm["data"]["typo"]  # untouched


def test_a_node_keeping_a_broken_config_of_its_own_is_warned_about():
    cm = {"metadata": {}, "data": {"t4": "version: v2\n"}}
    nodes = [
        GpuNode.from_api(node_api("n1")),
        GpuNode.from_api(node_api("n2", labels={NODE_CONFIG_LABEL: "t4"})),
    ]
    plan = plan_setup(
        policy_object({"name": CONFIG_MAP_NAME}), cm, nodes, Sharing("time-slicing", 4)
    )
    assert [c.name for c in plan.nodes] == ["n1"]
    assert any(
        w.startswith("node n2 keeps a config of its own that cannot work") for w in plan.warnings
    )


def test_our_own_key_edited_by_hand_is_written_again():
    cm = {"metadata": {}, "data": {"gpushare-time-slicing-4": "version: v2\n"}}
    cm["metadata"]["annotations"] = {"gpushare.dev/owned-keys": '["gpushare-time-slicing-4"]'}
    nodes = [GpuNode.from_api(node_api("n1"))]
    plan = plan_setup(
        policy_object({"name": CONFIG_MAP_NAME}), cm, nodes, Sharing("time-slicing", 4)
    )
    # our own key is rewritten with the config we write
    assert read_config(plan.config_map_after["data"]["gpushare-time-slicing-4"]).usable


def test_a_disabled_device_plugin_is_refused():
    policy = policy_object({"name": CONFIG_MAP_NAME})
    policy["spec"]["devicePlugin"]["enabled"] = False
    with pytest.raises(ConfigError, match="enabled: false"):
        plan_setup(policy, None, [GpuNode.from_api(node_api())], Sharing("time-slicing", 4))


def test_node_limits_stop_setup_before_anything_is_written():
    nodes = [GpuNode.from_api(node_api("big", gpus=8))]
    with pytest.raises(ConfigError, match="node big: 8 GPUs x 10000 replicas are 80000 slices"):
        plan_setup(policy_object(), None, nodes, Sharing("time-slicing", 10000))


def test_selection_that_matches_nothing_is_refused():
    with pytest.raises(ConfigError, match="matches no GPU node"):
        plan_setup(policy_object(), None, [], Sharing("time-slicing", 4), selected=set())


def seed_state(gpus=1, labels=None) -> dict:
    """The seed's manual set-up: ConfigMap time-slicing-config, key any, 4 replicas."""
    state = {
        "policy": policy_object({"name": CONFIG_MAP_NAME, "default": "any"}),
        "cm": {
            "metadata": {"name": CONFIG_MAP_NAME, "labels": {"app": "x"}, "annotations": {}},
            "data": dict(SEED_DATA),
        },
        "nodes": [node_api("n1", gpus=gpus, labels=labels)],
    }
    for node in state["nodes"]:
        plugin_restart(node, effective(node, state["policy"], state["cm"]))
    return state


def test_an_equivalent_config_is_adopted():
    state = seed_state()
    plan = plan_for(state, (Sharing("time-slicing", 4), None))
    assert not plan.changes_anything, plan_lines(plan)
    assert plan.adopted == "any"
    assert "'any' in ConfigMap gpu-operator/time-slicing-config already gives" in plan.notes[-1]
    # per node too: the node selects "any" through the default
    per_node = plan_for(state, (Sharing("time-slicing", 4), "a"), models={"n1": "a"})
    assert not per_node.changes_anything


def test_a_different_config_replaces_the_seeds_and_disable_brings_it_back():
    state = seed_state()
    start = copy.deepcopy(state)
    eight = plan_for(state, (Sharing("time-slicing", 8), None))
    assert eight.config_map_action == "update" and eight.adopted is None
    state = apply(state, eight)
    assert state["policy"]["spec"]["devicePlugin"]["config"]["default"] == "gpushare-time-slicing-8"
    assert state["cm"]["data"]["any"] == SEED_DATA["any"]
    state = apply(state, plan_for(state, "disable"))
    assert comparable(state) == comparable(start)


def test_disable_with_the_original_gone_offers_the_unshared_way_out():
    state = seed_state()
    state = apply(state, plan_for(state, (Sharing("time-slicing", 8), None)))
    del state["cm"]["data"]["any"]  # someone removed the seed's key
    nodes = [GpuNode.from_api(n) for n in state["nodes"]]
    with pytest.raises(ConfigError) as error:
        plan_disable(state["policy"], state["cm"], nodes)
    message = str(error.value)
    assert "ClusterPolicy cluster-policy had before gpushare" in message
    assert (
        'the default selects config "any", which ConfigMap gpu-operator/time-slicing-config'
        in message
    )
    assert "gpushare disable --unshared" in message and "\n" not in message

    unshared = plan_disable(state["policy"], state["cm"], nodes, unshared=True)
    state = apply(state, unshared)
    assert "config" not in state["policy"]["spec"]["devicePlugin"]
    assert POLICY_RECORD_ANNOTATION not in state["policy"]["metadata"]["annotations"]
    assert state["cm"]["data"] == {}  # our key went; the ConfigMap was not ours to delete
    assert effective(state["nodes"][0], state["policy"], state["cm"]) == NOT_SHARED
    assert mismatches(GpuNode.from_api(state["nodes"][0]), NOT_SHARED) == []


def test_disable_without_setup_has_nothing_to_do():
    plan = plan_disable(policy_object({"name": "x", "default": "y"}), None, [])
    assert not plan.changes_anything
    assert "has not set up GPU sharing through ClusterPolicy cluster-policy" in plan.notes[0]


# -- a property: any sequence of setups, then disable, restores exactly --------------------
THEIR_CONFIGS = {
    "two": GPU_CONFIG.format(replicas=2),
    "plain": "version: v1\nflags:\n  migStrategy: none\n",
    "typo": GPU_CONFIG.format(replicas=3).replace("timeSlicing", "timeSlicng"),
}
ORIGINALS = {
    "no devicePlugin": (policy_object(device_plugin=False), None),
    "no config": (policy_object(), None),
    "empty config": (policy_object({"name": "", "default": ""}), None),
    "their config": (
        policy_object({"name": "theirs", "default": "two"}),
        {"metadata": {"name": "theirs", "annotations": {"keep": "me"}}, "data": THEIR_CONFIGS},
    ),
    "the seed's": (
        policy_object({"name": CONFIG_MAP_NAME, "default": "any"}),
        {"metadata": {"name": CONFIG_MAP_NAME}, "data": SEED_DATA},
    ),
}


def plugin_restart(node: dict, sharing: Sharing | None) -> None:
    """What the device plugin and GFD do to a node when they start with ``sharing``
    (None: they cannot start, and the node keeps what it showed)."""
    if sharing is None:
        return
    labels = node["metadata"]["labels"]
    gpus = int(labels[COUNT_LABEL])
    product = labels[PRODUCT_LABEL].removesuffix("-SHARED")
    labels[PRODUCT_LABEL] = product + ("-SHARED" if sharing.shared and not sharing.renamed else "")
    labels[REPLICAS_LABEL] = str(sharing.replicas)
    labels[STRATEGY_LABEL] = sharing.strategy
    allocatable = {"cpu": "8", sharing.resource: str(gpus * sharing.replicas)}
    if sharing.resource == SHARED_RESOURCE:
        allocatable[GPU_RESOURCE] = "0"
    node["status"]["allocatable"] = allocatable


def effective(node: dict, policy: dict, cm: dict | None) -> Sharing | None:
    config = (policy["spec"].get("devicePlugin") or {}).get("config") or {}
    return node_sharing(node["metadata"]["labels"], config, read_configs(cm))


def apply(state: dict, plan: Plan) -> dict:
    """The cluster after the CLI wrote ``plan`` and restarted the affected plugins."""
    state = copy.deepcopy(state)
    state["policy"] = apply_merge_patch(state["policy"], plan.policy_patch)
    state["cm"] = copy.deepcopy(plan.config_map_after)
    for node in state["nodes"]:
        patch = plan.node_patches.get(node["metadata"]["name"], {}).get("metadata", {})
        for part in ("labels", "annotations"):
            if part in patch:
                node["metadata"][part] = apply_merge_patch(
                    node["metadata"].get(part) or {}, patch[part]
                )
    restarted = {c.name for c in plan.affected}
    for node in state["nodes"]:
        if node["metadata"]["name"] in restarted:
            plugin_restart(node, effective(node, state["policy"], state["cm"]))
    return state


def plan_for(state: dict, op, models: dict | None = None) -> Plan:
    nodes = [GpuNode.from_api(n) for n in state["nodes"]]
    if op == "disable":
        return plan_disable(state["policy"], state["cm"], nodes)
    sharing, model = op
    selected = None
    if model is not None:
        selected = {
            n.name for n in nodes if (models or {}).get(n.name, n.labels.get("model")) == model
        }
    return plan_setup(state["policy"], state["cm"], nodes, sharing, selected=selected)


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
            want = effective(node, state["policy"], state["cm"])
            assert mismatches(GpuNode.from_api(node), want) == []
        # a cluster-wide setup changes the default; nodes set up one by one keep theirs
        selected = [
            n
            for n in state["nodes"]
            if (model is None and NODE_CONFIG_LABEL not in n["metadata"]["labels"])
            or n["metadata"]["labels"]["model"] == model
        ]
        for node in selected:
            assert effective(node, state["policy"], state["cm"]) == sharing
        again = plan_for(state, (sharing, model))
        assert not again.changes_anything, plan_lines(again)
        # foreign keys are never touched
        if original == "their config":
            assert {k: state["cm"]["data"][k] for k in THEIR_CONFIGS} == THEIR_CONFIGS

    state = apply(state, plan_for(state, "disable"))
    assert comparable(state) == comparable(start)
    assert not plan_for(state, "disable").changes_anything


# -- concurrent writers ---------------------------------------------------------------------
def test_only_a_status_change_allows_a_retry():
    planned = policy_object({"name": "x"})
    planned["metadata"]["resourceVersion"] = "10"
    status_only = copy.deepcopy(planned)
    status_only["metadata"]["resourceVersion"] = "11"
    status_only["status"] = {"state": "ready"}
    assert _spec_change(planned, status_only) is None
    spec_changed = copy.deepcopy(status_only)
    spec_changed["spec"]["devicePlugin"]["config"]["default"] = "theirs"
    assert _spec_change(planned, spec_changed) == "spec.devicePlugin"
    other = copy.deepcopy(status_only)
    other["spec"]["driver"] = {"enabled": False}
    assert _spec_change(planned, other) == "its spec"
    recorded = copy.deepcopy(status_only)
    recorded["metadata"]["annotations"][POLICY_RECORD_ANNOTATION] = "{}"
    assert POLICY_RECORD_ANNOTATION in _spec_change(planned, recorded)


# -- health ---------------------------------------------------------------------------------
def plugin_pod(node: str, ready=True, phase="Running", exit_code=None, name=None) -> dict:
    status = {"phase": phase, "conditions": [{"type": "Ready", "status": str(ready)}]}
    if exit_code is not None:
        status["containerStatuses"] = [{"state": {"terminated": {"exitCode": exit_code}}}]
    return {
        "metadata": {"name": name or f"nvidia-device-plugin-daemonset-{node}", "uid": node},
        "spec": {"nodeName": node},
        "status": status,
    }


def plugin_node(name="n1", **kwargs) -> GpuNode:
    labels = {DEPLOY_LABEL: "true", **kwargs.pop("labels", {})}
    return GpuNode.from_api(node_api(name, labels=labels, **kwargs))


def test_a_healthy_set_up_has_no_findings():
    state = seed_state(labels={DEPLOY_LABEL: "true"})
    nodes = [GpuNode.from_api(n) for n in state["nodes"]]
    findings, notes = health(
        nodes, state["policy"], [state["policy"]], state["cm"], [plugin_pod("n1")]
    )
    assert (findings, notes) == ([], [])


def test_a_missing_config_map_is_found_with_its_fix():
    policy = policy_object({"name": "gone", "default": "any"})
    nodes = [plugin_node(replicas=1)]
    pods = [plugin_pod("n1", ready=False, phase="Failed", exit_code=1)]
    findings, _ = health(nodes, policy, [policy], None, pods)
    assert findings[0].problem == (
        "ClusterPolicy cluster-policy names ConfigMap gpu-operator/gone, which does not exist: "
        "the device plugin cannot start on any GPU node"
    )
    assert findings[0].fix.startswith("kubectl patch clusterpolicies.nvidia.com/cluster-policy")
    assert '"config":null' in findings[0].fix
    # the failed pod is explained by the config, with the same fix
    assert "is Failed (exit 1), not running, because of the config above" in findings[1].problem
    assert findings[1].fix == findings[0].fix


def test_a_selected_config_the_plugin_refuses_is_found_with_its_fix():
    """Issue 13, item 2: a replica count the plugin cannot read leaves the node without
    GPUs; status says so."""
    state = seed_state(labels={DEPLOY_LABEL: "true"})
    state["cm"]["data"]["any"] = GPU_CONFIG.format(replicas="99999999999999999999")
    nodes = [GpuNode.from_api(n) for n in state["nodes"]]
    pods = [plugin_pod("n1", ready=False, phase="Failed", exit_code=1)]
    findings, _ = health(nodes, state["policy"], [], state["cm"], pods)
    assert findings[0].problem == (
        'the default config "any" in ConfigMap gpu-operator/time-slicing-config (n1): the '
        "device plugin refuses it: sharing.timeSlicing.resources[0].replicas: must be a whole "
        "number, not 100000000000000000000"
    )
    assert findings[0].fix == (
        "kubectl -n gpu-operator edit configmap time-slicing-config  # fix 'any'"
    )
    assert findings[1].problem.endswith(
        "is Failed (exit 1), not running, because of the config above"
    )


def test_a_label_naming_a_missing_key_is_found_with_its_fix():
    state = seed_state(labels={DEPLOY_LABEL: "true", NODE_CONFIG_LABEL: "t4"})
    nodes = [GpuNode.from_api(n) for n in state["nodes"]]
    findings, _ = health(nodes, state["policy"], [], state["cm"], [plugin_pod("n1", ready=False)])
    assert findings[0].problem.startswith('node n1 selects config "t4" (label')
    assert findings[0].fix == f"kubectl label node n1 {NODE_CONFIG_LABEL}-"


def test_what_gpushare_set_up_is_fixed_with_gpushare():
    state = seed_state(labels={DEPLOY_LABEL: "true"})
    state = apply(state, plan_for(state, (Sharing("time-slicing", 8), None)))
    assert health(
        [GpuNode.from_api(n) for n in state["nodes"]],
        state["policy"],
        [],
        state["cm"],
        [plugin_pod("n1")],
    ) == ([], [])
    broken = copy.deepcopy(state)
    del broken["cm"]["data"]["gpushare-time-slicing-8"]
    nodes = [GpuNode.from_api(n) for n in broken["nodes"]]
    findings, _ = health(nodes, broken["policy"], [], broken["cm"], [plugin_pod("n1")])
    assert 'selects config "gpushare-time-slicing-8" by default' in findings[0].problem
    assert findings[0].fix == "gpushare disable"
    del broken["cm"]["data"]["any"]  # now the original is gone too
    findings, _ = health(nodes, broken["policy"], [], broken["cm"], [plugin_pod("n1")])
    assert findings[0].fix == "gpushare disable --unshared"


def test_capacity_that_disagrees_with_labels_or_config_is_found():
    # labels say 1 GPU x 4 replicas; the plugin advertises 2
    node = plugin_node(replicas=4, **{"nvidia.com/gpu": "2"})
    findings, _ = health([node], None, [], None, [plugin_pod("n1")])
    (finding,) = findings
    assert (
        "advertises 2 nvidia.com/gpu, but its labels say 1 GPUs x 4 replicas = 4" in finding.problem
    )
    assert finding.fix.startswith(
        "kubectl -n gpu-operator delete pod nvidia-device-plugin-daemonset-n1"
    )
    # consistent labels, but not what the selected config gives: not restarted yet
    state = seed_state(labels={DEPLOY_LABEL: "true"})
    state["cm"]["data"]["any"] = GPU_CONFIG.format(replicas=6)
    nodes = [GpuNode.from_api(n) for n in state["nodes"]]
    (stale,) = health(nodes, state["policy"], [], state["cm"], [plugin_pod("n1")])[0]
    assert 'its config "any" gives time-slicing, 6 replicas per GPU' in stale.problem
    assert "has not restarted since the config changed" in stale.problem


def test_a_plugin_pod_that_does_not_run_for_no_known_reason_is_restarted():
    node = plugin_node()
    (finding,) = health([node], None, [], None, [plugin_pod("n1", ready=False, phase="Pending")])[0]
    assert finding.problem == (
        "the device-plugin pod gpu-operator/nvidia-device-plugin-daemonset-n1 on n1 is Pending, "
        "not running"
    )
    assert "delete pod nvidia-device-plugin-daemonset-n1" in finding.fix
    (missing,) = health([node], None, [], None, [])[0]
    assert missing.problem.startswith("node n1 has no device-plugin pod")
    assert (
        missing.fix
        == "kubectl -n gpu-operator rollout restart daemonset/nvidia-device-plugin-daemonset"
    )


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
        {"name": "cm", "default": "k"}, annotations={POLICY_RECORD_ANNOTATION: "{}"}
    )
    result = status_report(nodes, pods, policy, [policy], {"data": {"k": SEED_DATA["any"]}}, [])
    rows = {r["node"]: r for r in result["nodes"]}
    assert (rows["n1"]["slices"], rows["n1"]["used"], rows["n1"]["free"]) == (4, 3, 1)
    assert rows["n1"]["pods"] == ["jh/a"] and rows["n1"]["pending"] == ["jh/waiter"]
    assert (rows["n2"]["resource"], rows["n2"]["used"], rows["n2"]["free"]) == (
        SHARED_RESOURCE,
        1,
        3,
    )
    assert rows["n2"]["pending"] == []
    assert result["pending"][0]["lack_of_slices"]
    assert result["pending"][0]["candidate_nodes"] == ["n1"]
    assert result["summary"] == {
        "nodes": 2,
        "physical_gpus": 3,
        "replicas": [2, 4],
        "virtual_gpus": 8,
        "max_concurrent_users": 8,
        "used_slices": 4,
        "free_slices": 4,
    }
    assert result["cluster_policy"]["set_up_by_gpushare"]
    assert result["health"] == []  # no node runs the operator's device plugin here


def test_summary_in_the_seed_style():
    nodes = [GpuNode.from_api(node_api("n1", gpus=1, replicas=4))]
    assert summary_lines(summary(nodes)) == [
        "  Physical GPUs:        1",
        "  Replicas per GPU:     4",
        "  Virtual GPUs:         4",
        "  Max concurrent users: 4",
    ]


def test_format_table_pads_columns():
    table = format_table(["A", "BB"], [["xxx", 1], ["y", 22]])
    assert table.splitlines() == ["A    BB", "xxx  1", "y    22"]
