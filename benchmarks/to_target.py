"""Cost to OPD's quality, per task, from the results files the runs wrote, priced on a GPU by the cost model.

    python benchmarks/to_target.py                     # every task below; writes benchmarks/results/to_target.json
    python benchmarks/to_target.py --markdown docs/to_target.md

For each task, `horizon_opd.to_target.cost_to_target` finds the first step at which each method's mean curve (over
its seeds) reaches OPD's mean quality at 50% and 100% of OPD's steps, and what it spent to get there (measured: steps,
decode iterations, tokens, CPU seconds). The GPU columns price those steps with `gpu_model.py`'s seconds per step for
the 1.5B/7B pair at L = 1024, B = 64 (H100, its "engine" column: a bandwidth-bound engine; and its "eager" column:
transformers' `generate` at a 20 ms floor per decode iteration): a MODEL, and it assumes the steps to target carry over
from the small pair that was run to the 1.5B/7B pair.
"""

import argparse
import glob
import json
import math
import os
import sys
from dataclasses import replace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import gpu_model as gm  # noqa: E402

_to_target = gm.torch_free_module("to_target")
by_method, cost_to_target, mean_curve, to_target_table = (
    _to_target.by_method, _to_target.cost_to_target, _to_target.mean_curve, _to_target.to_target_table)

# task -> (results files, metric, higher is better, what it is)
TASKS = {
    "main job": (["examples/demo_results/results.json"], "accuracy", True,
                 "the default `horizon-opd` job (60 steps x 32 prompts, L = 104, lr 1e-3)"),
    "main job, run on to a cap": (
        ["examples/demo_results/long/results.json", "examples/demo_results/long_popd/results.json",
         "examples/demo_results/results.json"], "accuracy", True,
        "the same job; the methods that had not reached OPD's 50% target in 60 steps run on to a cap (`--steps 480`: "
        "8x OPD's steps, for token-matched OPD, TOPD and rolling; `--steps 120`, 2x, for POPD, whose schedule spans "
        "its run). Their first 60 steps equal the 60-step runs' evaluation for evaluation"),
    "mismatch m = 1, lr 1e-3": (["examples/mismatch_results/m1_lr1e-3_grad_long/results.json",
                                 "examples/mismatch_results/m1_lr1e-3/results.json",
                                 "examples/mismatch_results/m1_lr1e-3_wide/results.json",
                                 "examples/mismatch_results/m1_lr1e-3_gap/results.json",
                                 "examples/mismatch_results/m1_lr1e-3_gap_seeds345/results.json"], "accuracy", True,
                                "the mismatch task at m = 1, lr 1e-3 (the gap files add seeds 3-5 of OPD and the "
                                "rolling rows: the student memory, the context with grad, resampled contexts; the "
                                "one row that had not reached OPD's quality in 60 steps, rolling with the context's "
                                "gradient, runs on to 480, 8x OPD's steps, `--methods rolling+grad --steps 480`)"),
    "SmolLM2 L = 256": (["examples/real_model/results.json"], "heldout_kl", False,
                        "SmolLM2-135M-Instruct, a third of its layers pruned, distilled from the unpruned model "
                        "(examples/real_model/README.md; held-out KL on 16 prompts, 20 steps x 4 prompts)"),
    "SmolLM2 L = 256, run to OPD's final KL": (
        ["examples/real_model/runs/opd_seed*.json", "examples/real_model/long/runs/*.json"], "heldout_kl", False,
        "the same pair; OPD's 20-step runs (3 seeds) set the target, the other methods run until their held-out KL "
        "reaches 0.6875 (OPD's mean over its first 2 seeds, which the runs were started with: below the 3 seeds' "
        "0.697, so a run that stopped had passed the target) or a cap: 8x OPD's steps (160) for the rho = 0.1 "
        "methods at 4 prompts, 2x (40) for "
        "the wide ones and adaptive (`--stop-at-kl 0.6875 --steps <cap>`; the first runs, token-matched OPD, "
        "TOPD N=100 and POPD, had a cap of 80). A seed that stopped at the target holds its last value in the mean "
        "curve"),
    "SmolLM2 L = 256, 64 held-out prompts": (
        ["examples/real_model/heldout64/runs/opd_seed*.json", "examples/real_model/heldout64/long/runs/*.json"],
        "heldout_kl", False,
        "the same pair and runs to a target, scored on 64 held-out prompts (32 instructions, 32 additions; "
        "`--heldout-size 64 --eval-batch-size 16`): OPD's 20-step runs set the target, rolling and token-matched "
        "OPD run until their held-out KL reaches OPD's final mean or a cap of 160 and 80 steps "
        "(examples/real_model/heldout64/)"),
}
REFERENCE = "OPD"


def gpu_seconds_per_step(scenario: gm.Scenario = gm.Scenario()) -> dict[str, dict[str, float]]:
    """The cost model's seconds per step by results-file method name, on the engine and the eager columns."""
    s, a = scenario, scenario.assumptions
    columns = {"engine": gm.Rates(gm.GPUS["H100"], a),
               "eager": gm.Rates(gm.GPUS["H100"], replace(a, decode_floor_s=gm.HF_EAGER_FLOOR_S))}
    shapes = {m.name: m for m in gm.methods(s.batch, s.prompt, s.length, s.rho, s.steps)}
    matched = math.ceil(s.batch * s.rho)  # token-matched OPD: B rho prompts at the full horizon
    shapes["OPD matched rho=0.1"] = gm.Method("OPD matched", [gm.standard_step(matched, s.prompt, s.length)], "")
    shapes["TOPD N=100"] = gm.Method("TOPD N=100", [gm.standard_step(s.batch, s.prompt, 100)], "")
    out = {}
    for name, method in shapes.items():
        out[name] = {column: gm.evaluate(method, s.student, s.teacher, rates)["step"]
                     for column, rates in columns.items()}
    # the results files' names for the same methods
    out["Adaptive 0.1..1, probe every 5"] = out.get("Adaptive 0.1-1", {})
    out["Rolling rho=0.1 wide memory"] = out["Rolling rho=0.1 wide, student memory"]
    out["Rolling rho=0.1 context with grad"] = out["Rolling rho=0.1, context with grad"]
    out["Rolling rho=0.1 wide context with grad"] = out["Rolling rho=0.1 wide, context with grad"]
    return out


def heldout_error(pattern: str, metric: str, result: dict, runs: dict[str, list[dict]] | None = None) -> str:
    """What one held-out figure's own sampling error is: binomial for an accuracy over n prompts; for the held-out KL
    the standard error over prompts that the runs recorded (`heldout_kl_se`, newer runs only)."""
    with open(sorted(glob.glob(os.path.join(ROOT, pattern)))[0]) as f:
        settings = json.load(f).get("settings", {})
    n = settings.get("eval_prompts") or settings.get("heldout_prompts")
    if metric == "accuracy" and n:
        p = next(r["final"] for r in result["rows"] if r["method"] == REFERENCE)
        return (f"Held-out accuracy on {n} prompts: one run's binomial standard error sqrt(p (1 - p) / n) is "
                f"{math.sqrt(p * (1 - p) / n):.3f} at OPD's final {p:.3f} ({math.sqrt(0.25 / n):.3f} at p = 0.5); "
                f"the tables' s.e. is over seeds.")
    recorded = {method: [r["curve"][-1][f"{metric}_se"] for r in method_runs if r["curve"][-1].get(f"{metric}_se")]
                for method, method_runs in (runs or {}).items()}
    recorded = {method: values for method, values in recorded.items() if values}
    if recorded:
        cells = ", ".join(f"{method} {sum(v) / len(v):.3f} ({len(v)} runs)" for method, v in recorded.items())
        return (f"Held-out {metric} over {n} prompts, one sampled rollout each. One run's standard error over prompts "
                f"at its last evaluation, where recorded (mean over runs): {cells}; the other runs did not record it. "
                f"The tables' s.e. is over seeds.")
    return (f"Held-out {metric} over {n} prompts, one sampled rollout each; these runs did not record its spread over "
            f"prompts, so only the s.e. over seeds is given.")


def stopped_at_target(run: dict) -> bool:
    """Whether a run to a target (examples/real_model's `--stop-at-kl`) ended because it reached it: recorded by newer
    runs, read off the settings and the last evaluation for older ones. Such a run holds its last value in the mean
    curve (`horizon_opd.to_target.mean_curve`)."""
    if "stopped_at_target" in run:
        return bool(run["stopped_at_target"])
    stop = run.get("settings", {}).get("stop_at_kl")
    last = run["curve"][-1]
    return stop is not None and last.get("heldout_kl") is not None and last["heldout_kl"] <= stop and \
        last["step"] < run["settings"]["steps"]


def load_runs(files: list[str]) -> dict[str, list[dict]]:
    """Runs by method name; a (method, seed) that an earlier file holds is not counted again (the wide files repeat
    their OPD runs)."""
    records = {}
    for file in [path for pattern in files for path in sorted(glob.glob(os.path.join(ROOT, pattern)))]:
        with open(file) as f:
            results = json.load(f)
        for run in results.get("methods") or results.get("runs") or [results]:  # a results file, or one run's
            records.setdefault((run["name"], run["seed"]), {**run, "stopped_at_target": stopped_at_target(run)})
    runs = by_method(list(records.values()))
    return {REFERENCE: runs[REFERENCE], **runs} if REFERENCE in runs else runs  # the reference's row first


def plot(task: str, runs: dict[str, list[dict]], metric: str, prices: dict, result: dict, path: str) -> None:
    """Held-out quality against predicted GPU seconds, engine and eager panels side by side: each method's mean curve
    over seeds, its band the seeds' range, OPD's targets dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, column in zip(axes, ("engine", "eager")):
        for method, method_runs in runs.items():
            if method not in prices:
                continue
            curve = mean_curve(method_runs, metric)
            x = [p["step"] * prices[method][column] / 3600 for p in curve]
            (line,) = ax.plot(x, [p[metric] for p in curve], marker=".", label=f"{method} ({len(method_runs)})")
            ax.fill_between(x, [min(p["values"]) for p in curve], [max(p["values"]) for p in curve],
                            color=line.get_color(), alpha=0.15)
        for label, target in result["targets"].items():
            ax.axhline(target, color="gray", linestyle="--", linewidth=0.8)
        ax.set_xlabel(f"predicted GPU hours, H100 {column} (1.5B/7B, L = 1024, B = 64)")
        ax.set_title(f"{task}: {column}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric + (" (higher is better)" if result["higher_is_better"] else " (lower is better)"))
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=os.path.join(HERE, "results", "to_target.json"))
    parser.add_argument("--markdown", default=None, help="also write the tables here")
    parser.add_argument("--plots", default=None, help="a folder: one plot per task, quality against GPU seconds")
    args = parser.parse_args(argv)
    prices = gpu_seconds_per_step()
    payload = {"gpu_seconds_per_step": prices, "tasks": {}}
    lines = ["# Cost to OPD's quality, per task", "", "Written by `python benchmarks/to_target.py --markdown "
             "docs/to_target.md --plots docs`; how it is computed: [results.md](results.md#cost-to-opds-quality).", ""]
    for task, (files, metric, higher, what) in TASKS.items():
        runs = load_runs(files)
        result = cost_to_target(runs, metric, higher, REFERENCE,
                                gpu_seconds_per_step={m: prices[m] for m in runs if m in prices})
        payload["tasks"][task] = {"files": files, **result}
        lines += [f"## {task}", "", f"{what}; {', '.join(files)}.", "", heldout_error(files[0], metric, result, runs)]
        lines += to_target_table(result) + [
            "", "A schedule that moves the horizon (POPD, anchored, adaptive) is priced at its mean step over a "
            "100-step schedule at L = 1024, not at the horizons the run had used when it reached the target: read "
            "its measured decode iterations beside it.", ""]
        if args.plots:
            os.makedirs(args.plots, exist_ok=True)
            name = "to_target_" + "".join(c if c.isalnum() else "_" for c in task.lower()).strip("_") + ".png"
            plot(task, runs, metric, prices, result, os.path.join(args.plots, name))
            lines += [f"![{task}: quality against predicted GPU seconds]({name})", ""]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(payload, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
