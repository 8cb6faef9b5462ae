"""A second embedded task, with a tunable teacher-student mismatch: where do progressive horizons pay off?

The paper's account of POPD (arXiv 2605.31490, Figs. 3, 4, 7, 8): teacher feedback is reliable near the teacher's own
trajectories and unreliable far from them; a student that starts elsewhere wanders there in its early full rollouts,
and short early horizons keep its training on the reliable part. This task builds that situation on purpose:

- The values 000..199 form two regions. Region A (000..099) has one successor cycle of 100, region B (100..199)
  another. Prompts start in A; the chain of thought writes `CHAIN_STEPS` successors, then the answer (the same
  format as the main demo: `"start 042 "` -> `"042 017 ... 063 = 063 "`).
- The teacher was trained only on chains inside A (with occasional corrupted A values, loss masked, so it continues
  from the student's imperfect A prefixes). It never saw a B value as input: on B states its feedback is arbitrary.
- The student (the mismatch level m) was trained on the same chains, except that at m entries of A it leaves for a
  fixed B value with probability `EXIT_RATE` and then follows B's cycle. Its rollouts leave the teacher's region
  after about 100 / (m * EXIT_RATE) steps; every position after that is scored by a teacher that does not know where
  it is. Only a rollout that stays in A can end on the right answer.

`python -m horizon_opd.demo.mismatch` builds the pair for each level (seeded, about 20 s a model; the teacher is
shared by the levels) and runs OPD, POPD, TOPD and sequence-level OPD on it for each seed, writing one results.json
per level (the main demo's format, with the time to 90% of OPD's final accuracy in `bars`), summary.json, a table
and a plot (summary.png).
"""

import argparse
import json
import random
from pathlib import Path

from datasets import Dataset, DatasetDict

from .task import completion_text, prompt_text
from .tokenizer import build_char_tokenizer

REGION_SIZE = 100
NUM_VALUES = 2 * REGION_SIZE  # A = 000..099, B = 100..199
CHAIN_STEPS = 24
MAX_COMPLETION_LENGTH = CHAIN_STEPS + 8  # start, steps, " = NNN", EOS and a margin
EXIT_RATE = 0.7
CORRUPT_PROB = 0.15
TABLE_SEED = 7
ARCHITECTURE = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4)
DEFAULT_LEVELS = (1, 3, 10, 30)


def cycle_table(values: list[int], seed: int) -> dict[int, int]:
    """{value: successor} along one random cycle through `values`."""
    order = list(values)
    random.Random(seed).shuffle(order)
    return {v: order[(i + 1) % len(order)] for i, v in enumerate(order)}


SUCCESSOR = {**cycle_table(list(range(REGION_SIZE)), TABLE_SEED),
             **cycle_table(list(range(REGION_SIZE, NUM_VALUES)), TABLE_SEED + 1)}


def exits(mismatch: int, seed: int = 0) -> dict[int, int]:
    """{A entry: B value} for the `mismatch` entries at which the student leaves the teacher's region."""
    if not 0 <= mismatch <= REGION_SIZE:
        raise ValueError(f"mismatch={mismatch} must be in [0, {REGION_SIZE}] (entries of region A).")
    rng = random.Random(seed)
    return {x: rng.randrange(REGION_SIZE, NUM_VALUES) for x in rng.sample(range(REGION_SIZE), mismatch)}


def walk(start: int, rng: random.Random | None = None, exit_table: dict[int, int] | None = None,
         steps: int = CHAIN_STEPS) -> list[int]:
    """The values of one chain from `start`: the successor table, except at an entry of `exit_table`, which `rng`
    takes with probability EXIT_RATE."""
    exit_table = exit_table or {}
    values, x = [], start
    for _ in range(steps):
        x = exit_table[x] if x in exit_table and rng.random() < EXIT_RATE else SUCCESSOR[x]
        values.append(x)
    return values


def answer(start: int) -> str:
    return f"{walk(start)[-1]:03d}"


def build_datasets(test_fraction: float = 0.4, seed: int = 0) -> DatasetDict:
    """Prompt-only `train`/`test` splits over the start values of region A, with the `answer` for scoring."""
    starts = list(range(REGION_SIZE))
    random.Random(seed).shuffle(starts)
    n_test = int(len(starts) * test_fraction)

    def rows(items):
        return Dataset.from_list([{"prompt": [{"role": "user", "content": prompt_text(s)}], "answer": answer(s),
                                   "start": s} for s in items])

    return DatasetDict(train=rows(starts[n_test:]), test=rows(starts[:n_test]))


def prompt_ids(tokenizer, start: int) -> list[int]:
    """The chat-formatted prompt of a chain from `start`, as token ids."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt_text(start)}],
                                         add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def example(rng: random.Random, tokenizer, exit_table: dict[int, int] | None, corrupt_prob: float,
            region: range = range(REGION_SIZE)):
    """Token ids and loss weights of one supervised chain from a random start in `region` (default A; the held-out
    prompts' included: they are held out from distillation, as in the main demo). A corrupted value (teacher only) is
    drawn from the same region, so a teacher of A learns to continue from any A state and never sees a B value."""
    start = rng.choice(region)
    values, x, masked = [], start, None
    corrupt_at = rng.randrange(CHAIN_STEPS - 1) if rng.random() < corrupt_prob else -1
    for step in range(CHAIN_STEPS):
        x = walk(x, rng, exit_table, steps=1)[0]
        if step == corrupt_at:
            x, masked = rng.choice([v for v in region if v != x]), step
        values.append(x)
    prompt = prompt_ids(tokenizer, start)
    completion = (tokenizer(completion_text(start, values), add_special_tokens=False)["input_ids"]
                  + [tokenizer.eos_token_id])
    weights = [1.0] * len(completion)
    if masked is not None:
        weights[masked + 1] = 0.0  # one token per value, after the restated start
    return prompt + completion, [0.0] * len(prompt) + weights


def build_pair(mismatch: int, *, steps: int = 600, seed: int = 0, log=print, teacher=None):
    """(student, teacher, tokenizer) for one mismatch level, trained from scratch (pass `teacher` to reuse one: it
    does not depend on the level)."""
    from .evaluation import evaluate_accuracy
    from .train_models import build_model, fit

    tokenizer = build_char_tokenizer(number_tokens=NUM_VALUES)
    test = build_datasets()["test"]

    def make(kind, exit_table, corrupt_prob, model_seed):
        model = build_model(kind, tokenizer, model_seed, ARCHITECTURE, max_positions=64)
        fit(model, lambda rng: example(rng, tokenizer, exit_table, corrupt_prob), steps=steps, batch_size=32,
            lr=3e-3, seed=model_seed + seed, eval_every=steps,
            evaluate=lambda m: evaluate_accuracy(m, tokenizer, test, MAX_COMPLETION_LENGTH), log=log, label=kind)
        return model

    if teacher is None:
        teacher = make("teacher", None, CORRUPT_PROB, 0)
    student = make(f"student m={mismatch}", exits(mismatch, seed), 0.0, 1)
    return student, teacher, tokenizer


def region_accuracy(model, tokenizer, region: str, rollouts: int = 64, seed: int = 0) -> float:
    """Teacher-forced next-value accuracy of `model` on the states of one region ("A" or "B"), along chains from A
    prompts (for B: chains that jump to a random B value after the restated start, as the student's do): how reliable
    its feedback is there."""
    import torch

    if region not in ("A", "B"):
        raise ValueError(f"region={region!r} must be 'A' or 'B'.")
    rng = random.Random(seed)
    hits = total = 0
    model.eval()
    with torch.no_grad():
        for _ in range(rollouts):
            start = rng.randrange(REGION_SIZE)
            first = start if region == "A" else rng.randrange(REGION_SIZE, NUM_VALUES)
            values = [start, *([] if region == "A" else [first]), *walk(first)]
            prompt = prompt_ids(tokenizer, start)
            ids = prompt + tokenizer("".join(f"{v:03d} " for v in values), add_special_tokens=False)["input_ids"]
            predicted = model(input_ids=torch.tensor([ids])).logits[0, :-1].argmax(-1).tolist()
            # the value at completion token j+1 follows values[j]; score it where values[j] is in the region
            for j in range(len(values) - 1):
                if (values[j] < REGION_SIZE) == (region == "A"):
                    hits += predicted[len(prompt) + j] == ids[len(prompt) + j + 1]
                    total += 1
    return hits / total


DEFAULT_METHODS = ("opd", "opd-matched0.1", "popd", "topd0.1", "rolling", "sequence")


def methods(names=DEFAULT_METHODS):
    """The compared methods: `horizon-opd --methods` names, and `sequence` for sequence-level OPD."""
    from .compare import Method, method

    return [Method("OPD sequence-level", {"horizon": "full", "loss_type": "sequence"}) if name == "sequence"
            else method(name) for name in names]


def run_level(mismatch: int, out: Path, *, seeds, steps: int, batch_size: int, learning_rate: float, eval_every: int,
              build_steps: int = 600, teacher=None, method_names=DEFAULT_METHODS):
    """Build the pair for one level and compare the methods on it; returns (results, teacher)."""
    from .compare import run_comparison
    from .evaluation import evaluate_accuracy

    student, teacher, tokenizer = build_pair(mismatch, steps=build_steps, teacher=teacher)
    data = build_datasets()
    reliability = {f"{who}_{region}": round(region_accuracy(model, tokenizer, region), 4)
                   for who, model in (("teacher", teacher), ("student", student)) for region in "AB"}
    print(f"mismatch {mismatch}: teacher-forced accuracy by region {reliability}", flush=True)
    results = run_comparison(
        methods(method_names), student, teacher, tokenizer, data["train"], data["test"], seeds=seeds, out=out, steps=steps,
        batch_size=batch_size, learning_rate=learning_rate, max_completion_length=MAX_COMPLETION_LENGTH,
        eval_every=eval_every, settings={"mismatch": mismatch, "region_accuracy": reliability,
                                         "build_steps": build_steps},
        evaluate=lambda m: evaluate_accuracy(m, tokenizer, data["test"], MAX_COMPLETION_LENGTH))
    return results, teacher


def summary_rows(level_results: list[dict]) -> list[dict]:
    """Per level and method, one entry per seed: final and best accuracy, and the training seconds and steps to 90% of
    OPD's final accuracy (the same seed's), also as a ratio to OPD's seconds."""
    from .compare import time_to_reach

    rows = []
    for results in level_results:
        per_seed = results["bars"]["per_seed"]
        opd_final = {r["seed"]: r["final_accuracy"] for r in results["methods"] if r["name"] == "OPD"}
        for name in dict.fromkeys(r["name"] for r in results["methods"]):
            runs = [r for r in results["methods"] if r["name"] == name]
            finals = [r["final_accuracy"] for r in runs]
            steps = [time_to_reach(r["curve"], 0.9 * opd_final[r["seed"]], key="step") for r in runs]
            times = [b["time_to_90pct"] for b in per_seed if b["method"] == name]
            ratios = [b.get("time_to_90pct_ratio") for b in per_seed if b["method"] == name and name != "OPD"]
            rows.append({"mismatch": results["settings"]["mismatch"], "method": name, "final_accuracy": finals,
                         "best_accuracy": [max(p["accuracy"] for p in r["curve"]) for r in runs],
                         "time_to_90pct": times, "steps_to_90pct": steps, "time_to_90pct_ratio": ratios,
                         "student_accuracy": results["student_accuracy"],
                         "teacher_accuracy": results["teacher_accuracy"]})
    return rows


def format_summary(rows: list[dict]) -> str:
    def cell(values, fmt):
        return ", ".join("never" if v is None else format(v, fmt) for v in values)

    lines = ["| mismatch | method | final (best) accuracy per seed | seconds to 90% of OPD's final | / OPD's | steps |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['mismatch']} | {r['method']} | "
              + ", ".join(f"{f:.2f} ({b:.2f})" for f, b in zip(r["final_accuracy"], r["best_accuracy"], strict=True))
              + f" | {cell(r['time_to_90pct'], '.1f')} | {cell(r['time_to_90pct_ratio'], '.2f') or '1'} | "
              f"{cell(r['steps_to_90pct'], 'd')} |" for r in rows]
    return "\n".join(lines)


def plot_summary(rows: list[dict], path: Path) -> None:
    """Left: time to 90% of OPD's final accuracy relative to OPD's, per level (one point per seed; a seed that never
    reached it is drawn on the dotted 'never' line). Right: final and best accuracy per level (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted({r["mismatch"] for r in rows})
    names = list(dict.fromkeys(r["method"] for r in rows))
    finite = [v for r in rows for v in r["time_to_90pct_ratio"] if v is not None]
    never = max([3.0, *finite]) * 1.15
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    others = [n for n in names if n != "OPD"]
    for i, name in enumerate(others):
        for level in levels:
            row = next(r for r in rows if r["method"] == name and r["mismatch"] == level)
            ys = [never if v is None else v for v in row["time_to_90pct_ratio"]]
            x = levels.index(level) + (i - (len(others) - 1) / 2) * 0.2
            left.scatter([x] * len(ys), ys, color=f"C{names.index(name)}", label=name if level == levels[0] else None)
    left.axhline(1.0, color="C0", label="OPD")
    left.axhline(never, color="grey", ls=":", lw=0.8)
    left.text(len(levels) - 0.5, never, "never", va="bottom", ha="right", fontsize=8, color="grey")
    left.set_ylabel("time to 90% of OPD's final accuracy / OPD's")
    left.set_title("Time to 90% of OPD's final accuracy (one point per seed)")
    for name in names:
        series = [next(r for r in rows if r["method"] == name and r["mismatch"] == level) for level in levels]
        mean = [sum(r["final_accuracy"]) / len(r["final_accuracy"]) for r in series]
        best = [sum(r["best_accuracy"]) / len(r["best_accuracy"]) for r in series]
        color = f"C{names.index(name)}"
        right.plot(range(len(levels)), mean, "o-", color=color, label=f"{name} (final)")
        right.plot(range(len(levels)), best, "^:", color=color, alpha=0.6)
    right.plot([], [], "k^:", alpha=0.6, label="best during training (same colours)")
    right.set_ylabel("held-out accuracy (mean over seeds)")
    right.set_title("Final and best accuracy")
    for ax in (left, right):
        ax.set_xticks(range(len(levels)), [f"m = {lvl}" for lvl in levels])
        ax.set_xlabel("mismatch: entries of the teacher's region where the student leaves it")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, nargs="+", default=list(DEFAULT_LEVELS),
                        help="mismatch levels: entries of region A at which the student leaves it")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of each distillation run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--build-steps", type=int, default=600, help="supervised steps that make each model")
    parser.add_argument("--output-dir", default="runs/mismatch")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        help="horizon-opd method names (opd, opd-matched0.1, topd0.1, rolling, popd, ...) and "
                             "`sequence` (sequence-level OPD)")
    args = parser.parse_args(argv)
    try:
        methods(args.methods)
    except ValueError as error:
        parser.error(f"--methods: {error}")
    for level in args.levels:
        try:
            exits(level)  # validates before any training
        except ValueError as error:
            parser.error(f"--levels: {error}")
    for name in ("steps", "batch_size", "eval_every", "build_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    torch.set_num_threads(2)
    out, teacher, level_results = Path(args.output_dir), None, []
    for level in args.levels:
        results, teacher = run_level(level, out / f"m{level}", seeds=args.seeds, steps=args.steps,
                                     batch_size=args.batch_size, learning_rate=args.learning_rate,
                                     eval_every=args.eval_every, build_steps=args.build_steps, teacher=teacher,
                                     method_names=args.methods)
        level_results.append(results)
    rows = summary_rows(level_results)
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    plot_summary(rows, out / "summary.png")
    print(format_summary(rows))
    return rows


if __name__ == "__main__":
    main()
