"""Rolling rollouts (horizon="rolling"): the pool's bookkeeping by hand, the rolled loss against one full forward, true
positions, exact resume, the token cap (`rollout_max_tokens`), and the settings it refuses."""

import copy

import pytest
import torch
from datasets import Dataset
from testing_utils import logged, logged_in, make_args, record_generations

from horizon_opd import HorizonOPDConfig, HorizonOPDTrainer
from horizon_opd.rollout import RolloutPool

EOS = 2


# ----------------------------------------------------------------------------------------------- the pool by hand
def test_pool_advances_chunks_frees_slots_at_eos_and_at_the_limit():
    pool = RolloutPool(num_slots=3, chunk=2, max_tokens=5, eos_token_ids=[EOS])
    assert pool.num_chunks == 3
    pool.seed([[10], [11], [12]], [[], [], []], step=0)  # empty prefixes: every slot starts at depth 0
    assert pool.contexts([[10], [11], [12]], step=0) == [[10], [11], [12]] and pool.offsets == [0, 0, 0]
    assert pool.advance([[5, 6], [7, EOS], [8, 9]], step=0) == [[5, 6], [7, EOS], [8, 9]]
    assert pool.finished == [[7, EOS]]  # EOS ends slot 1's rollout
    # slot 1 takes the step's fresh prompt at its index; the others continue from their context
    assert pool.contexts([[20], [21], [22]], step=1) == [[10, 5, 6], [21], [12, 8, 9]]
    assert pool.offsets == [2, 0, 2]
    pool.advance([[3, 4], [1, 1], [EOS, 0]], step=1)  # slot 2 stops; the token after EOS is kept in the chunk
    assert pool.finished == [[8, 9, EOS, 0]]
    assert pool.contexts([[30], [31], [32]], step=2) == [[10, 5, 6, 3, 4], [21, 1, 1], [32]]
    assert pool.stats(step=2)["rolling/max_context_staleness"] == 2.0  # slot 0's oldest chunk was written at step 0
    # slot 0 has 1 token left of max_tokens = 5: its chunk is cut there and the rollout ends
    assert pool.advance([[7, 7], [6, 6], [4, 4]], step=2) == [[7], [6, 6], [4, 4]]
    assert pool.finished == [[5, 6, 3, 4, 7]]


def test_pool_seeds_depths_evenly_and_stops_a_seed_prefix_at_its_eos():
    pool = RolloutPool(num_slots=6, chunk=2, max_tokens=6, eos_token_ids=[EOS])  # n = 3 chunks
    assert [pool.seed_depth(i) for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert pool.seed_prefix_tokens() == 4
    prefixes = [[1, 1, 1, 1]] * 5 + [[3, EOS, 0, 0]]  # slot 5's prefix stops in its first chunk
    pool.seed([[i] for i in range(6)], prefixes, step=0)
    pool.contexts([[9]] * 6, step=0)
    assert pool.offsets == [0, 0, 2, 2, 4, 0]
    assert pool.stats(step=0)["rolling/fresh_share"] == 0.5
    # fewer slots than chunks: depths still spread over the rollout
    assert [RolloutPool(4, 1, 10, [EOS]).seed_depth(i) for i in range(4)] == [0, 2, 5, 7]


def test_pool_state_round_trips_and_refuses_another_shape():
    pool = RolloutPool(num_slots=2, chunk=2, max_tokens=4, eos_token_ids=[EOS])
    pool.seed([[1], [2]], [[], []], step=0)
    pool.contexts([[1], [2]], step=0)
    pool.advance([[5, 6], [7, 8]], step=0)
    restored = RolloutPool(num_slots=2, chunk=2, max_tokens=4, eos_token_ids=[EOS])
    restored.load_state_dict(pool.state_dict())
    assert restored.contexts([[3], [4]], step=1) == pool.contexts([[3], [4]], step=1) == [[1, 5, 6], [2, 7, 8]]
    with pytest.raises(ValueError, match=r"\(slots, chunk, max_tokens\) = \(2, 2, 4\), this run \(2, 3, 4\)"):
        RolloutPool(num_slots=2, chunk=3, max_tokens=4, eos_token_ids=[EOS]).load_state_dict(pool.state_dict())
    with pytest.raises(ValueError, match="3 prompts for 2 rollout slots"):
        pool.contexts([[1], [2], [3]], step=1)


# ----------------------------------------------------------------------------------------------- in the trainer
def _rolling(tmp_path, student, teacher, tokenizer, prompts, **overrides):
    settings = dict(horizon="rolling", truncation_ratio=0.25, max_steps=6, gradient_accumulation_steps=2)
    settings.update(overrides)
    return HorizonOPDTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, **settings),
                             train_dataset=prompts, processing_class=tokenizer)


def test_rolling_trains_each_chunk_at_its_true_positions_at_a_chunks_decode_cost(tmp_path, student, teacher,
                                                                                 tokenizer, prompts):
    trainer = _rolling(tmp_path, student, teacher, tokenizer, prompts)
    batches = record_generations(trainer)
    records = []
    observe = trainer.horizon_policy.observe
    trainer.horizon_policy.observe = lambda record: (records.append(record), observe(record))
    trainer.train()
    chunk, L = 4, 16
    assert trainer.horizon_history == [chunk] * 6
    for batch, record in zip(batches, records, strict=True):
        offsets, mask = batch["completion_offsets"], batch["completion_mask"]
        assert batch["completion_ids"].size(1) <= chunk and (offsets % chunk == 0).all()
        # the per-position counts are the chunks placed at their offsets (8 slots: 4 prompts x 2 micro-batches)
        counts = [0.0] * L
        for offset, row in zip(offsets.tolist(), mask.tolist(), strict=True):
            for k, m in enumerate(row):
                counts[offset + k] += m
        assert record.kl_counts == counts
    assert sorted(set(batches[0]["completion_offsets"].tolist())) == [0, 4, 8, 12]  # depth mix from step 0
    assert max(sum(r.kl_counts[12:]) for r in records) > 0  # the last quarter of L is trained
    # a step decodes one chunk; step 0 also decodes the seed prefixes (12 tokens for depths up to 3 chunks)
    assert [r.decode_iterations for r in records] == [12 + chunk] + [chunk] * 5
    assert trainer.cost.decode_iterations == 12 + 6 * chunk
    staleness = logged(trainer, "rolling/max_context_staleness")
    assert staleness[0] == 0 and max(staleness) <= L // chunk - 1
    assert logged(trainer, "horizon/kl_span")[-1] == L


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_rolled_chunks_loss_equals_the_same_tokens_loss_from_one_full_forward(checkpointing, tmp_path, student,
                                                                                teacher, tokenizer, prompts):
    trainer = _rolling(tmp_path, student, teacher, tokenizer, prompts, gradient_checkpointing=checkpointing)
    trainer.model.train()
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in prompts["prompt"][:8]])
    assert batch["completion_offsets"].max() > 0  # some rows continue a rollout: their context has a prefix
    full = {k: v for k, v in batch.items() if k != "completion_offsets"}  # no offsets: TRL's one full forward
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    rolled_loss = trainer._compute_loss(unwrapped, batch, batch["num_items_in_batch"])[0]
    full_loss = trainer._compute_loss(unwrapped, full, full["num_items_in_batch"])[0]
    assert rolled_loss.item() == pytest.approx(full_loss.item(), abs=1e-5)
    # the gradient is truncated through the context: the context's keys and values are constants, so it differs
    grads = []
    for loss in (rolled_loss, full_loss):
        trainer.model.zero_grad()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]))
    assert grads[0].norm() > 0 and not torch.allclose(grads[0], grads[1])


def test_resume_mid_rolling_reproduces_the_completions_and_losses(tmp_path, student, teacher, tokenizer):
    # 64 prompts: 8 steps of 8 per epoch, so the resume stays in the first epoch (resuming into a later epoch restarts
    # TRL's RepeatSampler at its first permutation: another prompt order, in every horizon mode)
    prompts = Dataset.from_dict({"prompt": [f"{i} + {i + 1} =" for i in range(64)]})
    overrides = dict(save_strategy="steps", save_steps=3)
    first = _rolling(tmp_path, copy.deepcopy(student), copy.deepcopy(teacher), tokenizer, prompts, **overrides)
    uninterrupted = record_generations(first)
    first.train()
    assert (tmp_path / "checkpoint-3" / "rollout_pool_0.json").is_file()
    resumed = _rolling(tmp_path, student, teacher, tokenizer, prompts, **overrides)
    replayed = record_generations(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert [r["step"] for r in replayed] == [3, 4, 5]
    for a, b in zip(uninterrupted[3:], replayed, strict=True):
        for key in ("prompt_ids", "completion_ids", "completion_mask", "completion_offsets"):
            assert torch.equal(a[key], b[key]), key
    assert logged(resumed, "loss")[-3:] == pytest.approx(logged(first, "loss")[-3:], abs=1e-6)
    assert resumed.cost.state_dict() == first.cost.state_dict()


@pytest.mark.parametrize("horizon", [{"horizon": "full"}, {"horizon": "rolling", "truncation_ratio": 0.5}])
def test_rollout_max_tokens_ends_every_rollout_after_n_tokens(horizon, tmp_path, student, teacher, tokenizer,
                                                              prompts):
    trainer = HorizonOPDTrainer(model=student, teacher_model=teacher, train_dataset=prompts, processing_class=tokenizer,
                                args=make_args(tmp_path, max_steps=4, rollout_max_tokens=6, **horizon))
    batches = record_generations(trainer)
    trainer.train()
    for batch in batches:
        ends = batch.get("completion_offsets", torch.zeros(1, dtype=torch.long)).view(-1, 1) + \
            batch["completion_mask"].sum(1, keepdim=True)
        assert ends.max() <= 6
    assert max(trainer.horizon_history) == 6


@pytest.mark.parametrize("settings, message", [
    (dict(horizon="rolling", loss_window=[0.0, 0.5]), "loss_window=[0.0, 0.5] with horizon='rolling'"),
    (dict(horizon="rolling", loss_type="sequence"), "loss_type='sequence' with horizon='rolling'"),
    (dict(rollout_max_tokens=0), "rollout_max_tokens=0 must be an integer >= 1"),
    (dict(horizon="rolling", truncation_ratio=0.0), "truncation_ratio=0.0 is outside (0, 1]"),
])
def test_bad_rolling_settings_fail_at_construction(settings, message, tmp_path):
    with pytest.raises(ValueError) as error:
        HorizonOPDConfig(output_dir=str(tmp_path), bf16=False, **settings)
    assert message in str(error.value)


# ----------------------------------------------------------------------------------------------- two ranks, ZeRO-3
@pytest.fixture(scope="module")
def launch_assets(tmp_path_factory, tokenizer):
    from testing_utils import save_launch_assets

    root = save_launch_assets(tmp_path_factory.mktemp("rolling_ds"), len(tokenizer))
    # 64 prompts: 8 steps per epoch at 2 ranks x 4 slots, so a resume at step 2 stays in the first epoch
    Dataset.from_dict({"prompt": [f"{i} + {i + 1} =" for i in range(64)]}).save_to_disk(root / "prompts64")
    return root


@pytest.mark.slow
def test_zero3_rolling_ranks_hold_rollouts_at_different_depths_and_resume_exactly(launch_assets):
    from testing_utils import launch_training

    args = dict(max_steps=4, save_steps=2, horizon="rolling", truncation_ratio=0.25)  # L = 8: chunks of 2
    common = dict(args=args, eos_rank=1, dataset=str(launch_assets / "prompts64"))
    first = launch_training(launch_assets, "zero3_rolling", "zero3", "student", "teacher", **common)
    deep, stopping = first  # rank 0 samples freely; rank 1's rollouts all stop at their first token (EOS)
    for rank in first:
        assert rank["zero_stage"] == 3 and rank["global_step"] == 4 and rank["teacher_head_partitioned"]
        assert [len(g["completion_offsets"]) for g in rank["generations"]] == [4] * 4  # 2 prompts x 2 micro-batches
    assert all(g["completion_offsets"] == [0, 0, 0, 0] for g in stopping["generations"])
    assert sorted(deep["generations"][0]["completion_offsets"]) == [0, 2, 4, 6]  # seeded depths from step 0
    assert len({o for g in deep["generations"] for o in g["completion_offsets"]}) > 1
    # the step waits for the slower rank: step 0 also decodes rank 0's seed prefixes (6 tokens), then a chunk per step
    steps = [e for e in deep["log_history"] if "loss" in e]
    assert [e["horizon/step_decode_iterations"] for e in steps] == [8.0, 2.0, 2.0, 2.0]
    assert [e["horizon/step_decode_iterations"] for e in stopping["log_history"] if "loss" in e] == \
        [8.0, 2.0, 2.0, 2.0]

    checkpoint = launch_assets / "zero3_rolling" / "out" / "checkpoint-2"
    assert (checkpoint / "rollout_pool_0.json").is_file() and (checkpoint / "rollout_pool_1.json").is_file()
    resumed = launch_training(launch_assets, "zero3_rolling_resume", "zero3", "student", "teacher",
                              resume_from=str(checkpoint), **common)
    for before, after in zip(first, resumed, strict=True):
        assert [g["step"] for g in after["generations"]] == [2, 3]
        for a, b in zip(before["generations"][2:], after["generations"], strict=True):
            assert (a["completion_offsets"], a["completion_ids"]) == (b["completion_offsets"], b["completion_ids"])
        assert logged_in(after, "loss")[2:] == pytest.approx(logged_in(before, "loss")[2:], abs=1e-5)


# ----------------------------------------------------------------------------------------------- with a teacher server, with LoRA
def test_rolling_with_a_teacher_server_scores_context_plus_chunk_and_pays_for_the_chunk(tmp_path, student, teacher,
                                                                                         tokenizer, prompts):
    from horizon_opd.teacher_server import serve_teacher

    with serve_teacher(copy.deepcopy(teacher), tokenizer, port=0, model_name="tiny-teacher") as server:
        received = []
        complete = server.complete

        def recording(request):
            received.extend(list(ids) for ids in request["prompt"])
            return complete(request)

        server.complete = recording
        args = make_args(tmp_path, horizon="rolling", truncation_ratio=0.25, max_steps=3, loss_type="sampled",
                         teacher_model_server_url=server.url)
        trainer = HorizonOPDTrainer(model=student, args=args, train_dataset=prompts, processing_class=tokenizer)
        batches = record_generations(trainer)
        trainer.train()
    sent = {tuple(ids) for ids in received}
    for batch in batches:  # each sequence scored is the slot's context (prompt + earlier chunks) + its new chunk
        for p, pm, c, cm in zip(batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"],
                                batch["completion_mask"], strict=True):
            assert tuple(p[pm.bool()].tolist() + c[cm.bool()].tolist()) in sent
    # the server's bill is the chunks trained on, not the contexts
    assert trainer.cost.teacher_scored_tokens == trainer.cost.trained_tokens == \
        sum(int(b["completion_mask"].sum()) for b in batches)
    assert max(int(b["completion_offsets"].max()) for b in batches) > 0


def test_rolling_trains_a_lora_adapter_only(tmp_path, student, teacher, tokenizer, prompts):
    from peft import LoraConfig

    trainer = HorizonOPDTrainer(model=student, teacher_model=teacher, train_dataset=prompts, processing_class=tokenizer,
                                args=make_args(tmp_path, horizon="rolling", truncation_ratio=0.25, max_steps=3),
                                peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert trainer.cost.decode_iterations > 0 and max(logged(trainer, "rolling/mean_depth_chunks")) > 0
