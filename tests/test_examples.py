"""examples/distill.py runs as a user would run it (a fresh process, flags parsed by TrlParser) for 2 steps: full
fine-tuning and LoRA with the merged export; and every config field is a flag."""

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict
from peft import PeftModel
from transformers import AutoModelForCausalLM
from trl import ModelConfig

from testing_utils import tiny_causal_lm
from horizon_opd import HorizonOPDConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = REPO_ROOT / "examples" / "distill.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("distill_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer):
    """Tiny models with a saved tokenizer and a prompt DatasetDict, on disk the way the script reads them."""
    root = tmp_path_factory.mktemp("example")
    tiny_causal_lm(len(tokenizer), hidden_size=32, seed=0).save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    tiny_causal_lm(len(tokenizer), hidden_size=48, seed=1).save_pretrained(root / "teacher")
    prompts = [[{"role": "user", "content": f"add {i} {i + 2}"}] for i in range(16)]
    DatasetDict(train=Dataset.from_dict({"prompt": prompts[:12]}),
                test=Dataset.from_dict({"prompt": prompts[12:]})).save_to_disk(root / "prompts")
    return root


def run_example(*flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "2"}
    run = subprocess.run([sys.executable, str(EXAMPLE), *flags], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return run


def _flags(assets, output_dir, *extra):
    return ["--model_name_or_path", str(assets / "student"), "--teacher_model_name_or_path", str(assets / "teacher"),
            "--dataset_name", str(assets / "prompts"), "--output_dir", str(output_dir), "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--max_completion_length", "8", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", *extra]


def test_example_distills_for_two_steps(assets, tmp_path):
    run_example(*_flags(assets, tmp_path / "out", "--horizon", "truncated", "--truncation_ratio", "0.5"))
    assert (tmp_path / "out" / "model.safetensors").exists()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Distillation setup" in card and "`truncated` (TOPD)" in card and "= 4 tokens" in card
    assert "| reverse KL (last logged step) |" in card


def test_example_with_lora_saves_the_adapter_and_the_merged_model(assets, tmp_path):
    run_example(*_flags(assets, tmp_path / "out", "--horizon", "progressive", "--progressive_start_ratio", "0.25",
                        "--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj",
                        "v_proj", "--merged_output_dir", str(tmp_path / "merged")))
    saved = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved and "model.safetensors" not in saved
    assert "`progressive` (POPD)" in (tmp_path / "out" / "README.md").read_text()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not isinstance(merged, PeftModel) and (tmp_path / "merged" / "tokenizer.json").exists()


def test_every_config_field_is_a_flag():
    parser = _load_example().make_parser()
    flags = {option for action in parser._actions for option in action.option_strings}
    for config in (HorizonOPDConfig, ModelConfig):
        missing = [f.name for f in dataclasses.fields(config) if f.init and f"--{f.name}" not in flags]
        assert not missing, (config.__name__, missing)
    assert {"--dataset_name", "--teacher_model_name_or_path", "--use_peft", "--lora_r", "--merged_output_dir",
            "--horizon", "--truncation_ratio", "--progressive_schedule"} <= flags
    assert "accelerate launch --config_file examples/accelerate/zero3.yaml" in _load_example().__doc__


def test_example_runs_on_the_embedded_demo(tmp_path):
    example = _load_example()
    if example.demo_default("STUDENT_PATH") is None or example.demo_default("build_datasets") is None:
        pytest.skip("the embedded demo models are not bundled in this checkout yet")
    run_example("--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "4",
                "--max_completion_length", "16", "--report_to", "none", "--save_strategy", "no",
                "--disable_tqdm", "true", "--horizon", "truncated", "--truncation_ratio", "0.25")
    assert (tmp_path / "out" / "model.safetensors").exists()
