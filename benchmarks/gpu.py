"""Step time and peak GPU memory vs the full horizon L, on Qwen2.5-1.5B-shaped models (random weights, bf16).

    python benchmarks/gpu.py                       # on a CUDA machine: L in {1024, 4096, 8192}, batch 8
    python benchmarks/gpu.py --lengths 1024 4096   # a shorter run
    python benchmarks/gpu.py --tiny                # the same path on CPU with tiny shapes (what the tests run)

For each L and each configuration (`full`, `truncated_0.1`, `progressive_first`, `progressive_last` by default; any
`bench_step.py` configuration can be named, e.g. `trl_distillation`), one fresh process trains a Qwen2.5-1.5B-shaped
student (hidden 1536, 28 layers, vocab 151936) from a teacher of the same shape for a warm-up step and `--steps`
measured steps, with `transformers` generation. It records the median step time, its breakdown, and
`torch.cuda.max_memory_allocated` (after `reset_peak_memory_stats`), plus the device. Writes
`results/gpu.{json,md,png}` (`results/tmp/gpu_tiny.*` with `--tiny`) through `report.write`.

Time: a rollout of L tokens takes roughly L x the per-token decode latency of `model.generate` (tens of ms for a
1.5B model without vLLM), so a full-horizon step at L = 8192 takes minutes; `truncated_0.1` about a tenth of that.
This process never imports torch; `--lock FILE` holds an flock on FILE while each child runs.
"""

import argparse
import datetime
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import report  # noqa: E402
from run import Runner  # noqa: E402

DEFAULT_CONFIGS = ["full", "truncated_0.1", "progressive_first", "progressive_last"]


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
    args = parser.parse_args(argv)
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
    for length in lengths:
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
