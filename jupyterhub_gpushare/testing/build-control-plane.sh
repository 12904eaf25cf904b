#!/usr/bin/env bash
# Build etcd, kube-apiserver and kube-scheduler from the projects' own Go modules
# and cache them outside the repository, keyed by version.
#
# `go install k8s.io/kubernetes/cmd/...@vX` is refused because the kubernetes
# go.mod carries replace directives for its staging modules, so we build through
# throw-away wrapper modules that pin every staging module to its published tag.
set -euo pipefail

K8S_VERSION="${GPUSHARE_K8S_VERSION:-1.36.3}"
ETCD_VERSION="${GPUSHARE_ETCD_VERSION:-3.6.16}"
CACHE_ROOT="${GPUSHARE_CACHE:-$HOME/.cache/jupyterhub-gpushare}"
BIN_DIR="$CACHE_ROOT/bin/k8s-v$K8S_VERSION-etcd-v$ETCD_VERSION"

fail() { echo "gpushare build: $*" >&2; exit 1; }

if [[ -x "$BIN_DIR/kube-apiserver" && -x "$BIN_DIR/kube-scheduler" && -x "$BIN_DIR/etcd" ]]; then
  echo "$BIN_DIR"
  exit 0
fi

command -v go >/dev/null 2>&1 || fail "the Go toolchain is missing: install Go >= 1.25 (https://go.dev/doc/install) and put 'go' on PATH"

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
WORK="$CACHE_ROOT/build"
mkdir -p "$WORK" "$BIN_DIR.tmp"
start=$(date +%s)

probe_proxy() {
  go mod download -json "$1" >"$WORK/probe.json" 2>"$WORK/probe.err" && return 0
  fail "cannot download Go module $1 ($(tail -n1 "$WORK/probe.err")); check network access to the Go module proxy (GOPROXY=$(go env GOPROXY))"
}

# --- kube-apiserver and kube-scheduler -------------------------------------
K8S_MOD="$WORK/k8s-v$K8S_VERSION"
if [[ ! -x "$BIN_DIR.tmp/kube-apiserver" || ! -x "$BIN_DIR.tmp/kube-scheduler" ]]; then
  probe_proxy "k8s.io/kubernetes@v$K8S_VERSION"
  upstream_gomod=$(sed -n 's/.*"GoMod": "\(.*\)".*/\1/p' "$WORK/probe.json")
  staging_version="v0.${K8S_VERSION#1.}"
  rm -rf "$K8S_MOD" && mkdir -p "$K8S_MOD" && cd "$K8S_MOD"
  go mod init gpushare.local/k8s-testbin >/dev/null 2>&1
  for m in $(sed -n 's|^[[:space:]]*\(k8s\.io/[^ ]*\) => \./staging/.*|\1|p' "$upstream_gomod"); do
    go mod edit "-replace=$m=$m@$staging_version"
  done
  echo "gpushare build: resolving k8s.io/kubernetes v$K8S_VERSION" >&2
  go get "k8s.io/kubernetes@v$K8S_VERSION" >&2
  echo "gpushare build: compiling kube-apiserver and kube-scheduler" >&2
  go build -trimpath -tags=selinux,notest,grpcnotrace -ldflags "-s -w \
      -X k8s.io/component-base/version.gitVersion=v$K8S_VERSION" \
    -o "$BIN_DIR.tmp/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-scheduler >&2
fi

# --- etcd (separate module so MVS keeps each project's own dependency set) ---
ETCD_MOD="$WORK/etcd-v$ETCD_VERSION"
if [[ ! -x "$BIN_DIR.tmp/etcd" ]]; then
  probe_proxy "go.etcd.io/etcd/server/v3@v$ETCD_VERSION"
  rm -rf "$ETCD_MOD" && mkdir -p "$ETCD_MOD" && cd "$ETCD_MOD"
  go mod init gpushare.local/etcd-testbin >/dev/null 2>&1
  echo "gpushare build: resolving etcd v$ETCD_VERSION" >&2
  go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" >&2
  echo "gpushare build: compiling etcd" >&2
  go build -trimpath -ldflags "-s -w" -o "$BIN_DIR.tmp/etcd" go.etcd.io/etcd/server/v3 >&2
fi

echo "$(( $(date +%s) - start ))" >"$BIN_DIR.tmp/build-seconds"
rm -rf "$BIN_DIR" && mv "$BIN_DIR.tmp" "$BIN_DIR"
echo "$BIN_DIR"
