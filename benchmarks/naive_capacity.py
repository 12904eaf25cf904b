"""The naive way to answer "how many GPU slices are free": list every node and
every pod from the API server for each answer.

The comparison point of the scale benchmark. It answers the same JSON as the
service's ``GET api/capacity`` (the same arithmetic, jupyterhub_gpushare.capacity),
only without watch caches::

    python -m benchmarks.naive_capacity --port 10102 --kubeconfig admin.kubeconfig
"""

from __future__ import annotations

import argparse
import asyncio
import json

from kubernetes_asyncio import client, config
from tornado import web
from tornado.httpserver import HTTPServer

from jupyterhub_gpushare.capacity import PoolSpec, node_capacities, pool_totals

RESOURCE = "nvidia.com/gpu"
PATH = "/services/gpushare/api/capacity"


async def capacity(core: client.CoreV1Api) -> dict:
    """Free and total slices per pool, from a fresh list of nodes and pods."""
    nodes_response, pods_response = await asyncio.gather(
        core.list_node(_preload_content=False, _request_timeout=120),
        core.list_pod_for_all_namespaces(_preload_content=False, _request_timeout=120),
    )
    nodes = (await nodes_response.json())["items"]
    pods = (await pods_response.json())["items"]
    caps = node_capacities(nodes, pods, RESOURCE)
    specs = {RESOURCE: PoolSpec(RESOURCE)}
    for node in caps.values():
        spec = PoolSpec.from_selector(RESOURCE, {"nvidia.com/gpu.product": node.product})
        specs.setdefault(spec.key, spec)
    pools = [pool_totals(spec, caps) for spec in sorted(specs.values(), key=lambda s: s.key)]
    return {"ready": True, "problem": None, "pools": pools}


class CapacityHandler(web.RequestHandler):
    async def get(self) -> None:
        answer = await capacity(self.settings["core"])
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(answer))


async def serve(port: int, kubeconfig: str) -> None:
    configuration = client.Configuration()
    await config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    api = client.ApiClient(configuration)
    app = web.Application([(PATH, CapacityHandler)], core=client.CoreV1Api(api))
    server = HTTPServer(app)
    server.listen(port, "127.0.0.1")
    try:
        await asyncio.Event().wait()
    finally:
        server.stop()
        await api.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--kubeconfig", required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.kubeconfig))


if __name__ == "__main__":
    main()
