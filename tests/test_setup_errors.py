"""Set-up problems end with one clear line, and an interrupted run leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from kubernetes_asyncio import client, config

from jupyterhub_gpushare.testing.cluster import (
    BUILD_SCRIPT,
    ClusterError,
    LocalCluster,
    build_binaries,
)
from jupyterhub_gpushare.testing.waiting import wait_for

REPO_ROOT = Path(__file__).resolve().parents[1]

BUILD = BUILD_SCRIPT


def run_build(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(BUILD)], env=env, capture_output=True, text=True, timeout=120
    )


def test_missing_go_toolchain_is_one_clear_line(tmp_path):
    path = os.pathsep.join(
        p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "go").exists()
    )
    result = run_build({"PATH": path, "HOME": str(tmp_path), "GPUSHARE_CACHE": str(tmp_path)})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Go toolchain is missing" in lines[0]
    assert "install Go" in lines[0]


def test_unreachable_module_proxy_is_one_clear_line(tmp_path):
    if shutil.which("go") is None:
        pytest.skip("needs the Go toolchain")
    # a closed port on loopback: the proxy cannot be reached, nothing leaves the machine
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "GPUSHARE_CACHE": str(tmp_path / "cache"),
        "GOMODCACHE": str(tmp_path / "mod"),
        "GOCACHE": str(tmp_path / "gocache"),
        "GOPROXY": f"http://127.0.0.1:{closed}",
        "GOSUMDB": "off",
    }
    result = run_build(env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "cannot download Go module k8s.io/kubernetes" in lines[0]
    assert "module proxy" in lines[0]
    # the Go module cache is read-only; let pytest's cleanup remove it
    subprocess.run(["chmod", "-R", "u+w", str(tmp_path)], check=False)


def test_port_in_use_is_one_clear_line(tmp_path):
    bin_dir, _ = build_binaries()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        cluster = LocalCluster(run_dir=tmp_path / "c", bin_dir=bin_dir, apiserver_port=port)
        with pytest.raises(ClusterError) as excinfo:
            cluster.start()
        message = str(excinfo.value)
        assert f"port 127.0.0.1:{port} for kube-apiserver is already in use" in message
        assert "GPUSHARE_APISERVER_PORT" in message
        assert "\n" not in message
        assert not cluster.components  # nothing was started


def test_demo_with_busy_port_exits_with_one_line():
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "jupyterhub_gpushare.testing.demo", "--port", str(port)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"gpushare demo: port 127.0.0.1:{port} for the demo hub is already in use by another "
        "program: stop that program or pick another port with GPUSHARE_HUB_PORT=<port>"
    ]


def processes_using(folder: str) -> list[int]:
    """PIDs whose command line or working directory lies in ``folder``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if folder in cmdline or cwd.startswith(folder):
            found.append(int(entry.name))
    return found


@pytest.mark.cluster
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
async def test_interrupted_run_leaves_no_process(how, tmp_path):
    """Start a second cluster (the demo's), run a pod in it, then interrupt."""
    demo = await asyncio.create_subprocess_exec(
        sys.executable,
        "-u",
        "-m",
        "jupyterhub_gpushare.testing.demo",
        "--cluster-only",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    kubeconfig = run_dir = None
    lines = []
    try:
        async with asyncio.timeout(180):
            while True:
                line = (await demo.stdout.readline()).decode()
                lines.append(line)
                assert line, "".join(lines)
                if "KUBECONFIG=" in line:
                    kubeconfig = line.split("KUBECONFIG=")[1].strip()
                if line.startswith("Starting the local cluster in"):
                    run_dir = line.split(" in ")[1].split()[0]
                if line.startswith("READY"):
                    break
        configuration = client.Configuration()
        await config.load_kube_config(kubeconfig, client_configuration=configuration)
        async with client.ApiClient(configuration) as api:
            core = client.CoreV1Api(api)
            pod = {
                "metadata": {"name": "sleeper"},
                "spec": {
                    "containers": [
                        {
                            "name": "c",
                            "image": "python",
                            "command": [sys.executable, "-c", "import time; time.sleep(600)"],
                            "resources": {"limits": {"nvidia.com/gpu": "1"}},
                        }
                    ]
                },
            }
            await core.create_namespaced_pod("jupyterhub", pod)

            async def running():
                p = await core.read_namespaced_pod("sleeper", "jupyterhub")
                return p.status.phase == "Running"

            await wait_for(running, 60, "the pod in the demo cluster to run")
        assert len(processes_using(run_dir)) >= 5  # etcd, apiserver, scheduler, kubelet, pod
    except BaseException:
        demo.kill()
        raise
    demo.send_signal(how)
    await asyncio.wait_for(demo.wait(), 60)

    async def none_left():
        return not processes_using(run_dir)

    await wait_for(none_left, 30, f"every process of {run_dir} to end")
    shutil.rmtree(run_dir, ignore_errors=True)
