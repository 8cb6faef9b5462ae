"""Shipping a distilled student: merge a LoRA adapter into a full model, describe the run on its model card, check
that a Hub push can authenticate.

The card itself is TRL's (`create_model_card` with the trainer's `_tag_names`, `_name` and `_paper`); this module only
writes the section TRL's template has no slot for: teacher, horizon, loss, dataset, adapter and the final metrics.
"""

import os

from huggingface_hub import ModelCard, get_token


# Metrics of the last logged training step that a card reader wants, in this order, with their card labels.
CARD_METRICS = {
    "loss": "reverse KL (last logged step)",
    "train_loss": "reverse KL (mean over training)",
    "horizon/tokens": "horizon (tokens, last logged step)",
    "completions/mean_length": "mean rollout length (tokens)",
    "entropy": "student entropy (nats/token)",
    "train_runtime": "train runtime (s)",
}
SECTION_TITLE = "## Distillation setup"


def merge_adapter(model, output_dir: str | None = None, processing_class=None, **from_pretrained_kwargs):
    """Fold a LoRA adapter into its base weights and return a plain `transformers` model, saved to `output_dir` if
    given (with `processing_class`, if given): the checkpoint then loads with `AutoModelForCausalLM` alone.

    `model` is a [`~peft.PeftModel`] (e.g. `trainer.model` after training with `peft_config`) or the path of a saved
    adapter (`trainer.save_model()` output), whose base model is loaded from the `base_model_name_or_path` recorded in
    its `adapter_config.json`. A PeftModel passed in is merged in place, as `merge_and_unload` does: its base layers
    now hold the merged weights; pass a path to leave a model in memory untouched.
    """
    from peft import AutoPeftModelForCausalLM, PeftModel

    if isinstance(model, (str, os.PathLike)):
        model = AutoPeftModelForCausalLM.from_pretrained(model, **from_pretrained_kwargs)
    elif not isinstance(model, PeftModel):
        raise TypeError(
            f"merge_adapter got a {type(model).__name__}, which has no adapter to merge. Pass the PeftModel a "
            f"peft_config run trained (trainer.model) or the directory its adapter was saved to."
        )
    merged = model.merge_and_unload()
    if output_dir is not None:
        merged.save_pretrained(output_dir)
        if processing_class is not None:
            processing_class.save_pretrained(output_dir)
    return merged


def require_hub_token(token: str | None) -> str:
    """The token a Hub push will use; raises with the ways to provide one when there is none."""
    token = token or get_token()
    if not token:
        raise ValueError(
            "Pushing to the Hugging Face Hub needs a token with write access, and none was found: hub_token is unset, "
            "HF_TOKEN is not in the environment and there is no saved login. Run `hf auth login`, or export "
            "HF_TOKEN=hf_..., or pass hub_token=... (--hub_token) before calling push_to_hub."
        )
    return token


def model_id(model) -> str | None:
    """The Hub id or path a model was loaded from (`config._name_or_path`), or None for a model built in memory."""
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or None


def distillation_section(trainer, dataset_name: str | None) -> str:
    """The card section describing a [`HorizonOPDTrainer`] run: models, horizon, loss, data, adapter, metrics."""
    from accelerate.utils import is_peft_model

    args = trainer.args
    student = model_id(trainer.model)
    def describe(teacher) -> str:
        if teacher.server is not None:  # the server's URL and the model it serves (no weights were loaded here)
            return f"`{teacher.server.model}` served at {teacher.server.base_url}"
        return _link(model_id(trainer.accelerator.unwrap_model(teacher.model)))

    teachers = trainer.teachers
    if getattr(trainer, "teacher_names", None) is None:
        teacher_row = describe(teachers[0])
    else:  # several teachers, each row of the data routed to one by its teacher_id_column
        teacher_row = "; ".join(f"{t.name}: {describe(t)}" for t in teachers) + \
            f" (each prompt's teacher named in column `{args.teacher_id_column}`)"
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    loss = {
        "reverse_kl": "exact token-level reverse KL(student ‖ teacher) over the vocabulary at each generated token",
        "sampled": "sampled-token reverse-KL estimator (policy gradient on log q(y_t) - log pi(y_t))",
        "sequence": "sequence-level reverse KL (policy gradient on the reward-to-go of log q - log pi)",
        "topk_reverse_kl": f"reverse KL(student ‖ teacher) on the teacher's top-{args.loss_top_k} tokens plus one tail "
                           f"bucket at each generated token (a lower bound of the exact reverse KL)",
    }[args.loss_type]
    if args.loss_window is not None:
        loss += f", trained on positions [{args.loss_window[0]}, {args.loss_window[1]}) of the horizon only"
    rows = [
        ("Student (base model)", _link(student)),
        ("Teacher", teacher_row),
        ("Horizon", trainer.horizon_policy.describe()),
        ("Loss", f"`{args.loss_type}`: {loss}, temperature {args.temperature}"),
        ("Dataset", _link(dataset_name, "datasets/")),
        ("Optimization", f"{trainer.state.global_step} steps of {batch} prompts, learning rate {args.learning_rate}"),
    ]
    if is_peft_model(trainer.model):
        config = trainer.model.peft_config[trainer.model.active_adapter]
        targets = sorted(config.target_modules) if isinstance(config.target_modules, set) else config.target_modules
        method = "LoRA" if config.peft_type.value == "LORA" else config.peft_type.value
        rows.append((
            "Adapter",
            f"{method} (r = {config.r}, alpha = {config.lora_alpha}, target modules {targets}); merge into a full "
            f"model with `horizon_opd.export.merge_adapter(path, output_dir)`",
        ))
    lines = [SECTION_TITLE, "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]

    last = {}
    for entry in trainer.state.log_history:  # later entries override earlier ones: the last value of each metric
        last.update({k: v for k, v in entry.items() if k in CARD_METRICS and v is not None})
    if last:
        lines += ["### Training metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {label} | {_number(last[key])} |" for key, label in CARD_METRICS.items() if key in last]
        lines.append("")
    return "\n".join(lines)


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hub repo id ("org/name" or "name") rather than a local path."""
    return not (os.path.isabs(name) or os.path.exists(name) or name.startswith(".") or name.count("/") > 1)


def add_distillation_section(card_path: str, section: str, *, adapter_of: str | None = None) -> ModelCard:
    """Insert `section` into the TRL card at `card_path` (before its framework versions) and save it back. For a LoRA
    adapter, also mark the card as PEFT's so the Hub lists it as an adapter of `adapter_of`."""
    card = ModelCard.load(card_path)
    marker = "### Framework versions"
    card.text = card.text.replace(marker, section + "\n" + marker, 1) if marker in card.text else card.text + section
    if adapter_of is not None:
        card.data.library_name = "peft"
        card.data.pipeline_tag = "text-generation"
        tags = {"lora"}
        if is_hub_id(adapter_of):  # a local path is no Hub model to link to, and must not leak into a pushed card
            tags.add(f"base_model:adapter:{adapter_of}")
        card.data.tags = sorted(set(card.data.tags or []) | tags)
    card.save(card_path)
    return card


def _link(name: str | None, kind: str = "") -> str:
    if not name:
        return "(not recorded)"
    if not is_hub_id(name):
        return f"`{name}`"
    return f"[{name}](https://huggingface.co/{kind}{name})"


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
