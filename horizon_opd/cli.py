"""`horizon-opd`: distill a teacher into a student with OPD, TOPD and POPD on the same step budget and compare them.

With no arguments it runs the embedded demo (a successor-table reasoning task with a bundled teacher and student, on
the CPU in a few minutes) and writes `results.json` and `accuracy_vs_time.png` under `--output-dir`. With
`--student`, `--teacher` and `--dataset` (local paths) it distills your own models with one or more methods.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from .demo.compare import DEFAULT_METHODS, Method, machine_description, mean_std, run_method, time_to_reach


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="horizon-opd", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/horizon-opd", help="where results.json and the plot are written")
    p.add_argument("--methods", nargs="+", default=["opd", "topd0.1", "topd0.5", "popd"],
                   help="methods to compare: opd, topd<rho> (e.g. topd0.1), popd (linear 0.1->1 over half of "
                        "training), popd-stages")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default: 60; quick: 8)")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per step (default: 32; quick: 8)")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default: 10; quick: 4)")
    p.add_argument("--eval-size", type=int, default=None, help="held-out prompts evaluated (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed, e.g. --seeds 0 1 2")
    p.add_argument("--quick", action="store_true", help="a tiny run (seconds) that exercises the whole pipeline")
    p.add_argument("--student", default=None, help="student model directory (default: the bundled demo student)")
    p.add_argument("--teacher", default=None, help="teacher model directory (default: the bundled demo teacher)")
    p.add_argument("--dataset", default=None,
                   help="prompt dataset: a `datasets.save_to_disk` directory or a .json/.jsonl file with a 'prompt' "
                        "column (and 'answer' for exact-match accuracy of the last number); default: the demo task")
    p.add_argument("--max-completion-length", type=int, default=None, help="full horizon L (default: the task's)")
    p.add_argument("--save-model", action="store_true", help="save each distilled student under output-dir")
    return p.parse_args(argv)


def parse_method(name: str) -> Method:
    if name == "opd":
        return DEFAULT_METHODS[0]
    if name.startswith("topd"):
        rho = float(name[4:] or 0.1)
        return Method(f"TOPD rho={rho:g}", {"horizon": "truncated", "truncation_ratio": rho})
    if name == "popd":
        return DEFAULT_METHODS[3]
    if name == "popd-stages":
        return Method("POPD stages", {"horizon": "progressive", "progressive_schedule": "stages",
                                      "progressive_stage_ratios": [0.1, 0.25, 0.5, 1.0],
                                      "progressive_stage_fractions": [0.0, 0.25, 0.5, 0.75]})
    raise SystemExit(f"unknown method {name!r}: use opd, topd<rho> (e.g. topd0.1), popd or popd-stages")


def load_inputs(args):
    """Student, teacher, tokenizer, train and held-out prompts, and the full horizon."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import demo

    student_path = args.student or demo.STUDENT_PATH
    teacher_path = args.teacher or demo.TEACHER_PATH
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    student = AutoModelForCausalLM.from_pretrained(student_path)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path)
    if args.dataset is None:
        data = demo.build_datasets()
        max_len = demo.MAX_COMPLETION_LENGTH
    else:
        data = demo.load_prompt_dataset(args.dataset)
        max_len = 256
    return student, teacher, tokenizer, data["train"], data["test"], args.max_completion_length or max_len


def main(argv=None) -> None:
    """Console entry point (`horizon-opd`)."""
    run(argv)


def run(argv=None) -> dict:
    """Parse `argv`, run the comparison, write results.json and the plot, print the table; return the results."""
    args = parse_args(argv)
    quick = args.quick
    steps = args.steps or (8 if quick else 60)
    batch_size = args.batch_size or (8 if quick else 32)
    eval_every = args.eval_every or (4 if quick else 10)
    eval_size = args.eval_size or (16 if quick else None)
    methods = [parse_method(m) for m in args.methods]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    from .demo.evaluation import evaluate_accuracy

    torch.set_num_threads(min(2, torch.get_num_threads()))
    student, teacher, tokenizer, train_dataset, eval_dataset, max_len = load_inputs(args)
    if eval_size is not None:
        eval_dataset = eval_dataset.select(range(min(eval_size, len(eval_dataset))))
    has_answers = "answer" in eval_dataset.column_names
    evaluate = (lambda model: evaluate_accuracy(model, tokenizer, eval_dataset, max_len)) if has_answers \
        else (lambda model: float("nan"))

    teacher_accuracy = evaluate(teacher)
    student_accuracy = evaluate(student)
    print(f"teacher held-out accuracy {teacher_accuracy:.3f}   student before distillation {student_accuracy:.3f}")

    records = []
    bar = tqdm(total=steps * len(methods) * len(args.seeds), desc="distilling", unit="step", file=sys.stdout)
    for seed in args.seeds:
        for method in methods:
            bar.set_postfix_str(f"{method.name} seed {seed}")
            record = run_method(method, student, teacher, tokenizer, train_dataset, eval_dataset,
                                output_dir=str(out / "trainer"), max_steps=steps, batch_size=batch_size,
                                learning_rate=args.learning_rate, max_completion_length=max_len,
                                eval_every=eval_every, seed=seed, on_step=bar.update, evaluate=evaluate)
            model = record.pop("model")
            if args.save_model:
                path = out / "models" / f"{method.name.replace(' ', '_').replace('>', '')}_seed{seed}"
                model.save_pretrained(path)
                tokenizer.save_pretrained(path)
            records.append(record)
    bar.close()

    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_description(),
        "settings": {"steps": steps, "batch_size": batch_size, "learning_rate": args.learning_rate,
                     "eval_every": eval_every, "max_completion_length": max_len, "seeds": args.seeds,
                     "eval_prompts": len(eval_dataset), "quick": quick},
        "teacher_accuracy": teacher_accuracy,
        "student_accuracy": student_accuracy,
        "methods": records,
        "summary": summarize(records),
    }
    results["bars"] = paper_bars(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "accuracy_vs_time.png")
    print(format_table(results))
    print(f"wrote {out / 'results.json'} and {out / 'accuracy_vs_time.png'}")
    return results


def summarize(records: list[dict]) -> list[dict]:
    """Per method: mean and standard deviation over seeds."""
    rows = []
    for name in dict.fromkeys(r["name"] for r in records):
        runs = [r for r in records if r["name"] == name]
        row = {"name": name, "seeds": len(runs)}
        for key in ("final_accuracy", "train_seconds", "tokens_generated", "peak_memory_mb"):
            row[key], row[key + "_std"] = mean_std([float(r[key]) for r in runs])
        rows.append(row)
    return rows


def paper_bars(results: dict) -> dict:
    """The comparisons the paper makes, per seed: TOPD 0.1 vs OPD (accuracy gap, time ratio) and the wall-clock POPD
    and OPD need to reach 90% of OPD's final accuracy."""
    by_seed = {}
    for r in results["methods"]:
        by_seed.setdefault(r["seed"], {})[r["name"]] = r
    bars = []
    for seed, runs in by_seed.items():
        opd = runs.get("OPD")
        if opd is None:
            continue
        row = {"seed": seed, "opd_gain": opd["final_accuracy"] - results["student_accuracy"]}
        topd = runs.get("TOPD rho=0.1")
        if topd is not None:
            row["topd_0.1_accuracy_gap"] = opd["final_accuracy"] - topd["final_accuracy"]
            row["topd_0.1_time_ratio"] = topd["train_seconds"] / opd["train_seconds"]
        popd = runs.get("POPD linear 0.1->1")
        if popd is not None:
            target = 0.9 * opd["final_accuracy"]
            opd_time, popd_time = time_to_reach(opd["curve"], target), time_to_reach(popd["curve"], target)
            row["popd_time_to_90pct"] = popd_time
            row["opd_time_to_90pct"] = opd_time
            row["popd_time_ratio"] = None if (popd_time is None or not opd_time) else popd_time / opd_time
        bars.append(row)
    return {"per_seed": bars}


def format_table(results: dict) -> str:
    lines = [
        f"teacher accuracy {results['teacher_accuracy']:.3f}, student before {results['student_accuracy']:.3f}, "
        f"{results['settings']['steps']} steps x {results['settings']['batch_size']} prompts, "
        f"L = {results['settings']['max_completion_length']}, seeds {results['settings']['seeds']}",
        "| method | final accuracy | train seconds | tokens generated | peak memory (MB) |",
        "|---|---|---|---|---|",
    ]
    for row in results["summary"]:
        pm = (lambda k: f"{row[k]:.3f} ± {row[k + '_std']:.3f}") if row["seeds"] > 1 else (lambda k: f"{row[k]:.3f}")
        pm_int = (lambda k: f"{row[k]:.0f} ± {row[k + '_std']:.0f}") if row["seeds"] > 1 else (lambda k: f"{row[k]:.0f}")
        pm_s = (lambda k: f"{row[k]:.1f} ± {row[k + '_std']:.1f}") if row["seeds"] > 1 else (lambda k: f"{row[k]:.1f}")
        lines.append(f"| {row['name']} | {pm('final_accuracy')} | {pm_s('train_seconds')} | "
                     f"{pm_int('tokens_generated')} | {pm_int('peak_memory_mb')} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {}
    for r in results["methods"]:
        color = colors.setdefault(r["name"], f"C{len(colors)}")
        xs = [p["train_seconds"] for p in r["curve"]]
        ys = [p["accuracy"] for p in r["curve"]]
        label = r["name"] if r["seed"] == results["methods"][0]["seed"] else None
        ax.plot(xs, ys, marker="o", markersize=3, color=color, label=label, alpha=0.9)
    ax.axhline(results["teacher_accuracy"], color="gray", linestyle="--", linewidth=1, label="teacher")
    ax.set_xlabel("training wall-clock (s, evaluation excluded)")
    ax.set_ylabel("held-out greedy accuracy (full horizon)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"OPD vs TOPD vs POPD ({results['settings']['steps']} steps each)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
