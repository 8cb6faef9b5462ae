"""ZeRO-3 with `ds3_gather_for_generation=False` (issue 22.1), at a size where ZeRO-3 really partitions the heads.

The loss reads the student's `lm_head.weight` directly, outside the lm_head module, and DeepSpeed registers such a
parameter by itself only when a forward reads it partitioned. Without gathering for generation, DeepSpeed records its
module trace from `generate` (the lm_head module after the final norm) and, in training, prefetches the head before the
loss reads it; never registered, the head was re-partitioned before autograd accumulated its gradient, and the first
backward died with "The size of tensor a (0) must match the size of tensor b (64)". `register_student_head_for_zero3`
registers it up front.

The shared tiny models (103-token vocabulary, hidden size 32-48) cannot show this: their lm_head (3296 values) is below
DeepSpeed's `stage3_param_persistence_threshold` (1e5 by default), so ZeRO-3 keeps the student's head whole on every
rank. Here the models have SmolLM2's vocabulary size (49152) and hidden size 64: 3.1M values per head and embedding,
split between the two ranks. The char tokenizer is kept (generation never samples ids past it), so the test needs no
download."""

import math

import pytest
import torch
from testing_utils import launch_training, logged_in
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB, HIDDEN = 49152, 64


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer):
    from datasets import Dataset

    root = tmp_path_factory.mktemp("zero3_generation")
    config = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    for name, seed in (("student", 0), ("teacher", 1)):
        torch.manual_seed(seed)
        LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(root / name)
    prompts = [[{"role": "user", "content": f"Sort the letters of word {i}"}] for i in range(64)]
    Dataset.from_dict({"prompt": prompts}).save_to_disk(root / "prompts")
    return root


@pytest.mark.slow
def test_zero3_without_gathering_for_generation_trains_like_the_gathered_run(assets):
    """The reporter's launch (2 CPU processes, examples/accelerate/zero3.yaml), trained twice in one launch: with the
    weights gathered for generation, then without. Both train, and the second matches the first: the same rollouts,
    losses and trained student, since gathering a parameter early or late copies the same values."""
    args = dict(horizon="full", max_completion_length=80, max_steps=2, per_device_train_batch_size=4,
                gradient_accumulation_steps=1, gradient_checkpointing=True, logging_steps=1, save_strategy="no",
                seed=5)
    runs = [{"name": "gathered", "args": dict(ds3_gather_for_generation=True)},
            {"name": "not_gathered", "args": dict(ds3_gather_for_generation=False)}]
    results = launch_training(assets, "zero3_no_gather", "zero3", "student", "teacher", args=args, runs=runs,
                              suppress_past_tokenizer=True, report_partitioning=True, record_weights=True)

    for name, ranks in results.items():
        for rank in ranks:
            assert rank["zero_stage"] == 3 and rank["world_size"] == 2 and rank["global_step"] == 2, name
            # ZeRO-3 really partitions both heads and embeddings: each rank holds half of each, none is persistent
            for weight, held in rank["partitioning"].items():
                assert held["zero3"] and not held["persistent"], (name, weight, held)
                assert held["full_numel"] == VOCAB * HIDDEN and held["shard_numel"] == VOCAB * HIDDEN // 2, (name, weight)
                assert held["held_numel"] == 0, (name, weight)  # released after the step
            losses = logged_in(rank, "loss")
            assert len(losses) == 2 and all(math.isfinite(v) for v in losses), name
            assert "lm_head.weight" in rank["student_changed"], name  # the head's gradient reached the parameter
        assert logged_in(ranks[0], "loss") == logged_in(ranks[1], "loss"), name

    gathered, not_gathered = results["gathered"], results["not_gathered"]
    for rank in range(2):
        # Identical weights give identical rollouts; the loss then runs the same kernels on the same inputs. Observed
        # bit-identical; rel=1e-6 (a few float32 ulps) only allows for reduction order, and is far below what one
        # different token or a lost head gradient changes.
        assert ([g["completion_lengths"] for g in not_gathered[rank]["generations"]]
                == [g["completion_lengths"] for g in gathered[rank]["generations"]])
        assert logged_in(not_gathered[rank], "loss") == pytest.approx(logged_in(gathered[rank], "loss"), rel=1e-6)
        trained, reference = not_gathered[rank]["student_checksums"], gathered[rank]["student_checksums"]
        assert trained.keys() == reference.keys()
        for param, value in reference.items():
            assert trained[param] == pytest.approx(value, rel=1e-6, abs=1e-6), param
