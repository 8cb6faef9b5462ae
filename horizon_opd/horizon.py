"""Rollout-horizon schedules: how many tokens the student may generate at a given optimizer step.

Everything here is a pure function of integers and floats (no torch, no trainer state), so the horizon at any step can
be recomputed from the step alone. That is what makes resuming from a checkpoint continue the schedule exactly.

Modes (L = `max_completion_length`, rho = a ratio in (0, 1]):

- `full`: every rollout may run to L tokens (standard on-policy distillation, OPD).
- `truncated` (TOPD): every rollout stops at ceil(rho * L) tokens for all of training.
- `progressive` (POPD): the horizon grows with training progress from a short prefix to L, then stays at L, either
  linearly or by explicit stages.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

HORIZON_MODES = ("full", "truncated", "progressive")
PROGRESSIVE_SCHEDULES = ("linear", "stages")


def ratio_to_tokens(ratio: float, max_completion_length: int) -> int:
    """ceil(ratio * L), clamped to [1, L]. Rounded first so float noise (0.1 * 30 = 3.0000000000000004) does not add a
    token."""
    return min(max_completion_length, max(1, math.ceil(round(ratio * max_completion_length, 9))))


@dataclass(frozen=True)
class HorizonSchedule:
    """A validated horizon schedule. Build it with [`HorizonSchedule.from_config`] or directly; every check raises a
    `ValueError` that names the bad value and the fix."""

    mode: str = "full"
    max_completion_length: int = 512
    truncation_ratio: float = 0.1
    progressive_schedule: str = "linear"
    progressive_start_ratio: float = 0.1
    progressive_ramp_fraction: float = 0.5
    progressive_stage_ratios: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    progressive_stage_fractions: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)

    def __post_init__(self):
        object.__setattr__(self, "progressive_stage_ratios", tuple(self.progressive_stage_ratios))
        object.__setattr__(self, "progressive_stage_fractions", tuple(self.progressive_stage_fractions))
        validate_schedule(self)

    @classmethod
    def from_config(cls, args) -> "HorizonSchedule":
        return cls(
            mode=args.horizon,
            max_completion_length=args.max_completion_length,
            truncation_ratio=args.truncation_ratio,
            progressive_schedule=args.progressive_schedule,
            progressive_start_ratio=args.progressive_start_ratio,
            progressive_ramp_fraction=args.progressive_ramp_fraction,
            progressive_stage_ratios=args.progressive_stage_ratios,
            progressive_stage_fractions=args.progressive_stage_fractions,
        )

    def ratio_at(self, step: int, max_steps: int) -> float:
        return horizon_ratio_at(step, max_steps, self)

    def tokens_at(self, step: int, max_steps: int) -> int:
        return horizon_at(step, max_steps, self)


def _check_ratio(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and 0.0 < value <= 1.0):
        raise ValueError(
            f"{name}={value!r} is outside (0, 1]. It is a fraction of max_completion_length: use e.g. 0.1 for a 10% "
            f"horizon, or 1.0 for the full horizon."
        )


def validate_schedule(s: HorizonSchedule) -> None:
    """Raise `ValueError` naming the bad value and the fix if the schedule cannot be used."""
    if s.mode not in HORIZON_MODES:
        raise ValueError(f"horizon={s.mode!r} is not a horizon mode; choose one of {list(HORIZON_MODES)}.")
    if s.max_completion_length is None or int(s.max_completion_length) < 1:
        raise ValueError(
            f"max_completion_length={s.max_completion_length!r} must be an integer >= 1: it is the full rollout "
            f"horizon L that truncation ratios are fractions of."
        )
    if s.mode == "truncated":
        _check_ratio("truncation_ratio", s.truncation_ratio)
    if s.mode != "progressive":
        return
    if s.progressive_schedule not in PROGRESSIVE_SCHEDULES:
        raise ValueError(
            f"progressive_schedule={s.progressive_schedule!r} is unknown; choose one of {list(PROGRESSIVE_SCHEDULES)}."
        )
    if s.progressive_schedule == "linear":
        _check_ratio("progressive_start_ratio", s.progressive_start_ratio)
        if not 0.0 < s.progressive_ramp_fraction <= 1.0:
            raise ValueError(
                f"progressive_ramp_fraction={s.progressive_ramp_fraction!r} is outside (0, 1]. It is the fraction of "
                f"max_steps over which the horizon grows to L: use e.g. 0.5 to reach L half-way through training."
            )
        return
    ratios, fractions = s.progressive_stage_ratios, s.progressive_stage_fractions
    if len(ratios) == 0 or len(ratios) != len(fractions):
        raise ValueError(
            f"progressive_stage_ratios={list(ratios)} and progressive_stage_fractions={list(fractions)} must be "
            f"non-empty and of equal length: one start fraction of max_steps for each stage's horizon ratio."
        )
    for r in ratios:
        _check_ratio("progressive_stage_ratios entry", r)
    if any(b < a for a, b in zip(ratios, ratios[1:])):
        raise ValueError(
            f"progressive_stage_ratios={list(ratios)} decreases. A progressive horizon only grows: sort the ratios in "
            f"non-decreasing order."
        )
    if ratios[-1] != 1.0:
        raise ValueError(
            f"progressive_stage_ratios={list(ratios)} never reaches the full horizon L: end the list with 1.0."
        )
    if fractions[0] != 0.0:
        raise ValueError(
            f"progressive_stage_fractions={list(fractions)} must start at 0.0 so the first stage covers the first step."
        )
    if any(not 0.0 <= f < 1.0 for f in fractions) or any(b <= a for a, b in zip(fractions, fractions[1:])):
        raise ValueError(
            f"progressive_stage_fractions={list(fractions)} must be strictly increasing fractions of max_steps in "
            f"[0, 1), e.g. [0.0, 0.25, 0.5, 0.75]."
        )


def horizon_ratio_at(step: int, max_steps: int, schedule: HorizonSchedule) -> float:
    """The horizon as a fraction of L at optimizer step `step` (0-based) of `max_steps`."""
    if schedule.mode == "full":
        return 1.0
    if schedule.mode == "truncated":
        return float(schedule.truncation_ratio)
    progress = step / max(1, max_steps)  # in [0, 1) during training
    if schedule.progressive_schedule == "linear":
        # 1. grow linearly from the start ratio over the ramp; 2. stay at the full horizon afterwards
        start = schedule.progressive_start_ratio
        return min(1.0, start + (1.0 - start) * min(1.0, progress / schedule.progressive_ramp_fraction))
    stage = _last_index_at_most(schedule.progressive_stage_fractions, progress)
    return float(schedule.progressive_stage_ratios[stage])


def horizon_at(step: int, max_steps: int, schedule: HorizonSchedule) -> int:
    """The horizon in tokens at optimizer step `step` (0-based) of `max_steps`: ceil(ratio * L), in [1, L]."""
    return ratio_to_tokens(horizon_ratio_at(step, max_steps, schedule), schedule.max_completion_length)


def _last_index_at_most(sorted_values: Sequence[float], x: float) -> int:
    return max(i for i, v in enumerate(sorted_values) if v <= x + 1e-12)
