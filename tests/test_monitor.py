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
    rank0.count("teacher_tokens", 7)
    rank1.count("teacher_tokens", torch.tensor(5))
    rank1.finish(step=0, horizon=8, accelerator=first)
    record = rank0.finish(step=0, horizon=8, accelerator=_TwoRanks(0, other=first.sent))
    assert record.decode_iterations == 6  # max(5, 6): the step waits for the slower rank
    assert (record.generated_tokens, record.rollouts) == (15, 4)  # tokens and rollouts add up over ranks
    assert record.counts == {"prompts_started": 0, "prefill_tokens": 0, "prefill_cached_tokens": 0,
                             "student_grad_tokens": 0, "student_nograd_tokens": 0,
                             "teacher_tokens": 12}  # counters add up over ranks too

    ledger = CostLedger()
    ledger.add_step(StepRecord(step=0, horizon=8, kl_sums=[0.0] * 8, kl_counts=[2, 2, 1, 0, 0, 0, 0, 0],
                               generated_tokens=15, decode_iterations=6, counts=record.counts))
    ledger.add_step(StepRecord(step=1, horizon=8, kl_sums=[0.0] * 8, kl_counts=[1] * 8, generated_tokens=9,
                               decode_iterations=8, counts={"prompts_started": 4}))
    assert ledger.state_dict() == {"steps": 2, "decode_iterations": 14, "generated_tokens": 24, "trained_tokens": 13,
                                   "teacher_scored_tokens": 0, "prompts_started": 4, "prefill_tokens": 0,
                                   "prefill_cached_tokens": 0, "student_grad_tokens": 0, "student_nograd_tokens": 0, "teacher_tokens": 12}
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


L8 = 8  # the alarm tests' L: the late quarter is positions 6 and 7
ROLLOUTS = 16  # rollouts per observation: 2 late positions x 16 = 32 late tokens, ALARM_MIN_TOKENS


def _full(step, late_kl, early_kl=1.0, rollouts=0, repeating=0, tokens=ROLLOUTS, source="training"):
    """A full-horizon observation (L = 8) whose late positions 6 and 7 have mean KL `late_kl` over `tokens` rollouts."""
    sums = [early_kl * tokens] * 6 + [late_kl * tokens] * 2
    return dict(step=step, horizon=L8, kl_sums=sums, kl_counts=[float(tokens)] * L8, rollouts=rollouts,
                repeating=repeating, source=source)


def _loops(step, repeating, rollouts=ROLLOUTS, source="evaluation", horizon=L8):
    """An observation of whole rollouts only (no KL): `repeating` of `rollouts` end in a loop."""
    return dict(step=step, horizon=horizon, kl_sums=[0.0] * L8, kl_counts=[0.0] * L8, rollouts=rollouts,
                repeating=repeating, source=source)


def _alarm(horizon_name="truncated", **settings):
    return CollapseAlarm(L8, factor=2.0, repetition=0.5, horizon_name=horizon_name, **settings)


def _quietly(alarm, observations):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        return [alarm.observe(**o) for o in observations]


def test_alarm_fires_on_a_late_kl_that_falls_then_rises_3x_and_stays():
    alarm = _alarm()
    assert late_mean(*[_full(0, 0.5)[k] for k in ("kl_sums", "kl_counts")], L8) == 0.5
    # falls from 0.5 (the first reading: the floor is 0.25) to 0.2; steps 0-9 only set the baseline (ALARM_SETTLE_STEPS)
    falling = [0.5, 0.4, 0.3, 0.25, 0.2, 0.22, 0.2, 0.21, 0.2, 0.2, 0.22, 0.2]
    assert _quietly(alarm, [_full(s, v) for s, v in enumerate(falling)]) == [False] * 12
    assert not alarm.observe(step=12, horizon=2, kl_sums=[9.0] * L8, kl_counts=[1.0] * L8)  # truncated: no view
    assert _quietly(alarm, [_full(13, 0.6)]) == [False]  # 3x its best, once: not yet
    with pytest.warns(UserWarning) as caught:
        assert alarm.observe(**_full(14, 0.6))  # twice in a row: fires
    message = str(caught[0].message)
    assert "horizon/alarm at step 14 (horizon='truncated')" in message
    assert "0.6 at step 13 (training), 0.6 at step 14 (training) nats per token" in message
    assert "above 2x its best (0.2 at step 4, training) and above 0.25 (the first reading, at step 0: 0.5)" in message
    assert "horizon='rolling'" in message and "lower the learning rate" in message
    assert _quietly(alarm, [_full(15, 0.6)]) == [True]  # still high: active, no second warning
    assert _quietly(alarm, [_full(16, 0.2)]) == [False]  # back down: the alarm clears
    assert [(e["step"], e["source"]) for e in alarm.events] == [(14, "training"), (15, "training")]


def test_a_one_off_spike_does_not_fire():
    alarm = _alarm("full")
    values = [0.5, 0.3] + [0.2] * 18
    values[12], values[16] = 2.0, 3.0  # two 10x spikes, each alone
    assert _quietly(alarm, [_full(s, v) for s, v in enumerate(values)]) == [False] * len(values)
    assert alarm.events == []


def test_the_first_steps_only_set_the_baseline():
    """Early training (learning-rate warmup) moves the late positions most, on healthy runs too: the demo's rolling
    run read 0.53 and 0.14 nats at steps 5 and 6 against 8e-05 at step 1, and was at 99% accuracy at step 10."""
    values = [0.2, 8.2e-5, 1.1e-4, 1.2e-4, 3.1e-4, 0.53, 0.14, 0.084, 0.038, 0.037, 0.0007, 0.0005, 0.004]
    observations = [_full(s, v) for s, v in enumerate(values)]
    assert _quietly(_alarm("rolling"), observations) == [False] * len(values)
    unsettled = _alarm("rolling", settle_steps=0)
    with pytest.warns(UserWarning, match=r"0.53 at step 5 \(training\), 0.14 at step 6"):
        _ = [unsettled.observe(**o) for o in observations]


def test_alarm_stays_quiet_on_a_stable_run_and_on_noise_near_zero():
    stable, noisy = _alarm("full"), _alarm("full")
    # noisy but never 2x its best; one rollout in 16 loops at every other step
    _quietly(stable, [_full(s, v, rollouts=16, repeating=s % 2) for s, v in
                      enumerate([1.0, 0.8, 0.9, 0.7, 0.75, 0.6, 0.65, 0.6] * 3)])
    # a solved late region whose KL jumps 10x between steps (0.005 -> 0.05, as measured on the demo's OPD run)
    _quietly(noisy, [_full(s, v) for s, v in enumerate([0.15, 0.005, 0.05, 0.002, 0.04, 0.003, 0.05, 0.06] * 3)])
    assert stable.events == [] and noisy.events == []


def test_steps_with_few_late_tokens_are_pooled_into_one_reading():
    """Rolled chunks that happen to reach the late positions, or a small batch: 8 late tokens a step. Two spiky steps in
    a row would fire if each were read alone; pooled until 32 tokens, they make one high reading, not two."""
    observations = [_full(s, 0.05) for s in range(12)]  # 32 late tokens each: one reading each
    observations += [_full(s, v, tokens=4) for s, v in zip(range(12, 24), [0.9, 0.8] + [0.01] * 10)]
    alarm = _alarm("rolling")
    assert _quietly(alarm, observations) == [False] * len(observations)
    assert alarm.trace[-1]["late_tokens"] == 8 and alarm.trace[0]["late_tokens"] == 32
    unpooled = _alarm("rolling", min_tokens=1)
    with pytest.warns(UserWarning, match=r"0.9 at step 12 \(training\), 0.8 at step 13 \(training\)"):
        _ = [unpooled.observe(**o) for o in observations]


def test_progressive_first_full_horizon_steps_are_not_compared_with_an_earlier_baseline():
    """POPD: evaluation sees the late positions from the start (tiny KL); training reaches them only at step 30, where
    its late KL starts high and falls. Each source keeps its own baseline, so neither fires."""
    alarm = _alarm("progressive")
    observations = [_full(s, v, source="evaluation") for s, v in [(10, 0.004), (20, 0.002), (30, 0.003)]]
    observations += [dict(step=s, horizon=4, kl_sums=[1.0] * L8, kl_counts=[1.0] * L8) for s in range(25, 30)]
    falling = [0.9, 0.8, 0.6, 0.5, 0.4, 0.45, 0.3, 0.35] + [0.3] * 12
    observations += [_full(s, v) for s, v in zip(range(30, 50), falling)]
    observations += [_full(s, 0.005, source="evaluation") for s in (40, 50)]
    observations.sort(key=lambda o: o["step"])
    assert _quietly(alarm, observations) == [False] * len(observations)


def test_a_student_that_loops_from_step_0_does_not_fire():
    """The pruned SmolLM2 student writes 'TheTheThe...' before training: about 3 of its 4 rollouts a step loop from
    step 0 (0 of 4 at step 1), and OPD then cuts its KL. The old rule fired at step 3 ('75%, at most 0% earlier')."""
    alarm = _alarm("full")
    looping = [3, 0, 2, 3, 4, 3, 3, 4, 2, 3, 3, 3, 4, 4, 3, 3, 3, 2, 4, 3, 3, 4, 4, 3] * 2  # of 4 rollouts a step
    observations = [_loops(s, r, rollouts=4, source="training") for s, r in enumerate(looping)]
    assert _quietly(alarm, observations) == [False] * len(observations)


def test_loops_that_rise_from_0_to_80_percent_and_stay_fire():
    alarm = _alarm("anchored")
    observations = [_loops(s, r) for s, r in [(10, 0), (20, 1), (30, 0), (40, 0), (50, 13)]]
    assert _quietly(alarm, observations) == [False] * 5  # 81% once: not yet
    with pytest.warns(UserWarning, match=r"the share of rollouts ending in a repeated loop was 81% \(13/16\) at step "
                                         r"50 \(evaluation\), 88% \(14/16\) at step 60 \(evaluation\), against 2% "
                                         r"\(1/48\) in the full-horizon evaluation rollouts of steps 10-30"
                                         r".*anchor_every"):
        assert alarm.observe(**_loops(60, 14))
    assert [e["step"] for e in alarm.events] == [60]


def test_loops_in_truncated_rollouts_are_not_read():
    """Only full-horizon rollouts are read: a truncated step's rollouts cannot show a long loop, so their share (0)
    must not become a baseline that a later full-horizon view of a student that always looped would exceed."""
    alarm = _alarm("progressive")
    observations = [_loops(s, 0, source="training", horizon=2) for s in range(5)]
    observations += [_loops(s, 12, source="training") for s in range(5, 30)]
    assert _quietly(alarm, observations) == [False] * len(observations)
    assert not _alarm("progressive", settle_steps=0).observe(**_loops(5, 12, source="training"))


@pytest.mark.parametrize("mode, remedy", [
    ("truncated", r"horizon='rolling' \(every position trained at a truncated decode cost\) or horizon='anchored' / "
                  r"'adaptive'.*or lower the learning rate"),
    ("progressive", r"horizon='rolling'"),
    ("anchored", r"lower the learning rate, or make full-horizon steps more frequent \(anchor_every / "
                 r"adaptive_probe_every\)"),
    ("adaptive", r"anchor_every / adaptive_probe_every"),
    ("full", r"not truncation collapse: lower the learning rate, or use more prompts per step \(a token-matched OPD"),
    ("rolling", r"more prompts per step"),
])
def test_the_warning_offers_the_remedy_of_its_mode(mode, remedy):
    alarm = _alarm(mode)
    _quietly(alarm, [_full(s, 0.2) for s in range(11)])
    with pytest.warns(UserWarning, match=remedy) as caught:
        alarm.observe(**_full(11, 0.9))
        alarm.observe(**_full(12, 0.9))
    if mode not in ("full", "rolling"):
        assert "more prompts per step" not in str(caught[0].message)
    if mode in ("full", "rolling"):
        assert "full-horizon steps more frequent" not in str(caught[0].message)


def test_a_full_mode_run_whose_rollouts_are_capped_before_l_gets_the_truncation_remedy():
    """horizon='full' with rollout_max_tokens < L trains no late position: its late positions drift like TOPD's."""
    alarm = _alarm("full")
    observations = [dict(step=s, horizon=4, kl_sums=[0.1] * L8, kl_counts=[16.0] * L8) for s in range(50)]
    observations += [_full(s, v, source="evaluation") for s, v in [(10, 0.2), (20, 0.2), (30, 0.2), (40, 0.9)]]
    observations.sort(key=lambda o: o["step"])
    with pytest.warns(UserWarning, match=r"Training does not reach the late positions.*horizon='rolling'"):
        _ = [alarm.observe(**o) for o in observations + [_full(50, 0.9, source="evaluation")]]


def test_alarm_state_round_trips_and_rebuilds_from_its_trace():
    alarm = _alarm()
    observations = [_full(s, v) for s, v in zip(range(0, 25, 5), [0.5, 0.3, 0.2, 0.25, 0.6])]
    _quietly(alarm, observations)
    state = alarm.state_dict()
    restored = _alarm()
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    with pytest.warns(UserWarning, match="at step 25"):  # the restored streak continues: 0.6, then 0.7
        assert restored.observe(**_full(25, 0.7))
    # a checkpoint from before the trace existed: the baselines restart, what had fired is kept
    old = _alarm()
    old.load_state_dict({"late": 0.3, "first_late": 0.5, "best_late": [0.2, 2], "lowest_repeating": 0.0,
                         "active": True, "warned": True, "events": [{"step": 4, "source": "training", "reasons": []}]})
    assert old.active and old.warned and old.trace == [] and len(old.events) == 1


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
