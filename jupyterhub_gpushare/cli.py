"""The ``gpushare`` command: set up, inspect and undo GPU time-slicing.

``setup`` writes the NVIDIA device plugin's sharing config into the GPU
operator's ConfigMap, points the ClusterPolicy (or selected nodes' labels) at
it, restarts the device plugin only while no GPU pod waits to be admitted, and
checks that every node then advertises GPUs x replicas. ``disable`` puts back
exactly what ``setup`` found. ``status`` shows slices per node and who waits.

The decisions live in :mod:`jupyterhub_gpushare.timeslicing`; this module does
the Kubernetes I/O (through :mod:`jupyterhub_gpushare.clients`) and the output.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from . import timeslicing as ts
from ._version import __version__
from .timeslicing import Access, ConfigError, GpuNode, Plan, Sharing

if TYPE_CHECKING:
    from kubernetes_asyncio.client import ApiClient

# kubernetes_asyncio is imported where it is used: --help, --version and
# --print-config then stay instant and work without any cluster configuration.

log = logging.getLogger("gpushare")

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
POLL_SECONDS = 0.5


class Failure(Exception):
    """Ends a command with one line for the user and a non-zero exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code


# -- output ---------------------------------------------------------------------------
def _can_encode(text: str, stream) -> bool:
    try:
        text.encode(getattr(stream, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


class Output:
    """Human text with success and failure markers, or one JSON document (--json)."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        fancy = _can_encode("✓✗→•", sys.stdout) and _can_encode("✓✗", sys.stderr)
        self.mark_ok, self.mark_fail = ("✓", "✗") if fancy else ("OK", "FAIL")
        self.mark_step, self.mark_item = ("→", "•") if fancy else ("->", "-")

    def line(self, text: str = "") -> None:
        if not self.as_json:
            click.echo(text)

    def step(self, text: str) -> None:
        self.line(f"{self.mark_step} {text}")

    def item(self, text: str) -> None:
        self.line(f"  {self.mark_item} {text}")

    def ok(self, text: str) -> None:
        self.line(f"{self.mark_ok} {text}")

    def warn(self, text: str) -> None:
        # warnings reach the user in --json mode too, on stderr
        click.echo(f"! {text}", err=True)

    def fail(self, text: str) -> None:
        click.echo(f"{self.mark_fail} {text}", err=True)
        if self.as_json:
            self.json({"ok": False, "error": text})

    def json(self, document: Mapping) -> None:
        click.echo(json.dumps(document, indent=2, sort_keys=False))


class Progress:
    """One status line: rewritten in place on a terminal, else printed when it changes."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = ""
        self.shown = False

    def update(self, text: str, elapsed: float, timeout: float) -> None:
        if self.tty:
            sys.stderr.write(f"\r\033[K  {text} ({elapsed:.0f}s of {timeout:.0f}s)")
            sys.stderr.flush()
            self.shown = True
        elif text != self.last:
            sys.stderr.write(f"  [{elapsed:5.1f}s] {text}\n")
            sys.stderr.flush()
        self.last = text

    def close(self) -> None:
        if self.tty and self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
        self.shown = False


# -- Kubernetes I/O -----------------------------------------------------------------------
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


class Kube:
    """The few API calls the commands make, returning plain API-shaped dicts."""

    def __init__(self, api: ApiClient) -> None:
        from kubernetes_asyncio import client

        self.api = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.authz = client.AuthorizationV1Api(api)
        self.authn = client.AuthenticationV1Api(api)

    async def _read(self, doing: str, call, *args, not_found=False, **kwargs) -> dict | None:
        """Call a read API without building client models (pods lists can be large)."""
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

    async def policy(self) -> dict | None:
        return await self._read(
            f"reading ClusterPolicy {ts.CLUSTER_POLICY_NAME}",
            self.custom.get_cluster_custom_object,
            ts.CLUSTER_POLICY_GROUP,
            ts.CLUSTER_POLICY_VERSION,
            ts.CLUSTER_POLICY_PLURAL,
            ts.CLUSTER_POLICY_NAME,
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
        labels = f"{ts.GPU_PRESENT_LABEL}=true" + (f",{selector}" if selector else "")
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


async def _with_kube(kubeconfig: str | None, body: Callable[[Kube], Awaitable[Any]]) -> Any:
    """Run ``body`` with an API client; turn connection and config problems into Failures."""
    import aiohttp
    from kubernetes_asyncio.client.exceptions import ApiException
    from kubernetes_asyncio.config import ConfigException

    from . import clients

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


def _run(out: Output, work: Awaitable[Any]) -> Any:
    try:
        return asyncio.run(work)
    except Failure as e:
        out.fail(str(e))
        sys.exit(e.code)
    except ConfigError as e:
        out.fail(str(e))
        sys.exit(EXIT_FAILURE)
    except KeyboardInterrupt:
        out.fail("interrupted")
        sys.exit(EXIT_INTERRUPTED)


# -- setup and disable --------------------------------------------------------------------
@dataclass
class Options:
    namespace: str
    dry_run: bool
    yes: bool
    force: bool
    wait_pending: bool
    timeout: float
    selector: str | None = None


def _plugin_pods_by_node(pods: list[dict]) -> dict[str, list[dict]]:
    by_node: dict[str, list[dict]] = {}
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        if node and not (pod.get("metadata") or {}).get("deletionTimestamp"):
            by_node.setdefault(node, []).append(pod)
    return by_node


def _pod_ready(pod: Mapping) -> bool:
    status = pod.get("status") or {}
    if status.get("phase") != "Running":
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def _pod_state(pod: Mapping) -> str:
    status = pod.get("status") or {}
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason"):
            return waiting["reason"]
    return status.get("reason") or status.get("phase") or "Pending"


async def _check_plugin_pods(kube: Kube, plan: Plan, opts: Options, out: Output) -> None:
    """Every node we restart needs a device-plugin pod, or its capacity can never change."""
    pods = await kube.pods(opts.namespace, label_selector=ts.DEVICE_PLUGIN_SELECTOR)
    by_node = _plugin_pods_by_node(pods)
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
            f"no device-plugin pod ({ts.DEVICE_PLUGIN_SELECTOR}) in namespace {opts.namespace} "
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
    return ts.pending_gpu_pods(await kube.pods(field_selector="status.phase=Pending"), nodes)


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


def _inverse_labels(node: GpuNode, patch: Mapping) -> dict:
    meta = patch.get("metadata") or {}
    inverse: dict[str, dict] = {}
    for part, current in (("labels", node.labels), ("annotations", node.annotations)):
        if part in meta:
            inverse[part] = {k: current.get(k) for k in meta[part]}
    return {"metadata": inverse}


def _with_content(config_map: Any, wanted: Mapping) -> Any:
    """A ConfigMap model with the data and annotations of ``wanted`` (an API dict)."""
    config_map.data = dict(wanted.get("data") or {})
    config_map.metadata.annotations = dict(wanted["metadata"].get("annotations") or {}) or None
    return config_map


async def _apply(kube: Kube, plan: Plan, policy: Mapping, nodes: list[GpuNode]) -> None:
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
        elif action in ("update", "delete"):
            current = await core.read_namespaced_config_map(name, ns)
            if (current.data or {}) != (plan.config_map_before or {}).get("data", {}):
                raise Failure(f"ConfigMap {ns}/{name} changed while gpushare ran; run it again")
            if action == "delete":
                await core.delete_namespaced_config_map(
                    name,
                    ns,
                    body={"preconditions": {"resourceVersion": current.metadata.resource_version}},
                )
                before = {**plan.config_map_before}
                before["metadata"] = {
                    k: v for k, v in before["metadata"].items() if k != "resourceVersion"
                }
                undo.append(
                    (
                        "recreate the ConfigMap",
                        lambda: core.create_namespaced_config_map(ns, before),
                    )
                )
            else:
                # change data and annotations of the live object only: labels and
                # owner references someone else put there stay; its resourceVersion
                # makes a concurrent edit fail instead of being overwritten
                await core.replace_namespaced_config_map(
                    name, ns, _with_content(current, plan.config_map_after)
                )

                async def restore() -> None:
                    fresh = await core.read_namespaced_config_map(name, ns)
                    await core.replace_namespaced_config_map(
                        name, ns, _with_content(fresh, plan.config_map_before)
                    )

                undo.append(("restore the ConfigMap", restore))

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
            "metadata": {"annotations": dict(policy["metadata"].get("annotations") or {})},
            "spec": policy.get("spec") or {},
        }
        inverse = ts.merge_patch(ts.apply_merge_patch(before, plan.policy_patch), before)
        patch = json.loads(json.dumps(plan.policy_patch))
        # optimistic concurrency: fail rather than overwrite someone else's edit
        patch.setdefault("metadata", {})["resourceVersion"] = policy["metadata"]["resourceVersion"]
        await kube.custom.patch_cluster_custom_object(
            ts.CLUSTER_POLICY_GROUP,
            ts.CLUSTER_POLICY_VERSION,
            ts.CLUSTER_POLICY_PLURAL,
            ts.CLUSTER_POLICY_NAME,
            patch,
            _content_type="application/merge-patch+json",
        )
        undo.append(
            (
                f"restore ClusterPolicy {ts.CLUSTER_POLICY_NAME}",
                lambda: kube.custom.patch_cluster_custom_object(
                    ts.CLUSTER_POLICY_GROUP,
                    ts.CLUSTER_POLICY_VERSION,
                    ts.CLUSTER_POLICY_PLURAL,
                    ts.CLUSTER_POLICY_NAME,
                    inverse,
                    _content_type="application/merge-patch+json",
                ),
            )
        )

    # setup: config first, then what selects it; disable: stop selecting, then remove
    steps = [
        ("writing ConfigMap " + f"{ns}/{name}", write_config_map),
        ("labelling nodes", write_nodes),
        (f"patching ClusterPolicy {ts.CLUSTER_POLICY_NAME}", write_policy),
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


async def _restart(kube: Kube, plan: Plan, opts: Options, out: Output) -> set[str]:
    """Delete the device-plugin pods of the affected nodes; their DaemonSet recreates them."""
    from kubernetes_asyncio.client.exceptions import ApiException

    affected = {c.name for c in plan.affected}
    pods = await kube.pods(opts.namespace, label_selector=ts.DEVICE_PLUGIN_SELECTOR)
    deleted = set()
    for pod in pods:
        meta = pod["metadata"]
        if (pod.get("spec") or {}).get("nodeName") not in affected:
            continue
        try:
            await kube.core.delete_namespaced_pod(meta["name"], opts.namespace)
        except ApiException as e:
            if e.status != 404:
                raise api_failure(e, f"deleting device-plugin pod {meta['name']}") from None
        deleted.add(meta["uid"])
        log.info("deleted device-plugin pod %s on %s", meta["name"], pod["spec"]["nodeName"])
    out.step(f"restarted the device plugin on {', '.join(sorted(affected))}")
    return deleted


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
            plugin_pods = _plugin_pods_by_node(
                await kube.pods(opts.namespace, label_selector=ts.DEVICE_PLUGIN_SELECTOR)
            )
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
                elif not any(_pod_ready(p) for p in fresh):
                    state = _pod_state(fresh[0])
                    waiting[name] = (
                        "device plugin starting"
                        if state in ("Pending", "Running")
                        else f"device plugin {state}"
                    )
                else:
                    problems = ts.mismatches(node, sharing)
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
                    f"get pods -l {ts.DEVICE_PLUGIN_SELECTOR}, then run the command again, "
                    "or gpushare disable to undo"
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


def _node_table(nodes: list[GpuNode], verified: set[str], plan: Plan | None) -> str:
    changed = {c.name for c in plan.affected} if plan else set()
    rows = []
    for node in nodes:
        if node.name in verified:
            state = "verified"
        elif node.name in changed:
            state = "not verified"
        else:
            state = "unchanged"
        rows.append(
            [
                node.name,
                node.product or "-",
                node.gpus if node.gpus is not None else "?",
                node.strategy,
                node.replicas,
                node.resource,
                node.slices,
                state,
            ]
        )
    return ts.format_table(
        ["NODE", "PRODUCT", "GPUS", "STRATEGY", "REPLICAS", "RESOURCE", "SLICES", "STATE"], rows
    )


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
            ts.pod_gpu_requests(p).get(change.after.resource, 0)
            for p in pods
            if (p.get("spec") or {}).get("nodeName") == node.name and not ts.is_terminal(p)
        )
        if used > capacity:
            warnings.append(
                f"node {node.name} will have {capacity} slices but {used} are in use: running "
                "pods keep running, new ones wait until enough are free"
            )
    return warnings


async def _change(
    kube: Kube,
    out: Output,
    opts: Options,
    action: str,
    build: Callable[[dict | None, dict | None, list[GpuNode], set[str] | None], Plan],
    title: str,
) -> dict:
    """The common path of setup and disable: read, plan, check, write, restart, verify."""
    await kube.require(ts.read_access(opts.namespace))
    policy = await kube.policy()
    if policy is None:
        raise Failure(ts.NO_POLICY_MESSAGE)
    nodes = await kube.gpu_nodes()
    if not nodes:
        raise Failure(f"no GPU nodes (label {ts.GPU_PRESENT_LABEL}=true) in this cluster")
    selected = None
    if opts.selector is not None:
        selected = set()
        for selector in ts.selector_variants(opts.selector):
            selected |= {n.name for n in await kube.gpu_nodes(selector)}
    cm_name = ts.config_map_name(policy, action)
    config_map = await kube.config_map(opts.namespace, cm_name)
    plan = build(policy, config_map, nodes, selected)
    result: dict[str, Any] = {"ok": True, "action": plan.action, "dry_run": opts.dry_run}

    if plan.notes:
        for note in plan.notes:
            out.item(note)
    if not plan.changes_anything:
        out.ok(f"nothing to change: {title} is already in place")
        out.line()
        out.line(_node_table(nodes, set(), None))
        figures = ts.summary(nodes)
        out.line()
        out.line("\n".join(ts.summary_lines(figures)))
        return {**result, "changed": False, "plan": plan.to_json(), "summary": figures}

    await _check_plugin_pods(kube, plan, opts, out)
    out.step(f"{'plan' if opts.dry_run else 'changes'} for {title}:")
    for line in ts.plan_lines(plan, full=opts.dry_run):
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

    await kube.require(ts.write_access(plan))
    _confirm(opts, out)
    # the last look for pending GPU pods comes right before the first write
    await _check_pending(kube, plan, opts, out)
    await _apply(kube, plan, policy, nodes)
    out.ok("configuration written")
    verified: set[str] = set()
    if plan.affected:
        deleted = await _restart(kube, plan, opts, out)
        nodes = await _wait_for_capacity(kube, plan, deleted, opts)
        verified = {c.name for c in plan.affected}
        out.ok(f"capacity verified on {', '.join(sorted(verified))}")
    else:
        nodes = await kube.gpu_nodes()
    out.line()
    out.line(_node_table(nodes, verified, plan))
    figures = ts.summary(nodes)
    out.line()
    out.line("\n".join(ts.summary_lines(figures)))
    return {
        **result,
        "changed": True,
        "plan": plan.to_json(),
        "nodes": [{**ts.node_row(n), "verified": n.name in verified} for n in nodes],
        "summary": figures,
    }


# -- the command group ---------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gpushare")
@click.option("-v", "--verbose", count=True, help="Log what happens (twice: debug).")
def main(verbose: int = 0) -> None:
    """Share NVIDIA GPUs between JupyterHub users on Kubernetes."""
    if verbose:
        logging.basicConfig(
            level=logging.DEBUG if verbose > 1 else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )


def _change_options(function):
    """Options that setup and disable share."""
    options = [
        click.option(
            "--namespace",
            default=ts.OPERATOR_NAMESPACE,
            show_default=True,
            help="Namespace of the GPU operator (its ConfigMap and device-plugin pods).",
        ),
        click.option(
            "--dry-run", is_flag=True, help="Print the objects and patches; change nothing."
        ),
        click.option("--yes", "-y", is_flag=True, help="Apply without asking."),
        click.option(
            "--force",
            is_flag=True,
            help="Restart the device plugin even while GPU pods are Pending "
            "(they may fail with UnexpectedAdmissionError).",
        ),
        click.option(
            "--wait",
            "wait_pending",
            is_flag=True,
            help="Wait (up to --timeout) for Pending GPU pods instead of refusing at once.",
        ),
        click.option(
            "--timeout",
            type=click.FloatRange(min=1),
            default=300,
            show_default=True,
            help="Seconds to wait for the new capacity (and with --wait, for Pending pods).",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON document."),
        click.option("--kubeconfig", help="Kubeconfig file (default: $KUBECONFIG, ~/.kube)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@main.command()
@click.option(
    "--replicas",
    required=True,
    metavar="N",
    help="Slices per physical GPU (at least 2): how many users share one GPU.",
)
@click.option(
    "--strategy",
    type=click.Choice(ts.STRATEGIES),
    default="time-slicing",
    show_default=True,
    help="time-slicing: GPUs take turns; mps: each slice gets 1/N of memory and compute.",
)
@click.option(
    "--rename",
    is_flag=True,
    help=f"Advertise {ts.SHARED_RESOURCE} instead of {ts.GPU_RESOURCE}.",
)
@click.option(
    "--nodes",
    "selector",
    metavar="SELECTOR",
    help="Only GPU nodes matching this label selector, through their "
    f"{ts.NODE_CONFIG_LABEL} label (e.g. {ts.PRODUCT_LABEL}=Tesla-T4; the "
    "-SHARED that GFD appends once shared is matched too).",
)
@click.option(
    "--print-config",
    is_flag=True,
    help="Print the device plugin config only (for the plain device plugin Helm chart).",
)
@_change_options
def setup(
    replicas: str,
    strategy: str,
    rename: bool,
    selector: str | None,
    print_config: bool,
    namespace: str,
    dry_run: bool,
    yes: bool,
    force: bool,
    wait_pending: bool,
    timeout: float,
    as_json: bool,
    kubeconfig: str | None,
) -> None:
    """Turn on GPU sharing: N slices per GPU, safely and idempotently."""
    out = Output(as_json)
    try:
        sharing = Sharing(strategy, ts.parse_replicas(replicas), rename)
    except ConfigError as e:
        out.fail(str(e))
        sys.exit(EXIT_USAGE)
    if print_config:
        click.echo(ts.render_config(sharing), nl=False)
        return
    opts = Options(namespace, dry_run, yes, force, wait_pending, timeout, selector)
    title = sharing.describe() + (f" on nodes matching {selector!r}" if selector else "")

    def build(policy, config_map, nodes, selected) -> Plan:
        return ts.plan_setup(policy, config_map, nodes, sharing, namespace, selected)

    result = _run(
        out, _with_kube(kubeconfig, lambda kube: _change(kube, out, opts, "setup", build, title))
    )
    if as_json:
        out.json(result)
    elif not dry_run and result.get("changed"):
        out.line()
        out.ok(f"GPU sharing is on: {title}")
        if strategy == "mps":
            out.item("under MPS each slice is capped at 1/N of the GPU's memory and compute")


@main.command()
@_change_options
def disable(
    namespace: str,
    dry_run: bool,
    yes: bool,
    force: bool,
    wait_pending: bool,
    timeout: float,
    as_json: bool,
    kubeconfig: str | None,
) -> None:
    """Undo setup: restore the ClusterPolicy's earlier config and the capacity."""
    out = Output(as_json)
    opts = Options(namespace, dry_run, yes, force, wait_pending, timeout)

    def build(policy, config_map, nodes, selected) -> Plan:
        return ts.plan_disable(policy, config_map, nodes, namespace)

    title = "the earlier config"
    result = _run(
        out, _with_kube(kubeconfig, lambda kube: _change(kube, out, opts, "disable", build, title))
    )
    if as_json:
        out.json(result)
    elif not dry_run and result.get("changed"):
        out.line()
        out.ok("GPU sharing set up by gpushare is off; the earlier config is back")


async def _status(kube: Kube) -> dict:
    await kube.require([Access("list", "nodes"), Access("list", "pods")])
    try:
        policy = await kube.policy()
    except Failure as e:
        # status works with the plain device plugin too, or without the right to read it
        log.info("no ClusterPolicy: %s", e)
        policy = None
    nodes = await kube.gpu_nodes()
    pods = await kube.pods(field_selector="status.phase!=Succeeded,status.phase!=Failed")
    return ts.status_report(nodes, pods, policy)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--kubeconfig", help="Kubeconfig file (default: $KUBECONFIG, ~/.kube).")
def status(as_json: bool, kubeconfig: str | None) -> None:
    """Show GPU slices per node: allocatable, used, free, who holds them, who waits."""
    out = Output(as_json)
    report = _run(out, _with_kube(kubeconfig, _status))
    if as_json:
        out.json({"ok": True, **report})
        return
    policy = report["cluster_policy"]
    if policy is None:
        out.item("no GPU operator ClusterPolicy found (or not readable)")
    else:
        config = policy["config"] or {}
        managed = " (set up by gpushare)" if policy["set_up_by_gpushare"] else ""
        out.item(
            f"ClusterPolicy {policy['name']}: device plugin config "
            f"{config.get('name') or '-'}, default {config.get('default') or '-'}{managed}"
        )
    if not report["nodes"]:
        out.warn(f"no GPU nodes (label {ts.GPU_PRESENT_LABEL}=true)")
    rows = [
        [
            r["node"],
            r["product"] or "-",
            r["gpus"] if r["gpus"] is not None else "?",
            r["strategy"],
            r["replicas"],
            r["resource"],
            r["slices"],
            r["used"],
            r["free"],
            len(r["pods"]),
            len(r["pending"]),
        ]
        for r in report["nodes"]
    ]
    out.line()
    out.line(
        ts.format_table(
            [
                "NODE",
                "PRODUCT",
                "GPUS",
                "STRATEGY",
                "REPLICAS",
                "RESOURCE",
                "SLICES",
                "USED",
                "FREE",
                "PODS",
                "PENDING",
            ],
            rows,
        )
    )
    holders = [(r["node"], p) for r in report["nodes"] for p in r["pods"]]
    if holders:
        out.line()
        out.line("Pods holding slices:")
        for node, pod in holders:
            out.item(f"{pod} on {node}")
    if report["pending"]:
        out.line()
        out.line("Pending GPU pods:")
        for pod in report["pending"]:
            asks = ", ".join(f"{v} {k}" for k, v in pod["requests"].items())
            why = "lack of slices" if pod["lack_of_slices"] else pod["reason"]
            out.item(f"{pod['pod']} wants {asks}: {why}")
    out.line()
    out.line("\n".join(ts.summary_lines(report["summary"])))
    out.line(
        f"  {'Slices in use:':<22}{report['summary']['used_slices']}"
        f" ({report['summary']['free_slices']} free)"
    )


if __name__ == "__main__":
    main()
