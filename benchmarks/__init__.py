"""Benchmarks of jupyterhub-gpushare against plain KubeSpawner on the local cluster.

``python -m benchmarks`` runs them all (``make bench``); ``python -m benchmarks
handover`` runs one. See benchmarks/README.md.
"""
