"""A small kubelet of our own: runs the pods bound to simulated nodes as local processes.

What it does, as a real kubelet would:

- a pod bound to a node gets a loopback IP from ``--pod-cidr`` and its container's
  command runs as a local process with the container's environment;
- the pod turns Running when the process starts and Ready when it accepts TCP on
  its pod IP and first container port;
- graceful deletion sends SIGTERM (SIGKILL after the grace period), then removes
  the pod; a process that exits by itself ends the pod as Succeeded or Failed.

What it simulates, since there are no containers here:

- network namespaces: ``0.0.0.0`` in the container's environment and arguments
  becomes the pod IP, so every pod can listen on "its" port;
- volumes: ``configMap`` and ``emptyDir`` volumes are written under the pod's
  state folder, and their mount paths are rewritten to that folder in the
  environment and arguments;
- images: a container with no command and no arguments runs a light stand-in
  HTTP server inside this process (used where tests need hundreds of pods).

Test hooks: a node or pod annotated ``gpushare.dev/fail-admission: <Reason>``
makes admission fail with that reason (for example ``UnexpectedAdmissionError``,
what the NVIDIA device plugin causes while it restarts).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path

from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

FAIL_ADMISSION_ANNOTATION = "gpushare.dev/fail-admission"
# Nodes whose name starts with this exist as objects only (scale benchmarks):
# their pods stay bound and Pending, holding their slices, and nothing runs.
OBJECTS_ONLY_PREFIX = "objects-only-"
# Environment a container image would bring along: the tools of this machine.
IMAGE_ENV_KEYS = ("PATH", "LANG", "LC_ALL", "VIRTUAL_ENV", "SSL_CERT_FILE", "TZ")

log = logging.getLogger("kubelet")


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class PodRuntime:
    """What runs for one pod: a process or a stand-in server, and its IP."""

    def __init__(self, uid: str, ip: str, folder: Path):
        self.uid = uid
        self.ip = ip
        self.folder = folder
        self.process: asyncio.subprocess.Process | None = None
        self.stand_in: asyncio.base_events.Server | None = None
        self.tasks: list[asyncio.Task] = []
        self.deleting = False

    async def stop(self, grace: float) -> None:
        for task in self.tasks:
            task.cancel()
        if self.stand_in is not None:
            self.stand_in.close()
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout=max(grace, 0.1))
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                await self.process.wait()
        if self.process is not None:
            # children the process left behind in its session
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)


class SimulatedKubelet:
    def __init__(self, core: client.CoreV1Api, pod_cidr: str, state_dir: Path):
        self.core = core
        self.network = ipaddress.ip_network(pod_cidr)
        self.state_dir = state_dir
        self.pods: dict[str, PodRuntime] = {}
        self._hosts = self.network.hosts()
        self._free_ips: list[str] = []

    # -- addresses ----------------------------------------------------------
    def _allocate_ip(self) -> str:
        # Fresh addresses first: reusing one at once would let a new pod answer
        # on the address of one that was just deleted.
        for address in self._hosts:
            if not str(address).endswith((".0", ".1", ".255")):
                return str(address)
        if not self._free_ips:
            raise ValueError(f"no free pod IP left in {self.network}")
        return self._free_ips.pop(0)

    # -- main loop ----------------------------------------------------------
    async def run(self, ready_file: Path | None) -> None:
        resource_version = await self._sync_all()
        if ready_file is not None:
            ready_file.write_text(str(os.getpid()))
        while True:
            try:
                stream = watch.Watch().stream(
                    self.core.list_pod_for_all_namespaces,
                    resource_version=resource_version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=300,
                )
                async for event in stream:
                    obj = event["raw_object"]
                    if event["type"] == "ERROR":
                        if obj.get("code") == 410:
                            resource_version = await self._sync_all()
                            break
                        continue
                    resource_version = obj["metadata"]["resourceVersion"]
                    if event["type"] == "BOOKMARK":
                        continue
                    await self._handle(event["type"], obj)
            except ApiException as e:
                if e.status == 410:
                    resource_version = await self._sync_all()
                    continue
                log.warning("watch failed: %s; retrying", e.reason)
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # the API server is restarting (connection refused, cut-off
                # streams): keep what runs, re-list when it is back
                log.warning("API server unreachable (%r); retrying", e)
                await asyncio.sleep(1)
                with contextlib.suppress(Exception):
                    resource_version = await self._sync_all()

    async def _sync_all(self) -> str:
        pods = await self.core.list_pod_for_all_namespaces(_preload_content=False)
        body = await pods.json()
        seen = set()
        for pod in body["items"]:
            seen.add(pod["metadata"]["uid"])
            await self._handle("MODIFIED", pod)
        for uid in list(self.pods):
            if uid not in seen:
                await self._forget(uid, grace=0)
        return body["metadata"]["resourceVersion"]

    async def _handle(self, kind: str, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        if kind == "DELETED":
            await self._forget(uid, grace=0)
            return
        if not pod["spec"].get("nodeName"):
            return
        if pod["metadata"].get("deletionTimestamp"):
            runtime = self.pods.get(uid)
            if runtime is None or not runtime.deleting:
                task = asyncio.create_task(self._delete(pod))
                if runtime is not None:
                    runtime.deleting = True
                    runtime.tasks.append(task)
            return
        phase = pod.get("status", {}).get("phase", "Pending")
        if uid not in self.pods and phase == "Pending" and not self._objects_only(pod):
            await self._admit(pod)

    def _objects_only(self, pod: dict) -> bool:
        # naming convention of benchmark nodes, so no API call is needed per pod
        return pod["spec"]["nodeName"].startswith(OBJECTS_ONLY_PREFIX)

    # -- pod lifecycle --------------------------------------------------------
    async def _admit(self, pod: dict) -> None:
        meta = pod["metadata"]
        name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
        reason = (meta.get("annotations") or {}).get(FAIL_ADMISSION_ANNOTATION)
        if not reason:
            try:
                node = await self.core.read_node(pod["spec"]["nodeName"], _preload_content=False)
                node_meta = (await node.json())["metadata"]
                reason = (node_meta.get("annotations") or {}).get(FAIL_ADMISSION_ANNOTATION)
            except ApiException:
                reason = None
        if reason:
            log.info("failing admission of %s/%s: %s", namespace, name, reason)
            await self._patch_status(
                pod,
                {
                    "phase": "Failed",
                    "reason": reason,
                    "message": f"Pod was rejected: Allocate failed due to {reason} (simulated)",
                    "startTime": now(),
                },
            )
            # remember it so later events do not admit it again
            self.pods[uid] = PodRuntime(uid, "", self.state_dir / uid)
            return

        runtime = PodRuntime(uid, self._allocate_ip(), self.state_dir / uid)
        self.pods[uid] = runtime
        runtime.folder.mkdir(parents=True, exist_ok=True)
        container = pod["spec"]["containers"][0]
        ports = [p["containerPort"] for p in container.get("ports", [])]
        try:
            argv, env, cwd = await self._container_process(pod, container, runtime)
            if argv:
                logfile = open(runtime.folder / "container.log", "ab")
                runtime.process = await asyncio.create_subprocess_exec(
                    *argv,
                    env=env,
                    cwd=cwd,
                    stdout=logfile,
                    stderr=asyncio.subprocess.STDOUT,
                    stdin=asyncio.subprocess.DEVNULL,
                    start_new_session=True,
                    preexec_fn=_die_with_kubelet,
                )
                logfile.close()
                # tests read the real process environment through /proc/<pid>/environ
                (runtime.folder / "container.pid").write_text(str(runtime.process.pid))
                runtime.tasks.append(asyncio.create_task(self._watch_exit(pod, runtime)))
            else:
                runtime.stand_in = await asyncio.start_server(
                    _stand_in_handler, runtime.ip, ports[0] if ports else 8888
                )
        except (OSError, ValueError) as e:
            log.warning("cannot start %s/%s: %s", namespace, name, e)
            await self._patch_status(
                pod,
                {
                    "phase": "Failed",
                    "reason": "StartError",
                    "message": str(e),
                    "podIP": runtime.ip,
                },
            )
            return
        log.info("started %s/%s on %s", namespace, name, runtime.ip)
        await self._patch_status(pod, self._running_status(pod, runtime, ready=not ports))
        if ports:
            runtime.tasks.append(asyncio.create_task(self._wait_ready(pod, runtime, ports[0])))

    async def _container_process(self, pod: dict, container: dict, runtime: PodRuntime):
        mounts: dict[str, str] = {}
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            volume = volumes.get(mount["name"], {})
            target = runtime.folder / "volumes" / mount["name"]
            target.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume:
                await self._fill_config_map(pod, volume["configMap"], target)
            mounts[mount["mountPath"].rstrip("/")] = str(target)

        def simulate(value: str) -> str:
            # longest mount path first, so /a/b wins over /a
            for path in sorted(mounts, key=len, reverse=True):
                value = value.replace(path, mounts[path])
            return value.replace("0.0.0.0", runtime.ip)

        env = {k: os.environ[k] for k in IMAGE_ENV_KEYS if k in os.environ}
        # the "image" is this Python environment: its scripts come first on PATH
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["HOME"] = str(runtime.folder)
        env["HOSTNAME"] = pod["metadata"]["name"]
        for item in container.get("env", []):
            env[item["name"]] = simulate(await self._env_value(pod, item))
        argv = [simulate(a) for a in container.get("command", []) + container.get("args", [])]
        cwd = container.get("workingDir")
        cwd = simulate(cwd) if cwd and cwd.rstrip("/") in mounts else str(runtime.folder)
        return argv, env, cwd

    async def _env_value(self, pod: dict, item: dict) -> str:
        if "value" in item:
            return item.get("value") or ""
        source = item.get("valueFrom", {})
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            known = {
                "metadata.name": pod["metadata"]["name"],
                "metadata.namespace": pod["metadata"]["namespace"],
                "spec.nodeName": pod["spec"]["nodeName"],
                "status.hostIP": "127.0.0.1",
                "status.podIP": self.pods[pod["metadata"]["uid"]].ip,
            }
            return known.get(path, "")
        namespace = pod["metadata"]["namespace"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret = await self.core.read_namespaced_secret(ref["name"], namespace)
            import base64

            return base64.b64decode((secret.data or {}).get(ref["key"], "")).decode()
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            cm = await self.core.read_namespaced_config_map(ref["name"], namespace)
            return (cm.data or {}).get(ref["key"], "")
        return ""

    async def _fill_config_map(self, pod: dict, source: dict, target: Path) -> None:
        cm = await self.core.read_namespaced_config_map(
            source["name"], pod["metadata"]["namespace"]
        )
        items = source.get("items")
        data = cm.data or {}
        paths = {i["key"]: i["path"] for i in items} if items else {k: k for k in data}
        for key, path in paths.items():
            file = target / path
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(data.get(key, ""))

    def _running_status(self, pod: dict, runtime: PodRuntime, ready: bool) -> dict:
        flag = "True" if ready else "False"
        container = pod["spec"]["containers"][0]
        return {
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": runtime.ip,
            "podIPs": [{"ip": runtime.ip}],
            "startTime": now(),
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now()},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now()},
                {"type": "ContainersReady", "status": flag, "lastTransitionTime": now()},
                {"type": "Ready", "status": flag, "lastTransitionTime": now()},
            ],
            "containerStatuses": [
                {
                    "name": container["name"],
                    "image": container.get("image", ""),
                    "imageID": "",
                    "ready": ready,
                    "started": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": now()}},
                }
            ],
        }

    async def _wait_ready(self, pod: dict, runtime: PodRuntime, port: int) -> None:
        while True:
            try:
                _, writer = await asyncio.open_connection(runtime.ip, port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.2)
        log.info("%s/%s is ready", pod["metadata"]["namespace"], pod["metadata"]["name"])
        await self._patch_status(pod, self._running_status(pod, runtime, ready=True))

    async def _watch_exit(self, pod: dict, runtime: PodRuntime) -> None:
        code = await runtime.process.wait()
        if runtime.deleting:
            return
        log.info(
            "%s/%s exited with %s", pod["metadata"]["namespace"], pod["metadata"]["name"], code
        )
        container = pod["spec"]["containers"][0]
        await self._patch_status(
            pod,
            {
                "phase": "Succeeded" if code == 0 else "Failed",
                "conditions": [{"type": "Ready", "status": "False"}],
                "containerStatuses": [
                    {
                        "name": container["name"],
                        "image": container.get("image", ""),
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"terminated": {"exitCode": code, "finishedAt": now()}},
                    }
                ],
            },
        )

    async def _delete(self, pod: dict) -> None:
        meta = pod["metadata"]
        grace = meta.get("deletionGracePeriodSeconds") or 0
        await self._forget(meta["uid"], grace=grace)
        with contextlib.suppress(ApiException):
            await self.core.delete_namespaced_pod(
                meta["name"],
                meta["namespace"],
                body=client.V1DeleteOptions(
                    grace_period_seconds=0,
                    preconditions=client.V1Preconditions(uid=meta["uid"]),
                ),
            )
        log.info("deleted %s/%s", meta["namespace"], meta["name"])

    async def _forget(self, uid: str, grace: float) -> None:
        runtime = self.pods.pop(uid, None)
        if runtime is None:
            return
        runtime.deleting = True
        current = asyncio.current_task()
        runtime.tasks = [t for t in runtime.tasks if t is not current]
        await runtime.stop(grace)
        if runtime.ip:
            self._free_ips.append(runtime.ip)

    async def _patch_status(self, pod: dict, status: dict) -> None:
        meta = pod["metadata"]
        try:
            await self.core.patch_namespaced_pod_status(
                meta["name"], meta["namespace"], {"status": status}
            )
        except ApiException as e:
            if e.status != 404:
                log.warning(
                    "status update of %s/%s failed: %s", meta["namespace"], meta["name"], e.reason
                )

    async def shutdown(self) -> None:
        await asyncio.gather(*(self._forget(uid, 0) for uid in list(self.pods)))


def _die_with_kubelet() -> None:
    # a pod's process must not outlive its kubelet, even one killed with SIGKILL
    import ctypes

    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


async def _stand_in_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
    writer.close()


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--pod-cidr", default="127.100.0.0/16")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path)
    args = parser.parse_args(argv)
    if not ipaddress.ip_network(args.pod_cidr).subnet_of(ipaddress.ip_network("127.0.0.0/8")):
        parser.error("--pod-cidr must lie inside 127.0.0.0/8: pods may only use loopback addresses")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    await config.load_kube_config(config_file=args.kubeconfig)
    api = client.ApiClient()
    kubelet = SimulatedKubelet(client.CoreV1Api(api), args.pod_cidr, args.state_dir)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = asyncio.create_task(kubelet.run(args.ready_file))
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
    runner.cancel()
    await kubelet.shutdown()
    await api.close()
    if runner in done and runner.exception():
        raise runner.exception()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(130)
