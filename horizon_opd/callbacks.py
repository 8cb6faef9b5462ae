"""Training-time evaluation that keeps its own cost out of the training clock."""

import time
from collections.abc import Callable

from transformers import TrainerCallback


class HeldOutEvalCallback(TrainerCallback):
    """Calls `evaluate(model) -> float` before training, every `every` optimizer steps and at the end, and records
    `curve = [{"step", "train_seconds", "accuracy"}]`, where `train_seconds` is wall-clock since training began minus
    the time spent in these evaluations and in `trainer.evaluate()` (so methods are compared on training cost alone).

    `on_step` (optional) is called after every optimizer step, e.g. to advance a progress bar. `costs` (optional)
    returns the cost figures so far (e.g. `trainer.cost.state_dict()`), stored with each point of the curve so that
    accuracy can be read against decode iterations or tokens as well as seconds.
    """

    def __init__(self, evaluate: Callable, every: int, on_step: Callable | None = None,
                 costs: Callable[[], dict] | None = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} must be an integer >= 1: evaluate every that many optimizer steps "
                             f"(the run's last step is always evaluated).")
        self.evaluate = evaluate
        self.every = every
        self.on_step = on_step
        self.costs = costs
        self.curve: list[dict] = []
        self._start = None
        self._eval_seconds = 0.0

    @property
    def train_seconds(self) -> float:
        return time.perf_counter() - self._start - self._eval_seconds

    def _record(self, step: int, model) -> None:
        seconds = self.train_seconds
        began = time.perf_counter()
        costs = self.costs() if self.costs is not None else {}
        self.curve.append({"step": step, "train_seconds": round(seconds, 3), **costs,
                           "accuracy": float(self.evaluate(model))})
        self._eval_seconds += time.perf_counter() - began

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._start, self._eval_seconds = time.perf_counter(), 0.0
        if state.global_step == 0:
            self._record(0, model)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # `trainer.evaluate()` (e.g. eval_strategy="steps") is evaluation too: keep its time off the training clock
        self._eval_seconds += float((metrics or {}).get("eval_runtime", 0.0))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.on_step is not None:
            self.on_step()
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._record(state.global_step, model)
