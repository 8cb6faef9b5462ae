"""How long each notebook takes, beside its budget: runs the notebooks' tests and prints their times.

    python benchmarks/bench_notebooks.py                       # all four, ~6 min on 2 cores
    python benchmarks/bench_notebooks.py --only 01 --out notebooks.json

The times are what tests/test_notebooks.py measures (every cell of a notebook in one kernel, kernel start included),
read from the line it prints per notebook. The suite does not assert them: a busy machine would fail a test of correct
code. This script is where they are watched: a table, a JSON record (`--out`), and exit status 1 if a notebook is over
its budget (`--strict`). Run it on an otherwise idle machine; measured times are in notebooks/README.md.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Seconds each notebook may take on a 2-core CPU, kernel start included: 15 minutes for the four together.
BUDGET_S = {"01_quickstart.ipynb": 120, "02_horizon_study.ipynb": 360, "03_lora_and_hub.ipynb": 120,
            "04_paper_analyses.ipynb": 300}
TOTAL_BUDGET_S = 900


def run_tests(prefixes: list[str]) -> tuple[dict[str, float], int, float]:
    """Each notebook's seconds as its test prints them, the tests' exit status and their wall time."""
    selection = " or ".join(f"test_{p}_" for p in prefixes)
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/test_notebooks.py",
               "-m", "slow", "-k", selection]
    began = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - began
    seconds = {}
    for name, value in re.findall(r"^(\d\d_\w+\.ipynb): ([0-9.]+) s$", done.stdout, flags=re.M):
        seconds[name] = seconds.get(name, 0.0) + float(value)  # 03 runs twice (without and with a token)
    if done.returncode:
        print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
    return seconds, done.returncode, wall


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=[n[:2] for n in BUDGET_S], help="notebook numbers, e.g. 01 04")
    parser.add_argument("--out", default=None, help="also write the record as JSON here")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a notebook is over its budget")
    args = parser.parse_args(argv)
    assert sum(BUDGET_S.values()) <= TOTAL_BUDGET_S
    seconds, status, wall = run_tests(args.only)
    rows = [{"notebook": name, "seconds": round(seconds[name], 1) if name in seconds else None,
             "budget_s": budget, "over": name in seconds and seconds[name] > budget}
            for name, budget in BUDGET_S.items() if name[:2] in args.only]
    print("| notebook | seconds | budget (s) |\n|---|---|---|")
    for row in rows:
        flag = " **over**" if row["over"] else ""
        print(f"| {row['notebook']} | {row['seconds']}{flag} | {row['budget_s']} |")
    total = sum(r["seconds"] or 0.0 for r in rows)
    print(f"| total | {total:.1f} | {TOTAL_BUDGET_S} |   (tests' wall time {wall:.0f} s, exit status {status})")
    record = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "tests_exit_status": status,
              "tests_wall_seconds": round(wall, 1), "total_seconds": round(total, 1),
              "total_budget_s": TOTAL_BUDGET_S, "notebooks": rows}
    print(json.dumps(record))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return 1 if status or (args.strict and any(r["over"] for r in rows)) else 0


if __name__ == "__main__":
    sys.exit(main())
