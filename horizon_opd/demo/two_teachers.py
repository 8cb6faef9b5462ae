"""Two teachers, two regions: why a run routes each prompt to its own teacher (several teachers in one run).

The mismatch task's values form two regions, A (000..099) and B (100..199), each with its own successor cycle
(`horizon_opd.demo.mismatch`). Here prompts start in both regions, and a chain stays in its start's region:

- teacher A was trained on chains of A only (the mismatch task's teacher): right on A, and it never saw a B value;
- teacher B was trained the same way on chains of B only: right on B, blind on A;
- the student was trained on chains of both regions, except that at `CONFUSED` entries of each region its training
  chains take a fixed wrong successor (in the same region) 70% of the time, as the main demo's student does: it
  writes the format and both cycles, and greedily takes the wrong branch wherever a chain meets a confused entry.

Distilled from teacher A alone, the student is taught A's cycle and gets arbitrary feedback on every B rollout (and
the reverse for B); routed by region (`teacher_model={"A": ..., "B": ...}` and a `teacher_id` column naming each
prompt's region), every rollout is scored by the teacher that knows its region. Each configuration runs with OPD and
a horizon policy, for each seed; held-out accuracy is measured per region and overall.

    python -m horizon_opd.demo.two_teachers                     # 3 seeds, OPD and TOPD rho = 0.1 (a few minutes)
    python -m horizon_opd.demo.two_teachers --methods opd rolling --seeds 0

Writes results.json (one record per configuration, method and seed, with per-region accuracy, tokens and decode
iterations), table.md and accuracy_by_region.png to --output-dir.
"""

import argparse
import json
import random
import time
from pathlib import Path

from datasets import Dataset, DatasetDict

from .mismatch import (
    ARCHITECTURE,
    CORRUPT_PROB,
    MAX_COMPLETION_LENGTH,
    NUM_VALUES,
    REGION_SIZE,
    SUCCESSOR,
    answer,
    example,
)
from .task import prompt_text
from .tokenizer import build_char_tokenizer

REGIONS = {"A": range(0, REGION_SIZE), "B": range(REGION_SIZE, NUM_VALUES)}
# The compared teacher configurations: which teachers score the rollouts (one: every prompt; two: each its region's).
CONFIGS = {"teacher A alone": ("A",), "teacher B alone": ("B",), "A and B, routed by region": ("A", "B")}
DEFAULT_METHODS = ("opd", "topd0.1")
CONFUSED = 3  # entries of each region where the student's training chains take a wrong successor


def confusions(per_region: int = CONFUSED, seed: int = 0) -> dict[int, int]:
    """{entry: wrong successor}, `per_region` entries in each region, the wrong successor drawn from the same region."""
    rng = random.Random(seed)
    table = {}
    for region in REGIONS.values():
        for x in rng.sample(list(region), per_region):
            table[x] = rng.choice([v for v in region if v != SUCCESSOR[x]])
    return table


def region_of(start: int) -> str:
    return "A" if start < REGION_SIZE else "B"


def build_datasets(test_fraction: float = 0.4, seed: int = 0) -> DatasetDict:
    """Prompt-only `train`/`test` splits over the starts of both regions (the same share of each held out), with the
    `answer`, the `start`, and the `teacher_id` column naming the start's region."""
    train, test = [], []
    for region in REGIONS.values():
        starts = list(region)
        random.Random(seed).shuffle(starts)
        n_test = int(len(starts) * test_fraction)
        test += starts[:n_test]
        train += starts[n_test:]

    def rows(items):
        return Dataset.from_list([{"prompt": [{"role": "user", "content": prompt_text(s)}], "answer": answer(s),
                                   "start": s, "teacher_id": region_of(s)} for s in items])

    return DatasetDict(train=rows(train), test=rows(test))


def build_models(*, teacher_steps: int = 600, student_steps: int = 600, seed: int = 0, log=print):
    """(teachers {"A": model, "B": model}, student, tokenizer), trained from scratch on the chains described above."""
    from .evaluation import evaluate_accuracy
    from .train_models import build_model, fit

    tokenizer = build_char_tokenizer(number_tokens=NUM_VALUES)
    test = build_datasets()["test"]

    def make(label, region, corrupt_prob, model_seed, steps, confused=None):
        model = build_model(label, tokenizer, model_seed, ARCHITECTURE, max_positions=64)
        fit(model, lambda rng: example(rng, tokenizer, confused, corrupt_prob, region), steps=steps, batch_size=32,
            lr=3e-3, seed=model_seed + seed, eval_every=steps,
            evaluate=lambda m: evaluate_accuracy(m, tokenizer, test, MAX_COMPLETION_LENGTH), log=log, label=label)
        return model

    teachers = {name: make(f"teacher {name}", REGIONS[name], CORRUPT_PROB, i, teacher_steps)
                for i, name in enumerate(REGIONS)}
    student = make("student", range(NUM_VALUES), 0.0, 2, student_steps, confusions(seed=seed))
    return teachers, student, tokenizer


def accuracy_by_region(model, tokenizer, test) -> dict[str, float]:
    from .evaluation import evaluate_accuracy

    out = {}
    for name in REGIONS:
        subset = test.filter(lambda row, name=name: row["teacher_id"] == name)
        out[name] = evaluate_accuracy(model, tokenizer, subset, MAX_COMPLETION_LENGTH)
    out["overall"] = sum(out[name] * len(REGIONS[name]) for name in REGIONS) / NUM_VALUES  # equal-sized test halves
    return out


def run(out: Path, *, seeds, steps: int, batch_size: int, learning_rate: float, eval_every: int,
        method_names=DEFAULT_METHODS, teacher_steps: int = 600, student_steps: int = 600) -> dict:
    """Every teacher configuration with every method for every seed, one after another in this process."""
    from .compare import method, run_method

    out.mkdir(parents=True, exist_ok=True)
    teachers, student, tokenizer = build_models(teacher_steps=teacher_steps, student_steps=student_steps)
    data = build_datasets()
    before = {"student": accuracy_by_region(student, tokenizer, data["test"]),
              **{f"teacher {n}": accuracy_by_region(t, tokenizer, data["test"]) for n, t in teachers.items()}}
    print(f"held-out accuracy before distillation, by region: {json.dumps(before)}", flush=True)
    records = []
    for seed in seeds:
        for name in method_names:
            for config, names in CONFIGS.items():
                teacher = teachers[names[0]] if len(names) == 1 else {n: teachers[n] for n in names}
                record = run_method(method(name), student, teacher, tokenizer, data["train"], data["test"],
                                    output_dir=str(out / "trainer"), max_steps=steps, batch_size=batch_size,
                                    learning_rate=learning_rate, max_completion_length=MAX_COMPLETION_LENGTH,
                                    eval_every=eval_every, seed=seed)  # evaluates held-out accuracy on data["test"]
                model = record.pop("model")
                record.update(config=config, method_key=name, accuracy=accuracy_by_region(model, tokenizer,
                                                                                           data["test"]))
                print(f"{config} | {record['name']} | seed {seed}: accuracy {record['accuracy']}, "
                      f"{record['train_seconds']:.1f} s, {record['decode_iterations']} decode iterations", flush=True)
                records.append(record)
    results = {"date": time.strftime("%Y-%m-%d"), "settings": {
        "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate, "eval_every": eval_every,
        "seeds": list(seeds), "teacher_steps": teacher_steps, "student_steps": student_steps,
        "max_completion_length": MAX_COMPLETION_LENGTH, "train_prompts": len(data["train"]),
        "test_prompts": len(data["test"])}, "before": before, "records": records}
    from .compare import machine_description

    results["machine"] = machine_description()
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    table = format_table(results)
    (out / "table.md").write_text(table + "\n")
    plot(results, out / "accuracy_by_region.png")
    print(table)
    return results


def _mean(values) -> float:
    return sum(values) / len(values)


def rows(results: dict) -> list[dict]:
    """One row per (configuration, method): means over seeds of accuracy per region, tokens and decode iterations."""
    out = []
    keys = dict.fromkeys((r["config"], r["name"]) for r in results["records"])
    for config, name in keys:
        runs = [r for r in results["records"] if r["config"] == config and r["name"] == name]
        out.append({"config": config, "method": name, "seeds": len(runs),
                    **{f"accuracy_{k}": _mean([r["accuracy"][k] for r in runs]) for k in (*REGIONS, "overall")},
                    "per_seed_overall": [r["accuracy"]["overall"] for r in runs],
                    "tokens_generated": _mean([r["tokens_generated"] for r in runs]),
                    "decode_iterations": _mean([r["decode_iterations"] for r in runs]),
                    "train_seconds": _mean([r["train_seconds"] for r in runs])})
    return out


def format_table(results: dict) -> str:
    lines = ["| teachers | method | accuracy on A | on B | overall (per seed) | tokens generated | decode it. | train s |",
             "|---|---|---|---|---|---|---|---|"]
    before = results["before"]
    for who, acc in before.items():
        lines.append(f"| {who} (before) | | {acc['A']:.3f} | {acc['B']:.3f} | {acc['overall']:.3f} | | | |")
    for r in rows(results):
        seeds = ", ".join(f"{v:.2f}" for v in r["per_seed_overall"])
        lines.append(f"| {r['config']} | {r['method']} | {r['accuracy_A']:.3f} | {r['accuracy_B']:.3f} | "
                     f"{r['accuracy_overall']:.3f} ({seeds}) | {r['tokens_generated']:,.0f} | "
                     f"{r['decode_iterations']:,.0f} | {r['train_seconds']:.1f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Held-out accuracy on region A, region B and overall, per teacher configuration (bars: mean over seeds, dots:
    seeds), one panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = rows(results)
    methods = list(dict.fromkeys(r["method"] for r in table))
    configs = list(CONFIGS)
    columns = min(2, len(methods))
    grid_rows = -(-len(methods) // columns)
    fig, axes = plt.subplots(grid_rows, columns, figsize=(6.5 * columns, 4 * grid_rows), squeeze=False)
    for ax in axes.flat[len(methods):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, methods, strict=False):
        for j, key in enumerate((*REGIONS, "overall")):
            means = [next(r for r in table if r["config"] == c and r["method"] == name)[f"accuracy_{key}"]
                     for c in configs]
            xs = [i + (j - 1) * 0.27 for i in range(len(configs))]
            ax.bar(xs, means, width=0.25, color=f"C{j}", label=f"region {key}" if key in REGIONS else key)
            for i, c in enumerate(configs):
                seeds = [r["accuracy"][key] for r in results["records"] if r["config"] == c and r["name"] == name]
                ax.scatter([xs[i]] * len(seeds), seeds, color="black", s=8, zorder=3)
        student = results["before"]["student"]["overall"]
        ax.axhline(student, color="grey", ls=":", lw=1, label="student before (overall)")
        ax.set_xticks(range(len(configs)), [c.replace(", ", ",\n") for c in configs], fontsize=8)
        ax.set_ylim(0, 1.3)  # room for the legend above the bars
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_ylabel("held-out accuracy")
        ax.set_title(name)
        ax.legend(fontsize=7, loc="upper center", ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        help="horizon-opd method names (opd, topd0.1, rolling, popd, ...)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of each distillation run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--teacher-steps", type=int, default=600, help="supervised steps that make each teacher")
    parser.add_argument("--student-steps", type=int, default=600, help="supervised steps that make the student")
    parser.add_argument("--output-dir", default="runs/two_teachers")
    args = parser.parse_args(argv)
    from .compare import method

    for name in args.methods:
        try:
            method(name)
        except ValueError as error:
            parser.error(f"--methods: {error}")
    for name in ("steps", "batch_size", "eval_every", "teacher_steps", "student_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    torch.set_num_threads(2)
    return run(Path(args.output_dir), seeds=args.seeds, steps=args.steps, batch_size=args.batch_size,
               learning_rate=args.learning_rate, eval_every=args.eval_every, method_names=args.methods,
               teacher_steps=args.teacher_steps, student_steps=args.student_steps)


if __name__ == "__main__":
    main()
