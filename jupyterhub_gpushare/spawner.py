"""GPUShareSpawner: KubeSpawner that gives each user a slice of a shared GPU."""

from kubespawner import KubeSpawner


class GPUShareSpawner(KubeSpawner):
    """A KubeSpawner that requests GPU slices and injects a memory share."""
