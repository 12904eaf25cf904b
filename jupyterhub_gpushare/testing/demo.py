"""Run the local GPU cluster and a JupyterHub using GPUShareSpawner, until Ctrl-C.

python -m jupyterhub_gpushare.testing.demo            # what `make demo` runs
python -m jupyterhub_gpushare.testing.demo --cluster-only
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from kubernetes_asyncio import client, config

from .cluster import ClusterError, LocalCluster, build_binaries, ensure_port_free
from .hub import TEST_PASSWORD, LocalHub, find_proxy
from .nodes import create_gpu_node

DEMO_NODES = (
    {"name": "rtx5090-node", "gpus": 1, "replicas": 4},
    {"name": "h200-node", "gpus": 2, "replicas": 4, "product": "NVIDIA-H200", "memory_mib": 143771},
)

# What a class would be offered. CPU only is the default, so that nobody (the
# admin included) joins the GPU line without choosing a GPU.
DEMO_PROFILES = """
c.KubeSpawner.profile_list = [
    {"display_name": "CPU only", "slug": "cpu", "default": True,
     "description": "No GPU: starts at once, whatever the GPUs are doing.",
     "kubespawner_override": {"gpu_slices": 0}},
    {"display_name": "One slice of an RTX 5090", "slug": "rtx5090",
     "description": "1 of the 4 slices of the RTX 5090 node.",
     "kubespawner_override": {"gpu_slices": 1, "node_selector":
         {"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-5090-SHARED"}}},
    {"display_name": "One slice of an H200", "slug": "h200",
     "description": "1 of the 8 slices of the H200 node (2 GPUs).",
     "kubespawner_override": {"gpu_slices": 1, "node_selector":
         {"nvidia.com/gpu.product": "NVIDIA-H200-SHARED"}}},
    {"display_name": "Two slices, any GPU", "slug": "two",
     "description": "Twice the memory of one slice, on whichever GPU has room.",
     "kubespawner_override": {"gpu_slices": 2}},
]
"""


async def create_demo_objects(kubeconfig: Path, namespace: str) -> None:
    configuration = client.Configuration()
    await config.load_kube_config(str(kubeconfig), client_configuration=configuration)
    async with client.ApiClient(configuration) as api:
        core = client.CoreV1Api(api)
        await core.create_namespace({"metadata": {"name": namespace}})
        for node in DEMO_NODES:
            await create_gpu_node(core, **node)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("GPUSHARE_HUB_PORT", 8000)),
        help="port of the hub on 127.0.0.1 (default 8000, or $GPUSHARE_HUB_PORT)",
    )
    parser.add_argument("--cluster-only", action="store_true", help="start no hub")
    args = parser.parse_args(argv)
    run_dir = Path(tempfile.mkdtemp(prefix="gpushare-demo-"))
    cluster = None
    hub = None
    # Ctrl-C and SIGTERM end the demo the same way: stop everything we started.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        if not args.cluster_only:
            ensure_port_free(args.port, "the demo hub", "GPUSHARE_HUB_PORT")
            find_proxy()
        bin_dir, _ = build_binaries()
        cluster = LocalCluster(run_dir=run_dir / "cluster", bin_dir=bin_dir)
        print(f"Starting the local cluster in {run_dir} ...", flush=True)
        cluster.start()
        asyncio.run(create_demo_objects(cluster.kubeconfig, "jupyterhub"))
        print(f"Cluster ready in {cluster.start_seconds:.0f}s. KUBECONFIG={cluster.kubeconfig}")
        print(
            "GPU nodes: "
            + ", ".join(
                f"{n['name']} ({n['gpus']} GPU x {n['replicas']} slices)" for n in DEMO_NODES
            )
        )
        if not args.cluster_only:
            hub = LocalHub(
                run_dir / "hub", cluster.kubeconfig, "jupyterhub", DEMO_PROFILES, port=args.port
            )
            hub.start()
            print(f"\nJupyterHub is running at {hub.url}/hub/")
            print(
                f"Log in with any user name and the password {TEST_PASSWORD!r} "
                "(user 'admin' is an admin)."
            )
            print(
                "To see the line form: log in as five different users and pick "
                "'One slice of an RTX 5090' (it has 4 slices): the fifth waits in line."
            )
        print("READY (press Ctrl-C to stop)", flush=True)
        signal.pause()
    except ClusterError as e:
        print(f"gpushare demo: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nStopping ...", flush=True)
    finally:
        if hub is not None:
            hub.stop()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
