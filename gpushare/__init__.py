"""Short import name for configuration files.

``c.JupyterHub.spawner_class = 'gpushare.GPUShareSpawner'`` resolves through here.
"""

from jupyterhub_gpushare import __version__, configure
from jupyterhub_gpushare.spawner import GPUShareSpawner

__all__ = ["GPUShareSpawner", "__version__", "configure"]
