"""Horizon schedules against hand-computed values, and their validation messages."""

import pytest

from horizon_opd.horizon import HorizonSchedule, horizon_at, ratio_to_tokens


def test_full_is_always_L():
    s = HorizonSchedule(mode="full", max_completion_length=2048)
    assert [horizon_at(step, 100, s) for step in (0, 50, 99)] == [2048, 2048, 2048]


@pytest.mark.parametrize(
    "ratio, L, expected",
    [(0.1, 2048, 205), (0.1, 100, 10), (0.1, 30, 3), (0.25, 10, 3), (0.5, 7, 4), (1.0, 9, 9), (0.001, 50, 1)],
)
def test_truncated_is_ceil_rho_L(ratio, L, expected):
    # ceil(0.1 * 2048) = ceil(204.8) = 205; 0.1 * 30 is 3.0000000000000004 in floats but must stay 3 tokens
    s = HorizonSchedule(mode="truncated", truncation_ratio=ratio, max_completion_length=L)
    assert horizon_at(0, 10, s) == horizon_at(9, 10, s) == expected


def test_linear_progressive_by_hand():
    # L = 100, start 0.1, ramp over the first half of 10 steps: ratio = 0.1 + 0.9 * min(1, (step / 10) / 0.5)
    s = HorizonSchedule(mode="progressive", max_completion_length=100, progressive_start_ratio=0.1,
                        progressive_ramp_fraction=0.5)
    expected = [10, 28, 46, 64, 82, 100, 100, 100, 100, 100]
    assert [horizon_at(step, 10, s) for step in range(10)] == expected


def test_staged_progressive_by_hand():
    s = HorizonSchedule(mode="progressive", progressive_schedule="stages", max_completion_length=200,
                        progressive_stage_ratios=(0.1, 0.25, 0.5, 1.0), progressive_stage_fractions=(0, 0.25, 0.5, 0.75))
    # 8 steps: progress 0, .125 -> 0.1; .25, .375 -> 0.25; .5, .625 -> 0.5; .75, .875 -> 1.0
    assert [horizon_at(step, 8, s) for step in range(8)] == [20, 20, 50, 50, 100, 100, 200, 200]


def test_horizon_is_non_decreasing_and_ends_at_L():
    s = HorizonSchedule(mode="progressive", max_completion_length=333, progressive_ramp_fraction=0.8)
    values = [horizon_at(step, 97, s) for step in range(97)]
    assert values == sorted(values) and values[-1] == 333 and values[0] == ratio_to_tokens(0.1, 333)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "truncated", "truncation_ratio": 0.0}, "truncation_ratio=0.0 is outside (0, 1]"),
        ({"mode": "truncated", "truncation_ratio": 1.5}, "truncation_ratio=1.5 is outside (0, 1]"),
        ({"mode": "sometimes"}, "horizon='sometimes' is not a horizon mode"),
        ({"mode": "full", "max_completion_length": 0}, "max_completion_length=0 must be an integer >= 1"),
        ({"mode": "progressive", "progressive_schedule": "cosine"}, "progressive_schedule='cosine' is unknown"),
        ({"mode": "progressive", "progressive_start_ratio": 0}, "progressive_start_ratio=0 is outside (0, 1]"),
        ({"mode": "progressive", "progressive_ramp_fraction": 0}, "progressive_ramp_fraction=0 is outside (0, 1]"),
        ({"mode": "progressive", "progressive_schedule": "stages", "progressive_stage_ratios": (0.5, 0.2, 1.0),
          "progressive_stage_fractions": (0, 0.3, 0.6)}, "decreases"),
        ({"mode": "progressive", "progressive_schedule": "stages", "progressive_stage_ratios": (0.1, 0.5),
          "progressive_stage_fractions": (0, 0.5)}, "never reaches the full horizon L: end the list with 1.0"),
        ({"mode": "progressive", "progressive_schedule": "stages", "progressive_stage_ratios": (0.1, 1.0),
          "progressive_stage_fractions": (0.2, 0.5)}, "must start at 0.0"),
        ({"mode": "progressive", "progressive_schedule": "stages", "progressive_stage_ratios": (0.1, 1.0),
          "progressive_stage_fractions": (0.0,)}, "equal length"),
        ({"mode": "progressive", "progressive_schedule": "stages", "progressive_stage_ratios": (0.1, 0.2, 1.0),
          "progressive_stage_fractions": (0.0, 0.5, 0.5)}, "strictly increasing"),
    ],
)
def test_bad_schedules_name_the_value_and_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        HorizonSchedule(**kwargs)
