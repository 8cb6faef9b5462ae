"""A few HorizonOPDTrainer steps with a teacher server (`teacher_model_server_url`) under `accelerate launch` on CPU;
launched by tests/test_remote_trainer.py, whose process serves the teacher.

Usage: accelerate launch --config_file <accelerate yaml> tests/distributed/remote_teacher_script.py <settings.json>

Settings (JSON keys): student, dataset (local paths), url (the teacher server), output_dir, result_dir, args
(HorizonOPDConfig overrides). Each rank writes `<result_dir>/rank{r}.json`: its horizons, completion lengths, losses,
the tokens its own client had scored and the trainer's count gathered over ranks.
"""

import json
import os
import sys

import torch
from datasets import load_from_disk
from testing_utils import end_launched_process

from horizon_opd import HorizonOPDConfig, HorizonOPDTrainer
from horizon_opd.demo.tokenizer import build_char_tokenizer


def main(settings_path: str) -> None:
    with open(settings_path) as f:
        settings = json.load(f)
    torch.set_num_threads(1)  # two ranks share the machine's two cores
    args = HorizonOPDConfig(output_dir=settings["output_dir"], teacher_model_server_url=settings["url"],
                            **settings["args"])
    trainer = HorizonOPDTrainer(model=settings["student"], args=args, train_dataset=load_from_disk(settings["dataset"]),
                                processing_class=build_char_tokenizer())
    lengths = []
    generate_and_score = trainer._generate_and_score_completions

    def recording(inputs):
        batch = generate_and_score(inputs)
        lengths.extend(batch["completion_mask"].sum(1).tolist())
        return batch

    trainer._generate_and_score_completions = recording
    trainer.train()
    history = trainer.state.log_history
    result = {
        "world_size": args.world_size,
        "global_step": trainer.state.global_step,
        "horizon_history": trainer.horizon_history,
        "completion_lengths": lengths,
        "losses": [e["loss"] for e in history if "loss" in e],
        "scored_log": [e["teacher/scored_tokens"] for e in history if "teacher/scored_tokens" in e],
        "client_scored_tokens": trainer.remote_teacher.scored_tokens,
        "teacher_scored_tokens": trainer.teacher_scored_tokens,
        "distributed_type": str(trainer.accelerator.distributed_type.value),
    }
    os.makedirs(settings["result_dir"], exist_ok=True)
    with open(os.path.join(settings["result_dir"], f"rank{args.process_index}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
    end_launched_process()  # else a rank can abort at exit after a run that succeeded (see its docstring)
