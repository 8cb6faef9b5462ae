"""The second embedded task (`horizon_opd.demo.mismatch`): regions, exits, the supervised examples, and a small pair
built and compared end to end."""

import json
import random

import pytest

from horizon_opd.demo import mismatch as mm
from horizon_opd.demo.task import completion_text, extract_answer
from horizon_opd.demo.tokenizer import build_char_tokenizer


def test_each_region_is_one_cycle_and_chains_stay_in_their_region():
    for offset in (0, mm.REGION_SIZE):
        x, seen = offset, set()
        for _ in range(mm.REGION_SIZE):
            seen.add(x)
            x = mm.SUCCESSOR[x]
        assert x == offset and seen == set(range(offset, offset + mm.REGION_SIZE))
    values = mm.walk(3)
    assert len(values) == mm.CHAIN_STEPS and len(set(values)) == mm.CHAIN_STEPS and max(values) < mm.REGION_SIZE
    assert values[:2] == [mm.SUCCESSOR[3], mm.SUCCESSOR[mm.SUCCESSOR[3]]]


def test_exits_lead_from_region_a_into_region_b_and_bad_levels_are_refused():
    table = mm.exits(10, seed=0)
    assert len(table) == 10 and all(x < mm.REGION_SIZE <= b < mm.NUM_VALUES for x, b in table.items())
    assert mm.exits(10, seed=0) == table and mm.exits(0) == {}
    for bad in (-1, mm.REGION_SIZE + 1):
        with pytest.raises(ValueError, match=f"mismatch={bad}"):
            mm.exits(bad)


def test_bad_command_line_values_end_with_one_line_and_status_2(tmp_path, capsys):
    for argv, match in ((["--levels", "3", "101"], "--levels: mismatch=101 must be in [0, 100]"),
                        (["--steps", "0"], "--steps must be a positive integer, got 0")):
        with pytest.raises(SystemExit) as exit_info:
            mm.main([*argv, "--output-dir", str(tmp_path / "never")])
        assert exit_info.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_a_chain_leaves_at_an_exit_at_the_exit_rate_and_then_follows_region_b():
    x = 0
    table = {x: mm.REGION_SIZE + 5}
    rng = random.Random(0)
    left = 0
    for _ in range(2000):
        values = mm.walk(x, rng, table, steps=3)
        if values[0] >= mm.REGION_SIZE:
            left += 1
            assert values[1:] == [mm.SUCCESSOR[values[0]], mm.SUCCESSOR[mm.SUCCESSOR[values[0]]]]
    assert abs(left / 2000 - mm.EXIT_RATE) < 0.04


def test_teacher_examples_never_show_region_b_and_student_examples_do():
    tokenizer = build_char_tokenizer(number_tokens=mm.NUM_VALUES)
    b_ids = set(tokenizer.convert_tokens_to_ids([f"{v:03d} " for v in range(mm.REGION_SIZE, mm.NUM_VALUES)]))
    rng = random.Random(0)
    teacher = [mm.example(rng, tokenizer, None, mm.CORRUPT_PROB) for _ in range(200)]
    assert not any(set(ids) & b_ids for ids, _ in teacher)
    assert len({len(ids) for ids, _ in teacher}) == 1  # one length: batches stack without padding
    corrupted = sum(1 for ids, w in teacher if 0.0 in w[w.index(1.0):])
    assert 0.08 < corrupted / 200 < 0.25  # CORRUPT_PROB of the chains carry one masked value
    student = [mm.example(rng, tokenizer, mm.exits(30), 0.0) for _ in range(200)]
    assert sum(bool(set(ids) & b_ids) for ids, _ in student) > 150


def test_answers_are_the_last_value_of_the_chain_inside_region_a():
    data = mm.build_datasets()
    assert len(data["train"]) == 60 and len(data["test"]) == 40
    assert not set(data["train"]["start"]) & set(data["test"]["start"])
    row = data["test"][0]
    assert row["answer"] == f"{mm.walk(row['start'])[-1]:03d}"
    text = completion_text(row["start"], mm.walk(row["start"]))
    assert text.endswith(f"= {row['answer']} ")
    assert extract_answer(text) == row["answer"]
    tokenizer = build_char_tokenizer(number_tokens=mm.NUM_VALUES)
    assert len(tokenizer(text)["input_ids"]) + 1 <= mm.MAX_COMPLETION_LENGTH


@pytest.mark.slow
def test_a_built_pair_has_a_reliable_teacher_in_a_only_and_the_comparison_reports_time_to_90(tmp_path):
    """A short build (the real one trains 600 steps): the teacher already knows region A and not B; then the default
    methods run 2 steps each on a pair built in 30 steps and the summary holds every level, method and seed."""
    student, teacher, tokenizer = mm.build_pair(10, steps=250, log=lambda *_: None)
    teacher_a, teacher_b = (mm.region_accuracy(teacher, tokenizer, r, rollouts=16) for r in "AB")
    assert teacher_a > 0.9 and teacher_b < 0.2, (teacher_a, teacher_b)
    with pytest.raises(ValueError, match="region='C'"):
        mm.region_accuracy(teacher, tokenizer, "C")

    mm.main(["--levels", "10", "--seeds", "0", "--steps", "2", "--eval-every", "1", "--batch-size", "4",
             "--build-steps", "30", "--output-dir", str(tmp_path)])
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [(r["mismatch"], r["method"]) for r in rows] == [
        (10, "OPD"), (10, "OPD matched rho=0.1"), (10, "POPD linear 0.1->1"), (10, "TOPD rho=0.1"),
        (10, "Rolling rho=0.1"), (10, "OPD sequence-level")]
    assert all(len(r["final_accuracy"]) == 1 for r in rows)
    results = json.loads((tmp_path / "m10" / "results.json").read_text())
    assert results["settings"]["mismatch"] == 10 and "teacher_A" in results["settings"]["region_accuracy"]
    assert (tmp_path / "summary.png").stat().st_size > 10_000
