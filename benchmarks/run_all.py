"""Run every ``benchmarks/bench_*.py`` in turn (``make bench``; ``make gpu-check`` on a GPU).

Each script's ``main`` gets the same arguments; a script that fails is reported and the
others still run. Exit status 1 if any failed.
"""
from __future__ import annotations

import importlib
import os
import sys
import time
import traceback


def bench_modules():
    here = os.path.dirname(os.path.abspath(__file__))
    return sorted(f[:-3] for f in os.listdir(here) if f.startswith("bench_") and f.endswith(".py"))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = [a for a in argv if not a.startswith("-") and a.startswith("bench_")]
    passthrough = [a for a in argv if a not in only]
    failed = []
    for name in only or bench_modules():
        t0 = time.time()
        print(f"\n--- {name} ---", flush=True)
        try:
            mod = importlib.import_module(f"benchmarks.{name}")
            mod.main(passthrough)
        except Exception:
            traceback.print_exc()
            failed.append(name)
        print(f"--- {name}: {time.time() - t0:.0f} s ---", flush=True)
    if failed:
        print("failed: " + ", ".join(failed), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
