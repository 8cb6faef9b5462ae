"""Rolling rollouts: rollouts that continue chunk by chunk across optimizer steps (`horizon="rolling"`).

A truncated rollout (TOPD) is thrown away at its horizon, so positions past it are never trained. A rolling rollout
is kept: each of a rank's slots holds one rollout in flight, and at every optimizer step every slot generates one more
chunk of `chunk` tokens from prompt + its earlier chunks (the context). Only the new chunk is trained on; the context
is conditioning, like the prompt. A rollout that emits EOS or reaches `max_tokens` frees its slot, which takes the
step's fresh prompt at its index. So a step decodes `chunk` tokens per slot (TOPD's decode iterations) while every
position up to `max_tokens` is trained, the stop included.

The context was written by the student of the last few steps (at most ceil(max_tokens / chunk) - 1 steps old): the
staleness of in-flight weight updates in asynchronous RL (PipelineRL). Partial rollouts in RL systems (Kimi k1.5,
APRIL) must wait for the finished trajectory's reward; OPD scores every token, so each chunk trains at once.

Depth mix from the first step: at step 0 every slot generates one prefix from its fresh prompt (up to n - 1 chunks,
n = ceil(max_tokens / chunk)) and keeps its first floor(i * n / S) chunks (slot i of S), so the depths are spread
evenly over the rollout from the start. Without the seed all slots would start at depth 0 and train the same band of
positions in lock-step for n steps; the seed costs one step of up to (n - 1) * chunk decode iterations, once.

The pool is plain Python (token id lists, no torch): the trainer calls `contexts` where generation reads prompts,
`advance` where it writes completions, and saves `state_dict` with each checkpoint (one file per rank).
"""

import math
from dataclasses import dataclass, field


@dataclass
class Slot:
    """One rollout in flight: its prompt's token ids, the ids generated so far, and the optimizer step that wrote each
    chunk. `prompt_ids is None`: the slot is free and takes the next fresh prompt."""

    prompt_ids: list[int] | None = None
    generated: list[int] = field(default_factory=list)
    written_at: list[int] = field(default_factory=list)

    @property
    def depth(self) -> int:
        """Tokens generated so far: the completion position where the next chunk starts."""
        return len(self.generated)


class RolloutPool:
    """A rank's rollouts in flight, one per slot of its generation batch.

    Args:
        num_slots: rollouts in flight (the rank's prompts per optimizer step).
        chunk: tokens generated per slot and step.
        max_tokens: a rollout ends after this many tokens (L, or `rollout_max_tokens` when smaller).
        eos_token_ids: ids that end a rollout.
    """

    def __init__(self, num_slots: int, chunk: int, max_tokens: int, eos_token_ids: list[int]):
        if num_slots < 1 or chunk < 1 or max_tokens < 1:
            raise ValueError(f"num_slots={num_slots}, chunk={chunk} and max_tokens={max_tokens} must all be >= 1.")
        self.num_slots, self.chunk, self.max_tokens = num_slots, min(chunk, max_tokens), max_tokens
        self.eos_token_ids = set(eos_token_ids)
        self.slots = [Slot() for _ in range(num_slots)]
        self.seeded = False
        self.offsets: list[int] = [0] * num_slots  # where the chunk of the last `contexts` call starts, per slot
        self.finished: list[list[int]] = []  # rollouts the last `advance` completed (for loop detection)

    @property
    def num_chunks(self) -> int:
        """Chunks in a rollout that runs to `max_tokens`."""
        return math.ceil(self.max_tokens / self.chunk)

    # ------------------------------------------------------------------------------------- step 0: the depth mix
    def seed_depth(self, i: int) -> int:
        """Chunks slot i starts with: floor(i * n / S), spread evenly over [0, n)."""
        return i * self.num_chunks // self.num_slots

    def seed_prefix_tokens(self) -> int:
        """Tokens to generate from the fresh prompts at step 0 so every slot can start at its seed depth."""
        return self.chunk * self.seed_depth(self.num_slots - 1)

    def seed(self, prompt_ids: list[list[int]], prefixes: list[list[int]], step: int) -> None:
        """Start slot i from prompt i with the first `seed_depth(i)` chunks of `prefixes[i]` (sampled from it).
        A prefix that stops early (EOS) keeps only its whole chunks before the EOS: the slot then writes the chunk
        with the stop itself, so the first step trains it."""
        self._check_batch(prompt_ids)
        for i, (slot, prompt, prefix) in enumerate(zip(self.slots, prompt_ids, prefixes, strict=True)):
            usable = len(prefix)
            for j, token in enumerate(prefix):
                if token in self.eos_token_ids:
                    usable = j
                    break
            chunks = min(self.seed_depth(i), usable // self.chunk)
            slot.prompt_ids, slot.generated = list(prompt), list(prefix[:chunks * self.chunk])
            slot.written_at = [step] * chunks
        self.seeded = True

    # ------------------------------------------------------------------------------------- every step
    def contexts(self, prompt_ids: list[list[int]], step: int) -> list[list[int]]:
        """Free slots take the step's fresh prompt at their index; returns each slot's context (prompt + generated),
        from which the next chunk is sampled, and records where that chunk starts (`offsets`)."""
        self._check_batch(prompt_ids)
        for slot, prompt in zip(self.slots, prompt_ids, strict=True):
            if slot.prompt_ids is None:
                slot.prompt_ids, slot.generated, slot.written_at = list(prompt), [], []
        self.offsets = [slot.depth for slot in self.slots]
        return [slot.prompt_ids + slot.generated for slot in self.slots]

    def advance(self, chunks: list[list[int]], step: int) -> list[list[int]]:
        """Append each slot's new chunk (cut at the slot's remaining budget); free the slots whose rollout emitted EOS
        or reached `max_tokens`. Returns the chunks as trained (cut), in slot order."""
        if len(chunks) != self.num_slots:
            raise ValueError(f"{len(chunks)} chunks for {self.num_slots} rollout slots")
        trained, self.finished = [], []
        for i, (slot, ids) in enumerate(zip(self.slots, chunks, strict=True)):
            ids = list(ids)[:self.max_tokens - slot.depth]
            slot.generated += ids
            slot.written_at.append(step)
            trained.append(ids)
            if slot.depth >= self.max_tokens or any(t in self.eos_token_ids for t in ids) or not ids:
                self.finished.append(slot.generated)
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
                "slots": [{"prompt_ids": s.prompt_ids, "generated": s.generated, "written_at": s.written_at}
                          for s in self.slots]}

    def load_state_dict(self, state: dict) -> None:
        saved = (len(state["slots"]), state["chunk"], state["max_tokens"])
        if saved != (self.num_slots, self.chunk, self.max_tokens):
            raise ValueError(
                f"the checkpoint's rolling pool has (slots, chunk, max_tokens) = {saved}, this run "
                f"{(self.num_slots, self.chunk, self.max_tokens)}: resume with the same per_device_train_batch_size x gradient_accumulation_steps, truncation_ratio, "
                f"max_completion_length and rollout_max_tokens.")
        self.seeded = bool(state["seeded"])
        self.slots = [Slot(s["prompt_ids"], list(s["generated"]), list(s["written_at"])) for s in state["slots"]]

    def _check_batch(self, prompt_ids: list) -> None:
        if len(prompt_ids) != self.num_slots:
            raise ValueError(f"{len(prompt_ids)} prompts for {self.num_slots} rollout slots: the generation batch "
                             f"must keep its size (drop_last) for rolling rollouts.")
