"""The embedded demo task, the bundled models, and the `horizon-opd` command."""

import json
import subprocess
import sys

import pytest

from horizon_opd import demo
from horizon_opd.demo.task import (
    CYCLE_LENGTH,
    MAX_COMPLETION_LENGTH,
    NUM_STEPS,
    NUM_VALUES,
    SUCCESSOR,
    accuracy,
    build_datasets,
    chain,
    completion_text,
    extract_answer,
)


def test_successor_table_is_cycles_of_100_so_chains_never_repeat():
    assert sorted(SUCCESSOR) == list(range(NUM_VALUES))
    for start in range(NUM_VALUES):
        x, seen = start, set()
        for _ in range(CYCLE_LENGTH):
            seen.add(x)
            x = SUCCESSOR[x]
        assert len(seen) == CYCLE_LENGTH and x == start


def test_chain_completion_and_scoring_by_hand():
    values = chain(5, steps=3)
    assert values == [SUCCESSOR[5], SUCCESSOR[SUCCESSOR[5]], SUCCESSOR[SUCCESSOR[SUCCESSOR[5]]]]
    text = completion_text(5, values)
    assert text == f"005 {values[0]:03d} {values[1]:03d} {values[2]:03d} = {values[2]:03d} "
    assert extract_answer(text) == f"{values[2]:03d}"
    assert extract_answer("012 034 =") is None
    assert accuracy([text, "007 = 099"], [f"{values[2]:03d}", "098"]) == 0.5


def test_splits_are_disjoint_prompt_only_and_fit_the_horizon():
    data = build_datasets()
    train, test = set(data["train"]["start"]), set(data["test"]["start"])
    assert len(train) == 300 and len(test) == 100 and not train & test
    assert data["test"][0]["prompt"][0]["role"] == "user"
    tokenizer = demo.build_char_tokenizer(number_tokens=NUM_VALUES)
    start = data["test"][0]["start"]
    ids = tokenizer(completion_text(start, chain(start)))["input_ids"]
    assert len(ids) == NUM_STEPS + 1 + 3 and len(ids) + 1 <= MAX_COMPLETION_LENGTH  # + EOS
    assert 80 <= len(ids) <= 250


def test_bundled_models_load_offline_and_differ_in_skill():
    student, teacher, tokenizer = demo.load_demo_models()
    assert tokenizer.chat_template and len(tokenizer) == student.config.vocab_size == teacher.config.vocab_size
    subset = build_datasets()["test"].select(range(40))
    teacher_acc = demo.evaluate_accuracy(teacher, tokenizer, subset)
    student_acc = demo.evaluate_accuracy(student, tokenizer, subset)
    assert teacher_acc >= 0.9, teacher_acc
    assert student_acc <= teacher_acc - 0.4, (student_acc, teacher_acc)


def test_quick_command_writes_results_and_plot(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "horizon_opd.cli", "--quick", "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert (out / "accuracy_vs_time.png").stat().st_size > 10_000
    for key in ("teacher_accuracy", "student_accuracy", "machine", "methods", "bars"):
        assert key in results
    names = [m["name"] for m in results["methods"]]
    assert names == ["OPD", "OPD matched rho=0.1", "TOPD rho=0.1", "TOPD rho=0.1 wide", "Rolling rho=0.1",
                     "Rolling rho=0.1 wide", "POPD linear 0.1->1", "Anchored rho=0.1 every 10", "Adaptive 0.1-1"]
    for m in results["methods"]:
        assert set(m) >= {"name", "horizon", "final_accuracy", "train_seconds", "tokens_generated",
                          "decode_iterations", "trained_tokens", "batch_size", "peak_memory_mb", "curve", "horizons",
                          "policy_state", "alarm_events"}
        assert 0.0 <= m["final_accuracy"] <= 1.0 and m["train_seconds"] > 0 and m["peak_memory_mb"] > 0
        assert [p["step"] for p in m["curve"]] == [0, 4, 8]
        assert all(0.0 <= p["accuracy"] <= 1.0 for p in m["curve"])
        # the curve carries the costs so far; a step decodes at most its horizon
        assert [p["decode_iterations"] for p in m["curve"]][0] == 0
        assert m["curve"][-1]["decode_iterations"] == m["decode_iterations"] <= sum(m["horizons"])
        if m["horizon"]["horizon"] != "rolling":  # no loss window: every generated token is trained
            assert m["trained_tokens"] == m["tokens_generated"] > 0
    by_name = {m["name"]: m for m in results["methods"]}
    # the token-matched baseline: OPD on ceil(0.1 x 8) = 1 prompt per step
    assert by_name["OPD matched rho=0.1"]["batch_size"] == 1 and by_name["OPD"]["batch_size"] == 8
    assert by_name["OPD matched rho=0.1"]["horizons"] == by_name["OPD"]["horizons"]
    # the wide methods: ceil(8 / 0.1) = 80 prompts (slots) per step, a chunk's decode iterations per step
    for name in ("TOPD rho=0.1 wide", "Rolling rho=0.1 wide"):
        wide = by_name[name]
        assert wide["batch_size"] == 80 and wide["decode_iterations"] <= results["settings"]["steps"] * 11
    # rolling starts a prompt only where a rollout ended: fewer than one per slot and step, none dropped
    rolling = by_name["Rolling rho=0.1 wide"]["counts"]
    assert 80 <= rolling["prompts_started"] < 80 * results["settings"]["steps"]
    assert rolling["student_nograd_tokens"] == 0 and rolling["teacher_tokens"] < rolling["prefill_tokens"]
    # the horizon is the cost: TOPD 0.1 generates at most ceil(0.1 L) tokens per rollout
    L = results["settings"]["max_completion_length"]
    steps, batch = results["settings"]["steps"], results["settings"]["batch_size"]
    assert by_name["TOPD rho=0.1"]["tokens_generated"] <= steps * batch * -(-L // 10)
    assert by_name["TOPD rho=0.1"]["tokens_generated"] < 0.3 * by_name["OPD"]["tokens_generated"]
    assert by_name["Anchored rho=0.1 every 10"]["horizons"] == [L] + [-(-L // 10)] * (steps - 1)
    assert by_name["Adaptive 0.1-1"]["horizons"][0] == L and by_name["Adaptive 0.1-1"]["horizon"]["horizon"] == \
        "adaptive"
    assert {r["method"] for r in results["bars"]["per_seed"]} == set(names)
    to_target = results["to_target"]  # each method's cost to OPD's accuracy at 50% and 100% of its steps
    assert set(to_target["targets"]) == {"50%", "100%"} and len(to_target["rows"]) == 2 * len(names)
    opd = next(r for r in to_target["rows"] if r["method"] == "OPD" and r["target"] == "100%")
    assert opd["reached"] and opd["ratios"]["decode_iterations"] == 1.0  # OPD reaches its own final accuracy
    assert "each cost as a multiple of OPD's" in proc.stdout
    assert "| OPD | 8 |" in proc.stdout and "decode iterations" in proc.stdout
    assert "distilling:" not in proc.stdout  # not a terminal: one line per run, no progress bar rewrites
    assert "OPD seed 0: accuracy" in proc.stdout


@pytest.mark.parametrize("argv, message", [
    (["--methods", "topdX"], "argument --methods: unknown method 'topdX'"),
    (["--methods", "popd-cosine"], "argument --methods: unknown method 'popd-cosine'"),
    (["--methods", "topd1.5"], "truncation_ratio=1.5 is outside"),
    (["--methods", "opd-matched"], "opd-matched<rho> needs a ratio"),
    (["--methods", "opd-matched2"], "the ratio 2 must be in (0, 1]"),
    (["--student", "/missing/dir"], "argument --student: '/missing/dir' is not a model directory"),
    (["--steps", "0"], "argument --steps: 0 must be >= 1"),
    (["--learning-rate", "-1"], "argument --learning-rate: -1.0 must be > 0"),
    (["--dataset", "/missing.jsonl"], "argument --dataset: '/missing.jsonl' does not exist"),
])
def test_bad_command_lines_get_one_line_and_status_2(argv, message, tmp_path, capsys):
    from horizon_opd.cli import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--output-dir", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # bad input writes nothing


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "only one"}], "has 1 row(s); it needs at least 2"),
    ([{"question": "a"}, {"question": "b"}], "has no 'prompt' column"),
])
def test_bad_datasets_are_named_before_anything_runs(rows, message, tmp_path, capsys):
    from horizon_opd.cli import run

    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(SystemExit) as exit_info:
        run(["--dataset", str(path), "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
