"""A real Kubernetes control plane on loopback, for tests, benchmarks and the demo.

etcd, kube-apiserver and kube-scheduler are the projects' own binaries (built by
``hack/build-control-plane.sh``); nodes are simulated by :mod:`.kubelet`, which runs
each pod's command as a local process on its own loopback IP.
"""
