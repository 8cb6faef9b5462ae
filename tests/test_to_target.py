"""Cost to a target on hand-made curves: interpolation, a curve that crosses and comes back, never reached, reached at
step 0, lower-is-better metrics, seeds averaged, ratios and GPU pricing."""

import os
import sys

import pytest

from horizon_opd.to_target import cost_to_target, first_reach, mean_curve, to_target_table, value_at


def run(points, metric="accuracy", **costs_per_step):
    """A run whose cumulative costs grow linearly with the step: decode_iterations = step x rate, etc."""
    rates = {"decode_iterations": 10, "generated_tokens": 100, "trained_tokens": 100, "train_seconds": 2.0,
             **costs_per_step}
    return {"curve": [{"step": step, metric: value, "steps": step, **{k: step * r for k, r in rates.items()}}
                      for step, value in points]}


def test_first_reach_interpolates_between_evaluations():
    assert first_reach([(0, 0.2), (10, 0.6), (20, 1.0)], 0.8) == pytest.approx(15.0)
    assert first_reach([(0, 0.2), (10, 0.6)], 0.5) == pytest.approx(7.5)
    assert first_reach([(0, 0.2), (10, 0.6)], 0.6) == pytest.approx(10.0)  # reached exactly at an evaluation


def test_a_curve_that_crosses_and_comes_back_reached_it_at_its_first_crossing():
    assert first_reach([(0, 0.0), (10, 1.0), (20, 0.2), (30, 0.9)], 0.5) == pytest.approx(5.0)
    result = cost_to_target({"opd": [run([(0, 0.0), (10, 0.9)])], "falls": [run([(0, 0.0), (10, 1.0), (20, 0.1)])]},
                            "accuracy", True, reference="opd", targets={"0.9": 0.9})
    falls = next(r for r in result["rows"] if r["method"] == "falls")
    assert falls["reached"] and not falls["held"] and falls["steps"] == pytest.approx(9.0)
    assert " †" in "\n".join(to_target_table(result))  # flagged: it did not stay there


def test_never_reached_and_reached_at_step_zero():
    assert first_reach([(0, 0.1), (10, 0.3)], 0.5) is None
    assert first_reach([(0, 0.9), (10, 0.3)], 0.5) == 0.0


def test_lower_is_better():
    assert first_reach([(0, 3.0), (10, 1.0)], 2.0, higher_is_better=False) == pytest.approx(5.0)
    assert first_reach([(0, 3.0), (10, 2.5)], 2.0, higher_is_better=False) is None


def test_value_at_and_its_range():
    assert value_at([(0, 0.0), (10, 5.0), (20, 25.0)], 15) == pytest.approx(15.0)
    with pytest.raises(ValueError, match="outside"):
        value_at([(0, 0.0), (10, 5.0)], 11)


def test_mean_curve_averages_seeds_at_shared_steps_with_standard_error():
    curve = mean_curve([run([(0, 0.2), (10, 0.6), (20, 0.8)]), run([(0, 0.4), (10, 0.8)])], "accuracy")
    assert [p["step"] for p in curve] == [0, 10]  # step 20 is one seed's only
    assert curve[1]["accuracy"] == pytest.approx(0.7) and curve[1]["values"] == [0.6, 0.8]
    assert curve[1]["sem"] == pytest.approx(0.1)  # sd 0.1414 / sqrt(2)


def test_a_run_stopped_at_its_target_holds_its_last_value_and_costs():
    """Seeds of a run to a target stop at different evaluations: the one that stopped keeps its value and its costs,
    so the mean curve goes on to the last step of the others instead of ending at the first stop."""
    stopped = {**run([(0, 3.0), (10, 1.5), (20, 0.6)], metric="kl"), "stopped_at_target": True}
    going = run([(0, 3.0), (10, 2.0), (20, 1.2), (30, 0.8), (40, 0.5)], metric="kl")
    curve = mean_curve([stopped, going], "kl")
    assert [p["step"] for p in curve] == [0, 10, 20, 30, 40]
    assert curve[3]["kl"] == pytest.approx((0.6 + 0.8) / 2) and curve[3]["values"] == [0.6, 0.8]
    assert curve[4]["decode_iterations"] == pytest.approx((200 + 400) / 2)  # the stopped seed spent no more
    result = cost_to_target({"opd": [run([(0, 3.0), (20, 0.65)], metric="kl")], "rolling": [stopped, going]}, "kl",
                            False, reference="opd", targets={"0.65": 0.65})
    rolling = next(r for r in result["rows"] if r["method"] == "rolling")
    assert rolling["reached"] and rolling["steps"] == pytest.approx(30 + 10 * (0.7 - 0.65) / (0.7 - 0.55))
    # without the flag the early stop cuts the curve at step 20, where the mean (0.9) has not reached 0.65
    plain = mean_curve([{"curve": stopped["curve"]}, going], "kl")
    assert [p["step"] for p in plain] == [0, 10, 20]
    # a run that did not stop at its target still bounds the curve by its own last step
    assert [p["step"] for p in mean_curve([stopped, run([(0, 3.0), (10, 1.0)], metric="kl")], "kl")] == [0, 10]


def test_cost_to_target_default_targets_costs_ratios_and_gpu_seconds():
    runs = {
        "opd": [run([(0, 0.0), (10, 0.5), (20, 1.0)])],
        "topd": [run([(0, 0.0), (10, 0.25), (20, 0.5), (40, 1.0)], decode_iterations=1, train_seconds=0.5)],
        "flat": [run([(0, 0.0), (10, 0.3), (40, 0.4)])],
    }
    result = cost_to_target(runs, "accuracy", True, reference="opd",
                            gpu_seconds_per_step={"opd": {"engine": 6.0}, "topd": {"engine": 1.5}})
    assert result["targets"] == {"50%": pytest.approx(0.5), "100%": pytest.approx(1.0)}
    rows = {(r["target"], r["method"]): r for r in result["rows"]}
    opd, topd, flat = rows["100%", "opd"], rows["100%", "topd"], rows["100%", "flat"]
    assert opd["steps"] == 20 and topd["steps"] == 40
    assert topd["decode_iterations"] == 40 and opd["decode_iterations"] == 200
    assert topd["ratios"]["decode_iterations"] == pytest.approx(0.2)
    assert topd["ratios"]["train_seconds"] == pytest.approx(0.5)  # 20 s against 40 s
    assert topd["gpu_engine_seconds"] == 60 and topd["ratios"]["gpu_engine_seconds"] == pytest.approx(0.5)
    assert not flat["reached"] and flat["best"] == pytest.approx(0.4) and "ratios" not in flat
    assert rows["50%", "topd"]["steps"] == pytest.approx(20) and rows["50%", "opd"]["steps"] == pytest.approx(10)
    table = "\n".join(to_target_table(result))
    assert "not reached in 40 (best 0.4)" in table and "(0.20x)" in table and "GPU engine s" in table


def test_each_seed_reaches_the_target_on_its_own_curve_and_the_table_gives_their_spread():
    runs = {"opd": [run([(0, 0.0), (10, 1.0)]), run([(0, 0.0), (10, 0.6), (20, 1.0)])],
            "rolling": [run([(0, 0.0), (20, 0.8)]), run([(0, 0.0), (20, 0.2)]), run([(0, 0.0), (20, 1.0)])]}
    result = cost_to_target(runs, "accuracy", True, reference="opd", targets={"0.8": 0.8})
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["opd"]["seed_steps"] == [pytest.approx(8), pytest.approx(15)]
    assert rows["opd"]["steps"] == pytest.approx(10)  # the mean curve: 0.8 at step 10
    assert rows["rolling"]["seed_steps"] == [pytest.approx(20), None, pytest.approx(16)]
    assert not rows["rolling"]["reached"]  # the mean curve tops out at 0.667
    table = "\n".join(to_target_table(result))
    assert "| 8, 15 (0.80–1.50x) |" in table and "| 20, –, 16 (1.60–2.00x) |" in table


def test_cost_to_target_lower_is_better_with_explicit_target_and_refusals():
    runs = {"opd": [run([(0, 3.0), (10, 1.0)], metric="kl")], "rolling": [run([(0, 3.0), (10, 2.0), (20, 0.5)],
                                                                                metric="kl")]}
    result = cost_to_target(runs, "kl", False, reference="opd", targets={"kl 1.5": 1.5})
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["opd"]["steps"] == pytest.approx(7.5) and rows["rolling"]["steps"] == pytest.approx(10 + 10 / 3)
    with pytest.raises(ValueError, match="reference='full'"):
        cost_to_target(runs, "kl", False, reference="full")


# ----------------------------------------------------------------------------------------------- rolling's gap
def test_the_gap_table_averages_the_late_evaluations_then_the_seeds():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import rolling_gap  # torch-free

    def run(name, seed, values):
        return {"name": name, "seed": seed, "curve": [{"step": 20 * i, "accuracy": v} for i, v in enumerate(values)]}

    runs = {"base": [run("base", 0, [0.1, 0.5, 0.6, 0.8]), run("base", 1, [0.1, 0.5, 0.4, 0.6])],
            "fix": [run("fix", 0, [0.1, 0.9, 0.9, 0.7]), run("fix", 1, [0.1, 0.9, 1.0, 0.9])]}
    rows = {r["method"]: r for r in rolling_gap.gap_rows(runs, "accuracy", 40, "base")}
    # late means (steps 40, 60): base 0.7 and 0.5, fix 0.8 and 0.95
    assert rows["base"]["late"] == pytest.approx((0.6, 0.1))
    assert rows["fix"]["late"] == pytest.approx((0.875, 0.075))
    assert rows["fix"]["final"] == pytest.approx((0.8, 0.1))
    assert rows["fix"]["late_vs_baseline"] == pytest.approx((0.275, 0.125))
    assert "late_vs_baseline" not in rows["base"]
    with pytest.raises(ValueError, match="--baseline 'nope'"):
        rolling_gap.gap_rows(runs, "accuracy", 40, "nope")


# ----------------------------------------------------------------------------------------------- the tables' script
def test_the_to_target_script_builds_every_task_from_the_committed_runs_without_torch(tmp_path):
    """benchmarks/to_target.py loads horizon_opd/to_target.py from its file, so it regenerates the tables beside a
    training run without a second torch process (and in seconds); every task it lists has its results files."""
    import json
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "to_target.json"
    code = ("import runpy, sys; sys.argv = ['to_target.py', '--json', sys.argv[1]]; "
            "runpy.run_path('benchmarks/to_target.py', run_name='__main__'); "
            "assert 'torch' not in sys.modules, 'benchmarks/to_target.py imported torch'")
    subprocess.run([sys.executable, "-c", code, str(out)], cwd=root, check=True, capture_output=True, text=True)
    tasks = json.loads(out.read_text())["tasks"]
    assert "SmolLM2 L = 256, run to OPD's final KL" in tasks
    for result in tasks.values():
        opd = [row for row in result["rows"] if row["method"] == result["reference"]]
        assert opd and all(row["reached"] for row in opd)
