"""GPUShareSpawner: a KubeSpawner that gives each user a slice of a shared GPU.

The spawner stays thin: it reads the nodes' GPU labels, lets
:mod:`jupyterhub_gpushare.objects` work out the share, and adds it to the pod
that KubeSpawner builds. Everything z2jh's ``singleuser.*`` values set on
``c.KubeSpawner`` reaches this class through traitlets' configuration lookup.
"""

from __future__ import annotations

from kubernetes_asyncio.client import V1Pod
from kubernetes_asyncio.client.exceptions import ApiException
from kubespawner import KubeSpawner
from traitlets import Bool, Float, Integer, TraitError, Unicode, default, validate

from . import objects
from ._version import __version__
from .objects import GPUShare, GPUShareConfigError


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

        By default read from the ``nvidia.com/gpu.replicas`` label of the nodes
        this user's server can land on (at every spawn, so a change of the
        device plugin's config is picked up by the next spawn). An explicit
        value wins; without either, 1 is assumed and a warning is logged::

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
        768,
        config=True,
        help="""
        Memory each process needs outside any allocator (CUDA context, cuBLAS
        workspace), taken off the share: about 0.5 to 1 GiB on current GPUs::

            c.GPUShareSpawner.memory_headroom_mib = 1024
        """,
    )

    pytorch_cuda_alloc_conf = Unicode(
        "",
        config=True,
        help="""
        PyTorch allocator options (``PYTORCH_CUDA_ALLOC_CONF`` syntax) for every
        GPU server, merged with ours. ``backend:cudaMallocAsync`` is refused: it
        ignores the per-process memory fraction::

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
        "gpushare-memory-guard",
        config=True,
        help="""
        Name of the ConfigMap that carries the memory guard::

            c.GPUShareSpawner.memory_guard_configmap = "gpushare-memory-guard"
        """,
    )

    memory_guard_path = Unicode(
        "/opt/gpushare/startup",
        config=True,
        help="""
        Where the memory guard is mounted in the user's container::

            c.GPUShareSpawner.memory_guard_path = "/opt/gpushare/startup"
        """,
    )

    _replicas_warned = False

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
        """GPU facts of the nodes this server may land on, or None if unreadable."""
        selector = ",".join(f"{k}={v}" for k, v in sorted((self.node_selector or {}).items()))
        try:
            response = await self.api.list_node(label_selector=selector, _preload_content=False)
            nodes = (await response.json())["items"]
        except ApiException as e:
            self.log.warning(
                "Cannot read GPU nodes (%s %s): grant the hub list on nodes "
                "(helm-snippets/rbac.yaml) or set c.GPUShareSpawner.gpu_replicas",
                e.status,
                e.reason,
            )
            return None
        return objects.node_gpu_facts(nodes, self.gpu_resource_name)

    async def gpu_share(self) -> GPUShare:
        """The slices and memory share of this server, with profile overrides applied."""
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
            replicas = 1
            if not GPUShareSpawner._replicas_warned:
                GPUShareSpawner._replicas_warned = True
                self.log.warning(
                    "No node says how many slices its GPUs have (label %s); assuming 1. "
                    "Set c.GPUShareSpawner.gpu_replicas if the device plugin shares GPUs.",
                    objects.REPLICAS_LABEL,
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
                self.pytorch_cuda_alloc_conf, fraction, self.pytorch_allocator_fraction
            ),
            startup_path=self.memory_guard_path if self.memory_guard else None,
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
        pod = await super().get_pod_manifest()
        return objects.apply_gpu_share(
            pod,
            share,
            admin_env=self.environment.keys(),
            guard_configmap=self.memory_guard_configmap if self.memory_guard else None,
        )
