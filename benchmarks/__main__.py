"""Run the benchmarks: ``python -m benchmarks`` (all of them, ``make bench``) or
``python -m benchmarks <name> [options]`` for one.

Each prints a table and writes benchmarks/results/<name>.json (its figures as
name, value, unit) and <name>.txt (the table). Benchmarks measure and report;
they never fail on a number, only when something breaks.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import traceback
from pathlib import Path

from . import churn, class_day, fairness, handover, queue_updates, readme, scale, spawn_cost
from .common import RESULTS_DIR, log

BENCHMARKS = {
    "handover": handover,
    "scale": scale,
    "queue-updates": queue_updates,
    "spawn-cost": spawn_cost,
    "churn": churn,
    "fairness": fairness,
    "class-day": class_day,
}


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0]
    )
    main.add_argument("--out", type=Path, default=RESULTS_DIR, help="where results are written")
    sub = main.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    sub.add_parser("all", help="every benchmark below with its default sizes")
    sub.add_parser("readme", help="write benchmarks/README.md from the results files")
    for name, module in BENCHMARKS.items():
        doc = module.__doc__.split("\n\n")[0]
        p = sub.add_parser(name, help=doc.split(":")[0], description=doc)
        p.add_argument("--out", type=Path, default=argparse.SUPPRESS, help="where results go")
        module.add_arguments(p)
    return main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.benchmark == "readme":
        return readme.main()
    command = shlex.join(["python", "-m", "benchmarks", *argv])
    if args.benchmark in (None, "all"):
        chosen = list(BENCHMARKS)
    else:
        chosen = [args.benchmark]
    failed = []
    started = time.monotonic()
    for name in chosen:
        module = BENCHMARKS[name]
        if args.benchmark != name:
            # defaults of that benchmark's own options
            sub = argparse.ArgumentParser()
            module.add_arguments(sub)
            options = sub.parse_args([])
        else:
            options = args
        log(f"benchmark {name}: starting")
        began = time.monotonic()
        try:
            report = module.run(options)
        except KeyboardInterrupt:
            raise
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        report.write(args.out, command)
        log(f"benchmark {name}: done in {time.monotonic() - began:.0f}s")
    log(
        f"{len(chosen) - len(failed)} of {len(chosen)} benchmarks ran in "
        f"{time.monotonic() - started:.0f}s; results in {args.out}"
    )
    if args.out == RESULTS_DIR:
        readme.main()
    if failed:
        print(f"benchmarks that broke: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
