import copy
import math
import os
import textwrap

import torch
from accelerate.utils import is_peft_model
from trl import DistillationTrainer
from trl.models import prepare_deepspeed
from trl.trainer.utils import create_model_from_path, maybe_gather_lm_head_ctx

from .config import HorizonOPDConfig
from .export import add_distillation_section, distillation_section, model_id, require_hub_token
from .horizon import HorizonSchedule
from .loss import (
    logit_postprocessing,
    masked_token_mean,
    position_bin_sums,
    reverse_kl_per_token,
    sampled_kl_per_token,
    token_logprobs,
)

# Inputs TRL extracts for vision-language models; forwarded untouched to both backbones.
_MULTIMODAL_KEYS = (
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
    Distillation?", arXiv 2605.31490). A [`~trl.DistillationTrainer`] whose student generates at most the horizon of
    the current step (`full`, `truncated` or `progressive`, see [`HorizonOPDConfig`]) and is trained on the token-level
    reverse KL(student || teacher) of every generated token. Generation, batching, PEFT, DeepSpeed/FSDP, vLLM, logging
    and model cards are TRL's; this class sets the generation horizon, computes the loss, and logs the horizon and the
    reverse KL by rollout position.

    Takes the same arguments as [`~trl.DistillationTrainer`]; `args` must be a [`HorizonOPDConfig`] and a teacher is
    required. The `args` object passed in is copied, never modified.
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

    def __init__(
        self,
        model,
        teacher_model=None,
        args: HorizonOPDConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
    ):
        if args is None:
            args = HorizonOPDConfig(output_dir="horizon-opd")
        elif not isinstance(args, HorizonOPDConfig):
            raise TypeError(
                f"args is a {type(args).__name__}; HorizonOPDTrainer needs a HorizonOPDConfig (it holds the horizon "
                f"settings). Build one with HorizonOPDConfig(output_dir=..., horizon=..., ...)."
            )
        # TRL adjusts a few fields of `args` in place (dataloader workers, checkpointing kwargs); work on a copy so the
        # caller's object is never modified.
        args = copy.deepcopy(args)
        if teacher_model is None:
            raise ValueError("HorizonOPDTrainer needs a teacher_model (a model instance or a local path / Hub id).")
        if tools and args.horizon != "full":
            raise ValueError(
                f"tools with horizon={args.horizon!r}: a tool-calling rollout spans several generations, each of which "
                f"would get the whole horizon. Use horizon='full' with tools."
            )
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            _check_prompt_dataset(dataset, name)
        if isinstance(teacher_model, str):
            teacher_model = _load_teacher(teacher_model, args)
        elif args.teacher_model_init_kwargs is not None:
            raise ValueError(
                "teacher_model_init_kwargs is set but teacher_model is already instantiated. Pass the teacher as a "
                "path to have it loaded with those kwargs, or drop teacher_model_init_kwargs."
            )
        self.horizon_schedule: HorizonSchedule = args.horizon_schedule
        if peft_config is not None and not isinstance(model, str) and is_peft_model(model):
            raise ValueError(
                f"model is already a PeftModel (adapters {list(model.peft_config)}) and peft_config asks for another "
                f"adapter on top. Either pass peft_config=None to keep training the adapter it has, or merge it first "
                f"(merged = horizon_opd.export.merge_adapter(model)) and pass the merged model with peft_config."
            )
        if args.push_to_hub:
            require_hub_token(args.hub_token)
        if args.deepspeed_plugin is not None:
            _check_deepspeed_processes(args)
            _check_teacher_for_deepspeed(teacher_model, args.deepspeed_plugin.zero_stage)

        # TRL's constructor requires identical vocab sizes; the teacher is attached below instead, where a padded
        # vocabulary (e.g. Qwen2.5-1.5B 151936 vs Qwen2.5-7B 152064) is reduced to the shared tokenizer vocabulary.
        super().__init__(
            model=model,
            teacher_model=None,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            tools=tools,
        )
        self.shared_vocab_size = _shared_vocab_size(self.model, teacher_model, len(self._tokenizer))
        student_vocab = self.model.config.get_text_config().vocab_size
        if self.shared_vocab_size is not None and student_vocab > self.shared_vocab_size:
            # The student's padding rows are ids no tokenizer token has and the teacher cannot score: never sample them.
            padding_ids = list(range(self.shared_vocab_size, student_vocab))
            suppressed = list(self.generation_kwargs.get("suppress_tokens") or []) + padding_ids
            self.generation_kwargs["suppress_tokens"] = suppressed
            self.generation_config.suppress_tokens = suppressed
            if self.use_vllm:
                raise ValueError(
                    f"The student's vocab_size {student_vocab} exceeds the teacher's {self.shared_vocab_size}, and vLLM "
                    f"generation cannot be told to avoid the student's padding ids. Use use_vllm=False, or a teacher "
                    f"with at least the student's vocab_size."
                )
        teacher_model.requires_grad_(False)
        if self.is_deepspeed_enabled:
            self.teacher_model = _prepare_teacher_for_deepspeed(teacher_model, self.accelerator)
        else:
            self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
            if not self.is_fsdp_enabled:
                _check_heads_share_a_device(self.model, self.accelerator.unwrap_model(self.teacher_model))
        self._position_stats = None  # (sums, counts) of the last micro-batch, logged by `compute_loss`
        self.generated_tokens = 0  # rollout tokens this process generated for training (the horizon's cost driver)

    # ----------------------------------------------------------------------------------------------- horizon
    def current_horizon(self) -> int:
        """Rollout horizon in tokens for the current optimizer step; evaluation always uses the full horizon L.

        A pure function of `state.global_step` and the schedule: every micro-batch of one optimizer step (they share
        one generation batch) and every rank see the same value, and a resumed run continues the schedule."""
        if not self.model.training:
            return self.horizon_schedule.max_completion_length
        return self.horizon_schedule.tokens_at(self.state.global_step, self.state.max_steps)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        # The horizon bounds generation itself (max_new_tokens / vLLM max_tokens), so the tokens past it are never
        # computed. A rollout cut there has no EOS appended: TRL keeps every generated token and masks only after an EOS.
        horizon = self.current_horizon()
        self.generation_config.max_new_tokens = horizon
        self.generation_kwargs["max_new_tokens"] = horizon
        if self.use_vllm:
            self.vllm_generation.max_completion_length = horizon
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["horizon/tokens"].append(float(horizon))
        self._metrics[mode]["horizon/ratio"].append(horizon / self.horizon_schedule.max_completion_length)
        completion_ids = super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        if mode == "train":
            self.generated_tokens += sum(len(ids) for ids in completion_ids)
        return completion_ids

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
        missing token fails the same way everywhere instead of leaving the other ranks waiting). `dataset_name` goes
        to the model card."""
        require_hub_token(token or self.args.hub_token)
        return super().push_to_hub(commit_message=commit_message, blocking=blocking, token=token, revision=revision,
                                   private=private, **kwargs)

    # ----------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        output = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Gathered here, after the forward redirection returns, as TRL does for the entropy (no collective inside the
        # wrapped forward).
        if self._position_stats is not None:
            sums, counts = self._position_stats
            self._position_stats = None
            sums = self.accelerator.gather(sums[None]).sum(0)
            counts = self.accelerator.gather(counts[None]).sum(0)
            mode = "train" if self.model.training else "eval"
            for i, (s, c) in enumerate(zip(sums.tolist(), counts.tolist(), strict=True)):
                self._metrics[mode][f"kl_by_position/bin_{i}"].append(s / c if c > 0 else math.nan)
        return output

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        # Runs inside the student wrapper's forward (TRL's `compute_loss` routes it through `_forward_redirection`).
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        completion_ids = inputs["completion_ids"]
        num_positions = completion_ids.size(1)  # K: only completion tokens are trained on
        multimodal_inputs = {k: inputs[k] for k in _MULTIMODAL_KEYS if k in inputs}

        student_hidden = self._get_last_hidden_state(
            unwrapped_student, input_ids, attention_mask, num_positions, **multimodal_inputs
        )  # (B, K, H_s)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(
                self.teacher_model,
                unwrapped_teacher,
                self._get_last_hidden_state,
                unwrapped_teacher,
                input_ids,
                attention_mask,
                num_positions,
                **multimodal_inputs,
            )  # (B, K, H_t)

        student_head = unwrapped_student.get_output_embeddings()
        teacher_head = unwrapped_teacher.get_output_embeddings()
        if student_head.weight.device != teacher_head.weight.device:
            raise ValueError(
                f"The student lm_head is on {student_head.weight.device} but the teacher lm_head is on "
                f"{teacher_head.weight.device}. The loss compares both heads tile by tile: place them on the same "
                f"device in their device_map."
            )
        device = student_head.weight.device
        s_weight, s_bias = _vocab_slice(student_head, self.shared_vocab_size)
        t_weight, t_bias = _vocab_slice(teacher_head, self.shared_vocab_size)

        # Project only the positions that are trained on (fewer tiles); Neuron compiles per shape, so it keeps all.
        valid = loss_mask.reshape(-1).to(device) != 0  # (B*K,)
        compact = device.type != "neuron"
        rows = valid if compact else slice(None)
        h_s = student_hidden.to(device).reshape(-1, student_hidden.size(-1))[rows]  # (N, H_s)
        h_t = teacher_hidden.to(device).reshape(-1, teacher_hidden.size(-1))[rows]  # (N, H_t)
        s_post = logit_postprocessing(unwrapped_student.config)
        t_post = logit_postprocessing(unwrapped_teacher.config)

        if self.args.loss_type == "reverse_kl":
            per_token, entropy = reverse_kl_per_token(
                h_s, s_weight, h_t, t_weight, temperature=self.temperature, student_bias=s_bias,
                teacher_bias=t_bias, student_post=s_post, teacher_post=t_post,
            )  # (N,), (N,)
        else:
            targets = completion_ids.reshape(-1).to(device)[rows]
            student_logprobs, entropy = token_logprobs(
                h_s, s_weight, targets, temperature=self.temperature, bias=s_bias, post=s_post, with_entropy=True
            )
            with torch.no_grad():
                teacher_logprobs, _ = token_logprobs(
                    h_t, t_weight, targets, temperature=self.temperature, bias=t_bias, post=t_post
                )
            per_token = sampled_kl_per_token(student_logprobs, teacher_logprobs)

        mask = loss_mask.to(device)
        if compact:
            # Back to (B, K); masked_scatter keeps an all-padding micro-batch connected to the graph (zero gradient).
            per_token = per_token.new_zeros(mask.shape).masked_scatter(mask.bool(), per_token)
            entropy = entropy.new_zeros(mask.shape).masked_scatter(mask.bool(), entropy)
        else:
            per_token, entropy = per_token.view(mask.shape), entropy.view(mask.shape)
        loss = masked_token_mean(per_token, mask, num_items_in_batch)
        if self.args.position_bins > 0:
            self._position_stats = position_bin_sums(per_token, mask, self.current_horizon(), self.args.position_bins)
        return loss, (entropy.detach() * mask).sum(), mask.sum()


def _vocab_slice(head: torch.nn.Module, vocab_size: int | None):
    """The head's weight and bias, restricted to the first `vocab_size` rows when the two heads differ in size."""
    weight, bias = head.weight, head.bias
    rows = weight.ds_shape[0] if hasattr(weight, "ds_shape") else weight.size(0)
    if vocab_size is None or rows == vocab_size:
        return weight, bias
    if not hasattr(weight, "ds_shape"):
        return weight[:vocab_size], (None if bias is None else bias[:vocab_size])
    # ZeRO-3: the parameter holds an empty shard, and TRL's kernels gather a head by its `ds_status`, which a slice
    # lacks. Gather it here, copy the shared rows and mark the copy available, so the kernels use it as is. The copy
    # lives for one micro-batch; the student's gradient still reaches its parameter through the clone and the slice.
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    with maybe_gather_lm_head_ctx(weight, bias):
        weight = weight[:vocab_size].clone()
        bias = None if bias is None else bias[:vocab_size].clone()
    for tensor in (weight, bias):
        if tensor is not None:
            tensor.ds_status = ZeroParamStatus.AVAILABLE
    return weight, bias


def _shared_vocab_size(student, teacher, tokenizer_size: int) -> int | None:
    """`None` when both heads have the same size; else the smaller one, if it still covers every tokenizer id."""
    student_vocab = student.config.get_text_config().vocab_size
    teacher_vocab = teacher.config.get_text_config().vocab_size
    if student_vocab == teacher_vocab:
        return None
    shared = min(student_vocab, teacher_vocab)
    if tokenizer_size > shared:
        raise ValueError(
            f"The student has vocab_size {student_vocab} and the teacher vocab_size {teacher_vocab}, but the tokenizer "
            f"has {tokenizer_size} tokens: one model cannot score every token, so the two do not share a tokenizer. "
            f"Distillation compares full next-token distributions and needs one: pick a teacher from the student's "
            f"family (sizes may differ only by padding rows past the tokenizer), or use TRL's GOLD trainer for "
            f"cross-tokenizer distillation."
        )
    return shared


def _check_deepspeed_processes(args: HorizonOPDConfig) -> None:
    """`accelerate launch` started WORLD_SIZE processes; fail if the trainer would train as if it were alone."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != args.world_size:
        raise ValueError(
            f"accelerate launch started {launched} DeepSpeed processes but this one sees a world of "
            f"{args.world_size}: without a GPU, accelerate picks no communication backend. Pass ddp_backend='gloo' "
            f"(--ddp_backend gloo) to run DeepSpeed on CPU."
        )


def _check_teacher_for_deepspeed(teacher, zero_stage: int) -> None:
    """Reject teachers DeepSpeed cannot take over, before anything is built: DeepSpeed places (and under ZeRO-3
    shards) the teacher itself."""
    device_map = getattr(teacher, "hf_device_map", None)
    if device_map is not None and len(set(device_map.values())) > 1:
        raise ValueError(
            f"The teacher was dispatched over several devices with a device_map ({device_map}), but under DeepSpeed "
            f"the teacher is placed by DeepSpeed (sharded under ZeRO-3). Load it with device_map=None, or pass its "
            f"path as teacher_model so HorizonOPDTrainer loads it that way."
        )
    quantization = [f"{bits}-bit" for bits in (4, 8) if getattr(teacher, f"is_loaded_in_{bits}bit", False)]
    if zero_stage == 3 and quantization:
        raise ValueError(
            f"The teacher is quantized ({quantization[0]}), and ZeRO-3 cannot partition quantized weights, so it "
            f"cannot be prepared for ZeRO-3 inference. ZeRO-3 already splits the teacher across ranks: load it "
            f"unquantized in bf16 (teacher_model_init_kwargs={{'dtype': 'bfloat16'}}), or use ZeRO-2, where each rank "
            f"keeps a whole teacher."
        )


def _prepare_teacher_for_deepspeed(teacher, accelerator):
    """TRL's `prepare_deepspeed` (ZeRO-3: a sharded inference engine; else replicated), with the reason it failed."""
    stage = accelerator.state.deepspeed_plugin.zero_stage
    try:
        return prepare_deepspeed(teacher, accelerator)
    except Exception as error:
        raise RuntimeError(
            f"DeepSpeed could not prepare the teacher ({type(teacher).__name__}) for ZeRO-{stage} inference: "
            f"{type(error).__name__}: {error}. Pass the teacher as a path (teacher_model='org/name') so it is loaded "
            f"with device_map=None in the training dtype, without quantization, or switch the accelerate config to "
            f"ZeRO-2, which replicates the teacher instead of sharding it."
        ) from error


def _check_heads_share_a_device(student, teacher) -> None:
    """The loss reads both `lm_head` weights directly, tile by tile: both must be materialized on one device."""
    heads = {"student": student.get_output_embeddings().weight, "teacher": teacher.get_output_embeddings().weight}
    for name, weight in heads.items():
        if weight.device.type == "meta":
            device_map = getattr(student if name == "student" else teacher, "hf_device_map", None)
            raise ValueError(
                f"The {name} lm_head is offloaded (its weight is on the meta device; device_map {device_map}). The "
                f"loss reads lm_head.weight directly, so it must live on a real device: give 'lm_head' a device in the "
                f"device_map (e.g. device_map={{..., 'lm_head': 0}}), or raise max_memory so nothing is offloaded."
            )
    if heads["student"].device != heads["teacher"].device:
        raise ValueError(
            f"The student lm_head is on {heads['student'].device} but the teacher lm_head is on "
            f"{heads['teacher'].device} (teacher device_map: {getattr(teacher, 'hf_device_map', None)}). The loss "
            f"compares the two heads tile by tile on one device: load the teacher with a device_map that puts "
            f"'lm_head' on {heads['student'].device}, e.g. device_map={{..., 'lm_head': "
            f"'{heads['student'].device}'}}, or load both models on that device."
        )


def _load_teacher(path: str, args: HorizonOPDConfig):
    # Same loading rules as TRL's DistillationTrainer for a teacher given by name.
    kwargs = dict(args.teacher_model_init_kwargs or {})
    dtype = kwargs.get("dtype")
    kwargs["dtype"] = dtype if dtype in ["auto", None] else getattr(torch, dtype)
    if args.teacher_model_revision is not None:
        kwargs.setdefault("revision", args.teacher_model_revision)
    if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
        kwargs["device_map"] = None  # distributed training places the model itself
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return create_model_from_path(path, **kwargs)


def _check_prompt_dataset(dataset, name: str) -> None:
    """Fail at construction, naming the columns found, when a dataset has no usable `prompt` column."""
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for key, value in dataset.items():
            _check_prompt_dataset(value, f"{name}[{key!r}]")
        return
    columns = getattr(dataset, "column_names", None)
    if columns is not None and "prompt" not in columns:
        raise ValueError(
            f"{name} has no 'prompt' column (found columns: {list(columns)}). HorizonOPDTrainer needs prompt-only "
            f"data: rename the column holding prompts to 'prompt', e.g. dataset.rename_column('question', 'prompt')."
        )
    if columns is None or not hasattr(dataset, "__getitem__") or len(dataset) == 0:
        return
    prompt = dataset[0]["prompt"]
    is_text = isinstance(prompt, str)
    is_messages = (
        isinstance(prompt, list)
        and len(prompt) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)
    )
    if not (is_text or is_messages):
        raise ValueError(
            f"{name}['prompt'][0] is a {type(prompt).__name__} ({str(prompt)[:80]!r}); a prompt must be a string or "
            f"a list of chat messages like [{{'role': 'user', 'content': '...'}}]."
        )
