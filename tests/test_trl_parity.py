"""trl.DistillationTrainer's public contract, kept by HorizonOPDTrainer with horizon="full" or refused at construction
with a reason; each test names the TRL test (tests/test_distillation_trainer.py, TRL 1.16) it mirrors, on tiny offline
models. Elsewhere: loss, gradients and completions equal TRL's (test_trainer.py), LoRA trains the adapter only and a
PeftModel with a second peft_config is refused (test_lora.py), heads padded past a shared tokenizer are accepted where
TRL refuses them (test_trainer.py, horizon_opd/teacher.py), streamed data (test_streaming.py)."""

import copy
import math

import pytest
import torch
from datasets import DatasetDict, IterableDatasetDict
from testing_utils import logged, make_args, tiny_causal_lm
from trl import DistillationConfig, DistillationTrainer

from horizon_opd import HorizonOPDTrainer

EVAL_FORMS = ["dataset", "iterable_dataset", "dataset_dict", "iterable_dataset_dict", "dict_of_dataset",
              "dict_of_iterable_dataset"]


def _trainer(tmp_path, student, teacher, tokenizer, dataset, eval_dataset=None, peft_config=None, **overrides):
    overrides.setdefault("max_steps", 2)
    return HorizonOPDTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, **overrides),
                             train_dataset=dataset, eval_dataset=eval_dataset, processing_class=tokenizer,
                             peft_config=peft_config)


def _eval_dataset(form, split):
    if form == "none":
        return None
    split = split.to_iterable_dataset() if "iterable" in form else split
    if form in ("dataset", "iterable_dataset"):
        return split
    if form in ("dataset_dict", "iterable_dataset_dict"):
        return (IterableDatasetDict if "iterable" in form else DatasetDict)({"data1": split, "data2": split})
    return {"data1": split, "data2": split}


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory, tokenizer):
    """A student (with its tokenizer) and a teacher saved with save_pretrained: models "by id"."""
    root = tmp_path_factory.mktemp("models")
    tiny_causal_lm(len(tokenizer), seed=0).save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    tiny_causal_lm(len(tokenizer), hidden_size=48, seed=1).save_pretrained(root / "teacher")
    return str(root / "student"), str(root / "teacher")


# ----------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("fixture", ["prompts", "chat_prompts"])
def test_both_prompt_only_formats_train(fixture, tmp_path, student, teacher, tokenizer, request):
    """test_train_dataset_format, test_train_with_chat_template_kwargs"""
    trainer = _trainer(tmp_path, student, teacher, tokenizer, request.getfixturevalue(fixture), max_steps=1,
                       chat_template_kwargs={"enable_thinking": False})
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert any(not torch.equal(p, trainer.model.get_parameter(n)) for n, p in before.items())


@pytest.mark.parametrize("form", ["dataset", "iterable_dataset"])
def test_train_dataset_is_kept_as_given(form, tmp_path, student, teacher, tokenizer, prompts):
    """test_init_with_train_dataset"""
    dataset = prompts.to_iterable_dataset() if form == "iterable_dataset" else prompts
    assert _trainer(tmp_path, student, teacher, tokenizer, dataset).train_dataset is dataset


@pytest.mark.parametrize("form", EVAL_FORMS + ["none"])
def test_eval_dataset_in_every_form_is_kept_at_init(form, tmp_path, student, teacher, tokenizer, prompts):
    """test_init_with_eval_dataset"""
    eval_dataset = _eval_dataset(form, prompts.select(range(8)))
    trainer = _trainer(tmp_path, student, teacher, tokenizer, prompts, eval_dataset)
    if isinstance(eval_dataset, dict):
        assert set(trainer.eval_dataset) == {"data1", "data2"}
    else:
        assert trainer.eval_dataset is eval_dataset


@pytest.mark.parametrize("form", EVAL_FORMS)
def test_evaluate_takes_an_eval_dataset_in_every_form(form, tmp_path, student, teacher, tokenizer, prompts):
    """test_evaluate_with_eval_dataset: passed to evaluate(), not at init"""
    trainer = _trainer(tmp_path, student, teacher, tokenizer, prompts, max_completion_length=8,
                       per_device_eval_batch_size=8)
    metrics = trainer.evaluate(eval_dataset=_eval_dataset(form, prompts.select(range(8))))
    names = ["eval_loss"] if form in ("dataset", "iterable_dataset") else ["eval_data1_loss", "eval_data2_loss"]
    assert all(math.isfinite(metrics[name]) for name in names)
    assert metrics["eval_horizon/tokens"] == 8 and metrics["eval_completions/max_length"] <= 8


def test_eval_on_start_and_the_closing_summary_holds_no_evaluation(tmp_path, student, teacher, tokenizer, prompts):
    """test_train_eval_on_start, test_train_with_eval. After a last-step evaluation, train()'s closing summary is
    logged while the model is in eval mode: like TRL's, it carries no eval_ metrics, and the alarm reads no empty
    evaluation."""
    trainer = _trainer(tmp_path, student, teacher, tokenizer, prompts, prompts.select(range(8)),
                       max_completion_length=8, eval_strategy="steps", eval_steps=2, eval_on_start=True, per_device_eval_batch_size=8)
    trainer.train()
    history = trainer.state.log_history
    assert math.isfinite(history[0]["eval_loss"]) and history[0]["step"] == 0
    assert len([e for e in history if "eval_loss" in e]) == 2
    assert math.isfinite(history[-1]["train_loss"]) and not [k for k in history[-1] if k.startswith("eval_")]
    evaluations = [t for t in trainer.alarm.trace if t["source"] == "evaluation"]
    assert len(evaluations) == 2 and all(t["rollouts"] == 8 for t in evaluations)


# ----------------------------------------------------------------------------------------------- loss and batch
def test_loss_is_normalised_by_num_items_in_batch(tmp_path, student, teacher, tokenizer, prompts):
    """test_loss_normalizes_by_num_items_in_batch"""
    trainer = _trainer(tmp_path, student, teacher, tokenizer, prompts)
    torch.manual_seed(0)
    completion_mask = torch.ones(2, 3, dtype=torch.long)
    completion_mask[1, 2] = 0
    batch = {"prompt_ids": torch.randint(3, len(tokenizer), (2, 4)), "prompt_mask": torch.ones(2, 4, dtype=torch.long),
             "completion_ids": torch.randint(3, len(tokenizer), (2, 3)), "completion_mask": completion_mask}
    num_valid = completion_mask.sum()
    trainer.model.eval()
    with torch.no_grad():
        mean = trainer.compute_loss(trainer.model, batch)  # None: the local mean over valid tokens
        global_ = trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_valid)
        double = trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_valid * 2)
    assert mean > 0
    torch.testing.assert_close(global_, mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(double, mean / 2, rtol=1e-4, atol=1e-6)


def test_generated_batch_has_trls_fields(tmp_path, student, teacher, tokenizer, prompts):
    """The batch `_generate_and_score_completions` returns (what compute_loss and a subclass read): TRL's keys,
    dtypes and shapes, and `num_items_in_batch` = the valid completion tokens of the generation batch."""
    inputs = [{"prompt": p} for p in prompts["prompt"][:8]]
    batches = []
    for build in ("ours", "trl"):
        if build == "ours":
            trainer = _trainer(tmp_path / build, copy.deepcopy(student), copy.deepcopy(teacher), tokenizer, prompts)
        else:
            args = DistillationConfig(output_dir=str(tmp_path / build), beta=1.0, bf16=False, report_to="none",
                                      per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                      max_completion_length=16, gradient_checkpointing=False, seed=0)
            trainer = DistillationTrainer(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teacher),
                                          args=args, train_dataset=prompts, processing_class=tokenizer)
        trainer.model.train()
        torch.manual_seed(0)
        batches.append(trainer._generate_and_score_completions(inputs))
    ours, theirs = batches
    assert ours.keys() == theirs.keys() >= {"prompt_ids", "prompt_mask", "completion_ids", "completion_mask",
                                            "num_items_in_batch"}
    for key in ours:
        assert (ours[key].dtype, ours[key].shape) == (theirs[key].dtype, theirs[key].shape), key
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["num_items_in_batch"].item() == ours["completion_mask"].sum().item()


# ----------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("dtype", [None, "auto", "float32", "bfloat16"])
def test_teacher_by_path_is_loaded_with_trls_dtype_rules(dtype, tmp_path, tokenizer, prompts, model_paths):
    """test_init_minimal, test_train (models by id); teacher_model_init_kwargs["dtype"] as TRL reads it"""
    student_path, teacher_path = model_paths
    kwargs = None if dtype is None else {"dtype": dtype}
    ours = HorizonOPDTrainer(model=student_path, teacher_model=teacher_path, train_dataset=prompts,
                             args=make_args(tmp_path / "ours", max_steps=1, teacher_model_init_kwargs=kwargs))
    theirs = DistillationTrainer(model=student_path, teacher_model=teacher_path, train_dataset=prompts,
                                 args=DistillationConfig(output_dir=str(tmp_path / "trl"), bf16=False,
                                                         report_to="none", teacher_model_init_kwargs=kwargs))
    assert next(ours.teacher_model.parameters()).dtype == next(theirs.teacher_model.parameters()).dtype
    assert next(ours.model.parameters()).dtype == next(theirs.model.parameters()).dtype == torch.float32
    assert type(ours.processing_class) is type(theirs.processing_class)  # loaded from the student's path
    if dtype == "bfloat16":  # a bf16 teacher scores a float32 student
        ours.train()
        assert all(math.isfinite(v) for v in logged(ours, "loss"))


@pytest.mark.parametrize(
    "make, message",
    [
        # test_teacher_model_init_kwargs_with_instantiated_teacher_raises
        (lambda tmp: dict(args=make_args(tmp, teacher_model_init_kwargs={"dtype": "float32"})),
         "teacher_model_init_kwargs"),
        # test_teacher_vocab_size_mismatch_raises (a tokenizer the teacher cannot score)
        (lambda tmp: dict(teacher_model=tiny_causal_lm(40, seed=1)), "vocab_size"),
        # test_iterable_dataset_requires_dispatch_batches_false
        (lambda tmp: dict(args=make_args(tmp, accelerator_config={"dispatch_batches": True}), stream=True),
         "Iterable datasets require `dispatch_batches=False`"),
    ],
    ids=["init kwargs with a teacher instance", "vocabulary", "stream with dispatch_batches"],
)
def test_trls_refusals_are_kept(make, message, tmp_path, student, teacher, tokenizer, prompts):
    kwargs = {"model": student, "teacher_model": teacher, "args": make_args(tmp_path), "processing_class": tokenizer,
              **make(tmp_path)}
    kwargs["train_dataset"] = prompts.to_iterable_dataset() if kwargs.pop("stream", False) else prompts
    with pytest.raises(ValueError, match=message):
        HorizonOPDTrainer(**kwargs)


def test_a_stream_forces_one_dataloader_worker_on_the_trainers_copy_only(tmp_path, student, teacher, tokenizer,
                                                                         prompts):
    """test_iterable_dataset_forces_num_workers_zero, test_train_with_iterable_dataset"""
    args = make_args(tmp_path, dataloader_num_workers=4, max_steps=1)
    trainer = HorizonOPDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                                train_dataset=prompts.to_iterable_dataset())
    assert trainer.args.dataloader_num_workers == 0 and trainer.args.accelerator_config.dispatch_batches is False
    assert args.dataloader_num_workers == 4  # the user's config is not modified


def test_pad_token_falls_back_to_eos_and_is_synced_with_the_model(tmp_path, student, teacher, tokenizer, prompts):
    """test_pad_token_id_synced_with_model_config"""
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    trainer = _trainer(tmp_path, student, teacher, no_pad, prompts)
    assert no_pad.pad_token_id == no_pad.eos_token_id
    assert trainer.model.config.pad_token_id == trainer.model.generation_config.pad_token_id == no_pad.pad_token_id


@pytest.mark.parametrize(
    "overrides, outcome",
    [
        ({"pad_to_multiple_of": 8}, "trains"),  # test_train_with_pad_to_multiple_of
        ({"top_p": 0.9, "top_k": 10, "min_p": 0.01, "repetition_penalty": 1.1},  # test_train_with_additional_...
         "warns that rollouts are drawn off-policy"),
        # test_train_with_generation_kwargs: sampling keys there would change the distribution the loss scores
        ({"generation_kwargs": {"do_sample": True, "top_k": 50}}, r"generation_kwargs sets top_k=50"),
    ],
    ids=["pad_to_multiple_of", "truncated sampling", "sampling generation_kwargs"],
)
def test_trls_generation_settings_train_or_are_refused_with_a_reason(overrides, outcome, tmp_path, student, teacher,
                                                                     tokenizer, prompts):
    if outcome.startswith("generation_kwargs"):
        with pytest.raises(ValueError, match=outcome):
            _trainer(tmp_path, student, teacher, tokenizer, prompts, **overrides)
        return
    if outcome.startswith("warns"):
        with pytest.warns(UserWarning, match="off-policy"):
            trainer = _trainer(tmp_path, student, teacher, tokenizer, prompts, max_steps=1, **overrides)
    else:
        trainer = _trainer(tmp_path, student, teacher, tokenizer, prompts, max_steps=1, **overrides)
    trainer.train()
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))


# ----------------------------------------------------------------------------------------------- PEFT
def test_peft_init_is_seeded(tmp_path, student, teacher, tokenizer, prompts):
    """test_peft_init_is_seeded"""
    from peft import LoraConfig

    adapters = []
    for global_seed in range(2):
        torch.manual_seed(global_seed)  # a different global RNG state, as in two separate runs
        trainer = _trainer(tmp_path, copy.deepcopy(student), teacher, tokenizer, prompts,
                           peft_config=LoraConfig(target_modules=["q_proj", "v_proj"]))
        adapters.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_A" in n})
    assert adapters[0] and adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][n], adapters[1][n]) for n in adapters[0])


def test_peft_modules_to_save_lm_head_trains_the_heads_copy(tmp_path, student, teacher, tokenizer, prompts):
    """test_peft_modules_to_save_lm_head_allowed; the loss reads the head's trained copy, so it changes"""
    from peft import LoraConfig

    trainer = _trainer(tmp_path, student, teacher, tokenizer, prompts, max_steps=1,
                       peft_config=LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    copies = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "modules_to_save" in n}
    trainer.train()
    assert copies and all(not torch.equal(p, trainer.model.get_parameter(n)) for n, p in copies.items())


@pytest.mark.parametrize("config, message", [("lm_head", "lm_head"), ("prefix", "Prompt-learning")])
def test_peft_setups_the_loss_would_ignore_are_refused(config, message, tmp_path, student, teacher, tokenizer,
                                                       prompts):
    """test_peft_lm_head_adapter_raises, test_peft_prompt_learning_raises"""
    from peft import LoraConfig, PrefixTuningConfig

    peft_config = (LoraConfig(target_modules=["q_proj", "lm_head"]) if config == "lm_head"
                   else PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path, student, teacher, tokenizer, prompts, peft_config=peft_config)
