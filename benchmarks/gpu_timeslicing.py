#!/usr/bin/env python3
"""What one time-sliced GPU gives each of N users, and what a notebook cell waits.

For N = 1, 2, 4, 8 separate processes (separate CUDA contexts, as N user pods
on one time-sliced GPU would be) this measures:

* throughput: N processes run bf16 8192^3 GEMM loops for a fixed time, started
  together; per-process and aggregate TFLOP/s against one process alone;
* latency: N-1 such busy processes plus one "interactive" process that every
  10 ms runs a 1024^3 bf16 GEMM and synchronises, as a notebook cell would;
  p50/p99/max of that call's wall time.

Every process runs as a user's server would, with the environment and the
guard's start-up folder that GPUShareSpawner builds for one slice of a GPU
shared 8 ways (``gpu_common.py``; the notice switched off, it would only add a
line per process).

    python3 benchmarks/gpu_timeslicing.py --out benchmarks/results
    python3 benchmarks/gpu_timeslicing.py --plot-only benchmarks/results/gpu_timeslicing.json

Writes gpu_timeslicing.json (figures as name/value/unit), gpu_timeslicing.txt
and, where matplotlib is installed, gpu_timeslicing.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIG = 8192  # busy GEMM: 2 * 8192^3 = 1.1 TFLOP each
SMALL = 1024  # interactive GEMM
TICK = 0.010  # interactive period, seconds


# --- workers ---------------------------------------------------------------------


def _wait_for_go(ready: Path, go: Path) -> float:
    ready.touch()
    while not go.exists():
        time.sleep(0.001)
    # the parent writes a start time slightly in the future: all start together
    start = float(go.read_text())
    while time.time() < start:
        pass
    return start


def busy_worker(ready: Path, go: Path, seconds: float) -> dict:
    import torch

    a = torch.randn(BIG, BIG, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(BIG, BIG, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(BIG, BIG, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b, out=c)
    torch.cuda.synchronize()
    start = _wait_for_go(ready, go)
    began = time.time()
    count = 0
    # small batches, so that the loop ends close to the deadline even at N=8
    while time.time() < start + seconds:
        for _ in range(2):
            torch.mm(a, b, out=c)
        torch.cuda.synchronize()
        count += 2
    ended = time.time()
    flops = 2 * BIG**3 * count
    return {
        "role": "busy",
        "gemms": count,
        "began": began,
        "ended": ended,
        "tflops": flops / (ended - began) / 1e12,
    }


def interactive_worker(ready: Path, go: Path, seconds: float) -> dict:
    import torch

    x = torch.randn(SMALL, SMALL, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(SMALL, SMALL, device="cuda", dtype=torch.bfloat16)
    z = torch.empty(SMALL, SMALL, device="cuda", dtype=torch.bfloat16)
    for _ in range(20):
        torch.mm(x, y, out=z)
    torch.cuda.synchronize()
    start = _wait_for_go(ready, go)
    latencies = []
    tick = start
    while time.time() < start + seconds:
        t0 = time.perf_counter()
        torch.mm(x, y, out=z)
        torch.cuda.synchronize()
        latencies.append((time.perf_counter() - t0) * 1000)
        tick += TICK
        pause = tick - time.time()
        if pause > 0:
            time.sleep(pause)
    latencies.sort()
    return {
        "role": "interactive",
        "calls": len(latencies),
        "p50_ms": _quantile(latencies, 0.50),
        "p95_ms": _quantile(latencies, 0.95),
        "p99_ms": _quantile(latencies, 0.99),
        "max_ms": latencies[-1],
        "mean_ms": statistics.fmean(latencies),
    }


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- parent ------------------------------------------------------------------------


def run_phase(roles: list[str], seconds: float, env: dict[str, str]) -> dict:
    work = Path(tempfile.mkdtemp(prefix="timeslice-"))
    go = work / "go"
    procs = []
    for rank, role in enumerate(roles):
        argv = [sys.executable, __file__, "--worker", role, "--seconds", str(seconds)]
        argv += ["--ready", str(work / f"ready-{rank}"), "--go", str(go)]
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True))
    try:
        deadline = time.time() + 180
        while not all((work / f"ready-{rank}").exists() for rank in range(len(roles))):
            if time.time() > deadline or any(p.poll() not in (None, 0) for p in procs):
                raise RuntimeError(f"workers did not get ready: {[p.poll() for p in procs]}")
            time.sleep(0.01)
        go.write_text(str(time.time() + 0.3))
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=seconds + 120)
            if p.returncode != 0:
                raise RuntimeError(f"worker failed with {p.returncode}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    busy = [r for r in results if r["role"] == "busy"]
    phase: dict = {"roles": roles, "results": results}
    if busy:
        phase["per_process_tflops"] = [r["tflops"] for r in busy]
        phase["aggregate_tflops"] = sum(r["tflops"] for r in busy)
        phase["start_skew_ms"] = (
            max(r["began"] for r in busy) - min(r["began"] for r in busy)
        ) * 1000
    interactive = [r for r in results if r["role"] == "interactive"]
    if interactive:
        phase["interactive"] = interactive[0]
    return phase


def measure(n: int, seconds: float, env: dict[str, str], data: dict) -> None:
    phase = run_phase(["busy"] * n, seconds, env)
    data["throughput"][str(n)] = phase
    print(
        f"N={n}: per-process {[round(t, 1) for t in phase['per_process_tflops']]} "
        f"aggregate {phase['aggregate_tflops']:.1f} TFLOP/s, "
        f"start skew {phase['start_skew_ms']:.1f} ms",
        flush=True,
    )
    phase = run_phase(["busy"] * (n - 1) + ["interactive"], seconds, env)
    data["latency"][str(n)] = phase
    lat = phase["interactive"]
    print(
        f"N={n}: interactive beside {n - 1} busy: p50 {lat['p50_ms']:.2f} "
        f"p99 {lat['p99_ms']:.2f} max {lat['max_ms']:.2f} ms ({lat['calls']} calls)",
        flush=True,
    )


def figures(data: dict) -> list[dict]:
    alone = data["throughput"]["1"]["aggregate_tflops"]
    out = [
        {"name": "1 process alone, bf16 8192^3 GEMM", "value": round(alone, 1), "unit": "TFLOP/s"}
    ]
    for n, phase in data["throughput"].items():
        per = phase["per_process_tflops"]
        out += [
            {
                "name": f"{n} busy: mean per-process",
                "value": round(statistics.fmean(per), 1),
                "unit": "TFLOP/s",
            },
            {"name": f"{n} busy: min per-process", "value": round(min(per), 1), "unit": "TFLOP/s"},
            {"name": f"{n} busy: max per-process", "value": round(max(per), 1), "unit": "TFLOP/s"},
            {
                "name": f"{n} busy: aggregate",
                "value": round(phase["aggregate_tflops"], 1),
                "unit": "TFLOP/s",
            },
            {
                "name": f"{n} busy: aggregate vs 1 alone",
                "value": round(phase["aggregate_tflops"] / alone, 3),
                "unit": "ratio",
            },
            {
                "name": f"{n} busy: mean per-process vs 1 alone",
                "value": round(statistics.fmean(per) / alone, 3),
                "unit": "ratio",
            },
        ]
    for n, phase in data["latency"].items():
        lat = phase["interactive"]
        label = f"interactive {SMALL}^3 GEMM+sync beside {int(n) - 1} busy"
        out += [
            {"name": f"{label}: p50", "value": round(lat["p50_ms"], 3), "unit": "ms"},
            {"name": f"{label}: p99", "value": round(lat["p99_ms"], 3), "unit": "ms"},
            {"name": f"{label}: max", "value": round(lat["max_ms"], 3), "unit": "ms"},
            {"name": f"{label}: calls", "value": lat["calls"], "unit": "count"},
        ]
        if "aggregate_tflops" in phase:
            out.append(
                {
                    "name": f"{label}: busy neighbours' mean TFLOP/s",
                    "value": round(statistics.fmean(phase["per_process_tflops"]), 1),
                    "unit": "TFLOP/s",
                }
            )
    return out


def table(data: dict) -> str:
    alone = data["throughput"]["1"]["aggregate_tflops"]
    lines = [
        f"{'N':>2} {'per-process TFLOP/s (min-max)':>30} {'aggregate':>10} {'vs alone':>9}"
        f"   {'interactive p50 / p99 / max ms':>32} {'beside':>8}",
    ]
    lines.append("-" * len(lines[0]))
    for n in data["throughput"]:
        phase = data["throughput"][n]
        per = phase["per_process_tflops"]
        lat = data["latency"][n]["interactive"]
        spread = f"{statistics.fmean(per):.1f} ({min(per):.1f}-{max(per):.1f})"
        latency = f"{lat['p50_ms']:.2f} / {lat['p99_ms']:.2f} / {lat['max_ms']:.2f}"
        beside = f"{int(n) - 1} busy"
        lines.append(
            f"{n:>2} {spread:>30} {phase['aggregate_tflops']:>10.1f} "
            f"{phase['aggregate_tflops'] / alone:>8.1%}   {latency:>32} {beside:>8}"
        )
    return "\n".join(lines)


def plot(data: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ns = [int(n) for n in data["throughput"]]
    alone = data["throughput"]["1"]["aggregate_tflops"]
    per = [statistics.fmean(data["throughput"][str(n)]["per_process_tflops"]) for n in ns]
    agg = [data["throughput"][str(n)]["aggregate_tflops"] for n in ns]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(ns, agg, "o-", label="aggregate")
    left.plot(ns, per, "s-", label="per process (mean)")
    left.plot(ns, [alone / n for n in ns], "k:", label="1 alone / N (fair share)")
    left.set_xscale("log", base=2)
    left.set_xticks(ns, [str(n) for n in ns])
    left.set_xlabel("processes sharing the GPU (time-sliced)")
    left.set_ylabel("bf16 GEMM TFLOP/s")
    left.set_ylim(0, alone * 1.1)
    left.legend()
    left.set_title(f"throughput, {BIG}³ bf16 GEMM loops")
    lat = [data["latency"][str(n)]["interactive"] for n in ns]
    busy = [n - 1 for n in ns]
    for key, style in (("p50_ms", "o-"), ("p99_ms", "s-"), ("max_ms", "^:")):
        right.plot(busy, [x[key] for x in lat], style, label=key.split("_")[0])
    right.set_xlabel("busy neighbours")
    right.set_ylabel("ms")
    right.set_yscale("log")
    right.set_xticks(busy)
    right.legend()
    right.set_title(f"interactive {SMALL}³ GEMM + sync every 10 ms")
    fig.suptitle(data["device"].get("nvidia_smi", ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--plot-only", type=Path, help="redraw the PNG from a JSON result")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--ready", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--go", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run = busy_worker if args.worker == "busy" else interactive_worker
        print(json.dumps(run(args.ready, args.go, args.seconds)), flush=True)
        return 0
    if args.plot_only:
        data = json.loads(args.plot_only.read_text())
        target = args.plot_only.with_suffix(".png")
        print(f"wrote {target}" if plot(data, target) else "matplotlib is not installed")
        return 0

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_common

    # every process as a user's server with one slice of a GPU shared max(N) ways
    startup = gpu_common.startup_folder()
    memory_mib = gpu_common.gpu_info()["memory_mib"]
    share = gpu_common.share_for(max(args.n), memory_mib, startup, notice=False)
    env = gpu_common.process_environment(gpu_common.pod_environment(share))
    smi = subprocess.run(
        [
            "nvidia-smi",
            "--query-gpu=name,memory.total,driver_version,compute_mode",
            "--format=csv,noheader",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    torch_version = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    data: dict = {
        "benchmark": "gpu_timeslicing",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": {"nvidia_smi": smi, "torch": torch_version},
        "seconds": args.seconds,
        "throughput": {},
        "latency": {},
    }
    print(f"device: {smi}; torch {torch_version}", flush=True)
    for n in args.n:
        try:
            measure(n, args.seconds, env, data)
        except Exception as error:
            # keep what was measured so far; the table covers the complete N only
            data.setdefault("errors", {})[str(n)] = f"{type(error).__name__}: {error}"
            print(f"N={n} failed: {error}", flush=True)
            data["throughput"].pop(str(n), None)
            data["latency"].pop(str(n), None)
    if "1" not in data["throughput"]:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_timeslicing.json").write_text(json.dumps(data, indent=2) + "\n")
        return 1
    data["figures"] = figures(data)
    text = (
        f"GPU time-slicing: N processes (separate CUDA contexts), {args.seconds:g} s each phase\n"
        f"busy: bf16 {BIG}^3 GEMM loops; interactive: bf16 {SMALL}^3 GEMM + sync every "
        f"{TICK * 1000:g} ms beside N-1 busy\n"
        f"device: {smi}; torch {torch_version}\n\n" + table(data) + "\n"
    )
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_timeslicing.json").write_text(json.dumps(data, indent=2) + "\n")
    (args.out / "gpu_timeslicing.txt").write_text(text)
    try:
        if plot(data, args.out / "gpu_timeslicing.png"):
            print(f"wrote {args.out / 'gpu_timeslicing.png'}")
    except Exception as error:  # the numbers are written; the picture can be redrawn
        print(f"plot failed ({error}); redraw with --plot-only", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
