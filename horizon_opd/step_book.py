"""The trainer's book of steps: what one optimizer step (or one evaluation) measured, and who reads it.

A step's micro-batches add to the mode's `StepMeter`; at the step's end the book gathers it (one collective) into a
`StepRecord` that the horizon policy, the collapse alarm, the cost ledger and the log window read in turn. An
evaluation is gathered when it is logged. `state_dict` is what a checkpoint keeps so that a resumed run continues with
identical horizons and cost figures (under `STATE_KEY` in trainer_state.json, restored by `RestoreHorizonState`).
"""

from transformers import TrainerCallback

from .horizon import HorizonPolicy
from .monitor import CollapseAlarm, CostLedger, LogWindow, StepMeter

# Where the horizon policy's state, the alarm's and the global token count live in a checkpoint's trainer_state.json.
STATE_KEY = "HorizonOPDTrainer"


class StepBook:
    """The meters, log windows, alarm, cost ledger and horizon history of a run, with the policy that reads them.

    `reach`: the deepest completion position a training step trains on when it is not the step's horizon (rolled
    chunks train every position up to the pool's `max_tokens`), else None. `logs_scored_tokens`: whether a teacher is
    a server (its `teacher/scored_tokens` is logged)."""

    def __init__(self, args, teacher_names: list[str] | None, reach: int | None = None,
                 logs_scored_tokens: bool = False):
        L = args.max_completion_length
        per_teacher = len(teacher_names or [])
        self.length = L
        self.policy: HorizonPolicy = args.horizon_policy()
        self.meters = {"train": StepMeter(L, per_teacher), "eval": StepMeter(L, per_teacher)}
        self.windows = {"train": LogWindow(L, args.position_bins, teacher_names),
                        "eval": LogWindow(L, args.position_bins, teacher_names)}
        self.alarm = CollapseAlarm(L, args.alarm_factor, args.alarm_repetition, args.horizon)
        self.cost = CostLedger(teacher_names)  # what training has cost so far, over all ranks
        self.history: list[int] = []  # the horizon of every optimizer step so far
        self.step_horizon: int | None = None  # the horizon the current step generates to
        self.reach = reach
        self.logs_scored_tokens = logs_scored_tokens

    def end_of_step(self, step: int, accelerator, with_signal: bool) -> None:
        """Gather what the step measured (one collective), then let the ledger, policy, alarm and logs read it."""
        record = self.meters["train"].finish(step, self.step_horizon, accelerator, with_signal=with_signal)
        self.cost.add_step(record)
        self.history.append(record.horizon)
        self.policy.observe(record)
        # rolled chunks train every position up to L at each step: the alarm reads them as full-horizon positions
        reach = self.reach if self.reach is not None else record.horizon
        self.alarm.observe(record.step, reach, record.kl_sums, record.kl_counts, record.rollouts, record.repeating)
        self.windows["train"].add(record)

    def log_metrics(self, mode: str, step: int, accelerator) -> dict[str, float] | None:
        """What one log line of `mode` adds (the window since the last, the alarm, the cost so far), the window reset;
        None when an evaluation has nothing to report (train()'s closing summary, still in eval mode after a last-step
        evaluation: TRL adds nothing there either, and an empty one must not reach the alarm)."""
        if mode == "eval":
            if not self.meters["eval"].rollouts:
                return None
            # evaluation has no optimizer step: its rollouts, all at L, are gathered here
            record = self.meters["eval"].finish(step, self.length, accelerator)
            self.alarm.observe(record.step, record.horizon, record.kl_sums, record.kl_counts, record.rollouts,
                               record.repeating, source="evaluation")
            self.windows["eval"].add(record)
            self.cost.add_evaluation(record)
        metrics = self.windows[mode].metrics()
        self.windows[mode].reset()
        metrics["horizon/alarm"] = float(self.alarm.active)
        if mode == "train":
            metrics.update(self.cost.metrics())
            if not self.logs_scored_tokens:
                del metrics["teacher/scored_tokens"]
        return metrics

    def state_dict(self) -> dict:
        """What a resumed run needs to continue with identical horizons and cost figures."""
        return {"policy": self.policy.state_dict(), "alarm": self.alarm.state_dict(),
                "cost": self.cost.state_dict(), "horizon_history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.alarm.load_state_dict(state["alarm"])
        # checkpoints written before the ledger kept generated_tokens and teacher_scored_tokens at the top level
        self.cost.load_state_dict(state.get("cost", state))
        self.history = list(state["horizon_history"])


class RestoreHorizonState(TrainerCallback):
    """On a resumed run, loads the state the trainer's `_save_checkpoint` stored in the checkpoint's
    trainer_state.json (`load_horizon_state`)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        saved = (state.stateful_callbacks or {}).get(STATE_KEY)
        if saved and state.global_step > 0:
            self.trainer.load_horizon_state(saved["attributes"])
