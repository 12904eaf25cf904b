"""What the GPU benchmarks share: the user's server exactly as GPUShareSpawner builds it.

The environment and the start-up folder come from the spawner's own builders
(``jupyterhub_gpushare.objects`` and ``guard.startup_files()``): a pod manifest
gets the share applied with ``objects.apply_gpu_share``, and its container's
variables are what each measured process runs with; the ConfigMap's files are
written to a folder that stands in for its mount. Only the standard library and
``kubernetes_asyncio`` (which ``objects`` imports) are needed besides the
frameworks measured.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from jupyterhub_gpushare import guard, objects  # noqa: E402
from jupyterhub_gpushare._version import __version__  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
# Variables of the machine's own environment that would confuse a measurement.
OWN_PREFIXES = ("GPUSHARE_", "PYTORCH_", "XLA_", "CUPY_", "TF_", "CUDA_MPS_", "NVIDIA_VISIBLE")


def startup_folder() -> Path:
    """The guard's ConfigMap, as the spawner builds it, written where a pod would mount it."""
    folder = Path(tempfile.mkdtemp(prefix="gpushare-startup-"))
    configmap = objects.guard_configmap(
        objects.DEFAULT_GUARD_CONFIGMAP, "jupyterhub", guard.startup_files(), __version__
    )
    for name, text in configmap.data.items():
        (folder / name).write_text(text)
    return folder


def share_for(
    replicas: int,
    gpu_memory_mib: int,
    startup: Path | None,
    *,
    slices: int = 1,
    sharing: str = objects.TIME_SLICING,
    alloc_conf: str = objects.DEFAULT_PYTORCH_ALLOC_CONF,
    allocator_fraction: bool = False,
    notice: bool = True,
) -> objects.GPUShare:
    """The share GPUShareSpawner.gpu_share() gives on nodes with these labels (its defaults)."""
    fraction = objects.memory_fraction(
        slices, replicas, gpu_memory_mib, objects.DEFAULT_HEADROOM_MIB
    )
    return objects.GPUShare(
        resource_name="nvidia.com/gpu",
        slices=slices,
        replicas=replicas,
        fraction=fraction,
        gpu_memory_mib=gpu_memory_mib,
        # a guard-less combination the spawner refuses is built by the caller itself
        alloc_conf=objects.pytorch_alloc_conf(
            alloc_conf, fraction, allocator_fraction, memory_guard=startup is not None
        ),
        startup_path=str(startup) if startup else None,
        sharing=sharing,
        notice=notice,
    )


def pod_environment(share: objects.GPUShare) -> dict[str, str]:
    """The variables the spawner puts in the user's container for this share."""
    from kubernetes_asyncio.client import (
        V1Container,
        V1ObjectMeta,
        V1Pod,
        V1PodSpec,
        V1ResourceRequirements,
    )

    pod = V1Pod(
        metadata=V1ObjectMeta(name="jupyter-user"),
        spec=V1PodSpec(
            containers=[V1Container(name="notebook", env=[], resources=V1ResourceRequirements())]
        ),
    )
    objects.apply_gpu_share(
        pod,
        share,
        admin_env={},
        guard_configmap=objects.DEFAULT_GUARD_CONFIGMAP if share.startup_path else None,
    )
    return {e.name: e.value for e in pod.spec.containers[0].env}


def process_environment(pod_env: dict[str, str], **extra: str | None) -> dict[str, str]:
    """This machine's environment (the image's, in a pod) with the pod's variables on top.

    A None value in ``extra`` removes that variable.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(OWN_PREFIXES)}
    env.pop("PYTHONPATH", None)
    env.update(pod_env)
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def gpu_info() -> dict:
    """Name, memory (MiB), driver and compute mode from nvidia-smi; framework versions."""
    query = "name,memory.total,driver_version,compute_mode"
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    fields = [f.strip() for f in out.splitlines()[0].split(",")] if out else []
    info: dict = {"nvidia_smi": out, "python": sys.version.split()[0]}
    if len(fields) >= 4:
        info.update(
            name=fields[0], memory_mib=int(float(fields[1])), driver=fields[2], mode=fields[3]
        )
    for module in ("torch", "jax", "cupy"):
        probe = subprocess.run(
            [sys.executable, "-c", f"import {module}; print({module}.__version__)"],
            capture_output=True,
            text=True,
            check=False,
            env=process_environment({}),
        )
        info[module] = probe.stdout.strip() or None
    return info


def run_json(
    argv: list[str], env: dict[str, str], timeout: float = 300, cwd: Path | None = None
) -> dict:
    """Run a worker; its last stdout line is JSON. Keeps exit code and stderr too."""
    try:
        run = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd
        )
    except subprocess.TimeoutExpired as error:
        return {"exit_code": None, "error": f"timed out after {timeout:g} s: {error}"}
    result: dict = {"exit_code": run.returncode}
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    try:
        result.update(json.loads(lines[-1]))
    except (IndexError, ValueError):
        result["stdout_tail"] = run.stdout[-2000:]
    result["stderr_tail"] = run.stderr[-4000:]
    return result


def quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
    }
