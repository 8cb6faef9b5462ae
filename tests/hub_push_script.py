"""Train a tiny student for 2 steps and `trainer.push_to_hub()` it, as a full model and as a LoRA adapter.

Run by tests/test_hub.py in a fresh process whose HF_ENDPOINT points at the fake Hub (tests/fake_hub.py), so the
real `huggingface_hub` client reads the endpoint the way it does for users. Usage: python hub_push_script.py <json>
with keys student, teacher (local paths), output_root, and writes <output_root>/push_results.json.
"""

import json
import os
import sys

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from horizon_opd import HorizonOPDConfig, HorizonOPDTrainer
from horizon_opd.demo.tokenizer import build_char_tokenizer

# The models are loaded from local files; give them the Hub ids a user's models would carry, so the card names them.
STUDENT_ID, TEACHER_ID, DATASET_ID = "horizon-tester/tiny-student", "horizon-tester/tiny-teacher", "horizon-tester/sums"


def main(settings_path: str) -> None:
    with open(settings_path) as f:
        settings = json.load(f)
    torch.set_num_threads(1)
    tokenizer = build_char_tokenizer()
    prompts = Dataset.from_dict({"prompt": [f"{i} + {i + 1} =" for i in range(8)]})
    results = {}
    for variant in ("full", "lora"):
        student = AutoModelForCausalLM.from_pretrained(settings["student"])
        teacher = AutoModelForCausalLM.from_pretrained(settings["teacher"])
        for model, hub_id in ((student, STUDENT_ID), (teacher, TEACHER_ID)):
            model.config._name_or_path = model.name_or_path = hub_id
        output_dir = os.path.join(settings["output_root"], f"distilled-{variant}")
        args = HorizonOPDConfig(
            output_dir=output_dir, hub_model_id=f"horizon-tester/distilled-{variant}", horizon="truncated",
            truncation_ratio=0.5, max_completion_length=8, per_device_train_batch_size=4, max_steps=2,
            logging_steps=1, save_strategy="no", report_to="none", bf16=False, disable_tqdm=True, seed=0,
        )
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if variant == "lora" else None
        trainer = HorizonOPDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                                    processing_class=tokenizer, peft_config=peft_config)
        trainer.train()
        commit = trainer.push_to_hub(dataset_name=DATASET_ID)
        results[variant] = {"output_dir": output_dir, "repo_id": trainer.hub_model_id, "commit_oid": commit.oid,
                            "local_files": sorted(os.listdir(output_dir))}
    with open(os.path.join(settings["output_root"], "push_results.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
