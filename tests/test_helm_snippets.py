"""The zero-to-jupyterhub snippets in helm-snippets/.

- every values fragment, merged over the chart's defaults the way Helm merges,
  passes the chart's own values schema;
- hub-config.yaml, run in a real JupyterHub's configuration the way the chart
  runs hub.extraConfig, gives GPUShareSpawner, the gpushare service and its
  permissions, and the profiles give the slices they promise;
- rbac.yaml, applied to the local API server, lets an identity that holds
  nothing else do every request the service and the spawner make, and no more;
  without it those requests are forbidden;
- user-scheduler.yaml, in a real kube-scheduler, puts GPU servers where GPU
  slices are already taken, where the chart's scoring would not;
- time-slicing-configmap.yaml holds a config the NVIDIA device plugin's own code
  accepts as 4 slices per GPU, the same config ``gpushare setup`` writes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from jupyterhub_gpushare.sharing import pluginconfig
from jupyterhub_gpushare.testing import pluginparser
from jupyterhub_gpushare.testing.waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = ROOT / "helm-snippets"
Z2JH = ROOT.parent / "shared" / "z2jh"
MANIFESTS = ("rbac.yaml", "time-slicing-configmap.yaml")
VALUES_FILES = sorted(p.name for p in SNIPPETS.glob("*.yaml") if p.name not in MANIFESTS)
# The order of the install command in helm-snippets/README.md.
INSTALL_ORDER = (
    "hub-image.yaml",
    "hub-config.yaml",
    "service-network.yaml",
    "gpu-settings.yaml",
    "profiles.yaml",
    "cull.yaml",
    "user-scheduler.yaml",
    "prometheus.yaml",
)
SERVICE_SCOPES = {"list:users", "read:users:activity", "read:servers"}


def load(name: str):
    return yaml.safe_load((SNIPPETS / name).read_text())


def load_all(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((SNIPPETS / name).read_text()) if doc]


def helm_merge(base: dict, override: dict) -> dict:
    """Values merged the way Helm merges a -f file over the chart's values:
    mappings merge key by key, anything else (lists too) replaces, null deletes."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = helm_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@pytest.fixture(scope="module")
def chart() -> tuple[dict, object]:
    if not (Z2JH / "values.yaml").exists():
        pytest.skip(f"the z2jh chart's values are not in {Z2JH}")
    from jsonschema import Draft7Validator

    schema = yaml.safe_load((Z2JH / "values.schema.yaml").read_text())
    Draft7Validator.check_schema(schema)
    return yaml.safe_load((Z2JH / "values.yaml").read_text()), Draft7Validator(schema)


def schema_errors(validator, values: dict) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in sorted(validator.iter_errors(values), key=lambda e: list(e.absolute_path))
    ]


def installed_values(defaults: dict, names=INSTALL_ORDER) -> dict:
    values = defaults
    for name in names:
        values = helm_merge(values, load(name))
    return values


# -- the values fragments --------------------------------------------------------
def test_every_values_file_is_listed_and_documented():
    assert set(VALUES_FILES) == set(INSTALL_ORDER)
    readme = (SNIPPETS / "README.md").read_text()
    for name in [*VALUES_FILES, *MANIFESTS, "Dockerfile"]:
        text = (SNIPPETS / name).read_text()
        assert text.startswith("#"), f"{name} should open with a comment saying what it does"
        assert f"`{name}`" in readme, f"{name} is missing from helm-snippets/README.md"


@pytest.mark.parametrize("name", VALUES_FILES)
def test_values_fragment_passes_the_chart_schema(chart, name):
    defaults, validator = chart
    fragment = load(name)
    assert isinstance(fragment, dict) and fragment, f"{name} is not a values mapping"
    assert schema_errors(validator, helm_merge(defaults, fragment)) == []


def test_all_values_fragments_together_pass_the_chart_schema(chart):
    defaults, validator = chart
    assert schema_errors(validator, installed_values(defaults)) == []


def test_the_schema_check_catches_a_misspelt_key(chart):
    # the check above is not vacuous: the chart's schema refuses unknown keys
    defaults, validator = chart
    wrong = helm_merge(defaults, {"singleuser": {"extraResources": {"limits": {}}}})
    assert any("extraResources" in e for e in schema_errors(validator, wrong))
    wrong = helm_merge(defaults, {"hub": {"service": {"extraPorts": "10101"}}})
    assert schema_errors(validator, wrong)


def test_the_service_port_is_the_same_everywhere():
    extra_config = "\n".join(load("hub-config.yaml")["hub"]["extraConfig"].values())
    url_port = int(re.search(r'url="http://hub:(\d+)"', extra_config).group(1))
    network = load("service-network.yaml")
    (port,) = network["hub"]["service"]["extraPorts"]
    assert port["port"] == port["targetPort"] == url_port
    (ingress,) = network["hub"]["networkPolicy"]["ingress"]
    assert [p["port"] for p in ingress["ports"]] == [url_port]
    (egress,) = network["proxy"]["chp"]["networkPolicy"]["egress"]
    assert [p["port"] for p in egress["ports"]] == [url_port]
    # the proxy pod is admitted by its access label, the hub pod by its component
    sources = [rule["podSelector"]["matchLabels"] for rule in ingress["from"]]
    assert {"hub.jupyter.org/network-access-hub": "true"} in sources
    assert {"component": "hub"} in sources


def test_extra_config_is_python_that_compiles():
    for key, code in load("hub-config.yaml")["hub"]["extraConfig"].items():
        compile(code, key, "exec")


def test_profiles_and_settings_use_only_our_spawners_options():
    from jupyterhub_gpushare.spawner import GPUShareSpawner

    traits = GPUShareSpawner.class_traits(config=True)
    settings = load("gpu-settings.yaml")["hub"]["config"]["GPUShareSpawner"]
    assert set(settings) <= set(traits), set(settings) - set(traits)
    singleuser = load("profiles.yaml")["singleuser"]
    for profile in singleuser["profileList"]:
        overrides = profile.get("kubespawner_override", {})
        assert set(overrides) <= set(traits), (profile["slug"], set(overrides) - set(traits))
    # GPUs are asked for through gpu_slices, never through extraResource
    resources = {
        **singleuser["extraResource"]["limits"],
        **singleuser["extraResource"]["guarantees"],
    }
    assert not [r for r in resources if r.startswith("nvidia.com/")]


def test_dockerfile_installs_into_the_chart_hub_image():
    lines = [
        line.strip()
        for line in (SNIPPETS / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    (base,) = [line for line in lines if line.startswith("FROM ")]
    assert base.startswith("FROM quay.io/jupyterhub/k8s-hub:")
    users = [line for line in lines if line.startswith("USER ")]
    install = next(i for i, line in enumerate(lines) if "pip install" in line)
    assert lines.index("USER root") < install
    # the chart runs the hub as uid 1000 (hub.containerSecurityContext.runAsUser)
    assert users[-1] == "USER 1000"
    assert "jupyterhub-gpushare" in lines[install]
    image = load("hub-image.yaml")["hub"]["image"]
    assert image["name"] and image["tag"]


# -- the hub configuration ----------------------------------------------------
# A stand-in for the chart's jupyterhub_config.py: the parts that turn the values
# used here into hub configuration, in the chart's order (spawner class, singleuser
# settings, the culler, hub.services and hub.loadRoles, the hub.config pass-through,
# then hub.extraConfig by sorted key, exec'd with `c` in scope).
Z2JH_CONFIG = """
import json
import os
import sys

c = get_config()  # noqa: F821
with open(os.environ["GPUSHARE_TEST_VALUES"]) as f:
    values = json.load(f)
hub, singleuser = values["hub"], values["singleuser"]

c.JupyterHub.spawner_class = "kubespawner.KubeSpawner"
c.KubeSpawner.start_timeout = singleuser["startTimeout"]
c.KubeSpawner.extra_resource_limits = singleuser["extraResource"]["limits"]
c.KubeSpawner.extra_resource_guarantees = singleuser["extraResource"]["guarantees"]
if singleuser["profileList"]:
    c.KubeSpawner.profile_list = singleuser["profileList"]
if values["scheduling"]["userScheduler"]["enabled"]:
    c.KubeSpawner.scheduler_name = "user-scheduler"

c.JupyterHub.services = []
c.JupyterHub.load_roles = []
cull = values["cull"]
if cull["enabled"]:
    c.JupyterHub.load_roles.append({
        "name": "jupyterhub-idle-culler",
        "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
        "services": ["jupyterhub-idle-culler"],
    })
    c.JupyterHub.services.append({
        "name": "jupyterhub-idle-culler",
        "command": [sys.executable, "-m", "jupyterhub_idle_culler",
                    f"--timeout={cull['timeout']}", f"--cull-every={cull['every']}"],
    })
for key, service in hub["services"].items():
    c.JupyterHub.services.append({"name": key, **service})
for key, role in hub["loadRoles"].items():
    c.JupyterHub.load_roles.append({"name": key, **role})
for section, options in hub["config"].items():
    for option, value in options.items():
        c[section][option] = value

for key in sorted(hub["extraConfig"]):
    exec(compile(hub["extraConfig"][key], key, "exec"), globals())

# test only: a throwaway database, nothing written to disk
c.JupyterHub.db_url = "sqlite://"
c.JupyterHub.cookie_secret = os.urandom(32)
"""

# Initialises a real JupyterHub from that configuration (roles, services, scopes
# are all checked there), then applies every profile with the real spawner.
HUB_FACTS = """
import asyncio
import json
import sys

from jupyterhub import orm
from jupyterhub.app import JupyterHub


async def main():
    app = JupyterHub.instance()
    await app.initialize([f"--config={sys.argv[1]}"])
    cls = app.spawner_class
    facts = {"spawner_class": f"{cls.__module__}.{cls.__name__}", "services": {}}
    for name, service in app._service_map.items():
        facts["services"][name] = {
            "url": service.url,
            "command": list(service.command),
            "environment": dict(service.environment),
            "managed": service.managed,
            "scopes": sorted({s for role in service.orm.roles for s in role.scopes}),
        }
    facts["user_scopes"] = sorted(orm.Role.find(app.db, "user").scopes)
    spawner = cls(_mock=True, config=app.config, hub=app.hub)
    facts["spawner"] = {name: getattr(spawner, name) for name in cls.class_own_traits(config=True)}
    facts["profiles"] = {}
    for profile in spawner.profile_list:
        spawner = cls(_mock=True, config=app.config, hub=app.hub)
        spawner.user_options = {"profile": profile["slug"]}
        await spawner.load_user_options()
        facts["profiles"][profile["slug"]] = {
            "gpu_slices": spawner.gpu_slices,
            "node_selector": spawner.node_selector,
            "limits": spawner.extra_resource_limits,
        }
    print("FACTS " + json.dumps(facts, default=str))


asyncio.run(main())
"""

# A kubeconfig for constructing spawners: nothing connects to it here.
UNUSED_KUBECONFIG = {
    "apiVersion": "v1",
    "kind": "Config",
    "clusters": [{"name": "unused", "cluster": {"server": "https://127.0.0.1:9"}}],
    "users": [{"name": "unused", "user": {"token": "unused"}}],
    "contexts": [{"name": "unused", "context": {"cluster": "unused", "user": "unused"}}],
    "current-context": "unused",
}


def hub_facts(values: dict, tmp_path: Path) -> dict:
    (tmp_path / "values.json").write_text(json.dumps(values))
    (tmp_path / "jupyterhub_config.py").write_text(Z2JH_CONFIG)
    (tmp_path / "facts.py").write_text(HUB_FACTS)
    (tmp_path / "kubeconfig").write_text(json.dumps(UNUSED_KUBECONFIG))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUSHARE_", "JUPYTERHUB_"))}
    env.update(
        GPUSHARE_TEST_VALUES=str(tmp_path / "values.json"),
        KUBECONFIG=str(tmp_path / "kubeconfig"),
        # what the kubelet sets in the hub pod
        KUBERNETES_SERVICE_HOST="10.96.0.1",
        KUBERNETES_SERVICE_PORT="443",
    )
    result = subprocess.run(
        [sys.executable, "facts.py", str(tmp_path / "jupyterhub_config.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    facts = [line for line in result.stdout.splitlines() if line.startswith("FACTS ")]
    assert result.returncode == 0 and facts, result.stdout + result.stderr
    return json.loads(facts[0].removeprefix("FACTS "))


@pytest.fixture(scope="module")
def installed_hub(chart, tmp_path_factory) -> dict:
    import jupyterhub_gpushare

    if not hasattr(jupyterhub_gpushare, "configure"):
        pytest.skip("jupyterhub_gpushare.configure() is not in the package yet")
    defaults, _ = chart
    return hub_facts(installed_values(defaults), tmp_path_factory.mktemp("hub"))


def test_extra_config_gives_the_spawner_and_the_service(installed_hub):
    assert installed_hub["spawner_class"] == "jupyterhub_gpushare.spawner.GPUShareSpawner"
    service = installed_hub["services"]["gpushare"]
    assert service["managed"]
    assert service["url"] == "http://hub:10101"
    assert service["command"][-2:] == ["-m", "jupyterhub_gpushare.service"]
    # a managed service does not inherit these; the Kubernetes client needs them
    assert service["environment"]["KUBERNETES_SERVICE_HOST"] == "10.96.0.1"
    assert service["environment"]["KUBERNETES_SERVICE_PORT"] == "443"
    # what the service reads from the hub, and nothing more
    assert set(service["scopes"]) == SERVICE_SCOPES
    assert {"self", "access:services!service=gpushare"} <= set(installed_hub["user_scopes"])
    # the chart's own culler is still there, next to it
    assert "jupyterhub-idle-culler" in installed_hub["services"]


def test_prometheus_gets_a_token_for_both_metrics(installed_hub):
    prometheus = installed_hub["services"]["prometheus"]
    assert not prometheus["managed"]
    assert set(prometheus["scopes"]) == {"read:metrics", "access:services!service=gpushare"}


def test_hub_config_settings_reach_the_spawner(installed_hub):
    spawner = installed_hub["spawner"]
    settings = load("gpu-settings.yaml")["hub"]["config"]["GPUShareSpawner"]
    for name, value in settings.items():
        assert spawner[name] == value, name
    assert spawner["queue_url"], "configure() should point the spawners at the queue"


def test_profiles_give_the_slices_they_promise(installed_hub):
    profiles = installed_hub["profiles"]
    assert {slug: p["gpu_slices"] for slug, p in profiles.items()} == {
        "cpu": 0,
        "gpu-1": 1,
        "gpu-2": 2,
        "h100-1": 1,
    }
    product = profiles["h100-1"]["node_selector"]["nvidia.com/gpu.product"]
    # GPU feature discovery marks time-sliced products with -SHARED
    assert product.endswith("-SHARED")
    assert all(not p["limits"] for p in profiles.values())


# -- RBAC, on the real API server ------------------------------------------------
RBAC_NAMESPACE = "gpushare-snippets"
GUARD_CONFIGMAP = "gpushare-memory-guard"


def rbac_objects(namespace: str) -> list[dict]:
    """rbac.yaml with the release's namespace set, as the README's sed does."""
    text = (SNIPPETS / "rbac.yaml").read_text()
    text = text.replace("namespace: jupyterhub ", f"namespace: {namespace} ")
    objects = yaml.safe_load_all(text)
    return [o for o in objects if o]


def test_rbac_names_what_the_code_uses():
    from jupyterhub_gpushare.spawner import GPUShareSpawner

    objects = {o["kind"]: o for o in rbac_objects("x")}
    assert set(objects) == {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    default_name = GPUShareSpawner.class_traits()["memory_guard_configmap"].default_value
    assert GUARD_CONFIGMAP == default_name
    named = [r for r in objects["Role"]["rules"] if r.get("resourceNames")]
    assert [r["resourceNames"] for r in named] == [[GUARD_CONFIGMAP]]
    for binding in ("ClusterRoleBinding", "RoleBinding"):
        (subject,) = objects[binding]["subjects"]
        # z2jh's hub ServiceAccount, in the release's namespace
        assert subject == {"kind": "ServiceAccount", "name": "hub", "namespace": "x"}
    # every namespaced object and subject was rewritten by the README's sed
    assert "namespace: jupyterhub" not in yaml.safe_dump_all(rbac_objects("x"))


@pytest.fixture(scope="module")
async def hub_namespace(core) -> str:
    try:
        await core.create_namespace({"metadata": {"name": RBAC_NAMESPACE}})
    except ApiException as e:
        if e.status != 409:
            raise
    return RBAC_NAMESPACE


@pytest.fixture(scope="module")
async def hub_identity(cluster, hub_namespace):
    """A client that authenticates as z2jh's hub ServiceAccount, and holds only
    what RBAC grants that ServiceAccount (with its groups, as a token would)."""
    user = f"system:serviceaccount:{hub_namespace}:hub"
    groups = ("system:serviceaccounts", f"system:serviceaccounts:{hub_namespace}")
    path = cluster.kubeconfig_for(user, groups)
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(path), client_configuration=configuration)
    api = client.ApiClient(configuration)
    # the API server adds system:authenticated to every authenticated identity
    all_groups = [*groups, "system:authenticated"]
    yield {"api": client.CoreV1Api(api), "user": user, "groups": all_groups}
    await api.close()


async def status_of(call) -> int:
    """The HTTP status of one API request (the response body is dropped)."""
    try:
        response = await call(_preload_content=False)
    except ApiException as e:
        return e.status
    try:
        return response.status
    finally:
        response.release()


def needed_requests(core: client.CoreV1Api, namespace: str, node: str) -> dict:
    """Every request the service and the spawner make, by who makes it."""
    guard = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": GUARD_CONFIGMAP, "namespace": namespace},
        "data": {"gpushare_guard.py": "# test\n"},
    }
    return {
        # the service's node and pod watches (list, then watch from there)
        "service: list nodes": lambda **kw: core.list_node(**kw),
        "service: watch nodes": lambda **kw: core.list_node(watch=True, timeout_seconds=1, **kw),
        "service: get a node": lambda **kw: core.read_node(node, **kw),
        "service: list pods in all namespaces": lambda **kw: core.list_pod_for_all_namespaces(**kw),
        "service: watch pods in all namespaces": lambda **kw: core.list_pod_for_all_namespaces(
            watch=True, timeout_seconds=1, **kw
        ),
        # the spawner: node labels, then the memory guard's ConfigMap
        "spawner: list nodes by label": lambda **kw: core.list_node(
            label_selector="nvidia.com/gpu.present=true", **kw
        ),
        "spawner: create the guard ConfigMap": lambda **kw: core.create_namespaced_config_map(
            namespace, guard, **kw
        ),
        "spawner: read the guard ConfigMap": lambda **kw: core.read_namespaced_config_map(
            GUARD_CONFIGMAP, namespace, **kw
        ),
        "spawner: update the guard ConfigMap": lambda **kw: core.replace_namespaced_config_map(
            GUARD_CONFIGMAP, namespace, guard, **kw
        ),
    }


async def run_requests(requests: dict) -> dict[str, int]:
    return {what: await status_of(call) for what, call in requests.items()}


async def create_rbac(kube: client.ApiClient, objects: list[dict]) -> None:
    rbac = client.RbacAuthorizationV1Api(kube)
    for obj in objects:
        kind, ns = obj["kind"], obj["metadata"].get("namespace")
        if kind == "ClusterRole":
            await rbac.create_cluster_role(obj)
        elif kind == "ClusterRoleBinding":
            await rbac.create_cluster_role_binding(obj)
        elif kind == "Role":
            await rbac.create_namespaced_role(ns, obj)
        else:
            await rbac.create_namespaced_role_binding(ns, obj)


async def delete_rbac(kube: client.ApiClient, objects: list[dict]) -> None:
    rbac = client.RbacAuthorizationV1Api(kube)
    for obj in objects:
        kind, ns, name = obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]
        try:
            if kind == "ClusterRole":
                await rbac.delete_cluster_role(name)
            elif kind == "ClusterRoleBinding":
                await rbac.delete_cluster_role_binding(name)
            elif kind == "Role":
                await rbac.delete_namespaced_role(name, ns)
            else:
                await rbac.delete_namespaced_role_binding(name, ns)
        except ApiException as e:
            if e.status != 404:
                raise


async def delete_guard(core: client.CoreV1Api, namespace: str) -> None:
    try:
        await core.delete_namespaced_config_map(GUARD_CONFIGMAP, namespace)
    except ApiException as e:
        if e.status != 404:
            raise


async def allowed(kube: client.ApiClient, identity: dict, attributes: dict) -> bool:
    """Whether the API server's authorizer lets the identity do this (a
    SubjectAccessReview, asked by the admin)."""
    review = await client.AuthorizationV1Api(kube).create_subject_access_review(
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": identity["user"],
                "groups": identity["groups"],
                "resourceAttributes": attributes,
            },
        }
    )
    return bool(review.status.allowed)


@pytest.mark.cluster
async def test_without_the_rbac_the_hub_is_forbidden(core, hub_identity, hub_namespace, gpu_nodes):
    node = await gpu_nodes()
    await delete_guard(core, hub_namespace)
    statuses = await run_requests(needed_requests(hub_identity["api"], hub_namespace, node))
    assert statuses == {what: 403 for what in statuses}


@pytest.mark.cluster
async def test_with_the_rbac_the_service_and_the_spawner_can_work(
    kube, core, hub_identity, hub_namespace, gpu_nodes
):
    objects = rbac_objects(hub_namespace)
    node = await gpu_nodes()
    await delete_guard(core, hub_namespace)
    sa_core = hub_identity["api"]
    await create_rbac(kube, objects)
    try:
        # RBAC changes reach the authorizer within moments
        async def granted():
            return await status_of(lambda **kw: sa_core.list_node(**kw)) == 200

        await wait_for(granted, 15, "the ClusterRole to take effect")

        async def guard_granted():
            call = lambda **kw: sa_core.read_namespaced_config_map(  # noqa: E731
                GUARD_CONFIGMAP, hub_namespace, **kw
            )
            return await status_of(call) == 404  # allowed to look, not there yet

        await wait_for(guard_granted, 15, "the Role to take effect")

        statuses = await run_requests(needed_requests(sa_core, hub_namespace, node))
        expected = {what: 200 for what in statuses}
        expected["spawner: create the guard ConfigMap"] = 201
        assert statuses == expected
    finally:
        await delete_rbac(kube, objects)
        await delete_guard(core, hub_namespace)

    # and it was these objects that granted it: gone with them
    async def revoked():
        return await status_of(lambda **kw: sa_core.list_node(**kw)) == 403

    await wait_for(revoked, 15, "the ClusterRole's removal to take effect")


# Requests the snippet must *not* allow: changing nodes or pods, reading secrets,
# touching other ConfigMaps, anything in other namespaces' ConfigMaps.
def forbidden_attributes(namespace: str) -> list[dict]:
    return [
        {"verb": "patch", "resource": "nodes"},
        {"verb": "delete", "resource": "nodes"},
        {"verb": "update", "resource": "nodes", "subresource": "status"},
        {"verb": "get", "resource": "pods", "namespace": "kube-system"},
        {"verb": "create", "resource": "pods", "namespace": namespace},
        {"verb": "delete", "resource": "pods", "namespace": namespace},
        {"verb": "create", "resource": "pods", "subresource": "exec", "namespace": namespace},
        {"verb": "get", "resource": "pods", "subresource": "log", "namespace": namespace},
        {"verb": "list", "resource": "secrets"},
        {"verb": "get", "resource": "secrets", "namespace": namespace},
        {"verb": "list", "resource": "configmaps", "namespace": namespace},
        {"verb": "watch", "resource": "configmaps", "namespace": namespace},
        {"verb": "get", "resource": "configmaps", "namespace": namespace, "name": "other"},
        {"verb": "update", "resource": "configmaps", "namespace": namespace, "name": "other"},
        {
            "verb": "patch",
            "resource": "configmaps",
            "namespace": namespace,
            "name": GUARD_CONFIGMAP,
        },
        {
            "verb": "delete",
            "resource": "configmaps",
            "namespace": namespace,
            "name": GUARD_CONFIGMAP,
        },
        {"verb": "create", "resource": "configmaps", "namespace": "default"},
        {"verb": "get", "resource": "configmaps", "namespace": "default", "name": GUARD_CONFIGMAP},
        {"verb": "list", "resource": "clusterpolicies", "group": "nvidia.com"},
        {"verb": "create", "resource": "rolebindings", "group": "rbac.authorization.k8s.io"},
    ]


@pytest.mark.cluster
async def test_the_rbac_grants_nothing_more(kube, hub_identity, hub_namespace):
    objects = rbac_objects(hub_namespace)
    await create_rbac(kube, objects)
    try:
        probe = {"verb": "watch", "resource": "nodes"}

        async def granted():
            return await allowed(kube, hub_identity, probe)

        await wait_for(granted, 15, "the ClusterRole to take effect")
        too_much = [
            attributes
            for attributes in forbidden_attributes(hub_namespace)
            if await allowed(kube, hub_identity, attributes)
        ]
        assert too_much == []
    finally:
        await delete_rbac(kube, objects)


# -- the user-scheduler's scoring, in a real kube-scheduler ------------------------
def scheduler_profile(name: str, values: dict) -> dict:
    """A kube-scheduler profile as the chart renders the user-scheduler's."""
    scheduler = values["scheduling"]["userScheduler"]
    return {
        "schedulerName": name,
        "plugins": scheduler["plugins"],
        "pluginConfig": scheduler["pluginConfig"],
    }


def small_pod(name: str, scheduler: str | None = None, node: str | None = None, **resources):
    requests = {"cpu": resources.pop("cpu", "100m"), "memory": resources.pop("memory", "128Mi")}
    limits = {"nvidia.com/gpu": str(resources.pop("gpu"))} if "gpu" in resources else {}
    spec: dict = {
        "containers": [{"name": "c", "image": "x", "resources": {"requests": requests}}],
        "restartPolicy": "Never",
    }
    if limits:
        spec["containers"][0]["resources"]["limits"] = limits
    if scheduler:
        spec["schedulerName"] = scheduler
    if node:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


@pytest.fixture
def user_scheduler(cluster, chart, tmp_path):
    """A kube-scheduler with two profiles: the chart's user-scheduler as it comes,
    and with user-scheduler.yaml merged in."""
    from jupyterhub_gpushare.testing.cluster import Component, free_port

    defaults, _ = chart
    configuration = {
        "apiVersion": "kubescheduler.config.k8s.io/v1",
        "kind": "KubeSchedulerConfiguration",
        "clientConnection": {"kubeconfig": str(cluster.kubeconfig)},
        "leaderElection": {"leaderElect": False},
        "profiles": [
            scheduler_profile("chart-default", defaults),
            scheduler_profile(
                "gpushare-packing", helm_merge(defaults, load("user-scheduler.yaml"))
            ),
        ],
    }
    path = tmp_path / "user-scheduler.yaml"
    path.write_text(yaml.safe_dump(configuration))
    scheduler = Component(
        "user-scheduler",
        [
            str(cluster.bin_dir / "kube-scheduler"),
            f"--config={path}",
            "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}",
            f"--authentication-kubeconfig={cluster.kubeconfig}",
            f"--authorization-kubeconfig={cluster.kubeconfig}",
            f"--cert-dir={tmp_path / 'certs'}",
        ],
        tmp_path / "user-scheduler.log",
    )
    scheduler.start()
    yield scheduler
    scheduler.stop()


@pytest.mark.cluster
async def test_user_scheduler_packs_gpu_slices(core, gpu_nodes, hub_namespace, user_scheduler):
    # Node cpu-busy has half its CPUs taken by a CPU-only pod; node gpu-busy has 3
    # of its 4 slices taken. Scoring CPU and memory only (the chart's default),
    # the next GPU server goes to cpu-busy; with the GPU scored it fills gpu-busy.
    cpu_busy = await gpu_nodes(replicas=4)
    gpu_busy = await gpu_nodes(replicas=4)
    ns = hub_namespace
    placed = [small_pod("cpu-heavy", node=cpu_busy, cpu="16", memory="64Gi")]
    placed += [small_pod(f"slice-{i}", node=gpu_busy, gpu=1) for i in range(3)]
    created = [p["metadata"]["name"] for p in placed]
    try:
        for pod in placed:
            await core.create_namespaced_pod(ns, pod)

        async def placed_where(name: str, scheduler: str) -> str:
            created.append(name)
            await core.create_namespaced_pod(ns, small_pod(name, scheduler=scheduler, gpu=1))

            async def bound():
                if not user_scheduler.running:
                    raise AssertionError(f"kube-scheduler exited: {user_scheduler.last_log_line()}")
                return (await core.read_namespaced_pod(name, ns)).spec.node_name

            node = await wait_for(bound, 60, f"{name} to be scheduled")
            await core.delete_namespaced_pod(name, ns, grace_period_seconds=0)
            return node

        assert await placed_where("server-a", "chart-default") == cpu_busy
        assert await placed_where("server-b", "gpushare-packing") == gpu_busy
    finally:
        for name in created:
            with contextlib.suppress(ApiException):
                await core.delete_namespaced_pod(name, ns, grace_period_seconds=0)


# -- the device plugin's time-slicing config --------------------------------------
def time_slicing_configmap() -> tuple[dict, str, str]:
    (configmap,) = load_all("time-slicing-configmap.yaml")
    ((key, text),) = configmap["data"].items()
    return configmap, key, text


@pytest.fixture(scope="module")
def plugin_parser():
    try:
        return pluginparser.binary()
    except pluginparser.ParserUnavailable as e:
        pytest.fail(f"the device plugin's parser cannot be built: {e}")


def test_configmap_is_the_device_plugins_config(plugin_parser):
    configmap, key, text = time_slicing_configmap()
    assert configmap["apiVersion"] == "v1" and configmap["kind"] == "ConfigMap"
    assert configmap["metadata"]["name"] == "time-slicing-config"
    assert configmap["metadata"]["namespace"] == "gpu-operator"
    # the device plugin's own code reads it: 4 slices per GPU, nothing ignored
    answer = pluginparser.read(text, plugin_parser)
    assert answer.ok and answer.warnings == []
    assert (answer.gpu.strategy, answer.gpu.label_replicas, answer.gpu.devices_per_gpu) == (
        "time-slicing",
        4,
        4,
    )
    assert (answer.gpu.resource, answer.gpu.fail_requests_greater_than_one) == (
        "nvidia.com/gpu",
        False,
    )
    # the ClusterPolicy patch in the comments names this ConfigMap and key
    header = (SNIPPETS / "time-slicing-configmap.yaml").read_text()
    patch = re.search(r"-p '(\{.*\})'", header).group(1)
    assert json.loads(patch) == {
        "spec": {
            "devicePlugin": {"config": {"name": configmap["metadata"]["name"], "default": key}}
        }
    }


def test_configmap_holds_what_gpushare_setup_writes():
    _, _, text = time_slicing_configmap()
    sharing = pluginconfig.Sharing("time-slicing", 4)
    reading = pluginconfig.read_config(text)
    assert reading.usable and reading.notes == [] and reading.sharing == sharing
    # ... and the very config `gpushare setup --replicas 4` writes: setup adopts it
    assert yaml.safe_load(text) == yaml.safe_load(pluginconfig.render_config(sharing))


def test_readme_install_order_matches():
    readme = (SNIPPETS / "README.md").read_text()
    command = readme[readme.index("helm upgrade --install") :]
    command = command[: command.index("```")]
    assert re.findall(r"helm-snippets/([\w-]+\.yaml)", command) == list(INSTALL_ORDER)
