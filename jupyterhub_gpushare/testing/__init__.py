"""A real Kubernetes control plane on loopback, for tests, benchmarks and the demo.

etcd, kube-apiserver and kube-scheduler are the projects' own binaries (built
and cached by ``build-control-plane.sh`` beside this file); nodes are simulated
by :mod:`.kubelet`, which runs each pod's command as a local process on its own
loopback IP. :mod:`.hub` runs a real JupyterHub with configurable-http-proxy
against it, :mod:`.nodes` makes GPU nodes labelled like GPU Feature Discovery
labels real ones, :mod:`.deviceplugin` stands in for the GPU operator's device
plugin (reading configs with the plugin's own Go code, through
:mod:`.pluginparser`), and :mod:`.waiting` is how everything waits for a condition.

Needs the ``test`` extra (``pip install jupyterhub-gpushare[test]``)::

    python -m jupyterhub_gpushare.testing.demo   # cluster + hub, until Ctrl-C
"""
