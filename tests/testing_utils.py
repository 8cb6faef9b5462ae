"""Shared test helpers (like TRL's `tests/testing_utils.py`): tiny models, trainer configs, a recorder of generated
batches, and `accelerate launch` of the multi-process scripts in tests/distributed/.

Imported as `from testing_utils import ...` (pytest puts tests/ on sys.path); tests/conftest.py holds fixtures only.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from transformers import Qwen2Config, Qwen2ForCausalLM

from horizon_opd import HorizonOPDConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = REPO_ROOT / "examples" / "accelerate"
DISTRIBUTED_SCRIPTS = Path(__file__).resolve().parent / "distributed"


# ----------------------------------------------------------------------------------------------- models and configs
def tiny_causal_lm(vocab_size: int, hidden_size: int = 32, seed: int = 0, num_layers: int = 2,
                   max_position_embeddings: int = 512) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 small enough to train in milliseconds on a CPU."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return Qwen2ForCausalLM(config).eval()


# One setting per horizon policy but "rolling" (whose prompt stream is tested apart, tests/test_rolling.py): short
# horizons at L = 16 that every policy reaches within a few steps.
POLICY_SETTINGS = {
    "full": {"horizon": "full"},
    "truncated": {"horizon": "truncated", "truncation_ratio": 0.25},
    "progressive": {"horizon": "progressive", "progressive_start_ratio": 0.125, "progressive_ramp_fraction": 0.5},
    "anchored": {"horizon": "anchored", "truncation_ratio": 0.25, "anchor_every": 2},
    "adaptive": {"horizon": "adaptive", "adaptive_probe_every": 2, "adaptive_min_ratio": 0.25},
}


def make_args(output_dir, **overrides) -> HorizonOPDConfig:
    defaults = dict(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=4,
        max_completion_length=16,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,  # exact float32 comparisons
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=0,
    )
    defaults.update(overrides)
    return HorizonOPDConfig(output_dir=str(output_dir), **defaults)


def record_generations(trainer) -> list[dict]:
    """Wrap the trainer's generation so every generated batch is kept, with the horizon and step it was made at."""
    records = []
    generate_and_score = trainer._generate_and_score_completions

    def recording(inputs):
        batch = generate_and_score(inputs)
        records.append(
            {
                "step": trainer.state.global_step,
                "horizon": trainer.current_horizon(),
                **{k: v.detach().clone() for k, v in batch.items() if isinstance(v, torch.Tensor)},
            }
        )
        return batch

    trainer._generate_and_score_completions = recording
    return records


def loss_and_grads(trainer, batch: dict):
    """The trainer's loss on `batch` and the student's gradients (by parameter name) from one backward."""
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def logged(trainer, key) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


# ----------------------------------------------------------------------------------------------- multi-process launches
def save_launch_assets(root: Path, vocab_size: int) -> Path:
    """Tiny models and prompts on disk for launched scripts: a student and a teacher over `vocab_size`, and each with
    a head padded by 25 rows past the tokenizer (like Qwen2.5-1.5B's 151936 against Qwen2.5-7B's 152064)."""
    from datasets import Dataset

    root = Path(root)
    tiny_causal_lm(vocab_size, hidden_size=32, seed=0).save_pretrained(root / "student")
    tiny_causal_lm(vocab_size + 25, hidden_size=48, seed=1).save_pretrained(root / "teacher_padded")
    tiny_causal_lm(vocab_size + 25, hidden_size=32, seed=0).save_pretrained(root / "student_padded")
    tiny_causal_lm(vocab_size, hidden_size=48, seed=1).save_pretrained(root / "teacher")
    Dataset.from_dict({"prompt": [f"{i} + {i + 1} =" for i in range(16)]}).save_to_disk(root / "prompts")
    return root


def read_ranks(result_dir: Path, num_processes: int = 2) -> list[dict]:
    """What each rank of tests/distributed/ds_train_script.py wrote."""
    return [json.loads((Path(result_dir) / f"rank{r}.json").read_text()) for r in range(num_processes)]


# What tests/distributed/ds_train_script.py trains with unless a test overrides it.
LAUNCH_TRAIN_ARGS = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_completion_length=8,
                         learning_rate=1e-3, logging_steps=1, report_to="none", bf16=False, gradient_checkpointing=False,
                         disable_tqdm=True, seed=0, ddp_backend="gloo", save_strategy="steps")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_accelerate(config: str | dict, script: str, settings: dict, run_dir: Path, timeout: float = 300,
                      num_processes: int = 2, cpu: bool = True) -> subprocess.CompletedProcess:
    """`accelerate launch` tests/distributed/`script` on `num_processes` processes with `settings` as JSON: CPU
    processes (gloo, DeepSpeed's CPU accelerator, GPUs hidden) unless `cpu=False`.

    `config` is a shipped config's name in examples/accelerate/ (adapted: no mixed precision, and `use_cpu` on CPU) or
    an accelerate config dict. Returns the finished process (not checked: callers assert on it). A rank stuck in a
    collective would hang forever: `timeout` turns that into `subprocess.TimeoutExpired`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(config, str):
        config = yaml.safe_load((ACCELERATE_CONFIGS / f"{config}.yaml").read_text())
        config.update(use_cpu=cpu, mixed_precision="no")
    config = {**config, "num_processes": num_processes}
    (run_dir / "accelerate.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "settings.json").write_text(json.dumps(settings))
    tests_dir = str(Path(__file__).resolve().parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), tests_dir]),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if cpu:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(run_dir / "accelerate.yaml"),
               "--main_process_port", str(free_port()), str(DISTRIBUTED_SCRIPTS / script),
               str(run_dir / "settings.json")]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def end_launched_process() -> None:
    """The last call of a launched script (tests/distributed/), once its results are on disk: wait for the other
    ranks, destroy the process group and leave without the interpreter's teardown.

    Why not a plain return: gloo's worker threads outlive `destroy_process_group` (the C++ group is still referenced),
    and a worker that finishes a collective releases its tensors' Python objects, which takes the GIL. If the
    interpreter is finalizing by then (the trainer's last all_gather, `store_flos`, ends a few ms before the script
    does), the thread is ended inside a noexcept destructor and the rank aborts after a run that succeeded
    ("terminate called without an active exception", SIGABRT). The barrier blocks with the GIL released, so a worker
    still releasing a finished collective gets it back before the group goes; `os._exit` then skips the finalization
    no worker thread can be joined before."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch_output(run: subprocess.CompletedProcess) -> str:
    """The end of a launch's output, for assertion messages."""
    return run.stdout[-3000:] + run.stderr[-8000:]


def launch_training(assets: Path, name: str, config: str | dict, student: str, teacher: str | dict, cpu: bool = True,
                    **settings):
    """`accelerate launch` tests/distributed/ds_train_script.py with `config` (a shipped one's name, adapted to 2 CPU
    processes unless `cpu=False`, or a dict) on the models `student` and `teacher` (or {name: teacher}) in `assets`
    (`save_launch_assets`); fails with the
    launch's output unless it exits cleanly. Returns both ranks' results, or {run name: results} when `settings` has
    `runs`."""
    run_dir = assets / name
    teacher = {k: str(assets / v) for k, v in teacher.items()} if isinstance(teacher, dict) else str(assets / teacher)
    settings = {"student": str(assets / student), "teacher": teacher, "dataset": str(assets / "prompts"),
                "output_dir": str(run_dir / "out"), "result_dir": str(run_dir / "result"), **settings}
    settings["args"] = {**LAUNCH_TRAIN_ARGS, **settings.get("args", {})}
    run = launch_accelerate(config, "ds_train_script.py", settings, run_dir, cpu=cpu)
    assert run.returncode == 0, launch_output(run)
    if "runs" in settings:
        return {r["name"]: read_ranks(run_dir / "result" / r["name"]) for r in settings["runs"]}
    return read_ranks(run_dir / "result")


def logged_in(result: dict, key: str) -> list[float]:
    """The values of `key` in a launched rank's log history."""
    return [entry[key] for entry in result["log_history"] if key in entry]


def assert_ranks_agree(ranks: list[dict], steps: int, horizons: list[int]) -> None:
    """Both ranks trained `steps` steps at `horizons`, with finite losses, and logged the same reduced metrics."""
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["global_step"] == steps
        assert [g["horizon"] for g in rank["generations"]] == horizons
        losses = logged_in(rank, "loss")
        assert len(losses) == len(horizons) and all(math.isfinite(v) for v in losses)
        assert max(max(g["completion_lengths"]) for g in rank["generations"]) <= max(horizons)
    # logged metrics are reduced over ranks: both logs must be the same
    for key in ("loss", "horizon/tokens", "completions/mean_length"):
        assert logged_in(ranks[0], key) == logged_in(ranks[1], key), key
