import copy
import os
import textwrap

import torch
from accelerate.utils import is_peft_model
from trl import DistillationTrainer

from . import kv_cache, scoring, vllm_compat
from .config import HorizonOPDConfig
from .data import check_datasets
from .export import add_distillation_section, distillation_section, model_id, require_hub_token
from .horizon import HorizonPolicy, horizon_at
from .loss import loss_window_mask, loss_window_tokens, masked_token_mean, sequence_kl_per_token
from .rolling import Rolling
from .step_book import STATE_KEY, RestoreHorizonState, StepBook
from .teachers import (
    RemoteTeacher,
    Teacher,
    attach,
    check_teachers,
    has_server,
    load_teachers,
    plan_teachers,
    register_student_head_for_zero3,
    teacher_indices,
)

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
    names its teacher in `args.teacher_id_column` (`horizon_opd/teachers/routing.py`). The `args` object passed in is
    copied, never modified.
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
        self._check_arguments(model, args, plan, routed, train_dataset, eval_dataset, peft_config, tools)
        loaded = load_teachers(plan, args)  # servers first: an unreachable URL fails before the student loads
        vllm_compat.prepare(args)  # before TRL builds the engine
        super().__init__(model=model, teacher_model=None, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers, quantization_config=quantization_config, peft_config=peft_config,
                         tools=tools)
        register_student_head_for_zero3(self)  # both losses read the student's lm_head weight directly
        if self.use_vllm and self.vllm_mode == "colocate":  # the context tokens its prefix cache spared
            vllm_compat.count_prefix_cache_hits(self.vllm_generation.llm, self._count_prefix_cache_hits)
            if args.rolling_student_memory:  # the engine's memory of each context: its prefix cache, kept
                vllm_compat.keep_prefix_cache(self.vllm_generation.llm, args.rolling_memory_refresh_every,
                                              lambda: self.state.global_step)
        self.teachers: list[Teacher] = [attach(self, name, kind, loaded[name]) for name, (kind, _) in plan.items()]
        # the run's names of its teachers, in the order of the batch's `teacher_index` (None: one teacher, no column)
        self.teacher_names: list[str] | None = [t.name for t in self.teachers] if routed else None
        only = self.teachers[0] if not routed else Teacher(None)
        self.teacher_model = only.model  # the one local teacher (None with a server or several teachers)
        self.remote_teacher: RemoteTeacher | None = only.server  # the one teacher server, likewise
        self.shared_vocab_size = only.shared_vocab_size
        # the step's meters, log windows, alarm, cost ledger and horizon policy (`step_book.py`)
        self.book = StepBook(args, self.teacher_names, logs_scored_tokens=has_server(self.teachers))
        self.rolling = self._start_rolling(args) if args.horizon == "rolling" else None  # rollouts in flight
        self.rollout_pool = self.rolling.pool if self.rolling else None
        self.prompt_stream = self.rolling.stream if self.rolling else None  # where freed slots draw their prompts
        self.teacher_cache = only.cache  # the one teacher's keys and values per slot (rolling)
        self.add_callback(RestoreHorizonState(self))

    def _start_rolling(self, args) -> Rolling:
        """The rollouts in flight across steps (horizon="rolling"), their prompt stream and caches."""
        rolling = Rolling(args, horizon_at(0, 1, self.horizon_policy), self.eos_token_ids, self.train_dataset,
                          self.accelerator, self.shuffle_dataset, self.teachers,
                          self.accelerator.unwrap_model(self.model), self.is_deepspeed_enabled, self.use_vllm)
        self.book.reach = rolling.pool.max_tokens  # rolled chunks train every position up to it
        return rolling

    @staticmethod
    def _check_arguments(model, args, plan, routed, train_dataset, eval_dataset, peft_config, tools) -> None:
        """What must hold before any model loads."""
        if tools and args.horizon != "full":
            raise ValueError(
                f"tools with horizon={args.horizon!r}: a tool-calling rollout spans several generations, each of which "
                f"would get the whole horizon. Use horizon='full' with tools."
            )
        check_datasets(train_dataset, eval_dataset, args)
        if routed:
            check_teachers(plan, train_dataset, eval_dataset, args)
        if peft_config is not None and not isinstance(model, str) and is_peft_model(model):
            raise ValueError(
                f"model is already a PeftModel (adapters {list(model.peft_config)}) and peft_config asks for another "
                f"adapter on top. Either pass peft_config=None to keep training the adapter it has, or merge it first "
                f"(merged = horizon_opd.export.merge_adapter(model)) and pass the merged model with peft_config."
            )
        if args.push_to_hub:
            require_hub_token(args.hub_token)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if getattr(self, "teacher_names", None) is not None and \
                self.args.teacher_id_column not in self._signature_columns:
            # remove_unused_columns=True must keep the column that routes each row
            self._signature_columns = [*self._signature_columns, self.args.teacher_id_column]

    # ----------------------------------------------------------------------------------------------- the step's book
    # The horizon policy, alarm, cost ledger and meters live in `self.book` (`step_book.py`); these read them.
    @property
    def horizon_policy(self) -> HorizonPolicy:
        return self.book.policy

    @property
    def alarm(self):
        return self.book.alarm

    @property
    def cost(self):
        """What training has cost so far, over all ranks (`monitor.CostLedger`)."""
        return self.book.cost

    @property
    def horizon_history(self) -> list[int]:
        """The horizon of every optimizer step so far."""
        return self.book.history

    @property
    def _meters(self):
        return self.book.meters

    @property
    def generated_tokens(self) -> int:
        """Rollout tokens generated for training so far, over all ranks (`cost.generated_tokens`)."""
        return self.cost.generated_tokens

    @property
    def teacher_scored_tokens(self) -> int:
        """Tokens the teacher server scored so far, over all ranks (`cost.teacher_scored_tokens`)."""
        return self.cost.teacher_scored_tokens

    def _meter(self):
        return self.book.meters["train" if self.model.training else "eval"]

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
            self.book.step_horizon = horizon
            if not (self._rolls() and self.rolling.memory is not None):  # a memory counts what it encodes
                self._meters["train"].count("prefill_tokens", sum(len(ids) for ids in prompt_ids))
        self._set_generation_limit(horizon)
        if not self._rolls():
            completion_ids = super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
            self._meter().add_rollouts(completion_ids)
            return completion_ids
        step = self.state.global_step
        if self.rolling.student_cache:
            completion_ids = self.rolling.generate(
                lambda: super(HorizonOPDTrainer, self)._generate_single_turn(prompt_ids, images, multimodal_fields),
                self.accelerator.unwrap_model(self.model), prompt_ids, step, self.pad_to_multiple_of,
                self._tokenizer.pad_token_id, self._meters["train"], self._metrics["train"])
        else:
            completion_ids = super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        # prompt_ids are the slots' contexts (`_tokenize_prompts`): each rollout gains one chunk
        return self.rolling.advance(completion_ids, step, self._meters["train"])

    def _count_prefix_cache_hits(self, cached_tokens: int) -> None:
        if self.model.training:  # as prefill_tokens: training's generations
            self._meters["train"].count("prefill_cached_tokens", cached_tokens)

    def _set_generation_limit(self, max_new_tokens: int) -> None:
        self.generation_config.max_new_tokens = max_new_tokens
        self.generation_kwargs["max_new_tokens"] = max_new_tokens
        if self.use_vllm:
            self.vllm_generation.max_completion_length = max_new_tokens

    # ----------------------------------------------------------------------------------------------- rollouts
    def _rolls(self) -> bool:
        """Whether this generation continues rollouts in flight (training with horizon="rolling")."""
        return self.rolling is not None and self.model.training

    def get_train_dataloader(self):
        """With rolling rollouts the prompts come from `prompt_stream`, so the loop gets a clock (`Rolling.dataloader`;
        the config requires max_steps for rolling)."""
        if self.rolling is None:
            return super().get_train_dataloader()
        return self.rolling.dataloader(self.args.max_steps, self.args.gradient_accumulation_steps)

    def _tokenize_prompts(self, prompts: list):
        """With rolling rollouts, generation reads each slot's context instead of a prompt (`Rolling.contexts`)."""
        if not self._rolls():
            return super()._tokenize_prompts(prompts)
        return self.rolling.contexts(prompts, self.state.global_step, super()._tokenize_prompts,
                                     super()._generate_single_turn, self._set_generation_limit, self._meters["train"],
                                     self._metrics["train"])

    def _generate_and_score_completions(self, inputs):
        if self._rolls():  # the step's rows are the slots' rows; freed slots draw the next prompts of the stream
            inputs = self.rolling.start_step(self._meters["train"])
        elif self.model.training:
            self._meters["train"].count("prompts_started", len(inputs))
        routes = None  # each row's teacher, read before generating so a row naming no teacher fails first
        if self.teacher_names is not None:
            routes = teacher_indices(inputs, self.args.teacher_id_column, self.teacher_names)
        batch = super()._generate_and_score_completions(inputs)
        if routes is not None:  # travels with its row through TRL's shuffle and split, like the rolling keys below
            batch["teacher_index"] = torch.tensor(routes, device=batch["completion_ids"].device)
        if self._rolls():
            self.rolling.mark(batch)
        return batch

    def _save_rng_state(self, output_dir):
        super()._save_rng_state(output_dir)  # called on every rank: each saves its own rollouts in flight beside it
        if self.rolling is not None:
            self.rolling.save(output_dir, self.args.process_index)

    def _load_rng_state(self, checkpoint):
        super()._load_rng_state(checkpoint)
        if self.rolling is not None and checkpoint is not None:
            self.rolling.load(checkpoint, self.args.process_index)

    # ----------------------------------------------------------------------------------------------- end of step
    def training_step(self, model, inputs, num_items_in_batch):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._step % self.current_gradient_accumulation_steps == 0:  # the step's last micro-batch, as TRL counts it
            self.book.end_of_step(self.state.global_step, self.accelerator, self._measures_signal())
            if self.rolling is not None:
                self.rolling.end_step()
        return loss

    def _measures_signal(self) -> bool:
        """Whether this step needs the policy's own per-position signal besides the KL (top-k overlap on probes)."""
        return (self.model.training and self.horizon_policy.signal != "reverse_kl"
                and self.book.step_horizon == self.args.max_completion_length)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = self.book.log_metrics(mode, self.state.global_step, self.accelerator)
        for key, value in (metrics or {}).items():  # TRL's `log` adds the eval_ prefix and averages lists: one each
            self._metrics[mode][key] = [value]
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        self.state.stateful_callbacks[STATE_KEY] = {"args": {}, "attributes": self.horizon_state()}
        super()._save_checkpoint(model, trial)

    def horizon_state(self) -> dict:
        """What a resumed run needs to continue with identical horizons and cost figures."""
        return self.book.state_dict()

    def load_horizon_state(self, state: dict) -> None:
        self.book.load_state_dict(state)

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
        slots = inputs.get("rollout_slots") if self.model.training else None
        student_hidden = self._student_hidden_state(unwrapped_student, inputs, input_ids, attention_mask,
                                                    num_positions, multimodal_inputs)  # (B, K, H_s)
        device = unwrapped_student.get_output_embeddings().weight.device
        mask = loss_mask.to(device)
        batch = {"hidden": student_hidden.to(device), "completion_ids": completion_ids.to(device), "mask": mask,
                 "input_ids": input_ids, "attention_mask": attention_mask, "slots": slots,
                 # what a teacher server is sent
                 "prompt_ids": inputs["prompt_ids"], "prompt_mask": inputs["prompt_mask"],
                 "completion_mask": inputs["completion_mask"]}
        routes = inputs.get("teacher_index") if self.teacher_names is not None else None
        grids = scoring.score(self._scoring(), self.teachers, routes, unwrapped_student, batch, num_positions,
                              multimodal_inputs)
        per_token, entropy, signal = grids["per_token"], grids["entropy"], grids["signal"]
        if self.args.loss_type == "sequence":  # the reward-to-go runs along each rollout: it needs (B, K)
            per_token = sequence_kl_per_token(grids["student_logprobs"], grids["teacher_logprobs"], mask)
        self._meter().add_tokens(per_token, mask, signal, inputs.get("completion_offsets"))
        loss = masked_token_mean(per_token, mask, num_items_in_batch)
        return loss, (entropy.detach() * mask).sum(), mask.sum()

    def _student_hidden_state(self, unwrapped_student, inputs, input_ids, attention_mask, num_positions,
                              multimodal_inputs):
        """The student's last hidden states (B, K, H_s) at the completion positions; a rolled chunk's context runs
        without grad (`kv_cache.rolled_hidden_state`), from this step's generation cache when there is one, unless
        `rolling_context_grad` (one forward with grad over context and chunk)."""
        if inputs.get("completion_offsets") is not None and self.model.training and not self.args.rolling_context_grad:
            hidden = kv_cache.rolled_hidden_state(
                unwrapped_student, input_ids, attention_mask, num_positions, self._meters["train"],
                generation=self.rolling.generation(self.state.global_step) if self.rolling else None,
                slots=inputs.get("rollout_slots"))
            if hidden is not None:
                return hidden
            multimodal_inputs = {}  # a rolled chunk carries no images
        self._meter().count("student_grad_tokens", attention_mask.sum())
        return self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, num_positions,
                                           **multimodal_inputs)

    def _scoring(self) -> scoring.Scoring:
        """What `scoring` needs from this trainer for one micro-batch (TRL's forward redirection among it)."""
        signal_top_k = self.horizon_policy.adaptive_top_k if self._measures_signal() else None
        return scoring.Scoring(self.args.loss_type, self.temperature, self._meter(), self.accelerator.unwrap_model,
                               self._forward_redirection, self._get_last_hidden_state, self._tokenizer.pad_token_id,
                               signal_top_k)

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
