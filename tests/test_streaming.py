"""Streamed prompts (`IterableDataset`, as TRL's DistillationTrainer takes them): every horizon policy but "rolling"
trains on a stream, evaluation reads one in every form TRL takes, the remote teacher measures one, the CLI streams a
.jsonl file; a stream without max_steps or without usable prompts is refused at construction, before any model loads."""

import json
import math
from collections import Counter

import pytest
from datasets import Dataset, IterableDataset, IterableDatasetDict
from testing_utils import POLICY_SETTINGS, logged, make_args, record_generations

from horizon_opd import HorizonOPDTrainer
from horizon_opd.horizon import HORIZON_POLICIES
from horizon_opd.teacher_server import serve_teacher

POLICIES = POLICY_SETTINGS
MISSING_TEACHER = "/nonexistent/teacher"  # a teacher path that fails to load: the check must come first


def _trainer(tmp_path, student, teacher, tokenizer, train, eval_dataset=None, **overrides):
    return HorizonOPDTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, **overrides),
                             train_dataset=train, eval_dataset=eval_dataset, processing_class=tokenizer)


def _prompts_of(records, tokenizer) -> Counter:
    return Counter(p for r in records for p in tokenizer.batch_decode(r["prompt_ids"], skip_special_tokens=True))


def test_every_policy_but_rolling_is_covered():
    assert set(POLICIES) == set(HORIZON_POLICIES) - {"rolling"}


@pytest.mark.parametrize("policy", list(POLICIES))
def test_every_policy_trains_on_a_stream(policy, tmp_path, student, teacher, tokenizer, prompts):
    trainer = _trainer(tmp_path, student, teacher, tokenizer, prompts.to_iterable_dataset(), max_steps=2,
                       **POLICIES[policy])
    records = record_generations(trainer)
    trainer.train()
    assert trainer.state.global_step == 2 and len(trainer.horizon_history) == 2
    assert [r["horizon"] for r in records] == trainer.horizon_history
    for record in records:
        assert record["completion_mask"].sum(1).max().item() <= record["horizon"] <= 16
    assert logged(trainer, "horizon/tokens") == [float(h) for h in trainer.horizon_history]
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))
    # 2 steps x 8 prompts: one pass over the 16-row stream, each row once (TRL's buffered shuffle)
    assert _prompts_of(records, tokenizer) == Counter(prompts["prompt"])


def test_the_check_peeks_at_a_stream_without_consuming_it(tmp_path, student, teacher, tokenizer, prompts):
    trainer = _trainer(tmp_path, student, teacher, tokenizer, prompts.to_iterable_dataset(), max_steps=1,
                       shuffle_dataset=False)
    records = record_generations(trainer)
    trainer.train()
    first = tokenizer.batch_decode(records[0]["prompt_ids"], skip_special_tokens=True)
    assert first == prompts["prompt"][:8]  # training starts at the row the check read


@pytest.mark.parametrize("form", ["stream", "IterableDatasetDict", "dict of streams", "dict of stream and Dataset"])
def test_evaluation_reads_a_stream_in_every_form(form, tmp_path, student, teacher, tokenizer, prompts):
    stream = prompts.select(range(8)).to_iterable_dataset()
    eval_dataset = {"stream": stream, "IterableDatasetDict": IterableDatasetDict(a=stream, b=stream),
                    "dict of streams": {"a": stream, "b": stream},
                    "dict of stream and Dataset": {"a": stream, "b": prompts.select(range(8))}}[form]
    trainer = _trainer(tmp_path, student, teacher, tokenizer, prompts.to_iterable_dataset(), eval_dataset,
                       max_steps=2, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=8,
                       horizon="truncated", truncation_ratio=0.25)
    assert trainer.eval_dataset is eval_dataset
    trainer.train()
    names = ["eval_loss"] if form == "stream" else ["eval_a_loss", "eval_b_loss"]
    evaluations = [e for e in trainer.state.log_history if any(name in e for name in names)]
    assert [name for e in evaluations for name in names if name in e] == names
    for entry, name in zip(evaluations, names, strict=True):
        assert math.isfinite(entry[name])
        assert entry["eval_horizon/tokens"] == 16  # evaluation rolls out to L whatever the training horizon
        assert 1 <= entry["eval_completions/mean_length"] <= entry["eval_completions/max_length"] <= 16
    assert trainer.horizon_history == [4, 4]


def test_a_stream_without_max_steps_is_refused_naming_the_fix(tmp_path, student, teacher, tokenizer, prompts):
    with pytest.raises(ValueError, match=r"train_dataset is an IterableDataset .*num_train_epochs=3 .*max_steps=-1 "
                                         r"is not set\. Set max_steps"):
        _trainer(tmp_path, student, MISSING_TEACHER, tokenizer, prompts.to_iterable_dataset(), max_steps=-1)
    # an eval stream needs no max_steps: evaluation ends where the stream does
    _trainer(tmp_path, student, teacher, tokenizer, prompts, prompts.to_iterable_dataset(), max_steps=-1)


def _empty():
    yield from ()


@pytest.mark.parametrize(
    "make, message",
    [
        # a map hides the columns (column_names None) until a row is read
        (lambda: Dataset.from_dict({"question": ["1+1"]}).to_iterable_dataset().map(lambda row: row),
         r"train_dataset has no 'prompt' column \(found columns: \['question'\]\)"),
        (lambda: Dataset.from_dict({"prompt": [[1, 2]]}).to_iterable_dataset(),
         r"train_dataset\['prompt'\]\[0\] is a list .* must be a string or a list of chat messages"),
        (lambda: IterableDataset.from_generator(_empty), r"train_dataset has no rows"),
    ],
    ids=["no prompt column", "prompt not text", "empty"],
)
def test_a_stream_without_usable_prompts_is_refused_before_models_load(make, message, tmp_path, student, tokenizer):
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path, student, MISSING_TEACHER, tokenizer, make(), max_steps=2)


def test_an_eval_stream_without_usable_prompts_is_refused_naming_its_key(tmp_path, student, tokenizer, prompts):
    bad = Dataset.from_dict({"question": ["1+1"]}).to_iterable_dataset()
    with pytest.raises(ValueError, match=r"eval_dataset\['b'\] has no 'prompt' column"):
        _trainer(tmp_path, student, MISSING_TEACHER, tokenizer, prompts,
                 IterableDatasetDict(a=prompts.to_iterable_dataset(), b=bad))


# ----------------------------------------------------------------------------------------------- remote teacher
def test_remote_teacher_trains_and_evaluates_on_streams(tmp_path, student, teacher, tokenizer, prompts):
    with serve_teacher(teacher, tokenizer, port=0) as server:
        args = make_args(tmp_path, teacher_model_server_url=server.url, loss_type="sampled", max_steps=2,
                         per_device_eval_batch_size=8)
        trainer = HorizonOPDTrainer(model=student, args=args, train_dataset=prompts.to_iterable_dataset(),
                                    eval_dataset=prompts.select(range(8)).to_iterable_dataset(),
                                    processing_class=tokenizer)
        trainer.train()
        metrics = trainer.evaluate()
    assert trainer.state.global_step == 2 and all(math.isfinite(v) for v in logged(trainer, "loss"))
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_completions/max_length"] <= 16
    assert 0 < trainer.teacher_scored_tokens


def test_remote_teacher_measures_a_streams_prompts_against_max_model_len(tmp_path, student, teacher, tokenizer,
                                                                         prompts):
    teacher.config.max_position_embeddings = 24  # what the loopback server reports as max_model_len
    lengths = [len(ids) for ids in tokenizer(list(prompts["prompt"]))["input_ids"]]
    longest = max(lengths)
    with serve_teacher(teacher, tokenizer, port=0) as short:
        args = make_args(tmp_path, teacher_model_server_url=short.url, loss_type="sampled", max_steps=2)
        with pytest.raises(ValueError, match=rf"the longest prompt \({longest} tokens: prompt "
                                             rf"{lengths.index(longest)} of train_dataset\)"):
            HorizonOPDTrainer(model=student, args=args, train_dataset=prompts.to_iterable_dataset(),
                              processing_class=tokenizer)


# ----------------------------------------------------------------------------------------------- command line
def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_streamed_jsonl_holds_out_its_head_and_streams_the_rest(tmp_path):
    from horizon_opd.demo import load_prompt_dataset

    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{i} + 1 =", "answer": str(i + 1)} for i in range(10)])
    data = load_prompt_dataset(str(path), streaming=True, held_out=4)
    assert isinstance(data["train"], IterableDataset) and isinstance(data["test"], Dataset)
    assert data["test"]["prompt"] == [f"{i} + 1 =" for i in range(4)]
    assert [row["prompt"] for row in data["train"]] == [f"{i} + 1 =" for i in range(4, 10)]
    with pytest.raises(ValueError, match=r"has 4 row\(s\), all held out"):
        load_prompt_dataset(str(_write_jsonl(tmp_path / "short.jsonl", [{"prompt": "x"}] * 4)), streaming=True,
                            held_out=4)


def test_cli_streams_a_jsonl_dataset(tmp_path):
    from horizon_opd import demo
    from horizon_opd.cli import run

    rows = demo.build_datasets()["test"].select(range(24)).to_list()
    path = _write_jsonl(tmp_path / "task.jsonl", rows)
    results = run(["--quick", "--dataset", str(path), "--streaming", "--methods", "topd0.1", "--steps", "2",
                   "--batch-size", "4", "--eval-every", "2", "--eval-size", "4", "--max-completion-length", "16",
                   "--output-dir", str(tmp_path / "out")])
    assert results["settings"]["eval_prompts"] == 4
    for record in results["methods"]:
        assert record["horizons"] == [2, 2]  # ceil(0.1 * 16)
        assert 0 < record["tokens_generated"] <= 2 * 4 * 16 and 0.0 <= record["final_accuracy"] <= 1.0


@pytest.mark.parametrize("dataset", [None, "dir"], ids=["no dataset", "save_to_disk directory"])
def test_cli_streaming_needs_a_json_file(dataset, tmp_path, capsys):
    from horizon_opd.cli import parse_args

    argv = ["--streaming"] + ([] if dataset is None else ["--dataset", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert "argument --streaming: streams a .json/.jsonl --dataset" in capsys.readouterr().err


def test_a_dataset_smaller_than_one_generation_batch_is_refused_before_models_load(tmp_path, prompts):
    args = make_args(tmp_path, per_device_train_batch_size=16, gradient_accumulation_steps=2)  # 32 > 16 rows
    with pytest.raises(ValueError, match=r"train_dataset has 16 rows, fewer than one generation batch of 32"):
        HorizonOPDTrainer(model="no/such-student", teacher_model="no/such-teacher", args=args,
                          train_dataset=prompts)
