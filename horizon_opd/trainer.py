import copy
import json
import os
import textwrap
from typing import NamedTuple

import torch
from accelerate.utils import is_peft_model
from torch.utils.data import DataLoader
from transformers import DynamicCache, TrainerCallback
from transformers.modeling_layers import GradientCheckpointingLayer
from trl import DistillationTrainer

from .config import HorizonOPDConfig
from .data import check_datasets
from .export import add_distillation_section, distillation_section, model_id, require_hub_token
from .horizon import HorizonPolicy, horizon_at
from .loss import (
    logit_postprocessing,
    loss_window_mask,
    logprobs_at,
    loss_window_tokens,
    masked_token_mean,
    reverse_kl_per_token,
    sampled_kl_per_token,
    sequence_kl_per_token,
    token_logprobs,
    topk_disagreement_per_token,
    topk_reverse_kl_per_token,
    zero3_enabled,
)
from . import kv_cache
from .monitor import CollapseAlarm, CostLedger, LogWindow, StepMeter
from .rollout import PromptStream, RolloutPool
from .remote_teacher import RemoteTeacher, attach_teacher_server, connect_teacher_server
from .teacher import attach_teacher, load_teacher, register_student_head_for_zero3, vocab_slice
from .teachers import Teacher, check_teacher_column, plan_teachers, teacher_indices

# Inputs TRL extracts for vision-language models, forwarded untouched to both backbones. TRL keeps this tuple local to
# its `_compute_loss`, so it cannot be imported; tests/test_trl_seams.py checks that the two stay equal.
MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)
# Where the horizon policy's state, the alarm's and the global token count live in a checkpoint's trainer_state.json.
STATE_KEY = "HorizonOPDTrainer"
# Each rank's rollouts in flight (horizon="rolling") and its place in the prompt stream live in their own file of the
# checkpoint: rollout_pool_{rank}.json.
POOL_FILE = "rollout_pool_{}.json"


class HorizonOPDTrainer(DistillationTrainer):
    """
    On-policy distillation with a controlled rollout horizon ("Are Full Rollouts Necessary for On-Policy
    Distillation?", arXiv 2605.31490). A [`~trl.DistillationTrainer`] whose student generates at most the horizon its
    policy gives for the current step (`full`, `truncated`, `progressive`, `anchored` or `adaptive`, see
    [`HorizonOPDConfig`]) and is trained on the token-level reverse KL(student || teacher) of every generated token.
    Generation, batching, PEFT, DeepSpeed, vLLM, logging and model cards are TRL's.

    Takes the same arguments as [`~trl.DistillationTrainer`]; `args` must be a [`HorizonOPDConfig`]. The teacher is
    either `teacher_model` (a model, or a path / Hub id) or a server at `args.teacher_model_server_url` (vLLM or
    `horizon_opd.teacher_server`) that scores the rollouts over HTTP; exactly one of the two. Several teachers are
    named: `teacher_model={name: model or id}` and/or `teacher_model_server_url={name: URL}`, and each dataset row
    names its teacher in `args.teacher_id_column` (`horizon_opd/teachers.py`). The `args` object passed in is copied,
    never modified.
    """

    _tag_names = ["trl", "horizon-opd", "on-policy-distillation", "distillation"]
    _name = "Horizon OPD"
    _paper = {
        "title": "Are Full Rollouts Necessary for On-Policy Distillation?",
        "id": "2605.31490",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{horizon_opd_2026,
                title        = {{Are Full Rollouts Necessary for On-Policy Distillation?}},
                year         = 2026,
                eprint       = {arXiv:2605.31490},
                url          = {https://arxiv.org/abs/2605.31490},
            }"""),
    }

    # ----------------------------------------------------------------------------------------------- construct
    def __init__(self, model, teacher_model=None, args: HorizonOPDConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, callbacks=None, optimizers=(None, None),
                 quantization_config=None, peft_config=None, tools=None):
        if args is None:
            args = HorizonOPDConfig(output_dir="horizon-opd")
        elif not isinstance(args, HorizonOPDConfig):
            raise TypeError(
                f"args is a {type(args).__name__}; HorizonOPDTrainer needs a HorizonOPDConfig (it holds the horizon "
                f"settings). Build one with HorizonOPDConfig(output_dir=..., horizon=..., ...)."
            )
        # TRL adjusts a few fields of `args` in place (dataloader workers, checkpointing kwargs): work on a copy.
        args = copy.deepcopy(args)
        plan = plan_teachers(teacher_model, args.teacher_server_urls())  # {name: ("local" | "server", what)}
        routed = None not in plan  # several named teachers, chosen per row by args.teacher_id_column
        if tools and args.horizon != "full":
            raise ValueError(
                f"tools with horizon={args.horizon!r}: a tool-calling rollout spans several generations, each of which "
                f"would get the whole horizon. Use horizon='full' with tools."
            )
        check_datasets(train_dataset, eval_dataset, args)
        if routed:
            self._check_teachers(plan, train_dataset, eval_dataset, args)
        if peft_config is not None and not isinstance(model, str) and is_peft_model(model):
            raise ValueError(
                f"model is already a PeftModel (adapters {list(model.peft_config)}) and peft_config asks for another "
                f"adapter on top. Either pass peft_config=None to keep training the adapter it has, or merge it first "
                f"(merged = horizon_opd.export.merge_adapter(model)) and pass the merged model with peft_config."
            )
        if args.push_to_hub:
            require_hub_token(args.hub_token)
        # A teacher server is checked before the student is loaded, so an unreachable URL fails in a second.
        loaded = {name: connect_teacher_server(args, what) if kind == "server" else None
                  for name, (kind, what) in plan.items()}
        loaded.update({name: load_teacher(what, args) for name, (kind, what) in plan.items() if kind == "local"})
        super().__init__(model=model, teacher_model=None, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers, quantization_config=quantization_config, peft_config=peft_config,
                         tools=tools)
        register_student_head_for_zero3(self)  # both losses read the student's lm_head weight directly
        self.teachers: list[Teacher] = [self._attach(name, kind, loaded[name]) for name, (kind, _) in plan.items()]
        # the run's names of its teachers, in the order of the batch's `teacher_index` (None: one teacher, no column)
        self.teacher_names: list[str] | None = [t.name for t in self.teachers] if routed else None
        only = self.teachers[0] if not routed else Teacher(None)
        self.teacher_model = only.model  # the one local teacher (None with a server or several teachers)
        self.remote_teacher: RemoteTeacher | None = only.server  # the one teacher server, likewise
        self.shared_vocab_size = only.shared_vocab_size
        self.cost = CostLedger(self.teacher_names)  # what training has cost so far, over all ranks
        self._pending_scored_tokens = 0  # tokens this rank's teacher-server requests scored, since the last gather

        self.horizon_policy: HorizonPolicy = args.horizon_policy()
        L = args.max_completion_length
        per_teacher = len(self.teacher_names or [])
        self._meters = {"train": StepMeter(L, per_teacher), "eval": StepMeter(L, per_teacher)}
        self._windows = {"train": LogWindow(L, args.position_bins, self.teacher_names),
                         "eval": LogWindow(L, args.position_bins, self.teacher_names)}
        self.alarm = CollapseAlarm(L, args.alarm_factor, args.alarm_repetition, args.horizon)
        self.horizon_history: list[int] = []  # the horizon of every optimizer step so far
        self._step_horizon = None
        self.rollout_pool: RolloutPool | None = None  # rollouts in flight across steps (horizon="rolling")
        self.prompt_stream: PromptStream | None = None  # where the pool's freed slots draw their prompts
        self.teacher_cache: kv_cache.TeacherSlotCache | None = None  # the one teacher's keys and values per slot
        self._generation_cache = None  # (step, generate's KV cache of the step's contexts, their padded width)
        if args.horizon == "rolling":
            self.rollout_pool = RolloutPool(
                num_slots=args.per_device_train_batch_size * args.gradient_accumulation_steps,
                chunk=horizon_at(0, 1, self.horizon_policy), max_tokens=min(L, args.rollout_max_tokens or L),
                eos_token_ids=list(self.eos_token_ids), warmup=args.rolling_warmup)
            if self.train_dataset is not None:
                self.prompt_stream = PromptStream(self.train_dataset, rank=self.accelerator.process_index,
                                                  world_size=self.accelerator.num_processes,
                                                  shuffle=self.shuffle_dataset, seed=args.seed)
            for teacher in self.teachers:  # each local teacher keeps its own slots' keys and values
                if args.rolling_teacher_cache and teacher.model is not None and kv_cache.supports(
                        self.accelerator.unwrap_model(teacher.model).config):
                    teacher.cache = kv_cache.TeacherSlotCache()
            self.teacher_cache = only.cache
        self.add_callback(_RestoreHorizonState(self))

    @staticmethod
    def _check_teachers(plan: dict, train_dataset, eval_dataset, args) -> None:
        """Several teachers: what the datasets and the loss must offer before any model loads."""
        names = list(plan)
        for dataset, where in ((train_dataset, "train_dataset"), (eval_dataset, "eval_dataset")):
            check_teacher_column(dataset, where, args.teacher_id_column, names)
        local = [name for name, (kind, _) in plan.items() if kind == "local"]
        if args.loss_type == "topk_reverse_kl" and local:
            raise ValueError(f"loss_type='topk_reverse_kl' reads a teacher server's top-k, but the teacher(s) {local} "
                             f"are local models. Use loss_type='sampled' (every teacher can give it), or serve them.")
        if args.teacher_model_init_kwargs is not None and not any(isinstance(plan[n][1], str) for n in local):
            raise ValueError(f"teacher_model_init_kwargs={args.teacher_model_init_kwargs!r}, but no teacher is loaded "
                             f"from a path or Hub id. Drop teacher_model_init_kwargs, or pass a teacher's path.")

    def _attach(self, name: str | None, kind: str, loaded) -> Teacher:
        """A loaded teacher (or connected server) prepared for this trainer, after TRL's constructor ran; an error
        names the teacher when there are several."""
        try:
            if kind == "local":
                model, shared = attach_teacher(self, loaded)
                return Teacher(name, model=model, shared_vocab_size=shared)
            # ids past the tokenizer are suppressed; the server's top-k ids past the student's head go to the tail
            return Teacher(name, server=loaded, shared_vocab_size=attach_teacher_server(self, loaded))
        except ValueError as error:
            if name is None:
                raise
            raise ValueError(f"Teacher {name!r}: {error}") from error

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if getattr(self, "teacher_names", None) is not None and \
                self.args.teacher_id_column not in self._signature_columns:
            # remove_unused_columns=True must keep the column that routes each row
            self._signature_columns = [*self._signature_columns, self.args.teacher_id_column]

    # ----------------------------------------------------------------------------------------------- horizon
    def current_horizon(self) -> int:
        """Rollout horizon in tokens for the current optimizer step; evaluation always uses the full horizon L.

        The policy's value at `state.global_step`: the same for every micro-batch of the step (they share one
        generation batch) and every rank (a stateful policy only learns from metrics gathered over all ranks)."""
        if not self.model.training:
            return self.args.max_completion_length
        return horizon_at(self.state.global_step, self.state.max_steps, self.horizon_policy)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        # The horizon bounds generation itself (max_new_tokens / vLLM max_tokens), so the tokens past it are never
        # computed. A rollout cut there has no EOS appended: TRL keeps every generated token and masks only after an EOS.
        horizon = self.current_horizon()
        if self.model.training:
            if self.args.loss_window is not None:  # nothing past the window is trained on
                horizon = loss_window_tokens(horizon, *self.args.loss_window)[1]
            if self.args.rollout_max_tokens is not None:
                horizon = min(horizon, self.args.rollout_max_tokens)
            self._step_horizon = horizon
        self._set_generation_limit(horizon)
        if self.model.training:
            self._meters["train"].count("prefill_tokens", sum(len(ids) for ids in prompt_ids))
        if self._rolls() and self.args.rolling_student_cache and not self.use_vllm:
            # keep generate's keys and values of the contexts: the step's loss runs the same weights over them
            with kv_cache.captured_cache(_backbone(self.accelerator.unwrap_model(self.model))) as captured:
                completion_ids = super()._generate_single_turn(prompt_ids, images, multimodal_fields)
            width = max(len(ids) for ids in prompt_ids)  # the left-padded width, as TRL pads them for the loss
            if self.pad_to_multiple_of:
                width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
            self._generation_cache = (self.state.global_step, captured[0], width) if captured else None
        else:
            completion_ids = super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        if self._rolls():  # prompt_ids are the slots' contexts (`_tokenize_prompts`): each rollout gains one chunk
            self._meters["train"].add_generation(completion_ids)
            completion_ids = self.rollout_pool.advance(completion_ids, self.state.global_step)
            self._meters["train"].count_rollouts(self.rollout_pool.finished)
            return completion_ids
        self._meters["train" if self.model.training else "eval"].add_rollouts(completion_ids)
        return completion_ids

    def _set_generation_limit(self, max_new_tokens: int) -> None:
        self.generation_config.max_new_tokens = max_new_tokens
        self.generation_kwargs["max_new_tokens"] = max_new_tokens
        if self.use_vllm:
            self.vllm_generation.max_completion_length = max_new_tokens

    # ----------------------------------------------------------------------------------------------- rollouts
    def _rolls(self) -> bool:
        """Whether this generation continues rollouts in flight (training with horizon="rolling")."""
        return self.rollout_pool is not None and self.model.training

    def get_train_dataloader(self):
        """With rolling rollouts the prompts come from `prompt_stream`, one per freed slot, so the Trainer's loop only
        needs a clock: one placeholder batch per micro-batch, `max_steps` steps long (the config requires max_steps
        for rolling: how many steps an epoch of prompts takes depends on the rollouts' lengths)."""
        if self.rollout_pool is None:
            return super().get_train_dataloader()
        ticks = self.args.max_steps * self.args.gradient_accumulation_steps
        return DataLoader(range(ticks), batch_size=1, collate_fn=lambda ticks: [{"tick": t} for t in ticks])

    def _tokenize_prompts(self, prompts: list):
        """With rolling rollouts, generation reads each slot's context (prompt + the chunks it generated so far)
        instead of a prompt: `prompts` are the slots' rows' prompts (`_generate_and_score_completions`), and only the
        slots started this step are tokenized. With `rolling_warmup="prefix"` the first step also generates the seed
        prefixes (`RolloutPool.seed`)."""
        if not self._rolls():
            return super()._tokenize_prompts(prompts)
        pool, step = self.rollout_pool, self.state.global_step
        fresh_ids, images, multimodal_fields = [], None, {}
        if pool.fresh:
            fresh_ids, images, multimodal_fields = super()._tokenize_prompts([prompts[i] for i in pool.fresh])
        if images is not None or multimodal_fields:
            raise NotImplementedError("horizon='rolling' keeps each rollout as token ids across steps, so images are "
                                      "not carried from one chunk to the next; use horizon='truncated' with images.")
        contexts = pool.contexts(fresh_ids, step)
        if pool.needs_prefixes():
            self._set_generation_limit(pool.seed_prefix_tokens())
            prefixes = super()._generate_single_turn(contexts, None, {})
            self._meters["train"].add_generation(prefixes)  # the seed is decode cost of step 0
            self._meters["train"].count("prefill_tokens", sum(len(ids) for ids in contexts))
            pool.seed(prefixes, step)
            contexts = pool.contexts([], step)
        for key, value in pool.stats(step).items():
            self._metrics["train"][key].append(value)
        return contexts, None, {}

    def _generate_and_score_completions(self, inputs):
        if self._rolls():  # the step's rows are the slots' rows; freed slots draw the next prompts of the stream
            if self.prompt_stream is None:
                raise ValueError("horizon='rolling' trains on rollouts of train_dataset's prompts: pass a train_dataset.")
            for teacher in self.teachers:  # the last step's losses are done: its finished rollouts' keys can go
                if teacher.cache is not None:
                    teacher.cache.drop(self.rollout_pool.finished_slots)
            started = self.rollout_pool.fill(self.prompt_stream.next)
            self._meters["train"].count("prompts_started", len(started))
            inputs = self.rollout_pool.rows()  # a slot keeps its row, and so its teacher, until its rollout ends
        elif self.model.training:
            self._meters["train"].count("prompts_started", len(inputs))
        routes = None  # each row's teacher, read before generating so a row naming no teacher fails first
        if self.teacher_names is not None:
            routes = teacher_indices(inputs, self.args.teacher_id_column, self.teacher_names)
        batch = super()._generate_and_score_completions(inputs)
        if routes is not None:  # travels with its row through TRL's shuffle and split, like the rolling keys below
            batch["teacher_index"] = torch.tensor(routes, device=batch["completion_ids"].device)
        if self._rolls():  # where each chunk starts in its rollout, and its slot: they travel with the row through
            # TRL's shuffle and split
            device = batch["completion_ids"].device
            batch["completion_offsets"] = torch.tensor(self.rollout_pool.offsets, device=device)
            batch["rollout_slots"] = torch.arange(self.rollout_pool.num_slots, device=device)
        return batch

    def _save_rng_state(self, output_dir):
        super()._save_rng_state(output_dir)  # called on every rank: each saves its own rollouts in flight beside it
        if self.rollout_pool is not None:
            state = {**self.rollout_pool.state_dict(),
                     "stream": self.prompt_stream.state_dict() if self.prompt_stream is not None else None}
            with open(os.path.join(output_dir, POOL_FILE.format(self.args.process_index)), "w") as f:
                json.dump(state, f)

    def _load_rng_state(self, checkpoint):
        super()._load_rng_state(checkpoint)
        if self.rollout_pool is not None and checkpoint is not None:
            path = os.path.join(checkpoint, POOL_FILE.format(self.args.process_index))
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is missing: the checkpoint holds no rollouts in flight for rank "
                                        f"{self.args.process_index}. Resume a horizon='rolling' run from a checkpoint "
                                        f"it wrote, with the same number of processes.")
            with open(path) as f:
                state = json.load(f)
            self.rollout_pool.load_state_dict(state)
            if self.prompt_stream is not None and state.get("stream") is not None:
                self.prompt_stream.load_state_dict(state["stream"])
            for teacher in self.teachers:  # rebuilt from the contexts at the next step (same values)
                if teacher.cache is not None:
                    teacher.cache.clear()

    def training_step(self, model, inputs, num_items_in_batch):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._step % self.current_gradient_accumulation_steps == 0:  # the step's last micro-batch, as TRL counts it
            self._end_of_step()
        return loss

    def _end_of_step(self) -> None:
        """Gather what the step measured (one collective), then let the policy, the alarm and the logs read it."""
        record = self._meters["train"].finish(self.state.global_step, self._step_horizon, self.accelerator,
                                              with_signal=self._measures_signal())
        self.cost.add_step(record)
        self._generation_cache = None  # the step's losses are done with it
        self._gather_scored_tokens()
        self.horizon_history.append(record.horizon)
        self.horizon_policy.observe(record)
        # rolled chunks train every position up to L at each step: the alarm reads them as full-horizon positions
        reach = self.rollout_pool.max_tokens if self.rollout_pool is not None else record.horizon
        self.alarm.observe(record.step, reach, record.kl_sums, record.kl_counts, record.rollouts, record.repeating)
        self._windows["train"].add(record)

    def _gather_scored_tokens(self) -> None:
        """Add the tokens every rank's teacher-server requests scored since the last call (one all-reduce)."""
        if not self._has_server():
            return
        pending = torch.tensor(self._pending_scored_tokens, device=self.accelerator.device)
        self.cost.teacher_scored_tokens += int(self.accelerator.reduce(pending, reduction="sum").item())
        self._pending_scored_tokens = 0

    def _has_server(self) -> bool:
        return any(teacher.server is not None for teacher in self.teachers)

    def _measures_signal(self) -> bool:
        """Whether this step needs the policy's own per-position signal besides the KL (top-k overlap on probes)."""
        return (self.model.training and self.horizon_policy.signal != "reverse_kl"
                and self._step_horizon == self.args.max_completion_length)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        if mode == "eval" and not self._meters["eval"].rollouts:
            # train()'s closing summary, still in eval mode after a last-step evaluation: no evaluation to report (TRL
            # adds nothing there either), and an empty one must not reach the alarm
            return super().log(logs, start_time)
        if mode == "eval":  # evaluation has no optimizer step: its rollouts, all at L, are gathered here
            record = self._meters["eval"].finish(self.state.global_step, self.args.max_completion_length,
                                                 self.accelerator)
            self.alarm.observe(record.step, record.horizon, record.kl_sums, record.kl_counts, record.rollouts,
                               record.repeating, source="evaluation")
            self._windows["eval"].add(record)
            self._gather_scored_tokens()
        metrics = self._windows[mode].metrics()
        self._windows[mode].reset()
        metrics["horizon/alarm"] = float(self.alarm.active)
        if mode == "train":
            metrics.update(self.cost.metrics())
            if not self._has_server():
                del metrics["teacher/scored_tokens"]
        for key, value in metrics.items():  # TRL's `log` adds the eval_ prefix and averages lists: one value each
            self._metrics[mode][key] = [value]
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        self.state.stateful_callbacks[STATE_KEY] = {"args": {}, "attributes": self.horizon_state()}
        super()._save_checkpoint(model, trial)

    def horizon_state(self) -> dict:
        """What a resumed run needs to continue with identical horizons and cost figures."""
        return {"policy": self.horizon_policy.state_dict(), "alarm": self.alarm.state_dict(),
                "cost": self.cost.state_dict(), "horizon_history": list(self.horizon_history)}

    def load_horizon_state(self, state: dict) -> None:
        self.horizon_policy.load_state_dict(state["policy"])
        self.alarm.load_state_dict(state["alarm"])
        # checkpoints written before the ledger kept generated_tokens and teacher_scored_tokens at the top level
        self.cost.load_state_dict(state.get("cost", state))
        self.horizon_history = list(state["horizon_history"])

    @property
    def generated_tokens(self) -> int:
        """Rollout tokens generated for training so far, over all ranks (`cost.generated_tokens`)."""
        return self.cost.generated_tokens

    @property
    def teacher_scored_tokens(self) -> int:
        """Tokens the teacher server scored so far, over all ranks (`cost.teacher_scored_tokens`)."""
        return self.cost.teacher_scored_tokens

    # ----------------------------------------------------------------------------------------------- loss
    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        # Runs inside the student wrapper's forward (TRL's `compute_loss` routes it through `_forward_redirection`).
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        if self.args.loss_window is not None and self.model.training:
            loss_mask = loss_window_mask(loss_mask, self.current_horizon(), *self.args.loss_window)
        completion_ids = inputs["completion_ids"]
        num_positions = completion_ids.size(1)  # K: only completion tokens are trained on
        multimodal_inputs = {k: inputs[k] for k in MULTIMODAL_KEYS if k in inputs}

        offsets = inputs.get("completion_offsets")
        meter = self._meters["train" if self.model.training else "eval"]
        if offsets is not None and self.model.training:  # a rolled chunk: its context runs without grad
            student_hidden = self._rolled_hidden_state(unwrapped_student, input_ids, attention_mask, num_positions,
                                                       inputs.get("rollout_slots"))
        else:
            student_hidden = self._get_last_hidden_state(
                unwrapped_student, input_ids, attention_mask, num_positions, **multimodal_inputs
            )  # (B, K, H_s)
            meter.count("student_grad_tokens", attention_mask.sum())
        device = unwrapped_student.get_output_embeddings().weight.device
        mask = loss_mask.to(device)
        batch = {"hidden": student_hidden.to(device), "completion_ids": completion_ids.to(device), "mask": mask,
                 "input_ids": input_ids, "attention_mask": attention_mask,
                 "slots": inputs.get("rollout_slots") if self.model.training else None,
                 # what a teacher server is sent
                 "prompt_ids": inputs["prompt_ids"], "prompt_mask": inputs["prompt_mask"],
                 "completion_mask": inputs["completion_mask"]}
        routes = inputs.get("teacher_index") if self.teacher_names is not None else None
        if routes is None:  # one teacher scores every row
            grids = self._teacher_grids(self.teachers[0], unwrapped_student, batch, num_positions, multimodal_inputs)
        else:  # each teacher scores its own rows; the grids are put back in the micro-batch's row order
            grids, index, idle = {}, routes.to(device), []
            if multimodal_inputs and len(set(routes.tolist())) > 1:
                raise NotImplementedError("Several teachers in one micro-batch of images: the image tensors are not "
                                          "split by row. Route a micro-batch to one teacher (batch by teacher_id).")
            for t, teacher in enumerate(self.teachers):
                rows = (index == t).nonzero().squeeze(1)
                if len(rows) == 0:
                    # Under ZeRO-3 a local teacher's forward and its head's gathers are collectives: every rank runs
                    # every local teacher on every micro-batch, an idle one on one row with nothing trained.
                    if teacher.model is None or not zero3_enabled():
                        continue
                    part = {k: (v[:1] if torch.is_tensor(v) else v) for k, v in batch.items()}
                    part.update(mask=torch.zeros_like(part["mask"]), slots=None)
                    idle.append(self._teacher_grids(teacher, unwrapped_student, part, num_positions,
                                                    multimodal_inputs, count=False)["per_token"])
                    continue
                part = {k: (v[rows.to(v.device)] if torch.is_tensor(v) else v) for k, v in batch.items()}
                part_grids = self._teacher_grids(teacher, unwrapped_student, part, num_positions, multimodal_inputs,
                                                 meter_index=t)
                for key, grid in part_grids.items():
                    if grid is not None:
                        grids[key] = grids.get(key, grid.new_zeros(mask.shape)).index_copy(0, rows, grid)
                    else:
                        grids.setdefault(key, None)
            for grid in idle:  # zeros, kept in the graph so every rank's backward gathers the same heads
                grids["per_token"] = grids["per_token"] + 0.0 * grid.sum()
        per_token, entropy, signal = grids["per_token"], grids["entropy"], grids["signal"]
        if self.args.loss_type == "sequence":  # the reward-to-go runs along each rollout: it needs (B, K)
            per_token = sequence_kl_per_token(grids["student_logprobs"], grids["teacher_logprobs"], mask)
        meter.add_tokens(per_token, mask, signal, offsets)
        loss = masked_token_mean(per_token, mask, num_items_in_batch)
        return loss, (entropy.detach() * mask).sum(), mask.sum()

    def _teacher_grids(self, teacher: Teacher, unwrapped_student, batch: dict, num_positions: int, multimodal_inputs,
                       meter_index: int | None = None, count: bool = True) -> dict:
        """One teacher's terms over the rows of `batch` (all of a micro-batch, or the rows routed to it), each on the
        rows' (B_t, K) completion grid, zero where the mask is: `per_token` (the loss term), `entropy` (the
        student's), `signal` (the policy's own, or None) and, for the sampled-token losses, `student_logprobs` and
        `teacher_logprobs`. `meter_index`: the teacher's place in the per-teacher logs; `count=False`: a ZeRO-3 idle
        teacher's forward, not a cost of training."""
        student_head = unwrapped_student.get_output_embeddings()
        mask = batch["mask"]
        device = mask.device
        s_weight, s_bias = vocab_slice(student_head, teacher.shared_vocab_size)
        # Project only the positions that are trained on (fewer tiles); Neuron compiles per shape, so it keeps all.
        compact = device.type != "neuron"
        rows = (mask.reshape(-1) != 0) if compact else slice(None)  # (B*K,)
        hidden = batch["hidden"]
        student = _Head(hidden.reshape(-1, hidden.size(-1))[rows], s_weight, s_bias,
                        logit_postprocessing(unwrapped_student.config))  # hidden (N, H_s)
        targets = batch["completion_ids"].reshape(-1)[rows]  # (N,)
        if teacher.server is None:
            terms, encoded = self._local_teacher_terms(
                teacher, student, targets, rows, batch["input_ids"], batch["attention_mask"], num_positions,
                multimodal_inputs, batch["slots"])
        else:
            terms, encoded = self._remote_teacher_terms(teacher, student, targets, rows, batch)

        def to_grid(values):  # (N,) -> (B, K); masked_scatter keeps an all-padding micro-batch connected to the graph
            if values is None:
                return None
            if not compact:
                return values.view(mask.shape)
            return values.new_zeros(mask.shape).masked_scatter(mask.bool(), values)

        grids = {key: to_grid(value) for key, value in terms.items()}
        meter = self._meters["train" if self.model.training else "eval"]
        if count and teacher.server is None:
            meter.count("teacher_tokens", encoded)
        if meter_index is not None:
            meter.add_teacher(meter_index, grids["per_token"], mask, encoded)
        return grids

    def _rolled_hidden_state(self, unwrapped_model, input_ids, attention_mask, num_positions, slots=None):
        """The student's last hidden states (B, K, H) that predict the K chunk tokens ending `input_ids`, with the
        context before them computed without grad.

        The gradient is truncated backprop through the context: the context's keys and values are constants, so the
        loss trains the weights through the chunk's own positions (and the last context position, which predicts the
        chunk's first token) only; the forward values equal one full forward's. The context runs once, under no_grad,
        into a KV cache; the K + 1 last positions run with grad on top of it. Positions and padding follow the full
        forward's (left-padded context: cache positions count the padding, as TRL's forward does). Gradient
        checkpointing is paused for the short part: transformers drops a cache passed into a checkpointed layer, and a
        chunk's activations are small.

        With `rolling_student_cache`, the context's keys and values are the ones this step's generation computed
        (`slots`: each row's row in the generation batch) and the context is not run again; they were encoded at the
        rows' true positions, so the chunk's are too (equal to the padded positions' values to float tolerance)."""
        if is_peft_model(unwrapped_model):
            unwrapped_model = unwrapped_model.base_model.model
        backbone = unwrapped_model.base_model
        split = input_ids.size(1) - num_positions - 1  # context tokens before its last one
        meter = self._meters["train"]
        if split < 1:
            meter.count("student_grad_tokens", attention_mask.sum())
            return self._get_last_hidden_state(unwrapped_model, input_ids, attention_mask, num_positions)
        meter.count("student_grad_tokens", attention_mask[:, split:].sum())
        cache, position_ids = self._generated_context_cache(unwrapped_model, split + 1, split, slots), None
        if cache is not None:
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, split:]
        else:
            meter.count("student_nograd_tokens", attention_mask[:, :split].sum())
            cache = DynamicCache(config=unwrapped_model.config)
            with torch.no_grad():
                backbone(input_ids=input_ids[:, :split], attention_mask=attention_mask[:, :split], cache=cache,
                         use_cache=True)
        checkpointed = [m for m in backbone.modules()
                        if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
        for module in checkpointed:
            module.gradient_checkpointing = False
        try:
            hidden = backbone(input_ids=input_ids[:, split:], attention_mask=attention_mask, position_ids=position_ids,
                              cache=cache, use_cache=True).last_hidden_state  # (B, K + 1, H)
        finally:
            for module in checkpointed:
                module.gradient_checkpointing = True
        return hidden[:, :-1, :]  # the last position predicts past the chunk

    def _generated_context_cache(self, unwrapped_model, width: int, length: int, slots):
        """This step's generation cache cut to `slots`' rows and their first `length` positions, if it can serve a
        micro-batch whose contexts are `width` wide (the generation batch's padded width); None otherwise."""
        if self._generation_cache is None or slots is None:
            return None
        step, cache, generated_width = self._generation_cache
        if step != self.state.global_step or generated_width != width:
            return None
        return kv_cache.context_cache(cache, slots, length, unwrapped_model.config)

    def _local_teacher_terms(self, teacher: Teacher, student, targets, rows, input_ids, attention_mask, num_positions,
                             multimodal_inputs, slots=None):
        """Per trained position (N,): the loss term, the student's entropy, the policy's signal (or None) and, for
        the sampled-token losses, both log-probs of the actual tokens; `teacher` is a local model. `slots`: each
        row's rolling slot, whose cached context the teacher does not re-encode (`teacher.cache`). Returns them by
        name with the number of tokens the teacher encoded."""
        # The teacher backbone goes through its own wrapper, as in TRL, so DeepSpeed materializes its shards.
        teacher_model = teacher.model
        teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(teacher_model)
        with torch.no_grad():
            if slots is not None and teacher.cache is not None:
                teacher_hidden, encoded = self._forward_redirection(
                    teacher_model, unwrapped_teacher, self._cached_teacher_hidden_state, unwrapped_teacher,
                    input_ids, attention_mask, num_positions, slots, teacher.cache)
            else:
                teacher_hidden = self._forward_redirection(
                    teacher_model, unwrapped_teacher, self._get_last_hidden_state, unwrapped_teacher, input_ids,
                    attention_mask, num_positions, **multimodal_inputs,
                )  # (B, K, H_t)
                encoded = int(attention_mask.sum())
        t_weight, t_bias = vocab_slice(unwrapped_teacher.get_output_embeddings(), teacher.shared_vocab_size)
        t_post = logit_postprocessing(unwrapped_teacher.config)
        h_t = teacher_hidden.to(targets.device).reshape(-1, teacher_hidden.size(-1))[rows]  # (N, H_t)
        h_s, s_weight, s_bias, s_post = student

        student_logprobs = teacher_logprobs = None
        if self.args.loss_type == "reverse_kl":
            per_token, entropy = reverse_kl_per_token(
                h_s, s_weight, h_t, t_weight, temperature=self.temperature, student_bias=s_bias,
                teacher_bias=t_bias, student_post=s_post, teacher_post=t_post,
            )  # (N,), (N,)
        else:  # estimators on the sampled tokens' log-probs
            student_logprobs, entropy = token_logprobs(
                h_s, s_weight, targets, temperature=self.temperature, bias=s_bias, post=s_post, with_entropy=True
            )
            with torch.no_grad():
                teacher_logprobs, _ = token_logprobs(
                    h_t, t_weight, targets, temperature=self.temperature, bias=t_bias, post=t_post
                )
            per_token = sampled_kl_per_token(student_logprobs, teacher_logprobs)
        signal = None
        if self._measures_signal():
            signal = topk_disagreement_per_token(h_s, s_weight, h_t, t_weight, k=self.horizon_policy.adaptive_top_k,
                                                 student_bias=s_bias, teacher_bias=t_bias, student_post=s_post,
                                                 teacher_post=t_post)
        return {"per_token": per_token, "entropy": entropy, "signal": signal, "student_logprobs": student_logprobs,
                "teacher_logprobs": teacher_logprobs}, encoded

    def _cached_teacher_hidden_state(self, unwrapped_teacher, input_ids, attention_mask, num_positions, slots, cache):
        """As `_get_last_hidden_state` for the teacher on rolled chunks (B, K, H_t), encoding only what each slot's
        cache has not seen; returns it with the number of tokens encoded."""
        if is_peft_model(unwrapped_teacher):
            unwrapped_teacher = unwrapped_teacher.base_model.model
        completion_mask = attention_mask[:, -num_positions:]
        sequences = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask, strict=True)]
        return cache.hidden_states(
            unwrapped_teacher.base_model, unwrapped_teacher.config, sequences, slots.tolist(),
            completion_mask.sum(1).tolist(), num_positions, pad_id=self._tokenizer.pad_token_id)

    def _remote_teacher_terms(self, teacher: Teacher, student, targets, rows, inputs):
        """As `_local_teacher_terms`, with the teacher's log-probs from its server: the actual tokens' for the
        sampled-token losses, the top-k + tail reverse KL for `topk_reverse_kl`. Temperature is 1 (the config
        checks it), the one at which vLLM returns log-probs. Returns the terms with the number of tokens scored."""
        h_s, s_weight, s_bias, s_post = student
        scores = teacher.server.score_batch(inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"],
                                            inputs["completion_mask"])  # raises, naming the URL, on failure
        scored = int(scores.mask.sum())
        self._pending_scored_tokens += scored
        head_rows = s_weight.ds_shape[0] if hasattr(s_weight, "ds_shape") else s_weight.size(0)
        scores = scores.restrict_vocab(head_rows)
        device = targets.device
        if self.args.loss_type == "topk_reverse_kl":
            k = scores.topk_ids.size(-1)
            topk_ids = scores.topk_ids.to(device).reshape(-1, k)[rows]  # (N, k)
            teacher_topk = scores.topk_logprobs.to(device).reshape(-1, k)[rows]
            student_topk, entropy = logprobs_at(h_s, s_weight, topk_ids, temperature=self.temperature, bias=s_bias,
                                                post=s_post, with_entropy=True)
            return {"per_token": topk_reverse_kl_per_token(student_topk, teacher_topk), "entropy": entropy,
                    "signal": None, "student_logprobs": None, "teacher_logprobs": None}, scored
        student_logprobs, entropy = token_logprobs(
            h_s, s_weight, targets, temperature=self.temperature, bias=s_bias, post=s_post, with_entropy=True
        )
        teacher_logprobs = scores.actual_logprobs.to(device).reshape(-1)[rows]
        return {"per_token": sampled_kl_per_token(student_logprobs, teacher_logprobs), "entropy": entropy,
                "signal": None, "student_logprobs": student_logprobs, "teacher_logprobs": teacher_logprobs}, scored

    # ----------------------------------------------------------------------------------------------- shipping
    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's card (tags, paper, citations), plus a section with the teacher, horizon, loss, dataset and metrics."""
        if not self.is_world_process_zero():
            return
        if dataset_name is None:
            dataset_name = getattr(getattr(self.train_dataset, "info", None), "dataset_name", None)
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        adapter_of = model_id(self.model) if is_peft_model(self.model) else None
        add_distillation_section(os.path.join(self.args.output_dir, "README.md"),
                                 distillation_section(self, dataset_name), adapter_of=adapter_of)

    def push_to_hub(self, commit_message="End of training", blocking=True, token=None, revision=None, private=None,
                    **kwargs):
        """[`~transformers.Trainer.push_to_hub`], after checking that a Hub token is available (on every rank, so a
        missing token fails the same way everywhere instead of leaving the other ranks waiting)."""
        require_hub_token(token or self.args.hub_token)
        return super().push_to_hub(commit_message=commit_message, blocking=blocking, token=token, revision=revision,
                                   private=private, **kwargs)


class _Head(NamedTuple):
    """The student's side of the loss: hidden states at the trained positions and the head that projects them."""

    hidden: torch.Tensor  # (N, H)
    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None
    post: tuple


def _backbone(model):
    """The module `generate` runs per decode step under the LM head (through a PEFT wrapper)."""
    if is_peft_model(model):
        model = model.base_model.model
    return model.base_model


class _RestoreHorizonState(TrainerCallback):
    """On a resumed run, loads the state `_save_checkpoint` stored in the checkpoint's trainer_state.json."""

    def __init__(self, trainer: HorizonOPDTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        saved = (state.stateful_callbacks or {}).get(STATE_KEY)
        if saved and state.global_step > 0:
            self.trainer.load_horizon_state(saved["attributes"])

