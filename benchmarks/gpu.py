"""Step time and peak GPU memory vs the full horizon L, on Qwen2.5-1.5B-shaped models (random weights, bf16), and the
rates that replace the GPU cost model's assumed inputs.

    python benchmarks/gpu.py                       # on a CUDA machine: L in {1024, 4096, 8192}, batch 8, + the rates
    python benchmarks/gpu.py --lengths 1024 4096   # a shorter run
    python benchmarks/gpu.py --only costs          # the rates alone (a few minutes): decode latency, achieved FLOP/s
    python benchmarks/gpu.py --tiny                # the same path on CPU with tiny shapes (what the tests run)

Without CUDA (and without `--tiny`) it exits at once with one line and status 2.

For each L and each configuration (`full`, `truncated_0.1`, `progressive_first`, `progressive_last` by default; any
`bench_step.py` configuration can be named, e.g. `trl_distillation`), one fresh process trains a Qwen2.5-1.5B-shaped
student (hidden 1536, 28 layers, vocab 151936) from a teacher of the same shape for a warm-up step and `--steps`
measured steps, with `transformers` generation. It records the median step time, its breakdown, and
`torch.cuda.max_memory_allocated` (after `reset_peak_memory_stats`), plus the device. Writes
`results/gpu.{json,md,png}` (`results/tmp/gpu_tiny.*` with `--tiny`) through `report.write`.

The rates (`--only costs`, or before the steps): one process (`bench_costs.py`) builds the cost model's pair,
Qwen2.5-1.5B and Qwen2.5-7B shapes (preset `qwen2.5-1.5b-7b`; `tiny` with `--tiny`), and measures the student's
`generate` latency per decode iteration at batch 1, 8, 32, 64 and 128, and the achieved FLOP/s of the student's
forward, its forward + backward and the teacher's forward. They are stored as the results' `costs`, and
`gpu_model.py`'s tables are recomputed with them in place of the assumed bandwidth efficiency, decode floor and MFU
(`model` and `model_markdown` in the results; `python benchmarks/gpu_model.py --measured benchmarks/results/gpu.json`
prints the same).

Time: a rollout of L tokens takes roughly L x the per-token decode latency of `model.generate` (tens of ms for a
1.5B model without vLLM), so a full-horizon step at L = 8192 takes minutes; `truncated_0.1` about a tenth of that.
This process never imports torch; `--lock FILE` holds an flock on FILE while each child runs.
"""

import argparse
import datetime
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gpu_model  # noqa: E402  (torch-free)
import report  # noqa: E402
from run import Runner  # noqa: E402

DEFAULT_CONFIGS = ["full", "truncated_0.1", "progressive_first", "progressive_last"]
NO_CUDA = ("gpu.py: no CUDA device (torch.cuda.is_available() is False): run it on a GPU machine, or pass --tiny for "
           "the CPU path on tiny shapes")


def cuda_available() -> bool:
    """Asked of a child process, so this one never imports torch."""
    probe = subprocess.run([sys.executable, "-c", "import torch; print(int(torch.cuda.is_available()))"],
                           capture_output=True, text=True)
    return probe.returncode == 0 and probe.stdout.strip().endswith("1")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU-sized shapes (preset `tiny`), for smoke tests")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="full horizons L (default 1024 4096 8192)")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 (2 with --tiny)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out-dir", default=None,
                        help="default: benchmarks/results (--tiny: benchmarks/results/tmp, which git ignores)")
    parser.add_argument("--lock", default=None)
    parser.add_argument("--only", nargs="+", choices=["steps", "costs"], default=["steps", "costs"],
                        help="the step runs, the cost model's rates, or both (default)")
    args = parser.parse_args(argv)
    if not args.tiny and not cuda_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    preset = "tiny" if args.tiny else "qwen2.5-1.5b"
    lengths = args.lengths or ([8, 16] if args.tiny else [1024, 4096, 8192])
    name = "gpu_tiny" if args.tiny else "gpu"
    if args.out_dir is None:
        args.out_dir = os.path.join(HERE, "results", "tmp") if args.tiny else os.path.join(HERE, "results")
    work = os.path.join(args.out_dir, "tmp", name)
    os.makedirs(work, exist_ok=True)
    runner = Runner(work, args.lock, None)
    started = time.perf_counter()
    result = {"schema": report.SCHEMA, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "benchmarks/gpu.py", *(argv if argv is not None else sys.argv[1:])]),
              "preset": preset, "lengths": lengths, "runs": [], "errors": []}
    if "costs" in args.only:  # first: a few minutes, where the full-horizon steps at L = 8192 take many
        costs = runner.child("bench_costs.py", "costs", ["--preset", "tiny" if args.tiny else "qwen2.5-1.5b-7b"])
        if costs is None:
            result["errors"].append(f"costs: see {work}")
        else:
            result.setdefault("machine", costs["machine"])
            result["costs"] = costs
            # the model's tables with the measured rates in place of the assumed ones (tiny: at the tiny shapes)
            scenario = (gpu_model.Scenario(batch=2, prompt=12, length=max(lengths), steps=20) if args.tiny
                        else gpu_model.Scenario())
            result["model_markdown"], result["model"] = gpu_model.report(scenario, measured=costs)
    for length in (lengths if "steps" in args.only else []):
        for config in args.configs:
            extra = ["--batch-size", str(args.batch_size)] if args.batch_size else []
            out = runner.child("bench_step.py", f"{config}_L{length}", [
                "--preset", preset, "--configs", config, "--max-completion-length", str(length),
                "--warmup", str(args.warmup), "--steps", str(args.steps), *extra])
            if out is None:
                result["errors"].append(f"{config} L={length}: see {work}")
                continue
            result.setdefault("machine", out["machine"])
            result.setdefault("shapes", out["preset"])
            item = out["results"][0]
            result["runs"].append({"config": config, "L": length, "horizon_tokens": item["horizon_tokens"],
                                   "step_s": item["median"]["step"], "generation_s": item["median"]["generation"],
                                   "tokens": item["median"]["tokens"], "peak_memory_mb": item["peak_memory_mb"],
                                   "memory_method": item["memory_method"], "median": item["median"]})
    result["run_time_s"] = time.perf_counter() - started
    print(report.write(result, os.path.join(args.out_dir, name), "gpu"))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
