"""The trainer's side of rolling rollouts (`horizon="rolling"`): its pool of rollouts in flight and their caches.

`rollout.py` holds the rollouts themselves (`RolloutPool`, `PromptStream`) as plain Python; this module wires them into
TRL's seams. At each step the freed slots draw their prompts from the stream (`start_step`), generation reads each
slot's context instead of a prompt (`contexts`), each rollout gains one chunk (`advance`), and the loss may reuse the
keys and values generation computed for the contexts (`generate`, `generation`). The caches live beside the slots
they describe: a local teacher's per slot (`kv_cache.TeacherSlotCache`, dropped with the slot's rollout) and the
student's of the step's generation, and with `rolling_student_memory` the student's per slot across steps
(`student_memory.StudentMemory`). Each rank's pool and its place in the stream go into the checkpoint as their own
file (`POOL_FILE`); the Trainer's loop gets a placeholder dataloader (`dataloader`), a clock of `max_steps` steps.
"""

import json
import os
import warnings

import torch
from torch.utils.data import DataLoader

from . import kv_cache
from .rollout import PromptStream, RolloutPool
from .student_memory import StudentMemory

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
        self.student_cache = args.rolling_student_cache and not use_vllm and self.student_cache_problem is None \
            and not args.rolling_context_grad  # with grad, the loss encodes the context itself
        self._generation = None  # (step, generate's KV cache of the step's contexts, their padded width)
        # the student's keys and values per slot across steps (rolling_student_memory): it feeds the student cache
        self.memory = None
        if args.rolling_student_memory and self.student_cache:
            self.memory = StudentMemory(student.config, self.pool.max_tokens, args.rolling_memory_refresh_every)
        elif args.rolling_student_memory and not use_vllm:  # on vLLM the engine's prefix cache is the memory
            warnings.warn(f"rolling_student_memory is off: the loss cannot read generation's keys and values "
                          f"({self.student_cache_problem}). Each context is re-encoded every step.", stacklevel=3)
        self._contexts = None  # the step's contexts as generation read them (the memory's next positions follow them)

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
        for cache in [t.cache for t in self.teachers] + [self.memory]:  # the finished rollouts' keys can go
            if cache is not None:
                cache.drop(self.pool.finished_slots)
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

    def generate(self, generate, model, prompt_ids: list, step: int, pad_to_multiple_of: int | None, pad_id: int,
                 meter, metrics):
        """`generate(prompt_ids)`, keeping generate's keys and values of the contexts for the step's loss, which runs
        the same weights over them (`generation`). With a student memory, generation continues from each slot's
        kept keys and values instead of encoding its context (`StudentMemory.cache_for`)."""
        width = max(len(ids) for ids in prompt_ids)  # the left-padded width, as TRL pads them for the loss
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        body = kv_cache.backbone(model)
        memory = None
        if self.memory is not None:
            memory, encoded = self.memory.cache_for(body, prompt_ids, list(range(len(prompt_ids))), width, step,
                                                    pad_id)
            meter.count("prefill_tokens", encoded + len(prompt_ids))  # the fresh contexts, then each last token
            age_mean, age_max = self.memory.ages(step)
            metrics["rolling/memory_age_mean"].append(age_mean)
            metrics["rolling/memory_age_max"].append(float(age_max))
        with kv_cache.captured_cache(body) as captured, kv_cache.continuing_from(model, memory):
            completion_ids = generate()
        self._generation = (step, captured[0], width) if captured else None
        self._contexts = prompt_ids
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
        if self.memory is not None and self._generation is not None and self._generation[0] == step:
            _, cache, width = self._generation
            self.memory.write(cache, list(range(len(completion_ids))), self._contexts, completion_ids, width, step)
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
        if self.memory is not None:  # not checkpointed: re-encoded at the next step under the resumed weights
            self.memory.clear()
