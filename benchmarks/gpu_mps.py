#!/usr/bin/env python3
"""MPS as the NVIDIA device plugin sets it up: do its caps hold, and what do they cost?

Starts an MPS control daemon the way the device plugin's MPS daemon does for a
GPU shared N ways (``cmd/mps-control-daemon/mps/daemon.go``): for every client,
a pinned device memory limit of total/N (``set_default_device_pinned_mem_limit``)
and an active thread percentage of 100/N (``set_default_active_thread_percentage``).
One difference: the plugin first switches the GPU to EXCLUSIVE_PROCESS compute
mode, so that no process can use the GPU outside MPS; this script leaves the
compute mode as it finds it (the GPU may be shared with others), so a process
that leaves MPS is measured, not prevented.

Every client runs with the environment GPUShareSpawner builds for an MPS node
(``GPUSHARE_SHARING=mps``, one slice of N, the memory guard's start-up folder)
plus ``CUDA_MPS_PIPE_DIRECTORY`` and ``CUDA_MPS_LOG_DIRECTORY``, which the
plugin passes to its containers. Parts:

* **routes**: the routes of ``gpu_memory_guard.py``, and two of MPS's own (a
  client raising its own pinned limit; a client leaving MPS); each asks for
  total/N + 1 GiB in one allocation;
* **throughput**: bf16 8192^3 GEMM loops, one client alone, N together, and one
  alone that raises its own thread percentage to 100;
* **latency**: a 1024^3 GEMM + sync every 10 ms beside N-1 busy clients, and alone.

    python3 benchmarks/gpu_mps.py --out benchmarks/results

Writes gpu_mps.json (figures as name/value/unit) and gpu_mps.txt. Without the
MPS binaries, or when the daemon cannot start, it writes what it found and why.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import gpu_common as common  # noqa: E402
import gpu_memory_guard as guard_bench  # noqa: E402
import gpu_timeslicing as timeslicing  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
REPLICAS = guard_bench.REPLICAS

MPS_ROUTES = {
    "mps: client sets CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=140G, fraction 1.0": (
        "torch",
        "raise-fraction",
        (),
        "spawner",
        {"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=140G"},
    ),
    "mps: client drops CUDA_MPS_PIPE_DIRECTORY (leaves MPS), fraction 1.0": (
        "torch",
        "raise-fraction",
        (),
        "spawner",
        {"CUDA_MPS_PIPE_DIRECTORY": None, "CUDA_MPS_LOG_DIRECTORY": None},
    ),
}


class Daemon:
    """An MPS control daemon with its own pipe and log folders."""

    def __init__(self, control: str, root: Path) -> None:
        self.control = control
        self.pipe = root / "pipe"
        self.log = root / "log"
        self.pipe.mkdir(parents=True)
        self.log.mkdir(parents=True)
        self.env = {
            **os.environ,
            "CUDA_MPS_PIPE_DIRECTORY": str(self.pipe),
            "CUDA_MPS_LOG_DIRECTORY": str(self.log),
        }
        self.transcript: list[dict] = []

    def client_env(self) -> dict[str, str]:
        return {"CUDA_MPS_PIPE_DIRECTORY": str(self.pipe), "CUDA_MPS_LOG_DIRECTORY": str(self.log)}

    def start(self) -> None:
        run = subprocess.run(
            [self.control, "-d"], env=self.env, capture_output=True, text=True, timeout=30
        )
        self.transcript.append(
            {"command": "-d", "exit": run.returncode, "out": run.stdout + run.stderr}
        )
        if run.returncode != 0:
            raise RuntimeError(f"nvidia-cuda-mps-control -d failed: {run.stdout}{run.stderr}")

    def send(self, command: str) -> str:
        run = subprocess.run(
            [self.control],
            input=command + "\n",
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        out = (run.stdout + run.stderr).strip()
        self.transcript.append({"command": command, "exit": run.returncode, "out": out})
        if run.returncode != 0:
            raise RuntimeError(f"MPS control {command!r} failed ({run.returncode}): {out}")
        return out

    def quit(self) -> None:
        try:
            self.send("quit")
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
            self.transcript.append({"command": "quit", "error": str(error)})
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                alive = subprocess.run(
                    ["pgrep", "-f", "nvidia-cuda-mps-(control|server)"],
                    capture_output=True,
                    text=True,
                    check=False,
                ).stdout.split()
            except OSError:
                return
            if not alive:
                return
            time.sleep(0.2)

    def server_log(self) -> str:
        path = self.log / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def throughput(env: dict[str, str], seconds: float) -> dict:
    data: dict = {}
    for label, roles, extra in (
        ("1 alone", ["busy"], {}),
        (f"{REPLICAS} together", ["busy"] * REPLICAS, {}),
        ("1 alone, CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=100", ["busy"], {"pct": "100"}),
    ):
        phase_env = dict(env)
        if extra:
            phase_env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = extra["pct"]
        try:
            phase = timeslicing.run_phase(roles, seconds, phase_env)
        except Exception as error:
            data[label] = {"error": f"{type(error).__name__}: {error}"}
            print(f"  {label}: failed: {error}", flush=True)
            continue
        data[label] = phase
        per = phase["per_process_tflops"]
        print(
            f"  {label}: per client {[round(t, 1) for t in per]} TFLOP/s, "
            f"together {phase['aggregate_tflops']:.1f}",
            flush=True,
        )
    return data


def latency(env: dict[str, str], seconds: float) -> dict:
    data: dict = {}
    for label, roles in (
        ("alone", ["interactive"]),
        (f"beside {REPLICAS - 1} busy", ["busy"] * (REPLICAS - 1) + ["interactive"]),
    ):
        try:
            phase = timeslicing.run_phase(roles, seconds, env)
        except Exception as error:
            data[label] = {"error": f"{type(error).__name__}: {error}"}
            print(f"  interactive {label}: failed: {error}", flush=True)
            continue
        data[label] = phase
        lat = phase["interactive"]
        print(
            f"  interactive {label}: p50 {lat['p50_ms']:.2f} p95 {lat.get('p95_ms', 0):.2f} "
            f"p99 {lat['p99_ms']:.2f} max {lat['max_ms']:.2f} ms (n = {lat['calls']})",
            flush=True,
        )
    return data


def figures(data: dict) -> list[dict]:
    out: list[dict] = []
    if not data.get("mps_started"):
        return [{"name": "MPS daemon started", "value": False, "unit": "bool"}]
    out.append(
        {
            "name": "pinned device memory limit per client",
            "value": data["limits"]["pinned_mem_limit"],
            "unit": "",
        }
    )
    out.append(
        {
            "name": "active thread percentage per client",
            "value": data["limits"]["active_thread_percentage"],
            "unit": "%",
        }
    )
    for r in data.get("routes", []):
        if "skipped" in r:
            continue
        out.append(
            {
                "name": f"route {r['route']}: allocated above the MPS limit",
                "value": bool(r.get("allocated")),
                "unit": "bool",
            }
        )
    notices = [r for r in data.get("notice", []) if r["notices_on"]]
    if notices:
        out.append(
            {
                "name": "concurrent clients showing the notice once and the hint once",
                "value": sum(
                    len(r["notice_lines"]) == 1 and len(r["hint_lines"]) == 1 for r in notices
                ),
                "unit": f"of {len(notices)}",
            }
        )
    for label, phase in (data.get("throughput") or {}).items():
        if "per_process_tflops" not in phase:
            continue
        per = phase["per_process_tflops"]
        out += [
            {
                "name": f"throughput {label}: mean per client",
                "value": round(statistics.fmean(per), 1),
                "unit": "TFLOP/s",
            },
            {
                "name": f"throughput {label}: all clients together",
                "value": round(phase["aggregate_tflops"], 1),
                "unit": "TFLOP/s",
            },
        ]
    for label, phase in (data.get("latency") or {}).items():
        lat = phase.get("interactive")
        if not lat:
            continue
        for key in ("p50_ms", "p95_ms", "p99_ms", "max_ms"):
            if key in lat:
                out.append(
                    {
                        "name": f"interactive {label}: {key.split('_')[0]}",
                        "value": round(lat[key], 3),
                        "unit": "ms",
                    }
                )
        out.append({"name": f"interactive {label}: calls", "value": lat["calls"], "unit": "n"})
    return out


def table(data: dict) -> str:
    if not data.get("mps_started"):
        return f"MPS could not be measured here: {data.get('mps_problem')}"
    lines = [
        f"MPS limits per client: pinned memory {data['limits']['pinned_mem_limit']}, "
        f"active threads {data['limits']['active_thread_percentage']} %",
        "",
        guard_bench.table({"routes": data.get("routes", []), "notice": data.get("notice", [])}),
        "",
        f"{'throughput (bf16 8192^3 GEMM)':58} {'per client TFLOP/s':>20} {'together':>10}",
    ]
    for label, phase in (data.get("throughput") or {}).items():
        if "per_process_tflops" not in phase:
            lines.append(f"{label:58} failed: {phase.get('error', '')[:40]}")
            continue
        per = phase["per_process_tflops"]
        spread = f"{statistics.fmean(per):.1f} ({min(per):.1f}-{max(per):.1f})"
        lines.append(f"{label:58} {spread:>20} {phase['aggregate_tflops']:>10.1f}")
    lines += [
        "",
        f"{'interactive 1024^3 GEMM + sync every 10 ms':44} "
        f"{'p50 / p95 / p99 / max ms':>30} {'n':>6}",
    ]
    for label, phase in (data.get("latency") or {}).items():
        lat = phase.get("interactive")
        if not lat:
            lines.append(f"{label:44} failed: {phase.get('error', '')[:40]}")
            continue
        values = " / ".join(f"{lat[k]:.2f}" for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms"))
        lines.append(f"{label:44} {values:>30} {lat['calls']:>6}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--parts", nargs="*", default=["routes", "notice", "throughput", "latency"])
    args = parser.parse_args()

    info = common.gpu_info()
    memory_mib = info["memory_mib"]
    data: dict = {
        "benchmark": "gpu_mps",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": info,
        "replicas": REPLICAS,
        "seconds": args.seconds,
        "mps_started": False,
    }
    control = shutil.which("nvidia-cuda-mps-control")
    data["binaries"] = {
        "nvidia-cuda-mps-control": control,
        "nvidia-cuda-mps-server": shutil.which("nvidia-cuda-mps-server"),
    }
    print(f"device: {info['nvidia_smi']}; MPS binaries: {data['binaries']}", flush=True)
    daemon = None
    root = Path(tempfile.mkdtemp(prefix="gpushare-mps-"))
    try:
        if not control:
            raise RuntimeError("nvidia-cuda-mps-control is not installed")
        daemon = Daemon(control, root)
        daemon.start()
        # what the device plugin's daemon sets, for a GPU shared REPLICAS ways
        limit = f"{memory_mib // REPLICAS}M"
        percentage = str(100 // REPLICAS)
        daemon.send(f"set_default_device_pinned_mem_limit 0 {limit}")
        daemon.send(f"set_default_active_thread_percentage {percentage}")
        data["limits"] = {
            "pinned_mem_limit": limit,
            "active_thread_percentage": int(percentage),
            "read_back": daemon.send("get_default_active_thread_percentage"),
        }
        data["mps_started"] = True
        startup = common.startup_folder()
        share = common.share_for(REPLICAS, memory_mib, startup, sharing="mps")
        env = common.process_environment(common.pod_environment(share), **daemon.client_env())
        data["spawner_environment"] = common.pod_environment(share)
        # one client first: is it really an MPS client, and what does it see?
        probe = common.run_json(
            [
                sys.executable,
                "-c",
                "import json, torch; torch.zeros(1, device='cuda'); "
                "print(json.dumps({'mem_get_info': torch.cuda.mem_get_info(), "
                "'sms': torch.cuda.get_device_properties(0).multi_processor_count}))",
            ],
            env,
            timeout=120,
        )
        probe["server_list"] = daemon.send("get_server_list")
        data["client_probe"] = probe
        print(f"client probe: {json.dumps(probe)[:400]}", flush=True)
        if "routes" in args.parts:
            print("routes:", flush=True)
            # the image-venv route measures the same as python -I here: left out
            routes = {
                name: route
                for name, route in {**guard_bench.ROUTES, **MPS_ROUTES}.items()
                if "installed in the image" not in name
            }
            data["routes"] = guard_bench.run_routes(
                common,
                startup,
                memory_mib,
                routes=routes,
                extra_env=daemon.client_env(),
                work=root,
                sharing="mps",
            )
        if "notice" in args.parts:
            print("notice:", flush=True)
            # one PyTorch process lifts its own fraction: the MPS limit answers it
            data["notice"] = guard_bench.run_notice(
                common,
                startup,
                memory_mib,
                extra_env=daemon.client_env(),
                sharing="mps",
                frameworks=("torch", "torch-raised", "jax", "cupy"),
            )
        if "throughput" in args.parts:
            print("throughput:", flush=True)
            data["throughput"] = throughput(env, args.seconds)
        if "latency" in args.parts:
            print("latency:", flush=True)
            data["latency"] = latency(env, args.seconds)
    except Exception as error:
        data["mps_problem"] = f"{type(error).__name__}: {error}"
        print(f"MPS problem: {data['mps_problem']}", flush=True)
    finally:
        if daemon is not None:
            data["server_log_tail"] = daemon.server_log()
            daemon.quit()
            data["control_transcript"] = daemon.transcript
    data["figures"] = figures(data)
    text = (
        f"MPS as the NVIDIA device plugin sets it up, {REPLICAS} clients per GPU "
        f"(compute mode left as found: {info.get('mode')})\n"
        f"device: {info['nvidia_smi']}; torch {info['torch']}, jax {info['jax']}, "
        f"cupy {info['cupy']}\n\n" + table(data) + "\n"
    )
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_mps.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (args.out / "gpu_mps.txt").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
