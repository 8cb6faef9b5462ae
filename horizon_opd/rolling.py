"""The trainer's side of rolling rollouts (`horizon="rolling"`): its pool of rollouts in flight and their caches.

`rollout.py` holds the rollouts themselves (`RolloutPool`, `PromptStream`) as plain Python; this module wires them into
TRL's seams. At each step the freed slots draw their prompts from the stream (`start_step`), generation reads each
slot's context instead of a prompt (`contexts`), each rollout gains one chunk (`advance`), and the loss may reuse the
keys and values generation computed for the contexts (`generate`, `generation`). The caches live beside the slots
they describe: a local teacher's per slot (`kv_cache.TeacherSlotCache`, dropped with the slot's rollout) and the
student's of the step's generation. Each rank's pool and its place in the stream go into the checkpoint as their own
file (`POOL_FILE`); the Trainer's loop gets a placeholder dataloader (`dataloader`), a clock of `max_steps` steps.
"""

import json
import os
import warnings

import torch
from torch.utils.data import DataLoader

from . import kv_cache
from .rollout import PromptStream, RolloutPool

# Each rank's rollouts in flight and its place in the prompt stream live in their own file of the checkpoint:
# rollout_pool_{rank}.json.
POOL_FILE = "rollout_pool_{}.json"


class Rolling:
    """A rank's rollouts in flight, where its freed slots draw their prompts, and the caches kept for them."""

    def __init__(self, args, first_chunk: int, eos_token_ids: list[int], train_dataset, accelerator, shuffle: bool,
                 teachers: list, student, deepspeed: bool, use_vllm: bool):
        L = args.max_completion_length
        self.pool = RolloutPool(num_slots=args.per_device_train_batch_size * args.gradient_accumulation_steps,
                                chunk=first_chunk, max_tokens=min(L, args.rollout_max_tokens or L),
                                eos_token_ids=list(eos_token_ids), warmup=args.rolling_warmup)
        self.stream: PromptStream | None = None  # where the pool's freed slots draw their prompts
        if train_dataset is not None:
            self.stream = PromptStream(train_dataset, rank=accelerator.process_index,
                                       world_size=accelerator.num_processes, shuffle=shuffle, seed=args.seed)
        for teacher in teachers:  # each local teacher keeps its own slots' keys and values
            if not args.rolling_teacher_cache or teacher.model is None:
                continue
            problem = kv_cache.exactness_problem(accelerator.unwrap_model(teacher.model).config)
            if problem:
                named = f" of teacher {teacher.name!r}" if teacher.name is not None else ""
                warnings.warn(f"rolling_teacher_cache is off{named}: {problem}. The teacher re-encodes each context "
                              f"every step instead (same losses, more teacher tokens).", stacklevel=3)
            else:
                teacher.cache = kv_cache.TeacherSlotCache()
        self.teachers = teachers
        # why the student's loss cannot reuse generation's keys and values (None: it does, `generate`)
        self.student_cache_problem = None
        if args.rolling_student_cache and not use_vllm:  # vLLM's cache lives in the engine, not in reach
            self.student_cache_problem = kv_cache.student_cache_problem(student, args, deepspeed)
            if self.student_cache_problem:
                warnings.warn(f"rolling_student_cache is off: {self.student_cache_problem}. The loss re-encodes each "
                              f"context without grad instead (exact; more student tokens). Set "
                              f"rolling_student_cache=False to silence this.", stacklevel=3)
        self.student_cache = args.rolling_student_cache and not use_vllm and self.student_cache_problem is None
        self._generation = None  # (step, generate's KV cache of the step's contexts, their padded width)

    # ----------------------------------------------------------------------------------------------- a step
    def dataloader(self, max_steps: int, gradient_accumulation_steps: int) -> DataLoader:
        """The prompts come from `stream`, one per freed slot, so the Trainer's loop only needs a clock: one
        placeholder batch per micro-batch, `max_steps` steps long (how many steps an epoch of prompts takes depends on
        the rollouts' lengths)."""
        ticks = max_steps * gradient_accumulation_steps
        return DataLoader(range(ticks), batch_size=1, collate_fn=lambda ticks: [{"tick": t} for t in ticks])

    def start_step(self, meter) -> list[dict]:
        """The step's rows, one per slot: the last step's finished rollouts' cached keys go, their slots draw the
        next prompts of the stream. A slot keeps its row, and so its teacher, until its rollout ends."""
        if self.stream is None:
            raise ValueError("horizon='rolling' trains on rollouts of train_dataset's prompts: pass a train_dataset.")
        for teacher in self.teachers:  # the last step's losses are done: its finished rollouts' keys can go
            if teacher.cache is not None:
                teacher.cache.drop(self.pool.finished_slots)
        started = self.pool.fill(self.stream.next)
        meter.count("prompts_started", len(started))
        return self.pool.rows()

    def contexts(self, prompts: list, step: int, tokenize, generate, set_generation_limit, meter, metrics):
        """Each slot's context (prompt + the chunks it generated so far) for generation: `prompts` are the slots'
        rows' prompts, and only the slots started this step are tokenized (`tokenize`, TRL's). With
        `rolling_warmup="prefix"` the first step also generates the seed prefixes (`generate`, TRL's single turn;
        `RolloutPool.seed`). Returns what TRL's `_tokenize_prompts` returns."""
        pool = self.pool
        fresh_ids, images, multimodal_fields = [], None, {}
        if pool.fresh:
            fresh_ids, images, multimodal_fields = tokenize([prompts[i] for i in pool.fresh])
        if images is not None or multimodal_fields:
            raise NotImplementedError("horizon='rolling' keeps each rollout as token ids across steps, so images are "
                                      "not carried from one chunk to the next; use horizon='truncated' with images.")
        contexts = pool.contexts(fresh_ids, step)
        if pool.needs_prefixes():
            set_generation_limit(pool.seed_prefix_tokens())
            prefixes = generate(contexts, None, {})
            meter.add_generation(prefixes)  # the seed is decode cost of step 0
            meter.count("prefill_tokens", sum(len(ids) for ids in contexts))
            pool.seed(prefixes, step)
            contexts = pool.contexts([], step)
        for key, value in pool.stats(step).items():
            metrics[key].append(value)
        return contexts, None, {}

    def generate(self, generate, model, prompt_ids: list, step: int, pad_to_multiple_of: int | None):
        """`generate(prompt_ids)`, keeping generate's keys and values of the contexts for the step's loss, which runs
        the same weights over them (`generation`)."""
        with kv_cache.captured_cache(kv_cache.backbone(model)) as captured:
            completion_ids = generate()
        width = max(len(ids) for ids in prompt_ids)  # the left-padded width, as TRL pads them for the loss
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        self._generation = (step, captured[0], width) if captured else None
        return completion_ids

    def generation(self, step: int):
        """This step's generation cache and its contexts' padded width, or None."""
        if self._generation is None or self._generation[0] != step:
            return None
        return self._generation[1:]

    def advance(self, completion_ids: list, step: int, meter) -> list:
        """Each rollout gains the chunk just generated; returns the chunks, each slot's row of the step."""
        meter.add_generation(completion_ids)
        completion_ids = self.pool.advance(completion_ids, step)
        meter.count_rollouts(self.pool.finished)
        return completion_ids

    def mark(self, batch: dict) -> None:
        """Where each chunk starts in its rollout, and its slot: they travel with the row through TRL's shuffle and
        split."""
        device = batch["completion_ids"].device
        batch["completion_offsets"] = torch.tensor(self.pool.offsets, device=device)
        batch["rollout_slots"] = torch.arange(self.pool.num_slots, device=device)

    def end_step(self) -> None:
        self._generation = None  # the step's losses are done with it

    # ----------------------------------------------------------------------------------------------- checkpoints
    def save(self, output_dir: str, rank: int) -> None:
        state = {**self.pool.state_dict(), "stream": self.stream.state_dict() if self.stream is not None else None}
        with open(os.path.join(output_dir, POOL_FILE.format(rank)), "w") as f:
            json.dump(state, f)

    def load(self, checkpoint: str, rank: int) -> None:
        path = os.path.join(checkpoint, POOL_FILE.format(rank))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: the checkpoint holds no rollouts in flight for rank "
                                    f"{rank}. Resume a horizon='rolling' run from a checkpoint it wrote, with the same "
                                    f"number of processes.")
        with open(path) as f:
            state = json.load(f)
        self.pool.load_state_dict(state)
        if self.stream is not None and state.get("stream") is not None:
            self.stream.load_state_dict(state["stream"])
        for teacher in self.teachers:  # rebuilt from the contexts at the next step (same values)
            if teacher.cache is not None:
                teacher.cache.clear()
