"""When rolling's key/value caches are exact, and what the trainer does where they would not be (issue 35's defects):
beam search, a warm-up with nothing to seed, positions that are not rotary, dropout and autocast; and cached against
uncached per row under LoRA and several teachers."""

import copy
import warnings

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from testing_utils import make_args, tiny_causal_lm
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config

from horizon_opd import HorizonOPDTrainer, kv_cache


def _rolling(tmp_path, student, teacher, tokenizer, prompts, **overrides):
    settings = dict(horizon="rolling", truncation_ratio=0.25, max_steps=3, gradient_accumulation_steps=2)
    settings.update(overrides)
    peft_config = settings.pop("peft_config", None)
    return HorizonOPDTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, **settings),
                             train_dataset=prompts, processing_class=tokenizer, peft_config=peft_config)


def tiny_gpt2(vocab_size: int, seed: int = 0) -> GPT2LMHeadModel:
    """Learned absolute positions (`wpe`): a position shift changes every hidden state."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=128, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


# ----------------------------------------------------------------------------------------------- beam search
def test_beam_search_with_the_student_cache_is_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"num_beams=2.*rolling_student_cache=False"):
        make_args(tmp_path, horizon="rolling", truncation_ratio=0.25, generation_kwargs={"num_beams": 2})
    make_args(tmp_path, horizon="rolling", truncation_ratio=0.25, generation_kwargs={"num_beams": 2},
              rolling_student_cache=False)  # without the cache the beams' rows are not read


# ----------------------------------------------------------------------------------------------- warm-up
@pytest.mark.parametrize("settings", [dict(per_device_train_batch_size=1, gradient_accumulation_steps=1),
                                      dict(truncation_ratio=1.0)], ids=["one-slot", "ratio-1"])
def test_prefix_warmup_with_nothing_to_seed_trains(settings, tmp_path, student, teacher, tokenizer, prompts):
    trainer = _rolling(tmp_path, student, teacher, tokenizer, prompts, rolling_warmup="prefix", **settings)
    assert trainer.rollout_pool.seed_prefix_tokens() == 0  # every slot starts at depth 0: nothing to generate
    trainer.train()
    assert trainer.state.global_step == 3


# ----------------------------------------------------------------------------------------------- positions
def test_caches_are_only_for_relative_positions():
    assert kv_cache.exactness_problem(Qwen2Config(num_attention_heads=2, num_key_value_heads=1)) is None
    assert "absolute" in kv_cache.exactness_problem(GPT2Config(n_layer=2))
    dynamic = Qwen2Config(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert "dynamic" in kv_cache.exactness_problem(dynamic)
    sliding = Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=0, layer_types=None)
    assert kv_cache.exactness_problem(sliding) is not None
    assert not kv_cache.supports(GPT2Config(n_layer=2))


def test_a_gpt2_pair_rolls_without_caches_and_says_why(tmp_path, tokenizer, prompts):
    student, teacher = tiny_gpt2(len(tokenizer), 0), tiny_gpt2(len(tokenizer), 1)
    with pytest.warns(UserWarning, match="absolute"):
        cached = _rolling(tmp_path / "a", copy.deepcopy(student), copy.deepcopy(teacher), tokenizer, prompts)
    assert cached.teacher_cache is None and cached.rolling.student_cache_problem is not None
    cached.train()
    uncached = _rolling(tmp_path / "b", student, teacher, tokenizer, prompts, rolling_teacher_cache=False,
                        rolling_student_cache=False)
    uncached.train()
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (cached, uncached)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


# ----------------------------------------------------------------------------------------------- dropout, autocast
def test_the_student_cache_is_off_with_dropout_or_autocast_and_says_why(tmp_path, teacher, tokenizer, prompts):
    dropout = tiny_causal_lm(len(tokenizer), hidden_size=32, seed=0)
    dropout.config.attention_dropout = 0.1
    with pytest.warns(UserWarning, match="dropout"):
        trainer = _rolling(tmp_path / "a", dropout, copy.deepcopy(teacher), tokenizer, prompts)
    assert "dropout" in trainer.rolling.student_cache_problem
    assert trainer.teacher_cache is not None  # the teacher runs in eval mode: its cache stays exact

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    with pytest.warns(UserWarning, match="dropout"):
        _rolling(tmp_path / "b", tiny_causal_lm(len(tokenizer)), copy.deepcopy(teacher), tokenizer, prompts,
                 peft_config=lora)

    with pytest.warns(UserWarning, match="autocast"):
        autocast = _rolling(tmp_path / "c", tiny_causal_lm(len(tokenizer)), copy.deepcopy(teacher), tokenizer,
                            prompts, bf16=True, use_cpu=True)
    assert "autocast" in autocast.rolling.student_cache_problem
    autocast.train()
    assert autocast.cost.student_nograd_tokens > 0  # the loss re-encoded the contexts: generation's cache unused


def test_an_exact_setup_keeps_both_caches_without_a_warning(tmp_path, student, teacher, tokenizer, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer = _rolling(tmp_path, student, teacher, tokenizer, prompts)
    assert trainer.teacher_cache is not None and trainer.rolling.student_cache_problem is None


# ----------------------------------------------------------------------------------------------- per row
@pytest.mark.parametrize("setup", ["lora", "two_teachers"])
def test_cached_and_uncached_agree_per_row(setup, tmp_path, student, teacher, tokenizer):
    """The loss per row (the per-token KL summed over each row's chunk) and the gradients, with both caches and
    without, under LoRA (no dropout) and with two teachers routed per row."""
    rows = [{"prompt": f"{i} + {i + 1} =", "teacher_id": "ab"[i % 2]} for i in range(16)]
    prompts = Dataset.from_list(rows)
    extra = {}
    teachers = teacher
    if setup == "lora":
        extra["peft_config"] = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        prompts = prompts.remove_columns("teacher_id")
    else:
        teachers = {"a": teacher, "b": tiny_causal_lm(len(tokenizer), hidden_size=48, seed=2)}
    runs = []
    for cache in (True, False):
        trainer = _rolling(tmp_path / str(cache), copy.deepcopy(student), copy.deepcopy(teachers), tokenizer,
                           prompts, rolling_teacher_cache=cache, rolling_student_cache=cache, **extra)
        per_row = []
        observe = trainer.book.meters["train"].add_tokens

        def recording(per_token, mask, *args, _per_row=per_row, **kwargs):
            _per_row.append((per_token.detach() * mask).sum(-1).clone())  # (B,) one value per row
            return observe(per_token, mask, *args, **kwargs)

        trainer.book.meters["train"].add_tokens = recording
        trainer.train()
        runs.append((trainer, per_row))
    (cached, cached_rows), (uncached, uncached_rows) = runs
    assert cached.cost.teacher_tokens < uncached.cost.teacher_tokens  # the caches were used
    assert cached.cost.student_nograd_tokens == 0 < uncached.cost.student_nograd_tokens
    assert len(cached_rows) == len(uncached_rows) == 3 * 2
    for a, b in zip(cached_rows, uncached_rows, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    grads = [[e["grad_norm"] for e in t.state.log_history if "grad_norm" in e] for t in (cached, uncached)]
    assert grads[0] == pytest.approx(grads[1], rel=1e-4)
