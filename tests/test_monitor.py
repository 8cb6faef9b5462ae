"""Step measurements by hand: per-position sums and counts, logging windows, loop detection and the collapse alarm;
and the construction-time checks on sampling settings and the alarm's settings."""

import warnings
from types import SimpleNamespace

import pytest
import torch

from horizon_opd import HeldOutEvalCallback, HorizonOPDConfig
from horizon_opd.horizon import StepRecord
from horizon_opd.monitor import CollapseAlarm, CostLedger, LogWindow, StepMeter, ends_in_loop, late_mean

SINGLE_PROCESS = SimpleNamespace(device=torch.device("cpu"), num_processes=1)


def test_step_meter_sums_micro_batches_by_position():
    meter = StepMeter(max_completion_length=4)
    meter.add_tokens(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1, 1], [1, 0]]))
    meter.add_tokens(torch.tensor([[5.0, 6.0, 7.0]]), torch.tensor([[1, 1, 1]]))
    meter.add_rollouts([[1, 2], [3]])
    record = meter.finish(step=3, horizon=4, accelerator=SINGLE_PROCESS)
    assert record.kl_sums == [9.0, 8.0, 7.0, 0.0] and record.kl_counts == [3.0, 2.0, 1.0, 0.0]
    assert (record.step, record.horizon, record.rollouts, record.generated_tokens) == (3, 4, 2, 3)
    empty = meter.finish(step=4, horizon=4, accelerator=SINGLE_PROCESS)  # finish resets
    assert empty.kl_counts == [0.0] * 4 and empty.rollouts == 0


def test_step_meter_places_rolled_chunks_at_their_true_positions():
    meter = StepMeter(max_completion_length=8)
    # two chunks of 3 columns: row 0 continues a rollout at position 5, row 1 starts one (offset 0)
    meter.add_tokens(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]),
                     offsets=torch.tensor([5, 0]))
    record = meter.finish(step=0, horizon=3, accelerator=SINGLE_PROCESS)
    assert record.kl_sums == [4.0, 5.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0]
    assert record.kl_counts == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="position 8, past max_completion_length=8"):
        meter.add_tokens(torch.ones(1, 3), torch.ones(1, 3), offsets=torch.tensor([6]))


class _TwoRanks:
    """Stands in for a 2-process accelerator: `reduce` sums this rank's packed tensor with the other rank's."""

    def __init__(self, process_index, other=None):
        self.device, self.num_processes, self.process_index, self.other, self.sent = torch.device("cpu"), 2, \
            process_index, other, None

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        self.sent = tensor.clone()
        return tensor if self.other is None else tensor + self.other


def test_decode_iterations_are_the_longest_rollout_of_the_slowest_rank_per_generate_call():
    rank0, rank1 = StepMeter(max_completion_length=8), StepMeter(max_completion_length=8)
    rank0.add_rollouts([[1, 2, 3], [4]])  # one generate call: 3 sequential decode steps
    rank0.add_generation([[1, 2], [3, 4]])  # a second call (e.g. a rolling pool's seed prefixes): 2 more
    rank1.add_rollouts([[1, 2, 3, 4, 5, 6], [7]])  # rank 1 decodes 6 times
    assert (rank0.decode_iterations, rank0.generated_tokens, rank0.rollouts) == (5, 8, 2)
    first = _TwoRanks(1)
    rank1.finish(step=0, horizon=8, accelerator=first)
    record = rank0.finish(step=0, horizon=8, accelerator=_TwoRanks(0, other=first.sent))
    assert record.decode_iterations == 6  # max(5, 6): the step waits for the slower rank
    assert (record.generated_tokens, record.rollouts) == (15, 4)  # tokens and rollouts add up over ranks

    ledger = CostLedger()
    ledger.add_step(StepRecord(step=0, horizon=8, kl_sums=[0.0] * 8, kl_counts=[2, 2, 1, 0, 0, 0, 0, 0],
                               generated_tokens=15, decode_iterations=6))
    ledger.add_step(StepRecord(step=1, horizon=8, kl_sums=[0.0] * 8, kl_counts=[1] * 8, generated_tokens=9,
                               decode_iterations=8))
    assert ledger.state_dict() == {"steps": 2, "decode_iterations": 14, "generated_tokens": 24, "trained_tokens": 13,
                                   "teacher_scored_tokens": 0}
    restored = CostLedger()
    restored.load_state_dict(ledger.state_dict())
    assert restored.metrics() == ledger.metrics() and ledger.metrics()["horizon/decode_iterations"] == 14.0


def test_log_window_bins_are_token_weighted_over_its_steps():
    window = LogWindow(max_completion_length=8, num_bins=2)
    window.add(StepRecord(step=0, horizon=4, kl_sums=[1, 1, 1, 1, 0, 0, 0, 0], kl_counts=[1, 1, 1, 1, 0, 0, 0, 0]))
    window.add(StepRecord(step=1, horizon=8, kl_sums=[3, 3, 3, 3, 8, 8, 0, 0], kl_counts=[1, 1, 1, 1, 2, 2, 0, 0],
                          rollouts=4, repeating=1))
    metrics = window.metrics()
    # bins over the longest horizon (8): positions 0-3 -> (4 + 12) / 8 = 2.0, positions 4-7 -> 16 / 4 = 4.0
    assert metrics["horizon/tokens"] == 8.0 and metrics["horizon/mean_tokens"] == 6.0
    assert metrics["kl_by_position/bin_0"] == 2.0 and metrics["kl_by_position/bin_1"] == 4.0
    assert metrics["horizon/repeating"] == 0.25
    window.reset()
    assert window.metrics() == {}


def test_loops_are_long_repeats_not_repeated_values():
    assert ends_in_loop([5, 6, 7, 8] * 6)  # a 4-token unit over 24 tokens
    assert ends_in_loop(list(range(40)) + [9] * 24)
    assert not ends_in_loop([0, 0, 0, 1, 2, 3])  # "000" is a value, not a loop
    assert not ends_in_loop(list(range(100)))
    assert not ends_in_loop([5, 6, 7, 8] * 5)  # 20 tokens: too short to call


def _full(step, late_kl, early_kl=1.0, L=8, rollouts=0, repeating=0):
    sums = [early_kl] * 6 + [late_kl] * 2  # the last quarter of L = 8 is positions 6 and 7
    return dict(step=step, horizon=L, kl_sums=sums, kl_counts=[1.0] * L, rollouts=rollouts, repeating=repeating)


def test_alarm_fires_on_a_late_drift_and_warns_once():
    alarm = CollapseAlarm(8, factor=2.0, repetition=0.5, horizon_name="truncated")
    assert late_mean(*[_full(0, 0.5)[k] for k in ("kl_sums", "kl_counts")], 8) == 0.5
    # smoothed (EMA 0.5): 0.5, 0.4, 0.3, 0.225 (the best), then 0.4125 (1.8x: below the factor)
    for step, late in enumerate([0.5, 0.3, 0.2, 0.15, 0.6]):
        assert not alarm.observe(**_full(step, late))
    assert not alarm.observe(step=5, horizon=2, kl_sums=[9.0] * 8, kl_counts=[1.0] * 8)  # a truncated step: no view
    with pytest.warns(UserWarning, match=r"rose to 0.656 nats, 2.9x its best \(0.225 at step 3; 0.5 at the start\)"
                                         r".*horizon='anchored'"):
        assert alarm.observe(**_full(6, 0.9))  # 0.65625 > 2 x 0.225 and > 0.5 x 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second firing does not warn again
        assert alarm.observe(**_full(7, 0.9))
    assert not alarm.observe(**_full(8, 0.0))  # 0.39: below 2x the best again, the alarm clears
    assert [e["step"] for e in alarm.events] == [6, 7]


def test_alarm_stays_quiet_on_a_stable_run_and_on_noise_near_zero():
    stable = CollapseAlarm(8, factor=2.0, repetition=0.5, horizon_name="full")
    noisy = CollapseAlarm(8, factor=2.0, repetition=0.5, horizon_name="full")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step, late in enumerate([1.0, 0.8, 0.9, 0.7, 0.75, 0.6, 0.65, 0.6]):  # noisy but never 2x its best
            assert not stable.observe(**_full(step, late, rollouts=8, repeating=step % 2))
        # a solved late region whose KL jumps 10x between steps (0.005 -> 0.05, as measured on the demo's OPD run)
        for step, late in enumerate([0.15, 0.005, 0.05, 0.002, 0.04, 0.003, 0.05]):
            assert not noisy.observe(**_full(step, late))
    assert stable.events == [] and noisy.events == []


def test_alarm_fires_when_rollouts_start_repeating():
    alarm = CollapseAlarm(8, factor=2.0, repetition=0.5, horizon_name="truncated")
    assert not alarm.observe(step=0, horizon=2, kl_sums=[0.0] * 8, kl_counts=[0.0] * 8, rollouts=8, repeating=1)
    with pytest.warns(UserWarning, match=r"75% of the rollouts end in a repeated loop"):
        assert alarm.observe(step=1, horizon=2, kl_sums=[0.0] * 8, kl_counts=[0.0] * 8, rollouts=8, repeating=6)
    state = alarm.state_dict()
    restored = CollapseAlarm(8, factor=2.0, repetition=0.5, horizon_name="truncated")
    restored.load_state_dict(state)
    assert restored.state_dict() == state


@pytest.mark.parametrize("key, value", [("temperature", 0.7), ("top_k", 20), ("top_p", 0.9), ("do_sample", False)])
def test_sampling_settings_in_generation_kwargs_are_refused(key, value):
    with pytest.raises(ValueError, match=rf"generation_kwargs sets {key}={value!r}.*set the config's `temperature`"):
        HorizonOPDConfig(output_dir="unused", bf16=False, generation_kwargs={key: value})


def test_truncated_sampling_is_refused_for_the_sampled_estimator_and_warned_otherwise():
    with pytest.raises(ValueError, match=r"top_p=0.9 truncates the sampling distribution.*biased"):
        HorizonOPDConfig(output_dir="unused", bf16=False, loss_type="sampled", top_p=0.9)
    with pytest.warns(UserWarning, match=r"top_k=50 truncates the sampling distribution.*off-policy"):
        HorizonOPDConfig(output_dir="unused", bf16=False, top_k=50)


@pytest.mark.parametrize("overrides, message", [
    ({"alarm_factor": 1.0}, r"alarm_factor=1.0 must be a number > 1"),
    ({"alarm_repetition": 0}, r"alarm_repetition=0 must be a fraction in \(0, 1\]"),
])
def test_bad_alarm_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        HorizonOPDConfig(output_dir="unused", bf16=False, **overrides)


def test_held_out_callback_refuses_every_zero():
    with pytest.raises(ValueError, match=r"every=0 must be an integer >= 1"):
        HeldOutEvalCallback(lambda model: 0.0, every=0)


def test_alarm_ignores_negative_single_sample_estimates():
    """loss_type='sampled' logs log pi(y) - log q(y), which can be negative: no ratio to a negative best."""
    alarm = CollapseAlarm(8, factor=2.0, repetition=0.5, horizon_name="full")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step, late in enumerate([-0.0444, -0.0444, 0.02, -0.01]):
            assert not alarm.observe(**_full(step, late))
