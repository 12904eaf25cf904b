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
from datetime import timezone

import aiohttp
from jupyterhub.utils import exponential_backoff, maybe_future, url_path_join
from kubernetes_asyncio.client import V1DeleteOptions, V1Pod, V1Preconditions
from kubernetes_asyncio.client.exceptions import ApiException
from kubespawner import KubeSpawner
from tornado import web
from traitlets import Bool, Float, Integer, TraitError, Unicode, default, validate

from . import messages, objects
from ._version import __version__
from .capacity import PoolSpec
from .objects import GPUShare, GPUShareConfigError
from .queueclient import QueueClient, QueueRefused, QueueRejected, QueueUnavailable
from .queueplace import QueuePlace, QueueTimeout, StartGate
from .tickets import TicketRequest, TicketStatus

try:  # JupyterHub 6: policy failures that do not count towards consecutive_failure_limit
    from jupyterhub.spawner import SpawnException
except ImportError:  # JupyterHub 5
    SpawnException = None

# Servers of this hub in their start-up, past the GPU line (one hub process).
START_GATE = StartGate()

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

    concurrent_start_limit = Integer(
        100,
        config=True,
        help="""
        Most servers of this hub starting at once, counted only once they are
        past the GPU line: waiting for a slice takes no place here, and a
        CPU-only server never waits behind users in line.

        This replaces JupyterHub's ``concurrent_spawn_limit``, which counts
        every pending spawn, waiting ones included: with it, 64 users in line
        (z2jh's default limit) would keep everyone else from starting any
        server. ``jupyterhub_gpushare.configure(c)`` moves the hub's value
        here and sets the hub's to 0. A server over the limit waits (its page
        says so) instead of being refused. 0 means no limit::

            c.GPUShareSpawner.concurrent_start_limit = 64
        """,
    )

    _spawn_limit_warned = False
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
    async def run_pre_spawn_hook(self):
        """Runs (awaited) just before start(): the hub reads ``start_timeout`` as
        soon as start() returns, so the time a GPU server may spend in line is
        added here, and only for a profile that asks for a GPU."""
        await maybe_future(super().run_pre_spawn_hook())
        if self._base_start_timeout is None:
            self._base_start_timeout = self.start_timeout
        self.start_timeout = self._base_start_timeout
        if self.queue_url and await self._may_use_gpu():
            self.start_timeout = self._base_start_timeout + self.queue_timeout

    async def _may_use_gpu(self) -> bool:
        """Whether the profile chosen for this spawn can ask for GPU slices."""
        profiles = self._sorted_dict_values(self.profile_list)
        if callable(profiles):
            profiles = await maybe_future(profiles(self))
        profiles = self._get_initialized_profile_list(profiles or [])
        if not profiles:
            return self.gpu_slices > 0
        try:
            profile = self._get_profile(self.user_options.get("profile"), profiles)
        except (ValueError, StopIteration):
            return True  # KubeSpawner refuses it in start(); be generous until then
        slices = objects.profile_gpu_slices(profile, self.user_options, self.gpu_slices)
        return slices is None or slices > 0

    def start(self):
        self._place = None
        self._in_line = True  # until the server may start: read by progress()
        self._pod_retries = 0
        self._recreating: set[str] = set()
        self._warn_about_spawn_limit()
        future = super().start()
        future.add_done_callback(self._start_finished)
        return future

    def _warn_about_spawn_limit(self) -> None:
        limit = (getattr(self.user, "settings", None) or {}).get("concurrent_spawn_limit")
        if self.queue_url and limit and not GPUShareSpawner._spawn_limit_warned:
            GPUShareSpawner._spawn_limit_warned = True
            self.log.warning(
                "c.JupyterHub.concurrent_spawn_limit is %d: users waiting for a GPU slice "
                "count as pending spawns, so when %d wait, nobody else can even start a "
                "CPU server. Call jupyterhub_gpushare.configure(c) after setting it: it "
                "moves the limit to c.GPUShareSpawner.concurrent_start_limit, which "
                "counts only servers past the GPU line.",
                limit,
                limit,
            )

    def _start_finished(self, future: asyncio.Future) -> None:
        START_GATE.leave(id(self), self.concurrent_start_limit)
        failed = future.cancelled() or future.exception() is not None
        if not failed:
            # running again: the notice of its reclaim has been read (the hub
            # saves the state once start() returns, after this callback)
            self.reclaim_notice = None
        place = getattr(self, "_place", None)
        if place is not None:
            self._closing = asyncio.ensure_future(place.close("cancelled" if failed else "started"))

    def _queue_client(self) -> QueueClient:
        # the service's routes live under the hub's base URL, like the hub's own
        base_url = self.hub.base_url.rstrip("/").removesuffix("/hub") + "/"
        return QueueClient(
            url_path_join(self.queue_url, base_url, "services", self.queue_service_name),
            self.queue_secret,
        )

    async def wait_for_slices(self, share: GPUShare) -> TicketStatus | None:
        """Wait in line; the status that admitted this spawn, or None without queue."""
        if not (self.queue_url and share.uses_gpu):
            return None
        pool = PoolSpec.from_selector(share.resource_name, self.node_selector)
        request = TicketRequest(
            id=f"{self.user.id}-{uuid.uuid4().hex[:12]}",
            user=self.user.name,
            server=self.name,
            slices=share.slices,
            pool=pool,
            requested_at=time.time(),
        )
        self._place = place = QueuePlace(self._queue_client(), self.log, self._log_name)
        try:
            status = await place.join(request, self.queue_timeout, self.queue_unreachable_timeout)
        except QueueTimeout:
            minutes = round(self.queue_timeout / 60)
            raise self._refusal(
                f"No GPU slice became free within {minutes} minutes. "
                "Please try again later, or choose a profile without a GPU.",
                reason="gpu-queue-timeout",
            ) from None
        except QueueRefused as e:
            raise self._refusal(str(e), reason="gpu-user-limit") from None
        except QueueRejected as e:
            raise GPUShareConfigError(f"the GPU queue service refused this spawn: {e}") from None
        if status is not None:
            self.log.info(
                "%s admitted to GPU slices on %s after %.1fs",
                self._log_name,
                status.node,
                time.time() - request.requested_at,
            )
        return status

    async def _enter_start_gate(self) -> None:
        """Wait for one of the hub's start places (after the GPU line)."""
        limit = self.concurrent_start_limit
        if limit and len(START_GATE.active) >= limit and self._place is not None:
            self._place.update(
                note=f"{len(START_GATE.active)} servers are starting right now: "
                "yours starts as soon as one of them is up"
            )
        await START_GATE.enter(id(self), limit)

    def _refusal(self, message: str, reason: str) -> Exception:
        error = spawn_refusal(message, reason=reason)
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
        last = shown = None
        # The line ends when the spawn is admitted, goes ahead without the
        # queue, or needs no GPU; before it starts, the profile and Kubernetes
        # watches may still be loading.
        while getattr(self, "_in_line", False) and not self._start_future_done():
            place = getattr(self, "_place", None)
            if place is None:
                await asyncio.sleep(0.5)
                continue
            # also when only the time passed: the wait counts down by the minute
            event = place.progress_event()
            if place.view() != last or event != shown:
                last, shown = place.view(), event
                if event:
                    yield event
            await place.wait_for_change(1)
        place = getattr(self, "_place", None)
        if place is not None and place.note and place.view() != last:
            yield {"progress": 5, "message": place.note}
        async for message in super().progress():
            yield message

    def _start_future_done(self) -> bool:
        future = getattr(self, "_start_future", None)
        return future is not None and future.done()

    async def stop(self, now=False):
        place = getattr(self, "_place", None)
        if place is not None and not self._start_future_done():
            # Stop Server while waiting: leave the line at once
            await place.leave("cancelled")
        started = self._started_at()
        result = await super().stop(now=now)
        await self._note_reclaim(started)
        return result

    # -- reclaimed servers ---------------------------------------------------------
    # Why the gpushare service stopped this server, if it did (a dict of the
    # service's api/reclaims): kept in the spawner's state, so that the user is
    # told on their next visit, after a restart of the hub too, until the
    # server runs again.
    reclaim_notice: dict | None = None

    def _started_at(self) -> float | None:
        """When this server started (Unix time), as the hub recorded it."""
        orm_spawner = getattr(self, "orm_spawner", None)
        started = getattr(orm_spawner, "started", None)
        if started is None:
            return None
        return started.replace(tzinfo=started.tzinfo or timezone.utc).timestamp()

    async def _note_reclaim(self, started: float | None) -> None:
        """Ask the service whether it is reclaiming this server (this run of it)."""
        if not self.queue_url:
            return
        try:
            notice = await self._queue_client().reclaim_notice(
                self.user.name, self.name, since=started
            )
        except (QueueUnavailable, QueueRejected) as e:
            self.log.debug("Could not ask the GPU service why %s stopped: %s", self._log_name, e)
            return
        if notice is not None:
            self.reclaim_notice = notice
            self.log.info(
                "%s was reclaimed by the GPU service (idle for %.0fs while %s waited)",
                self._log_name,
                notice.get("idle_seconds") or 0,
                notice.get("waiting"),
            )

    def get_state(self):
        state = super().get_state()
        if self.reclaim_notice:
            state["gpushare_reclaim"] = self.reclaim_notice
        return state

    def load_state(self, state):
        super().load_state(state)
        notice = state.get("gpushare_reclaim")
        self.reclaim_notice = notice if isinstance(notice, dict) else None

    # -- pods the device plugin rejected ----------------------------------------
    def is_pod_running(self, pod):
        place = getattr(self, "_place", None)
        if place is not None and place.failure is not None:
            # work beside the spawn failed (creating a rejected pod again): say so now
            # rather than at start_timeout
            raise place.failure
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
                work = self._recreate_pod(pod)
                if self._place is not None:
                    self._place.background(work, "create the rejected pod again")
                else:
                    self._recreate_task = asyncio.ensure_future(work)
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
        manifest = copy.deepcopy(self._pod_manifest)
        if self._place is not None:
            # the failed pod no longer holds its slices: book them again first
            await self._place.rebook()
            if self._place.status is not None and self._place.status.node:
                manifest = objects.pin_to_node(manifest, self._place.status.node)
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
            admitted = await self.wait_for_slices(share)
            if share.uses_gpu:
                # what the server gets, and whether the driver or the frameworks cap it,
                # after what the queue said ("A GPU slice is free: ...")
                if self._place is None:
                    self._place = QueuePlace(None, self.log, self._log_name)
                said = (self._place.note or "").rstrip(". ")
                note = messages.share_message(share)
                self._place.update(note=f"{said}. {note}" if said else note)
            await self._enter_start_gate()
        finally:
            self._in_line = False
            if self._place is not None:
                self._place.update()
        pod = await super().get_pod_manifest()
        pod = objects.apply_gpu_share(
            pod,
            share,
            admin_env=self._expand_env(self.environment),
            guard_configmap=self.memory_guard_configmap if self.memory_guard else None,
            ticket=admitted.ticket if admitted else None,
        )
        if admitted is not None and admitted.node:
            # the slices were booked on this node: the pod must run there
            pod = objects.pin_to_node(pod, admitted.node)
        self._pod_manifest = copy.deepcopy(pod)
        return pod
