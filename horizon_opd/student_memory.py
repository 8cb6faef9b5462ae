"""The student's keys and values kept per slot across optimizer steps (`rolling_student_memory`), so a rolled
context is not re-encoded at every step.

Exact rolling re-encodes each slot's whole context in generation's prefill at every step, under the step's weights:
on an engine that prefill is the largest term of wide rolling's step (`benchmarks/gpu_model.py`). With a memory each
slot keeps the keys and values of its context but the last token, written by the weights of the step that first
encoded each token, and generation continues from them (`generate(cache=...)`): the step's prefill is one token per
slot, plus the whole prompt of a slot that starts a rollout. The loss then reads the same keys and values (the
trainer's `rolling_student_cache` path, which cuts the context out of generation's cache), so the student encodes no
context token twice. Generation's own keys and values of the last context token and the new chunk, written by this
step's weights, are appended to the slot's memory (`write`).

This is an approximation, as Transformer-XL's segment recurrence: a slot's memory was written by weights up to
ceil(L / chunk) - 1 steps old, where exact rolling recomputes it. `ages` gives the mean and max age in steps of the
tokens held, and `refresh_every=k` re-encodes a slot under the current weights once its oldest token is k steps old
(k = 1 is exact rolling). With weights that do not move (lr = 0) the memory equals a recompute.

Layout: per slot, per layer, a (kv_heads, capacity, head_dim) buffer preallocated for the slot's whole rollout
(its prompt + the rollout's token budget), so a step writes its new tokens in place instead of concatenating.
Memory per slot is the same as the teacher cache's (`kv_cache.py`) at the student's sizes.

Resume: the memory is not checkpointed. The first step after a resume re-encodes every slot's context under the
resumed weights (its ages start again at 0), which is what a run that refreshes at that step would do.
"""

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .kv_cache import PerSlot, left_padded_cache


@dataclass
class SlotMemory:
    ids: list[int]  # the tokens held: the slot's context but its last token
    keys: list[torch.Tensor]  # per layer (kv_heads, capacity, head_dim); the first len(ids) positions are written
    values: list[torch.Tensor]
    written: torch.Tensor  # (capacity,) the step whose weights wrote each position

    def append(self, keys: list[torch.Tensor], values: list[torch.Tensor], ids: list[int], step: int) -> None:
        start, end = len(self.ids), len(self.ids) + len(ids)
        if end > self.written.numel():
            raise RuntimeError(f"a slot's memory holds {self.written.numel()} positions and was asked for {end}: the "
                               f"rollout outgrew its prompt + token budget.")
        for buffer, new in zip(self.keys + self.values, keys + values, strict=True):
            buffer[:, start:end] = new
        self.written[start:end] = step
        self.ids += ids


class StudentMemory(PerSlot):
    """Per slot, the student's keys and values of its context but the last token, kept across steps
    (`self.slots[slot]`: a `SlotMemory`)."""

    def __init__(self, config, budget: int, refresh_every: int | None = None):
        super().__init__()
        self.config = config
        self.budget = budget  # a rollout's most tokens: a slot's capacity is its prompt + this
        self.refresh_every = refresh_every

    def _tensors(self, entry: SlotMemory) -> list[torch.Tensor]:
        return entry.keys + entry.values  # the preallocated buffers: what the slot holds, written or not

    def ages(self, step: int) -> tuple[float, int]:
        """The mean and max age in steps of the positions held (0, 0 when nothing is held)."""
        written = [m.written[:len(m.ids)] for m in self.slots.values() if m.ids]
        if not written:
            return 0.0, 0
        ages = step - torch.cat(written)
        return ages.float().mean().item(), int(ages.max())

    def _serves(self, slot: int, context: list[int], step: int) -> bool:
        """Whether the slot's memory holds `context` but its last token, and is not due for a refresh (its oldest
        position, the first, is younger than `refresh_every` steps)."""
        memory = self.slots.get(slot)
        if memory is None or memory.ids != context[:-1]:
            return False
        return self.refresh_every is None or not memory.ids or step - int(memory.written[0]) < self.refresh_every

    @torch.no_grad()
    def cache_for(self, backbone, contexts: list[list[int]], slots: list[int], width: int, step: int,
                  pad_id: int) -> tuple[DynamicCache, int]:
        """A cache (B, kv_heads, `width` - 1, head_dim) of each row's context but its last token, left-padded as the
        contexts are (`width` is their padded width), to continue generation from; and the tokens it encoded.

        A slot whose memory does not hold its context (a new rollout, a resume) or that is due for a refresh is
        encoded first, at its true positions, under the current weights."""
        to_encode = [b for b, (slot, context) in enumerate(zip(slots, contexts, strict=True))
                     if not self._serves(slot, context, step)]
        encoded = self._encode(backbone, [contexts[b][:-1] for b in to_encode], [slots[b] for b in to_encode], step,
                               pad_id)
        rows = []
        for slot in slots:
            memory, length = self.slots[slot], len(self.slots[slot].ids)
            rows.append([(k[:, :length], v[:, :length]) for k, v in zip(memory.keys, memory.values, strict=True)])
        return left_padded_cache(rows, width - 1, self.config), encoded

    def _encode(self, backbone, sequences: list[list[int]], slots: list[int], step: int, pad_id: int) -> int:
        """Encode `sequences` (left-padded, at their true positions) into fresh memories of `slots`."""
        for slot in slots:
            self.slots.pop(slot, None)
        if not sequences:
            return 0
        device = next(backbone.parameters()).device
        width = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(sequences), max(width, 1)), pad_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros_like(input_ids)
        for b, ids in enumerate(sequences):
            if ids:
                input_ids[b, width - len(ids):] = torch.tensor(ids, device=device)
                attention_mask[b, width - len(ids):] = 1
        cache = DynamicCache(config=self.config)
        if width > 0:
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                     use_cache=True)
        for b, (slot, ids) in enumerate(zip(slots, sequences, strict=True)):
            capacity = len(ids) + 1 + self.budget
            memory = self._allocate(cache, capacity, device, next(backbone.parameters()).dtype)
            if ids:
                memory.append([layer.keys[b, :, width - len(ids):] for layer in cache.layers],
                              [layer.values[b, :, width - len(ids):] for layer in cache.layers], list(ids), step)
            self.slots[slot] = memory
        return sum(len(ids) for ids in sequences)

    def _allocate(self, cache: DynamicCache, capacity: int, device, dtype) -> SlotMemory:
        keys, values = [], []
        for layer in cache.layers:
            if layer.keys is None or layer.keys.numel() == 0:  # nothing encoded yet: take the shapes from the config
                heads = getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads
                head_dim = getattr(self.config, "head_dim", None) or \
                    self.config.hidden_size // self.config.num_attention_heads
                shape = (heads, capacity, head_dim)
            else:
                shape, dtype = (layer.keys.size(1), capacity, layer.keys.size(3)), layer.keys.dtype
            keys.append(torch.zeros(shape, dtype=dtype, device=device))
            values.append(torch.zeros(shape, dtype=dtype, device=device))
        return SlotMemory([], keys, values, torch.zeros(capacity, dtype=torch.long))

    def write(self, cache: DynamicCache, slots: list[int], contexts: list[list[int]], chunks: list[list[int]],
              width: int, step: int) -> None:
        """After generation: append to each slot's memory generation's keys and values of its context's last token
        and its kept chunk but its last token (`cache`: generation's, whose first `width` - 1 positions are the
        memory's and whose column `width` - 1 + j holds the rollout's token len(context) - 1 + j)."""
        for b, (slot, context, chunk) in enumerate(zip(slots, contexts, chunks, strict=True)):
            memory = self.slots.get(slot)
            if memory is None or not chunk or memory.ids != context[:-1]:
                continue
            span = slice(width - 1, width - 1 + len(chunk))
            memory.append([layer.keys[b, :, span] for layer in cache.layers],
                          [layer.values[b, :, span] for layer in cache.layers], [context[-1], *chunk[:-1]], step)
