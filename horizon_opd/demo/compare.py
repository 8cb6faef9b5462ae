"""Horizon policies compared on the same step budget: train each method from the same student, evaluate held-out
greedy accuracy at the full horizon along the way, and measure what each run cost (training seconds, decode
iterations, generated and trained tokens, peak memory); then summarize over seeds, compare with OPD, print a table and
plot accuracy against training time and against decode iterations.

Seconds on a CPU follow the tokens generated; a GPU step waits on its decode iterations (its longest rollout). The
token-matched baseline (`opd-matched0.1`: OPD with ceil(0.1 B) prompts per step) separates what a truncated method owes
to its horizon from what it owes to smaller updates."""

import copy
import math
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PrinterCallback

from ..callbacks import HeldOutEvalCallback
from ..config import HorizonOPDConfig
from ..diagnostics import kl_by_position
from ..horizon import policy_from_alias, ratio_to_tokens
from ..monitor import COUNTERS
from ..teachers import has_server
from ..to_target import by_method, cost_to_target, to_target_table
from ..trainer import HorizonOPDTrainer
from .evaluation import evaluate_accuracy
from .measure import PeakRSS, machine_description

# OPD and the two token-matched directions: OPD on TOPD's tokens per update (opd-matched0.1), TOPD and rolling on OPD's
# (the -wide methods); then the horizon policies at the default batch.
DEFAULT_METHOD_NAMES = ("opd", "opd-matched0.1", "topd0.1", "topd-wide0.1", "rolling", "rolling-wide0.1", "popd",
                        "anchored", "adaptive")


# `opd-matched<rho>`: OPD with the prompts per step of a truncated method's tokens per update (ceil(rho * B)).
MATCHED_PREFIX = "opd-matched"
# `<method>-wide<rho>` (`rolling-wide0.1`, `topd-wide0.1`): the truncated method on ceil(B / rho) prompts (slots) per
# step, OPD's tokens per update at a chunk's decode iterations: the other direction of the token-matched comparison.
WIDE_INFIX = "-wide"


# Modifiers a rolling method's name may end with, each after a `+` (`rolling-wide0.1+memory`): `memory`, the student's
# keys and values kept across steps (`rolling_student_memory`), `refresh<k>` with it every k steps; `grad`, the
# context's forward with grad (`rolling_context_grad`); and `resample`, a diagnostic of rolling's gap to OPD, not a
# user option (`demo/rolling_gap.py`): each step's contexts resampled from the current student.
MODIFIERS = ("memory", "refresh<k>", "resample", "grad")


@dataclass
class Method:
    """A named horizon setting: the `HorizonOPDConfig` fields that differ between methods, and for a token-matched
    method the prompts per step it trains on relative to the comparison's B (`batch_ratio`: ceil(batch_ratio * B)
    prompts; below 1 for `opd-matched<rho>`, 1 / rho for `<method>-wide<rho>`). `trainer_class`: the trainer that runs
    it (a diagnostic's subclass; None: `HorizonOPDTrainer`)."""

    name: str
    horizon: dict = field(default_factory=dict)
    batch_ratio: float | None = None
    trainer_class: type | None = None

    def batch_size(self, batch_size: int) -> int:
        """Prompts per step for this method when the comparison runs B = `batch_size`."""
        if self.batch_ratio is None:
            return batch_size
        if self.batch_ratio > 1:  # round first: 1 / 0.1 * 32 is 320.00000000000006
            return math.ceil(round(self.batch_ratio * batch_size, 6))
        return ratio_to_tokens(self.batch_ratio, batch_size)  # ceil(ratio * B) in [1, B], as horizons are rounded


def method(name: str) -> Method:
    """The method a command-line name stands for (`opd`, `opd-matched0.1`, `topd0.1`, `popd`, `popd-stages`,
    `anchored`, `adaptive`, `rolling`, `rolling-wide0.1+memory`, ...), labelled by its policy. Raises ValueError naming
    the accepted names."""
    return with_modifiers(_method(name.split("+")[0]), name)


def with_modifiers(chosen: Method, name: str) -> Method:
    """`chosen` (the method `name` names before its first `+`) with `name`'s modifiers (`MODIFIERS`) applied."""
    modifiers = name.split("+")[1:]
    if modifiers and chosen.horizon.get("horizon") != "rolling":
        raise ValueError(f"{name!r}: the modifiers {MODIFIERS} apply to rolling methods only (rolling0.1+memory, "
                         f"rolling-wide0.1+grad, ...)")
    for modifier in modifiers:
        chosen = _modified(chosen, modifier, name)
    return chosen


def _modified(chosen: Method, modifier: str, name: str) -> Method:
    from .rolling_gap import ResampledContextTrainer  # a diagnostic: imported only when asked

    if modifier == "memory":
        return Method(f"{chosen.name} memory", {**chosen.horizon, "rolling_student_memory": True}, chosen.batch_ratio,
                      chosen.trainer_class)
    if modifier.startswith("refresh") and modifier[len("refresh"):].isdigit() and \
            chosen.horizon.get("rolling_student_memory"):
        k = int(modifier[len("refresh"):])
        return Method(f"{chosen.name} refresh {k}", {**chosen.horizon, "rolling_memory_refresh_every": k},
                      chosen.batch_ratio, chosen.trainer_class)
    if modifier == "grad" and not chosen.horizon.get("rolling_student_memory") and chosen.trainer_class is None:
        return Method(f"{chosen.name} context with grad", {**chosen.horizon, "rolling_context_grad": True},
                      chosen.batch_ratio)
    if modifier == "resample" and chosen.trainer_class is None and not chosen.horizon.get("rolling_context_grad"):
        return Method(f"{chosen.name} resampled contexts", dict(chosen.horizon), chosen.batch_ratio,
                      ResampledContextTrainer)
    raise ValueError(f"{name!r}: unknown or misplaced modifier {modifier!r}; a rolling method takes +memory (then "
                     f"+refresh<k>, e.g. +memory+refresh2), or +grad (rolling_context_grad), or the diagnostic "
                     f"+resample.")


def _method(name: str) -> Method:
    if name.startswith(MATCHED_PREFIX):
        suffix = name[len(MATCHED_PREFIX):]
        try:
            ratio = float(suffix)
        except ValueError:
            raise ValueError(f"unknown method {name!r}: {MATCHED_PREFIX}<rho> needs a ratio, e.g. "
                             f"{MATCHED_PREFIX}0.1") from None
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"{name!r}: the ratio {ratio:g} must be in (0, 1], e.g. {MATCHED_PREFIX}0.1")
        return Method(f"OPD matched rho={ratio:g}", {"horizon": "full"}, batch_ratio=ratio)
    if WIDE_INFIX in name:
        base, suffix = name.split(WIDE_INFIX, 1)
        if base not in ("topd", "rolling") or not suffix:
            raise ValueError(f"unknown method {name!r}: a wide method is topd{WIDE_INFIX}<rho> or "
                             f"rolling{WIDE_INFIX}<rho>, e.g. rolling{WIDE_INFIX}0.1")
        policy_cls, settings = policy_from_alias(base + suffix)
        ratio = settings["truncation_ratio"]
        policy = policy_cls(max_completion_length=100, **settings)
        return Method(f"{policy.label()} wide", {"horizon": policy.name, **settings}, batch_ratio=1 / ratio)
    policy_cls, settings = policy_from_alias(name)
    policy = policy_cls(max_completion_length=100, **settings)  # validates; the label does not depend on L
    return Method(policy.label(), {"horizon": policy.name, **settings})


def run_method(method: Method, student, teacher, tokenizer, train_dataset, eval_dataset, *, output_dir: str,
               max_steps: int, batch_size: int, learning_rate: float, max_completion_length: int, eval_every: int,
               seed: int, temperature: float = 1.0, on_step=None, extra_args: dict | None = None,
               evaluate=None, watch_size: int = 16) -> dict:
    """Distill a copy of `student` with one method; returns the record written to results.json.

    Every `eval_every` steps `evaluate(model)` gives the held-out accuracy, and `trainer.evaluate()` on the first
    `watch_size` held-out prompts measures the reverse KL of full-horizon rollouts, which the collapse alarm reads (a
    truncated run never generates past its horizon otherwise). Neither counts in `train_seconds` or in the costs.
    `batch_size` is the comparison's B; a token-matched method trains on `method.batch_size(B)` prompts per step."""
    batch_size = method.batch_size(batch_size)
    rows = len(train_dataset) if hasattr(train_dataset, "__len__") else None  # a stream has no length
    if method.horizon.get("horizon") != "rolling" and rows is not None and batch_size > rows:
        # TRL's sampler yields whole batches only; rolling draws one prompt per freed slot, epoch after epoch
        print(f"{method.name}: {batch_size} prompts per step exceed the {rows} training prompts; trains on {rows}",
              file=sys.stderr)
        batch_size = rows
    evaluate = evaluate or (lambda model: evaluate_accuracy(model, tokenizer, eval_dataset, max_completion_length))
    watch = eval_dataset.select(range(min(watch_size, len(eval_dataset)))) if watch_size else None
    args = HorizonOPDConfig(
        output_dir=output_dir,
        eval_strategy="steps" if watch is not None else "no",
        eval_steps=eval_every,
        per_device_eval_batch_size=max(1, watch_size),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        learning_rate=learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(5, max_steps // 10),
        max_completion_length=max_completion_length,
        temperature=temperature,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        gradient_checkpointing=False,  # tiny models: recomputation costs time and saves nothing that matters
        bf16=False,
        seed=seed,
        **method.horizon,
        **(extra_args or {}),
    )
    callback = HeldOutEvalCallback(evaluate, every=eval_every, on_step=on_step)
    # With `teacher_model_server_url` in extra_args, teacher is None: the server scores the rollouts.
    trainer_class = method.trainer_class or HorizonOPDTrainer
    trainer = trainer_class(model=copy.deepcopy(student), teacher_model=teacher, args=args, train_dataset=train_dataset,
                            eval_dataset=watch, processing_class=tokenizer, callbacks=[callback])
    callback.costs = trainer.cost.state_dict  # each point of the curve carries the costs so far
    trainer.remove_callback(PrinterCallback)  # the progress bar and the final table report progress instead
    with PeakRSS() as memory:
        trainer.train()
    curve = callback.curve
    history = trainer.state.log_history
    return {
        "name": method.name,
        "seed": seed,
        "batch_size": batch_size,
        "horizon": {**trainer.horizon_policy.setting_values(), "max_completion_length": max_completion_length},
        "final_accuracy": curve[-1]["accuracy"],
        "train_seconds": curve[-1]["train_seconds"],
        **cost_record(trainer),
        "teacher_scored_tokens": trainer.teacher_scored_tokens if has_server(trainer.teachers) else None,
        "peak_memory_mb": round(memory.peak, 1),
        "curve": curve,
        "losses": [e["loss"] for e in history if "loss" in e],
        "grad_norms": [e["grad_norm"] for e in history if "loss" in e and "grad_norm" in e],
        "kl_by_position": kl_by_position(history),
        "eval_kl_by_position": kl_by_position(history, prefix="eval_"),
        "alarm": [e.get("horizon/alarm", 0.0) for e in history if "horizon/alarm" in e and "loss" in e],
        "policy_state": trainer.horizon_policy.state_dict(),
        "model": trainer.model,
    }


def cost_record(trainer) -> dict:
    """What every study's run record carries from its trainer: the costs, the horizon of each step and the alarm."""
    cost = trainer.cost
    return {"tokens_generated": cost.generated_tokens, "decode_iterations": cost.decode_iterations,
            "trained_tokens": cost.trained_tokens, "counts": {name: getattr(cost, name) for name in COUNTERS},
            "horizons": list(trainer.horizon_history), "alarm_events": trainer.alarm.events,
            "alarm_trace": trainer.alarm.trace}


def run_comparison(methods: list[Method], student, teacher, tokenizer, train_dataset, eval_dataset, *, seeds,
                   out: Path, steps: int, batch_size: int, learning_rate: float, max_completion_length: int,
                   eval_every: int, evaluate, save_model: bool = False, settings: dict | None = None,
                   extra_args: dict | None = None) -> dict:
    """Every method for every seed, one after another in this process; returns the results (written to
    `out/results.json`, with the plot `out/accuracy_vs_time.png`). `extra_args` are config fields for every run
    (e.g. `teacher_model_server_url` with `teacher=None`: the teacher's accuracy is then not measured, NaN)."""
    teacher_accuracy = evaluate(teacher) if teacher is not None else float("nan")
    student_accuracy = evaluate(student)
    print(f"teacher held-out accuracy {teacher_accuracy:.3f}   student before distillation {student_accuracy:.3f}")
    progress = _Progress(steps * len(methods) * len(seeds))
    records = []
    for seed in seeds:
        for m in methods:
            progress.start(f"{m.name} seed {seed}")
            record = run_method(m, student, teacher, tokenizer, train_dataset, eval_dataset,
                                output_dir=str(out / "trainer"), max_steps=steps, batch_size=batch_size,
                                learning_rate=learning_rate, max_completion_length=max_completion_length,
                                eval_every=eval_every, seed=seed, on_step=progress.step, evaluate=evaluate,
                                extra_args=extra_args)
            model = record.pop("model")
            if save_model:
                path = out / "models" / f"{m.name.replace(' ', '_').replace('>', '')}_seed{seed}"
                model.save_pretrained(path)
                tokenizer.save_pretrained(path)
            progress.done(f"{m.name} seed {seed}: accuracy {record['final_accuracy']:.3f}, "
                          f"{record['train_seconds']:.1f} s, {record['decode_iterations']} decode iterations, "
                          f"{record['tokens_generated']} tokens")
            records.append(record)
    progress.close()
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_description(),
        "settings": {"steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
                     "eval_every": eval_every, "max_completion_length": max_completion_length, "seeds": list(seeds),
                     "eval_prompts": len(eval_dataset), **(extra_args or {}), **(settings or {})},
        "teacher_accuracy": teacher_accuracy,
        "student_accuracy": student_accuracy,
        "methods": records,
        "summary": summarize(records),
    }
    results["bars"] = compare_with_opd(results)
    results["to_target"] = cost_to_opd_quality(results)
    (out / "results.json").write_text(_json(results))
    plot(results, out / "accuracy_vs_time.png")
    print(format_table(results))
    print_to_target(results)
    print(f"wrote {out / 'results.json'} and {out / 'accuracy_vs_time.png'}")
    return results


def cost_to_opd_quality(results: dict) -> dict | None:
    """Each method's cost to OPD's mean accuracy at 50% and 100% of its steps (`horizon_opd.to_target`); None without
    an OPD run."""
    runs = by_method(results["methods"])
    if "OPD" not in runs:
        return None
    return cost_to_target(runs, "accuracy", higher_is_better=True, reference="OPD")


def print_to_target(results: dict) -> None:
    if results.get("to_target"):
        print("\n".join(to_target_table(results["to_target"])))


class _Progress:
    """A progress bar on a terminal; on a log file or pipe, one line per finished run instead of a rewritten line."""

    def __init__(self, total: int):
        self.interactive = sys.stdout.isatty()
        if self.interactive:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="distilling", unit="step", file=sys.stdout)

    def start(self, label: str):
        if self.interactive:
            self.bar.set_postfix_str(label)

    def step(self):
        if self.interactive:
            self.bar.update()

    def done(self, line: str):
        if not self.interactive:
            print(line, flush=True)

    def close(self):
        if self.interactive:
            self.bar.close()


def time_to_reach(curve: list[dict], target: float, key: str = "train_seconds") -> float | None:
    """Training seconds (or another field of the point, e.g. "step" or "decode_iterations") at the first evaluation
    whose accuracy is >= target (None if never, or if the curve does not record `key`)."""
    for point in curve:
        if point["accuracy"] >= target - 1e-9:
            return point.get(key)
    return None


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))


def summarize(records: list[dict]) -> list[dict]:
    """Per method: mean and standard deviation over seeds."""
    rows = []
    for name in dict.fromkeys(r["name"] for r in records):
        runs = [r for r in records if r["name"] == name]
        row = {"name": name, "seeds": len(runs)}
        for key in ("final_accuracy", "train_seconds", "decode_iterations", "tokens_generated", "trained_tokens",
                    "peak_memory_mb", "teacher_scored_tokens", "batch_size"):
            if all(r.get(key) is not None for r in runs):  # teacher_scored_tokens: remote teacher only
                row[key], row[key + "_std"] = mean_std([float(r[key]) for r in runs])
        rows.append(row)
    return rows


def compare_with_opd(results: dict) -> dict:
    """Per seed and method, against OPD of the same seed: the final-accuracy gap (OPD minus method), the ratios of
    training seconds, decode iterations, generated and trained tokens, and the training seconds and decode iterations
    each needs to reach 90% of OPD's final accuracy (the paper's POPD comparison). Methods without an OPD run of their
    seed are left out."""
    by_seed = {}
    for r in results["methods"]:
        by_seed.setdefault(r["seed"], {})[r["name"]] = r
    rows = []
    for seed, runs in by_seed.items():
        opd = runs.get("OPD")
        if opd is None:
            continue
        target = 0.9 * opd["final_accuracy"]
        opd_time = time_to_reach(opd["curve"], target)
        opd_decode = time_to_reach(opd["curve"], target, "decode_iterations")
        for name, r in runs.items():
            if name == "OPD":
                rows.append({"seed": seed, "method": name, "opd_gain": opd["final_accuracy"] -
                             results["student_accuracy"], "time_to_90pct": opd_time,
                             "decode_iterations_to_90pct": opd_decode})
                continue
            time_90 = time_to_reach(r["curve"], target)
            decode_90 = time_to_reach(r["curve"], target, "decode_iterations")
            rows.append({
                "seed": seed, "method": name,
                "accuracy_gap": opd["final_accuracy"] - r["final_accuracy"],
                "time_ratio": r["train_seconds"] / opd["train_seconds"],
                "token_ratio": r["tokens_generated"] / max(1, opd["tokens_generated"]),
                "decode_ratio": _ratio(r.get("decode_iterations"), opd.get("decode_iterations")),
                "trained_token_ratio": _ratio(r.get("trained_tokens"), opd.get("trained_tokens")),
                "time_to_90pct": time_90,
                "time_to_90pct_ratio": _ratio(time_90, opd_time),
                "decode_iterations_to_90pct": decode_90,
                "decode_to_90pct_ratio": _ratio(decode_90, opd_decode),
            })
    return {"per_seed": rows}


def _ratio(value, reference) -> float | None:
    return None if value is None or not reference else value / reference


# The cost columns of the table: (summary key, header). Shown with their share of OPD's where an OPD run exists.
COST_COLUMNS = (("train_seconds", "train seconds (CPU)"), ("decode_iterations", "decode iterations"),
                ("tokens_generated", "tokens generated"), ("trained_tokens", "tokens trained"))


def format_table(results: dict) -> str:
    """The summary as a Markdown table: accuracy, then each cost as mean (± std over seeds) and its share of OPD's."""
    s = results["settings"]
    rows = results["summary"]
    remote = all("teacher_scored_tokens" in row for row in rows)
    opd = next((row for row in rows if row["name"] == "OPD"), None)
    headers = ["method", "prompts/step", "final accuracy", *(h for _, h in COST_COLUMNS), "peak memory (MB)"]
    if remote:  # a teacher server scored the rollouts: its cost, in tokens
        headers.append("tokens scored by the teacher server")
    lines = [
        f"teacher accuracy {results['teacher_accuracy']:.3f}, student before {results['student_accuracy']:.3f}, "
        f"{s['steps']} steps x {s['batch_size']} prompts, lr {s['learning_rate']:g}, L = {s['max_completion_length']}, "
        f"seeds {s['seeds']}",
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
    ]
    for row in rows:
        def cell(key, digits, share=False):
            if key not in row:
                return "–"
            text = f"{row[key]:.{digits}f}"
            if row["seeds"] > 1:
                text += f" ± {row[key + '_std']:.{digits}f}"
            if share and opd is not None and row is not opd and opd.get(key):
                text += f" ({row[key] / opd[key]:.0%})"
            return text

        cells = [row["name"], f"{row['batch_size']:.0f}" if "batch_size" in row else str(s["batch_size"]),
                 cell("final_accuracy", 3), *(cell(key, 1 if key == "train_seconds" else 0, share=True)
                                              for key, _ in COST_COLUMNS), cell("peak_memory_mb", 0)]
        if remote:
            cells.append(cell("teacher_scored_tokens", 0, share=True))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_cost_curves(runs: list[dict], y_key: str, style, *, wall_label: str, figsize: tuple):
    """Two panels sharing y: `y_key` of each run's curve against its training seconds and against its decode
    iterations (what a GPU step waits on). `style(run)` gives each line's matplotlib keywords (a `label` is shown
    once per panel). Returns the figure and its two axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=figsize, sharey=True)
    panels = (("train_seconds", wall_label),
              ("decode_iterations", "decode iterations (sum over steps of the longest rollout)"))
    for ax, (key, xlabel) in zip(axes, panels, strict=True):
        labelled = set()
        for r in runs:
            if any(key not in p for p in r["curve"]):  # results written before the cost accounting
                continue
            keywords = style(r)
            if keywords.get("label") in labelled:
                keywords["label"] = None
            labelled.add(keywords.get("label"))
            ax.plot([p[key] for p in r["curve"]], [p[y_key] for p in r["curve"]], marker="o", markersize=3,
                    alpha=0.9, **keywords)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.grid(alpha=0.3)
    return fig, axes


def plot(results: dict, path: Path) -> None:
    """Accuracy against training seconds (what this machine paid) beside accuracy against decode iterations (what a
    GPU step waits on); one colour per method, every seed drawn."""
    import matplotlib.pyplot as plt

    colors = {}
    fig, axes = plot_cost_curves(
        results["methods"], "accuracy",
        lambda r: {"color": colors.setdefault(r["name"], f"C{len(colors)}"), "label": r["name"]},
        wall_label="training wall-clock on this machine (s, evaluation excluded)", figsize=(12, 4.5))
    for ax in axes:
        if not math.isnan(results["teacher_accuracy"]):  # NaN: a remote teacher, not evaluated here
            ax.axhline(results["teacher_accuracy"], color="gray", linestyle="--", linewidth=1, label="teacher")
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("held-out greedy accuracy (full horizon)")
    axes[1].legend(loc="lower right", fontsize=8)
    s = results["settings"]
    title = f"{' vs '.join(colors)} ({s['steps']} steps, lr {s['learning_rate']:g})"
    fig.suptitle(textwrap.fill(title, 140), fontsize=9)  # many methods' names do not fit one line
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _json(results: dict) -> str:
    import json

    return json.dumps(results, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))


def merge_runs(run_dirs: list[str], out: str) -> dict:
    """Merge the results.json of runs made one seed per process (same settings otherwise) into one, with the summary,
    the comparison with OPD, the table and the plot recomputed over all of them; written to `out`."""
    import json

    runs = [json.loads((Path(d) / "results.json").read_text()) for d in run_dirs]
    keys = ("steps", "batch_size", "learning_rate", "max_completion_length")
    for run in runs[1:]:
        if any(run["settings"][k] != runs[0]["settings"][k] for k in keys):
            raise ValueError(f"runs differ in settings {keys}: {[r['settings'] for r in runs]}")
    results = {**runs[0], "methods": [m for run in runs for m in run["methods"]]}
    results["settings"] = {**runs[0]["settings"], "seeds": [s for run in runs for s in run["settings"]["seeds"]]}
    results["summary"] = summarize(results["methods"])
    results["bars"] = compare_with_opd(results)
    results["to_target"] = cost_to_opd_quality(results)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(_json(results))
    plot(results, out / "accuracy_vs_time.png")
    print(format_table(results))
    print_to_target(results)
    return results
