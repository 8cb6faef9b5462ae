"""Benchmark HorizonOPDTrainer against TRL side by side, and check the bars of the performance issue.

    python benchmarks/run.py            # the full run (~15 min on 2 CPU cores): writes benchmarks/results/latest.*
    python benchmarks/run.py --quick    # smoke test on tiny shapes (< 1 min), writes benchmarks/results/tmp/quick.*

One invocation measures, with the same models, prompts, batch and seed:

1. a training step of `trl.DistillationTrainer` (beta=1), `trl.experimental.gkd.GKDTrainer` (beta=1, lmbda=1) and
   `HorizonOPDTrainer` in `full`, `truncated` (rho = 0.1, 0.25, 0.5) and `progressive` (first and last stage): wall
   clock, peak memory and the step broken into rollout, teacher forward, student forward, loss, backward, optimizer
   and the trainer's own overhead (`bench_step.py`);
2. bare `model.generate` on the same prompts: the floor for the rollouts (`bench_generate.py`);
3. the loss alone at vocabularies 32k / 49k / 152k and 512 / 2048 completion positions: HorizonOPDTrainer's loss,
   TRL's chunked distillation loss and GKD's `generalized_jsd_loss` (`bench_loss.py`).

Each step configuration, and each loss implementation, runs in a fresh child process, one after the other, so every
peak-memory figure is that configuration's own. This process never imports torch: with `--lock FILE` it holds an
exclusive `flock` on FILE for each child only (on a shared machine, so no other torch job runs while one is timed, and
none waits for the whole run). It writes `latest.json` (raw figures, method, machine and the `bars` ratios),
`latest.md` (the tables) and `latest.png` through `report.write`.
"""

import argparse
import contextlib
import datetime
import fcntl
import json
import math
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import report  # noqa: E402  (torch-free)

STEP_CONFIGS = ["trl_distillation", "gkd", "full", "truncated_0.1", "truncated_0.25", "truncated_0.5",
                "progressive_first", "progressive_last", "rolling_0.1"]
LOSS_IMPLS = ["horizon", "trl_chunked", "gkd"]

FULL = {
    "preset": "cpu", "warmup": 1, "steps": 3, "generate_repeats": 2,
    "loss_vocabs": [32000, 49152, 151936], "loss_lengths": [512, 2048], "loss_hidden": 256,
    "isolate": True,  # one process per step configuration and per loss implementation
}
QUICK = {
    "preset": "quick", "warmup": 1, "steps": 2, "generate_repeats": 1,
    "loss_vocabs": [2048, 4096], "loss_lengths": [128, 256], "loss_hidden": 64,
    "isolate": False,  # one process for all step configurations, one for all losses (peaks via VmHWM resets)
}
HORIZON_RATIOS = {"full": 1.0, "truncated_0.1": 0.1, "truncated_0.25": 0.25, "truncated_0.5": 0.5,
                  "progressive_first": 0.1, "progressive_last": 1.0, "trl_distillation": 1.0, "gkd": 1.0,
                  "rolling_0.1": 0.1}
PRESET_L = {"cpu": 512, "quick": 32}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a smoke test of the whole pipeline")
    parser.add_argument("--out-dir", default=None,
                        help="default: benchmarks/results (--quick: benchmarks/results/tmp, which git ignores)")
    parser.add_argument("--name", default=None, help="file stem of the outputs (default: latest, or quick)")
    parser.add_argument("--lock", default=None, help="hold an exclusive flock on this file while each child runs")
    parser.add_argument("--only", nargs="+", choices=["steps", "generate", "loss"], default=["steps", "generate", "loss"])
    parser.add_argument("--configs", nargs="+", choices=STEP_CONFIGS, default=STEP_CONFIGS)
    parser.add_argument("--steps", type=int, default=None, help="measured steps per configuration")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the children")
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    if args.steps:
        plan["steps"] = args.steps
    name = args.name or ("quick" if args.quick else "latest")
    if args.out_dir is None:
        args.out_dir = os.path.join(HERE, "results", "tmp") if args.quick else os.path.join(HERE, "results")
    work = os.path.join(args.out_dir, "tmp", name)
    os.makedirs(work, exist_ok=True)
    runner = Runner(work, args.lock, args.threads)
    started = time.perf_counter()
    result = {
        "schema": report.SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "plan": plan,
        "method": report.METHOD,
        "steps": {}, "generate": [], "loss": [], "errors": [],
    }

    if "steps" in args.only:
        groups = [[c] for c in args.configs] if plan["isolate"] else [args.configs]
        for group in groups:
            out = runner.child("bench_step.py", f"step_{'+'.join(group)}", [
                "--preset", plan["preset"], "--configs", *group, "--warmup", str(plan["warmup"]),
                "--steps", str(plan["steps"])])
            if out is None:
                result["errors"].append(f"step {group}: see {work}")
                continue
            result.setdefault("machine", out["machine"])
            result["preset"] = out["preset"]
            for item in out["results"]:
                result["steps"][item["config"]] = item

    if "generate" in args.only:
        L = PRESET_L[plan["preset"]]
        # ceil(rho * L), as horizon_opd.horizon.ratio_to_tokens (not imported: it would import torch)
        horizons = sorted({min(L, max(1, math.ceil(round(HORIZON_RATIOS[c] * L, 9)))) for c in args.configs})
        out = runner.child("bench_generate.py", "generate", [
            "--preset", plan["preset"], "--horizons", *map(str, horizons),
            "--repeats", str(plan["generate_repeats"])])
        if out is None:
            result["errors"].append(f"generate: see {work}")
        else:
            result.setdefault("machine", out["machine"])
            result["generate"] = out["results"]

    if "loss" in args.only:
        # smallest first: every measurement starts from a trimmed heap and a reset high-water mark (measure.PeakRSS)
        shapes = sorted(((v, k) for v in plan["loss_vocabs"] for k in plan["loss_lengths"]), key=lambda s: s[0] * s[1])
        groups = [[i] for i in LOSS_IMPLS] if plan["isolate"] else [LOSS_IMPLS]
        for group in groups:
            out = runner.child("bench_loss.py", f"loss_{'+'.join(group)}", [
                "--shapes", *(f"{v}:{k}" for v, k in shapes), "--hidden", str(plan["loss_hidden"]),
                "--impls", *group])
            if out is None:
                result["errors"].append(f"loss {group}: see {work}")
                continue
            result.setdefault("machine", out["machine"])
            result["loss"].extend(out["results"])

    result["run_time_s"] = time.perf_counter() - started
    result["child_time_s"] = runner.child_seconds
    result["bars"], result["bar_checks"] = report.bars(result)
    stem = os.path.join(args.out_dir, name)
    print(report.write(result, stem, "run"))
    print(f"wrote {stem}.json, {stem}.md, {stem}.png in {result['run_time_s']:.0f} s")
    return 1 if result["errors"] else 0


class Runner:
    """Runs the child scripts one at a time (each under the lock, when one is given) and reads back their JSON."""

    def __init__(self, work: str, lock: str | None, threads: int | None):
        self.work, self.lock, self.threads = work, lock, threads
        self.child_seconds = {}

    def child(self, script: str, tag: str, arguments: list[str]) -> dict | None:
        out = os.path.join(self.work, tag + ".json")
        log = os.path.join(self.work, tag + ".log")
        command = [sys.executable, os.path.join(HERE, script), *arguments, "--out", out]
        if self.threads:
            command += ["--threads", str(self.threads)]
        if os.path.exists(out):
            os.remove(out)
        print(f"[run] {tag}: {shlex.join(command[1:])}", flush=True)
        with self._locked(), open(log, "w") as log_file:
            start = time.perf_counter()
            completed = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=os.path.dirname(HERE))
            self.child_seconds[tag] = round(time.perf_counter() - start, 1)
        print(f"[run] {tag}: exit {completed.returncode} after {self.child_seconds[tag]} s", flush=True)
        if completed.returncode != 0 or not os.path.exists(out):
            with open(log) as f:
                print("".join(f.readlines()[-30:]), file=sys.stderr)
            return None
        with open(out) as f:
            return json.load(f)

    @contextlib.contextmanager
    def _locked(self):
        if self.lock is None:
            yield
            return
        with open(self.lock, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


if __name__ == "__main__":
    sys.exit(main())
