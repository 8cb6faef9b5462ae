"""Keys and values a rolled chunk's loss does not recompute (`horizon="rolling"`): the teacher's per slot, kept across
optimizer steps (`TeacherSlotCache`), and the student's from the step's own generation (`captured_cache`).

A rolled chunk's loss needs the teacher's hidden states at the chunk's positions, which attend to the whole context
(prompt + the rollout's earlier chunks). The teacher is frozen, so a context encodes to the same keys and values at
every step: `TeacherSlotCache` keeps them per slot, extends them by each step's chunk and runs the teacher only on the
tokens it has not seen (the chunk, plus the context's last token, whose hidden state predicts the chunk's first
token). A slot's first chunk runs its whole prompt. Per step the teacher then encodes about chunk + 1 tokens per slot
instead of context + chunk.

Exactness. Each row is encoded at its true positions 0, 1, ... (the cache is left-padded in the batch, and the new
tokens get explicit `position_ids`), as `generate` encodes a left-padded prompt. TRL's one-forward path counts the left
padding in the positions instead; with rotary embeddings attention depends only on position differences, so the two
agree to float tolerance (tests/test_rolling.py checks the loss to 1e-5). Where they would not agree, the trainer does
not cache and warns why (`exactness_problem`): learned absolute positions (GPT-2's `wpe`), RoPE scaled by the
sequence's length (`dynamic`, `longrope`), sliding-window or other non-growing cache layers; and for the student's
cache also dropout (generation and the loss draw other masks) and bf16/fp16 autocast over float32 weights
(`student_cache_problem`).

The student's loss forward at a step runs the weights that generated that step's chunks, so the keys and values
`generate` computed for each context (its prefill) are the ones the loss's no-grad context forward would compute:
`captured_cache` takes generate's cache object, and `context_cache` cuts each row's context out of it. `generate`
encodes left-padded rows at their true positions (attention-mask cumsum), so the loss's chunk positions must be the
true ones too (the trainer passes them). The cache is the one generation filled anyway; it is held until the step's
last micro-batch.

Memory: per slot, context length x layers x 2 x kv_heads x head_dim x the teacher's dtype bytes (`nbytes`), e.g. a
Qwen2.5-7B teacher (28 layers, 4 kv heads of 128) holds 57 KB per token in bf16: 320 slots at a mean context of 600
tokens hold 11 GB.
"""

from contextlib import contextmanager

import torch
from accelerate.utils import is_peft_model
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer


# RoPE variants whose frequencies depend on the sequence's length: a cached prefix was encoded at another length.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def exactness_problem(config) -> str | None:
    """Why reused keys and values would not equal a recompute for this model, or None where they do.

    The caches encode each row at its true positions (0, 1, ... after its left padding), TRL's one-forward path at
    positions that count the padding; the two agree only where attention depends on position differences alone
    (rotary embeddings at a fixed frequency). And the cache must hold every position (full attention)."""
    rope = getattr(config, "rope_parameters", None)
    if not rope:
        return (f"{type(config).__name__} has no rotary position embeddings (learned absolute positions, like GPT-2's "
                f"wpe): a row's hidden states depend on where its left padding puts it")
    for parameters in (rope.values() if "rope_type" not in rope else [rope]):  # per layer type in some models
        if isinstance(parameters, dict) and parameters.get("rope_type") in LENGTH_DEPENDENT_ROPE:
            return (f"rope_type={parameters['rope_type']!r} scales the rotary frequencies with the sequence's length, "
                    f"so a prefix encoded at an earlier length differs")
    try:
        cache = DynamicCache(config=config)
    except Exception as error:  # noqa: BLE001 - a config transformers cannot build a cache for is not cached
        return f"transformers builds no KV cache for it ({error})"
    kinds = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if kinds:
        return f"its cache layers {sorted(kinds)} do not keep every position (sliding window or similar)"
    return None


def supports(config) -> bool:
    """Whether reused keys and values equal a recompute for this model (`exactness_problem` is None)."""
    return exactness_problem(config) is None


def student_cache_problem(model, args, deepspeed: bool) -> str | None:
    """Why the student's generation cache would not equal the loss's own forward over the contexts, or None.

    Beyond the model's own (`exactness_problem`): `generate` runs in train mode, so dropout samples other masks for
    the generation than for the loss; and with `bf16`/`fp16` autocast over float32 weights (no DeepSpeed, which casts
    the weights themselves) generation runs under autocast and the loss forward does not."""
    problem = exactness_problem(model.config)
    if problem:
        return problem
    dropouts = {name: module.p for name, module in model.named_modules()
                if isinstance(module, torch.nn.Dropout) and module.p > 0}
    rate = getattr(model.config, "attention_dropout", 0.0) or 0.0
    if dropouts or rate > 0:
        where = f"attention_dropout={rate}" if rate > 0 else f"{len(dropouts)} dropout modules (e.g. " \
                f"{next(iter(dropouts))} p={next(iter(dropouts.values()))})"
        return f"dropout ({where}) draws other masks in generation than in the loss forward"
    weights = next(model.parameters()).dtype
    if (args.bf16 or args.fp16) and not deepspeed and weights == torch.float32:
        return (f"{'bf16' if args.bf16 else 'fp16'} autocast runs generation in lower precision over the float32 "
                f"weights, the loss forward in float32")
    return None


def left_padded_cache(rows: list, length: int, config) -> DynamicCache:
    """A `DynamicCache` of (B, kv_heads, `length`, head_dim) per layer from each row's own keys and values: `rows[b]`
    is a list over layers of (keys, values) of shape (kv_heads, T_b, head_dim) with T_b <= `length`, or None for a
    row with nothing cached; each row is left-padded with zeros (the attention mask hides them), as a left-padded
    batch is. At least one row must hold something (it gives the shapes)."""
    template = next(row for row in rows if row is not None)
    layers = []
    for layer, (k0, _) in enumerate(template):
        keys, values = [], []
        for row in rows:
            k, v = row[layer] if row is not None else (k0[:, :0], k0[:, :0])
            pad = k0.new_zeros(k0.size(0), length - k.size(1), k0.size(2))
            keys.append(torch.cat([pad, k], 1))
            values.append(torch.cat([pad, v], 1))
        layers.append((torch.stack(keys), torch.stack(values)))
    return DynamicCache(ddp_cache_data=layers, config=config)


class PerSlot:
    """What a rolling run keeps per slot across steps (`self.slots[slot]`), forgotten when the slot's rollout ends.
    A subclass says which tensors an entry holds (`_tensors`), for `nbytes`."""

    def __init__(self):
        self.slots: dict = {}

    def drop(self, slots) -> None:
        """Forget the slots whose rollouts ended (their next rollout starts from another prompt)."""
        for slot in slots:
            self.slots.pop(int(slot), None)

    def clear(self) -> None:
        self.slots.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for entry in self.slots.values() for t in self._tensors(entry))

    def _tensors(self, entry) -> list[torch.Tensor]:
        raise NotImplementedError


class TeacherSlotCache(PerSlot):
    """Per slot: the token ids encoded so far and their keys and values, one (kv_heads, T, head_dim) pair per layer
    (`self.slots[slot] = (ids, [(keys, values), ...])`)."""

    def _tensors(self, entry) -> list[torch.Tensor]:
        return [t for pair in entry[1] for t in pair]

    def cached_length(self, slot: int, sequence: list[int], num_new: int) -> int:
        """How many leading tokens of `sequence` the slot's entry holds and can serve: its ids must be a prefix of the
        sequence, and stop before the last `num_new` + 1 tokens (whose hidden states the loss reads). 0 otherwise."""
        entry = self.slots.get(slot)
        if entry is None:
            return 0
        ids = entry[0]
        if len(ids) > len(sequence) - num_new - 1 or sequence[:len(ids)] != ids:
            return 0
        return len(ids)

    def hidden_states(self, backbone, config, sequences: list[list[int]], slots: list[int], num_new: list[int],
                      width: int, pad_id: int) -> tuple[torch.Tensor, int]:
        """The teacher's last hidden states (B, `width`, H) predicting each row's last `num_new[b]` tokens (row b's
        column k predicts `sequences[b][-num_new[b] + k]`; columns past num_new[b] are zeros), and the tokens encoded.

        Runs `backbone` once, on each row's tokens past its cached prefix, then stores every row's keys and values up
        to (not including) its last token: the next chunk's context ends with it, and its hidden state is needed
        again then."""
        device = next(backbone.parameters()).device
        cached = [self.cached_length(s, seq, n) for s, seq, n in zip(slots, sequences, num_new, strict=True)]
        new_lengths = [len(seq) - t for seq, t in zip(sequences, cached, strict=True)]
        batch, past, width_new = len(sequences), max(cached), max(new_lengths)
        input_ids = torch.full((batch, width_new), pad_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros(batch, past + width_new, dtype=torch.long, device=device)
        position_ids = torch.zeros(batch, width_new, dtype=torch.long, device=device)
        for b, (seq, t, n) in enumerate(zip(sequences, cached, new_lengths, strict=True)):
            input_ids[b, :n] = torch.tensor(seq[t:], device=device)
            attention_mask[b, past - t:past + n] = 1  # cache left-padded, new tokens right-padded
            position_ids[b] = t + torch.arange(width_new, device=device)
        cache = DynamicCache(config=config)
        if past > 0:
            cache = left_padded_cache([self.slots[slot][1] if t > 0 else None
                                       for slot, t in zip(slots, cached, strict=True)], past, config)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                          use_cache=True).last_hidden_state  # (B, width_new, H)
        out = hidden.new_zeros(batch, width, hidden.size(-1))
        for b, (slot, seq, t, n, k) in enumerate(zip(slots, sequences, cached, new_lengths, num_new, strict=True)):
            if k > 0:
                out[b, :k] = hidden[b, n - k - 1:n - 1]
            keep = n - 1  # new tokens to store: all but the last
            stored = [(layer.keys[b, :, past:past + keep], layer.values[b, :, past:past + keep])
                      for layer in cache.layers]
            if t > 0:
                stored = [(torch.cat([k0, k1], 1), torch.cat([v0, v1], 1))
                          for (k0, v0), (k1, v1) in zip(self.slots[slot][1], stored, strict=True)]
            else:  # copies: a view would keep the whole batch's cache alive
                stored = [(k.clone(), v.clone()) for k, v in stored]
            self.slots[slot] = (list(seq[:-1]), stored)
        return out, sum(new_lengths)


@contextmanager
def captured_cache(backbone):
    """Within the block, the first forward of `backbone` that is handed a cache object (generate's prefill) leaves it
    in the yielded list: `generate` then fills it, in place, with every position it encodes."""
    holder = []

    def grab(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if not holder and isinstance(cache, DynamicCache):
            holder.append(cache)

    handle = backbone.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        yield holder
    finally:
        handle.remove()


@contextmanager
def continuing_from(model, cache: DynamicCache | None):
    """Within the block, `model.generate(...)` (as TRL calls it) continues from `cache`, the keys and values of
    every context position but the last (None: generate as usual). The override is an instance attribute, removed
    on exit."""
    if cache is None:
        yield
        return
    original = model.generate

    def generate(*args, **kwargs):
        return original(*args, cache=cache, **kwargs)

    model.generate = generate
    try:
        yield
    finally:
        del model.generate


def context_cache(cache: DynamicCache, rows: torch.Tensor, length: int, config) -> DynamicCache | None:
    """A new cache with rows `rows` and the first `length` positions of `cache` (None if it cannot serve: a layer
    that does not grow with the sequence, or fewer positions than asked)."""
    if not all(type(layer) is DynamicLayer for layer in cache.layers):
        return None
    if cache.get_seq_length() < length:
        return None
    rows = rows.to(cache.layers[0].keys.device)
    layers = [(layer.keys[rows, :, :length], layer.values[rows, :, :length]) for layer in cache.layers]
    return DynamicCache(ddp_cache_data=layers, config=config)


def backbone(model):
    """The module `generate` runs per decode step under the LM head (through a PEFT wrapper)."""
    if is_peft_model(model):
        model = model.base_model.model
    return model.base_model


def generated_context_cache(generation, slots, width: int, length: int, config) -> DynamicCache | None:
    """The step's generation cache (`generation`: (cache, the contexts' padded width), or None) cut to `slots`' rows
    and their first `length` positions, if it can serve a micro-batch whose contexts are `width` wide; else None."""
    if generation is None or slots is None:
        return None
    cache, generated_width = generation
    if generated_width != width:
        return None
    return context_cache(cache, slots, length, config)


def rolled_hidden_state(unwrapped_model, input_ids, attention_mask, num_positions: int, meter, generation=None,
                        slots=None) -> torch.Tensor | None:
    """The student's last hidden states (B, K, H) that predict the K chunk tokens ending `input_ids`, with the
    context before them computed without grad; None when the context is too short to split (the caller runs the full
    forward).

    The gradient is truncated backprop through the context: the context's keys and values are constants, so the
    loss trains the weights through the chunk's own positions (and the last context position, which predicts the
    chunk's first token) only; the forward values equal one full forward's. The context runs once, under no_grad,
    into a KV cache; the K + 1 last positions run with grad on top of it. Positions and padding follow the full
    forward's (left-padded context: cache positions count the padding, as TRL's forward does). Gradient
    checkpointing is paused for the short part: transformers drops a cache passed into a checkpointed layer, and a
    chunk's activations are small.

    With `generation` (the step's generate cache and its padded width, `rolling_student_cache`), the context's keys
    and values are the ones this step's generation computed (`slots`: each row's row in the generation batch) and
    the context is not run again; they were encoded at the rows' true positions, so the chunk's are too (equal to the
    padded positions' values to float tolerance). `meter` counts the tokens run with and without grad."""
    split = input_ids.size(1) - num_positions - 1  # context tokens before its last one
    if split < 1:
        return None
    model = unwrapped_model.base_model.model if is_peft_model(unwrapped_model) else unwrapped_model
    body = model.base_model
    meter.count("student_grad_tokens", attention_mask[:, split:].sum())
    cache = generated_context_cache(generation, slots, split + 1, split, model.config)
    position_ids = None
    if cache is not None:
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, split:]
    else:
        meter.count("student_nograd_tokens", attention_mask[:, :split].sum())
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            body(input_ids=input_ids[:, :split], attention_mask=attention_mask[:, :split], cache=cache, use_cache=True)
    checkpointed = [m for m in body.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    for module in checkpointed:
        module.gradient_checkpointing = False
    try:
        hidden = body(input_ids=input_ids[:, split:], attention_mask=attention_mask, position_ids=position_ids,
                      cache=cache, use_cache=True).last_hidden_state  # (B, K + 1, H)
    finally:
        for module in checkpointed:
            module.gradient_checkpointing = True
    return hidden[:, :-1, :]  # the last position predicts past the chunk


def cached_teacher_hidden_state(unwrapped_teacher, input_ids, attention_mask, num_positions: int, slots,
                                cache: TeacherSlotCache, pad_id: int) -> tuple[torch.Tensor, int]:
    """As TRL's `_get_last_hidden_state` for the teacher on rolled chunks (B, K, H_t), encoding only what each slot's
    `cache` has not seen; returns it with the number of tokens encoded."""
    if is_peft_model(unwrapped_teacher):
        unwrapped_teacher = unwrapped_teacher.base_model.model
    completion_mask = attention_mask[:, -num_positions:]
    sequences = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask, strict=True)]
    return cache.hidden_states(unwrapped_teacher.base_model, unwrapped_teacher.config, sequences, slots.tolist(),
                               completion_mask.sum(1).tolist(), num_positions, pad_id=pad_id)
