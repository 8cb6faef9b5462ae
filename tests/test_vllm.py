"""HorizonOPDTrainer on TRL's colocated vLLM engine (`use_vllm=True, vllm_mode="colocate"`), executed for real on
vLLM's CPU build (`vllm-cpu`): the engine gets each step's horizon, rolling sends its contexts and gets one chunk each,
the weights reach the engine every step, and the cost ledger counts what the engine did.

These tests need vLLM installed. Where it is not (the main test venv: vllm-cpu pins transformers < 5.18), they are
skipped here and `tests/test_vllm_venv.py` runs this file in the vLLM venv that `scripts/install_vllm.sh` builds.
"""

import functools
import math
import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: the CPU default (4) is far more than needed
vllm = pytest.importorskip("vllm", reason="vLLM is not installed here; tests/test_vllm_venv.py runs this file in its venv")

import torch  # noqa: E402
import trl.generation.vllm_generation as trl_vllm  # noqa: E402
from datasets import Dataset  # noqa: E402
from testing_utils import POLICY_SETTINGS, make_args, tiny_causal_lm  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from horizon_opd import HorizonOPDTrainer  # noqa: E402
from horizon_opd.demo.tokenizer import build_char_tokenizer  # noqa: E402
from horizon_opd.horizon import horizon_at  # noqa: E402

L = 16
EOS = 2  # tiny_causal_lm's eos_token_id


@pytest.fixture(autouse=True)
def eager_float32_engine(monkeypatch, tmp_path_factory):
    """TRL builds `vllm.LLM(model=...)` without `enforce_eager` or `dtype`: vLLM then compiles the model (~40 s of a
    cold start on this CPU) and runs a float32 checkpoint in bfloat16 on CPU (its "auto" dtype). The tests want a fast
    start and the student's own float32 numbers, so the engine is built eager in float32."""
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path_factory.getbasetemp() / "vllm_cache"))
    monkeypatch.setattr(trl_vllm, "LLM", functools.partial(vllm.LLM, enforce_eager=True, dtype="float32"))


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tokenizer):
    """vLLM loads the student from disk (TRL passes `model.name_or_path`); head_dim 32: the CPU attention backend's
    smallest head size."""
    path = tmp_path_factory.mktemp("student")
    tiny_causal_lm(len(tokenizer), hidden_size=64, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def prompts():
    return Dataset.from_dict({"prompt": [f"{i} + {i + 1} =" for i in range(16)]})


def build(tmp_path, student_dir, tokenizer, prompts, teacher=None, **overrides):
    overrides = {"vllm_max_model_length": 128, **overrides}
    args = make_args(tmp_path / "out", use_vllm=True, vllm_mode="colocate", max_completion_length=L, **overrides)
    teacher = teacher if teacher is not None else tiny_causal_lm(len(tokenizer), hidden_size=48, seed=1)
    return HorizonOPDTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir), teacher_model=teacher,
                             args=args, train_dataset=prompts, processing_class=tokenizer)


def record_engine_calls(trainer) -> list[dict]:
    """Every call of TRL's `VLLMGeneration.generate`: the step, the token limit the engine was given, the contexts sent
    and the completions returned."""
    calls, generate = [], trainer.vllm_generation.generate

    def recording(*args, **kwargs):
        pool = trainer.rollout_pool  # rolling: what each slot may still write before its budget ends its rollout
        remaining = [slot.budget - slot.depth for slot in pool.slots] if pool is not None else None
        out = generate(*args, **kwargs)
        calls.append({"step": trainer.state.global_step, "max_tokens": trainer.vllm_generation.max_completion_length,
                      "prompts": [list(p) for p in kwargs["prompts"]], "completions": [list(c) for c in out[1]],
                      "remaining": remaining})
        return out

    trainer.vllm_generation.generate = recording
    return calls


def assert_ends_at(completion: list[int], horizon: int) -> None:
    """A rollout generated up to `horizon` tokens: exactly that many, or fewer ending at EOS."""
    assert len(completion) == horizon or (len(completion) < horizon and completion[-1] == EOS), (completion, horizon)


@pytest.mark.parametrize("policy", ["truncated", "progressive", "anchored", "adaptive"])
def test_engine_generates_exactly_each_steps_horizon(tmp_path, student_dir, tokenizer, prompts, policy):
    trainer = build(tmp_path, student_dir, tokenizer, prompts, max_steps=4, **POLICY_SETTINGS[policy])
    calls = record_engine_calls(trainer)
    trainer.train()

    assert [c["step"] for c in calls] == [0, 1, 2, 3]  # one generation batch per optimizer step
    for call, horizon in zip(calls, trainer.horizon_history, strict=True):
        assert horizon == horizon_at(call["step"], 4, trainer.horizon_policy) or policy == "adaptive"
        assert call["max_tokens"] == horizon
        assert len(call["completions"]) == 8
        for completion in call["completions"]:
            assert_ends_at(completion, horizon)
        assert max(len(c) for c in call["completions"]) == horizon  # not vacuous: most rollouts reach it
    assert min(trainer.horizon_history) < L  # the engine was given less than L
    if policy != "truncated":  # the others move their horizon within these 4 steps
        assert len(set(trainer.horizon_history)) > 1


def test_rolling_sends_each_slots_context_and_gets_one_chunk(tmp_path, student_dir, tokenizer, prompts):
    trainer = build(tmp_path, student_dir, tokenizer, prompts, horizon="rolling", truncation_ratio=0.25, max_steps=5)
    calls = record_engine_calls(trainer)
    trainer.train()

    chunk = math.ceil(0.25 * L)
    prompt_ids = {tuple(tokenizer(p)["input_ids"]) for p in prompts["prompt"]}
    continued = 0
    for before, after in zip(calls, calls[1:]):
        assert len(before["prompts"]) == len(after["prompts"]) == 8  # every slot, every step
        assert before["max_tokens"] == chunk
        for context, completion, remaining, next_context in zip(before["prompts"], before["completions"],
                                                                before["remaining"], after["prompts"]):
            assert_ends_at(completion, chunk)
            kept = completion[:remaining]  # the pool cuts a chunk at the slot's budget
            if EOS not in kept and len(kept) < remaining:  # the rollout goes on: its context grows by the chunk
                assert next_context == context + kept
                continued += 1
            else:  # it ended: the slot starts the stream's next prompt
                assert tuple(next_context) in prompt_ids
    assert continued >= 8 * 2  # contexts grew over 3+ consecutive steps
    # the engine re-encodes every context after each weight sync: TRL resets its prefix cache
    cost = trainer.cost.state_dict()
    assert cost["prefill_tokens"] == sum(len(p) for call in calls for p in call["prompts"])
    assert 0 <= cost["prefill_cached_tokens"] < cost["prefill_tokens"]


def test_weights_reach_the_engine_every_step(tmp_path, student_dir, tokenizer, prompts):
    """At each step's generation the engine's log-probs of its greedy rollouts equal the HF student's under the
    current weights, which moved (lr 1e-2): a missed sync would leave the engine on older weights."""
    trainer = build(tmp_path, student_dir, tokenizer, prompts, horizon="truncated", truncation_ratio=0.5, max_steps=3,
                    learning_rate=1e-2)
    llm, generate, seen = trainer.vllm_generation.llm, trainer.vllm_generation.generate, []

    def checking(*args, **kwargs):
        prompt_ids = kwargs["prompts"]
        params = vllm.SamplingParams(temperature=0.0, max_tokens=6, logprobs=0)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids[:3]], params, use_tqdm=False)
        model = trainer.accelerator.unwrap_model(trainer.model)
        for ids, output in zip(prompt_ids, outputs):
            tokens = list(output.outputs[0].token_ids)
            engine = torch.tensor([next(iter(lp.values())).logprob for lp in output.outputs[0].logprobs])
            with torch.no_grad():
                logits = model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1:-1]
            hf = torch.log_softmax(logits.float(), -1)
            assert tokens == hf.argmax(-1).tolist()  # greedy: the same tokens
            torch.testing.assert_close(engine, hf.gather(-1, torch.tensor(tokens)[:, None])[:, 0], atol=1e-4, rtol=0)
            seen.append(engine)
        return generate(*args, **kwargs)

    trainer.vllm_generation.generate = checking
    trainer.train()
    assert len(seen) == 9
    assert not torch.allclose(seen[0], seen[-3], atol=1e-3)  # the weights moved between the first and last step


def test_ledger_counts_what_the_engine_did(tmp_path, student_dir, tokenizer, prompts):
    trainer = build(tmp_path, student_dir, tokenizer, prompts, **POLICY_SETTINGS["progressive"])
    calls = record_engine_calls(trainer)
    trainer.train()
    cost = trainer.cost.state_dict()
    assert cost["steps"] == 4
    assert cost["decode_iterations"] == sum(max(len(c) for c in call["completions"]) for call in calls)
    assert cost["generated_tokens"] == sum(len(c) for call in calls for c in call["completions"])
    assert cost["prefill_tokens"] == sum(len(p) for call in calls for p in call["prompts"])
    # identical prompts in one batch share their cached blocks at most; nothing survives a step's weight sync
    assert 0 <= cost["prefill_cached_tokens"] < cost["prefill_tokens"]


def test_prefix_cache_count_is_the_engines(tmp_path, student_dir, tokenizer, prompts):
    """The ledger's cached count is vLLM's own: a second request of the same long context before any sync hits the
    cache, and `count_prefix_cache_hits` reports it."""
    trainer = build(tmp_path, student_dir, tokenizer, prompts, max_steps=1, vllm_max_model_length=512)
    llm = trainer.vllm_generation.llm
    block = llm.llm_engine.vllm_config.cache_config.block_size
    context = tokenizer("1234567890" * (block // 5))["input_ids"]  # two blocks' worth
    trainer.model.train()  # the ledger counts training's generations
    params = vllm.SamplingParams(temperature=0.0, max_tokens=1)
    before = trainer._meters["train"].counts["prefill_cached_tokens"]
    llm.generate([{"prompt_token_ids": context}], params, use_tqdm=False)
    llm.generate([{"prompt_token_ids": context}], params, use_tqdm=False)
    cached = trainer._meters["train"].counts["prefill_cached_tokens"] - before
    assert 0 < cached < len(context)  # whole blocks of the context, not its last token


def test_the_student_memory_keeps_the_engines_prefix_cache_across_syncs(tmp_path, student_dir, tokenizer, prompts):
    """rolling_student_memory on the engine: TRL's reset after each weight sync is skipped (every second step with
    rolling_memory_refresh_every=2), so a continuing slot's context blocks are served from the cache."""
    # a block is 128 tokens on the CPU backend: each prompt fills one (the char tokenizer: one token per character)
    long_prompts = Dataset.from_dict({"prompt": [f"{i} + {i + 1} = " * 16 for i in range(16)]})
    cached = {}
    for name, memory in (("exact", {}), ("kept", {"rolling_student_memory": True}),
                         ("refresh", {"rolling_student_memory": True, "rolling_memory_refresh_every": 2})):
        trainer = build(tmp_path / name, student_dir, tokenizer, long_prompts, horizon="rolling",
                        truncation_ratio=0.25, max_steps=6, vllm_max_model_length=512, **memory)
        trainer.train()
        cached[name] = (trainer.cost.prefill_cached_tokens, trainer.cost.prefill_tokens)
    assert cached["exact"][0] < cached["kept"][0] < cached["kept"][1]  # whole blocks of the contexts, not all
    assert cached["exact"][0] < cached["refresh"][0] < cached["kept"][0]


@pytest.mark.parametrize("horizon", ["progressive", "rolling"])
def test_resume_from_checkpoint(tmp_path, student_dir, tokenizer, prompts, horizon):
    settings = POLICY_SETTINGS.get(horizon, {"horizon": "rolling", "truncation_ratio": 0.25})
    full = build(tmp_path / "full", student_dir, tokenizer, prompts, max_steps=4, save_strategy="steps",
                 save_steps=2, **settings)
    full_calls = record_engine_calls(full)
    full.train()
    resumed = build(tmp_path / "resumed", student_dir, tokenizer, prompts, max_steps=4, **settings)
    resumed_calls = record_engine_calls(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-2"))

    assert [c["step"] for c in resumed_calls] == [2, 3]
    assert resumed.horizon_history == full.horizon_history
    assert resumed.cost.state_dict()["steps"] == 4
    if horizon == "rolling":  # the engine continues the rollouts in flight: the same contexts as without the stop
        assert resumed_calls[0]["prompts"] == full_calls[2]["prompts"]


def test_two_teachers_train_on_vllm_rollouts(tmp_path, student_dir, tokenizer):
    rows = [{"prompt": f"{i} + {i + 1} =", "teacher_id": "ab"[i % 2]} for i in range(16)]
    teachers = {"a": tiny_causal_lm(len(tokenizer), hidden_size=48, seed=1),
                "b": tiny_causal_lm(len(tokenizer), hidden_size=48, seed=2)}
    trainer = build(tmp_path, student_dir, tokenizer, Dataset.from_list(rows), teacher=teachers,
                    horizon="rolling", truncation_ratio=0.25, max_steps=3)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [e for e in trainer.state.log_history if "teachers/a/kl" in e]
    assert len(logs) == 3 and all(math.isfinite(e["teachers/a/kl"]) and math.isfinite(e["teachers/b/kl"]) for e in logs)
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_engine_greedy_rollouts_equal_hf_generate(tmp_path, student_dir, tokenizer, prompts):
    """Same weights, same greedy rollouts, stopped at the same EOS: what differs between the two paths is only what
    TRL passes (sampling parameters; the engine's dtype, see the fixture)."""
    trainer = build(tmp_path, student_dir, tokenizer, prompts, max_steps=1)
    trainer.vllm_generation.sync_weights()
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts["prompt"][:4]]
    params = vllm.SamplingParams(temperature=0.0, max_tokens=L)
    engine = [list(o.outputs[0].token_ids) for o in trainer.vllm_generation.llm.generate(
        [{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)]
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    for ids, tokens in zip(prompt_ids, engine):
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=L, do_sample=False, eos_token_id=EOS,
                                 pad_token_id=0)
        assert tokens == out[0, len(ids):].tolist()
