"""The collapse alarm measured as a detector (`horizon_opd.alarm_study`): labels, replays and totals on hand-built
results files; no training."""

import json

import pytest

from horizon_opd.alarm_study import detector_table, format_markdown, label_run, main, replay, trace_from_logs
from horizon_opd.monitor import CollapseAlarm

L = 8


def _curve(values, every=10, key="accuracy"):
    return [{"step": i * every, key: v} for i, v in enumerate(values)]


def _obs(step, late=None, source="training", horizon=L, tokens=32, rollouts=0, repeating=0):
    return {"step": step, "source": source, "horizon": horizon, "late": late,
            "late_tokens": tokens if late is not None else None, "rollouts": rollouts, "repeating": repeating}


# a truncated run watched by evaluation every 10 steps: late KL tiny, then up from step 60 (two readings: fires at 70)
DRIFT = [_obs(s, 0.003, "evaluation") for s in (10, 20, 30, 40, 50)] + \
        [_obs(s, v, "evaluation") for s, v in [(60, 0.4), (70, 0.9), (80, 2.0)]]
QUIET = [_obs(s, 0.003, "evaluation") for s in (10, 20, 30, 40, 50, 60, 70, 80)]


def test_label_run_finds_the_first_fall_below_the_peak_so_far():
    assert label_run(_curve([0.36, 0.97, 0.95, 0.93, 0.89, 0.72, 0.83, 0.03])) == {
        "collapsed": True, "stayed_down": True, "fall_step": 50, "peak": 0.97, "peak_step": 10, "value_at_fall": 0.72,
        "final": 0.03}
    healthy = label_run(_curve([0.36, 0.99, 0.90, 0.80, 0.90]))  # 19 points below the peak: not a collapse
    assert not healthy["collapsed"] and healthy["fall_step"] is None and healthy["final"] == 0.90
    assert not healthy["stayed_down"]
    # a dip early in training counts (the peak so far is the starting accuracy); the run recovered from it
    dip = label_run(_curve([0.72, 0.72, 0.05, 1.0], every=2))
    assert dip["fall_step"] == 4 and dip["collapsed"] and not dip["stayed_down"]
    # stayed down: the final value is still more than 20 points below the peak before the fall (0.97 - 0.76 = 0.21)
    assert label_run(_curve([0.36, 0.97, 0.5, 0.76]))["stayed_down"]
    assert not label_run(_curve([0.36, 0.97, 0.5, 0.78]))["stayed_down"]


def test_label_run_on_a_held_out_kl_curve():
    kl = _curve([3.9, 1.45, 0.76, 1.0, 1.2], every=12, key="heldout_kl")
    assert label_run(kl, "heldout_kl", higher_is_better=False)["fall_step"] == 48  # 1.2 > 1.5 x 0.76
    assert label_run(kl, "heldout_kl", higher_is_better=False)["stayed_down"]
    recovered = _curve([3.9, 0.76, 1.2, 1.1], every=12, key="heldout_kl")  # 1.1 < 1.14 at the end
    assert not label_run(recovered, "heldout_kl", higher_is_better=False)["stayed_down"]
    assert not label_run(kl[:4], "heldout_kl", higher_is_better=False)["collapsed"]  # 1.0 < 1.14
    with pytest.raises(ValueError, match="no 'accuracy' values"):
        label_run(kl)


def test_replay_runs_the_trainers_rule_on_a_trace():
    live = CollapseAlarm(L, 2.0, 0.5, "truncated")
    with pytest.warns(UserWarning):
        for t in DRIFT:
            live.observe_values(t["step"], t["horizon"], t["late"], source=t["source"], late_tokens=t["late_tokens"])
    assert replay(live.trace, "truncated", L) == [e["step"] for e in live.events] == [70, 80]
    assert replay(QUIET, "truncated", L) == []
    assert replay(DRIFT, "truncated", L, persistence=3) == [80]  # rule settings pass through


def _record(name, seed, curve, trace, policy="truncated", events=None):
    return {"name": name, "seed": seed, "horizon": {"horizon": policy, "max_completion_length": L}, "curve": curve,
            "alarm_trace": trace, "alarm_events": events or []}


def _write(tmp_path, name, results):
    path = tmp_path / name
    path.write_text(json.dumps(results))
    return str(path)


def test_detector_table_totals(tmp_path):
    fell_at_70 = _curve([0.4, 1.0, 1.0, 0.98, 0.95, 0.9, 0.85, 0.7, 0.1])
    fell_at_40 = _curve([0.4, 1.0, 1.0, 1.0, 0.5, 0.1, 0.0, 0.0, 0.0])
    healthy = _curve([0.4, 1.0, 1.0, 1.0, 1.0, 1.0, 0.99, 1.0, 1.0])
    dip = _curve([0.4, 1.0, 0.7, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # fell at 20 and recovered
    demo = _write(tmp_path, "demo.json", {"settings": {}, "methods": [
        _record("TOPD", 0, fell_at_70, DRIFT, events=[{"step": 30}]),  # caught at 70: lead 0
        _record("TOPD", 1, fell_at_40, DRIFT),  # alarm at 70, after the fall at 40: late
        _record("OPD", 0, healthy, DRIFT, policy="full"),  # a false alarm
        _record("OPD", 1, healthy, QUIET, policy="full"),
        _record("POPD", 0, dip, DRIFT, policy="progressive"),  # alarmed after a dip it recovered from
        {"name": "old", "seed": 0, "horizon": {"horizon": "full", "max_completion_length": L}, "curve": healthy},
    ]})
    # the real model: one run per file, held-out KL curves, L in the run's settings
    real = _write(tmp_path, "opd_seed0.json", {
        "method": "opd", "name": "OPD", "seed": 0, "settings": {"max_completion_length": L},
        "horizon": {"horizon": "full"}, "curve": _curve([2.94, 1.2, 0.55], every=12, key="heldout_kl"),
        "alarm_trace": QUIET, "alarm_events": [{"step": 3}]})
    table = detector_table([demo, real])
    rows = {(r["file"], r["method"], r["seed"]): r for r in table["rows"]}
    assert len(rows) == 6
    caught = rows[(demo, "TOPD", 0)]
    assert (caught["collapsed"], caught["fall_step"], caught["alarm_step"], caught["lead"]) == (True, 70, 70, 0)
    assert caught["alarm_source"] == "evaluation" and caught["recorded_alarm_step"] == 30
    assert (rows[(demo, "TOPD", 1)]["fall_step"], rows[(demo, "TOPD", 1)]["lead"]) == (40, -30)
    assert rows[(real, "OPD", 0)]["key"] == "heldout_kl" and rows[(real, "OPD", 0)]["alarm_step"] is None
    # the dip counts as a collapse alarmed late (fall 20, alarm 70)
    assert table["totals"] == {"runs": 6, "collapsed": 3, "alarmed": 4, "precision": 3 / 4, "recall": 1 / 3,
                               "caught": 1, "false_alarm_rate": 1 / 3, "false_alarms": 1, "median_lead": 0,
                               "left_out": 0}
    # counting only the collapses that stayed down, the recovered dip is left out of both sides
    assert table["stayed_down"]["totals"] == {"runs": 5, "collapsed": 2, "alarmed": 3, "precision": 2 / 3, "recall": 0.5,
                                              "caught": 1, "false_alarm_rate": 1 / 3, "false_alarms": 1,
                                              "median_lead": 0, "left_out": 1}
    assert table["recorded"]["alarmed"] == 2 and table["recorded"]["false_alarms"] == 1  # the real model's step 3
    assert table["notes"] == [f"{demo}: old seed 0: no alarm_trace (written before the trace was recorded); skipped"]
    markdown = format_markdown(table)
    # every fall: 1 of 3 caught; falls that stayed down: 1 of 2; false alarms on the runs that never fell: 1 of 3
    assert "| this rule, all runs | 6 | 3 (2) | 4 | 0.75 | 0.33 (1/3) | 0.50 (1/2) | 0.33 (1/3) | 0 |" in markdown
    assert table["stayed_down"]["previous"]["left_out"] == 1 and table["stayed_down"]["by_file"][demo]["runs"] == 4
    assert f"| {demo} | POPD | 0 | yes | 1 → 0.7 (recovered: final 1) | 20 | 70 (evaluation) |" in markdown
    # the previous rule (one EMA over every source, no persistence) fired at the first rise, 60, on the same trace
    assert f"| {demo} | TOPD | 0 | yes | 1 → 0.7 | 70 | 70 (evaluation) | 0 | 60 | 30 |" in markdown
    assert table["previous"]["alarmed"] == 4 and table["previous"]["median_lead"] == 10
    assert f"this rule, {real}" in markdown and "skipped" in markdown
    notable = format_markdown(table, rows="notable")  # collapsed or alarmed: not the quiet healthy OPD seed 1
    assert f"| {demo} | OPD | 0 |" in notable and f"| {demo} | OPD | 1 |" not in notable
    assert "| file | method |" not in format_markdown(table, rows="none")


def test_traces_rebuilt_from_logged_bins(tmp_path):
    """Results written before the trace existed: the late KL from the logged position bins (8 bins of L = 8)."""
    bins = lambda late: [0.1] * 6 + [late, late]  # noqa: E731
    record = {"horizons": [8, 2], "horizon": {"horizon": "anchored"},
              "kl_by_position": [{"step": 1, "horizon": 8, "positions": [i + 0.5 for i in range(8)], "kl": bins(0.2)},
                                 {"step": 2, "horizon": 2, "positions": [(i + 0.5) / 4 for i in range(8)],
                                  "kl": bins(0.3)}],
              "eval_kl_by_position": [{"step": 2, "horizon": 8, "positions": [i + 0.5 for i in range(8)],
                                       "kl": [0.1] * 6 + [None, 0.4]}]}
    assert trace_from_logs(record, L) == [
        {"step": 0, "source": "training", "horizon": 8, "late": 0.2, "rollouts": 0, "repeating": 0},
        {"step": 1, "source": "training", "horizon": 2, "late": None, "rollouts": 0, "repeating": 0},
        {"step": 2, "source": "evaluation", "horizon": 8, "late": 0.4, "rollouts": 0, "repeating": 0}]
    path = _write(tmp_path, "old.json", {"settings": {"max_completion_length": L}, "methods": [
        {**record, "name": "Anchored", "seed": 0, "curve": _curve([0.4, 1.0]), "alarm_events": []}]})
    assert detector_table([path])["rows"] == []
    rows = detector_table([path], from_logs=True)["rows"]
    assert len(rows) == 1 and rows[0]["approximate"]


def test_the_command_prints_the_table(tmp_path, capsys):
    path = _write(tmp_path, "r.json", {"methods": [_record("TOPD", 0, _curve([0.4, 1.0, 0.5]), DRIFT)]})
    table = main([path, "--factor", "3"])
    out = capsys.readouterr().out
    assert out.startswith("| alarm | runs |") and "| TOPD | 0 | yes |" in out
    assert table["totals"]["runs"] == 1
