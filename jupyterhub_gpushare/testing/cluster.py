"""Start and stop etcd, kube-apiserver, kube-scheduler and the simulated kubelet.

Everything listens on 127.0.0.1 with TLS and client-certificate authentication,
and RBAC is on. Each process runs in its own session and is told to die with us
(``PR_SET_PDEATHSIG``), so an interrupted test run leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import waiting
from .pki import CertificateAuthority, KeyPair, service_account_keys

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build-control-plane.sh"


def random_pod_cidr() -> str:
    """A /16 of loopback for one cluster's pods; clusters started side by side
    (a demo beside a test run) must not hand out the same pod IPs."""
    return f"127.{random.randint(64, 250)}.0.0/16"


class ClusterError(RuntimeError):
    """A problem starting the local cluster, phrased for the person running it."""


def build_binaries() -> tuple[Path, float | None]:
    """Build (or find in the cache) the control-plane binaries.

    Returns the folder and the seconds the cold build took (None when the
    binaries came from the cache of an earlier run).
    """
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=None, text=True
    )
    if result.returncode != 0:
        raise ClusterError("building the control plane failed; see the message above")
    bin_dir = Path(result.stdout.strip().splitlines()[-1])
    elapsed = time.monotonic() - started
    return bin_dir, (elapsed if elapsed > 30 else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_port_free(port: int, what: str, env_var: str) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ClusterError(
                f"port 127.0.0.1:{port} for {what} is already in use by another program: "
                f"stop that program or pick another port with {env_var}=<port>"
            ) from None


def _die_with_parent(death_signal: int):
    """A pre-exec hook: the child gets ``death_signal`` when we die, even by SIGKILL."""

    def hook() -> None:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, death_signal)  # PR_SET_PDEATHSIG

    return hook


@dataclass
class Component:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    # Orphans are killed outright (nobody is left to wait for a graceful stop);
    # the hub gets SIGTERM instead, so that it still stops its proxy and services.
    death_signal: int = signal.SIGKILL
    process: subprocess.Popen | None = None
    peak_rss_bytes: int = 0

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent(self.death_signal),
        )
        log.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def sample_memory(self) -> int:
        """Record and return the kernel's high-water mark of resident memory."""
        if not self.running:
            return self.peak_rss_bytes
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return self.peak_rss_bytes
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                self.peak_rss_bytes = max(self.peak_rss_bytes, int(line.split()[1]) * 1024)
        return self.peak_rss_bytes

    def last_log_line(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1][:300] if lines else ""

    def stop(self, timeout: float = 10) -> None:
        if self.process is None:
            return
        self.sample_memory()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        else:
            # the leader is gone; make sure nothing of its group survives
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval=0.2):
    """:func:`.waiting.wait_until`, failing with a :class:`ClusterError` for the person
    starting the cluster."""
    try:
        return waiting.wait_until(predicate, timeout, what, interval)
    except waiting.TimedOut as e:
        raise ClusterError(str(e)) from None


@dataclass
class LocalCluster:
    """etcd + kube-apiserver + kube-scheduler + simulated kubelet on loopback."""

    run_dir: Path
    bin_dir: Path
    apiserver_port: int = 0
    etcd_port: int = 0
    components: dict[str, Component] = field(default_factory=dict)
    start_seconds: float = 0.0
    pod_cidr: str = field(default_factory=random_pod_cidr)

    def __post_init__(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.pki_dir = self.run_dir / "pki"
        self.ca = CertificateAuthority(self.pki_dir)
        self.serving = self.ca.issue("apiserver", "kube-apiserver", server=True)
        self.admin = self.ca.issue("admin", "gpushare-admin", organization="system:masters")
        self.sa_keys = service_account_keys(self.pki_dir)
        self.kubeconfig = self.write_kubeconfig("admin", self.admin)

    # -- access -------------------------------------------------------------
    @property
    def api_url(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    def write_kubeconfig(self, name: str, pair: KeyPair) -> Path:
        path = self.run_dir / f"{name}.kubeconfig"
        # JSON is valid YAML, and every Kubernetes client reads it.
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "gpushare-local",
                    "cluster": {
                        "server": f"https://127.0.0.1:{self.apiserver_port}",
                        "certificate-authority": str(self.ca.cert_path),
                    },
                }
            ],
            "users": [
                {
                    "name": name,
                    "user": {"client-certificate": str(pair.cert), "client-key": str(pair.key)},
                }
            ],
            "contexts": [{"name": name, "context": {"cluster": "gpushare-local", "user": name}}],
            "current-context": name,
        }
        path.write_text(json.dumps(config, indent=2))
        return path

    def kubeconfig_for(self, user: str, groups: tuple[str, ...] = ()) -> Path:
        """A kubeconfig for an identity that holds only what RBAC grants it."""
        pair = self.ca.issue(
            f"user-{user.replace(':', '-')}", user, organization=",".join(groups) or None
        )
        return self.write_kubeconfig(f"user-{user.replace(':', '-')}", pair)

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca.cert_path))
        ctx.load_cert_chain(str(self.admin.cert), str(self.admin.key))
        return ctx

    def api_get(self, path: str, timeout: float = 5) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(
                self.api_url + path, context=self._ssl_context(), timeout=timeout
            ) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (OSError, urllib.error.URLError):
            return 0, b""

    # -- lifecycle ----------------------------------------------------------
    def start(self, timeout: float = 180) -> None:
        started = time.monotonic()
        if not self.etcd_port:
            self.etcd_port = free_port()
        else:
            ensure_port_free(self.etcd_port, "etcd", "GPUSHARE_ETCD_PORT")
        if not self.apiserver_port:
            self.apiserver_port = free_port()
            self.kubeconfig = self.write_kubeconfig("admin", self.admin)
        else:
            ensure_port_free(self.apiserver_port, "kube-apiserver", "GPUSHARE_APISERVER_PORT")
        try:
            self._start_etcd(timeout)
            self._start_apiserver(timeout)
            self._start_scheduler(timeout)
            self._start_kubelet(timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started

    def _check_alive(self, component: Component) -> bool:
        if not component.running:
            raise ClusterError(
                f"{component.name} exited during start-up: {component.last_log_line()} "
                f"(full log: {component.log_path})"
            )
        return False

    def _start_etcd(self, timeout: float) -> None:
        peer_port = free_port()
        etcd = Component(
            "etcd",
            [
                str(self.bin_dir / "etcd"),
                "--name=gpushare",
                f"--data-dir={self.run_dir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=gpushare=http://127.0.0.1:{peer_port}",
                "--listen-metrics-urls=",
                "--unsafe-no-fsync=true",
                "--auto-compaction-retention=1",
                "--watch-progress-notify-interval=5s",
                "--log-level=warn",
            ],
            self.run_dir / "etcd.log",
        )
        self.components["etcd"] = etcd
        etcd.start()

        def healthy() -> bool:
            self._check_alive(etcd)
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.etcd_port}/health", timeout=2
                ) as r:
                    return b'"true"' in r.read()
            except OSError:
                return False

        wait_until(healthy, timeout, "etcd to report healthy")

    def _start_apiserver(self, timeout: float) -> None:
        apiserver = Component(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.apiserver_port}",
                # No default route on these machines: advertise loopback and
                # skip the Endpoints reconciler that would reject it.
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",
                f"--cert-dir={self.run_dir / 'apiserver'}",
                f"--tls-cert-file={self.serving.cert}",
                f"--tls-private-key-file={self.serving.key}",
                f"--client-ca-file={self.ca.cert_path}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={self.sa_keys.cert}",
                f"--service-account-signing-key-file={self.sa_keys.key}",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--authorization-mode=RBAC",
                # Only a controller manager creates `default` ServiceAccounts.
                "--disable-admission-plugins=ServiceAccount",
                "--allow-privileged=true",
                "--profiling=false",
                "--event-ttl=1h",
            ],
            self.run_dir / "kube-apiserver.log",
        )
        self.components["kube-apiserver"] = apiserver
        apiserver.start()
        wait_until(
            lambda: self._check_alive(apiserver) or self.api_get("/readyz")[0] == 200,
            timeout,
            "kube-apiserver /readyz",
            interval=0.5,
        )
        wait_until(
            lambda: self.api_get("/api/v1/namespaces/default")[0] == 200,
            timeout,
            "the default namespace",
        )

    def restart_apiserver(self, timeout: float = 180) -> None:
        """Stop and start the API server on the same port (resilience tests)."""
        self.components["kube-apiserver"].stop()
        self._start_apiserver(timeout)

    def stop_apiserver(self) -> None:
        self.components["kube-apiserver"].stop()

    def _start_scheduler(self, timeout: float) -> None:
        port = free_port()
        config = self.run_dir / "kube-scheduler.yaml"
        config.write_text(
            textwrap.dedent(
                f"""\
                apiVersion: kubescheduler.config.k8s.io/v1
                kind: KubeSchedulerConfiguration
                clientConnection:
                  kubeconfig: {self.kubeconfig}
                leaderElection:
                  leaderElect: false
                """
            )
        )
        scheduler = Component(
            "kube-scheduler",
            [
                str(self.bin_dir / "kube-scheduler"),
                f"--config={config}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                f"--cert-dir={self.run_dir / 'scheduler'}",
            ],
            self.run_dir / "kube-scheduler.log",
        )
        self.components["kube-scheduler"] = scheduler
        scheduler.start()
        ctx = ssl._create_unverified_context()

        def healthy() -> bool:
            self._check_alive(scheduler)
            try:
                with urllib.request.urlopen(
                    f"https://127.0.0.1:{port}/healthz", context=ctx, timeout=2
                ) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until(healthy, timeout, "kube-scheduler /healthz")

    def _start_kubelet(self, timeout: float) -> None:
        ready_file = self.run_dir / "kubelet.ready"
        ready_file.unlink(missing_ok=True)
        kubelet = Component(
            "kubelet",
            [
                sys.executable,
                "-m",
                "jupyterhub_gpushare.testing.kubelet",
                f"--kubeconfig={self.kubeconfig}",
                f"--pod-cidr={self.pod_cidr}",
                f"--state-dir={self.run_dir / 'pods'}",
                f"--ready-file={ready_file}",
            ],
            self.run_dir / "kubelet.log",
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.components["kubelet"] = kubelet
        kubelet.start()
        wait_until(
            lambda: self._check_alive(kubelet) or ready_file.exists(),
            timeout,
            "the simulated kubelet",
        )

    def peak_memory(self) -> dict[str, int]:
        return {name: c.sample_memory() for name, c in self.components.items()}

    def stop(self) -> None:
        for name in ("kubelet", "kube-scheduler", "kube-apiserver", "etcd"):
            component = self.components.get(name)
            if component is not None:
                component.stop()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.run_dir, ignore_errors=True)
