"""The one report writer of the benchmarks: bars, markdown tables and plots of `run.py`'s and `gpu.py`'s results, and
the files they are written to (torch-free, so neither script imports torch)."""

import json
import math
import os
import re

METHOD = {
    "step_time": "wall clock between consecutive on_step_end callbacks (the whole training loop), median over the "
                 "measured steps after a warm-up step; batch = one generation batch, gradient_accumulation_steps=1",
    "breakdown": "read at public seams by one hook (bench_step.StepTimer: Trainer callbacks, forward hooks, gradient "
                 "hooks; no method replaced): generation = the rollout, from on_step_begin to the training pass's "
                 "first forward (tokenising, generate, masking, padding); teacher/student forward = the backbones "
                 "(GKD: the whole models, LM heads included); loss = the divergence forward and backward, from the "
                 "last backbone forward until the gradient reaches the student's last hidden states (GKD: logits); "
                 "student_backward = the rest of the backward, until the last parameter gradient is accumulated; "
                 "optimizer = from there to on_step_end (clipping + optimizer.step + scheduler + zero_grad); "
                 "overhead = step minus all of these",
    "overhead_fraction": "overhead / step, median over measured steps; the bar takes the largest over the "
                         "HorizonOPDTrainer configurations",
    "memory_cpu": "peak RSS above the RSS before the models were built (all libraries already imported): VmHWM, "
                  "reset via /proc/self/clear_refs, minus that baseline",
    "isolation": "full run: every step configuration and every loss implementation in its own fresh process, run "
                 "one after the other; --quick: one process for all step configurations and one for all losses",
    "memory_gpu": "torch.cuda.max_memory_allocated after reset_peak_memory_stats",
    "loss": "batch 1, every position trained on, student and teacher hidden width `hidden`; each implementation "
            "includes its LM-head projection; forward + backward of one call after a tiny warm-up call; memory above "
            "the inputs (heap trimmed and high-water mark reset before each shape); each implementation in its own "
            "process, shapes in increasing size",
    "generation_floor": "model.generate on the same prompts, batch and sampling settings (temperature 1, top-k 0, "
                        "top-p 1, KV cache); median over repeats after a warm-up call",
    "tokens": "generated completion tokens per step (up to and including EOS), summed over the batch",
}

BAR_TARGETS = {  # name: (comparison, threshold)
    "full_vs_trl_time": ("<=", 1.05),
    "full_vs_trl_memory": ("<=", 1.05),
    "truncated_0.1_speedup_vs_full": (">=", 5.0),
    "truncated_0.1_token_fraction": ("<=", 0.11),
    "loss_memory_vs_gkd_152k_2048": ("<=", 1 / 3),
    "loss_memory_vs_trl_chunked_152k_2048": ("<=", 1.0),
    "overhead_fraction": ("<=", 0.10),
}
HORIZON_CONFIGS = ("full", "truncated_0.1", "truncated_0.25", "truncated_0.5", "progressive_first", "progressive_last",
                   "rolling_0.1")
LABELS = {"trl_distillation": "TRL DistillationTrainer", "gkd": "TRL GKDTrainer", "full": "Horizon full",
          "truncated_0.1": "Horizon truncated 0.1", "truncated_0.25": "Horizon truncated 0.25",
          "truncated_0.5": "Horizon truncated 0.5", "progressive_first": "Horizon progressive (first stage)",
          "progressive_last": "Horizon progressive (last stage)", "rolling_0.1": "Horizon rolling 0.1"}
SEGMENTS = ("generation", "student_context", "teacher_forward", "student_forward", "loss", "student_backward",
            "optimizer", "overhead")
# Schema 1 (before the seams) timed the loss forward and backward apart, and the rollout as the generation call only.
SCHEMA = 2


def _ratio(a, b):
    if a is None or b is None or b == 0 or (isinstance(a, float) and math.isnan(a)):
        return None
    return a / b


def machine_line(machine: dict | None) -> str:
    if not machine:
        return "unknown"
    if machine.get("device") == "cuda":
        return (f"{machine.get('gpu')} ({machine.get('gpu_memory_gb')} GB), CUDA {machine.get('cuda')}, "
                f"torch {machine.get('torch')}")
    return (f"{machine.get('cpu')}, {machine.get('cpu_count')} cores ({machine.get('torch_threads')} torch threads), "
            f"{machine.get('ram_gb')} GB RAM, torch {machine.get('torch')}, transformers {machine.get('transformers')},"
            f" trl {machine.get('trl')}")


def public_command(command: str) -> str:
    """The command as a reader would type it: the lock file is this machine's, so it is not printed."""
    return re.sub(r"--lock(=|\s+)\S+", "--lock FILE", command or "")


def step_median(r: dict, segment: str):
    """A configuration's median `segment`; for schema-1 results, `loss` is the median of loss_forward + loss_backward."""
    m = r["median"]
    if segment == "loss" and "loss" not in m and "loss_forward" in m:
        return _median([s["loss_forward"] + s["loss_backward"] for s in r.get("steps", [])])
    return m.get(segment)


def _median(values):
    values = sorted(values)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def loss_point(result: dict) -> tuple[int, int] | None:
    """(vocab, length) of the loss bars: 152k x 2048, or the largest measured shape (quick runs)."""
    shapes = {(r["vocab"], r["length"]) for r in result.get("loss", [])}
    if not shapes:
        return None
    return (151936, 2048) if (151936, 2048) in shapes else max(shapes, key=lambda s: s[0] * s[1])


def loss_memory(result: dict, impl: str, shape) -> float | None:
    for r in result.get("loss", []):
        if r["impl"] == impl and (r["vocab"], r["length"]) == tuple(shape):
            return r["peak_memory_mb"]
    return None


def bars(result: dict) -> tuple[dict, dict]:
    steps = result.get("steps", {})

    def med(config, key="step"):
        return steps[config]["median"].get(key) if config in steps else None

    def memory(config):
        return steps[config]["peak_memory_increase_mb"] if config in steps else None

    values = {
        "full_vs_trl_time": _ratio(med("full"), med("trl_distillation")),
        "full_vs_trl_memory": _ratio(memory("full"), memory("trl_distillation")),
        "truncated_0.1_speedup_vs_full": _ratio(med("full"), med("truncated_0.1")),
        "truncated_0.1_token_fraction": _ratio(med("truncated_0.1", "tokens"), med("full", "tokens")),
    }
    shape = loss_point(result)
    if shape is not None:
        horizon = loss_memory(result, "horizon", shape)
        values["loss_memory_vs_gkd_152k_2048"] = _ratio(horizon, loss_memory(result, "gkd", shape))
        values["loss_memory_vs_trl_chunked_152k_2048"] = _ratio(horizon, loss_memory(result, "trl_chunked", shape))
    else:
        values["loss_memory_vs_gkd_152k_2048"] = values["loss_memory_vs_trl_chunked_152k_2048"] = None
    by_config = {c: med(c, "overhead_fraction") for c in HORIZON_CONFIGS if c in steps}
    values["overhead_fraction"] = max(by_config.values()) if by_config else None
    checks = {}
    for name, (op, threshold) in BAR_TARGETS.items():
        value = values.get(name)
        passed = None if value is None else (value <= threshold if op == "<=" else value >= threshold)
        checks[name] = {"value": value, "target": f"{op} {threshold:.4g}", "pass": passed}
    values["machine"] = machine_line(result.get("machine"))
    checks["_notes"] = {
        "overhead_fraction_by_config": by_config,
        "loss_shape": None if shape is None else {"vocab": shape[0], "length": shape[1]},
        "quick": result.get("quick", False),
    }
    return values, checks


# ------------------------------------------------------------------------------------------------ markdown
def _f(value, digits=2, suffix=""):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}{suffix}"


def markdown(result: dict) -> str:
    lines = []
    preset = result.get("preset", {})
    title = "Quick smoke run (tiny shapes: the numbers mean nothing)" if result.get("quick") else "Benchmark"
    lines += [f"### {title} — {result.get('date', '')}", "",
              f"Machine: {machine_line(result.get('machine'))}. Command: `{public_command(result.get('command'))}` "
              f"({sum((result.get('child_time_s') or {}).values()) / 60:.1f} min of measurement, "
              f"{result.get('run_time_s', 0) / 60:.1f} min wall clock).", ""]
    if preset:
        s, t = preset["student"], preset["teacher"]
        params = next(iter(result.get("steps", {}).values()), {}).get("params", {})
        lines += [f"Models: random-weight Qwen2, student {s[0]}x{s[1]} layers ({params.get('student', 0) / 1e6:.1f}M "
                  f"params), teacher {t[0]}x{t[1]} layers ({params.get('teacher', 0) / 1e6:.1f}M params), vocabulary "
                  f"{preset['vocab_size']}, {preset['dtype']}; batch {preset['batch_size']} prompts of "
                  f"{preset['prompt_tokens']} tokens, L = {preset['max_completion_length']}; "
                  f"{result['plan']['warmup']} warm-up + {result['plan']['steps']} measured steps (median).", ""]

    checks = result.get("bar_checks", {})
    lines += ["| bar | value | target | |", "|---|---|---|---|"]
    for name, check in checks.items():
        if name.startswith("_"):
            continue
        mark = {True: "pass", False: "**FAIL**", None: "–"}[check["pass"]]
        lines.append(f"| `{name}` | {_f(check['value'], 3)} | {check['target']} | {mark} |")
    lines.append("")

    steps = result.get("steps", {})
    if steps:
        trl = steps.get("trl_distillation")
        lines += ["| configuration | horizon | tokens/step | step (s) | vs TRL | peak mem (MB) | vs TRL | "
                  "rollout | student context (no grad) | teacher fwd | student fwd | loss fwd+bwd | student bwd | "
                  "optimizer | overhead |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for config, r in steps.items():
            m = r["median"]
            cells = [LABELS.get(config, config), str(r["horizon_tokens"]), _f(m["tokens"], 0), _f(m["step"]),
                     _f(_ratio(m["step"], trl["median"]["step"]) if trl else None),
                     _f(r["peak_memory_increase_mb"], 0),
                     _f(_ratio(r["peak_memory_increase_mb"], trl["peak_memory_increase_mb"]) if trl else None)]
            cells += [_f(step_median(r, s)) for s in SEGMENTS[:-1]]
            cells.append(f"{_f(m.get('overhead'))} ({_f(100 * m['overhead_fraction'], 1)}%)")
            lines.append("| " + " | ".join(cells) + " |")
        isolated = (result.get("plan") or {}).get("isolate", True)
        lines += ["", "Times in seconds (median). Peak memory: " + (
            METHOD["memory_gpu"] if (result.get("machine") or {}).get("device") == "cuda" else METHOD["memory_cpu"])
            + (", each configuration in its own process." if isolated else ", all configurations in one process.")
            + (" Measured with the schema-1 instrumentation (trainer methods wrapped with timers): rollout is the "
               "generation call alone, without tokenising and padding." if result.get("schema", 1) < 2 else ""), ""]

    floor = {g["horizon"]: g for g in result.get("generate", [])}
    if floor and steps:
        lines += ["| configuration | horizon | rollout tokens/s | `model.generate` tokens/s (floor) | of floor |",
                  "|---|---|---|---|---|"]
        for config, r in steps.items():
            g = floor.get(r["horizon_tokens"])
            rate = _ratio(r["median"]["tokens"], r["median"]["generation"])
            lines.append(f"| {LABELS.get(config, config)} | {r['horizon_tokens']} | {_f(rate, 0)} | "
                         f"{_f(g['tokens_per_s'] if g else None, 0)} | "
                         f"{_f(100 * _ratio(rate, g['tokens_per_s']) if g else None, 0, '%')} |")
        lines.append("")

    losses = result.get("loss", [])
    if losses:
        shapes = sorted({(r["vocab"], r["length"]) for r in losses})
        lines += ["| vocab | positions | Horizon OPD loss MB / s | TRL chunked MB / s | GKD generalized_jsd_loss MB / s "
                  "| Horizon / GKD mem | Horizon / TRL chunked mem |", "|---|---|---|---|---|---|---|"]
        for vocab, length in shapes:
            by = {r["impl"]: r for r in losses if (r["vocab"], r["length"]) == (vocab, length)}
            cells = [str(vocab), str(length)]
            for impl in ("horizon", "trl_chunked", "gkd"):
                r = by.get(impl)
                cells.append(f"{_f(r['peak_memory_mb'], 0)} / {_f(r.get('time_s'), 2)}" if r else "–")
            h = by.get("horizon", {}).get("peak_memory_mb")
            cells.append(_f(_ratio(h, by.get("gkd", {}).get("peak_memory_mb")), 3))
            cells.append(_f(_ratio(h, by.get("trl_chunked", {}).get("peak_memory_mb")), 3))
            lines.append("| " + " | ".join(cells) + " |")
        hidden = losses[0].get("hidden")
        lines += ["", f"Loss alone, forward + backward, batch 1, hidden {hidden}, float32; memory above the inputs.", ""]
    if result.get("errors"):
        lines += ["Errors: " + "; ".join(result["errors"]), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plot
def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result.get("steps", {})
    losses = result.get("loss", [])
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))

    ax = axes[0]
    configs = list(steps)
    left = [0.0] * len(configs)
    colors = plt.get_cmap("tab10").colors
    for i, segment in enumerate(SEGMENTS):
        widths = [max(0.0, step_median(steps[c], segment) or 0.0) for c in configs]
        ax.barh(range(len(configs)), widths, left=left, color=colors[i % 10], label=segment.replace("_", " "))
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(range(len(configs)), [LABELS.get(c, c) for c in configs], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per optimizer step (median)")
    ax.set_title("Where a step goes")
    if configs:
        ax.legend(fontsize=7, loc="lower right")

    ax = axes[1]
    points = sorted((steps[c]["horizon_tokens"], steps[c]["median"]["step"], steps[c]["median"]["generation"])
                    for c in ("truncated_0.1", "truncated_0.25", "truncated_0.5", "full") if c in steps)
    if points:
        xs = [p[0] for p in points]
        ax.plot(xs, [p[1] for p in points], "o-", label="HorizonOPDTrainer step")
        ax.plot(xs, [p[2] for p in points], "s--", label="its rollout")
        floor = {g["horizon"]: g["time_s"] for g in result.get("generate", [])}
        fx = [x for x in xs if x in floor]
        if fx:
            ax.plot(fx, [floor[x] for x in fx], "k:", marker="^", label="bare model.generate (floor)")
        for name, marker in (("trl_distillation", "x"), ("gkd", "+")):
            if name in steps:
                ax.plot([steps[name]["horizon_tokens"]], [steps[name]["median"]["step"]], marker, ms=12,
                        label=LABELS[name])
    ax.set_xlabel("rollout horizon (tokens)")
    ax.set_ylabel("seconds")
    ax.set_title("Step time vs horizon")
    if points:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)

    ax = axes[2]
    lengths = sorted({r["length"] for r in losses})
    for impl, color in (("horizon", "C0"), ("trl_chunked", "C1"), ("gkd", "C3")):
        for length, style in zip(lengths, ("--", "-")):
            pts = sorted((r["vocab"], r["peak_memory_mb"]) for r in losses if r["impl"] == impl and r["length"] == length)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, marker="o",
                        label=f"{impl} K={length}")
    if losses:
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    ax.set_xlabel("vocabulary size")
    ax.set_ylabel("peak memory of the loss (MB)")
    ax.set_title("Loss alone: peak memory")
    ax.grid(alpha=0.3, which="both")

    fig.suptitle(f"horizon_opd benchmark — {machine_line(result.get('machine'))}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ gpu.py
def gpu_markdown(result: dict) -> str:
    lines = [f"### GPU benchmark — {result['date']}", "",
             f"Device: {machine_line(result.get('machine'))}. Command: `{public_command(result['command'])}` "
             f"({result['run_time_s'] / 60:.1f} min). Models: `{result['preset']}` shapes, random weights.", "",
             "| L | configuration | horizon | tokens/step | step (s) | rollout (s) | peak memory (MB) |",
             "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['L']} | {LABELS.get(r['config'], r['config'])} | {r['horizon_tokens']} | "
                     f"{r['tokens']:.0f} | {r['step_s']:.2f} | {r['generation_s']:.2f} | {r['peak_memory_mb']:.0f} |")
    if result["runs"]:
        lines += ["", f"Peak memory: {result['runs'][0]['memory_method']}.", ""]
    costs = result.get("costs")
    if costs:
        lines += ["", f"#### Measured rates ({costs['device']}, preset `{costs['preset']['name']}`)", "",
                  "| student `generate`, batch | mean context | ms per decode iteration |", "|---|---|---|"]
        for p in costs["decode"]:
            lines.append(f"| {p['batch']} | {p['context']:.0f} | {1e3 * p['seconds_per_iteration']:.2f} |")
        lines += ["", "| pass | tokens | seconds | achieved TFLOP/s |", "|---|---|---|---|"]
        for kind, m in costs["compute"].items():
            lines.append(f"| {kind.replace('_', ' ')} | {m['tokens']} | {m['seconds']:.3f} | "
                         f"{m['flops'] / m['seconds'] / 1e12:.2f} |")
        lines += ["", "#### The GPU cost model with these rates (gpu_model.py)", "", result.get("model_markdown", ""),
                  ""]
    if result["errors"]:
        lines += ["Errors: " + "; ".join(result["errors"]), ""]
    return "\n".join(lines)


def gpu_plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for config in dict.fromkeys(r["config"] for r in result["runs"]):
        runs = sorted((r for r in result["runs"] if r["config"] == config), key=lambda r: r["L"])
        label = LABELS.get(config, config)
        left.plot([r["L"] for r in runs], [r["step_s"] for r in runs], "o-", label=label)
        right.plot([r["L"] for r in runs], [r["peak_memory_mb"] / 1024 for r in runs], "o-", label=label)
    for ax, ylabel in ((left, "seconds per step (median)"), (right, "peak memory (GiB)")):
        ax.set_xlabel("full horizon L (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if result["runs"]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{result['preset']} — {machine_line(result.get('machine'))}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ files
def write(result: dict, stem: str, kind: str = "run") -> str:
    """Writes `stem`.json, .md and .png for a `run.py` (kind "run") or `gpu.py` (kind "gpu") result; returns the
    markdown. A failing plot (e.g. no matplotlib) is recorded in `result["errors"]` and loses no measurement."""
    to_markdown, to_plot = (markdown, plot) if kind == "run" else (gpu_markdown, gpu_plot)
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    try:
        to_plot(result, stem + ".png")
    except Exception as error:
        result.setdefault("errors", []).append(f"plot: {error!r}")
    text = to_markdown(result)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(text)
    return text
