"""`kl_by_position`: the trainer's per-position reverse-KL log read back, by hand-written log histories and a run."""

import math

from testing_utils import make_args

from horizon_opd import HorizonOPDTrainer, kl_by_position


def test_rows_by_hand():
    history = [
        {"loss": 0.5, "horizon/tokens": 8.0, "kl_by_position/bin_1": 0.2, "kl_by_position/bin_0": 0.4, "step": 1},
        {"eval_loss": 0.3, "eval_horizon/tokens": 16.0, "eval_kl_by_position/bin_0": 0.3,
         "eval_kl_by_position/bin_1": math.nan, "step": 1},
        {"train_runtime": 1.0, "step": 2},  # the final summary: no diagnostic
    ]
    assert kl_by_position(history) == [{"step": 1, "horizon": 8.0, "positions": [2.0, 6.0], "kl": [0.4, 0.2]}]
    (row,) = kl_by_position(history, prefix="eval_")
    assert row["horizon"] == 16.0 and row["positions"] == [4.0, 12.0]
    assert row["kl"][0] == 0.3 and math.isnan(row["kl"][1])
    assert kl_by_position([{"loss": 0.1, "horizon/tokens": 4.0, "step": 1}]) == []  # position_bins=0


def test_reads_a_training_run_and_an_evaluation(tmp_path, student, teacher, tokenizer, prompts):
    args = make_args(tmp_path, max_steps=2, horizon="truncated", truncation_ratio=0.5, position_bins=4)
    trainer = HorizonOPDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                                eval_dataset=prompts, processing_class=tokenizer)
    trainer.train()
    rows = kl_by_position(trainer.state.log_history)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["horizon"] == 8 and r["positions"] == [1.0, 3.0, 5.0, 7.0] and len(r["kl"]) == 4 for r in rows)
    assert all(kl >= 0 for r in rows for kl in r["kl"] if not math.isnan(kl))
    trainer.evaluate()
    (evaluation,) = kl_by_position(trainer.state.log_history, prefix="eval_")
    assert evaluation["horizon"] == 16 and len(evaluation["kl"]) == 4  # evaluation rollouts run to the full L
