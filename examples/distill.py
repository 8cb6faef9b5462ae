# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "trl>=1.16,<1.17",
#     "peft",
#     "deepspeed",
#     # and horizon_opd itself: `pip install -e .` from this repository
# ]
# ///
"""
On-policy distillation with a controlled rollout horizon (OPD / TOPD / POPD, arXiv 2605.31490), as a TRL script:
every `HorizonOPDConfig` field is a flag (`--horizon`, `--truncation_ratio`, `--progressive_schedule`, ... and all of
TRL's `DistillationConfig`), models and LoRA come from TRL's `ModelConfig` (`--model_name_or_path`, `--use_peft`,
`--lora_r`, ...), data from `--dataset_name` (a Hub id, a `save_to_disk` directory or a .json/.jsonl file with a
`prompt` column). A YAML file with the same keys works too: `--config recipe.yaml`.

CPU, the embedded demo (bundled teacher, student and task; no model or data arguments):

```bash
python examples/distill.py --output_dir runs/distill-demo --max_steps 20 --horizon truncated --truncation_ratio 0.1
```

8 GPUs, DeepSpeed ZeRO-3, a 1.5B student and a 7B teacher (the 7B head has padding rows past the shared tokenizer,
152064 vs 151936; the trainer compares the shared vocabulary), pushed to the Hub with its model card:

```bash
accelerate launch --config_file examples/accelerate/zero3.yaml examples/distill.py \
    --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct \
    --teacher_model_name_or_path Qwen/Qwen2.5-7B-Instruct \
    --dataset_name trl-lib/ultrafeedback-prompt \
    --dtype bfloat16 --bf16 \
    --horizon progressive --progressive_start_ratio 0.1 --progressive_ramp_fraction 0.5 \
    --max_completion_length 2048 \
    --per_device_train_batch_size 4 --gradient_accumulation_steps 4 \
    --learning_rate 2e-5 --max_steps 500 \
    --output_dir Qwen2.5-1.5B-POPD \
    --push_to_hub --hub_model_id <user>/Qwen2.5-1.5B-POPD
```

LoRA (only the adapter trains and is saved; `--merged_output_dir` also writes the merged, standalone model). With
both models fitting on one GPU, ZeRO-2 replicates the teacher and is faster than ZeRO-3:

```bash
accelerate launch --config_file examples/accelerate/zero2.yaml examples/distill.py \
    --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct \
    --teacher_model_name_or_path Qwen/Qwen2.5-Math-1.5B-Instruct \
    --dataset_name trl-lib/ultrafeedback-prompt \
    --dtype bfloat16 --bf16 \
    --horizon truncated --truncation_ratio 0.1 --max_completion_length 2048 \
    --use_peft --lora_r 32 --lora_alpha 64 --learning_rate 2e-4 --max_steps 500 \
    --output_dir Qwen2.5-1.5B-TOPD-LoRA --merged_output_dir Qwen2.5-1.5B-TOPD-merged
```

Use `examples/accelerate/zero3_offload.yaml` when the sharded models and optimizer still do not fit (CPU offload).
"""

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ScriptArguments:
    """Data and export arguments (the rest is `HorizonOPDConfig` and TRL's `ModelConfig`)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id, `save_to_disk` directory or .json/.jsonl file with a 'prompt' column. "
                          "Default: the embedded demo task."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on (with --eval_strategy)."})
    merged_output_dir: str | None = field(
        default=None,
        metadata={"help": "With --use_peft: also merge the trained adapter into the base model and save the "
                          "standalone model here."},
    )


# ----------------------------------------------------------------------------------------------- inputs
def demo_default(name: str):
    """An attribute of the embedded demo (bundled model paths, task), or None where the demo does not provide it."""
    try:
        from horizon_opd import demo
    except ImportError:
        return None
    value = getattr(demo, name, None)
    if name.endswith("_PATH") and (value is None or not Path(value).is_dir()):
        return None
    return value


def load_prompts(script_args):
    """A DatasetDict (or dict of splits) with prompts, from the Hub, a local directory or file, or the demo task."""
    from datasets import Dataset, load_dataset, load_from_disk

    name = script_args.dataset_name
    if name is None:
        build = demo_default("build_datasets")
        if build is None:
            raise SystemExit("No --dataset_name, and the embedded demo task is not available: pass a dataset.")
        return build()
    if Path(name).is_dir():
        data = load_from_disk(name)
        return {script_args.dataset_train_split: data} if isinstance(data, Dataset) else data
    if name.endswith((".json", ".jsonl")):
        return load_dataset("json", data_files={script_args.dataset_train_split: name})
    return load_dataset(name, name=script_args.dataset_config)


def model_path(given: str | None, demo_attribute: str, flag: str) -> str:
    path = given or demo_default(demo_attribute)
    if path is None:
        raise SystemExit(f"Pass {flag}: the embedded demo models are not available in this installation.")
    return path


# ----------------------------------------------------------------------------------------------- run
def main(script_args, training_args, model_args):
    from accelerate.utils import is_peft_model
    from trl import get_peft_config, get_quantization_config

    from horizon_opd import HorizonOPDTrainer, merge_adapter

    student = model_path(model_args.model_name_or_path, "STUDENT_PATH", "--model_name_or_path")
    teacher = model_path(training_args.teacher_model_name_or_path, "TEACHER_PATH", "--teacher_model_name_or_path")
    # Both models load with the same dtype and attention; the teacher is left unquantized (it is the target).
    load_kwargs = dict(trust_remote_code=training_args.trust_remote_code, dtype=model_args.dtype,
                       attn_implementation=model_args.attn_implementation)
    training_args.model_init_kwargs = {"revision": model_args.model_revision, **load_kwargs,
                                       **(training_args.model_init_kwargs or {})}
    training_args.teacher_model_init_kwargs = {**load_kwargs, **(training_args.teacher_model_init_kwargs or {})}

    dataset = load_prompts(script_args)
    trainer = HorizonOPDTrainer(
        model=student,
        teacher_model=teacher,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    # the card (README.md) states the teacher, horizon, loss, data and final metrics; push_to_hub uploads it
    name = script_args.dataset_name
    hub_dataset = name if name is not None and not Path(name).exists() else None
    trainer.create_model_card(dataset_name=hub_dataset)
    trainer.accelerator.print(f"Saved to {training_args.output_dir}.")

    if script_args.merged_output_dir is not None:
        if not is_peft_model(trainer.model):
            raise SystemExit("--merged_output_dir merges a LoRA adapter: train with --use_peft.")
        if trainer.accelerator.is_main_process:  # from the saved adapter, so the trained model stays as it is
            merge_adapter(training_args.output_dir, script_args.merged_output_dir,
                          processing_class=trainer.processing_class)
            trainer.accelerator.print(f"Merged model saved to {script_args.merged_output_dir}.")
        trainer.accelerator.wait_for_everyone()

    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=hub_dataset)
        trainer.accelerator.print(f"Pushed to https://huggingface.co/{trainer.hub_model_id}.")
    # Wait in a barrier (the GIL released) so a gloo worker still releasing the last collective's tensors can finish,
    # then destroy the process group.
    trainer.accelerator.wait_for_everyone()
    trainer.end()


def make_parser(prog: str | None = None):
    from trl import ModelConfig, TrlParser

    from horizon_opd import HorizonOPDConfig

    return TrlParser((ScriptArguments, HorizonOPDConfig, ModelConfig), prog=prog,
                     formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__)


if __name__ == "__main__":
    script_args, training_args, model_args = make_parser().parse_args_and_config()
    several_processes = training_args.world_size > 1
    main(script_args, training_args, model_args)
    if several_processes:
        # Everything is saved and the process group destroyed: leave without the interpreter's teardown. gloo's worker
        # threads outlive destroy_process_group, and one that takes the GIL while the interpreter finalizes aborts
        # the process ("terminate called without an active exception") after a run that succeeded.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
