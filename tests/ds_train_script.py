"""A few HorizonOPDTrainer steps under `accelerate launch` + DeepSpeed, on CPU; launched by tests/test_deepspeed.py.

Usage: accelerate launch --config_file <zero yaml> tests/ds_train_script.py <settings.json>

Each rank writes `<result_dir>/rank{r}.json`: the horizon and completion lengths of every generation batch it made,
its log history and final step, so the test can compare ranks. Settings (all JSON keys):
  student, teacher, dataset: local paths (save_pretrained / save_to_disk); output_dir, result_dir
  args: HorizonOPDConfig overrides; resume_from: checkpoint path or null
  eos_rank: this rank's rollouts all stop at their first token (every token but EOS is suppressed), so the ranks
            generate different numbers of tokens within one ZeRO-3 step
  check_bad_teacher: first build a trainer with a quantized-looking teacher and record the error message
"""

import json
import os
import sys

import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM

from horizon_opd import HorizonOPDConfig, HorizonOPDTrainer
from horizon_opd.demo.tokenizer import build_char_tokenizer


def main(settings_path: str) -> None:
    with open(settings_path) as f:
        settings = json.load(f)
    torch.set_num_threads(1)  # two ranks share the machine's two cores
    args = HorizonOPDConfig(output_dir=settings["output_dir"], **settings["args"])
    rank = args.process_index
    tokenizer = build_char_tokenizer()
    dataset = load_from_disk(settings["dataset"])
    result = {"rank": rank, "world_size": args.world_size, "zero_stage": args.deepspeed_plugin.zero_stage}

    if settings.get("check_bad_teacher"):
        quantized = AutoModelForCausalLM.from_pretrained(settings["teacher"])
        quantized.is_loaded_in_4bit = True  # what bitsandbytes sets; ZeRO-3 cannot partition packed 4-bit weights
        try:
            HorizonOPDTrainer(model=settings["student"], teacher_model=quantized, args=args, train_dataset=dataset,
                              processing_class=tokenizer)
        except ValueError as error:
            result["bad_teacher_error"] = str(error)

    trainer = HorizonOPDTrainer(model=settings["student"], teacher_model=settings["teacher"], args=args,
                                train_dataset=dataset, processing_class=tokenizer)
    suppress = []
    if settings.get("eos_rank") == rank:
        suppress += [i for i in range(len(tokenizer)) if i != tokenizer.eos_token_id]
    if trainer.shared_vocab_size is not None:
        # a padded student could sample ids past the tokenizer, which the teacher cannot embed
        suppress += list(range(len(tokenizer), trainer.model.config.vocab_size))
    trainer.generation_config.suppress_tokens = suppress or None

    generations = []
    generate_and_score = trainer._generate_and_score_completions

    def recording(inputs):
        batch = generate_and_score(inputs)
        generations.append({
            "step": trainer.state.global_step,
            "horizon": trainer.current_horizon(),
            "completion_lengths": batch["completion_mask"].sum(1).tolist(),
        })
        return batch

    trainer._generate_and_score_completions = recording
    trainer.train(resume_from_checkpoint=settings.get("resume_from"))

    teacher_head = trainer.accelerator.unwrap_model(trainer.teacher_model).get_output_embeddings().weight
    result.update(
        generations=generations,
        global_step=trainer.state.global_step,
        log_history=trainer.state.log_history,
        shared_vocab_size=trainer.shared_vocab_size,
        teacher_head_partitioned=hasattr(teacher_head, "ds_shape") and teacher_head.numel() == 0,
    )
    os.makedirs(settings["result_dir"], exist_ok=True)
    with open(os.path.join(settings["result_dir"], f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
