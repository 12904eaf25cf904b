"""GPU sharing through the NVIDIA GPU operator, behind the ``gpushare`` command.

Pure logic, testable without a cluster:

- :mod:`.pluginconfig`: how the device plugin reads a config, the configs we write,
  the limits on replicas;
- :mod:`.cluster`: the ClusterPolicy, ConfigMap, nodes and pods that decide sharing;
- :mod:`.plan`: what ``setup`` and ``disable`` change;
- :mod:`.health`: what ``status`` reports, problems with their fixes;
- :mod:`.report`: the text of plans, tables and summaries.

Input and output:

- :mod:`.kube`: the Kubernetes API calls, writing a plan with undo;
- :mod:`.output`: lines, JSON, progress, the one-line failure;
- :mod:`.commands`: the flows of ``setup``, ``disable`` and ``status``.
"""
