#!/usr/bin/env bash
# Build gpushare-plugin-config (plugin-config/main.go, our own program) against the
# NVIDIA device plugin's Go module, so that tests read device plugin configs with
# the plugin's own parser, and cache it outside the repository, keyed by the plugin
# version and a hash of our source. Prints the binary's path.
#
# The wrapper module is throw-away: it requires only the device plugin's module,
# so every other module (sigs.k8s.io/yaml, urfave/cli, klog) comes at the version
# the plugin itself is built with.
set -euo pipefail

PLUGIN_VERSION="${GPUSHARE_DEVICE_PLUGIN_VERSION:-0.19.3}"
PLUGIN_MODULE="github.com/NVIDIA/k8s-device-plugin"
CACHE_ROOT="${GPUSHARE_CACHE:-$HOME/.cache/jupyterhub-gpushare}"
SOURCE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/plugin-config/main.go"
SOURCE_HASH="$(sha256sum "$SOURCE" | cut -c1-12)"
BIN_DIR="$CACHE_ROOT/bin/device-plugin-config-v$PLUGIN_VERSION-$SOURCE_HASH"
BIN="$BIN_DIR/gpushare-plugin-config"

fail() { echo "gpushare build: $*" >&2; exit 1; }

if [[ -x "$BIN" ]]; then
  echo "$BIN"
  exit 0
fi

command -v go >/dev/null 2>&1 || fail "the Go toolchain is missing: install Go >= 1.25 (https://go.dev/doc/install) and put 'go' on PATH"

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
WORK="$CACHE_ROOT/build/device-plugin-config-v$PLUGIN_VERSION-$SOURCE_HASH"
rm -rf "$WORK" "$BIN_DIR.tmp"
mkdir -p "$WORK" "$BIN_DIR.tmp"
cd "$WORK"
start=$(date +%s)

if ! go mod download -json "$PLUGIN_MODULE@v$PLUGIN_VERSION" >probe.json 2>probe.err; then
  fail "cannot download Go module $PLUGIN_MODULE@v$PLUGIN_VERSION ($(tail -n1 probe.err)); check network access to the Go module proxy (GOPROXY=$(go env GOPROXY))"
fi

cp "$SOURCE" main.go
go mod init gpushare.local/plugin-config >/dev/null 2>&1
echo "gpushare build: resolving $PLUGIN_MODULE v$PLUGIN_VERSION" >&2
go get "$PLUGIN_MODULE@v$PLUGIN_VERSION" >&2
# adds urfave/cli and klog at the versions the plugin's module graph selects
go mod tidy >&2
echo "gpushare build: compiling gpushare-plugin-config" >&2
go build -trimpath -ldflags "-s -w -X main.pluginVersion=v$PLUGIN_VERSION" \
  -o "$BIN_DIR.tmp/gpushare-plugin-config" . >&2

echo "$(( $(date +%s) - start ))" >"$BIN_DIR.tmp/build-seconds"
rm -rf "$BIN_DIR" && mv "$BIN_DIR.tmp" "$BIN_DIR"
echo "$BIN"
