"""Watch caches of Nodes and GPU Pods, kept live without listing per request.

Each watcher lists, then watches from the list's resource version; it re-lists
when the version is gone (410), backs off on errors and restarts itself, and
says whether its view is consistent instead of guessing.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException
from traitlets import Any as AnyTrait
from traitlets import Float, Unicode
from traitlets.config import LoggingConfigurable

from .capacity import HUB_SERVER_LABEL, HUB_USER_ANNOTATION, TICKET_ANNOTATION


def slim_node(node: Mapping) -> dict:
    meta = node["metadata"]
    return {
        "metadata": {"name": meta["name"], "labels": meta.get("labels") or {}},
        "spec": {"unschedulable": (node.get("spec") or {}).get("unschedulable", False)},
        "status": {
            "allocatable": (node.get("status") or {}).get("allocatable") or {},
            "conditions": [
                c
                for c in (node.get("status") or {}).get("conditions") or []
                if c.get("type") == "Ready"
            ],
        },
    }


def slim_pod(pod: Mapping, resources: tuple[str, ...]) -> dict | None:
    """What capacity needs of a pod, or None for pods that hold no GPU."""
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
        "status": {
            "phase": status.get("phase"),
            "reason": status.get("reason"),
            "startTime": status.get("startTime"),
        },
    }


class ResourceWatcher(LoggingConfigurable):
    """A list-then-watch cache of one kind of cluster-wide object."""

    kind = Unicode(help="'nodes' or 'pods'")
    api = AnyTrait(help="a CoreV1Api")
    slim = AnyTrait(help="callable turning an object into what we keep, or None to skip")
    watch_timeout = Float(300, config=True, help="Seconds before a watch is renewed.")
    max_backoff = Float(30, config=True, help="Longest wait between retries after errors.")

    def __init__(self, on_change: Callable[[str], Any] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.objects: dict[str, dict] = {}
        self.synced = asyncio.Event()
        self.last_error: str | None = None
        self.on_change = on_change
        self._task: asyncio.Task | None = None

    @property
    def _list(self):
        return getattr(
            self.api, f"list_{'node' if self.kind == 'nodes' else 'pod_for_all_namespaces'}"
        )

    @staticmethod
    def key(obj: Mapping) -> str:
        meta = obj["metadata"]
        return f"{meta.get('namespace', '')}/{meta['name']}"

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

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.kind)

    async def _relist(self) -> str:
        response = await self._list(_preload_content=False, _request_timeout=60)
        body = await response.json()
        fresh = {}
        for item in body.get("items", []):
            kept = self.slim(item)
            if kept is not None:
                fresh[self.key(kept)] = kept
        self.objects = fresh
        self.synced.set()
        self.last_error = None
        self.log.info("%s: listed %d", self.kind, len(fresh))
        self._changed()
        return body["metadata"]["resourceVersion"]

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                version = await self._relist()
                failures = 0
                while True:
                    version = await self._watch(version)
                    if version is None:
                        break  # expired: list again
            except asyncio.CancelledError:
                raise
            except ApiException as e:
                self.last_error = self._explain(e)
                self.log.warning("%s watch: %s", self.kind, self.last_error)
            except Exception as e:  # connection refused, timeouts, API server restarts
                self.last_error = (
                    f"cannot reach the Kubernetes API server ({e.__class__.__name__}: {e})"
                )
                self.log.warning("%s watch: %s", self.kind, self.last_error)
            failures += 1
            # The view may be stale now; say so until a fresh list succeeds.
            self.synced.clear()
            self._changed()
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
                    kept = self.slim(obj)
                    key = self.key(obj)
                    if kind == "DELETED" or kept is None:
                        if self.objects.pop(key, None) is None:
                            continue
                    elif self.objects.get(key) == kept:
                        continue
                    else:
                        self.objects[key] = kept
                    self._changed()
        except ApiException as e:
            if e.status == 410:  # our version is too old: list again
                return None
            raise
        return version


def node_watcher(api: client.CoreV1Api, on_change=None, **kwargs) -> ResourceWatcher:
    return ResourceWatcher(on_change, kind="nodes", api=api, slim=slim_node, **kwargs)


def pod_watcher(
    api: client.CoreV1Api, resources: tuple[str, ...], on_change=None, **kwargs
) -> ResourceWatcher:
    return ResourceWatcher(
        on_change, kind="pods", api=api, slim=lambda p: slim_pod(p, resources), **kwargs
    )
