"""Share NVIDIA GPUs between JupyterHub users on Kubernetes."""

from ._version import __version__

__all__ = ["GPUShareSpawner", "__version__", "configure"]


def __getattr__(name: str):
    # The spawner imports kubespawner and the Kubernetes client; keep
    # ``import jupyterhub_gpushare`` cheap for the CLI and the in-container guard.
    if name == "GPUShareSpawner":
        from .spawner import GPUShareSpawner

        return GPUShareSpawner
    if name == "configure":
        from .config import configure

        return configure
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
