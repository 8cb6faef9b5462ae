"""Horizon policies against hand-computed sequences, the adaptive controller on synthetic profiles, and the
validation messages."""

import dataclasses

import pytest

from horizon_opd import HorizonOPDConfig
from horizon_opd.horizon import (
    HORIZON_POLICIES,
    AdaptiveHorizon,
    AnchoredHorizon,
    HorizonPolicy,
    ProgressiveHorizon,
    StepRecord,
    TruncatedHorizon,
    adaptive_decision,
    bin_means,
    horizon_at,
    horizon_settings,
    method_names,
    policy_from_alias,
    ratio_to_tokens,
)


def test_full_is_always_L():
    s = HorizonPolicy(max_completion_length=2048)
    assert [horizon_at(step, 100, s) for step in (0, 50, 99)] == [2048, 2048, 2048]


@pytest.mark.parametrize(
    "ratio, L, expected",
    [(0.1, 2048, 205), (0.1, 100, 10), (0.1, 30, 3), (0.25, 10, 3), (0.5, 7, 4), (1.0, 9, 9), (0.001, 50, 1)],
)
def test_truncated_is_ceil_rho_L(ratio, L, expected):
    # ceil(0.1 * 2048) = ceil(204.8) = 205; 0.1 * 30 is 3.0000000000000004 in floats but must stay 3 tokens
    s = TruncatedHorizon(truncation_ratio=ratio, max_completion_length=L)
    assert horizon_at(0, 10, s) == horizon_at(9, 10, s) == expected


def test_linear_progressive_by_hand():
    # L = 100, start 0.1, ramp over the first half of 10 steps: ratio = 0.1 + 0.9 * min(1, (step / 10) / 0.5)
    s = ProgressiveHorizon(max_completion_length=100, progressive_start_ratio=0.1, progressive_ramp_fraction=0.5)
    assert [horizon_at(step, 10, s) for step in range(10)] == [10, 28, 46, 64, 82, 100, 100, 100, 100, 100]


def test_staged_progressive_by_hand():
    s = ProgressiveHorizon(progressive_schedule="stages", max_completion_length=200,
                           progressive_stage_ratios=[0.1, 0.25, 0.5, 1.0], progressive_stage_fractions=[0, 0.25, 0.5, 0.75])
    # 8 steps: progress 0, .125 -> 0.1; .25, .375 -> 0.25; .5, .625 -> 0.5; .75, .875 -> 1.0
    assert [horizon_at(step, 8, s) for step in range(8)] == [20, 20, 50, 50, 100, 100, 200, 200]


def test_horizon_is_non_decreasing_and_ends_at_L():
    s = ProgressiveHorizon(max_completion_length=333, progressive_ramp_fraction=0.8)
    values = [horizon_at(step, 97, s) for step in range(97)]
    assert values == sorted(values) and values[-1] == 333 and values[0] == ratio_to_tokens(0.1, 333)


def test_anchored_by_hand():
    # L = 50, rho = 0.1 -> 5 tokens; anchors at steps 0, 4, 8
    s = AnchoredHorizon(max_completion_length=50, truncation_ratio=0.1, anchor_every=4)
    assert [horizon_at(step, 10, s) for step in range(10)] == [50, 5, 5, 5, 50, 5, 5, 5, 50, 5]
    assert [horizon_at(s_, 3, AnchoredHorizon(max_completion_length=50, anchor_every=1)) for s_ in range(3)] == [50] * 3


def _probe(step, profile_by_bin, L=80, bins=8):
    """A probe step whose per-position KL is constant within each of `bins` bins over L."""
    sums = [profile_by_bin[p * bins // L] for p in range(L)]
    return StepRecord(step=step, horizon=L, kl_sums=sums, kl_counts=[1.0] * L)


def test_bin_means_by_hand():
    assert bin_means([1, 2, 3, 4, 0, 6], [1, 1, 1, 1, 0, 1], horizon=6, num_bins=3) == [1.5, 3.5, 6.0]
    assert bin_means([1, 2], [0, 0], horizon=2, num_bins=2) == [None, None]


def test_adaptive_decision_by_hand():
    first = [1.0] * 8
    kwargs = dict(min_ratio=0.1, max_ratio=1.0, tolerance=0.25, carry=0.5)
    # the prefix (bins 0-3) halved and every late bin with it: training carries over -> halve the ratio
    carried = adaptive_decision([0.5] * 8, first, first, 0.5, **kwargs)
    assert carried["ratio"] == 0.25 and carried["drifting_bins"] == []
    # the prefix improved 4x, bins 5 and 6 less than sqrt(4) = 2x: they lag -> cover them: 7/8
    lagging = adaptive_decision([0.25] * 5 + [1.0, 0.9, 0.25], first, first, 0.125, **kwargs)
    assert lagging["drifting_bins"] == [5, 6] and lagging["ratio"] == 7 / 8
    # bin 6 rose 0.3 above its best (0.2), more than 0.25 x its first level: drift -> cover it
    rose = adaptive_decision([0.2] * 6 + [0.5, 0.2], first, [0.2] * 8, 0.125, **kwargs)
    assert rose["drifting_bins"] == [6] and rose["ratio"] == 7 / 8
    # the last bin drifts: only full-horizon steps reach it, so the ratio does not grow (the policy probes sooner)
    last = adaptive_decision([0.2] * 7 + [0.5], first, [0.2] * 8, 0.25, **kwargs)
    assert last["drifting_bins"] == [7] and last["ratio"] == 0.125
    # 5x its best but tiny against where it started (noise on a solved bin): no drift
    noise = adaptive_decision([0.01] * 7 + [0.05], first, [0.01] * 8, 0.125, **kwargs)
    assert noise["drifting_bins"] == [] and noise["ratio"] == 0.1
    # a bin that started near zero "lags" by any factor of noise (the demo's seed 1: 1e-4 nats, then 9e-4); at or
    # below min_signal it is not drifting
    near_zero = [1.0] * 5 + [1e-4, 1.0, 1.0]
    profile = [0.25] * 5 + [9e-4, 0.25, 0.25]
    assert adaptive_decision(profile, near_zero, near_zero, 0.125, **kwargs)["drifting_bins"] == [5]
    floored = adaptive_decision(profile, near_zero, near_zero, 0.125, min_signal=0.01, **kwargs)
    assert floored["drifting_bins"] == [] and floored["ratio"] == 0.1
    # bounds: never below the minimum, never above the maximum
    assert adaptive_decision([0.5] * 8, first, first, 0.1, **kwargs)["ratio"] == 0.1
    capped = adaptive_decision([0.2] * 6 + [0.5, 0.2], first, [0.2] * 8, 0.125, min_ratio=0.1, max_ratio=0.5,
                               tolerance=0.25, carry=0.5)
    assert capped["ratio"] == 0.5


def test_adaptive_policy_grows_on_drift_shrinks_while_reliable_and_stays_in_bounds():
    L = 80
    policy = AdaptiveHorizon(max_completion_length=L, adaptive_min_ratio=0.1, adaptive_probe_every=4)
    profiles = {0: [1.0] * 8,  # first probe: the reference
                4: [0.25] * 8,  # everything improved together: stay at the minimum
                8: [0.1] * 6 + [0.6, 0.3],  # the prefix improved 10x, bin 6 rose and lags: extend over it, probe sooner
                10: [0.08] * 8,  # recovered: halve, probe interval back to 4
                14: [0.05] * 8,  # still fine: halve
                18: [0.05] * 8}  # still fine: halve
    horizons = []
    for step in range(22):
        horizons.append(horizon_at(step, 22, policy))
        if step in profiles:
            policy.observe(_probe(step, profiles[step]))
    # probes at 0, 4, 8, 10 (two steps after the drift), 14, 18; ceil(ratio * 80) in between
    assert horizons == [80, 8, 8, 8, 80, 8, 8, 8, 80, 70, 80, 35, 35, 35, 80, 18, 18, 18, 80, 9, 9, 9]
    assert [d["step"] for d in policy.decisions] == [0, 4, 8, 10, 14, 18]
    assert [d["ratio"] for d in policy.decisions] == [0.1, 0.1, 0.875, 0.4375, 0.21875, 0.109375]
    assert policy.decisions[2]["drifting_bins"] == [6]
    assert all(8 <= h <= 80 for h in horizons)


def test_adaptive_state_round_trips():
    policy = AdaptiveHorizon(max_completion_length=80, adaptive_probe_every=5)
    for step, profile in ((0, [1.0] * 8), (5, [0.5] * 6 + [2.0, 2.0])):
        policy.observe(_probe(step, profile))
    clone = AdaptiveHorizon(max_completion_length=80, adaptive_probe_every=5)
    clone.load_state_dict(policy.state_dict())
    assert [horizon_at(s, 20, clone) for s in range(20)] == [horizon_at(s, 20, policy) for s in range(20)]
    assert clone.state_dict() == policy.state_dict()


def test_adaptive_ignores_training_steps_and_unreached_bins():
    policy = AdaptiveHorizon(max_completion_length=80, adaptive_probe_every=5)
    policy.observe(_probe(0, [1.0] * 8))
    policy.observe(StepRecord(step=1, horizon=8, kl_sums=[9.0] * 80, kl_counts=[1.0] * 8 + [0.0] * 72))
    assert len(policy.decisions) == 1
    counts = [1.0] * 40 + [0.0] * 40  # every rollout ended at position 40 with EOS: bins 4-7 measure nothing
    policy.observe(StepRecord(step=5, horizon=80, kl_sums=[0.5] * 80, kl_counts=counts))
    assert policy.decisions[-1]["drifting_bins"] == [] and policy.current_ratio == 0.1


def test_settings_are_declared_once_and_become_config_fields():
    names = [f.name for f in horizon_settings()]
    assert len(names) == len(set(names))
    assert {"truncation_ratio", "anchor_every", "adaptive_min_ratio", "progressive_schedule"} <= set(names)
    config_fields = {f.name: f for f in dataclasses.fields(HorizonOPDConfig)}
    for f in horizon_settings():
        assert config_fields[f.name].metadata["help"] == f.metadata["help"]
    assert config_fields["horizon"].metadata["choices"] == list(HORIZON_POLICIES)
    args = HorizonOPDConfig(output_dir="unused", horizon="anchored", anchor_every=3, max_completion_length=30,
                            bf16=False)
    policy = args.horizon_policy()
    assert isinstance(policy, AnchoredHorizon) and policy.anchor_every == 3 and policy.max_completion_length == 30


@pytest.mark.parametrize("name, cls, settings, label", [
    ("opd", HorizonPolicy, {}, "OPD"),
    ("topd0.1", TruncatedHorizon, {"truncation_ratio": 0.1}, "TOPD rho=0.1"),
    ("topd", TruncatedHorizon, {}, "TOPD rho=0.1"),
    ("popd", ProgressiveHorizon, {}, "POPD linear 0.1->1"),
    ("popd-stages", ProgressiveHorizon, {"progressive_schedule": "stages"}, "POPD stages"),
    ("anchored", AnchoredHorizon, {}, "Anchored rho=0.1 every 10"),
    ("adaptive0.2", AdaptiveHorizon, {"adaptive_min_ratio": 0.2}, "Adaptive 0.2-1"),
])
def test_command_line_names(name, cls, settings, label):
    found, found_settings = policy_from_alias(name)
    assert found is cls and found_settings == settings
    assert cls(max_completion_length=10, **settings).label() == label


@pytest.mark.parametrize("bad", ["topdX", "opd2", "popd-cosine", ""])
def test_unknown_command_line_names_list_the_known_ones(bad):
    with pytest.raises(ValueError, match="unknown method .*topd"):
        policy_from_alias(bad)
    assert "anchored" in " ".join(method_names())


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (TruncatedHorizon, {"truncation_ratio": 0.0}, "truncation_ratio=0.0 is outside (0, 1]"),
        (TruncatedHorizon, {"truncation_ratio": 1.5}, "truncation_ratio=1.5 is outside (0, 1]"),
        (HorizonPolicy, {"max_completion_length": 0}, "max_completion_length=0 must be an integer >= 1"),
        (ProgressiveHorizon, {"progressive_schedule": "cosine"}, "progressive_schedule='cosine' is unknown"),
        (ProgressiveHorizon, {"progressive_start_ratio": 0}, "progressive_start_ratio=0 is outside (0, 1]"),
        (ProgressiveHorizon, {"progressive_ramp_fraction": 0}, "progressive_ramp_fraction=0 is outside (0, 1]"),
        (ProgressiveHorizon, {"progressive_schedule": "stages", "progressive_stage_ratios": [0.5, 0.2, 1.0],
                              "progressive_stage_fractions": [0, 0.3, 0.6]}, "decreases"),
        (ProgressiveHorizon, {"progressive_schedule": "stages", "progressive_stage_ratios": [0.1, 0.5],
                              "progressive_stage_fractions": [0, 0.5]}, "never reaches the full horizon L"),
        (ProgressiveHorizon, {"progressive_schedule": "stages", "progressive_stage_ratios": [0.1, 1.0],
                              "progressive_stage_fractions": [0.2, 0.5]}, "must start at 0.0"),
        (ProgressiveHorizon, {"progressive_schedule": "stages", "progressive_stage_ratios": [0.1, 1.0],
                              "progressive_stage_fractions": [0.0]}, "equal length"),
        (ProgressiveHorizon, {"progressive_schedule": "stages", "progressive_stage_ratios": [0.1, 0.2, 1.0],
                              "progressive_stage_fractions": [0.0, 0.5, 0.5]}, "strictly increasing"),
        (AnchoredHorizon, {"anchor_every": 0}, "anchor_every=0 must be an integer >= 1"),
        (AnchoredHorizon, {"anchor_every": 2.5}, "anchor_every=2.5 must be an integer >= 1"),
        (AdaptiveHorizon, {"adaptive_min_ratio": 0}, "adaptive_min_ratio=0 is outside (0, 1]"),
        (AdaptiveHorizon, {"adaptive_min_ratio": 0.5, "adaptive_max_ratio": 0.2}, "adaptive_max_ratio=0.2 is below"),
        (AdaptiveHorizon, {"adaptive_probe_every": 0}, "adaptive_probe_every=0 must be an integer >= 1"),
        (AdaptiveHorizon, {"adaptive_signal": "entropy"}, "adaptive_signal='entropy' is unknown"),
        (AdaptiveHorizon, {"adaptive_tolerance": 0}, "adaptive_tolerance=0 must be a number > 0"),
        (AdaptiveHorizon, {"adaptive_min_signal": -0.1}, "adaptive_min_signal=-0.1 must be a number >= 0"),
        (AdaptiveHorizon, {"adaptive_bins": 200}, "adaptive_bins=200 exceeds max_completion_length=100"),
        (AdaptiveHorizon, {"adaptive_top_k": 0}, "adaptive_top_k=0 must be an integer >= 1"),
        (AdaptiveHorizon, {"adaptive_carry": 1.5}, "adaptive_carry=1.5 must be in (0, 1]"),
    ],
)
def test_bad_settings_name_the_value_and_the_fix(cls, kwargs, message):
    kwargs = {"max_completion_length": 100, **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        cls(**kwargs)


def test_config_refuses_an_unknown_policy():
    with pytest.raises(ValueError, match=r"horizon='sometimes' is not a horizon policy.*anchored"):
        HorizonOPDConfig(output_dir="unused", horizon="sometimes", bf16=False)
