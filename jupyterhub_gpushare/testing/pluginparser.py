"""The NVIDIA device plugin's own config parser, for tests and the device-plugin stand-in.

``build-plugin-config.sh`` builds ``gpushare-plugin-config`` (``plugin-config/main.go``,
our program) against the plugin's Go module and caches it by version; this module
finds or builds it and asks it what the plugin makes of configs.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build-plugin-config.sh"
# Set in the stand-in's pods: the binary the test process built or found.
BINARY_ENV = "GPUSHARE_PLUGIN_CONFIG_BIN"


class ParserUnavailable(RuntimeError):
    """The Go toolchain or the module proxy is missing; the message is one line."""


@dataclass(frozen=True)
class FullGPUs:
    """What a node shows for its full GPUs with the config (the plugin's and GFD's view)."""

    resource: str
    devices_per_gpu: int
    label_replicas: int
    strategy: str
    renamed: bool
    fail_requests_greater_than_one: bool


@dataclass(frozen=True)
class PluginAnswer:
    ok: bool
    error: str | None
    warnings: list[str] = field(default_factory=list)
    gpu: FullGPUs | None = None
    plugin_version: str = ""
    config: dict | None = None

    @classmethod
    def from_json(cls, data: dict) -> PluginAnswer:
        gpu = data.get("gpu")
        return cls(
            ok=bool(data["ok"]),
            error=data.get("error") or None,
            warnings=list(data.get("warnings") or []),
            gpu=FullGPUs(
                resource=gpu["resource"],
                devices_per_gpu=gpu["devicesPerGPU"],
                label_replicas=gpu["labelReplicas"],
                strategy=gpu["strategy"],
                renamed=gpu["renamed"],
                fail_requests_greater_than_one=gpu["failRequestsGreaterThanOne"],
            )
            if gpu
            else None,
            plugin_version=data.get("pluginVersion", ""),
            config=data.get("config"),
        )


def binary() -> Path:
    """The parser: from $GPUSHARE_PLUGIN_CONFIG_BIN, else built (or found in the cache)."""
    given = os.environ.get(BINARY_ENV)
    if given:
        return Path(given)
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.startswith("gpushare build")]
        raise ParserUnavailable(lines[-1] if lines else result.stderr.strip()[-300:])
    return Path(result.stdout.strip().splitlines()[-1])


def _run(args: list[str], stdin: str, parser: Path | None) -> str:
    result = subprocess.run(
        [str(parser or binary()), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise RuntimeError(f"gpushare-plugin-config failed: {result.stderr.strip()}")
    return result.stdout


def read(text: str, parser: Path | None = None) -> PluginAnswer:
    """What the plugin makes of one config."""
    return PluginAnswer.from_json(json.loads(_run([], text, parser)))


def read_many(texts: list[str], parser: Path | None = None) -> list[PluginAnswer]:
    """What the plugin makes of each config, in one run of the parser."""
    answers = json.loads(_run(["--batch"], json.dumps(texts), parser))
    return [PluginAnswer.from_json(a) for a in answers]


def list_and_watch_bytes(gpus: int, replicas: int, parser: Path | None = None) -> int:
    """Bytes of the ListAndWatch message the plugin sends for gpus x replicas slices."""
    return int(_run(["--list-and-watch-bytes", f"{gpus},{replicas}"], "", parser))
