#!/usr/bin/env python
"""`knnlm --help` start-up time: the command line must stay instant whatever the stages import.

Times `python -m cluster.cli --help` as a fresh process (median of --repeats, interleaved), against
the bare interpreter (`python -c pass`) in the same run, and, with --before DIR, against another
checkout of knnlm (e.g. `git worktree add /tmp/before <rev>`), each first on PYTHONPATH:

    python bench/bench_startup.py --before /tmp/before      # ~10 s
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from common import write_result  # noqa: E402


def run_once(argv: list[str], repo: Path | None) -> float:
    env = dict(os.environ, PYTHONPATH=str(repo)) if repo else dict(os.environ)
    t = time.perf_counter()
    subprocess.run([sys.executable, *argv], env=env, cwd="/", stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default=None, help="another checkout to time in the same run")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    cases = {"python -c pass": (["-c", "pass"], None), "knnlm --help": (["-m", "cluster.cli", "--help"], REPO)}
    if a.before:
        cases["knnlm --help (before)"] = (["-m", "cluster.cli", "--help"], Path(a.before).resolve())
    load = os.getloadavg()
    t0 = time.perf_counter()
    for argv_, repo in cases.values():                       # warm the page cache
        run_once(argv_, repo)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(a.repeats):                               # interleaved: noise hits every case alike
        for name, (argv_, repo) in cases.items():
            times[name].append(run_once(argv_, repo))
    med = {name: statistics.median(v) for name, v in times.items()}
    figures = {name: {"median_s": med[name], "runs_s": times[name],
                      "ratio_vs_python": med[name] / med["python -c pass"]} for name in cases}
    if a.before:
        figures["ratio_after_vs_before"] = med["knnlm --help"] / med["knnlm --help (before)"]
    path, _ = write_result("startup", "cpu", {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, load,
                           {"repeats": a.repeats, "before": a.before}, figures, time.perf_counter() - t0)
    for name in cases:
        print(f"{name:<24} median {med[name]:.3f}s  ({med[name] / med['python -c pass']:.1f}x python -c pass)")
    if a.before:
        print(f"after / before: {figures['ratio_after_vs_before']:.2f}")
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
