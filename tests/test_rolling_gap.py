"""What rolling's gap is made of (issue 35, item 3): `rolling_context_grad` (the context's forward with grad) changes
the gradient and not the loss, the diagnostic's resampled contexts (`horizon_opd/demo/rolling_gap.py`) keep each
rollout's depth and are drawn anew, and `+memory` / `+refresh<k>` / `+resample` / `+grad` build the methods they name;
`rolling_context_grad` fails at construction where it cannot apply."""

import copy

import pytest
import torch
from testing_utils import loss_and_grads, make_args, record_generations

from horizon_opd import HorizonOPDTrainer
from horizon_opd.demo.compare import method
from horizon_opd.demo.rolling_gap import ResampledContextTrainer


def _trainer(cls, tmp_path, student, teacher, tokenizer, prompts, **overrides):
    settings = dict(horizon="rolling", truncation_ratio=0.25, max_steps=4, gradient_accumulation_steps=1)
    settings.update(overrides)
    return cls(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teacher), args=make_args(tmp_path, **settings),
               train_dataset=prompts, processing_class=tokenizer)


def test_the_context_with_grad_changes_the_gradient_not_the_loss(tmp_path, student, teacher, tokenizer, prompts):
    truncated = _trainer(HorizonOPDTrainer, tmp_path / "t", student, teacher, tokenizer, prompts,
                         rolling_student_cache=False, max_steps=3)
    records = record_generations(truncated)
    truncated.train()
    batch = {k: v for k, v in records[-1].items() if k not in ("step", "horizon")}
    assert batch["completion_offsets"].gt(0).any()  # some rows continue a rollout: they have a context to train
    full = _trainer(HorizonOPDTrainer, tmp_path / "g", student, teacher, tokenizer, prompts, max_steps=3,
                    rolling_context_grad=True)
    full.model.load_state_dict(truncated.model.state_dict())
    for trainer in (truncated, full):
        trainer.model.train()
        trainer.state.global_step = 2
    loss_t, grads_t = loss_and_grads(truncated, batch)
    loss_g, grads_g = loss_and_grads(full, batch)
    torch.testing.assert_close(loss_g, loss_t, atol=1e-5, rtol=1e-5)  # the same forward values
    assert any(not torch.allclose(grads_g[n], grads_t[n], atol=1e-7) for n in grads_t)  # through the context too


def test_resampled_contexts_keep_their_depth_and_are_drawn_anew(tmp_path, student, teacher, tokenizer, prompts):
    trainer = _trainer(ResampledContextTrainer, tmp_path, student, teacher, tokenizer, prompts, max_steps=4)
    rolling = trainer.rolling
    seen = {}  # step -> each slot's (prompt, context) as generation read it
    ended = {}  # step -> (each slot's prompt + generated + chunk, the slots whose rollouts ended)
    generate, advance = rolling.generate, rolling.advance

    def watch(*args, **kwargs):
        seen[trainer.state.global_step] = [(list(s.prompt_ids), s.prompt_ids + s.generated) for s in rolling.pool.slots]
        return generate(*args, **kwargs)

    def keep(completion_ids, step, meter):
        whole = [s.prompt_ids + s.generated + list(c) for s, c in zip(rolling.pool.slots, completion_ids, strict=True)]
        trained = advance(completion_ids, step, meter)
        ended[step] = (whole, set(rolling.pool.finished_slots))
        return trained

    rolling.generate, rolling.advance = watch, keep
    trainer.train()
    continued = redrawn = 0
    for step in range(1, 4):
        whole, finished = ended[step - 1]
        for slot, (prompt, context) in enumerate(seen[step]):
            if slot in finished:
                continue  # a new prompt
            continued += 1
            assert context[:len(prompt)] == whole[slot][:len(prompt)]  # the same prompt
            assert len(context) == len(whole[slot])  # at the same depth
            assert not set(context[len(prompt):]) & rolling.pool.eos_token_ids
            redrawn += context != whole[slot]
    assert continued >= 8 and redrawn >= continued - 1  # (a short context may be drawn again by chance)


def test_rolling_modifiers_build_the_methods_they_name():
    kept = method("rolling-wide0.1+memory")
    assert kept.horizon["rolling_student_memory"] is True and kept.batch_ratio == pytest.approx(10.0)
    assert method("rolling0.1+memory+refresh2").horizon["rolling_memory_refresh_every"] == 2
    assert method("rolling0.1+resample").trainer_class is ResampledContextTrainer
    grad = method("rolling-wide0.1+grad")
    assert grad.horizon["rolling_context_grad"] is True and grad.trainer_class is None
    assert method("rolling0.1").trainer_class is None
    for bad in ("topd0.1+memory", "rolling0.1+refresh2", "rolling0.1+grad+resample", "rolling0.1+memory+grad",
                "rolling0.1+fast"):
        with pytest.raises(ValueError, match="modifier"):
            method(bad)


def test_context_grad_settings_fail_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"rolling_context_grad=True with horizon='truncated'"):
        make_args(tmp_path, horizon="truncated", truncation_ratio=0.25, rolling_context_grad=True)
    with pytest.raises(ValueError, match=r"rolling_student_memory=True with rolling_context_grad=True"):
        make_args(tmp_path, horizon="rolling", truncation_ratio=0.25, rolling_context_grad=True,
                  rolling_student_memory=True)
