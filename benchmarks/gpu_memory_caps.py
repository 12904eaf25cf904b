#!/usr/bin/env python3
"""Do the per-user GPU memory caps hold when four users share one GPU?

Each scenario starts four processes at once, with the environment that
GPUShareSpawner gives a user with one slice of a GPU shared four ways (built
with ``jupyterhub_gpushare.objects``, see ``gpu_common.py``: the fraction, the
framework variables, ``PYTORCH_CUDA_ALLOC_CONF``), the guard's ConfigMap files
first on PYTHONPATH.
Every process holds ``share - 3 GiB`` of device memory and keeps doing small
GPU work. Then, one process at a time, it tries to bring its own use to
``share - 0.5 GiB`` (must succeed) and to ``share + 0.5 GiB`` (must fail with its
framework's out-of-memory error), while the other three keep running. At the
end every process checks that the memory it held is unchanged.

The "above" request would fit in the GPU's free memory, so an OOM there comes
from the cap, not from the device being full: the control scenario, without
the guard and its variables, shows that the same request then succeeds.

    python3 benchmarks/gpu_memory_caps.py --out benchmarks/results

Needs an NVIDIA GPU and whichever of torch, jax, cupy are installed (a missing
framework's scenarios are reported as skipped). Writes gpu_memory_caps.json
(figures as name/value/unit) and gpu_memory_caps.txt (the table).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

GiB = 1 << 30
MiB = 1 << 20
HOLD_BELOW_SHARE = 3 * GiB  # what each process holds: share - 3 GiB
PROBE_MARGIN = GiB // 2  # "just below" / "just above" the share
REPO = Path(__file__).resolve().parents[1]

# name, worker framework, extra environment (a None value removes that variable;
# None instead of a dict = no guard and none of the spawner's variables at all)
SCENARIOS = [
    ("pytorch, guard hook", "torch", {}),
    (
        "pytorch, allocator key (2.10+)",
        "torch",
        {
            "PYTORCH_CUDA_ALLOC_CONF": (
                "expandable_segments:True,per_process_memory_fraction:{fraction}"
            )
        },
    ),
    # The spawner's environment as is: XLA_PYTHON_CLIENT_MEM_FRACTION only.
    ("jax, spawner env", "jax", {}),
    ("jax, spawner env, no preallocation", "jax", {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}),
    # Negative result, why the spawner sets one name: on JAX 0.11.2 both names
    # together make the CUDA plugin fail ("XLA_CLIENT_MEM_FRACTION is specified
    # together with XLA_PYTHON_CLIENT_MEM_FRACTION"), and JAX falls back to the CPU.
    ("jax, both fraction names (negative)", "jax", {"XLA_CLIENT_MEM_FRACTION": "{fraction}"}),
    ("cupy", "cupy", {}),
    ("pytorch, no guard (control)", "torch", None),
]


# --- worker: one user's process -------------------------------------------------


class TorchWorker:
    def __init__(self) -> None:
        started = time.perf_counter()
        import torch

        self.torch = torch
        self.import_seconds = time.perf_counter() - started
        # the guard must not have initialised CUDA while torch was imported
        self.cuda_initialized_after_import = torch.cuda.is_initialized()
        self.queued_calls_after_import = len(getattr(torch.cuda, "_queued_calls", []))
        self.fork_child_used_cuda = self._fork_child_uses_cuda()
        self.small = torch.randn(256, 256, device="cuda")

    def _fork_child_uses_cuda(self) -> bool | None:
        # What DataLoader fork workers rely on: CUDA still usable in a child
        # forked after `import torch`. Only the first process checks (it costs a
        # context for a moment).
        if os.environ.get("BENCH_RANK") != "0":
            return None
        pid = os.fork()
        if pid == 0:
            try:
                ok = float(self.torch.ones(4, device="cuda").sum()) == 4.0
                os._exit(0 if ok else 1)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) == 0

    def cap(self) -> dict:
        info = {"total_bytes": self.torch.cuda.mem_get_info()[1]}
        getter = getattr(self.torch.cuda, "get_per_process_memory_fraction", None)
        if getter is not None:
            info["fraction_reported"] = getter()
        return info

    def used(self) -> int:
        return self.torch.cuda.memory_reserved()

    def alloc(self, nbytes: int, fill: int | None = None):
        if fill is None:
            return self.torch.empty(nbytes, dtype=self.torch.uint8, device="cuda")
        return self.torch.full((nbytes,), fill, dtype=self.torch.uint8, device="cuda")

    def release(self) -> None:
        self.torch.cuda.empty_cache()

    def is_oom(self, error: BaseException) -> bool:
        return isinstance(error, self.torch.OutOfMemoryError)

    def small_work(self) -> None:
        float((self.small @ self.small).sum())

    def intact(self, chunk, value: int) -> bool:
        return int(chunk.min()) == value and int(chunk.max()) == value

    def sync(self) -> None:
        self.torch.cuda.synchronize()


class JaxWorker:
    def __init__(self) -> None:
        started = time.perf_counter()
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp
        self.import_seconds = time.perf_counter() - started
        self.device = jax.devices("gpu")[0]
        self.small = jnp.ones((256, 256), jnp.float32)
        self.small_work()

    def cap(self) -> dict:
        stats = self.device.memory_stats() or {}
        return {key: stats[key] for key in sorted(stats) if "bytes" in key}

    def used(self) -> int:
        return (self.device.memory_stats() or {}).get("bytes_in_use", 0)

    def alloc(self, nbytes: int, fill: int | None = None):
        # 2-D so that no dimension needs 64-bit indexing
        shape = (max(1, nbytes // MiB), MiB)
        array = self.jnp.full(shape, fill or 0, self.jnp.uint8)
        array.block_until_ready()
        return array

    def release(self) -> None:
        pass

    def is_oom(self, error: BaseException) -> bool:
        return "RESOURCE_EXHAUSTED" in str(error)

    def small_work(self) -> None:
        float((self.small @ self.small).sum())

    def intact(self, chunk, value: int) -> bool:
        return int(chunk.min()) == value and int(chunk.max()) == value

    def sync(self) -> None:
        pass


class CupyWorker:
    def __init__(self) -> None:
        started = time.perf_counter()
        import cupy

        self.cp = cupy
        self.import_seconds = time.perf_counter() - started
        self.pool = cupy.get_default_memory_pool()
        self.small = cupy.ones((256, 256), cupy.float32)

    def cap(self) -> dict:
        return {
            "limit_bytes": self.pool.get_limit(),
            "total_bytes": self.cp.cuda.Device().mem_info[1],
        }

    def used(self) -> int:
        return self.pool.total_bytes()

    def alloc(self, nbytes: int, fill: int | None = None):
        if fill is None:
            return self.cp.empty(nbytes, dtype=self.cp.uint8)
        return self.cp.full(nbytes, fill, dtype=self.cp.uint8)

    def release(self) -> None:
        self.pool.free_all_blocks()

    def is_oom(self, error: BaseException) -> bool:
        return isinstance(error, self.cp.cuda.memory.OutOfMemoryError)

    def small_work(self) -> None:
        float((self.small @ self.small).sum())

    def intact(self, chunk, value: int) -> bool:
        return int(chunk.min()) == value and int(chunk.max()) == value

    def sync(self) -> None:
        self.cp.cuda.Device().synchronize()


WORKERS = {"torch": TorchWorker, "jax": JaxWorker, "cupy": CupyWorker}


def _say(**message) -> None:
    print(json.dumps(message), flush=True)


def _try_alloc(worker, target_used: int) -> dict:
    """Grow this process's framework-level use to target_used bytes in one allocation."""
    before = worker.used()
    size = target_used - before
    result = {"target_gib": target_used / GiB, "request_gib": size / GiB}
    started = time.perf_counter()
    try:
        block = worker.alloc(size)
        worker.sync()
        result["ok"] = True
        del block
    except Exception as error:
        result["ok"] = False
        result["oom"] = worker.is_oom(error)
        result["error"] = type(error).__name__
        result["message"] = " ".join(str(error).split())[:1000]
    result["seconds"] = time.perf_counter() - started
    worker.release()
    return result


def worker_main(framework: str) -> int:
    fraction = float(os.environ["BENCH_FRACTION"])
    total = int(os.environ["BENCH_TOTAL_BYTES"])
    share = int(fraction * total)
    try:
        worker = WORKERS[framework]()
    except Exception as error:
        _say(event="failed", error=f"{type(error).__name__}: {error}")
        return 1
    commands: queue.Queue[str] = queue.Queue()

    def read_commands() -> None:
        for line in sys.stdin:
            commands.put(line.strip())
        commands.put("exit")

    threading.Thread(target=read_commands, daemon=True).start()

    held, hold_error = [], None
    remaining = share - HOLD_BELOW_SHARE
    try:
        while remaining > 0:
            size = min(GiB, remaining)
            held.append(worker.alloc(size, fill=7))
            remaining -= size
        worker.sync()
    except Exception as error:
        hold_error = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
    state = sys.modules.get("_gpushare_guard_state")
    _say(
        event="ready",
        pid=os.getpid(),
        share_gib=share / GiB,
        held_gib=worker.used() / GiB,
        hold_error=hold_error,
        cap=worker.cap(),
        guard_applied=dict(state.applied) if state else None,
        import_seconds=worker.import_seconds,
        cuda_initialized_after_import=getattr(worker, "cuda_initialized_after_import", None),
        queued_calls_after_import=getattr(worker, "queued_calls_after_import", None),
        fork_child_used_cuda=getattr(worker, "fork_child_used_cuda", None),
    )
    iterations = 0
    while True:
        try:
            command = commands.get(timeout=0.02)
        except queue.Empty:
            worker.small_work()
            iterations += 1
            continue
        if command == "probe":
            below = _try_alloc(worker, share - PROBE_MARGIN)
            above = _try_alloc(worker, share + PROBE_MARGIN)
            _say(event="probed", below=below, above=above)
        elif command == "report":
            worker.small_work()
            iterations += 1
            _say(event="report", iterations=iterations)
        elif command == "exit":
            intact = all(worker.intact(chunk, 7) for chunk in held)
            _say(event="done", iterations=iterations, intact=intact, chunks=len(held))
            return 0


# --- parent: scenarios ---------------------------------------------------------------


class Proc:
    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.popen = subprocess.Popen(
            argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.messages: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            try:
                self.messages.put(json.loads(line))
            except json.JSONDecodeError:
                sys.stderr.write(line)
        self.messages.put({"event": "eof"})

    def send(self, command: str) -> None:
        self.popen.stdin.write(command + "\n")
        self.popen.stdin.flush()

    def expect(self, event: str, timeout: float) -> dict:
        message = self.messages.get(timeout=timeout)
        if message.get("event") == "failed":
            raise RuntimeError(f"worker failed: {message['error']}")
        if message.get("event") != event:
            raise RuntimeError(f"expected {event}, got {message}")
        return message

    def alive(self) -> bool:
        return self.popen.poll() is None


def gpu_memory_mib() -> tuple[float, float]:
    """(used, total) MiB of the GPU, all processes together, from nvidia-smi."""
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        used, total = (float(x) for x in out.stdout.split(",")[:2])
        return used, total
    except ValueError:
        return float("nan"), float("nan")


def spawner_env(fraction: float, replicas: int, startup: Path, memory_mib: int) -> dict[str, str]:
    """The variables GPUShareSpawner sets for a user with one slice (at ``fraction``)."""
    import dataclasses

    import gpu_common

    share = gpu_common.share_for(replicas, memory_mib, startup)
    if abs(share.fraction - fraction) > 1e-9:
        share = dataclasses.replace(share, fraction=fraction)
    return gpu_common.pod_environment(share)


def run_scenario(name, framework, extra, args, startup: Path, total: int) -> dict:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GPUSHARE_", "XLA_", "CUPY_", "PYTORCH_", "TF_"))
    }
    base.update(
        PYTHONUNBUFFERED="1", BENCH_FRACTION=str(args.fraction), BENCH_TOTAL_BYTES=str(total)
    )
    if extra is not None:
        base.update(spawner_env(args.fraction, args.procs, startup, args.memory_mib))
        for key, value in extra.items():
            if value is None:
                base.pop(key, None)
            else:
                base[key] = value.format(fraction=args.fraction)
    print(f"\n== {name}", flush=True)
    started = time.perf_counter()
    procs = [
        Proc(
            [sys.executable, __file__, "--worker", framework],
            {**base, "BENCH_RANK": str(rank)},
        )
        for rank in range(args.procs)
    ]
    result: dict = {"name": name, "framework": framework, "guarded": extra is not None}
    try:
        ready = [p.expect("ready", 120) for p in procs]
        result["ready"] = ready
        result["gpu_used_gib_holding"] = gpu_memory_mib()[0] / 1024
        probes, neighbours_ok = [], []
        last = {}
        for index, proc in enumerate(procs):
            proc.send("report")
            last[index] = proc.expect("report", 60)["iterations"]
        for rank, proc in enumerate(procs):
            used, total_mib = gpu_memory_mib()
            proc.send("probe")
            probe = proc.expect("probed", 120)
            probe["gpu_used_gib_before"] = used / 1024
            # would the above-share request have fitted in the GPU's free memory?
            probe["headroom_gib"] = (total_mib - used) / 1024 - probe["above"]["request_gib"]
            probes.append(probe)
            # the other processes are alive and did GPU work during the probe
            for other, neighbour in enumerate(procs):
                neighbour.send("report")
                now = neighbour.expect("report", 60)["iterations"]
                if other != rank:
                    neighbours_ok.append(neighbour.alive() and now > last[other])
                last[other] = now
            print(
                f"  process {rank}: below {'OK' if probe['below']['ok'] else 'FAILED'}, "
                f"above {'allowed' if probe['above']['ok'] else probe['above']['error']}",
                flush=True,
            )
        result["probes"] = probes
        result["neighbours_alive_and_working"] = neighbours_ok
        for proc in procs:
            proc.send("exit")
        result["done"] = [p.expect("done", 120) for p in procs]
        result["exit_codes"] = [p.popen.wait(timeout=60) for p in procs]
    except Exception as error:
        result["error"] = f"{type(error).__name__}: {error}"
        print(f"  scenario failed: {result['error']}", flush=True)
    finally:
        for proc in procs:
            if proc.alive():
                proc.popen.kill()
                proc.popen.wait()
    result["seconds"] = time.perf_counter() - started
    return result


def startup_overhead(startup: Path, fraction: float, runs: int = 25) -> dict:
    """Median wall time of `python -c pass` without and with the start-up folder."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # with the bytecode cache that a read-only ConfigMap would not allow
    guarded = {
        **env,
        "PYTHONPATH": str(startup),
        "GPUSHARE_MEMORY_FRACTION": f"{fraction:g}",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    times: dict[str, list[float]] = {"plain": [], "guarded": []}
    for _ in range(runs):
        for label, environ in (("plain", env), ("guarded", guarded)):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], env=environ, check=True)
            times[label].append((time.perf_counter() - started) * 1000)
    return {label: statistics.median(values) for label, values in times.items()}


def real_torch_checks(startup: Path, fraction: float, memory_mib: int, replicas: int) -> dict:
    """The guard with the real torch, one process each: what the stand-ins in the tests assume."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUSHARE_", "PYTORCH_"))}
    env.update(spawner_env(fraction, replicas, startup, memory_mib))
    code = (
        "import json, torch\n"
        "after_import = torch.cuda.is_initialized()\n"
        "x = torch.zeros(1, device='cuda')\n"
        "print(json.dumps({'initialized_after_import': after_import,"
        " 'fraction_after_first_use': torch.cuda.get_per_process_memory_fraction()}))\n"
    )
    checks = {}
    for label, extra in (
        ("native", {"PYTORCH_CUDA_ALLOC_CONF": "backend:native"}),
        ("cudaMallocAsync", {"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}),
        ("spawner default", {}),
    ):
        run = subprocess.run(
            [sys.executable, "-c", code],
            env={**env, **extra},
            capture_output=True,
            text=True,
            check=False,
        )
        lines = run.stdout.strip().splitlines()
        checks[label] = {
            "exit_code": run.returncode,
            "result": json.loads(lines[-1]) if run.returncode == 0 and lines else None,
            "guard_warnings": [x for x in run.stderr.splitlines() if "gpushare guard" in x],
        }
    return checks


def device_info() -> dict:
    out = subprocess.run(
        [
            "nvidia-smi",
            "--query-gpu=name,memory.total,driver_version,compute_mode",
            "--format=csv,noheader",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    versions = {}
    for module in ("torch", "jax", "cupy"):
        probe = subprocess.run(
            [sys.executable, "-c", f"import {module}; print({module}.__version__)"],
            capture_output=True,
            text=True,
            check=False,
        )
        versions[module] = probe.stdout.strip() or None
    return {"nvidia_smi": out, "python": sys.version.split()[0], **versions}


def total_memory_bytes() -> int:
    # cudaMemGetInfo's total, which the frameworks multiply their fraction by;
    # measured in a child so that this process holds no CUDA context
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.mem_get_info()[1])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(probe.stdout.strip())


def figures_of(result: dict, procs: int) -> list[dict]:
    name = result["name"]
    if "probes" not in result:
        return [{"name": f"{name}: completed", "value": 0, "unit": "bool"}]
    probes = result["probes"]
    done = result.get("done", [])
    figures = [
        {
            "name": f"{name}: below-share allocations that succeeded",
            "value": sum(p["below"]["ok"] for p in probes),
            "unit": f"of {procs}",
        },
        {
            "name": f"{name}: above-share allocations refused with the framework's OOM",
            "value": sum((not p["above"]["ok"]) and p["above"].get("oom", False) for p in probes),
            "unit": f"of {procs}",
        },
        {
            "name": f"{name}: neighbour checks alive and working during probes",
            "value": sum(result["neighbours_alive_and_working"]),
            "unit": f"of {len(result['neighbours_alive_and_working'])}",
        },
        {
            "name": f"{name}: processes whose held memory was intact at the end",
            "value": sum(d["intact"] for d in done),
            "unit": f"of {procs}",
        },
        {
            "name": f"{name}: GPU memory used while all hold share - 3 GiB",
            "value": round(result["gpu_used_gib_holding"], 2),
            "unit": "GiB",
        },
        {
            "name": f"{name}: largest GPU memory used before an above-share probe",
            "value": round(max(p["gpu_used_gib_before"] for p in probes), 2),
            "unit": "GiB",
        },
        {
            "name": f"{name}: smallest free GPU memory left after the above-share request",
            "value": round(min(p["headroom_gib"] for p in probes), 2),
            "unit": "GiB",
        },
    ]
    caps = [r["cap"] for r in result["ready"]]
    if "bytes_limit" in caps[0]:
        figures.append(
            {
                "name": f"{name}: XLA bytes_limit (min over processes)",
                "value": round(min(c["bytes_limit"] for c in caps) / GiB, 3),
                "unit": "GiB",
            }
        )
    if "limit_bytes" in caps[0]:
        figures.append(
            {
                "name": f"{name}: CuPy pool limit",
                "value": round(caps[0]["limit_bytes"] / GiB, 3),
                "unit": "GiB",
            }
        )
    if "fraction_reported" in caps[0]:
        figures.append(
            {
                "name": f"{name}: torch.cuda.get_per_process_memory_fraction()",
                "value": caps[0]["fraction_reported"],
                "unit": "fraction",
            }
        )
    return figures


def table(results: list[dict], procs: int) -> str:
    header = (
        f"{'scenario':44} {'below share':>11} {'above share':>22} "
        f"{'neighbours':>10} {'intact':>6} {'held GiB':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        if "probes" not in r:
            lines.append(f"{r['name']:44} {r.get('error', r.get('skipped', 'failed'))}")
            continue
        below = sum(p["below"]["ok"] for p in r["probes"])
        errors = {p["above"].get("error", "allowed") for p in r["probes"]}
        refused = sum(not p["above"]["ok"] for p in r["probes"])
        above = f"{refused}/{procs} {'/'.join(sorted(errors))}"
        alive = r["neighbours_alive_and_working"]
        lines.append(
            f"{r['name']:44} {f'{below}/{procs} OK':>11} {above[:22]:>22} "
            f"{f'{sum(alive)}/{len(alive)}':>10} {sum(d['intact'] for d in r.get('done', [])):>6} "
            f"{min(x['held_gib'] for x in r['ready']):>8.2f}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument(
        "--fraction", type=float, help="instead of the spawner's (one slice of --procs)"
    )
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--only", nargs="*", help="scenario names (substrings) to run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args.worker)

    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_common

    startup = gpu_common.startup_folder()
    info = device_info()
    args.memory_mib = gpu_common.gpu_info()["memory_mib"]
    if args.fraction is None:
        args.fraction = gpu_common.share_for(args.procs, args.memory_mib, startup).fraction
    total = total_memory_bytes()
    print(f"device: {info}\ntotal (cudaMemGetInfo): {total / GiB:.2f} GiB", flush=True)
    overhead = startup_overhead(startup, args.fraction)
    torch_checks = (
        real_torch_checks(startup, args.fraction, args.memory_mib, args.procs)
        if info.get("torch")
        else {}
    )
    print(f"guard with the real torch: {json.dumps(torch_checks)}", flush=True)
    results = []
    for name, framework, extra in SCENARIOS:
        if args.only and not any(part in name for part in args.only):
            continue
        if not info.get(framework):
            results.append({"name": name, "framework": framework, "skipped": "not installed"})
            continue
        results.append(run_scenario(name, framework, extra, args, startup, total))

    figures = [
        {
            "name": "share (fraction x cudaMemGetInfo total)",
            "value": round(args.fraction * total / GiB, 3),
            "unit": "GiB",
        },
        {
            "name": "python -c pass, median, plain",
            "value": round(overhead["plain"], 2),
            "unit": "ms",
        },
        {
            "name": "python -c pass, median, with start-up folder and fraction",
            "value": round(overhead["guarded"], 2),
            "unit": "ms",
        },
    ]
    for result in results:
        try:
            figures.extend(figures_of(result, args.procs))
        except (KeyError, ValueError, IndexError) as error:
            figures.append({"name": f"{result['name']}: figures", "value": str(error), "unit": ""})
    try:
        summary = table(results, args.procs)
    except (KeyError, ValueError, IndexError) as error:
        summary = f"(table failed: {error!r}; see the JSON)"
    text = (
        f"GPU memory caps: {args.procs} concurrent processes, fraction {args.fraction}, "
        f"share {args.fraction * total / GiB:.2f} GiB of {total / GiB:.2f} GiB\n"
        f"each holds share - {HOLD_BELOW_SHARE / GiB:g} GiB, then asks for share -/+ "
        f"{PROBE_MARGIN / GiB:g} GiB in one allocation while the others keep working\n"
        f"device: {info['nvidia_smi']}; torch {info['torch']}, jax {info['jax']}, "
        f"cupy {info['cupy']}\n\n"
        + summary
        + f"\n\ninterpreter start-up, median of 25: {overhead['plain']:.1f} ms plain, "
        f"{overhead['guarded']:.1f} ms with the start-up folder and a fraction\n"
    )
    for label, check in torch_checks.items():
        text += (
            f"real torch, alloc backend {label}: exit {check['exit_code']}, {check['result']}, "
            f"guard warnings {check['guard_warnings']}\n"
        )
    print("\n" + text)
    payload = {
        "benchmark": "gpu_memory_caps",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": info,
        "total_bytes": total,
        "fraction": args.fraction,
        "processes": args.procs,
        "figures": figures,
        "real_torch_checks": torch_checks,
        "scenarios": results,
    }
    (args.out / "gpu_memory_caps.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / "gpu_memory_caps.txt").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
