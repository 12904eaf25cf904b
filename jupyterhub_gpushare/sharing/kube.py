"""The Kubernetes API calls ``gpushare`` makes, and writing a plan with undo.

Reads return plain API-shaped dicts. Writes keep to optimistic concurrency: the
ClusterPolicy is patched with the resourceVersion it was planned from, and when
that fails with a conflict, it is read again: if only its status changed (the
operator writes status often, and every write moves resourceVersion), the patch
is retried; if its spec or gpushare's record changed, the run fails and undoes
what it wrote.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from .cluster import (
    CLUSTER_POLICY_GROUP,
    CLUSTER_POLICY_PLURAL,
    CLUSTER_POLICY_VERSION,
    DEVICE_PLUGIN_SELECTOR,
    GPU_PRESENT_LABEL,
    POLICY_RECORD_ANNOTATION,
    GpuNode,
    annotations,
    policy_name,
)
from .output import EXIT_USAGE, Failure
from .plan import Access, Plan, apply_merge_patch, merge_patch

if TYPE_CHECKING:
    from kubernetes_asyncio.client import ApiClient

# kubernetes_asyncio is imported where it is used: --help, --version and
# --print-config then stay instant and work without any cluster configuration.

log = logging.getLogger("gpushare")

CONFLICT_RETRIES = 5


def _api_message(error: Any) -> str:
    body = getattr(error, "body", None)
    try:
        return json.loads(body).get("message") or ""
    except (TypeError, ValueError, AttributeError):
        return ""


def api_failure(error: Any, doing: str) -> Failure:
    """One line for an API error, saying what we were doing and what to do about it."""
    status = getattr(error, "status", None)
    message = _api_message(error) or str(getattr(error, "reason", "")) or "no details"
    if status == 403 and "cannot " in message:  # RBAC says "User x cannot verb ..."
        return Failure(
            f"permission denied while {doing}: {message} (grant it with an RBAC Role or "
            "ClusterRole bound to you)"
        )
    if status == 401:
        return Failure(f"the API server does not accept your credentials ({message})")
    if status == 409:
        return Failure(
            f"{doing} failed: {message}; someone changed it while gpushare ran, run it again"
        )
    return Failure(f"{doing} failed: {message} (HTTP {status})")


def _spec_change(planned: Mapping, fresh: Mapping) -> str | None:
    """What someone else changed in a ClusterPolicy, or None if only its status moved."""
    if (planned.get("spec") or {}) != (fresh.get("spec") or {}):
        before = (planned.get("spec") or {}).get("devicePlugin")
        after = (fresh.get("spec") or {}).get("devicePlugin")
        return "spec.devicePlugin" if before != after else "its spec"
    record = POLICY_RECORD_ANNOTATION
    if annotations(planned).get(record) != annotations(fresh).get(record):
        return f"the annotation {record}"
    return None


class Kube:
    """The few API calls the commands make."""

    def __init__(self, api: ApiClient) -> None:
        from kubernetes_asyncio import client

        self.api = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.authz = client.AuthorizationV1Api(api)
        self.authn = client.AuthenticationV1Api(api)

    async def _read(self, doing: str, call, *args, not_found=False, **kwargs) -> dict | None:
        """Call a read API without building client models (pod lists can be large)."""
        from kubernetes_asyncio.client.exceptions import ApiException

        log.debug("%s", doing)
        response = await call(*args, _preload_content=False, **kwargs)
        try:
            body = await response.read()
        finally:
            response.release()
        if 200 <= response.status < 300:
            return json.loads(body)
        if response.status == 404 and not_found:
            return None
        error = ApiException(status=response.status, reason=response.reason)
        error.body = body
        raise api_failure(error, doing)

    # -- reads -----------------------------------------------------------------------------
    async def policies(self) -> list[dict]:
        """Every ClusterPolicy; none when the GPU operator's CRD is not installed."""
        listing = await self._read(
            "listing ClusterPolicies",
            self.custom.list_cluster_custom_object,
            CLUSTER_POLICY_GROUP,
            CLUSTER_POLICY_VERSION,
            CLUSTER_POLICY_PLURAL,
            not_found=True,
        )
        return list((listing or {}).get("items") or [])

    async def policy(self, name: str) -> dict | None:
        return await self._read(
            f"reading ClusterPolicy {name}",
            self.custom.get_cluster_custom_object,
            CLUSTER_POLICY_GROUP,
            CLUSTER_POLICY_VERSION,
            CLUSTER_POLICY_PLURAL,
            name,
            not_found=True,
        )

    async def config_map(self, namespace: str, name: str) -> dict | None:
        return await self._read(
            f"reading ConfigMap {namespace}/{name}",
            self.core.read_namespaced_config_map,
            name,
            namespace,
            not_found=True,
        )

    async def gpu_nodes(self, selector: str | None = None) -> list[GpuNode]:
        labels = f"{GPU_PRESENT_LABEL}=true" + (f",{selector}" if selector else "")
        try:
            listing = await self._read(
                "listing GPU nodes", self.core.list_node, label_selector=labels
            )
        except Failure as e:
            if selector and "HTTP 400" in str(e):
                raise Failure(
                    f"--nodes {selector!r} is not a valid label selector", EXIT_USAGE
                ) from None
            raise
        return sorted((GpuNode.from_api(node) for node in listing["items"]), key=lambda n: n.name)

    async def pods(
        self, namespace: str | None = None, label_selector: str = "", field_selector: str = ""
    ) -> list[dict]:
        if namespace:
            listing = await self._read(
                f"listing pods in namespace {namespace}",
                self.core.list_namespaced_pod,
                namespace,
                label_selector=label_selector,
                field_selector=field_selector,
            )
        else:
            listing = await self._read(
                "listing pods",
                self.core.list_pod_for_all_namespaces,
                label_selector=label_selector,
                field_selector=field_selector,
            )
        return listing["items"]

    async def plugin_pods(self, namespace: str) -> list[dict]:
        """The device-plugin DaemonSet's pods, in every phase."""
        return await self.pods(namespace, label_selector=DEVICE_PLUGIN_SELECTOR)

    # -- permissions -----------------------------------------------------------------------
    async def whoami(self) -> str:
        try:
            review = await self.authn.create_self_subject_review(
                {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
            )
            return review.status.user_info.username
        except Exception:  # an older API server, or not allowed: only for the message
            return "you"

    async def missing(self, needs: list[Access]) -> list[Access]:
        """The needed permissions RBAC does not grant (asked before changing anything)."""
        from kubernetes_asyncio.client.exceptions import ApiException

        async def allowed(access: Access) -> bool:
            body = {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SelfSubjectAccessReview",
                "spec": {
                    "resourceAttributes": {
                        "verb": access.verb,
                        "group": access.group,
                        "resource": access.resource,
                        "namespace": access.namespace or "",
                    }
                },
            }
            try:
                review = await self.authz.create_self_subject_access_review(body)
            except ApiException:
                return True  # cannot ask: the call itself will tell
            return bool(review.status.allowed)

        answers = await asyncio.gather(*(allowed(a) for a in needs))
        return [a for a, ok in zip(needs, answers, strict=True) if not ok]

    async def require(self, needs: list[Access]) -> None:
        missing = await self.missing(needs)
        if missing:
            user = await self.whoami()
            raise Failure(
                f"missing RBAC permission for {user if user == 'you' else repr(user)}: "
                + "; ".join(f"cannot {a.describe()}" for a in missing)
                + " (add these verbs to a Role or ClusterRole bound to this user)"
            )

    # -- writes ----------------------------------------------------------------------------
    async def patch_policy(self, planned: Mapping, patch: Mapping) -> dict:
        """Merge-patch a ClusterPolicy that is still as planned, status aside."""
        from kubernetes_asyncio.client.exceptions import ApiException

        name = policy_name(planned)
        seen = planned
        for _ in range(CONFLICT_RETRIES):
            body = copy.deepcopy(dict(patch))
            body.setdefault("metadata", {})["resourceVersion"] = seen["metadata"]["resourceVersion"]
            try:
                return await self.custom.patch_cluster_custom_object(
                    CLUSTER_POLICY_GROUP,
                    CLUSTER_POLICY_VERSION,
                    CLUSTER_POLICY_PLURAL,
                    name,
                    body,
                    _content_type="application/merge-patch+json",
                )
            except ApiException as e:
                if e.status != 409:
                    raise
            fresh = await self.policy(name)
            if fresh is None:
                raise Failure(f"ClusterPolicy {name} was deleted while gpushare ran")
            changed = _spec_change(planned, fresh)
            if changed:
                raise Failure(
                    f"ClusterPolicy {name}: someone changed {changed} while gpushare ran; "
                    "run it again to plan from what is there now"
                )
            log.info(
                "ClusterPolicy %s: only its status changed (resourceVersion %s -> %s); "
                "patching again",
                name,
                seen["metadata"]["resourceVersion"],
                fresh["metadata"]["resourceVersion"],
            )
            seen = fresh
        raise Failure(
            f"ClusterPolicy {name} kept changing while gpushare ran ({CONFLICT_RETRIES} "
            "conflicts in a row); run it again"
        )

    async def replace_config_map(self, namespace: str, name: str, before: Mapping, after: Mapping):
        """Put ``after``'s data and annotations on the live ConfigMap, if its data is still
        ``before``'s; labels and owner references others put there stay."""
        from kubernetes_asyncio.client.exceptions import ApiException

        for _ in range(CONFLICT_RETRIES):
            current = await self.core.read_namespaced_config_map(name, namespace)
            if (current.data or {}) != (before.get("data") or {}):
                raise Failure(
                    f"ConfigMap {namespace}/{name} changed while gpushare ran; run it again"
                )
            current.data = dict(after.get("data") or {})
            current.metadata.annotations = dict(annotations(after)) or None
            try:
                # its resourceVersion makes a concurrent edit fail instead of being lost
                return await self.core.replace_namespaced_config_map(name, namespace, current)
            except ApiException as e:
                if e.status != 409:
                    raise
        raise Failure(
            f"ConfigMap {namespace}/{name} kept changing while gpushare ran; run it again"
        )


def _inverse_labels(node: GpuNode, patch: Mapping) -> dict:
    meta = patch.get("metadata") or {}
    inverse: dict[str, dict] = {}
    for part, current in (("labels", node.labels), ("annotations", node.annotations)):
        if part in meta:
            inverse[part] = {k: current.get(k) for k in meta[part]}
    return {"metadata": inverse}


async def apply_plan(kube: Kube, plan: Plan, policy: Mapping, nodes: list[GpuNode]) -> None:
    """Write the plan's objects; if one write fails, undo the earlier ones."""
    import aiohttp
    from kubernetes_asyncio.client.exceptions import ApiException

    undo: list[tuple[str, Callable[[], Awaitable[Any]]]] = []
    core, ns, name = kube.core, plan.namespace, plan.config_map_name

    async def write_config_map() -> None:
        action = plan.config_map_action
        if action == "create":
            await core.create_namespaced_config_map(ns, plan.config_map_after)
            undo.append(
                ("delete the ConfigMap", lambda: core.delete_namespaced_config_map(name, ns))
            )
        elif action == "delete":
            current = await core.read_namespaced_config_map(name, ns)
            if (current.data or {}) != (plan.config_map_before or {}).get("data", {}):
                raise Failure(f"ConfigMap {ns}/{name} changed while gpushare ran; run it again")
            await core.delete_namespaced_config_map(
                name,
                ns,
                body={"preconditions": {"resourceVersion": current.metadata.resource_version}},
            )
            before = {**plan.config_map_before}
            undo.append(
                ("recreate the ConfigMap", lambda: core.create_namespaced_config_map(ns, before))
            )
        elif action == "update":
            await kube.replace_config_map(ns, name, plan.config_map_before, plan.config_map_after)
            undo.append(
                (
                    "restore the ConfigMap",
                    lambda: kube.replace_config_map(
                        ns, name, plan.config_map_after, plan.config_map_before
                    ),
                )
            )

    async def write_nodes() -> None:
        by_name = {n.name: n for n in nodes}
        for node_name, patch in sorted(plan.node_patches.items()):
            inverse = _inverse_labels(by_name[node_name], patch)
            await core.patch_node(node_name, patch)
            undo.append(
                (
                    f"restore node {node_name}'s labels",
                    lambda n=node_name, p=inverse: core.patch_node(n, p),
                )
            )

    async def write_policy() -> None:
        if not plan.policy_patch:
            return
        before = {
            "metadata": {"annotations": annotations(policy)},
            "spec": policy.get("spec") or {},
        }
        inverse = merge_patch(apply_merge_patch(before, plan.policy_patch), before)
        await kube.patch_policy(policy, plan.policy_patch)
        undo.append(
            (
                f"restore ClusterPolicy {plan.policy_name}",
                lambda: kube.custom.patch_cluster_custom_object(
                    CLUSTER_POLICY_GROUP,
                    CLUSTER_POLICY_VERSION,
                    CLUSTER_POLICY_PLURAL,
                    plan.policy_name,
                    inverse,
                    _content_type="application/merge-patch+json",
                ),
            )
        )

    # setup: config first, then what selects it; disable: stop selecting, then remove
    steps = [
        (f"writing ConfigMap {ns}/{name}", write_config_map),
        ("labelling nodes", write_nodes),
        (f"patching ClusterPolicy {plan.policy_name}", write_policy),
    ]
    if plan.action == "disable":
        steps.reverse()
    for doing, step in steps:
        try:
            await step()
        except (ApiException, Failure, aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            if isinstance(e, Failure):
                failure = e
            elif isinstance(e, ApiException):
                failure = api_failure(e, doing)
            else:
                failure = Failure(f"{doing} failed: the API server did not answer ({e!r})")
            undone = []
            for what, action in reversed(undo):
                try:
                    await action()
                    undone.append(what)
                except (
                    ApiException,
                    Failure,
                    aiohttp.ClientError,
                    OSError,
                    asyncio.TimeoutError,
                ) as undo_error:
                    log.error(
                        "could not %s: %s", what, _api_message(undo_error) or repr(undo_error)
                    )
                    raise Failure(
                        f"{failure}; undoing also failed ({what}): fix by hand or run "
                        "gpushare disable"
                    ) from None
            suffix = f" (undone: {', '.join(undone)})" if undone else " (nothing was changed)"
            raise Failure(str(failure) + suffix) from None


async def delete_plugin_pods(kube: Kube, namespace: str, nodes: set[str]) -> set[str]:
    """Delete the device-plugin pods on ``nodes``; their DaemonSet recreates them.
    Returns the deleted pods' uids."""
    from kubernetes_asyncio.client.exceptions import ApiException

    deleted = set()
    for pod in await kube.plugin_pods(namespace):
        meta = pod["metadata"]
        if (pod.get("spec") or {}).get("nodeName") not in nodes:
            continue
        try:
            await kube.core.delete_namespaced_pod(meta["name"], namespace)
        except ApiException as e:
            if e.status != 404:
                raise api_failure(e, f"deleting device-plugin pod {meta['name']}") from None
        deleted.add(meta["uid"])
        log.info("deleted device-plugin pod %s on %s", meta["name"], pod["spec"]["nodeName"])
    return deleted


async def with_kube(kubeconfig: str | None, body: Callable[[Kube], Awaitable[Any]]) -> Any:
    """Run ``body`` with an API client; turn connection and config problems into Failures."""
    import aiohttp
    from kubernetes_asyncio.client.exceptions import ApiException
    from kubernetes_asyncio.config import ConfigException

    from .. import clients

    try:
        api = await clients.api_client(kubeconfig)
        return await body(Kube(api))
    except ConfigException as e:
        raise Failure(str(e)) from None
    except ApiException as e:
        raise api_failure(e, "talking to the API server") from None
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
        raise Failure(f"cannot reach the Kubernetes API server: {e}") from None
    finally:
        await clients.close_clients()
