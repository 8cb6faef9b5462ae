"""A synthetic, verifiable multi-step reasoning task: follow a secret successor table for a fixed number of steps.

The table is a permutation of the values 000..399 made of two cycles of 200, so a chain of `NUM_STEPS` steps never
repeats a value. A prompt gives a start value; the answer is the value reached after `NUM_STEPS` applications of the
table. The chain of thought restates the start and writes every intermediate value, so every step is the same
operation ("look up the successor of the last value"):

    prompt:      "start 237 "
    completion:  "237 152 008 ... 091 = 091 "   (the start, 96 steps, then the answer: 100 tokens with the demo
                                               tokenizer, in which a number and its trailing space are one token)

The step reads only the previous value, so any prefix, including one with a mistake, is a valid state to continue
from: a teacher trained on chains with occasional corrupted values gives correct feedback on the student's own
prefixes. A 10% prefix holds 9 whole steps, and a student that has not learned every table entry errs at any step.
"""

import random
import re

from datasets import Dataset, DatasetDict

NUM_VALUES = 400
CYCLE_LENGTH = 200
NUM_STEPS = 96
TABLE_SEED = 2605  # fixed: the table is part of the task definition
MAX_COMPLETION_LENGTH = NUM_STEPS + 8  # the full horizon L in tokens: start, steps, " = NNN", EOS and a margin


def successor_table(seed: int = TABLE_SEED) -> list[int]:
    """A random permutation of range(NUM_VALUES) whose cycles all have length CYCLE_LENGTH."""
    order = list(range(NUM_VALUES))
    random.Random(seed).shuffle(order)
    succ = [0] * NUM_VALUES
    for start in range(0, NUM_VALUES, CYCLE_LENGTH):
        cycle = order[start : start + CYCLE_LENGTH]
        for i, value in enumerate(cycle):
            succ[value] = cycle[(i + 1) % CYCLE_LENGTH]
    return succ


SUCCESSOR = successor_table()


def prompt_text(start: int) -> str:
    # Every number is written with its trailing space, as in the chain, so restating it is an identity copy.
    return f"start {start:03d} "


def chain(start: int, steps: int = NUM_STEPS) -> list[int]:
    values, x = [], start
    for _ in range(steps):
        x = SUCCESSOR[x]
        values.append(x)
    return values


def completion_text(start: int, values: list[int]) -> str:
    """The start value restated, every step's value, then the answer. Restating the start makes the first look-up the
    same operation as every other one (reading the previous value of the chain), not a read from the prompt."""
    return "".join(f"{v:03d} " for v in [start, *values]) + f"= {values[-1]:03d} "


def build_datasets(test_fraction: float = 0.25, seed: int = 0) -> DatasetDict:
    """Conversational prompt-only splits `train` and `test` (held-out start values), with the `answer` for scoring
    and the `start` value. `test` is held out from distillation; the bundled models' supervised training saw chains
    from every start value (`train_models.py` says why)."""
    starts = list(range(NUM_VALUES))
    random.Random(seed).shuffle(starts)
    n_test = int(len(starts) * test_fraction)

    def to_dataset(items):
        return Dataset.from_list(
            [{"prompt": [{"role": "user", "content": prompt_text(s)}], "answer": f"{chain(s)[-1]:03d}", "start": s}
             for s in items]
        )

    return DatasetDict(train=to_dataset(starts[n_test:]), test=to_dataset(starts[:n_test]))


_ANSWER = re.compile(r"=\s*(\d+)\s*$")


def extract_answer(completion: str) -> str | None:
    match = _ANSWER.search(completion.strip())
    return match.group(1) if match else None


def accuracy(completions: list[str], answers: list[str]) -> float:
    """Exact-match accuracy of the final answer, in [0, 1]."""
    if not completions:
        return 0.0
    hits = sum(extract_answer(c) == a for c, a in zip(completions, answers, strict=True))
    return hits / len(completions)
