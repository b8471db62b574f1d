"""``python -m bench [NAME ...] [--small]``: run benchmarks, print their tables, write JSON.

Each benchmark is a module of this package with ``run(small: bool) -> dict`` and
``show(result: dict) -> str``; ``all`` runs every one in BENCHMARKS.
"""

import argparse
import importlib
import sys
import time

from bench.common import save

BENCHMARKS = ("prepare", "loader", "stage_step", "cache_write", "storage", "whole_run")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", default=["all"], help=f"{list(BENCHMARKS)} or all")
    parser.add_argument("--small", action="store_true", help="tiny sizes, to check it runs")
    args = parser.parse_args(argv)
    names = list(BENCHMARKS) if "all" in args.names else args.names
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark {unknown}; choose from {list(BENCHMARKS)} or all")

    suffix = "-small" if args.small else ""
    results = {}
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        started = time.perf_counter()
        result = results[name] = module.run(small=args.small)
        result["bench_seconds"] = time.perf_counter() - started
        path = save(name + suffix, result)
        print(f"\n== {name} ({result['bench_seconds']:.0f} s) -> {path}")
        print(module.show(result))
    if "all" in args.names:
        total = sum(r["bench_seconds"] for r in results.values())
        path = save("all" + suffix, {"total_seconds": total, "benchmarks": results})
        print(f"\n== all: {total / 60:.1f} minutes -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
