"""Watching Nodes and GPU Pods cluster-wide: the layer below the cluster view.

A :class:`ResourceWatcher` lists, then watches from the list's resource
version, and hands what it sees to its consumer: the whole list after every
(re-)list, then one event at a time. It keeps no cache of its own (the
:class:`~.clusterview.ClusterView` is the cache); it re-lists when the version
is gone (410), backs off on errors, restarts itself, and says whether the
consumer's view is consistent instead of guessing.

Lists are paginated, so a cluster of any size arrives in bounded pieces, and
the pod watch asks the API server only for bound pods that are not finished:
the only ones that hold slices.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping
from typing import Protocol

from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException
from traitlets import Any as AnyTrait
from traitlets import Float, Integer, Unicode
from traitlets.config import LoggingConfigurable

from .capacity import HUB_SERVER_LABEL, HUB_USER_ANNOTATION, TICKET_ANNOTATION

# Bound pods that have not finished: all that can hold slices.
HOLDING_PODS = "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"


class WatchConsumer(Protocol):
    def replace(self, kind: str, objects: dict[str, dict]) -> None: ...
    def apply(self, kind: str, key: str, obj: dict | None) -> None: ...
    def stale(self, kind: str, problem: str) -> None: ...


def slim_node(node: Mapping) -> dict:
    """What capacity needs of a node; heartbeat times dropped, so they change nothing."""
    meta = node["metadata"]
    status = node.get("status") or {}
    return {
        "metadata": {"name": meta["name"], "labels": meta.get("labels") or {}},
        "spec": {"unschedulable": (node.get("spec") or {}).get("unschedulable", False)},
        "status": {
            "allocatable": status.get("allocatable") or {},
            "conditions": [
                {"type": "Ready", "status": c.get("status")}
                for c in status.get("conditions") or []
                if c.get("type") == "Ready"
            ],
        },
    }


def slim_pod(pod: Mapping, resources: tuple[str, ...]) -> dict | None:
    """What capacity needs of a pod, or None for pods that hold no GPU of ours."""
    containers = []
    wants_gpu = False
    for container in (pod.get("spec") or {}).get("containers") or []:
        res = container.get("resources") or {}
        limits = {k: v for k, v in (res.get("limits") or {}).items() if k in resources}
        requests = {k: v for k, v in (res.get("requests") or {}).items() if k in resources}
        wants_gpu = wants_gpu or bool(limits or requests)
        containers.append({"resources": {"limits": limits, "requests": requests}})
    meta = pod["metadata"]
    annotations = meta.get("annotations") or {}
    if not wants_gpu and TICKET_ANNOTATION not in annotations:
        return None
    labels = meta.get("labels") or {}
    status = pod.get("status") or {}
    return {
        "metadata": {
            "name": meta["name"],
            "namespace": meta.get("namespace", ""),
            "uid": meta.get("uid"),
            "creationTimestamp": meta.get("creationTimestamp"),
            "annotations": {
                k: v
                for k, v in annotations.items()
                if k in (HUB_USER_ANNOTATION, TICKET_ANNOTATION)
            },
            "labels": {k: v for k, v in labels.items() if k == HUB_SERVER_LABEL},
        },
        "spec": {"nodeName": (pod.get("spec") or {}).get("nodeName"), "containers": containers},
        "status": {"phase": status.get("phase"), "startTime": status.get("startTime")},
    }


def object_key(obj: Mapping) -> str:
    meta = obj["metadata"]
    namespace = meta.get("namespace")
    return f"{namespace}/{meta['name']}" if namespace else meta["name"]


class ResourceWatcher(LoggingConfigurable):
    """List-then-watch of one kind of cluster-wide object, feeding a consumer."""

    kind = Unicode(help="'nodes' or 'pods'")
    api = AnyTrait(help="a CoreV1Api")
    slim = AnyTrait(help="callable turning an object into what we keep, or None to skip")
    field_selector = Unicode("", help="narrows what the API server sends")
    watch_timeout = Float(300, config=True, help="Seconds before a watch is renewed.")
    max_backoff = Float(30, config=True, help="Longest wait between retries after errors.")
    page_size = Integer(
        500,
        config=True,
        help="""
        Objects per page when listing, so no single response holds a whole
        large cluster::

            c.ResourceWatcher.page_size = 500
        """,
    )

    def __init__(self, consumer: WatchConsumer, **kwargs) -> None:
        super().__init__(**kwargs)
        self.consumer = consumer
        self.synced = asyncio.Event()
        self.last_error: str | None = None
        self._task: asyncio.Task | None = None

    @property
    def _list(self) -> Callable:
        name = "list_node" if self.kind == "nodes" else "list_pod_for_all_namespaces"
        return getattr(self.api, name)

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def _selectors(self) -> dict:
        return {"field_selector": self.field_selector} if self.field_selector else {}

    async def _relist(self) -> str:
        """Every object, page by page, handed over in one piece once complete."""
        fresh: dict[str, dict] = {}
        token = None
        while True:
            response = await self._list(
                limit=self.page_size,
                _continue=token,
                _preload_content=False,
                _request_timeout=60,
                **self._selectors(),
            )
            body = await response.json()
            if response.status >= 400:
                # with _preload_content=False the client does not raise for us
                raise ApiException(status=response.status, reason=body.get("message"))
            for item in body.get("items", []):
                kept = self.slim(item)
                if kept is not None:
                    fresh[object_key(kept)] = kept
            token = (body.get("metadata") or {}).get("continue")
            if not token:
                break
        self.consumer.replace(self.kind, fresh)
        self.synced.set()
        self.last_error = None
        self.log.info("%s: listed %d", self.kind, len(fresh))
        return body["metadata"]["resourceVersion"]

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                version = await self._relist()
                failures = 0
                while version is not None:
                    version = await self._watch(version)  # None: expired, list again
                continue
            except asyncio.CancelledError:
                raise
            except ApiException as e:
                if e.status == 410:  # a continue token or version expired mid-way
                    continue
                self.last_error = self._explain(e)
            except Exception as e:  # connection refused, timeouts, API server restarts
                self.last_error = (
                    f"cannot reach the Kubernetes API server ({e.__class__.__name__}: {e})"
                )
            self.log.warning("%s watch: %s", self.kind, self.last_error)
            failures += 1
            # the view may be stale now; say so until a fresh list succeeds
            self.synced.clear()
            self.consumer.stale(self.kind, self.last_error)
            delay = min(self.max_backoff, 0.5 * 2 ** min(failures, 6)) * random.uniform(0.5, 1)
            await asyncio.sleep(delay)

    def _explain(self, e: ApiException) -> str:
        if e.status == 403:
            scope = "cluster-wide " if self.kind == "nodes" else "in all namespaces "
            return (
                f"forbidden: the service may not list/watch {self.kind} {scope}"
                "(grant the ClusterRole in helm-snippets/rbac.yaml)"
            )
        return f"API error {e.status} {e.reason}"

    async def _watch(self, version: str) -> str | None:
        """Apply watch events; return the version to resume from, or None to re-list."""
        stream = watch.Watch().stream(
            self._list,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=int(self.watch_timeout),
            _request_timeout=self.watch_timeout + 30,
            **self._selectors(),
        )
        try:
            async with stream:
                async for event in stream:
                    obj = event["raw_object"]
                    kind = event["type"]
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            return None
                        raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                    version = obj["metadata"]["resourceVersion"]
                    if kind == "BOOKMARK":
                        continue
                    kept = None if kind == "DELETED" else self.slim(obj)
                    self.consumer.apply(self.kind, object_key(obj), kept)
        except ApiException as e:
            if e.status == 410:  # our version is too old: list again
                return None
            raise
        return version


def node_watcher(api: client.CoreV1Api, consumer: WatchConsumer, **kwargs) -> ResourceWatcher:
    return ResourceWatcher(consumer, kind="nodes", api=api, slim=slim_node, **kwargs)


def pod_watcher(
    api: client.CoreV1Api, resources: tuple[str, ...], consumer: WatchConsumer, **kwargs
) -> ResourceWatcher:
    return ResourceWatcher(
        consumer,
        kind="pods",
        api=api,
        slim=lambda p: slim_pod(p, resources),
        field_selector=HOLDING_PODS,
        **kwargs,
    )
