"""Several teachers in one run (`horizon_opd/teachers.py`): each row's positions scored by its own teacher, with the
same loss and normalisation as one teacher; local and served teachers side by side; every horizon policy; refusals;
per-teacher logs and ledger; resume."""

import copy
import math

import pytest
import torch
from datasets import Dataset
from testing_utils import (
    POLICY_SETTINGS,
    logged,
    loss_and_grads,
    make_args,
    record_generations,
    tiny_causal_lm,
)

from horizon_opd import HorizonOPDConfig, HorizonOPDTrainer
from horizon_opd.export import distillation_section
from horizon_opd.teacher_server import serve_teacher

NAMES = ["a", "b"]


@pytest.fixture
def routed_prompts():
    """16 prompts, alternating between teachers a and b (so every micro-batch of 4 mixes them)."""
    return Dataset.from_dict({"prompt": [f"{i} + {i + 1} =" for i in range(16)],
                              "teacher_id": [NAMES[i % 2] for i in range(16)]})


@pytest.fixture
def teachers(tokenizer):
    return {"a": tiny_causal_lm(len(tokenizer), hidden_size=48, seed=1),
            "b": tiny_causal_lm(len(tokenizer), hidden_size=40, seed=2)}


def _trainer(tmp_path, student, teacher_model, tokenizer, dataset, **overrides):
    return HorizonOPDTrainer(model=student, teacher_model=teacher_model, args=make_args(tmp_path, **overrides),
                             train_dataset=dataset, processing_class=tokenizer)


def _rows(batch: dict, rows: torch.Tensor) -> dict:
    """The batch restricted to `rows` (every per-row tensor), keeping the batch-wide normaliser."""
    size = batch["completion_ids"].size(0)
    return {k: (v[rows] if torch.is_tensor(v) and v.dim() > 0 and v.size(0) == size else v) for k, v in batch.items()}


def _assert_sum(routed, parts):
    """The routed loss and gradients equal the sum of each teacher's alone (each normalised by the whole batch)."""
    loss, grads = routed
    torch.testing.assert_close(loss, sum(p[0] for p in parts), atol=1e-5, rtol=1e-5)
    assert len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads[name], sum(p[1][name] for p in parts), atol=1e-5, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------------------------- each row, its teacher
@pytest.mark.parametrize("loss_type", ["reverse_kl", "sampled"])
def test_each_rows_loss_and_gradients_are_its_own_teachers(loss_type, tmp_path, student, teachers, tokenizer,
                                                          routed_prompts):
    routed = _trainer(tmp_path / "routed", copy.deepcopy(student), teachers, tokenizer, routed_prompts,
                      loss_type=loss_type)
    assert routed.teacher_names == NAMES and routed.teacher_model is None
    routed.model.train()
    batch = routed._generate_and_score_completions([routed_prompts[i] for i in range(8)])
    assert batch["teacher_index"].tolist() == [0, 1] * 4  # the rows' teachers, in the rows' order
    assert batch["completion_mask"].sum() > 8 and not batch["completion_mask"].all()  # multi-token, ragged
    batch["num_items_in_batch"] = batch["completion_mask"].sum().float()  # one normaliser for the whole batch
    parts = []
    for index, name in enumerate(NAMES):
        alone = _trainer(tmp_path / name, copy.deepcopy(student), teachers[name], tokenizer, routed_prompts,
                         loss_type=loss_type)
        alone.model.train()
        parts.append(loss_and_grads(alone, _rows(batch, (batch["teacher_index"] == index).nonzero().squeeze(1))))
    _assert_sum(loss_and_grads(routed, batch), parts)
    # a batch routed to one teacher only equals that teacher's trainer on it
    only_b = _rows(batch, (batch["teacher_index"] == 1).nonzero().squeeze(1))
    _assert_sum(loss_and_grads(routed, only_b), [parts[1]])


def test_a_local_and_a_served_teacher_route_their_own_rows(tmp_path, student, teachers, tokenizer, routed_prompts):
    with serve_teacher(copy.deepcopy(teachers["b"]), tokenizer, port=0, model_name="teacher-b") as server:
        received = []
        complete = server.complete
        server.complete = lambda request: (received.extend(request["prompt"]), complete(request))[1]
        routed = _trainer(tmp_path / "routed", copy.deepcopy(student), {"a": teachers["a"]}, tokenizer,
                          routed_prompts, loss_type="sampled", teacher_model_server_url={"b": server.url})
        assert [(t.name, t.server is not None) for t in routed.teachers] == [("a", False), ("b", True)]
        routed.model.train()
        batch = routed._generate_and_score_completions([routed_prompts[i] for i in range(8)])
        batch["num_items_in_batch"] = batch["completion_mask"].sum().float()
        result = loss_and_grads(routed, batch)
        # only teacher b's rows went to the server: 4 of the 8
        assert len(received) == 4
        parts = []
        for index, name in enumerate(NAMES):
            alone = _trainer(tmp_path / name, copy.deepcopy(student), teachers[name], tokenizer, routed_prompts,
                             loss_type="sampled")
            alone.model.train()
            parts.append(loss_and_grads(alone, _rows(batch, (batch["teacher_index"] == index).nonzero().squeeze(1))))
        _assert_sum(result, parts)

        received.clear()
        trainer = _trainer(tmp_path / "train", copy.deepcopy(student), {"a": teachers["a"]}, tokenizer,
                           routed_prompts, loss_type="sampled", teacher_model_server_url={"b": server.url},
                           max_steps=2)
        trainer.train()
    b_tokens = trainer.cost.teachers["b"]["teacher_tokens"]
    assert b_tokens == trainer.teacher_scored_tokens > 0  # the server scored exactly teacher b's training tokens
    assert trainer.cost.teachers["a"]["teacher_tokens"] > 0
    section = distillation_section(trainer, None)
    assert "a: " in section and "`teacher-b` served at" in section and "`teacher_id`" in section


# ----------------------------------------------------------------------------------------------- every policy
@pytest.mark.parametrize("mode", [*POLICY_SETTINGS, "rolling"])
def test_every_policy_trains_with_two_teachers_and_logs_each(mode, tmp_path, student, teachers, tokenizer,
                                                              routed_prompts):
    settings = dict(POLICY_SETTINGS.get(mode, {"horizon": "rolling", "truncation_ratio": 0.25}))
    data = routed_prompts
    if mode == "rolling":  # 3 of 4 prompts go to teacher a: the shares differ
        data = Dataset.from_dict({"prompt": routed_prompts["prompt"], "teacher_id": ["a", "a", "a", "b"] * 4})
    trainer = _trainer(tmp_path, student, teachers, tokenizer, data, **settings)
    batches = record_generations(trainer)
    trainer.train()
    assert trainer.state.global_step == 4
    for batch in batches:  # every row carries its own prompt's teacher (a rolled chunk: its rollout's prompt's)
        for b in range(batch["prompt_ids"].size(0)):
            text = tokenizer.decode(batch["prompt_ids"][b][batch["prompt_mask"][b].bool()], skip_special_tokens=True)
            owners = [t for p, t in zip(data["prompt"], data["teacher_id"], strict=True) if text.startswith(p)]
            assert len(owners) == 1 and NAMES[int(batch["teacher_index"][b])] == owners[0], text
    ledger = trainer.cost
    assert sum(t["trained_tokens"] for t in ledger.teachers.values()) == ledger.trained_tokens
    assert sum(t["teacher_tokens"] for t in ledger.teachers.values()) == ledger.teacher_tokens
    shares = [logged(trainer, f"teachers/{name}/share") for name in NAMES]
    assert all(a + b == pytest.approx(1.0) for a, b in zip(*shares, strict=True))
    kls = [logged(trainer, f"teachers/{name}/kl") for name in NAMES]
    for kl, share in zip(kls, shares, strict=True):  # a teacher with no rows in a step has no KL there
        assert all((v is None) == (s == 0) and (v is None or (math.isfinite(v) and v >= 0))
                   for v, s in zip(kl, share, strict=True))
    if mode == "rolling":
        assert sum(shares[0]) / len(shares[0]) > 0.6  # teacher a's rows are 3 in 4


def test_per_teacher_kl_is_the_token_weighted_mean_of_its_rows(tmp_path, student, teachers, tokenizer,
                                                                routed_prompts):
    trainer = _trainer(tmp_path, student, teachers, tokenizer, routed_prompts, max_steps=2)
    records = []
    observe = trainer.horizon_policy.observe
    trainer.horizon_policy.observe = lambda record: (records.append(record), observe(record))
    trainer.train()
    for record in records:
        (kl_a, n_a, _), (kl_b, n_b, _) = record.teacher_sums
        assert n_a + n_b == pytest.approx(sum(record.kl_counts))
        assert kl_a + kl_b == pytest.approx(sum(record.kl_sums), rel=1e-9)
        assert n_a > 0 and n_b > 0


# ----------------------------------------------------------------------------------------------- refusals
def test_refusals_name_the_teacher_the_value_and_the_fix(tmp_path, student, teachers, tokenizer, routed_prompts,
                                                         prompts):
    def build(teacher_model, dataset=routed_prompts, **overrides):
        return _trainer(tmp_path, copy.deepcopy(student), teacher_model, tokenizer, dataset, **overrides)

    with pytest.raises(ValueError, match=r"train_dataset has no 'teacher_id' column .*add_column"):
        build(teachers, dataset=prompts)
    with pytest.raises(ValueError, match=r"names the teacher 'c', which is not one of the teachers given \(\['a', 'b'\]\)"):
        build(teachers, dataset=Dataset.from_dict({"prompt": ["1 ="] * 8, "teacher_id": ["a"] * 7 + ["c"]}))
    with pytest.raises(ValueError, match=r"\['a'\] are in both teacher_model and teacher_model_server_url"):
        build(teachers, loss_type="sampled", teacher_model_server_url={"a": "http://127.0.0.1:9"})
    with pytest.raises(ValueError, match="one unnamed teacher beside named ones"):
        build(teachers["a"], loss_type="sampled", teacher_model_server_url={"b": "http://127.0.0.1:9"})
    with pytest.raises(ValueError, match=r"teacher_model=\{\} names no teacher"):
        build({})
    with pytest.raises(ValueError, match=r"topk_reverse_kl' reads a teacher server's top-k, but the teacher\(s\) "
                                         r"\['a', 'b'\] are local"):
        build(teachers, loss_type="topk_reverse_kl", teacher_model_server_url={"c": "http://127.0.0.1:9"})
    wrong_vocab = tiny_causal_lm(len(tokenizer) - 5, hidden_size=40, seed=2)
    with pytest.raises(ValueError, match=r"Teacher 'b': The student has vocab_size"):
        build({"a": teachers["a"], "b": wrong_vocab})
    with pytest.raises(ValueError, match=r"eval_dataset has no 'teacher_id' column"):
        HorizonOPDTrainer(model=copy.deepcopy(student), teacher_model=teachers, args=make_args(tmp_path),
                          train_dataset=routed_prompts, eval_dataset=prompts, processing_class=tokenizer)
    # a custom column name
    renamed = routed_prompts.rename_column("teacher_id", "expert")
    assert build(teachers, dataset=renamed, teacher_id_column="expert").teacher_names == NAMES
    with pytest.raises(ValueError, match="teacher_model_server_url\\['b'\\]='localhost' is not an http"):
        HorizonOPDConfig(output_dir=str(tmp_path), loss_type="sampled", teacher_model_server_url={"b": "localhost"})


def test_a_streams_row_naming_an_unknown_teacher_fails_at_its_batch(tmp_path, student, teachers, tokenizer):
    rows = {"prompt": [f"{i} =" for i in range(16)], "teacher_id": ["a", "b"] * 4 + ["a", "zed"] * 4}
    trainer = _trainer(tmp_path, student, teachers, tokenizer, Dataset.from_dict(rows).to_iterable_dataset(),
                       max_steps=4)
    with pytest.raises(ValueError, match=r"names the teacher 'zed' in 'teacher_id', which is not one of"):
        trainer.train()


def test_a_json_object_on_the_command_line_names_the_servers(tmp_path):
    args = HorizonOPDConfig(output_dir=str(tmp_path), loss_type="sampled",
                            teacher_model_server_url='{"math": "http://127.0.0.1:8000", "code": "http://h:1"}')
    assert args.teacher_server_urls() == {"math": "http://127.0.0.1:8000", "code": "http://h:1"}


# ----------------------------------------------------------------------------------------------- resume
def test_resume_mid_rolling_keeps_each_rollouts_teacher(tmp_path, student, teachers, tokenizer):
    data = Dataset.from_dict({"prompt": [f"{i} + {i + 1} =" for i in range(64)],
                              "teacher_id": [NAMES[(i // 3) % 2] for i in range(64)]})
    settings = dict(horizon="rolling", truncation_ratio=0.25, max_steps=6, save_strategy="steps", save_steps=3)
    first = _trainer(tmp_path, copy.deepcopy(student), copy.deepcopy(teachers), tokenizer, data, **settings)
    uninterrupted = record_generations(first)
    first.train()
    resumed = _trainer(tmp_path, student, teachers, tokenizer, data, **settings)
    replayed = record_generations(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    for a, b in zip(uninterrupted[3:], replayed, strict=True):
        for key in ("completion_ids", "completion_offsets", "teacher_index"):
            assert torch.equal(a[key], b[key]), key
    assert logged(resumed, "loss")[-3:] == pytest.approx(logged(first, "loss")[-3:], abs=1e-6)
    assert logged(resumed, "teachers/b/kl")[-3:] == pytest.approx(logged(first, "teachers/b/kl")[-3:], abs=1e-6)
    for name in NAMES:  # the per-teacher ledger is checkpoint state (the cached teacher tokens are re-encoded)
        assert resumed.cost.teachers[name]["trained_tokens"] == first.cost.teachers[name]["trained_tokens"]
