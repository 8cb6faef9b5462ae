"""The student's keys and values kept per slot across steps (`rolling_student_memory`, issue 35): generation continues
from them exactly where the weights did not move, a refresh every step is exact rolling, with moving weights the
memory is stale by the age it logs, and bad settings fail at construction."""

import copy

import pytest
import torch
from testing_utils import logged, make_args, tiny_causal_lm

from horizon_opd import HorizonOPDTrainer, kv_cache
from horizon_opd.student_memory import StudentMemory


def _padded(contexts, pad_id=0):
    width = max(map(len, contexts))
    ids = torch.full((len(contexts), width), pad_id)
    mask = torch.zeros_like(ids)
    for b, c in enumerate(contexts):
        ids[b, width - len(c):] = torch.tensor(c)
        mask[b, width - len(c):] = 1
    return ids, mask, width


# ----------------------------------------------------------------------------------------------- the memory itself
def test_generation_from_the_memory_equals_generation_from_scratch_across_two_chunks():
    model = tiny_causal_lm(40, seed=0)
    memory = StudentMemory(model.config, budget=8)
    contexts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]
    for step in range(2):
        ids, mask, width = _padded(contexts)
        reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        cache, encoded = memory.cache_for(kv_cache.backbone(model), contexts, [0, 1, 2], width, step, pad_id=0)
        # the first step encodes every context but its last token; the second nothing (the memory holds them)
        assert encoded == (sum(len(c) - 1 for c in contexts) if step == 0 else 0)
        assert cache.get_seq_length() == width - 1
        with kv_cache.continuing_from(model, cache):
            continued = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        assert torch.equal(continued, reference)
        chunks = continued[:, width:].tolist()
        memory.write(cache, [0, 1, 2], contexts, chunks, width, step)
        contexts = [c + chunk for c, chunk in zip(contexts, chunks, strict=True)]
        assert [m.ids for m in memory.slots.values()] == [c[:-1] for c in contexts]
    assert "generate" not in vars(model)  # the override is gone
    mean, oldest = memory.ages(2)
    assert oldest == 2 and 1 < mean < 2  # the prompts were written at step 0, the first chunks at step 1


def test_the_memory_holds_the_weights_that_wrote_it_until_refreshed():
    model = tiny_causal_lm(40, seed=0)
    contexts = [[5, 6, 7, 8, 9], [12, 13, 14]]
    _, _, width = _padded(contexts)

    def keys(memory, step):
        cache, encoded = memory.cache_for(kv_cache.backbone(model), contexts, [0, 1], width, step, pad_id=0)
        return cache.layers[0].keys.clone(), encoded

    kept, refreshed = StudentMemory(model.config, budget=4), StudentMemory(model.config, budget=4, refresh_every=2)
    before, _ = keys(kept, 0)
    keys(refreshed, 0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # an optimizer step
    stale, encoded = keys(kept, 5)
    assert encoded == 0 and torch.equal(stale, before)  # kept as written, 5 steps later
    assert kept.ages(5) == (5.0, 5)
    again, encoded = keys(refreshed, 1)  # 1 step old: not yet due
    assert encoded == 0 and torch.equal(again, before)
    renewed, encoded = keys(refreshed, 2)  # 2 steps old: re-encoded under the moved weights
    assert encoded == 4 + 2 and not torch.allclose(renewed, before)
    assert refreshed.ages(2) == (0.0, 0)
    refreshed.drop([0])
    assert list(refreshed.slots) == [1]


# ----------------------------------------------------------------------------------------------- in training
def _train(tmp_path, student, teacher, tokenizer, prompts, **overrides):
    settings = dict(horizon="rolling", truncation_ratio=0.25, max_steps=6, gradient_accumulation_steps=2)
    settings.update(overrides)
    trainer = HorizonOPDTrainer(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teacher),
                                args=make_args(tmp_path, **settings), train_dataset=prompts,
                                processing_class=tokenizer)
    per_row = []
    observe = trainer.book.meters["train"].add_tokens

    def recording(per_token, mask, *args, **kwargs):
        per_row.append((per_token.detach() * mask).sum(-1).clone())
        return observe(per_token, mask, *args, **kwargs)

    trainer.book.meters["train"].add_tokens = recording
    trainer.train()
    return trainer, per_row


@pytest.mark.parametrize("setting", [dict(learning_rate=0.0), dict(learning_rate=1e-2, rolling_memory_refresh_every=1)],
                         ids=["frozen-weights", "refresh-every-step"])
def test_the_memory_is_exact_rolling_where_nothing_is_stale(setting, tmp_path, student, teacher, tokenizer, prompts):
    lr = setting["learning_rate"]
    exact, exact_rows = _train(tmp_path / "exact", student, teacher, tokenizer, prompts, learning_rate=lr)
    kept, kept_rows = _train(tmp_path / "kept", student, teacher, tokenizer, prompts, rolling_student_memory=True,
                             **setting)
    assert len(kept_rows) == len(exact_rows) == 6 * 2
    for a, b in zip(kept_rows, exact_rows, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert kept.cost.generated_tokens == exact.cost.generated_tokens
    if "rolling_memory_refresh_every" in setting:
        assert logged(kept, "rolling/memory_age_max") == [0.0] * 6
    else:  # nothing re-encoded: only new prompts and each row's last context token
        assert kept.cost.prefill_tokens < exact.cost.prefill_tokens / 2
        assert max(logged(kept, "rolling/memory_age_max")) >= 2


def test_the_memory_trains_on_stale_keys_and_logs_their_age(tmp_path, student, teacher, tokenizer, prompts):
    exact, exact_rows = _train(tmp_path / "exact", student, teacher, tokenizer, prompts, learning_rate=1e-2)
    kept, kept_rows = _train(tmp_path / "kept", student, teacher, tokenizer, prompts, learning_rate=1e-2,
                             rolling_student_memory=True)
    # L = 16, chunk 4: a memory is at most ceil(16 / 4) - 1 = 3 steps old; the first step holds only its prompts
    ages = logged(kept, "rolling/memory_age_max")
    assert ages[0] == 0 and 1 <= max(ages) <= 3
    assert all(0 <= m <= a for m, a in zip(logged(kept, "rolling/memory_age_mean"), ages, strict=True))
    assert kept.cost.prefill_tokens < exact.cost.prefill_tokens
    assert kept.cost.student_nograd_tokens == exact.cost.student_nograd_tokens == 0  # the loss reads generation's
    torch.testing.assert_close(kept_rows[0], exact_rows[0], atol=1e-5, rtol=1e-4)  # nothing stale yet
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(kept_rows, exact_rows, strict=True))


def test_a_resumed_memory_is_re_encoded_once(tmp_path, student, teacher, tokenizer, prompts):
    settings = dict(learning_rate=1e-2, rolling_student_memory=True, save_strategy="steps", save_steps=3)
    first, _ = _train(tmp_path / "run", student, teacher, tokenizer, prompts, **settings)
    trainer = HorizonOPDTrainer(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teacher),
                                args=make_args(tmp_path / "run", horizon="rolling", truncation_ratio=0.25,
                                               max_steps=6, gradient_accumulation_steps=2, **settings),
                                train_dataset=prompts, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert trainer.state.global_step == 6
    ages = logged(trainer, "rolling/memory_age_max")
    assert ages[0] == 0.0  # every context re-encoded under the resumed weights
    assert logged(first, "rolling/memory_age_max")[3] > 0  # where the uninterrupted run kept older keys


# ----------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("overrides, message", [
    (dict(horizon="truncated"), r"rolling_student_memory=True with horizon='truncated'"),
    (dict(rolling_student_cache=False), r"rolling_student_cache=False.*Set rolling_student_cache=True"),
    (dict(use_vllm=True, vllm_mode="server"), r"vllm_mode='server'.*vllm_mode='colocate'"),
    (dict(rolling_memory_refresh_every=0), r"rolling_memory_refresh_every=0 must be an integer >= 1"),
    (dict(rolling_student_memory=False, rolling_memory_refresh_every=2), r"without rolling_student_memory"),
])
def test_memory_settings_fail_at_construction(overrides, message, tmp_path):
    settings = dict(horizon="rolling", truncation_ratio=0.25, rolling_student_memory=True)
    settings.update(overrides)
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **settings)
