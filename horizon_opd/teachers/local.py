"""Attaching the frozen teacher to a [`HorizonOPDTrainer`]: loading it by name, the vocabulary it shares with the
student, the student's padding ids, DeepSpeed/accelerate preparation and the checks that fail early.

Why this is not TRL's: `trl.DistillationTrainer.__init__` refuses a teacher whose `vocab_size` differs from the
student's, but models of one family often differ only by padding rows past the tokenizer (Qwen2.5-1.5B 151936 vs
Qwen2.5-7B 152064). So `HorizonOPDTrainer` passes `teacher_model=None` to TRL and attaches the teacher here, with TRL's
own loader (`create_model_from_path`) and preparation (`prepare_deepspeed`, `accelerator.prepare_model`); what is
copied from TRL's constructor is the handful of loading rules in `load_teacher`, which TRL keeps inline.
"""

import torch
from trl.models import prepare_deepspeed
from trl.trainer.utils import create_model_from_path, maybe_gather_lm_head_ctx


def attach_teacher(trainer, teacher):
    """Prepare `teacher` (a model, or a path / Hub id already loaded with `load_teacher`) for `trainer`, after TRL's
    constructor ran. Returns `(prepared teacher, shared vocabulary size or None)`; suppresses the student's padding
    ids in generation when the student's head is the larger one."""
    shared = shared_vocab_size(trainer.model, teacher, len(trainer._tokenizer))
    student_vocab = trainer.model.config.get_text_config().vocab_size
    if shared is not None and student_vocab > shared:
        if trainer.use_vllm:
            raise ValueError(
                f"The student's vocab_size {student_vocab} exceeds the teacher's {shared}, and vLLM generation cannot "
                f"be told to avoid the student's padding ids. Use use_vllm=False, or a teacher with at least the "
                f"student's vocab_size."
            )
        # The student's padding rows are ids no tokenizer token has and the teacher cannot score: never sample them.
        suppress_in_generation(trainer, range(shared, student_vocab))
    teacher.requires_grad_(False)
    if trainer.is_deepspeed_enabled:
        return prepare_teacher_for_deepspeed(teacher, trainer.accelerator), shared
    prepared = trainer.accelerator.prepare_model(teacher, evaluation_mode=True)
    if not trainer.is_fsdp_enabled:
        check_heads_share_a_device(trainer.model, trainer.accelerator.unwrap_model(prepared))
    return prepared, shared


def suppress_in_generation(trainer, ids) -> None:
    """Never let `model.generate` sample `ids`: added to the trainer's `suppress_tokens` (TRL's generation kwargs and
    config, where TRL already suppresses a VLM's image token). vLLM generation does not read them."""
    suppressed = list(trainer.generation_kwargs.get("suppress_tokens") or []) + list(ids)
    trainer.generation_kwargs["suppress_tokens"] = suppressed
    trainer.generation_config.suppress_tokens = suppressed


def load_teacher(teacher, args):
    """A teacher given by path or Hub id, loaded with TRL's rules for `teacher_model_init_kwargs` (copied: TRL applies
    them inline in its constructor, which never runs with our teacher); a model is returned as is. Checked for
    DeepSpeed here, before the trainer builds its Accelerator (a second one cannot take a DeepSpeed plugin)."""
    teacher = _load(teacher, args)
    if args.deepspeed_plugin is not None:
        check_teacher_for_deepspeed(teacher, args.deepspeed_plugin.zero_stage)
    return teacher


def _load(teacher, args):
    if not isinstance(teacher, str):
        if args.teacher_model_init_kwargs is not None:
            raise ValueError(
                "teacher_model_init_kwargs is set but teacher_model is already instantiated. Pass the teacher as a "
                "path to have it loaded with those kwargs, or drop teacher_model_init_kwargs."
            )
        return teacher
    kwargs = dict(args.teacher_model_init_kwargs or {})
    dtype = kwargs.get("dtype")
    kwargs["dtype"] = dtype if dtype in ["auto", None] else getattr(torch, dtype)
    if args.teacher_model_revision is not None:
        kwargs.setdefault("revision", args.teacher_model_revision)
    if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
        kwargs["device_map"] = None  # distributed training places the model itself
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return create_model_from_path(teacher, **kwargs)


def shared_vocab_size(student, teacher, tokenizer_size: int) -> int | None:
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


def vocab_slice(head: torch.nn.Module, vocab_size: int | None):
    """The head's weight and bias, restricted to the first `vocab_size` rows when the two heads differ in size."""
    weight, bias = head.weight, head.bias
    if isinstance(weight, torch.distributed.tensor.DTensor):
        # FSDP2 shards the head as a DTensor, which the kernels cannot take; one all-gather, as TRL's chunked loss does.
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
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


def register_student_head_for_zero3(trainer) -> None:
    """ZeRO-3: make the student's trainable head parameters external parameters of the student's root module, so
    DeepSpeed gathers them for the root's whole forward and backward (the loss runs inside that forward, through
    TRL's `_forward_redirection`).

    The loss reads `lm_head.weight` directly (TRL's kernels, `vocab_slice`), never through the lm_head module, so no
    lm_head hook gathers it for the backward, where autograd accumulates its full (V, H) gradient: that needs the
    parameter gathered at that moment, else autograd copies the gradient into the parameter's empty shard ("The size
    of tensor a (0) must match the size of tensor b (H)"). DeepSpeed registers such a parameter by itself only if a
    forward reads it while it is still partitioned (NOT_AVAILABLE). With `ds3_gather_for_generation=False` the
    student's `generate` runs through the ZeRO-3 hooks, DeepSpeed records its module trace there (the lm_head module
    after the final norm), and in training its prefetcher has already started gathering the head when the loss reads
    it (INFLIGHT): never registered, the head is released before the backward, and the kernel's own gather ends before
    autograd accumulates. Registered here, the head is gathered by the root module's hooks whatever the prefetcher did.
    """
    plugin = trainer.accelerator.state.deepspeed_plugin if trainer.is_deepspeed_enabled else None
    if plugin is None or plugin.zero_stage != 3:
        return
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    head = trainer.model.get_output_embeddings()
    for param in (head.weight, getattr(head, "bias", None)):
        if isinstance(param, torch.nn.Parameter) and param.requires_grad:  # a frozen head gets no gradient
            register_external_parameter(trainer.model, param)


def check_teacher_for_deepspeed(teacher, zero_stage: int) -> None:
    """Reject teachers DeepSpeed cannot take over: DeepSpeed places (and under ZeRO-3 shards) the teacher itself."""
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


def prepare_teacher_for_deepspeed(teacher, accelerator):
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


def check_heads_share_a_device(student, teacher) -> None:
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
