"""The collapse alarm measured as a detector, over the runs the project produces (results.json files).

A run is labelled *collapsed* when its held-out quality falls well below its best so far: accuracy more than
`ACCURACY_DROP` (20 points) below its peak, or a held-out KL more than `KL_RISE` (1.5) times its best. The *fall* is
the first evaluation where that holds. The alarm is replayed on the run's recorded `alarm_trace` (every observation
the trainer's `CollapseAlarm` saw, raw) by a fresh `CollapseAlarm`, the class the trainer uses, so the study and the
trainer share one rule; its first firing is compared with the fall:

- precision: alarmed runs that collapsed / alarmed runs;
- recall: collapsed runs alarmed before or at the fall / collapsed runs;
- the same, counting only the collapses that *stayed down* (final value still past the threshold) and leaving out the
  runs that fell and recovered;
- false-alarm rate: healthy runs alarmed / healthy runs;
- lead time: steps from the first alarm to the fall (median over the collapsed runs alarmed in time).

An observation at step s measures the model after s optimizer steps (training rollouts of step s are sampled before
its update; `trainer.evaluate()` at global step s runs after s updates), the same step axis as the evaluation curve.

    python -m horizon_opd.alarm_study examples/demo_results/results.json examples/demo_results/collapse/results.json

prints a Markdown table of the totals and one row per run, for this rule, for the previous rule replayed on the same
traces (`PreviousCollapseAlarm`), and for the alarm events recorded in the files (whichever rule ran). Runs whose
records have no `alarm_trace` (results written before the trace existed) are skipped with a note; `--from-logs`
rebuilds an approximate trace for them from the logged per-position KL bins (late KL only: loop counts were not logged,
so the loop rule cannot be replayed there). Rule settings other than `--factor` and `--repetition` (e.g. `settle`,
`persistence`, `min_kl`) can be passed to `detector_table` / `replay` as keyword arguments.
"""

import argparse
import json
import math
import statistics
import sys
import warnings
from pathlib import Path

from .monitor import LATE_FRACTION, CollapseAlarm, observe_trace

ACCURACY_DROP = 0.20  # collapsed: accuracy more than this below its peak so far
KL_RISE = 1.5  # collapsed: held-out KL more than this times its best so far


def label_run(curve: list[dict], key: str = "accuracy", higher_is_better: bool = True, drop: float = ACCURACY_DROP,
              rise: float = KL_RISE) -> dict:
    """Whether an evaluation curve (`[{"step", key: value}, ...]`, step 0 included) collapsed, and where.

    Higher is better (accuracy): collapsed at the first evaluation below (peak so far) - `drop`. Lower is better (a
    KL): collapsed at the first evaluation above `rise` x (best so far). A collapse *stayed down* when the curve's
    final value is still that far from the peak; otherwise the run fell and recovered (the mismatch task's early dips,
    e.g. 0.72 -> 0.05 -> 1.00). Returns `{"collapsed", "stayed_down", "fall_step", "peak", "peak_step",
    "value_at_fall", "final"}` (the peak is the best value before the fall, or over the whole curve)."""
    points = [(p["step"], p[key]) for p in curve if p.get(key) is not None]
    if not points:
        raise ValueError(f"the curve has no {key!r} values")

    def fallen(value, best):
        return value < best - drop if higher_is_better else value > rise * best

    best_step, best = points[0]
    final = points[-1][1]
    for step, value in points[1:]:
        if fallen(value, best):
            return {"collapsed": True, "stayed_down": fallen(final, best), "fall_step": step, "peak": best,
                    "peak_step": best_step, "value_at_fall": value, "final": final}
        if (value > best) if higher_is_better else (value < best):
            best_step, best = step, value
    return {"collapsed": False, "stayed_down": False, "fall_step": None, "peak": best, "peak_step": best_step,
            "value_at_fall": None, "final": final}


class PreviousCollapseAlarm:
    """The rule the alarm had before this study (kept to replay it on the same traces, for comparison): one late-KL
    EMA (0.5) over every full-horizon observation, training and evaluation mixed, firing at `factor` x its lowest value
    when above 0.5 x its first value; and a loop share above `repetition` in any step once some earlier step had under
    half that share. No persistence, no per-source baseline."""

    def __init__(self, max_completion_length: int, factor: float, repetition: float, horizon_name: str):
        self.factor, self.repetition = factor, repetition
        self.late = self.first_late = self.best_late = self.lowest_repeating = None
        self.events: list[dict] = []

    def observe_values(self, step, horizon, late, rollouts=0, repeating=0, source="training", late_tokens=None):
        fired = False
        if late is not None:
            self.late = late if self.late is None else 0.5 * late + 0.5 * self.late
            if self.first_late is None:
                self.first_late = self.late
            fired = (self.best_late is not None and self.best_late > 0 and self.late > self.factor * self.best_late
                     and self.late > 0.5 * self.first_late)
            self.best_late = self.late if self.best_late is None else min(self.best_late, self.late)
        if rollouts:
            share = repeating / rollouts
            fired |= (share > self.repetition and self.lowest_repeating is not None
                      and self.lowest_repeating < self.repetition / 2)
            self.lowest_repeating = share if self.lowest_repeating is None else min(self.lowest_repeating, share)
        if fired:
            self.events.append({"step": step, "source": source, "reasons": ["previous rule"]})
        return fired


def replay_alarm(trace: list[dict], policy_name: str, max_completion_length: int, factor: float = 2.0,
                 repetition: float = 0.5, alarm_cls=CollapseAlarm, **settings) -> CollapseAlarm:
    """A fresh alarm fed `trace` in order (its warnings silenced); `settings` are the alarm's keyword arguments."""
    alarm = alarm_cls(max_completion_length, factor, repetition, policy_name, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        observe_trace(alarm, trace)
    return alarm


def replay(trace: list[dict], policy_name: str, max_completion_length: int, factor: float = 2.0,
           repetition: float = 0.5, **settings) -> list[int]:
    """The steps at which the alarm fires on `trace` (one per firing observation, in order)."""
    alarm = replay_alarm(trace, policy_name, max_completion_length, factor, repetition, **settings)
    return [e["step"] for e in alarm.events]


def trace_from_logs(record: dict, max_completion_length: int) -> list[dict] | None:
    """An approximate trace for a record written before `alarm_trace` existed, from its logged per-position KL bins
    (`kl_by_position`, one row per training step with logging_steps=1, and `eval_kl_by_position`): the late KL is the
    unweighted mean of the bins whose centre lies in the last LATE_FRACTION of positions, at full-horizon steps only.
    Loop counts were not logged (0 rollouts). None when the record has no bins."""
    rows, L = [], max_completion_length
    start = math.ceil(L * (1 - LATE_FRACTION))
    horizons = record.get("horizons") or []

    def late(row):
        values = [k for k, p in zip(row["kl"], row["positions"], strict=True)
                  if p >= start and k is not None and not math.isnan(k)]
        return sum(values) / len(values) if values else None

    if not record.get("kl_by_position") and not record.get("eval_kl_by_position"):
        return None
    for row in record.get("kl_by_position") or []:
        step = row["step"] - 1  # logged after the step's update: the rollouts were sampled at step - 1
        horizon = int(horizons[step] if 0 <= step < len(horizons) else row["horizon"])
        if record.get("horizon", {}).get("horizon") == "rolling":
            horizon = L
        rows.append({"step": step, "source": "training", "horizon": horizon,
                     "late": late(row) if horizon >= L else None, "rollouts": 0, "repeating": 0})
    for row in record.get("eval_kl_by_position") or []:
        rows.append({"step": row["step"], "source": "evaluation", "horizon": L, "late": late(row), "rollouts": 0,
                     "repeating": 0})
    # at global step s the trainer evaluates after training step s - 1 and before training step s
    rows.sort(key=lambda t: (t["step"], t["source"] == "training"))
    return rows


def _records(results: dict) -> list[dict]:
    """The run records of a results file: `methods` (the demo's and the mismatch study's list; the older real-model
    dict), `runs` (the real-model merge), or the file is one run (the real model's runs/<method>_seed<S>.json)."""
    for key in ("methods", "runs"):
        if key in results:
            records = results[key]
            return list(records.values()) if isinstance(records, dict) else list(records)
    return [results] if "curve" in results else []


def _quality_key(curve: list[dict]) -> tuple[str, bool] | None:
    if any("accuracy" in p for p in curve):
        return "accuracy", True
    if any("heldout_kl" in p for p in curve):
        return "heldout_kl", False
    return None


def run_rows(path: str, from_logs: bool = False, factor: float = 2.0, repetition: float = 0.5,
             **settings) -> tuple[list[dict], list[str]]:
    """One row per run of one results.json, and notes on the runs skipped."""
    results = json.loads(Path(path).read_text())
    rows, notes = [], []
    for record in _records(results):
        run_settings = record.get("settings") or results.get("settings", {})
        name, seed = record.get("name", "?"), record.get("seed", run_settings.get("seed"))
        horizon = record.get("horizon") or {}
        policy = horizon.get("horizon", "full")
        L = horizon.get("max_completion_length") or run_settings.get("max_completion_length")
        quality = _quality_key(record.get("curve") or [])
        if quality is None or L is None:
            notes.append(f"{path}: {name} seed {seed}: no evaluation curve or no max_completion_length; skipped")
            continue
        trace, approximate = record.get("alarm_trace"), False
        if trace is None and from_logs:
            trace, approximate = trace_from_logs(record, L), True
        if trace is None:
            notes.append(f"{path}: {name} seed {seed}: no alarm_trace (written before the trace was recorded); "
                         f"skipped")
            continue
        key, higher = quality
        label = label_run(record["curve"], key, higher)
        alarm = replay_alarm(trace, policy, L, factor, repetition, **settings)
        first = alarm.events[0] if alarm.events else None
        previous = replay_alarm(trace, policy, L, factor, repetition, alarm_cls=PreviousCollapseAlarm).events
        recorded = record.get("alarm_events")
        row = {"file": path, "method": name, "seed": seed, "policy": policy, "key": key, **label,
               "alarm_step": first["step"] if first else None, "alarm_source": first["source"] if first else None,
               "alarm_reason": first["reasons"][0] if first else None, "approximate": approximate,
               "previous_alarm_step": previous[0]["step"] if previous else None,
               "recorded_alarm_step": recorded[0]["step"] if recorded else None}
        row["lead"] = (label["fall_step"] - row["alarm_step"]) if label["collapsed"] and first else None
        rows.append(row)
    return rows, notes


def totals(rows: list[dict], alarm_key: str = "alarm_step", stayed_down: bool = False) -> dict:
    """Precision, recall, false-alarm rate and median lead time of one alarm column over `rows`. With `stayed_down`,
    only the collapses that stayed down count as collapsed, and the runs that fell and recovered are left out of both
    sides (an alarm before a 20-point fall is not a false alarm; a dip the run recovers from by itself is not one a
    user must be warned of): `left_out` counts them."""
    recovered = [r for r in rows if stayed_down and r["collapsed"] and not r["stayed_down"]]
    rows = [r for r in rows if not (stayed_down and r["collapsed"] and not r["stayed_down"])]
    collapsed = [r for r in rows if r["collapsed"]]
    healthy = [r for r in rows if not r["collapsed"]]
    alarmed = [r for r in rows if r[alarm_key] is not None]
    in_time = [r for r in collapsed if r[alarm_key] is not None and r[alarm_key] <= r["fall_step"]]
    false = [r for r in healthy if r[alarm_key] is not None]
    leads = [r["fall_step"] - r[alarm_key] for r in in_time]

    def ratio(a, b):
        return a / b if b else None

    return {"runs": len(rows), "collapsed": len(collapsed), "alarmed": len(alarmed),
            "precision": ratio(sum(r["collapsed"] for r in alarmed), len(alarmed)),
            "recall": ratio(len(in_time), len(collapsed)), "caught": len(in_time),
            "false_alarm_rate": ratio(len(false), len(healthy)), "false_alarms": len(false),
            "median_lead": statistics.median(leads) if leads else None, "left_out": len(recovered)}


def detector_table(results_files: list[str], from_logs: bool = False, factor: float = 2.0, repetition: float = 0.5,
                   **settings) -> dict:
    """Per run (file, method, seed, collapsed, fall step, first alarm step, lead time) over every results file, and
    the totals: `{"rows", "totals", "by_file", "previous", "recorded", "stayed_down", "notes"}`. `by_file` has the
    totals of each file; `previous` those of the previous rule replayed on the same traces; `recorded` those of the
    alarm events the files hold (whichever rule ran when they were written); `stayed_down` the same four counting
    only the collapses that stayed down (`{"totals", "by_file", "previous", "recorded"}`)."""
    rows, notes, files = [], [], []
    for path in results_files:
        file_rows, file_notes = run_rows(path, from_logs, factor, repetition, **settings)
        rows += file_rows
        notes += file_notes
        if file_rows:
            files.append((path, file_rows))

    def columns(stayed_down):
        return {"totals": totals(rows, stayed_down=stayed_down),
                "by_file": {path: totals(file_rows, stayed_down=stayed_down) for path, file_rows in files},
                "previous": totals(rows, "previous_alarm_step", stayed_down),
                "recorded": totals(rows, "recorded_alarm_step", stayed_down)}

    return {"rows": rows, **columns(False), "stayed_down": columns(True), "notes": notes}


def _fmt(value, spec=".2f"):
    return "–" if value is None else format(value, spec)


def _totals_row(label: str, s: dict, down: dict) -> str:
    """One row: every fall counted (`s`), and only the falls that stayed down (`down`: recall, and the false alarms on
    the runs that never fell, the same in both)."""
    healthy = s["runs"] - s["collapsed"]
    return (f"| {label} | {s['runs']} | {s['collapsed']} ({down['collapsed']}) | {s['alarmed']} | "
            f"{_fmt(s['precision'])} | {_fmt(s['recall'])} ({s['caught']}/{s['collapsed']}) | "
            f"{_fmt(down['recall'])} ({down['caught']}/{down['collapsed']}) | {_fmt(s['false_alarm_rate'])} "
            f"({s['false_alarms']}/{healthy}) | {_fmt(s['median_lead'], 'g')} |")


def format_markdown(table: dict, rows: str = "all") -> str:
    """The totals (this rule, the previous rule, the recorded events, and this rule per file), then one row per run
    (`rows="all"`), per run that collapsed or was alarmed by either rule (`"notable"`), or none (`"none"`)."""
    down = table["stayed_down"]
    lines = ["| alarm | runs | collapsed (stayed down) | alarmed | precision | recall: every fall (alarm ≤ fall) | "
             "recall: falls that stayed down | false alarms on runs that never fell | median lead (steps) |",
             "|---|---|---|---|---|---|---|---|---|",
             _totals_row("this rule, all runs", table["totals"], down["totals"]),
             _totals_row("previous rule, same traces", table["previous"], down["previous"]),
             _totals_row("recorded in the files (the rule that ran)", table["recorded"], down["recorded"])]
    if len(table["by_file"]) > 1:
        lines += [_totals_row(f"this rule, {path}", s, down["by_file"][path]) for path, s in table["by_file"].items()]
    shown = [r for r in table["rows"] if rows == "all" or (rows == "notable" and (
        r["collapsed"] or r["alarm_step"] is not None or r["previous_alarm_step"] is not None))]
    if shown:
        lines += ["", "| file | method | seed | collapsed | peak → at fall (or final) | fall step | first alarm (this "
                  "rule) | lead | first alarm (previous rule) | first alarm (recorded) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
    for row in shown:
        where = f"{row['alarm_step']} ({row['alarm_source']})" if row["alarm_step"] is not None else "–"
        values = (f"{row['peak']:.3g} → {row['value_at_fall']:.3g}"
                  + ("" if row["stayed_down"] else f" (recovered: final {row['final']:.3g})") if row["collapsed"] else
                  f"{row['peak']:.3g} (final {row['final']:.3g})")
        lines.append(f"| {row['file']}{' (approx.)' if row['approximate'] else ''} | {row['method']} | {row['seed']} "
                     f"| {'yes' if row['collapsed'] else 'no'} | {values} | {_fmt(row['fall_step'], 'd')} | {where} "
                     f"| {_fmt(row['lead'], 'd')} | {_fmt(row['previous_alarm_step'], 'd')} "
                     f"| {_fmt(row['recorded_alarm_step'], 'd')} |")
    if table["notes"]:
        lines += [""] + [f"- {note}" for note in table["notes"]]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m horizon_opd.alarm_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="results.json files (demo, collapse regime, mismatch, real model)")
    p.add_argument("--factor", type=float, default=2.0, help="alarm_factor to replay with (default 2.0)")
    p.add_argument("--repetition", type=float, default=0.5, help="alarm_repetition to replay with (default 0.5)")
    p.add_argument("--rows", choices=("all", "notable", "none"), default="all",
                   help="per-run rows: every run, the runs that collapsed or were alarmed (by this rule or the "
                        "previous one), or none (default: all)")
    p.add_argument("--from-logs", action="store_true",
                   help="rebuild an approximate trace (late KL from the logged position bins, no loop counts) for "
                        "records written before alarm_trace existed, instead of skipping them")
    args = p.parse_args(argv)
    table = detector_table(args.files, from_logs=args.from_logs, factor=args.factor, repetition=args.repetition)
    print(format_markdown(table, args.rows))
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
