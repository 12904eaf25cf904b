"""GPUShareSpawner: a KubeSpawner that gives each user a slice of a shared GPU.

The spawner stays thin: it reads the nodes' GPU labels, lets
:mod:`jupyterhub_gpushare.objects` work out the share, and adds it to the pod
that KubeSpawner builds. Everything z2jh's ``singleuser.*`` values set on
``c.KubeSpawner`` reaches this class through traitlets' configuration lookup.
"""

from __future__ import annotations

import asyncio
import copy
import time
import uuid

import aiohttp
from jupyterhub.utils import exponential_backoff, url_path_join
from kubernetes_asyncio.client import V1DeleteOptions, V1Pod, V1Preconditions
from kubernetes_asyncio.client.exceptions import ApiException
from kubespawner import KubeSpawner
from tornado import web
from traitlets import Bool, Float, Integer, TraitError, Unicode, default, validate

from . import messages, objects
from ._version import __version__
from .capacity import PoolSpec
from .objects import GPUShare, GPUShareConfigError
from .queueclient import QueueClient, QueueRejected, QueueUnavailable

try:  # JupyterHub 6: policy failures that do not count towards consecutive_failure_limit
    from jupyterhub.spawner import SpawnException
except ImportError:  # JupyterHub 5
    SpawnException = None

# The device plugin was re-registering when the kubelet admitted the pod; the
# pod is never retried by Kubernetes, so we create it again.
RETRYABLE_POD_FAILURES = frozenset({"UnexpectedAdmissionError"})


def spawn_refusal(message: str, reason: str) -> Exception:
    """An error for the spawn page that JupyterHub treats as a refusal, not a crash."""
    if SpawnException is not None:
        return SpawnException(message, reason=reason, status_code=429)
    error = web.HTTPError(429, message)
    error.jupyterhub_message = message
    return error


class GPUShareSpawner(KubeSpawner):
    """Spawn each user's server with GPU slices and a matching memory share."""

    gpu_slices = Integer(
        1,
        config=True,
        help="""
        GPU slices (device-plugin replicas) each server requests.

        0 starts a CPU-only server: no GPU resource and no GPU environment.
        Set it per profile through ``kubespawner_override``::

            c.GPUShareSpawner.gpu_slices = 1
            c.KubeSpawner.profile_list = [
                {"display_name": "CPU only", "kubespawner_override": {"gpu_slices": 0}},
                {"display_name": "Two slices", "kubespawner_override": {"gpu_slices": 2}},
            ]
        """,
    )

    gpu_resource_name = Unicode(
        "nvidia.com/gpu",
        config=True,
        help="""
        The extended resource that the NVIDIA device plugin advertises.

        ``nvidia.com/gpu.shared`` when the device plugin renames shared GPUs
        (``renameByDefault: true``), or a MIG resource such as
        ``nvidia.com/mig-1g.10gb``::

            c.GPUShareSpawner.gpu_resource_name = "nvidia.com/gpu.shared"
        """,
    )

    gpu_replicas = Integer(
        None,
        allow_none=True,
        config=True,
        help="""
        Slices per physical GPU.

        By default read from the ``nvidia.com/gpu.replicas`` label that NVIDIA
        GPU feature discovery puts on the nodes this user's server can land on
        (at every spawn, so a change of the device plugin's config is picked up
        by the next spawn). An explicit value wins. Without either, or when the
        hub may not list nodes, GPU spawns fail with a message that says what is
        missing: a wrong guess would give every user the whole GPU's memory.
        Set it where GPU feature discovery does not run, or where GPU nodes are
        only added on demand (autoscaling from zero), together with
        ``gpu_memory_mib``::

            c.GPUShareSpawner.gpu_replicas = 4
        """,
    )

    gpu_memory_mib = Integer(
        None,
        allow_none=True,
        config=True,
        help="""
        Memory of one physical GPU in MiB, to express the headroom as a fraction.

        By default read from the ``nvidia.com/gpu.memory`` node label::

            c.GPUShareSpawner.gpu_memory_mib = 32607  # RTX 5090
        """,
    )

    memory_fraction = Float(
        None,
        allow_none=True,
        config=True,
        help="""
        Share of the GPU's memory each server's frameworks may use, in (0, 1].

        By default ``gpu_slices / gpu_replicas`` less ``memory_headroom_mib``::

            c.GPUShareSpawner.memory_fraction = 0.2
        """,
    )

    memory_headroom_mib = Integer(
        objects.DEFAULT_HEADROOM_MIB,
        config=True,
        help="""
        Memory each process needs outside any allocator (CUDA context, cuBLAS
        workspace), taken off the share: about 0.5 to 1 GiB on current GPUs::

            c.GPUShareSpawner.memory_headroom_mib = 1024
        """,
    )

    pytorch_cuda_alloc_conf = Unicode(
        objects.DEFAULT_PYTORCH_ALLOC_CONF,
        config=True,
        help="""
        PyTorch allocator options (``PYTORCH_CUDA_ALLOC_CONF`` syntax) for every
        GPU server.

        The default, ``expandable_segments:True``, lets a process use more of its
        share before it runs out (less fragmentation), and keeps the cap
        (measured, see the memory page of the docs). The memory guard takes out
        any option that the image's PyTorch is too old to know
        (``expandable_segments`` needs 2.1), before PyTorch reads them: an unknown
        option would make every CUDA call fail. With ``memory_guard = False``
        nothing takes them out, so every option must suit the image's PyTorch,
        and ``backend:cudaMallocAsync`` is refused: that allocator ignores the
        ``per_process_memory_fraction`` option. An empty string sets no
        options::

            c.GPUShareSpawner.pytorch_cuda_alloc_conf = "expandable_segments:True"
        """,
    )

    pytorch_allocator_fraction = Bool(
        False,
        config=True,
        help="""
        Also put ``per_process_memory_fraction`` in ``PYTORCH_CUDA_ALLOC_CONF``.

        Only for images whose PyTorch is 2.10 or newer: older versions fail
        every CUDA call on the unknown key. The memory guard applies the
        fraction on every version, so this is optional::

            c.GPUShareSpawner.pytorch_allocator_fraction = True
        """,
    )

    memory_guard = Bool(
        True,
        config=True,
        help="""
        Mount the memory guard into GPU servers and put it on ``PYTHONPATH``.

        The guard applies the memory fraction to PyTorch (every version) and
        TensorFlow when they start using the GPU, with no change to images or
        user code. It comes from a ConfigMap the spawner keeps up to date, so
        the hub needs get/create/update on ConfigMaps in the user namespace::

            c.GPUShareSpawner.memory_guard = False
        """,
    )

    memory_guard_configmap = Unicode(
        objects.DEFAULT_GUARD_CONFIGMAP,
        config=True,
        help="""
        Name of the ConfigMap that carries the memory guard::

            c.GPUShareSpawner.memory_guard_configmap = "gpushare-memory-guard"
        """,
    )

    memory_notice = Bool(
        True,
        config=True,
        help="""
        Tell users their share of the GPU, from inside their server: one line
        when a process first uses the GPU ("this GPU is shared by up to 4 users:
        PyTorch may use 34.2 GiB of its 139.8 GiB"), and a note on the first
        out-of-memory error that says the limit is their share and what to do.
        Once per process each; part of the memory guard::

            c.GPUShareSpawner.memory_notice = False
        """,
    )

    image_pythonpath = Unicode(
        "",
        config=True,
        help="""
        The image's own ``PYTHONPATH``, for images that set one
        (``ENV PYTHONPATH=...``).

        The memory guard puts its folder first on ``PYTHONPATH``, and a pod's
        ``PYTHONPATH`` replaces the image's, so paths the image relies on are
        lost unless they are given here. Entries are separated by ``:``; empty
        ones are dropped (they would put the working directory on
        ``sys.path``). Set it per profile where images differ (a profile's
        ``kubespawner_override`` can set it); a ``PYTHONPATH`` in
        ``environment`` is kept too, after these::

            c.GPUShareSpawner.image_pythonpath = "/opt/app/lib:/opt/conda/extra"
        """,
    )

    memory_guard_path = Unicode(
        objects.DEFAULT_STARTUP_PATH,
        config=True,
        help="""
        Where the memory guard is mounted in the user's container::

            c.GPUShareSpawner.memory_guard_path = "/opt/gpushare/startup"
        """,
    )

    queue_url = Unicode(
        "",
        config=True,
        help="""
        URL of the gpushare service that keeps the fair queue, as the hub
        reaches it. Set by ``jupyterhub_gpushare.configure(c)``; empty means no
        queue (plain KubeSpawner behaviour when slices run out)::

            c.GPUShareSpawner.queue_url = "http://127.0.0.1:10101/services/gpushare"
        """,
    )

    queue_service_name = Unicode(
        "gpushare",
        config=True,
        help="Name of the gpushare service (its URL prefix is ``services/<name>/``).",
    )

    queue_secret = Unicode(
        "",
        config=True,
        help="Secret shared with the gpushare service. Set by ``configure(c)``.",
    )

    queue_timeout = Float(
        1800,
        config=True,
        help="""
        Longest time a spawn waits in line for GPU slices, in seconds. The hub's
        ``start_timeout`` is extended by this much for GPU servers, so the pod
        still gets its full ``start_timeout`` once admitted::

            c.GPUShareSpawner.queue_timeout = 3600
        """,
    )

    queue_unreachable_timeout = Float(
        90,
        config=True,
        help="""
        If the gpushare service cannot be reached for this long, the spawn goes
        ahead without the queue (and says so on the progress page). The hub
        restarts a managed service that died within about 30 seconds (its
        poll interval), so keep this well above that::

            c.GPUShareSpawner.queue_unreachable_timeout = 90
        """,
    )

    admission_retries = Integer(
        5,
        config=True,
        help="""
        How often a pod that the kubelet rejected with ``UnexpectedAdmissionError``
        (the device plugin was restarting) is created again::

            c.GPUShareSpawner.admission_retries = 5
        """,
    )

    _nodes_unread_warned = False
    _base_start_timeout: float | None = None

    @validate("gpu_slices")
    def _validate_slices(self, proposal):
        return self._checked(objects.check_slices, proposal)

    @validate("gpu_replicas")
    def _validate_replicas(self, proposal):
        if proposal.value is None:
            return None
        return self._checked(objects.check_replicas, proposal)

    @validate("gpu_resource_name")
    def _validate_resource_name(self, proposal):
        return self._checked(objects.check_resource_name, proposal)

    @validate("memory_fraction")
    def _validate_fraction(self, proposal):
        if proposal.value is None:
            return None
        return self._checked(objects.check_fraction, proposal)

    @staticmethod
    def _checked(check, proposal):
        try:
            return check(proposal.value)
        except GPUShareConfigError as e:
            raise TraitError(str(e)) from None

    @default("events_enabled")
    def _events_default(self):
        return True

    # -- the share ------------------------------------------------------------
    async def _node_facts(self) -> dict | None:
        """GPU facts of the nodes this server may land on.

        Fails the spawn when the nodes cannot be read and ``gpu_replicas`` is not
        set; with ``gpu_replicas`` set, it logs a warning and returns None.
        """
        selector = ",".join(f"{k}={v}" for k, v in sorted((self.node_selector or {}).items()))
        status = reason = None
        try:
            # unparsed: node objects are large, and only their labels are needed
            response = await self.api.list_node(label_selector=selector, _preload_content=False)
            body = await response.json()
        except ApiException as e:
            status, reason = e.status, e.reason
        except (OSError, asyncio.TimeoutError, aiohttp.ClientError, ValueError) as e:
            problem = f"the Kubernetes API could not list the nodes ({e.__class__.__name__}: {e})"
        else:
            # without preloading, the client returns error responses instead of raising
            if response.status < 400 and isinstance(body, dict):
                if isinstance(body.get("items"), list):
                    return objects.node_gpu_facts(body["items"], self.gpu_resource_name)
            status = response.status
            reason = (body.get("reason") if isinstance(body, dict) else None) or response.reason
        if status in (401, 403):
            problem = (
                f"the hub may not list nodes ({status} {reason}): grant its "
                "ServiceAccount get and list on nodes (helm-snippets/rbac.yaml)"
            )
        elif status is not None:
            problem = f"listing the nodes failed ({status} {reason})"
        if self.gpu_replicas is None:
            raise GPUShareConfigError(
                f"cannot work out this server's share of the GPU: {problem}, "
                "or set c.GPUShareSpawner.gpu_replicas"
            )
        if not GPUShareSpawner._nodes_unread_warned:
            GPUShareSpawner._nodes_unread_warned = True
            self.log.warning(
                "Cannot read GPU nodes (%s); using gpu_replicas = %d", problem, self.gpu_replicas
            )
        return None

    async def gpu_share(self) -> GPUShare:
        """The slices and memory share of this server, with profile overrides applied.

        Raises :class:`GPUShareConfigError`, worded for the admin, when the share
        cannot be worked out: a wrong guess would give every user the whole GPU.
        """
        slices = objects.check_slices(self.gpu_slices)
        resource = objects.check_resource_name(self.gpu_resource_name)
        if slices == 0:
            return GPUShare(resource, 0)
        facts = await self._node_facts() or {}
        largest = facts.get("largest_node_slices")
        if largest and slices > largest:
            raise GPUShareConfigError(
                f"this server asks for {slices} GPU slices, but the largest node it can "
                f"use offers {largest}: pick a profile with fewer slices"
            )
        replicas = self.gpu_replicas or facts.get("replicas")
        if replicas is None:
            raise GPUShareConfigError(self._no_replicas_message(resource, facts))
        sharing = facts.get("sharing", "")
        if sharing == objects.MPS and slices > 1:
            raise GPUShareConfigError(
                f"this server asks for {slices} GPU slices, but its GPUs are shared with MPS, "
                "which limits every process to one slice's memory and compute whatever it "
                "asks for: give this profile gpu_slices = 1"
            )
        memory = self.gpu_memory_mib or facts.get("gpu_memory_mib")
        if self.memory_fraction is not None:
            fraction = objects.check_fraction(self.memory_fraction)
        else:
            fraction = objects.memory_fraction(slices, replicas, memory, self.memory_headroom_mib)
        return GPUShare(
            resource_name=resource,
            slices=slices,
            replicas=replicas,
            fraction=fraction,
            gpu_memory_mib=memory,
            alloc_conf=objects.pytorch_alloc_conf(
                self.pytorch_cuda_alloc_conf,
                fraction,
                self.pytorch_allocator_fraction,
                memory_guard=self.memory_guard,
            ),
            startup_path=self.memory_guard_path if self.memory_guard else None,
            sharing=sharing,
            notice=self.memory_guard and self.memory_notice,
            image_pythonpath=self.image_pythonpath,
        )

    def _no_replicas_message(self, resource: str, facts: dict) -> str:
        label = f"{objects.label_prefix(resource)}.replicas"
        where = "no node"
        if self.node_selector:
            selector = ",".join(f"{k}={v}" for k, v in sorted(self.node_selector.items()))
            where = f"no node matching {selector}"
        if not facts.get("nodes"):
            return (
                f"cannot work out this server's share of the GPU: {where} offers {resource}. "
                "Where GPU nodes are only added on demand (autoscaling from zero), set "
                "c.GPUShareSpawner.gpu_replicas and gpu_memory_mib; otherwise check the "
                "profile's node selector and that the NVIDIA device plugin runs"
            )
        return (
            f"cannot work out this server's share of the GPU: {where} that offers {resource} "
            f"carries the label {label}, which NVIDIA GPU feature discovery sets. Deploy GPU "
            "feature discovery (the GPU operator does), or set c.GPUShareSpawner.gpu_replicas"
        )

    async def _ensure_memory_guard(self) -> None:
        """Create or refresh the ConfigMap that carries the guard into the pod."""
        from .guard import startup_files

        wanted = objects.guard_configmap(
            self.memory_guard_configmap, self.namespace, startup_files(), __version__
        )
        try:
            current = await self.api.read_namespaced_config_map(
                self.memory_guard_configmap, self.namespace
            )
        except ApiException as e:
            if e.status == 404:
                current = None
            else:
                raise self._rbac_error(e, "get") from None
        try:
            if current is None:
                await self.api.create_namespaced_config_map(self.namespace, wanted)
                self.log.info("Created memory guard ConfigMap %s", self.memory_guard_configmap)
            elif current.data != wanted.data:
                await self.api.replace_namespaced_config_map(
                    self.memory_guard_configmap, self.namespace, wanted
                )
                self.log.info("Updated memory guard ConfigMap %s", self.memory_guard_configmap)
        except ApiException as e:
            if e.status == 409:  # another spawn created it first
                return
            raise self._rbac_error(e, "create or update") from None

    def _rbac_error(self, e: ApiException, verb: str) -> Exception:
        if e.status == 403:
            return GPUShareConfigError(
                f"the hub may not {verb} ConfigMaps in namespace {self.namespace}: grant it "
                "(helm-snippets/rbac.yaml) or set c.GPUShareSpawner.memory_guard = False"
            )
        return e

    # -- the queue ------------------------------------------------------------
    def start(self):
        # The hub reads start_timeout as soon as start() returns, so the time in
        # line is added here, synchronously.
        if self._base_start_timeout is None:
            self._base_start_timeout = self.start_timeout
        if self.queue_url:
            self.start_timeout = self._base_start_timeout + self.queue_timeout
        self._ticket = None
        self._queue_done = False
        self._ticket_body = None
        self._queue_status = None
        self._queue_note = None
        self._queue_event = asyncio.Event()
        self._pod_retries = 0
        self._recreating: set[str] = set()
        return super().start()

    def _queue_update(self, status: dict | None = None, note: str | None = None) -> None:
        if status is not None:
            self._queue_status = status
        if note is not None:
            self._queue_note = note
        # wake every progress() reader (one per open tab) without side effects
        event, self._queue_event = self._queue_event, asyncio.Event()
        event.set()

    def _ticket_request(self, share: GPUShare, ticket_id: str, requested_at: float) -> dict:
        pool = PoolSpec.from_selector(share.resource_name, self.node_selector)
        return {
            "id": ticket_id,
            "user": self.user.name,
            "server": self.name,
            "slices": share.slices,
            "pool": {"resource": pool.resource, "selector": dict(pool.selector)},
            "requested_at": requested_at,
        }

    async def wait_for_slices(self, share: GPUShare) -> str | None:
        """Join the line and return once admitted; the ticket id, or None without queue."""
        if not (self.queue_url and share.uses_gpu):
            return None
        requested_at = time.time()
        ticket_id = f"{self.user.id}-{uuid.uuid4().hex[:12]}"
        self._ticket = ticket_id
        request = self._ticket_request(share, ticket_id, requested_at)
        self._ticket_body = request
        client = self._queue_client()
        deadline = requested_at + self.queue_timeout
        unreachable_since = None
        try:
            while True:
                try:
                    status = await client.join(request)
                    self._queue_update(status)
                    if status["state"] != "admitted":
                        status = await asyncio.wait_for(
                            self._follow(client, ticket_id), deadline - time.time()
                        )
                    if status["state"] == "admitted":
                        self.log.info(
                            "%s admitted to GPU slices after %.1fs",
                            self._log_name,
                            time.time() - requested_at,
                        )
                        self._queue_update(note="A GPU slice is free: starting your server")
                        return ticket_id
                    unreachable_since = None  # "gone": join again, keeping our place
                except QueueUnavailable as e:
                    now = time.time()
                    unreachable_since = unreachable_since or now
                    if now - unreachable_since > self.queue_unreachable_timeout:
                        self.log.warning(
                            "GPU queue service unreachable for %.0fs (%s); starting %s without it",
                            now - unreachable_since,
                            e,
                            self._log_name,
                        )
                        self._queue_update(
                            note="The GPU queue service cannot be reached: starting "
                            "without it, Kubernetes will place your server when a slice is free"
                        )
                        return None
                    self._queue_update(note="Reconnecting to the GPU queue service")
                    await asyncio.sleep(min(2.0, max(deadline - time.time(), 0)))
                if time.time() >= deadline:
                    raise asyncio.TimeoutError
        except asyncio.TimeoutError:
            await client.leave(ticket_id, "timeout")
            minutes = round(self.queue_timeout / 60)
            raise self._queue_timeout_error(
                f"No GPU slice became free within {minutes} minutes. "
                "Please try again later, or choose a profile without a GPU."
            ) from None
        except QueueRejected as e:
            raise GPUShareConfigError(f"the GPU queue service refused this spawn: {e}") from None
        except BaseException:
            # cancelled (Stop Server, the REST API, the hub going away) or failed
            await asyncio.shield(client.leave(ticket_id, "cancelled"))
            raise
        finally:
            self._queue_update()

    def _queue_client(self) -> QueueClient:
        # the service's routes live under the hub's base URL, like the hub's own
        base_url = self.hub.base_url.rstrip("/").removesuffix("/hub") + "/"
        return QueueClient(
            url_path_join(self.queue_url, base_url, "services", self.queue_service_name),
            self.queue_secret,
        )

    async def _follow(self, client: QueueClient, ticket_id: str) -> dict:
        async for status in client.follow(ticket_id):
            self._queue_update(status)
            if status["state"] in ("admitted", "gone"):
                return status
        raise QueueUnavailable("event stream ended")

    def _queue_timeout_error(self, message: str) -> Exception:
        error = spawn_refusal(message, reason="gpu-queue-timeout")
        if SpawnException is None:
            # JupyterHub 5 counts every failed spawn towards consecutive_failure_limit
            # and exits at the limit; running out of GPU slices is no hub failure.
            self.consecutive_failure_limit = 0
            asyncio.get_running_loop().call_later(0, self._forgive_failure)
        return error

    def _forgive_failure(self) -> None:
        try:
            from jupyterhub.app import JupyterHub

            settings = JupyterHub.instance().tornado_application.settings
        except Exception:  # not inside a hub (tests of the spawner alone)
            return
        if settings.get("failure_count", 0) > 0:
            settings["failure_count"] -= 1

    async def progress(self):
        """Queue position while waiting, then KubeSpawner's pod events.

        Runs once per open browser tab, so it only reads what the start task
        records and changes nothing.
        """
        last = None
        # The queue phase ends when the spawn is admitted, goes ahead without
        # the queue, or needs no GPU; before it starts, the profile and
        # Kubernetes watches may still be loading.
        while not getattr(self, "_queue_done", True) and not self._start_future_done():
            event = self._queue_event
            current = (self._queue_status, self._queue_note)
            if current != last:
                last = current
                message = self._progress_message()
                if message:
                    yield message
            try:
                await asyncio.wait_for(event.wait(), 1)
            except asyncio.TimeoutError:
                pass
        note = getattr(self, "_queue_note", None)
        if note and (self._queue_status, note) != last:
            yield {"progress": 5, "message": note}
        async for message in super().progress():
            yield message

    def _start_future_done(self) -> bool:
        future = getattr(self, "_start_future", None)
        return future is not None and future.done()

    def _progress_message(self) -> dict | None:
        status = self._queue_status
        if self._queue_note and (status is None or status.get("state") != "waiting"):
            return {"progress": 5, "message": self._queue_note}
        if status is None or status.get("state") != "waiting":
            return None
        return {"progress": 2, **messages.queue_message(status)}

    async def stop(self, now=False):
        ticket = getattr(self, "_ticket", None)
        if ticket and self.queue_url and not self._start_future_done():
            # Stop Server while waiting: leave the line at once
            await self._queue_client().leave(ticket, "cancelled")
        return await super().stop(now=now)

    # -- pods the device plugin rejected ----------------------------------------
    def is_pod_running(self, pod):
        status = (pod or {}).get("status") or {}
        if status.get("phase") == "Failed" and status.get("reason") in RETRYABLE_POD_FAILURES:
            uid = pod["metadata"]["uid"]
            if uid not in self._recreating:
                if self._pod_retries >= self.admission_retries:
                    raise GPUShareConfigError(
                        f"the node rejected the server {self._pod_retries + 1} times "
                        f"({status.get('reason')}: {status.get('message')})"
                    )
                self._recreating.add(uid)
                self._pod_retries += 1
                self._recreate_task = asyncio.ensure_future(self._recreate_pod(pod))
            return False
        return super().is_pod_running(pod)

    async def _recreate_pod(self, failed: dict) -> None:
        meta = failed["metadata"]
        self.log.warning(
            "Pod %s was rejected by its node (%s); creating it again (%d of %d)",
            meta["name"],
            failed["status"].get("reason"),
            self._pod_retries,
            self.admission_retries,
        )
        try:
            await self.api.delete_namespaced_pod(
                meta["name"],
                meta["namespace"],
                body=V1DeleteOptions(
                    grace_period_seconds=0, preconditions=V1Preconditions(uid=meta["uid"])
                ),
            )
        except ApiException as e:
            if e.status not in (404, 409):
                raise
        ref_key = f"{meta['namespace']}/{meta['name']}"

        def replaced() -> bool:
            current = self.pod_reflector.pods.get(ref_key) or {}
            return current.get("metadata", {}).get("uid") != meta["uid"]

        await exponential_backoff(replaced, f"pod {ref_key} was not deleted", timeout=60)
        body = getattr(self, "_ticket_body", None)
        if body is not None:
            # keep the slices this spawn was given: its failed pod no longer holds them
            try:
                await self._queue_client().join({**body, "admitted": True})
            except (QueueUnavailable, QueueRejected) as e:
                self.log.warning("Could not re-book slices for %s: %s", self._log_name, e)
        manifest = copy.deepcopy(self._pod_manifest)
        await self.api.create_namespaced_pod(meta["namespace"], manifest)

    # -- the pod ----------------------------------------------------------------
    async def get_pod_manifest(self) -> V1Pod:
        share = await self.gpu_share()
        if share.uses_gpu:
            self.log.info(
                "%s gets %d of %d slices per GPU, memory fraction %s",
                self._log_name,
                share.slices,
                share.replicas,
                share.fraction,
            )
            if self.memory_guard:
                await self._ensure_memory_guard()
        try:
            ticket = await self.wait_for_slices(share)
            if share.uses_gpu:
                # what the server gets, and whether the driver or the frameworks cap it,
                # after what the queue said ("A GPU slice is free: ...")
                said = (getattr(self, "_queue_note", None) or "").rstrip(". ")
                note = messages.share_message(share)
                self._queue_update(note=f"{said}. {note}" if said else note)
        finally:
            self._queue_done = True
            self._queue_update()
        pod = await super().get_pod_manifest()
        pod = objects.apply_gpu_share(
            pod,
            share,
            admin_env=self._expand_env(self.environment),
            guard_configmap=self.memory_guard_configmap if self.memory_guard else None,
            ticket=ticket,
        )
        self._pod_manifest = copy.deepcopy(pod)
        return pod
