"""Cost to a target quality: what each method spent until its held-out quality first reached a target.

A comparison at equal steps says which method is ahead after N steps; a user asks what it costs to get where full OPD
gets. Given each method's runs (their evaluation curves, with the cumulative costs recorded at each evaluation, as
`horizon-opd` and examples/real_model write them in results.json), `cost_to_target`:

1. averages each method's curve over its seeds at the evaluation steps they share (the target is read off the mean
   curve, and every seed's value is kept for its spread);
2. sets the targets: by default the reference method's mean quality at 50% and at 100% of its step budget;
3. finds the first step at which the mean curve reaches each target, interpolated linearly between the two
   evaluations around the crossing (a curve that crosses and falls back still reached it at its first crossing; one
   that never reaches it is "not reached", with its best value);
4. reads every cumulative cost at that (fractional) step off the same interpolation: steps, decode iterations, tokens
   generated and trained, tokens encoded without grad, CPU seconds measured; and prices the steps on a GPU when
   `gpu_seconds_per_step` is given (steps to target x the cost model's seconds per step for that method: this assumes
   the steps to target carry over from the pair that was run to the pair that is priced);
5. divides every figure by the reference method's.

Pure Python on dicts: no torch, no trainer.
"""

import math

# Cumulative costs a results curve records at each evaluation (keys of its points), in table order.
COSTS = ("steps", "decode_iterations", "generated_tokens", "trained_tokens", "student_nograd_tokens", "train_seconds")
DEFAULT_FRACTIONS = (0.5, 1.0)  # of the reference method's step budget


def reaches(value: float, target: float, higher_is_better: bool) -> bool:
    return value >= target if higher_is_better else value <= target


def first_reach(points: list[tuple[float, float]], target: float, higher_is_better: bool = True) -> float | None:
    """The first x at which the piecewise-linear curve through `points` [(x, y), ...] (x increasing) reaches `target`;
    None if it never does. A curve already there at its first point reaches it at that x."""
    for i, (x, y) in enumerate(points):
        if not reaches(y, target, higher_is_better):
            continue
        if i == 0:
            return float(x)
        x0, y0 = points[i - 1]
        return x0 + (target - y0) / (y - y0) * (x - x0)  # y0 is on the other side of the target, so y != y0
    return None


def value_at(points: list[tuple[float, float]], x: float) -> float:
    """The piecewise-linear curve through `points` at x (within their range)."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if points and x == points[0][0]:
        return points[0][1]
    raise ValueError(f"x = {x} lies outside the curve's steps {points[0][0]}..{points[-1][0]}")


def by_method(records: list[dict], key: str = "name") -> dict[str, list[dict]]:
    """Run records (one per method and seed, as results.json lists them) grouped by method: `cost_to_target`'s
    `runs`."""
    runs = {}
    for record in records:
        runs.setdefault(record[key], []).append(record)
    return runs


def evaluations(run: dict, metric: str) -> list[dict]:
    """The points of a run's `curve` that measured `metric` (a curve may log costs at steps it did not evaluate)."""
    return [point for point in run["curve"] if point.get(metric) is not None]


def mean_curve(runs: list[dict], metric: str) -> list[dict]:
    """Each run's `curve` (a list of points with "step", `metric` and cumulative costs), averaged over runs at the
    steps every run evaluated. Each point holds the mean of every numeric field, and `metric`'s per-run values
    (`values`) and standard error over runs (`sem`, 0 for one run).

    A run that ended early because it reached its target (`"stopped_at_target": True`, a run to a target such as
    examples/real_model's `--stop-at-kl`) holds its last point at every later step: its value stays the one that met
    the target, and its costs stop growing (it spent nothing more). Without that, seeds stopping at different steps
    would cut the mean curve at the earliest stop."""
    if not runs:
        raise ValueError("no runs to average")
    by_step = [{point["step"]: point for point in evaluations(run, metric)} for run in runs]
    if not all(by_step):
        raise ValueError(f"a run has no evaluation with a {metric!r} value")
    held = [bool(run.get("stopped_at_target")) for run in runs]

    def covers(points: dict, holds: bool, step) -> bool:
        return step in points or (holds and step > max(points))

    steps = [step for step in sorted(set().union(*by_step))
             if all(covers(points, holds, step) for points, holds in zip(by_step, held, strict=True))]
    if not steps:
        raise ValueError(f"the runs share no evaluation step with a {metric!r} value")
    curve = []
    for step in steps:
        points = [points.get(step, points[max(points)]) for points in by_step]
        mean = {key: sum(p[key] for p in points) / len(points) for key in points[0]
                if all(isinstance(p.get(key), int | float) for p in points)}
        mean["step"] = step  # a held point keeps the step it was measured at
        values = [p[metric] for p in points]
        mean["values"] = values
        mean["sem"] = _sem(values)
        curve.append(mean)
    return curve


def _sem(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def default_targets(reference_curve: list[dict], metric: str,
                    fractions: tuple[float, ...] = DEFAULT_FRACTIONS) -> dict[str, float]:
    """The reference's mean quality at each fraction of its step budget (its last evaluated step), by label "50%"."""
    points = [(p["step"], p[metric]) for p in reference_curve]
    budget = points[-1][0]
    return {f"{fraction:.0%}": value_at(points, fraction * budget) for fraction in fractions}


def cost_to_target(runs: dict[str, list[dict]], metric: str, higher_is_better: bool, reference: str,
                   targets: dict[str, float] | None = None,
                   gpu_seconds_per_step: dict[str, dict[str, float]] | None = None) -> dict:
    """What each method spent until its mean `metric` curve first reached each target.

    Args:
        runs: {method: [run, ...]}, a run per seed, each with a "curve" of evaluation points holding "step", `metric`
            and the cumulative `COSTS` it recorded (a missing cost is left out of that method's row).
        metric: the curve's quality key ("accuracy", "heldout_kl", ...).
        higher_is_better: True for accuracy, False for a KL or a loss.
        reference: the method whose quality sets the default targets and divides every figure (full OPD).
        targets: {label: value}; default: the reference's mean quality at 50% and 100% of its step budget.
        gpu_seconds_per_step: {method: {column: seconds per step}} (a GPU cost model's columns, e.g. "engine" and
            "eager"); each row then also has `gpu_<column>_seconds` = steps to target x that method's seconds per step.

    Returns:
        {"metric", "higher_is_better", "reference", "targets", "rows"}: one row per (target, method) with "target"
        (its label), "method", "seeds", "reached", "best" (the best mean value seen), "final" and "final_sem" (the mean
        curve's last value and its standard error over seeds), "last_step" (how far the runs went), "held" (whether
        the final value still meets the target: a run can reach it and fall back), "seed_steps" (each seed's own first
        crossing, None where it never reached it), and, when reached, "step" and every cost at that step, with "ratios"
        {cost: value / the reference's} where the reference reached it too.
    """
    if reference not in runs:
        raise ValueError(f"reference={reference!r} is not among the methods {sorted(runs)}: name the full-OPD run.")
    curves = {method: mean_curve(method_runs, metric) for method, method_runs in runs.items()}
    targets = dict(targets) if targets is not None else default_targets(curves[reference], metric)
    best = max if higher_is_better else min
    rows = []
    for label, target in targets.items():
        block = []
        for method, curve in curves.items():
            row = {"target": label, "target_value": target, "method": method, "seeds": len(runs[method]),
                   "best": best(p[metric] for p in curve), "final": curve[-1][metric], "final_sem": curve[-1]["sem"],
                   "last_step": curve[-1]["step"]}
            step = first_reach([(p["step"], p[metric]) for p in curve], target, higher_is_better)
            row["reached"] = step is not None
            # each seed's own first crossing: the spread behind the mean curve's (None where a seed never reached it)
            row["seed_steps"] = [
                first_reach([(p["step"], p[metric]) for p in evaluations(run, metric)], target, higher_is_better)
                for run in runs[method]]
            row["held"] = reaches(row["final"], target, higher_is_better)  # still there at the end of the run
            if step is not None:
                row["step"] = row["steps"] = step  # the optimizer steps taken (fractional: interpolated)
                for cost in COSTS[1:]:
                    if all(cost in p for p in curve):
                        row[cost] = value_at([(p["step"], p[cost]) for p in curve], step)
                for column, seconds in (gpu_seconds_per_step or {}).get(method, {}).items():
                    row[f"gpu_{column}_seconds"] = step * seconds
            block.append(row)
        ref = next(r for r in block if r["method"] == reference)
        for row in block:
            if row["reached"] and ref["reached"]:
                row["ratios"] = {key: _ratio(row[key], ref[key]) for key in row
                                 if (key in COSTS or key.startswith("gpu_")) and key in ref}
        rows += block
    return {"metric": metric, "higher_is_better": higher_is_better, "reference": reference, "targets": targets,
            "rows": rows}


def _ratio(value: float, reference: float) -> float | None:
    if reference == 0:
        return None if value else 1.0
    return value / reference


def to_target_table(result: dict, columns: tuple[str, ...] = ("steps", "decode_iterations", "generated_tokens",
                                                               "train_seconds")) -> list[str]:
    """`cost_to_target`'s rows as a markdown table per target: each cost as the reference's multiple, "not reached"
    with the best value where so. GPU columns (`gpu_*_seconds`) are added when the rows have them."""
    gpu = sorted({key for row in result["rows"] for key in row if key.startswith("gpu_")})
    columns = (*columns, *gpu)
    names = {"steps": "steps", "decode_iterations": "decode it.", "generated_tokens": "tokens generated",
             "trained_tokens": "tokens trained", "student_nograd_tokens": "tokens w/o grad",
             "train_seconds": "CPU s"}
    lines = []
    for label, target in result["targets"].items():
        direction = ">=" if result["higher_is_better"] else "<="
        lines += ["", f"To {result['metric']} {direction} {target:.4g} ({result['reference']}'s at {label} of its "
                  f"steps); each cost as a multiple of {result['reference']}'s:", "",
                  "| method | seeds | final ± s.e. | " + " | ".join(names.get(c, _gpu_name(c)) for c in columns) +
                  " | each seed's steps |", "|---|---|---|" + "---|" * (len(columns) + 1)]
        block = [r for r in result["rows"] if r["target"] == label]
        reference = next(r for r in block if r["method"] == result["reference"])
        for row in block:
            final = f"{row['final']:.4g} ± {row['final_sem']:.2g}"
            if not row["reached"]:
                cells = [f"not reached in {row['last_step']:g} (best {row['best']:.4g})"] + [""] * (len(columns) - 1)
            else:
                ratios = row.get("ratios", {})
                cells = [_cell(row.get(c), ratios.get(c)) for c in columns]
                if not row["held"]:
                    cells[0] += " †"
            cells.append(_seed_steps(row.get("seed_steps", []), reference.get("steps")))
            lines.append(f"| {row['method']} | {row['seeds']} | {final} | " + " | ".join(cells) + " |")
    if any(row["reached"] and not row["held"] for row in result["rows"]):
        lines += ["", "†: reached the target, then fell back below it by the end of the run (see its final value)."]
    lines += ["", f"Each seed's steps: where that seed's own curve first reached the target (–: never), and their "
              f"range as a multiple of {result['reference']}'s steps (its mean curve's): the spread behind the steps "
              f"ratio, which the engine and eager ratios of a fixed-horizon method share."]
    if gpu:
        lines += ["", "GPU seconds = steps to target x the cost model's seconds per step for the priced pair: this "
                  "assumes the steps to target carry over from the pair that was run."]
    return lines


def _seed_steps(steps: list[float | None], reference_steps: float | None) -> str:
    """"12, 20, – (0.60–1.00x)": each seed's steps to the target and their range over the reference's."""
    if not steps:
        return ""
    text = ", ".join("–" if s is None else f"{s:.3g}" for s in steps)
    reached = [s for s in steps if s is not None]
    if reached and reference_steps:
        low, high = min(reached) / reference_steps, max(reached) / reference_steps
        text += f" ({low:.2f}x)" if len(reached) == 1 else f" ({low:.2f}–{high:.2f}x)"
    return text


def _gpu_name(column: str) -> str:
    return "GPU " + column.removeprefix("gpu_").removesuffix("_seconds") + " s"


def _cell(value, ratio) -> str:
    if value is None:
        return "–"
    text = f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"
    return f"{text} ({ratio:.2f}x)" if ratio is not None else text
