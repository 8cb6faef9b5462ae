"""Shared builders for trainer tests: tiny configs and a recorder of the generated batches."""

import torch

from horizon_opd import HorizonOPDConfig


def make_args(output_dir, **overrides) -> HorizonOPDConfig:
    defaults = dict(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=4,
        max_completion_length=16,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,  # exact float32 comparisons
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=0,
    )
    defaults.update(overrides)
    return HorizonOPDConfig(output_dir=str(output_dir), **defaults)


def record_generations(trainer) -> list[dict]:
    """Wrap the trainer's generation so every generated batch is kept, with the horizon and step it was made at."""
    records = []
    generate_and_score = trainer._generate_and_score_completions

    def recording(inputs):
        batch = generate_and_score(inputs)
        records.append(
            {
                "step": trainer.state.global_step,
                "horizon": trainer.current_horizon(),
                **{k: v.detach().clone() for k, v in batch.items() if isinstance(v, torch.Tensor)},
            }
        )
        return batch

    trainer._generate_and_score_completions = recording
    return records


def logged(trainer, key) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]
