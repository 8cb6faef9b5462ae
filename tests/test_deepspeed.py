"""DeepSpeed ZeRO through `accelerate launch`: two CPU processes train for real (gloo, DeepSpeed's CPU accelerator) with
the shipped configs in examples/accelerate/, and the construction-time checks for teachers DeepSpeed cannot take.

The launches are `slow` (about 15 s each here); CI runs them. Each rank of tests/distributed/ds_train_script.py
writes what it generated and logged, and the tests compare the ranks."""

import math
import os
from types import SimpleNamespace

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from safetensors.torch import load_file
from testing_utils import (
    ACCELERATE_CONFIGS,
    assert_ranks_agree,
    launch_training,
    logged_in,
    make_args,
    save_launch_assets,
)

from horizon_opd import HorizonOPDTrainer
from horizon_opd import HorizonOPDConfig
from horizon_opd.horizon import ProgressiveHorizon, horizon_at
from horizon_opd.teachers.local import check_heads_share_a_device, check_teacher_for_deepspeed


# ----------------------------------------------------------------------------------------------- configs and checks
@pytest.mark.parametrize("name, stage, offload", [("zero2", 2, "none"), ("zero3", 3, "none"),
                                                  ("zero3_offload", 3, "cpu")])
def test_shipped_accelerate_configs_load(name, stage, offload):
    config = load_config_from_file(str(ACCELERATE_CONFIGS / f"{name}.yaml"))
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
        check_teacher_for_deepspeed(dispatched, 2)
    quantized = SimpleNamespace(is_loaded_in_4bit=True)
    with pytest.raises(ValueError, match=r"quantized \(4-bit\).*cannot be prepared for ZeRO-3.*use ZeRO-2"):
        check_teacher_for_deepspeed(quantized, 3)
    check_teacher_for_deepspeed(quantized, 2)  # replicated, not partitioned: ZeRO-2 leaves it alone
    check_teacher_for_deepspeed(SimpleNamespace(hf_device_map={"": 0}), 3)  # one device: nothing to undo


def test_a_launch_that_would_train_alone_names_the_backend(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"started 2 DeepSpeed processes but this one sees a world of 1.*gloo"):
        HorizonOPDConfig._check_deepspeed_processes(SimpleNamespace(world_size=1))
    HorizonOPDConfig._check_deepspeed_processes(SimpleNamespace(world_size=2))


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
        check_heads_share_a_device(_model_with_head_on("cuda:0"), _model_with_head_on("cuda:1"))


# ----------------------------------------------------------------------------------------------- real launches
@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer):
    # teacher vocabulary padded past the tokenizer (like 151936 vs 152064), and the other way round
    return save_launch_assets(tmp_path_factory.mktemp("ds"), len(tokenizer))


@pytest.mark.slow
def test_zero3_progressive_with_uneven_rollouts_checkpoints_and_resumes(assets, tokenizer):
    progressive = dict(horizon="progressive", progressive_start_ratio=0.25, progressive_ramp_fraction=1.0)
    args = dict(max_steps=4, save_steps=2, ds3_gather_for_generation=False, **progressive)
    schedule = ProgressiveHorizon(max_completion_length=8, progressive_start_ratio=0.25,
                                  progressive_ramp_fraction=1.0)
    horizons = [horizon_at(step, 4, schedule) for step in range(4)]
    assert horizons == [2, 4, 5, 7]

    # Rank 1's rollouts all end at their first token (EOS); rank 0's run to the horizon. Without gathering the ZeRO-3
    # weights for generation, every decoding step is a collective, so this hangs unless generate syncs the ranks.
    first = launch_training(assets, "zero3_progressive", "zero3", "student", "teacher_padded", args=args, eos_rank=1,
                   check_bad_teacher=True)
    assert_ranks_agree(first, 4, horizons)
    assert all(g["completion_lengths"] == [1] * 4 for g in first[1]["generations"])
    assert all(max(g["completion_lengths"]) == g["horizon"] for g in first[0]["generations"])
    assert all(rank["zero_stage"] == 3 and rank["teacher_head_partitioned"] for rank in first)
    assert first[0]["shared_vocab_size"] == len(tokenizer)
    assert "cannot be prepared for ZeRO-3" in first[0]["bad_teacher_error"]
    # the cost ledger, by hand: rank 0 runs to the horizon, so each step waits horizon decode iterations; tokens and
    # trained positions are both ranks' rollouts (2 per micro-batch x 2 micro-batches per rank)
    tokens = sum(sum(g["completion_lengths"]) for rank in first for g in rank["generations"])
    for rank in first:
        step_logs = [e for e in rank["log_history"] if "loss" in e]
        assert [e["horizon/decode_iterations"] for e in step_logs] == [float(sum(horizons[:i + 1])) for i in range(4)]
        assert logged_in(rank, "horizon/generated_tokens")[-1] == tokens
        assert logged_in(rank, "horizon/trained_tokens")[-1] == tokens

    checkpoint = assets / "zero3_progressive" / "out" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "global_step2").is_dir()
    assert (checkpoint / "trainer_state.json").exists()
    initial = load_file(assets / "student" / "model.safetensors")
    saved = load_file(checkpoint / "model.safetensors")
    assert not torch.equal(initial["lm_head.weight"], saved["lm_head.weight"])  # the student trained

    resumed = launch_training(assets, "zero3_resume", "zero3", "student", "teacher_padded", args=args, eos_rank=1,
                     resume_from=str(checkpoint))
    for rank in resumed:
        assert rank["global_step"] == 4
        assert [g["step"] for g in rank["generations"]] == [2, 3]
        assert [g["horizon"] for g in rank["generations"]] == horizons[2:]
        assert logged_in(rank, "horizon/tokens") == horizons  # restored history + new steps read as one run
        assert logged_in(rank, "horizon/decode_iterations")[-1] == sum(horizons)  # the ledger resumed too
        losses = logged_in(rank, "loss")
        assert len(losses) == 4 and all(math.isfinite(v) for v in losses)


@pytest.mark.slow
def test_zero3_two_teachers_route_rolling_rollouts_and_resume(assets, tokenizer):
    """Two teachers under ZeRO-3 (both sharded; b's head padded past the tokenizer), prompts alternating between them,
    rolling rollouts; a second run resumes from the first one's checkpoint at step 2 in the same launch."""
    args = dict(horizon="rolling", truncation_ratio=0.25, max_steps=4, save_steps=2)
    first = "zero3_teachers/out/first/checkpoint-2"
    runs = launch_training(assets, "zero3_teachers", "zero3", "student", {"a": "teacher", "b": "teacher_padded"},
                           args=args, teacher_ids=["a", "b"] * 8,
                           runs=[{"name": "first"}, {"name": "resumed", "resume_from": str(assets / first)}])
    for rank in runs["first"]:
        assert rank["zero_stage"] == 3 and rank["global_step"] == 4 and rank["teacher_head_partitioned"]
        routes = [i for g in rank["generations"] for i in g["teacher_index"]]
        assert set(routes) == {0, 1}
        shares = [logged_in(rank, f"teachers/{n}/share") for n in ("a", "b")]
        assert all(a + b == pytest.approx(1.0) for a, b in zip(*shares, strict=True))
        ledger = rank["ledger"]
        assert sum(t["trained_tokens"] for t in ledger["teachers"].values()) == ledger["trained_tokens"] > 0
    for first_rank, resumed_rank in zip(runs["first"], runs["resumed"], strict=True):
        assert [g["step"] for g in resumed_rank["generations"]] == [2, 3]
        for a, b in zip(first_rank["generations"][2:], resumed_rank["generations"], strict=True):
            assert a["teacher_index"] == b["teacher_index"] and a["completion_ids"] == b["completion_ids"]
        assert logged_in(resumed_rank, "loss")[-2:] == pytest.approx(logged_in(first_rank, "loss")[-2:], abs=1e-5)
        for name in ("a", "b"):
            assert resumed_rank["ledger"]["teachers"][name]["trained_tokens"] == \
                first_rank["ledger"]["teachers"][name]["trained_tokens"]


@pytest.mark.slow
def test_zero3_rolling_caches_agree_with_reencoding_per_row(assets):
    """Under ZeRO-3 (2 ranks), both rolling caches on (the teacher's kept across steps, the student's read from
    generation) against both off: the same rollouts, each row's loss equal to 1e-5, the same gradient norms; and the
    student memory trains there, encoding fewer context tokens."""
    args = dict(horizon="rolling", truncation_ratio=0.25, max_steps=4, gradient_accumulation_steps=2)
    runs = launch_training(assets, "zero3_caches", "zero3", "student", "teacher", args=args, record_per_row=True,
                           runs=[{"name": "cached"},
                                 {"name": "uncached",
                                  "args": {"rolling_teacher_cache": False, "rolling_student_cache": False}},
                                 {"name": "memory", "args": {"rolling_student_memory": True}}])
    for memory, cached in zip(runs["memory"], runs["cached"], strict=True):  # the student memory trains under ZeRO-3
        assert memory["global_step"] == 4 and max(logged_in(memory, "rolling/memory_age_max")) >= 1
        assert memory["ledger"]["prefill_tokens"] < cached["ledger"]["prefill_tokens"]
    for cached, uncached in zip(runs["cached"], runs["uncached"], strict=True):
        assert cached["zero_stage"] == 3
        assert cached["ledger"]["teacher_tokens"] < uncached["ledger"]["teacher_tokens"]  # the caches were used
        assert cached["ledger"]["student_nograd_tokens"] == 0 < uncached["ledger"]["student_nograd_tokens"]
        assert [g["completion_ids"] for g in cached["generations"]] == \
            [g["completion_ids"] for g in uncached["generations"]]
        assert len(cached["per_row"]) == len(uncached["per_row"]) == 4 * 2
        for a, b in zip(cached["per_row"], uncached["per_row"], strict=True):
            assert a == pytest.approx(b, abs=1e-5, rel=1e-4)
        assert logged_in(cached, "grad_norm") == pytest.approx(logged_in(uncached, "grad_norm"), rel=1e-4)


@pytest.mark.slow
def test_zero3_truncated_trains_a_student_with_a_padded_vocabulary(assets, tokenizer):
    """A padded student head is gathered, sliced and copied per micro-batch; its gradient must still reach the
    ZeRO-3 partitioned parameter: the shared rows train, the padding rows (no gradient) stay as they were."""
    ranks = launch_training(assets, "zero3_truncated", "zero3", "student_padded", "teacher",
                   args=dict(max_steps=2, save_steps=2, horizon="truncated", truncation_ratio=0.5))
    assert_ranks_agree(ranks, 2, [4, 4])
    vocab = len(tokenizer)
    before = load_file(assets / "student_padded" / "model.safetensors")["lm_head.weight"]
    after = load_file(assets / "zero3_truncated" / "out" / "checkpoint-2" / "model.safetensors")["lm_head.weight"]
    assert not torch.equal(before[:vocab], after[:vocab])
    assert torch.equal(before[vocab:], after[vocab:])


def _cpu_adam_build_missing() -> str | None:
    """Why DeepSpeed's CPU Adam (needed to offload the optimizer) cannot be JIT-compiled here, or None."""
    import shutil

    if shutil.which("ninja") is None:
        return "ninja is not installed (pip install ninja; it is in the `test` extra)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH; install g++)"
    return None


@pytest.mark.slow
def test_zero3_offload_progressive_checkpoints_and_resumes(assets):
    """examples/accelerate/zero3_offload.yaml launched for real: optimizer states and parameters offloaded to CPU,
    DeepSpeedCPUAdam stepping. Its op is JIT-compiled with ninja on first use (about 80 s once; cached in
    ~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR, outside the repository)."""
    missing = _cpu_adam_build_missing()
    if missing:
        pytest.skip(f"zero3_offload.yaml needs DeepSpeed's CPU Adam, which cannot be built here: {missing}")
    args = dict(max_steps=4, save_steps=2, horizon="progressive", progressive_start_ratio=0.25,
                progressive_ramp_fraction=1.0)
    first = launch_training(assets, "zero3_offload", "zero3_offload", "student", "teacher_padded", args=args)
    assert_ranks_agree(first, 4, [2, 4, 5, 7])
    for rank in first:
        assert rank["zero_stage"] == 3 and rank["teacher_head_partitioned"]
        assert rank["offload"] == {"optimizer": "cpu", "param": "cpu"}
        assert rank["base_optimizer"] == "DeepSpeedCPUAdam"
    checkpoint = assets / "zero3_offload" / "out" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "global_step2").is_dir()
    initial = load_file(assets / "student" / "model.safetensors")
    saved = load_file(checkpoint / "model.safetensors")
    assert not torch.equal(initial["lm_head.weight"], saved["lm_head.weight"])  # the student trained

    resumed = launch_training(assets, "zero3_offload_resume", "zero3_offload", "student", "teacher_padded", args=args,
                              resume_from=str(checkpoint))
    for rank in resumed:
        assert rank["global_step"] == 4 and [g["step"] for g in rank["generations"]] == [2, 3]
        assert [g["horizon"] for g in rank["generations"]] == [5, 7]
        assert logged_in(rank, "horizon/tokens") == [2, 4, 5, 7]
        assert all(math.isfinite(v) for v in logged_in(rank, "loss"))


# Issue 16.1: rank 0's rollouts stop at EOS on their first token (8 loss tokens), rank 1's run to the horizon (8 x 80
# = 640 loss tokens in full mode): on CPU the loss used to call TRL's kernel once per 128-row block, and under ZeRO-3 every
# call gathers the partitioned lm_heads, so the ranks issued different numbers of collectives and the run hung or died.
UNEVEN_MODES = {
    "full": dict(horizon="full"),  # 640 tokens: 5 blocks against 1
    "truncated": dict(horizon="truncated", truncation_ratio=0.5),  # 320: 3 blocks
    "progressive": dict(horizon="progressive", progressive_start_ratio=0.5, progressive_ramp_fraction=1.0),  # 320, 480
}


@pytest.mark.slow
def test_zero3_rollouts_uneven_by_several_row_blocks_train_in_every_mode(assets):
    """One launch, the three modes trained one after the other in the same two processes (2 steps each), then (issue
    16.2) `ds3_gather_for_generation=False` with both ranks sampling freely, where each decoding step is a collective."""
    args = dict(max_completion_length=80, per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=2,
                save_strategy="no")
    runs = [{"name": mode, "args": mode_args} for mode, mode_args in UNEVEN_MODES.items()]
    runs.append({"name": "no_gather", "args": dict(ds3_gather_for_generation=False), "eos_rank": None,
                 "horizon_rank": None})
    # issue 11: the adaptive policy steers by metrics gathered over both ranks, whose local profiles differ wildly
    runs.append({"name": "adaptive", "args": dict(horizon="adaptive", adaptive_probe_every=2, max_steps=4,
                                                  adaptive_tolerance=0.05)})
    results = launch_training(assets, "zero3_uneven", "zero3", "student", "teacher", args=args, eos_rank=0,
                              horizon_rank=1, runs=runs)
    adaptive = results.pop("adaptive")
    assert adaptive[0]["horizon_history"] == adaptive[1]["horizon_history"]
    assert adaptive[0]["horizon_history"][::2] == [80, 80] and len(adaptive[0]["horizon_history"]) == 4
    assert adaptive[0]["policy_decisions"] == adaptive[1]["policy_decisions"] and len(adaptive[0]["policy_decisions"]) == 2
    no_gather = results.pop("no_gather")
    assert_ranks_agree(no_gather, 2, [80, 80])
    for mode, ranks in results.items():
        horizons = [g["horizon"] for g in ranks[0]["generations"]]
        assert horizons == {"full": [80, 80], "truncated": [40, 40], "progressive": [40, 60]}[mode]
        assert_ranks_agree(ranks, 2, horizons)
        assert all(g["completion_lengths"] == [1] * 8 for g in ranks[0]["generations"]), mode
        # rank 1 holds at least two more 128-row blocks of loss tokens than rank 0 at every step
        assert all(g["completion_lengths"] == [g["horizon"]] * 8 for g in ranks[1]["generations"]), mode


@pytest.mark.slow
def test_zero2_progressive_stages_with_a_padded_teacher(assets):
    args = dict(max_steps=2, save_steps=2, horizon="progressive", progressive_schedule="stages",
                progressive_stage_ratios=[0.5, 1.0], progressive_stage_fractions=[0.0, 0.5])
    ranks = launch_training(assets, "zero2", "zero2", "student", "teacher_padded", args=args)
    assert_ranks_agree(ranks, 2, [4, 8])
    assert all(rank["zero_stage"] == 2 and not rank["teacher_head_partitioned"] for rank in ranks)
    checkpoint = assets / "zero2" / "out" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "global_step2").is_dir()
