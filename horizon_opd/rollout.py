"""Rolling rollouts: rollouts that continue chunk by chunk across optimizer steps (`horizon="rolling"`).

A truncated rollout (TOPD) is thrown away at its horizon, so positions past it are never trained. A rolling rollout
is kept: each of a rank's slots holds one rollout in flight, and at every optimizer step every slot generates one more
chunk of `chunk` tokens from prompt + its earlier chunks (the context). Only the new chunk is trained on; the context
is conditioning, like the prompt. A rollout that emits EOS or reaches its token budget frees its slot. So a step decodes
`chunk` tokens per slot (TOPD's decode iterations) while every position up to `max_tokens` is trained, the stop
included.

What a step trains (one chunk per slot) is decoupled from the prompts it starts (one per freed slot): a freed slot
draws the next row of the rank's `PromptStream`, which walks the dataset in a seeded order, epoch after epoch, so every
prompt is rolled out exactly once per epoch and none is dropped, however many slots there are.

The context was written by the student of the last few steps (at most ceil(max_tokens / chunk) - 1 steps old): the
staleness of in-flight weight updates in asynchronous RL (PipelineRL). Partial rollouts in RL systems (Kimi k1.5,
APRIL) must wait for the finished trajectory's reward; OPD scores every token, so each chunk trains at once.

Depth mix from the first step (`warmup`). Without one, all slots would start at depth 0 and train the same band of
positions in lock-step forever (rollouts that run to `max_tokens` all end together). Two warm-ups spread the depths
evenly, slot i of S at floor(i * n / S) chunks (n = ceil(max_tokens / chunk)):
- `"cut"` (default, free): every slot starts at depth 0, and slot i's *first* rollout ends after n - depth_i chunks,
  so by step n the slots sit at their spread depths. Nothing extra is generated; during the first n steps the slots
  that have not restarted train the same band, and the first rollouts of the cut slots never reach their last chunks.
- `"prefix"`: at step 0 every slot generates one prefix from its prompt (up to n - 1 chunks, one batched generate call)
  and keeps its first depth_i chunks; the mix is there from step 0, at the price of S * (n - 1) * chunk tokens and
  (n - 1) * chunk decode iterations once, about half of them thrown away.

The pool is plain Python (token id lists, no torch): the trainer calls `fill` where a step starts, `contexts` where
generation reads prompts, `advance` where it writes completions, and saves `state_dict` with each checkpoint (one file
per rank).
"""

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

WARMUPS = ("cut", "prefix")


@dataclass
class Slot:
    """One rollout in flight: the dataset row it rolls out (its prompt and any other column), the prompt's token ids
    (None until the trainer tokenizes a freshly drawn row), the ids generated so far, the optimizer step that wrote
    each chunk, and the tokens it may run to (`budget`: `max_tokens`, or less for a first rollout cut by the warm-up).
    `row is None`: the slot is free and draws the next prompt."""

    row: dict | None = None
    prompt_ids: list[int] | None = None
    generated: list[int] = field(default_factory=list)
    written_at: list[int] = field(default_factory=list)
    budget: int = 0

    @property
    def depth(self) -> int:
        """Tokens generated so far: the completion position where the next chunk starts."""
        return len(self.generated)


class RolloutPool:
    """A rank's rollouts in flight, one per slot of its generation batch.

    Args:
        num_slots: rollouts in flight (the rank's chunks trained per optimizer step).
        chunk: tokens generated per slot and step.
        max_tokens: a rollout ends after this many tokens (L, or `rollout_max_tokens` when smaller).
        eos_token_ids: ids that end a rollout.
        warmup: how the depths are spread at the start, `"cut"` or `"prefix"` (module docstring).
    """

    def __init__(self, num_slots: int, chunk: int, max_tokens: int, eos_token_ids: list[int], warmup: str = "cut"):
        if num_slots < 1 or chunk < 1 or max_tokens < 1:
            raise ValueError(f"num_slots={num_slots}, chunk={chunk} and max_tokens={max_tokens} must all be >= 1.")
        if warmup not in WARMUPS:
            raise ValueError(f"warmup={warmup!r} is not one of {list(WARMUPS)}.")
        self.num_slots, self.chunk, self.max_tokens = num_slots, min(chunk, max_tokens), max_tokens
        self.eos_token_ids = set(eos_token_ids)
        self.warmup = warmup
        self.slots = [Slot() for _ in range(num_slots)]
        self.seeded = False  # whether the warm-up has been applied (at the first `fill`)
        self.fresh: list[int] = []  # slots the last `fill` started, whose prompts `contexts` tokenizes
        self.offsets: list[int] = [0] * num_slots  # where the chunk of the last `contexts` call starts, per slot
        self.finished: list[list[int]] = []  # rollouts the last `advance` completed (for loop detection)
        self.finished_slots: list[int] = []  # and the slots they freed

    @property
    def num_chunks(self) -> int:
        """Chunks in a rollout that runs to `max_tokens`."""
        return math.ceil(self.max_tokens / self.chunk)

    def seed_depth(self, i: int) -> int:
        """Chunks slot i starts at once warmed up: floor(i * n / S), spread evenly over [0, n)."""
        return i * self.num_chunks // self.num_slots

    # ------------------------------------------------------------------------------------- every step
    def fill(self, draw: Callable[[], dict]) -> list[int]:
        """Free slots draw the next row each (`draw()`), in slot order; returns the slots started. The first call
        applies the `"cut"` warm-up: slot i's first rollout may run only n - seed_depth(i) chunks."""
        self.fresh = []
        for i, slot in enumerate(self.slots):
            if slot.row is None:
                self.slots[i] = Slot(row=draw(), budget=self.max_tokens)
                self.fresh.append(i)
        if not self.seeded and self.warmup == "cut":
            for i, slot in enumerate(self.slots):
                slot.budget = self.max_tokens - self.seed_depth(i) * self.chunk
            self.seeded = True
        return list(self.fresh)

    def rows(self) -> list[dict]:
        """Each slot's dataset row, in slot order (the generation batch's rows)."""
        return [slot.row for slot in self.slots]

    def needs_prefixes(self) -> bool:
        """Whether the `"prefix"` warm-up still has to run: `seed_prefix_tokens` > 0 tokens per slot (with one slot,
        or one chunk per rollout, every slot starts at depth 0 and there is nothing to seed)."""
        return self.warmup == "prefix" and not self.seeded and self.seed_prefix_tokens() > 0

    def seed_prefix_tokens(self) -> int:
        """Tokens the `"prefix"` warm-up generates per slot so every slot can start at its seed depth."""
        return self.chunk * self.seed_depth(self.num_slots - 1)

    def seed(self, prefixes: list[list[int]], step: int) -> None:
        """The `"prefix"` warm-up: slot i keeps the first `seed_depth(i)` chunks of `prefixes[i]`, sampled from its
        prompt. A prefix that stops early (EOS) keeps only its whole chunks before the EOS: the slot then writes the
        chunk with the stop itself, so the first step trains it."""
        self._check_batch(prefixes)
        for i, (slot, prefix) in enumerate(zip(self.slots, prefixes, strict=True)):
            usable = next((j for j, token in enumerate(prefix) if token in self.eos_token_ids), len(prefix))
            chunks = min(self.seed_depth(i), usable // self.chunk)
            slot.generated, slot.written_at = list(prefix[:chunks * self.chunk]), [step] * chunks
        self.seeded = True

    def contexts(self, fresh_prompt_ids: list[list[int]], step: int) -> list[list[int]]:
        """The slots the last `fill` started take their tokenized prompts (in the order of `fresh`); returns each
        slot's context (prompt + generated), from which the next chunk is sampled, and records where that chunk starts
        (`offsets`)."""
        if len(fresh_prompt_ids) != len(self.fresh):
            raise ValueError(f"{len(fresh_prompt_ids)} tokenized prompts for {len(self.fresh)} fresh slots")
        for i, ids in zip(self.fresh, fresh_prompt_ids, strict=True):
            self.slots[i].prompt_ids = list(ids)
        self.fresh = []
        if any(slot.prompt_ids is None for slot in self.slots):
            raise ValueError("a slot holds no prompt: call fill() before contexts()")
        self.offsets = [slot.depth for slot in self.slots]
        return [slot.prompt_ids + slot.generated for slot in self.slots]

    def advance(self, chunks: list[list[int]], step: int) -> list[list[int]]:
        """Append each slot's new chunk (cut at the slot's remaining budget); free the slots whose rollout emitted EOS
        or reached its budget. Returns the chunks as trained (cut), in slot order."""
        self._check_batch(chunks)
        trained, self.finished, self.finished_slots = [], [], []
        for i, (slot, ids) in enumerate(zip(self.slots, chunks, strict=True)):
            ids = list(ids)[:slot.budget - slot.depth]
            slot.generated += ids
            slot.written_at.append(step)
            trained.append(ids)
            if slot.depth >= slot.budget or any(t in self.eos_token_ids for t in ids) or not ids:
                self.finished.append(slot.generated)
                self.finished_slots.append(i)
                self.slots[i] = Slot()
        return trained

    def stats(self, step: int) -> dict[str, float]:
        """The depth mix and staleness of the chunks the last `contexts` call asked for: mean depth in chunks, the
        share of slots starting a rollout, and the age in optimizer steps of the oldest chunk in each context."""
        depths = [offset / self.chunk for offset in self.offsets]
        ages = [step - slot.written_at[0] if slot.written_at else 0 for slot in self.slots]
        return {"rolling/mean_depth_chunks": sum(depths) / len(depths),
                "rolling/fresh_share": sum(d == 0 for d in depths) / len(depths),
                "rolling/mean_context_staleness": sum(ages) / len(ages),
                "rolling/max_context_staleness": float(max(ages))}

    # ------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"seeded": self.seeded, "chunk": self.chunk, "max_tokens": self.max_tokens,
                "slots": [{"row": None if s.row is None else json_safe_row(s.row), "prompt_ids": s.prompt_ids, "generated": s.generated,
                           "written_at": s.written_at, "budget": s.budget} for s in self.slots]}

    def load_state_dict(self, state: dict) -> None:
        saved = (len(state["slots"]), state["chunk"], state["max_tokens"])
        if saved != (self.num_slots, self.chunk, self.max_tokens):
            raise ValueError(
                f"the checkpoint's rolling pool has (slots, chunk, max_tokens) = {saved}, this run "
                f"{(self.num_slots, self.chunk, self.max_tokens)}: resume with the same per_device_train_batch_size x "
                f"gradient_accumulation_steps, truncation_ratio, max_completion_length and rollout_max_tokens.")
        self.seeded = bool(state["seeded"])
        self.slots = [Slot(s.get("row"), s["prompt_ids"], list(s["generated"]), list(s["written_at"]),
                           s.get("budget", self.max_tokens)) for s in state["slots"]]

    def _check_batch(self, batch: list) -> None:
        if len(batch) != self.num_slots:
            raise ValueError(f"{len(batch)} sequences for {self.num_slots} rollout slots")


class PromptStream:
    """A rank's share of the training rows, one at a time, epoch after epoch: what a freed rollout slot draws.

    Epoch e walks the dataset in a permutation seeded with `seed + e` (the dataset's order when `shuffle` is False),
    and rank r of W takes every W-th row of it from the r-th, so over the ranks every row is drawn exactly once per
    epoch. An `IterableDataset` (a stream) is walked the same way: shuffled with its buffer (`shuffle(seed=seed)`,
    `set_epoch(e)`) as TRL does, and rank r keeps every W-th row. `state_dict` is (epoch, rows drawn in it): a resumed
    run draws the same rows next.

    Args:
        dataset: a `datasets.Dataset` (anything with `len` and integer indexing) or an `IterableDataset`.
        rank, world_size: this process and the number of processes.
        shuffle, seed: as TRL's `shuffle_dataset` and `seed`.
    """

    def __init__(self, dataset, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0):
        self.dataset, self.rank, self.world_size = dataset, rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.streaming = not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
                              and not _is_iterable_dataset(dataset))
        if not self.streaming and len(dataset) < world_size:
            raise ValueError(f"the training dataset has {len(dataset)} rows for {world_size} processes: each rank "
                             f"needs at least one prompt to roll out. Use more prompts or fewer processes.")
        self.epoch, self.position = 0, 0
        self._rows = None  # iterator over this rank's rows of the current epoch

    def next(self) -> dict:
        """The next row; a finished epoch starts the next one."""
        for _ in range(2):
            if self._rows is None:
                self._rows = self._epoch_rows(self.epoch)
                for _ in range(self.position):  # a resumed run skips the rows it already drew
                    next(self._rows)
            row = next(self._rows, None)
            if row is not None:
                self.position += 1
                return dict(row)
            self.epoch, self.position, self._rows = self.epoch + 1, 0, None
        raise ValueError(f"the training dataset gave rank {self.rank} no rows in epoch {self.epoch - 1}: rolling "
                         f"rollouts need at least one prompt per rank.")

    def _epoch_rows(self, epoch: int):
        if not self.streaming:
            order = list(range(len(self.dataset)))
            if self.shuffle:
                random.Random(self.seed + epoch).shuffle(order)
            return (self.dataset[i] for i in order[self.rank::self.world_size])
        stream = self.dataset.shuffle(seed=self.seed) if self.shuffle else self.dataset
        if hasattr(stream, "set_epoch"):
            stream.set_epoch(epoch)
        return (row for i, row in enumerate(stream) if i % self.world_size == self.rank)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._rows = int(state["epoch"]), int(state["position"]), None


def _is_iterable_dataset(dataset) -> bool:
    try:
        from datasets import IterableDataset
    except ImportError:  # pragma: no cover - datasets is a dependency of TRL
        return False
    return isinstance(dataset, IterableDataset)


def json_safe_row(row: dict) -> dict:
    """The columns of a dataset row a checkpoint can hold (JSON values); the others (e.g. images) are left out."""
    safe = {}
    for key, value in row.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        safe[key] = value
    return safe
