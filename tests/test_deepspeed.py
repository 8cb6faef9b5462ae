"""DeepSpeed ZeRO through `accelerate launch`: two CPU processes train for real (gloo, DeepSpeed's CPU accelerator) with
the shipped configs in examples/accelerate/, and the construction-time checks for teachers DeepSpeed cannot take.

The launches are `slow` (about 15 s each here); CI runs them. Each rank of tests/ds_train_script.py writes what it
generated and logged, and the tests compare the ranks."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from datasets import Dataset
from safetensors.torch import load_file

from conftest import tiny_causal_lm
from helpers import make_args
from horizon_opd import HorizonOPDTrainer
from horizon_opd.horizon import HorizonSchedule
from horizon_opd.trainer import _check_deepspeed_processes, _check_heads_share_a_device, _check_teacher_for_deepspeed

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "examples" / "accelerate"
TRAIN_ARGS = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_completion_length=8,
                  learning_rate=1e-3, logging_steps=1, report_to="none", bf16=False, gradient_checkpointing=False,
                  disable_tqdm=True, seed=0, ddp_backend="gloo", save_strategy="steps")


# ----------------------------------------------------------------------------------------------- configs and checks
@pytest.mark.parametrize("name, stage, offload", [("zero2", 2, "none"), ("zero3", 3, "none"),
                                                  ("zero3_offload", 3, "cpu")])
def test_shipped_accelerate_configs_load(name, stage, offload):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type == "DEEPSPEED" and config.num_processes == 8 and config.mixed_precision == "bf16"
    ds = config.deepspeed_config
    assert ds["zero_stage"] == stage
    assert ds["offload_optimizer_device"] == ds["offload_param_device"] == offload
    assert ds.get("zero3_init_flag", False) == (stage == 3)


def test_trl_zero3_seams_we_rely_on():
    """The ZeRO-3 vocabulary slice marks its copy with `ds_status`, which TRL's kernels read to skip the gather."""
    import inspect

    from trl.kernels import chunked_divergence
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    assert "p.ds_status != ZeroParamStatus.AVAILABLE" in inspect.getsource(maybe_gather_lm_head_ctx)
    assert "maybe_gather_lm_head_ctx(teacher_weight, teacher_bias)" in inspect.getsource(chunked_divergence)


def test_teachers_deepspeed_cannot_take_are_rejected_with_the_fix():
    dispatched = SimpleNamespace(hf_device_map={"model.embed_tokens": 0, "model.layers": 1, "lm_head": 1})
    with pytest.raises(ValueError, match=r"dispatched over several devices.*Load it with device_map=None"):
        _check_teacher_for_deepspeed(dispatched, 2)
    quantized = SimpleNamespace(is_loaded_in_4bit=True)
    with pytest.raises(ValueError, match=r"quantized \(4-bit\).*cannot be prepared for ZeRO-3.*use ZeRO-2"):
        _check_teacher_for_deepspeed(quantized, 3)
    _check_teacher_for_deepspeed(quantized, 2)  # replicated, not partitioned: ZeRO-2 leaves it alone
    _check_teacher_for_deepspeed(SimpleNamespace(hf_device_map={"": 0}), 3)  # one device: nothing to undo


def test_a_launch_that_would_train_alone_names_the_backend(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"started 2 DeepSpeed processes but this one sees a world of 1.*gloo"):
        _check_deepspeed_processes(SimpleNamespace(world_size=1))
    _check_deepspeed_processes(SimpleNamespace(world_size=2))


def _model_with_head_on(device: str):
    weight = SimpleNamespace(device=torch.device(device))
    return SimpleNamespace(get_output_embeddings=lambda: SimpleNamespace(weight=weight), hf_device_map={"": device})


def test_heads_on_different_devices_are_rejected_with_the_fix(tmp_path, student, teacher, tokenizer, prompts):
    # an offloaded head (device_map sent lm_head to disk: its weight is a meta tensor), caught at construction
    teacher.lm_head.to("meta")
    teacher.hf_device_map = {"model": "cpu", "lm_head": "disk"}
    with pytest.raises(ValueError, match=r"teacher lm_head is offloaded.*give 'lm_head' a device in the device_map"):
        HorizonOPDTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path), train_dataset=prompts,
                          processing_class=tokenizer)
    # there is no second device here: the same check on stand-ins whose heads report two GPUs
    with pytest.raises(ValueError, match=r"student lm_head is on cuda:0 but the teacher lm_head is on cuda:1.*"
                                         r"puts 'lm_head' on cuda:0"):
        _check_heads_share_a_device(_model_with_head_on("cuda:0"), _model_with_head_on("cuda:1"))


# ----------------------------------------------------------------------------------------------- real launches
@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("ds")
    vocab = len(tokenizer)
    # teacher vocabulary padded past the tokenizer (like 151936 vs 152064), and the other way round
    tiny_causal_lm(vocab, hidden_size=32, seed=0).save_pretrained(root / "student")
    tiny_causal_lm(vocab + 25, hidden_size=48, seed=1).save_pretrained(root / "teacher_padded")
    tiny_causal_lm(vocab + 25, hidden_size=32, seed=0).save_pretrained(root / "student_padded")
    tiny_causal_lm(vocab, hidden_size=48, seed=1).save_pretrained(root / "teacher")
    Dataset.from_dict({"prompt": [f"{i} + {i + 1} =" for i in range(16)]}).save_to_disk(root / "prompts")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(assets, name: str, config: str, student: str, teacher: str, **settings) -> list[dict]:
    """`accelerate launch` the shipped `config`, adapted to 2 CPU processes, on tests/ds_train_script.py."""
    run_dir = assets / name
    run_dir.mkdir()
    accelerate_config = yaml.safe_load((CONFIGS / f"{config}.yaml").read_text())
    accelerate_config.update(num_processes=2, use_cpu=True, mixed_precision="no")
    (run_dir / "accelerate.yaml").write_text(yaml.safe_dump(accelerate_config))
    settings = {"student": str(assets / student), "teacher": str(assets / teacher), "dataset": str(assets / "prompts"),
                "output_dir": str(run_dir / "out"), "result_dir": str(run_dir / "result"), **settings}
    settings["args"] = {**TRAIN_ARGS, **settings["args"]}
    (run_dir / "settings.json").write_text(json.dumps(settings))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(run_dir / "accelerate.yaml"),
               "--main_process_port", str(_free_port()), str(Path(__file__).parent / "ds_train_script.py"),
               str(run_dir / "settings.json")]
    # a rank stuck in a collective would hang forever: the timeout turns that into a failure
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-8000:]
    return [json.loads((run_dir / "result" / f"rank{r}.json").read_text()) for r in range(2)]


def _logged(result, key):
    return [entry[key] for entry in result["log_history"] if key in entry]


def _assert_ranks_agree(ranks, steps, horizons):
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["global_step"] == steps
        assert [g["horizon"] for g in rank["generations"]] == horizons
        losses = _logged(rank, "loss")
        assert len(losses) == len(horizons) and all(math.isfinite(v) for v in losses)
        assert max(max(g["completion_lengths"]) for g in rank["generations"]) <= max(horizons)
    # logged metrics are reduced over ranks: both logs must be the same
    for key in ("loss", "horizon/tokens", "completions/mean_length"):
        assert _logged(ranks[0], key) == _logged(ranks[1], key), key


@pytest.mark.slow
def test_zero3_progressive_with_uneven_rollouts_checkpoints_and_resumes(assets, tokenizer):
    progressive = dict(horizon="progressive", progressive_start_ratio=0.25, progressive_ramp_fraction=1.0)
    args = dict(max_steps=4, save_steps=2, ds3_gather_for_generation=False, **progressive)
    schedule = HorizonSchedule(mode="progressive", max_completion_length=8, progressive_start_ratio=0.25,
                               progressive_ramp_fraction=1.0)
    horizons = [schedule.tokens_at(step, 4) for step in range(4)]
    assert horizons == [2, 4, 5, 7]

    # Rank 1's rollouts all end at their first token (EOS); rank 0's run to the horizon. Without gathering the ZeRO-3
    # weights for generation, every decoding step is a collective, so this hangs unless generate syncs the ranks.
    first = launch(assets, "zero3_progressive", "zero3", "student", "teacher_padded", args=args, eos_rank=1,
                   check_bad_teacher=True)
    _assert_ranks_agree(first, 4, horizons)
    assert all(g["completion_lengths"] == [1] * 4 for g in first[1]["generations"])
    assert all(max(g["completion_lengths"]) == g["horizon"] for g in first[0]["generations"])
    assert all(rank["zero_stage"] == 3 and rank["teacher_head_partitioned"] for rank in first)
    assert first[0]["shared_vocab_size"] == len(tokenizer)
    assert "cannot be prepared for ZeRO-3" in first[0]["bad_teacher_error"]

    checkpoint = assets / "zero3_progressive" / "out" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "global_step2").is_dir()
    assert (checkpoint / "trainer_state.json").exists()
    initial = load_file(assets / "student" / "model.safetensors")
    saved = load_file(checkpoint / "model.safetensors")
    assert not torch.equal(initial["lm_head.weight"], saved["lm_head.weight"])  # the student trained

    resumed = launch(assets, "zero3_resume", "zero3", "student", "teacher_padded", args=args, eos_rank=1,
                     resume_from=str(checkpoint))
    for rank in resumed:
        assert rank["global_step"] == 4
        assert [g["step"] for g in rank["generations"]] == [2, 3]
        assert [g["horizon"] for g in rank["generations"]] == horizons[2:]
        assert _logged(rank, "horizon/tokens") == horizons  # restored history + new steps read as one run
        losses = _logged(rank, "loss")
        assert len(losses) == 4 and all(math.isfinite(v) for v in losses)


@pytest.mark.slow
def test_zero3_truncated_trains_a_student_with_a_padded_vocabulary(assets, tokenizer):
    """A padded student head is gathered, sliced and copied per micro-batch; its gradient must still reach the
    ZeRO-3 partitioned parameter: the shared rows train, the padding rows (no gradient) stay as they were."""
    ranks = launch(assets, "zero3_truncated", "zero3", "student_padded", "teacher",
                   args=dict(max_steps=2, save_steps=2, horizon="truncated", truncation_ratio=0.5))
    _assert_ranks_agree(ranks, 2, [4, 4])
    vocab = len(tokenizer)
    before = load_file(assets / "student_padded" / "model.safetensors")["lm_head.weight"]
    after = load_file(assets / "zero3_truncated" / "out" / "checkpoint-2" / "model.safetensors")["lm_head.weight"]
    assert not torch.equal(before[:vocab], after[:vocab])
    assert torch.equal(before[vocab:], after[vocab:])


@pytest.mark.slow
def test_zero2_progressive_stages_with_a_padded_teacher(assets):
    args = dict(max_steps=2, save_steps=2, horizon="progressive", progressive_schedule="stages",
                progressive_stage_ratios=[0.5, 1.0], progressive_stage_fractions=[0.0, 0.5])
    ranks = launch(assets, "zero2", "zero2", "student", "teacher_padded", args=args)
    _assert_ranks_agree(ranks, 2, [4, 8])
    assert all(rank["zero_stage"] == 2 and not rank["teacher_head_partitioned"] for rank in ranks)
    checkpoint = assets / "zero2" / "out" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "global_step2").is_dir()
