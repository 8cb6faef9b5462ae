"""HorizonOPDTrainer end to end on tiny models: horizons, EOS handling, parity with TRL, training, resume, errors."""

import copy
import math

import pytest
import torch
from datasets import Dataset
from testing_utils import logged, make_args, record_generations, tiny_causal_lm
from trl import DistillationConfig, DistillationTrainer

from horizon_opd import HorizonOPDConfig, HorizonOPDTrainer
from horizon_opd.horizon import horizon_at

MODES = {
    "full": {"horizon": "full"},
    "truncated": {"horizon": "truncated", "truncation_ratio": 0.25},
    "progressive": {"horizon": "progressive", "progressive_start_ratio": 0.125, "progressive_ramp_fraction": 0.5},
    "stages": {"horizon": "progressive", "progressive_schedule": "stages", "progressive_stage_ratios": [0.25, 0.5, 1.0],
               "progressive_stage_fractions": [0.0, 0.25, 0.75]},
}


def _trainer(tmp_path, student, teacher, tokenizer, dataset, **overrides):
    return HorizonOPDTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, **overrides),
                             train_dataset=dataset, processing_class=tokenizer)


@pytest.mark.parametrize("mode", list(MODES))
def test_generation_stops_at_the_horizon(mode, tmp_path, student, teacher, tokenizer, prompts):
    trainer = _trainer(tmp_path, student, teacher, tokenizer, prompts, **MODES[mode])
    records = record_generations(trainer)
    max_new_tokens_seen = []
    generate = student.generate

    def spy(*args, generation_config=None, **kwargs):
        max_new_tokens_seen.append(generation_config.max_new_tokens)
        return generate(*args, generation_config=generation_config, **kwargs)

    student.generate = spy
    trainer.train()

    expected = [horizon_at(step, 4, trainer.horizon_policy) for step in range(4)]
    assert trainer.horizon_history == expected
    assert [r["horizon"] for r in records] == expected
    assert max_new_tokens_seen == expected  # generation itself is bounded; nothing is cut afterwards
    assert logged(trainer, "horizon/tokens") == expected
    for record, horizon in zip(records, expected, strict=True):
        lengths = record["completion_mask"].sum(1)
        assert lengths.max().item() <= horizon
        assert record["completion_ids"].size(1) <= horizon
    # an untrained student rarely emits EOS, so most rollouts run to the horizon and are reported as clipped
    assert logged(trainer, "completions/max_length") == [float(h) for h in expected]
    assert all(0.0 <= c <= 1.0 for c in logged(trainer, "completions/clipped_ratio"))
    assert max(logged(trainer, "completions/clipped_ratio")) > 0.5


def test_truncation_keeps_every_token_and_eos_ends_a_rollout(tmp_path, student, teacher, tokenizer, prompts):
    """Rollout 0 ends with EOS before the horizon (then junk that must be ignored); the others are cut by the horizon."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    trainer = _trainer(tmp_path, student, teacher, tokenizer, prompts, horizon="truncated", truncation_ratio=0.5)
    horizon = horizon_at(0, 4, trainer.horizon_policy)  # 8 of L = 16

    def scripted_generate(input_ids, attention_mask=None, generation_config=None, **kwargs):
        n_new = generation_config.max_new_tokens
        completions = torch.full((input_ids.size(0), n_new), 20)
        completions[0, 2] = eos  # EOS at position 2, followed by tokens generate would pad
        completions[0, 3:] = pad
        return torch.cat([input_ids, completions], dim=1)

    student.generate = scripted_generate
    trainer.model.train()
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in prompts["prompt"][:4]])
    ids, mask = batch["completion_ids"], batch["completion_mask"]
    assert ids.size(1) == horizon
    assert mask[0].tolist() == [1, 1, 1] + [0] * (horizon - 3)  # EOS kept, nothing after it trained on
    assert ids[0, 2].item() == eos
    assert mask[1:].all()  # cut rollouts: every generated token is trained on
    assert (ids[1:] != eos).all()  # ...and no EOS was appended
    assert batch["num_items_in_batch"].item() == 3 + 3 * horizon
    assert trainer._metrics["train"]["completions/clipped_ratio"][-1] == 0.75


def test_full_mode_loss_and_gradients_equal_trl_distillation(tmp_path, student, teacher, tokenizer, prompts):
    ours = _trainer(tmp_path / "ours", student, teacher, tokenizer, prompts)
    trl_args = DistillationConfig(output_dir=str(tmp_path / "trl"), beta=1.0, bf16=False, report_to="none",
                                  per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                  max_completion_length=16, gradient_checkpointing=False)
    theirs = DistillationTrainer(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teacher), args=trl_args,
                                 train_dataset=prompts, processing_class=tokenizer)
    ours.model.train()
    theirs.model.train()
    batch = ours._generate_and_score_completions([{"prompt": p} for p in prompts["prompt"][:8]])
    assert batch["completion_mask"].sum() > 8  # a real multi-token batch

    def loss_and_grads(trainer):
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    loss_ours, grads_ours = loss_and_grads(ours)
    loss_theirs, grads_theirs = loss_and_grads(theirs)
    torch.testing.assert_close(loss_ours, loss_theirs, atol=1e-5, rtol=1e-5)
    assert grads_ours.keys() == grads_theirs.keys() and len(grads_ours) > 10
    for name in grads_ours:
        torch.testing.assert_close(grads_ours[name], grads_theirs[name], atol=1e-5, rtol=1e-4, msg=name)


def test_full_mode_generates_the_same_completions_as_trl(tmp_path, student, teacher, tokenizer, prompts):
    # Each trainer seeds the global RNG in its constructor; build and train them one after the other.
    ours = _trainer(tmp_path / "ours", copy.deepcopy(student), copy.deepcopy(teacher), tokenizer, prompts, max_steps=2)
    ours_records = record_generations(ours)
    ours.train()
    trl_args = DistillationConfig(output_dir=str(tmp_path / "trl"), beta=1.0, bf16=False, report_to="none",
                                  per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
                                  max_completion_length=16, gradient_checkpointing=False, learning_rate=1e-3,
                                  logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0)
    theirs = DistillationTrainer(model=student, teacher_model=teacher, args=trl_args, train_dataset=prompts,
                                 processing_class=tokenizer)
    theirs.current_horizon = lambda: 16  # used by the recorder only
    theirs_records = record_generations(theirs)
    theirs.train()
    assert len(ours_records) == len(theirs_records) == 2
    for a, b in zip(ours_records, theirs_records, strict=True):
        assert torch.equal(a["completion_ids"], b["completion_ids"])
    torch.testing.assert_close(torch.tensor(logged(ours, "loss")), torch.tensor(logged(theirs, "loss")))


@pytest.mark.parametrize("mode, loss_type", [("full", "reverse_kl"), ("truncated", "reverse_kl"),
                                             ("progressive", "reverse_kl"), ("full", "sampled"),
                                             ("full", "sequence")])
def test_a_few_steps_train_the_student_toward_the_teacher(mode, loss_type, tmp_path, student, teacher, tokenizer,
                                                          prompts):
    if loss_type in ("sampled", "sequence"):
        # The single-sample estimator is noisy where the KL is tiny; a peaked teacher gives it a signal to follow.
        with torch.no_grad():
            teacher.lm_head.weight.mul_(10.0)
    steps, bound = {"reverse_kl": (10, 0.7), "sampled": (30, 0.97), "sequence": (30, 0.995)}[loss_type]
    # the reward-to-go sums up to 16 log-ratios of a peaked teacher: a noisier gradient that needs a smaller step
    lr = 2e-3 if loss_type == "sequence" else 1e-2
    trainer = _trainer(tmp_path, student, teacher, tokenizer, prompts, max_steps=steps, learning_rate=lr,
                       lr_scheduler_type="constant", loss_type=loss_type, **MODES[mode])
    # the exact reverse KL on a fixed full-horizon batch, before and after training
    probe = HorizonOPDTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path / "probe"),
                              train_dataset=prompts, processing_class=tokenizer)
    probe.model.train()
    fixed = probe._generate_and_score_completions([{"prompt": p} for p in prompts["prompt"][:8]])
    with torch.no_grad():
        before = probe.compute_loss(probe.model, dict(fixed)).item()
    trainer.train()
    with torch.no_grad():
        after = probe.compute_loss(probe.model, dict(fixed)).item()
    losses = logged(trainer, "loss")
    assert len(losses) == steps and all(math.isfinite(v) for v in losses)
    assert after < bound * before, (before, after)


def test_resume_mid_progressive_continues_the_horizon(tmp_path, student, teacher, tokenizer, prompts):
    overrides = dict(max_steps=6, save_strategy="steps", save_steps=3, **MODES["progressive"])
    first = _trainer(tmp_path, copy.deepcopy(student), copy.deepcopy(teacher), tokenizer, prompts, **overrides)
    first_records = record_generations(first)
    first.train()
    uninterrupted = [r["horizon"] for r in first_records]
    assert uninterrupted == [horizon_at(s, 6, first.horizon_policy) for s in range(6)]
    assert len(set(uninterrupted)) >= 3  # really mid-ramp at step 3

    resumed = _trainer(tmp_path, student, teacher, tokenizer, prompts, **overrides)
    resumed_records = record_generations(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert [r["step"] for r in resumed_records] == [3, 4, 5]
    assert [r["horizon"] for r in resumed_records] == uninterrupted[3:]
    # the restored log history plus the new entries reads like one uninterrupted run
    assert logged(resumed, "horizon/tokens") == uninterrupted


def test_position_diagnostics_reconstruct_the_loss(tmp_path, student, teacher, tokenizer, prompts):
    """Gradient accumulation 2 and logging_steps 2 across a stage change (horizons 4, 8 | 8, 16): each step's
    per-position sums give its loss, and each logged line's bins are token-weighted over its two steps."""
    trainer = _trainer(tmp_path, student, teacher, tokenizer, prompts, position_bins=4, logging_steps=2,
                       gradient_accumulation_steps=2, **MODES["stages"])
    records = []
    observe = trainer.horizon_policy.observe
    trainer.horizon_policy.observe = lambda record: (records.append(record), observe(record))
    trainer.train()
    assert [r.horizon for r in records] == [4, 8, 8, 16]
    logs = [e for e in trainer.state.log_history if "kl_by_position/bin_0" in e]
    assert [e["horizon/tokens"] for e in logs] == [8.0, 16.0]  # the longest horizon of each window, not a mean
    assert [e["horizon/mean_tokens"] for e in logs] == [6.0, 12.0]
    for entry, window in zip(logs, (records[:2], records[2:]), strict=True):
        step_losses = [sum(r.kl_sums) / sum(r.kl_counts) for r in window]
        assert entry["loss"] == pytest.approx(sum(step_losses) / 2, rel=1e-5)  # Trainer logs the mean step loss
        horizon = int(entry["horizon/tokens"])
        for i in range(4):  # bin i holds positions [i * H / 4, (i + 1) * H / 4) of every step in the window
            positions = range(i * horizon // 4, (i + 1) * horizon // 4)
            total = sum(r.kl_sums[p] for r in window for p in positions)
            count = sum(r.kl_counts[p] for r in window for p in positions)
            assert entry[f"kl_by_position/bin_{i}"] == pytest.approx(total / count, rel=1e-6)
    assert trainer.generated_tokens == sum(r.generated_tokens for r in records) > 0
    assert logged(trainer, "horizon/generated_tokens")[-1] == trainer.generated_tokens


def test_cost_accounting_matches_hand_counted_rollouts_with_gradient_accumulation(tmp_path, student, teacher,
                                                                                  tokenizer, prompts):
    """Per optimizer step: decode iterations = the longest rollout of the step's one generation batch (both
    micro-batches), tokens = all generated tokens, trained positions = the loss mask; cumulative in the log and the
    checkpoint, and continued on resume."""
    overrides = dict(max_steps=4, gradient_accumulation_steps=2, save_strategy="steps", save_steps=2,
                     **MODES["progressive"])
    first = _trainer(tmp_path, copy.deepcopy(student), copy.deepcopy(teacher), tokenizer, prompts, **overrides)
    batches = record_generations(first)
    first.train()
    assert [b["completion_mask"].size(0) for b in batches] == [8] * 4  # 4 prompts x 2 micro-batches per generation
    lengths = [b["completion_mask"].sum(1).tolist() for b in batches]
    assert len({max(x) for x in lengths}) > 1  # the horizon grows: steps differ in cost
    decode = [max(x) for x in lengths]
    tokens = [sum(x) for x in lengths]
    prompt_tokens = sum(int(b["prompt_mask"].sum()) for b in batches)
    encoded = prompt_tokens + sum(tokens)  # one forward per model over prompt + completion, without padding
    assert first.cost.state_dict() == {"steps": 4, "decode_iterations": sum(decode), "generated_tokens": sum(tokens),
                                       "trained_tokens": sum(tokens), "teacher_scored_tokens": 0,
                                       "prompts_started": 32, "prefill_tokens": prompt_tokens,
                                       "prefill_cached_tokens": 0,  # transformers' generate: no prefix cache
                                       "student_grad_tokens": encoded, "student_nograd_tokens": 0,
                                       "teacher_tokens": encoded}
    step_logs = [e for e in first.state.log_history if "loss" in e]
    assert [e["horizon/decode_iterations"] for e in step_logs] == [float(sum(decode[:i + 1])) for i in range(4)]
    assert logged(first, "horizon/step_decode_iterations") == [float(d) for d in decode]
    assert logged(first, "horizon/trained_tokens")[-1] == sum(tokens)
    assert "teacher/scored_tokens" not in first.state.log_history[0]  # a local teacher: no server bill

    resumed = _trainer(tmp_path, student, teacher, tokenizer, prompts, **overrides)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.cost.state_dict() == first.cost.state_dict()  # the ledger is checkpoint state


def test_loss_window_generates_to_its_end_and_trains_inside_it_only(tmp_path, student, teacher, tokenizer, prompts):
    # L = 16, truncated at 0.5 -> H = 8; window [0.25, 0.75) of H -> generate ceil(0.75 * 8) = 6, train on [2, 6)
    trainer = _trainer(tmp_path, student, teacher, tokenizer, prompts, max_steps=2, horizon="truncated",
                       truncation_ratio=0.5, loss_window=[0.25, 0.75], gradient_accumulation_steps=1)
    records = []
    observe = trainer.horizon_policy.observe
    trainer.horizon_policy.observe = lambda record: (records.append(record), observe(record))
    trainer.train()
    assert trainer.horizon_history == [6, 6]
    for record in records:
        assert record.kl_counts[:2] == [0.0, 0.0] and all(c > 0 for c in record.kl_counts[2:4])
        assert sum(record.kl_counts[6:]) == 0.0
    # only the window's positions count as trained; every generated token counts as generated
    assert trainer.cost.trained_tokens == sum(sum(r.kl_counts) for r in records) < trainer.cost.generated_tokens


def test_adaptive_on_the_topk_overlap_signal_measures_it_on_probes_only(tmp_path, student, teacher, tokenizer,
                                                                        prompts):
    trainer = _trainer(tmp_path, student, teacher, tokenizer, prompts, max_steps=4, horizon="adaptive",
                       adaptive_probe_every=2, adaptive_signal="topk_overlap", adaptive_top_k=4,
                       gradient_accumulation_steps=1)
    records = []
    observe = trainer.horizon_policy.observe
    trainer.horizon_policy.observe = lambda record: (records.append(record), observe(record))
    trainer.train()
    assert [r.signal_sums is not None for r in records] == [True, False, True, False]
    probe = records[0]
    assert all(0.0 <= s <= c + 1e-9 for s, c in zip(probe.signal_sums, probe.kl_counts, strict=True))
    assert [d["step"] for d in trainer.horizon_policy.decisions] == [0, 2]


def test_resume_mid_adaptive_reproduces_the_horizons(tmp_path, student, teacher, tokenizer, prompts):
    overrides = dict(max_steps=8, save_strategy="steps", save_steps=4, horizon="adaptive", adaptive_probe_every=2,
                     adaptive_min_ratio=0.125, adaptive_tolerance=0.05, gradient_accumulation_steps=1)
    first = _trainer(tmp_path, copy.deepcopy(student), copy.deepcopy(teacher), tokenizer, prompts, **overrides)
    first.train()
    uninterrupted = first.horizon_history
    assert uninterrupted[::2] == [16] * 4  # probes at the full horizon
    assert len(first.horizon_policy.decisions) == 4

    resumed = _trainer(tmp_path, student, teacher, tokenizer, prompts, **overrides)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert len(set(uninterrupted[1::2])) > 1  # the controller moved: the state restored at step 4 matters
    assert resumed.horizon_history == uninterrupted
    ratios = [d["ratio"] for d in first.horizon_policy.decisions]
    assert [d["ratio"] for d in resumed.horizon_policy.decisions] == ratios
    # the restored first-probe reference is bit-identical; later profiles agree to float noise of the resumed steps
    assert resumed.horizon_policy.first_profile == first.horizon_policy.first_profile
    assert resumed.generated_tokens == first.generated_tokens  # the cost figure continues too


def test_padded_teacher_vocabulary_is_compared_over_the_shared_vocabulary(tmp_path, tokenizer, prompts):
    vocab = len(tokenizer)  # 103
    student = tiny_causal_lm(vocab, seed=0)
    padded_teacher = tiny_causal_lm(vocab + 25, hidden_size=48, seed=1)  # like 151936 vs 152064
    trainer = _trainer(tmp_path, student, padded_teacher, tokenizer, prompts, max_steps=2)
    assert trainer.shared_vocab_size == vocab
    trainer.model.train()
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in prompts["prompt"][:4]])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        K = batch["completion_ids"].size(1)
        log_p = torch.log_softmax(student(ids, attention_mask=att).logits[:, -K - 1:-1], -1)
        log_q = torch.log_softmax(padded_teacher(ids, attention_mask=att).logits[:, -K - 1:-1, :vocab], -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        mask = batch["completion_mask"]
        expected = ((kl * mask).sum() / mask.sum()).item()
    assert loss == pytest.approx(expected, rel=1e-4)
    trainer.train()
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))


def test_tokenizers_that_differ_are_rejected_naming_both_sizes(tmp_path, tokenizer, prompts):
    with pytest.raises(ValueError, match=r"student has vocab_size 103 and the teacher vocab_size 64"):
        _trainer(tmp_path, tiny_causal_lm(103), tiny_causal_lm(64, seed=1), tokenizer, prompts)


def test_conversational_prompts_train(tmp_path, student, teacher, tokenizer, chat_prompts):
    trainer = _trainer(tmp_path, student, teacher, tokenizer, chat_prompts, max_steps=2, horizon="truncated",
                       truncation_ratio=0.5)
    records = record_generations(trainer)
    trainer.train()
    assert [r["horizon"] for r in records] == [8, 8]
    # the chat template was applied: every prompt ends with the assistant header
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert (records[0]["prompt_ids"][:, -1] == assistant).all()


def test_dataset_without_prompt_column_names_the_columns(tmp_path, student, teacher, tokenizer):
    bad = Dataset.from_dict({"question": ["1+1"], "answer": ["2"]})
    with pytest.raises(ValueError, match=r"no 'prompt' column \(found columns: \['question', 'answer'\]\)"):
        _trainer(tmp_path, student, teacher, tokenizer, bad)
    with pytest.raises(ValueError, match=r"must be a string or a list of chat messages"):
        _trainer(tmp_path, student, teacher, tokenizer, Dataset.from_dict({"prompt": [[1, 2, 3]]}))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"horizon": "truncated", "truncation_ratio": 0.0}, r"truncation_ratio=0.0 is outside \(0, 1\]"),
        ({"horizon": "truncated", "truncation_ratio": 1.2}, r"truncation_ratio=1.2 is outside \(0, 1\]"),
        ({"horizon": "half"}, r"horizon='half' is not a horizon policy"),
        ({"loss_type": "forward_kl"}, r"loss_type='forward_kl' is unknown"),
        ({"loss_window": [0.5, 0.2]}, r"loss_window=\[0.5, 0.2\] has start=0.5, end=0.2 out of order"),
        ({"loss_window": [0.0, 0.5], "horizon": "adaptive"}, r"loss_window=\[0.0, 0.5\] with horizon='adaptive'"),
        ({"max_completion_length": 0}, r"max_completion_length=0 must be an integer >= 1"),
        ({"horizon": "progressive", "progressive_schedule": "stages", "progressive_stage_ratios": [0.5, 0.25, 1.0],
          "progressive_stage_fractions": [0.0, 0.3, 0.6]}, r"decreases"),
        ({"horizon": "progressive", "progressive_schedule": "stages", "progressive_stage_ratios": [0.1, 0.5],
          "progressive_stage_fractions": [0.0, 0.5]}, r"never reaches the full horizon L"),
        ({"beta": 0.5}, r"beta=0.5: HorizonOPDTrainer trains the reverse KL"),
        ({"generation_kwargs": {"max_new_tokens": 7}}, r"generation_kwargs sets max_new_tokens=7"),
        ({"position_bins": -1}, r"position_bins=-1 must be an integer >= 0"),
    ],
)
def test_bad_config_fails_at_construction(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        HorizonOPDConfig(output_dir=str(tmp_path), **overrides)


def test_trainer_rejects_wrong_config_type_and_missing_teacher(tmp_path, student, teacher, tokenizer, prompts):
    with pytest.raises(TypeError, match="needs a HorizonOPDConfig"):
        HorizonOPDTrainer(model=student, teacher_model=teacher, args=DistillationConfig(output_dir=str(tmp_path),
                          bf16=False), train_dataset=prompts, processing_class=tokenizer)
    with pytest.raises(ValueError, match="needs a teacher_model"):
        HorizonOPDTrainer(model=student, args=make_args(tmp_path), train_dataset=prompts, processing_class=tokenizer)


def test_user_args_are_never_mutated(tmp_path, student, teacher, tokenizer, prompts):
    args = make_args(tmp_path, max_steps=2, gradient_checkpointing=True, dataloader_num_workers=0)
    before = copy.deepcopy(args.to_dict())
    trainer = HorizonOPDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                                processing_class=tokenizer)
    trainer.train()
    assert args.to_dict() == before
    assert trainer.args is not args


def test_padded_student_never_samples_ids_the_teacher_cannot_score(tmp_path, tokenizer, prompts):
    vocab = len(tokenizer)
    padded_student = tiny_causal_lm(vocab + 25, seed=0)
    with torch.no_grad():  # make the padding rows the most likely tokens, so an unsuppressed sampler would pick them
        padded_student.lm_head.weight[vocab:] = 5 * padded_student.lm_head.weight[:vocab].abs().max()
    trainer = _trainer(tmp_path, padded_student, tiny_causal_lm(vocab, hidden_size=48, seed=1), tokenizer, prompts,
                       max_steps=2)
    records = record_generations(trainer)
    trainer.train()
    for record in records:
        generated = record["completion_ids"][record["completion_mask"].bool()]
        assert generated.max().item() < vocab
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))
