"""Rolling's gap to OPD at equal steps, and what closes it (issue 35): per method, the final held-out quality and its
mean over the late evaluations, each with its standard error over seeds, and the difference to a baseline method.

    python benchmarks/rolling_gap.py runs/mismatch_gap/m1/results.json runs/mismatch_gap345/m1/results.json \\
        --metric accuracy --late-from 40 --baseline "Rolling rho=0.1 wide"

A results file is one `horizon-opd` / `demo.mismatch` comparison, or one run of examples/real_model (globs work);
a (method, seed) already read from an earlier file is not counted again. The late mean averages each run's
evaluations at steps >= `--late-from` first (less evaluation noise than one final point), then the seeds.
"""

import argparse
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from to_target import load_runs  # noqa: E402


def mean_se(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def late_mean(run: dict, metric: str, late_from: int) -> float:
    points = [p[metric] for p in run["curve"] if p["step"] >= late_from and p.get(metric) is not None]
    if not points:
        raise ValueError(f"{run['name']} seed {run['seed']} has no evaluation at step >= {late_from}")
    return sum(points) / len(points)


def gap_rows(runs: dict[str, list[dict]], metric: str, late_from: int, baseline: str | None) -> list[dict]:
    rows = []
    base = None
    if baseline is not None:
        if baseline not in runs:
            raise ValueError(f"--baseline {baseline!r} is not among the methods: {sorted(runs)}")
        base = mean_se([late_mean(r, metric, late_from) for r in runs[baseline]])
    for method, method_runs in runs.items():
        finals = [r["curve"][-1][metric] for r in method_runs]
        late = [late_mean(r, metric, late_from) for r in method_runs]
        row = {"method": method, "seeds": sorted(r["seed"] for r in method_runs), "final": mean_se(finals),
               "late": mean_se(late)}
        if base is not None and method != baseline:
            (m, s), (bm, bs) = row["late"], base
            se = math.sqrt(s ** 2 + bs ** 2) if s is not None and bs is not None else None
            row["late_vs_baseline"] = (m - bm, se)
        rows.append(row)
    return rows


def _pm(pair, digits=3) -> str:
    mean, se = pair
    return f"{mean:.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")


def table(rows: list[dict], metric: str, late_from: int, baseline: str | None) -> list[str]:
    head = ["method", "seeds", f"final {metric}", f"mean {metric}, evaluations at steps >= {late_from}"]
    if baseline:
        head.append(f"late mean − {baseline}'s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["method"], ", ".join(map(str, row["seeds"])), _pm(row["final"]), _pm(row["late"])]
        if baseline:
            cells.append(_pm(row["late_vs_baseline"]) if "late_vs_baseline" in row else "(baseline)")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--metric", default="accuracy")
    parser.add_argument("--late-from", type=int, default=40)
    parser.add_argument("--baseline", default=None)
    args = parser.parse_args(argv)
    runs = load_runs(args.files)
    print("\n".join(table(gap_rows(runs, args.metric, args.late_from, args.baseline), args.metric, args.late_from,
                          args.baseline)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
