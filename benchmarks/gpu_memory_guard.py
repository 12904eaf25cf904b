#!/usr/bin/env python3
"""What holds a user to their memory share on a time-sliced GPU, and what the user is told.

Every process runs with exactly the environment and start-up folder that
GPUShareSpawner builds for one slice of a GPU shared 4 ways (built here with
``jupyterhub_gpushare.objects``; the GPU's size comes from nvidia-smi, as GPU
feature discovery's label would). Three parts:

* **routes**: one process per way of getting more than the share (unset the
  fraction variable, ``python -E``/``-I``, remove the guard's hook, raise the
  fraction, other allocator backends, CuPy's limit, raw CUDA, JAX's own
  settings...). Each asks for one allocation of (GPU memory / 4) + 1 GiB, above
  the share and above what MPS would allow one of 4 clients: refused means the
  route is closed.
* **notice**: four processes at once (PyTorch, PyTorch, JAX, CuPy), each uses the
  GPU, then asks for more than its share and does not catch the error; plus one
  with the notice switched off. Their stderr shows the notice and the hint.
* **allocator**: PyTorch allocator options against a fragmenting workload
  (random sizes, random frees, 10 seeds each) until the first out-of-memory
  error: how much of the share was in use, and whether the cap held.

    python3 benchmarks/gpu_memory_guard.py --out benchmarks/results

Writes gpu_memory_guard.json (figures as name/value/unit) and gpu_memory_guard.txt.
``gpu_mps.py`` runs the same routes under MPS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GiB = 1 << 30
MiB = 1 << 20
REPLICAS = 4

# name -> (framework, what the user does, interpreter flags, spawner variant, extra env)
# The spawner variants: "spawner" (its defaults), "allocator-fraction" (with
# pytorch_allocator_fraction = True), "no-guard-key-async" (memory_guard off,
# the allocator key and the async backend: the combination the spawner refuses).
ROUTES: dict[str, tuple[str, str, tuple[str, ...], str, dict[str, str | None]]] = {
    "pytorch: nothing (the share)": ("torch", "none", (), "spawner", {}),
    "pytorch: unset GPUSHARE_MEMORY_FRACTION before import torch": (
        "torch",
        "unset-fraction",
        (),
        "spawner",
        {},
    ),
    "pytorch: python -E": ("torch", "none", ("-E",), "spawner", {}),
    "pytorch: python -I": ("torch", "none", ("-I",), "spawner", {}),
    "pytorch: python -I, jupyterhub-gpushare installed in the image": (
        "torch",
        "none",
        ("-I",),
        "spawner",
        {"BENCH_PYTHON": "image-venv"},
    ),
    "pytorch: remove the guard's import hook": ("torch", "remove-hook", (), "spawner", {}),
    "pytorch: set_per_process_memory_fraction(1.0)": (
        "torch",
        "raise-fraction",
        (),
        "spawner",
        {},
    ),
    "pytorch: PYTORCH_ALLOC_CONF=per_process_memory_fraction:1.0 of its own": (
        "torch",
        "own-alloc-conf-fraction",
        (),
        "spawner",
        {},
    ),
    "pytorch: adds backend:cudaMallocAsync": ("torch", "async-backend", (), "spawner", {}),
    "pytorch: adds backend:cudaMallocAsync, pytorch_allocator_fraction on": (
        "torch",
        "async-backend",
        (),
        "allocator-fraction",
        {},
    ),
    "pytorch: backend:cudaMallocAsync + allocator key, no guard (spawner refuses)": (
        "torch",
        "none",
        (),
        "no-guard-key-async",
        {},
    ),
    "cupy: nothing (the share)": ("cupy", "none", (), "spawner", {}),
    "cupy: pool.set_limit(size=0)": ("cupy", "cupy-set-limit", (), "spawner", {}),
    "cupy: raw cudaMalloc, no pool (raw CUDA, Numba, RAPIDS)": (
        "cupy",
        "raw-malloc",
        (),
        "spawner",
        {},
    ),
    "jax: nothing (the share)": ("jax", "none", (), "spawner", {}),
    "jax: XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 before first use": (
        "jax",
        "jax-fraction",
        (),
        "spawner",
        {},
    ),
    "jax: XLA_PYTHON_CLIENT_ALLOCATOR=platform": (
        "jax",
        "jax-platform",
        (),
        "spawner",
        {},
    ),
}

NOTICE_PREFIX = "gpushare: this GPU is shared"
HINT_MARKERS = (
    "ran out of memory at",
    "ran out of GPU memory;",
    "the GPU itself ran out",
    "reached the memory limit",
)


# --- workers: what runs in the user's process ------------------------------------------


def _say(**message) -> None:
    print(json.dumps(message), flush=True)


def _guard_applied() -> dict | None:
    state = sys.modules.get("_gpushare_guard_state")
    return dict(state.applied) if state is not None else None


def route_worker(framework: str, action: str, target: int) -> int:
    """Do what the route says, then ask for ``target`` bytes in one allocation."""
    if action == "unset-fraction":
        os.environ.pop("GPUSHARE_MEMORY_FRACTION", None)
    elif action == "remove-hook":
        sys.meta_path[:] = [f for f in sys.meta_path if "Guard" not in type(f).__name__]
    elif action == "own-alloc-conf-fraction":
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "per_process_memory_fraction:1.0"
    elif action == "async-backend":
        conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(
            filter(None, [conf, "backend:cudaMallocAsync"])
        )
    elif action == "jax-fraction":
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.9"
    elif action == "jax-platform":
        os.environ["XLA_PYTHON_CLIENT_ALLOCATOR"] = "platform"
    result: dict = {"framework": framework, "action": action, "target_bytes": target}
    try:
        allocate = _prepare(framework, action, result)
    except Exception as error:
        result.update(prepared=False, error=type(error).__name__, message=str(error)[:400])
        result["guard_applied"] = _guard_applied()
        _say(**result)
        return 0
    started = time.perf_counter()
    try:
        block = allocate(target)
        result["allocated"] = True
        del block
    except Exception as error:
        result["allocated"] = False
        result["error"] = type(error).__name__
        result["message"] = " ".join(str(error).split())[:600]
    result["seconds"] = time.perf_counter() - started
    result["guard_applied"] = _guard_applied()
    _say(**result)
    return 0


def _prepare(framework: str, action: str, result: dict):
    """Import the framework, use the GPU once, apply post-start actions; the allocator."""
    if framework == "torch":
        import torch

        result["cuda_initialized_after_import"] = torch.cuda.is_initialized()
        torch.zeros(1, device="cuda")
        free, total = torch.cuda.mem_get_info()
        result["mem_get_info"] = [free, total]
        if action == "raise-fraction":
            torch.cuda.set_per_process_memory_fraction(1.0)
        result["fraction_reported"] = torch.cuda.get_per_process_memory_fraction()
        result["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")

        def allocate(n):
            block = torch.empty(n, dtype=torch.uint8, device="cuda")
            torch.cuda.synchronize()
            return block

        return allocate
    if framework == "cupy":
        import cupy

        cupy.zeros(1)
        pool = cupy.get_default_memory_pool()
        result["pool_limit"] = pool.get_limit()
        result["mem_get_info"] = list(cupy.cuda.runtime.memGetInfo())
        if action == "cupy-set-limit":
            pool.set_limit(size=0)
        if action == "raw-malloc":

            def allocate(n):
                pointer = cupy.cuda.runtime.malloc(n)
                cupy.cuda.runtime.free(pointer)
                return pointer

            return allocate

        def allocate(n):
            block = cupy.empty(n, dtype=cupy.uint8)
            cupy.cuda.Device().synchronize()
            return block

        return allocate
    import jax
    import jax.numpy as jnp

    jnp.zeros(1).block_until_ready()
    stats = jax.devices("gpu")[0].memory_stats() or {}
    result["bytes_limit"] = stats.get("bytes_limit")

    def allocate(n):
        return jnp.zeros((max(1, n // MiB), MiB), jnp.uint8).block_until_ready()

    return allocate


def notice_worker(framework: str, target: int) -> int:
    """Use the GPU, then ask for too much and let the error reach the user.

    ``torch-raised`` first lifts PyTorch's own fraction (under MPS the driver's
    limit then answers)."""
    if framework in ("torch", "torch-raised"):
        import torch

        keep = torch.ones(256 * MiB, dtype=torch.uint8, device="cuda")
        if framework == "torch-raised":
            torch.cuda.set_per_process_memory_fraction(1.0)
        big = torch.empty(target, dtype=torch.uint8, device="cuda")
    elif framework == "cupy":
        import cupy

        keep = cupy.ones(256 * MiB, dtype=cupy.uint8)
        big = cupy.empty(target, dtype=cupy.uint8)
    else:
        import jax.numpy as jnp

        keep = jnp.ones((256, MiB), jnp.uint8).block_until_ready()
        big = jnp.zeros((target // MiB, MiB), jnp.uint8).block_until_ready()
    print("not refused", keep.shape, big.shape, flush=True)
    return 0


def _frag_sizes(rng: random.Random) -> int:
    """A request size: mostly tens to hundreds of MiB, sometimes a few GiB, not aligned."""
    base = rng.choice([16, 24, 48, 64, 96, 160, 256, 384, 640, 1024, 1536, 2560])
    return int(base * MiB * rng.uniform(0.8, 1.2)) + rng.randrange(0, 4096)


def alloc_worker(seeds: int) -> int:
    """Random allocations and frees until the first out-of-memory error, per seed."""
    import torch

    torch.zeros(1, device="cuda")
    # the cap as the allocator applies it: the fraction of cudaMemGetInfo's total
    share = int(torch.cuda.get_per_process_memory_fraction() * torch.cuda.mem_get_info()[1])
    runs = []
    settings = {}
    try:
        settings = dict(torch.cuda.memory._snapshot().get("allocator_settings") or {})
    except Exception:
        pass
    for seed in range(seeds):
        rng = random.Random(seed)
        torch.cuda.reset_peak_memory_stats()
        live: list = []
        steps = 0
        refused = None
        started = time.perf_counter()
        while steps < 20000:
            steps += 1
            size = _frag_sizes(rng)
            try:
                live.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
            except torch.OutOfMemoryError:
                refused = size
                break
            if live and rng.random() < 0.45:
                live.pop(rng.randrange(len(live)))
        in_use = torch.cuda.memory_allocated()
        run = {
            "seed": seed,
            "steps": steps,
            "refused_request_bytes": refused,
            "allocated_at_refusal": in_use,
            "reserved_at_refusal": torch.cuda.memory_reserved(),
            "max_reserved": torch.cuda.max_memory_reserved(),
            "seconds": time.perf_counter() - started,
        }
        expandable = None
        try:
            segments = torch.cuda.memory._snapshot()["segments"]
            expandable = any(s.get("is_expandable") for s in segments)
        except Exception:
            pass
        run["expandable_segments_seen"] = expandable
        live.clear()
        torch.cuda.empty_cache()
        # the cap still refuses one allocation above the share
        try:
            over = torch.empty(share + GiB, dtype=torch.uint8, device="cuda")
            del over
            run["over_share_refused"] = False
        except torch.OutOfMemoryError:
            run["over_share_refused"] = True
        torch.cuda.empty_cache()
        runs.append(run)
    _say(
        runs=runs,
        share_bytes=share,
        allocator_settings=settings,
        alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    )
    return 0


def late_conf_worker() -> int:
    """Does torch read PYTORCH_CUDA_ALLOC_CONF at CUDA start (where the guard edits it)?"""
    import torch

    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    x = torch.ones(64 * MiB, dtype=torch.uint8, device="cuda")
    segments = torch.cuda.memory._snapshot()["segments"]
    _say(
        expandable_after_late_setting=any(s.get("is_expandable") for s in segments),
        cuda_initialized_after_import=None,
        size=int(x.numel()),
    )
    return 0


# --- parent ---------------------------------------------------------------------------


def variant_env(
    common, variant: str, startup: Path, memory_mib: int, sharing: str = "time-slicing"
) -> dict[str, str]:
    if variant == "spawner":
        share = common.share_for(REPLICAS, memory_mib, startup, sharing=sharing)
    elif variant == "allocator-fraction":
        share = common.share_for(
            REPLICAS, memory_mib, startup, allocator_fraction=True, sharing=sharing
        )
    elif variant == "no-guard-key-async":
        # built by hand: GPUShareSpawner refuses this configuration
        base = common.share_for(REPLICAS, memory_mib, None, sharing=sharing)
        share = dataclasses.replace(
            base,
            alloc_conf=f"backend:cudaMallocAsync,per_process_memory_fraction:{base.fraction:g}",
        )
    else:
        raise ValueError(variant)
    return common.pod_environment(share)


def image_venv(work: Path) -> Path | None:
    """An interpreter as in an image that pip-installed jupyterhub-gpushare: a virtual
    environment with the wheel from wheels/ beside this script unpacked into its
    site-packages (its .pth file included), and this machine's packages on its path."""
    import sysconfig
    import zipfile

    wheels = sorted((HERE / "wheels").glob("jupyterhub_gpushare-*.whl"))
    if not wheels:
        return None
    venv = work / "image-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with zipfile.ZipFile(wheels[-1]) as wheel:
        wheel.extractall(site)
    # torch, jax, cupy: where this interpreter finds them
    Path(site, "zz-machine-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def run_routes(
    common,
    startup: Path,
    memory_mib: int,
    *,
    routes: dict | None = None,
    extra_env: dict | None = None,
    names: list[str] | None = None,
    work: Path | None = None,
    sharing: str = "time-slicing",
) -> list[dict]:
    """Every route, one process each; ``extra_env`` (MPS) goes into every process."""
    total = memory_mib * MiB
    target = total // REPLICAS + GiB
    results = []
    venv_python = None
    for name, (framework, action, flags, variant, extra) in (routes or ROUTES).items():
        if names and not any(part in name for part in names):
            continue
        own = {k: v for k, v in extra.items() if k != "BENCH_PYTHON"}
        env = common.process_environment(
            variant_env(common, variant, startup, memory_mib, sharing),
            **{**(extra_env or {}), **own},
        )
        python = sys.executable
        if extra.get("BENCH_PYTHON") == "image-venv":
            if venv_python is None and work is not None:
                try:
                    venv_python = image_venv(work) or False
                except (OSError, subprocess.CalledProcessError, ValueError) as error:
                    print(f"  image venv failed: {error}", flush=True)
                    venv_python = False
            if not venv_python:
                results.append({"route": name, "skipped": "no wheel of jupyterhub-gpushare"})
                continue
            python = str(venv_python)
        argv = [
            python,
            *flags,
            str(Path(__file__).resolve()),
            "--route",
            framework,
            action,
            str(target),
        ]
        started = time.perf_counter()
        result = common.run_json(argv, env, timeout=240, cwd=work)
        result.update(
            route=name,
            flags=list(flags),
            variant=variant,
            wall_seconds=time.perf_counter() - started,
        )
        result["notice_lines"] = [
            line
            for line in result.get("stderr_tail", "").splitlines()
            if line.startswith(NOTICE_PREFIX)
        ]
        results.append(result)
        state = (
            "escaped: allocated" if result.get("allocated") else f"refused: {result.get('error')}"
        )
        print(f"  {name}: {state}", flush=True)
    return results


def run_notice(
    common,
    startup: Path,
    memory_mib: int,
    extra_env: dict | None = None,
    sharing: str = "time-slicing",
    frameworks: tuple[str, ...] = ("torch", "torch", "jax", "cupy"),
) -> list[dict]:
    """Four processes at once, each overrunning its share; one more with notices off."""
    total = memory_mib * MiB
    share = common.share_for(REPLICAS, memory_mib, startup, sharing=sharing)
    target = int(share.fraction * total) + 2 * GiB
    on = common.process_environment(common.pod_environment(share), **(extra_env or {}))
    quiet = common.share_for(REPLICAS, memory_mib, startup, notice=False, sharing=sharing)
    off = common.process_environment(common.pod_environment(quiet), **(extra_env or {}))
    plan = [(framework, on) for framework in frameworks]
    procs = []
    for framework, env in plan:
        argv = [sys.executable, str(Path(__file__).resolve()), "--notice", framework, str(target)]
        procs.append(
            (
                framework,
                True,
                subprocess.Popen(
                    argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                ),
            )
        )
    results = []
    for framework, notices, proc in procs:
        out, err = proc.communicate(timeout=240)
        results.append(_notice_result(framework, notices, proc.returncode, out, err, True))
    argv = [sys.executable, str(Path(__file__).resolve()), "--notice", "torch", str(target)]
    run = subprocess.run(argv, env=off, capture_output=True, text=True, timeout=240, check=False)
    results.append(_notice_result("torch", False, run.returncode, run.stdout, run.stderr, False))
    for r in results:
        print(
            f"  {r['framework']} notices {'on' if r['notices_on'] else 'off'}: "
            f"exit {r['exit_code']}, notice lines {len(r['notice_lines'])}, "
            f"hint lines {len(r['hint_lines'])}",
            flush=True,
        )
    return results


def _notice_result(framework, notices_on, code, out, err, concurrent) -> dict:
    lines = err.splitlines()
    return {
        "framework": framework,
        "notices_on": notices_on,
        "concurrent": concurrent,
        "exit_code": code,
        "notice_lines": [line for line in lines if line.startswith(NOTICE_PREFIX)],
        "hint_lines": [
            line
            for line in lines
            if line.startswith("gpushare:") and any(m in line for m in HINT_MARKERS)
        ],
        "last_error_line": next(
            (line for line in reversed(lines) if "Error" in line and not line.startswith(" ")),
            None,
        ),
        "stderr_tail": err[-3000:],
        "stdout_tail": out[-500:],
    }


ALLOC_CONFIGS = [
    ("no options (PyTorch's defaults)", ""),
    ("expandable_segments:True (the spawner's default)", "expandable_segments:True"),
    ("garbage_collection_threshold:0.8", "garbage_collection_threshold:0.8"),
]


def run_allocator(common, startup: Path, memory_mib: int, seeds: int) -> list[dict]:
    results = []
    for label, conf in ALLOC_CONFIGS:
        share = common.share_for(REPLICAS, memory_mib, startup, alloc_conf=conf)
        env = common.process_environment(common.pod_environment(share))
        if not conf:
            env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        argv = [sys.executable, str(Path(__file__).resolve()), "--alloc", str(seeds)]
        result = common.run_json(argv, env, timeout=400)
        result.update(label=label, conf=conf)
        share_bytes = result.get("share_bytes") or 1
        results.append(result)
        runs = result.get("runs") or []
        if runs:
            used = [r["allocated_at_refusal"] / share_bytes for r in runs]
            filled = [
                (r["allocated_at_refusal"] + (r["refused_request_bytes"] or 0)) / share_bytes
                for r in runs
            ]
            print(
                f"  {label}: in use at first refusal median {sorted(used)[len(used) // 2]:.3f}"
                f" of the share, with the refused request {sorted(filled)[len(filled) // 2]:.3f}",
                flush=True,
            )
        else:
            print(f"  {label}: failed {result.get('stderr_tail', '')[-300:]}", flush=True)
    return results


def figures(data: dict) -> list[dict]:
    out = [
        {
            "name": "share of one slice (fraction x GPU memory)",
            "value": round(data["share_bytes"] / GiB, 2),
            "unit": "GiB",
        },
        {
            "name": "allocation asked for on every route",
            "value": round(data["target_bytes"] / GiB, 2),
            "unit": "GiB",
        },
    ]
    for r in data.get("routes", []):
        if "skipped" in r:
            continue
        out.append(
            {
                "name": f"route {r['route']}: allocated above the share",
                "value": bool(r.get("allocated")),
                "unit": "bool",
            }
        )
    notices = [r for r in data.get("notice", []) if r["notices_on"]]
    if notices:
        out.append(
            {
                "name": "concurrent processes showing the notice exactly once",
                "value": sum(len(r["notice_lines"]) == 1 for r in notices),
                "unit": f"of {len(notices)}",
            }
        )
        out.append(
            {
                "name": "concurrent processes whose out-of-memory error carried the hint once",
                "value": sum(len(r["hint_lines"]) == 1 for r in notices),
                "unit": f"of {len(notices)}",
            }
        )
    for r in data.get("notice", []):
        if not r["notices_on"]:
            out.append(
                {
                    "name": "notices off: notice and hint lines",
                    "value": len(r["notice_lines"]) + len(r["hint_lines"]),
                    "unit": "lines",
                }
            )
    for r in data.get("allocator", []):
        runs = r.get("runs") or []
        if not runs:
            continue
        share = r["share_bytes"]
        used = sorted(x["allocated_at_refusal"] / share for x in runs)
        out += [
            {
                "name": f"allocator {r['label']}: in use at first refusal, median of {len(runs)}",
                "value": round(used[len(used) // 2], 3),
                "unit": "of the share",
            },
            {
                "name": f"allocator {r['label']}: in use at first refusal, lowest of {len(runs)}",
                "value": round(used[0], 3),
                "unit": "of the share",
            },
            {
                "name": f"allocator {r['label']}: largest reserved / share",
                "value": round(max(x["max_reserved"] for x in runs) / share, 3),
                "unit": "ratio",
            },
            {
                "name": f"allocator {r['label']}: over-share allocation refused afterwards",
                "value": sum(bool(x["over_share_refused"]) for x in runs),
                "unit": f"of {len(runs)}",
            },
        ]
    return out


def table(data: dict) -> str:
    lines = [f"{'route':78} result", "-" * 100]
    for r in data.get("routes", []):
        if "skipped" in r:
            state = f"not run ({r['skipped']})"
        elif r.get("prepared") is False:
            state = f"could not start: {r.get('error')}: {r.get('message', '')[:60]}"
        elif r.get("allocated"):
            state = "ESCAPES: allocated"
        elif "allocated" in r:
            state = f"refused ({r.get('error')})"
        else:
            state = f"failed: exit {r.get('exit_code')} {r.get('error', '')}"
        lines.append(f"{r['route'][:78]:78} {state}")
    if data.get("notice"):
        lines += ["", f"{'process (4 at once, then 1 with notices off)':50} notice  hint  exit"]
        for r in data["notice"]:
            label = f"{r['framework']}, notices {'on' if r['notices_on'] else 'off'}"
            lines.append(
                f"{label:50} {len(r['notice_lines']):>6} {len(r['hint_lines']):>5} "
                f"{r['exit_code']:>5}"
            )
        example = next((r for r in data["notice"] if r["notices_on"] and r["notice_lines"]), None)
        if example:
            lines.append(f"  e.g. {example['notice_lines'][0]}")
        hints = []
        for r in data["notice"]:
            hints += [h for h in r["hint_lines"] if h not in hints]
        lines += [f"  e.g. {hint}" for hint in hints]
    if data.get("allocator"):
        lines += [
            "",
            f"{'PyTorch allocator options':52} {'in use at first refusal':>24} "
            f"{'+ refused request':>18} {'max reserved':>13} {'cap held':>9}",
        ]
        for r in data["allocator"]:
            runs = r.get("runs") or []
            if not runs:
                lines.append(f"{r['label']:52} failed")
                continue
            share = r["share_bytes"]
            used = sorted(x["allocated_at_refusal"] / share for x in runs)
            filled = sorted(
                (x["allocated_at_refusal"] + (x["refused_request_bytes"] or 0)) / share
                for x in runs
            )
            held = sum(bool(x["over_share_refused"]) for x in runs)
            reserved = max(x["max_reserved"] for x in runs) / share
            lines.append(
                f"{r['label'][:52]:52} {used[len(used) // 2]:>10.3f} (min {used[0]:.3f}) "
                f"{filled[len(filled) // 2]:>18.3f} {reserved:>13.3f} {held:>4}/{len(runs)}"
            )
        lines.append(f"  (fractions of the share, median of n = {len(runs)} seeds each)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--parts", nargs="*", default=["routes", "notice", "allocator"])
    parser.add_argument("--only", nargs="*", help="route names (substrings) to run")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--route", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--notice", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--alloc", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--late-conf", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.route:
        return route_worker(args.route[0], args.route[1], int(args.route[2]))
    if args.notice:
        return notice_worker(args.notice[0], int(args.notice[1]))
    if args.alloc:
        return alloc_worker(args.alloc)
    if args.late_conf:
        return late_conf_worker()

    sys.path.insert(0, str(HERE))
    import gpu_common as common

    info = common.gpu_info()
    memory_mib = info["memory_mib"]
    startup = common.startup_folder()
    work = Path(startup).parent / f"gpushare-work-{os.getpid()}"
    work.mkdir(exist_ok=True)
    share = common.share_for(REPLICAS, memory_mib, startup)
    data: dict = {
        "benchmark": "gpu_memory_guard",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": info,
        "replicas": REPLICAS,
        "fraction": share.fraction,
        "share_bytes": int(share.fraction * memory_mib * MiB),
        "target_bytes": memory_mib * MiB // REPLICAS + GiB,
        "spawner_environment": common.pod_environment(share),
    }
    print(
        f"device: {info['nvidia_smi']}; torch {info['torch']}, jax {info['jax']}, "
        f"cupy {info['cupy']}; share {data['share_bytes'] / GiB:.2f} GiB",
        flush=True,
    )
    late = common.run_json(
        [sys.executable, str(Path(__file__).resolve()), "--late-conf"],
        common.process_environment({}),
        timeout=120,
    )
    data["late_alloc_conf_check"] = late
    print(
        f"PYTORCH_CUDA_ALLOC_CONF set after import torch takes effect: "
        f"{late.get('expandable_after_late_setting')}",
        flush=True,
    )
    if "routes" in args.parts:
        print("routes:", flush=True)
        data["routes"] = run_routes(common, startup, memory_mib, names=args.only, work=work)
    if "notice" in args.parts:
        print("notice:", flush=True)
        data["notice"] = run_notice(common, startup, memory_mib)
    if "allocator" in args.parts:
        print("allocator:", flush=True)
        data["allocator"] = run_allocator(common, startup, memory_mib, args.seeds)
    data["figures"] = figures(data)
    text = (
        f"Memory guard on a time-sliced GPU: one slice of {REPLICAS}, fraction {share.fraction:g} "
        f"(share {data['share_bytes'] / GiB:.2f} GiB); every route asks for "
        f"{data['target_bytes'] / GiB:.2f} GiB at once\n"
        f"device: {info['nvidia_smi']}; torch {info['torch']}, jax {info['jax']}, "
        f"cupy {info['cupy']}\n\n" + table(data) + "\n"
    )
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_memory_guard.json").write_text(json.dumps(data, indent=2) + "\n")
    (args.out / "gpu_memory_guard.txt").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
