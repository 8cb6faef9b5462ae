"""Rolling rollouts (horizon="rolling"): the pool's bookkeeping by hand, the rolled loss against one full forward, true
positions, exact resume, the token cap (`rollout_max_tokens`), and the settings it refuses."""

import copy

import pytest
import torch
from datasets import Dataset
from testing_utils import logged, logged_in, make_args, record_generations

from horizon_opd import HorizonOPDConfig, HorizonOPDTrainer
from horizon_opd.rollout import PromptStream, RolloutPool

EOS = 2


# ----------------------------------------------------------------------------------------------- the pool by hand
def _draws(*prompts):
    """A prompt stream by hand: each draw is the next row."""
    rows = iter([{"prompt": p} for p in prompts])
    return lambda: next(rows)


def test_pool_advances_chunks_frees_slots_at_eos_and_at_the_limit():
    pool = RolloutPool(num_slots=3, chunk=2, max_tokens=5, eos_token_ids=[EOS], warmup="prefix")
    assert pool.num_chunks == 3
    draw = _draws("a", "b", "c", "d", "e")
    assert pool.fill(draw) == [0, 1, 2] and [r["prompt"] for r in pool.rows()] == ["a", "b", "c"]
    pool.seed([[], [], []], step=0)  # empty prefixes: every slot starts at depth 0
    assert pool.contexts([[10], [11], [12]], step=0) == [[10], [11], [12]] and pool.offsets == [0, 0, 0]
    assert pool.advance([[5, 6], [7, EOS], [8, 9]], step=0) == [[5, 6], [7, EOS], [8, 9]]
    assert pool.finished == [[7, EOS]] and pool.finished_slots == [1]  # EOS ends slot 1's rollout
    # only the freed slot draws a prompt (the next one of the stream); the others continue from their context
    assert pool.fill(draw) == [1] and [r["prompt"] for r in pool.rows()] == ["a", "d", "c"]
    assert pool.contexts([[21]], step=1) == [[10, 5, 6], [21], [12, 8, 9]]
    assert pool.offsets == [2, 0, 2]
    pool.advance([[3, 4], [1, 1], [EOS, 0]], step=1)  # slot 2 stops; the token after EOS is kept in the chunk
    assert pool.finished == [[8, 9, EOS, 0]]
    assert pool.fill(draw) == [2]
    assert pool.contexts([[32]], step=2) == [[10, 5, 6, 3, 4], [21, 1, 1], [32]]
    assert pool.stats(step=2)["rolling/max_context_staleness"] == 2.0  # slot 0's oldest chunk was written at step 0
    # slot 0 has 1 token left of max_tokens = 5: its chunk is cut there and the rollout ends
    assert pool.advance([[7, 7], [6, 6], [4, 4]], step=2) == [[7], [6, 6], [4, 4]]
    assert pool.finished == [[5, 6, 3, 4, 7]]
    with pytest.raises(ValueError, match="1 tokenized prompts for 0 fresh slots"):
        pool.contexts([[1]], step=3)


def test_cut_warmup_ends_first_rollouts_early_so_depths_spread_by_step_n():
    pool = RolloutPool(num_slots=6, chunk=2, max_tokens=6, eos_token_ids=[EOS])  # n = 3 chunks, warm-up "cut"
    assert [pool.seed_depth(i) for i in range(6)] == [0, 0, 1, 1, 2, 2]
    draw = _draws(*"abcdefghijklmnop")
    started = []
    for step in range(3):
        started.append(pool.fill(draw))
        pool.contexts([[9]] * len(started[-1]), step)
        if step == 0:
            assert pool.offsets == [0] * 6  # nothing generated in advance: all start at depth 0
        pool.advance([[1, 1]] * 6, step)
    # slots 4, 5 (depth 2) ran 1 chunk, slots 2, 3 ran 2, slots 0, 1 ran all 3 before their first rollout ended
    assert started == [[0, 1, 2, 3, 4, 5], [4, 5], [2, 3]]
    pool.contexts([[9]] * len(pool.fill(draw)), 3)
    assert pool.offsets == [0, 0, 2, 2, 4, 4]  # by step n the depths are spread as the prefix warm-up's
    assert pool.num_chunks == 3 and [s.budget for s in pool.slots] == [6] * 6  # later rollouts run their whole budget


def test_prefix_warmup_seeds_depths_evenly_and_stops_a_seed_prefix_at_its_eos():
    pool = RolloutPool(num_slots=6, chunk=2, max_tokens=6, eos_token_ids=[EOS], warmup="prefix")  # n = 3 chunks
    assert pool.seed_prefix_tokens() == 4
    pool.fill(_draws(*"abcdef"))
    assert pool.needs_prefixes()
    prefixes = [[1, 1, 1, 1]] * 5 + [[3, EOS, 0, 0]]  # slot 5's prefix stops in its first chunk
    pool.contexts([[i] for i in range(6)], step=0)
    pool.seed(prefixes, step=0)
    pool.contexts([], step=0)
    assert pool.offsets == [0, 0, 2, 2, 4, 0] and not pool.needs_prefixes()
    assert pool.stats(step=0)["rolling/fresh_share"] == 0.5
    # fewer slots than chunks: depths still spread over the rollout
    assert [RolloutPool(4, 1, 10, [EOS]).seed_depth(i) for i in range(4)] == [0, 2, 5, 7]


def test_pool_state_round_trips_and_refuses_another_shape():
    pool = RolloutPool(num_slots=2, chunk=2, max_tokens=4, eos_token_ids=[EOS])
    pool.fill(_draws("a", "b"))
    pool.contexts([[1], [2]], step=0)
    pool.advance([[5, 6], [7, 8]], step=0)
    restored = RolloutPool(num_slots=2, chunk=2, max_tokens=4, eos_token_ids=[EOS])
    restored.load_state_dict(pool.state_dict())
    assert restored.rows() == pool.rows() == [{"prompt": "a"}, None]  # slot 1 was cut by the warm-up (budget 2)
    for p in (pool, restored):
        p.fill(_draws("c"))
    assert restored.contexts([[3]], step=1) == pool.contexts([[3]], step=1) == [[1, 5, 6], [3]]
    with pytest.raises(ValueError, match=r"\(slots, chunk, max_tokens\) = \(2, 2, 4\), this run \(2, 3, 4\)"):
        RolloutPool(num_slots=2, chunk=3, max_tokens=4, eos_token_ids=[EOS]).load_state_dict(pool.state_dict())
    with pytest.raises(ValueError, match="3 sequences for 2 rollout slots"):
        pool.advance([[1], [2], [3]], step=1)


# ----------------------------------------------------------------------------------------------- the prompt stream
@pytest.mark.parametrize("streaming", [False, True])
def test_stream_gives_every_row_once_per_epoch_split_over_ranks_and_resumes(streaming):
    data = Dataset.from_dict({"prompt": [str(i) for i in range(10)]})
    source = data.to_iterable_dataset() if streaming else data
    ranks = [PromptStream(source, rank=r, world_size=2, seed=3) for r in range(2)]
    epochs = [[ranks[r].next()["prompt"] for _ in range(5)] for r in range(2)]
    assert sorted(epochs[0] + epochs[1], key=int) == [str(i) for i in range(10)]  # each row once, over the ranks
    assert ranks[0].state_dict() == {"epoch": 0, "position": 5}
    second = [[ranks[r].next()["prompt"] for _ in range(5)] for r in range(2)]
    assert ranks[0].state_dict() == {"epoch": 1, "position": 5}
    assert sorted(second[0] + second[1], key=int) == [str(i) for i in range(10)]
    if not streaming:  # another permutation each epoch (a stream's order follows its shuffle buffer)
        assert second != epochs
    resumed = PromptStream(source, rank=0, world_size=2, seed=3)
    resumed.load_state_dict({"epoch": 0, "position": 2})
    assert [resumed.next()["prompt"] for _ in range(3)] == epochs[0][2:]
    ordered = PromptStream(source, shuffle=False)
    assert [ordered.next()["prompt"] for _ in range(3)] == ["0", "1", "2"]


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
    # the "cut" warm-up: every slot starts at depth 0, nothing is generated in advance; depths spread as first
    # rollouts end early
    assert batches[0]["completion_offsets"].tolist() == [0] * 8
    assert len({o for b in batches[3:] for o in b["completion_offsets"].tolist()}) >= 3
    assert max(sum(r.kl_counts[12:]) for r in records) > 0  # the last quarter of L is trained
    assert [r.decode_iterations for r in records] == [chunk] * 6  # a step decodes one chunk
    started = [r.counts["prompts_started"] for r in records]
    assert started[0] == 8 and trainer.cost.prompts_started == sum(started)
    # the student's loss reads the contexts' keys and values from generation: no context runs again without grad
    assert trainer.cost.student_nograd_tokens == 0 and trainer.cost.teacher_tokens > 0
    staleness = logged(trainer, "rolling/max_context_staleness")
    assert staleness[0] == 0 and max(staleness) <= L // chunk - 1
    assert logged(trainer, "horizon/kl_span")[-1] == L


def test_prefix_warmup_spreads_depths_from_step_0_for_the_seed_prefixes_decode_cost(tmp_path, student, teacher,
                                                                                     tokenizer, prompts):
    trainer = _rolling(tmp_path, student, teacher, tokenizer, prompts, rolling_warmup="prefix", max_steps=3)
    batches = record_generations(trainer)
    trainer.train()
    assert sorted(set(batches[0]["completion_offsets"].tolist())) == [0, 4, 8, 12]  # depth mix from step 0
    # step 0 also decodes the seed prefixes (12 tokens for depths up to 3 chunks)
    assert logged(trainer, "horizon/step_decode_iterations") == [12 + 4, 4, 4]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_rolled_chunks_loss_equals_the_same_tokens_loss_from_one_full_forward(checkpointing, tmp_path, student,
                                                                                teacher, tokenizer, prompts):
    trainer = _rolling(tmp_path, student, teacher, tokenizer, prompts, gradient_checkpointing=checkpointing,
                       rolling_warmup="prefix")
    trainer.model.train()
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    counts = trainer._meters["train"].counts
    for step in range(2):  # step 1's teacher reads the keys and values its slots stored at step 0
        trainer.state.global_step = step
        batch = trainer._generate_and_score_completions(None)
        assert batch["completion_offsets"].max() > 0  # some rows continue a rollout: their context has a prefix
        # without offsets and slots: TRL's one full forward, for the student and the teacher
        full = {k: v for k, v in batch.items() if k not in ("completion_offsets", "rollout_slots")}
        before, student_before = counts["teacher_tokens"], counts["student_nograd_tokens"]
        rolled_loss = trainer._compute_loss(unwrapped, batch, batch["num_items_in_batch"])[0]
        cached = counts["teacher_tokens"] - before
        assert counts["student_nograd_tokens"] == student_before  # the contexts' keys and values from generation
        full_loss = trainer._compute_loss(unwrapped, full, full["num_items_in_batch"])[0]
        assert rolled_loss.item() == pytest.approx(full_loss.item(), abs=1e-5)
        encoded = int((batch["prompt_mask"].sum() + batch["completion_mask"].sum()))
        assert counts["teacher_tokens"] - before - cached == encoded  # the full forward encodes every token
        if step == 1:  # continuing slots encode their chunk and the context's last token only
            continuing = sum(1 for s in batch["rollout_slots"].tolist() if s not in trainer.rollout_pool.fresh)
            assert cached < encoded and continuing > 0
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
    ledger, resumed_ledger = first.cost.state_dict(), resumed.cost.state_dict()
    # the teacher's cached keys and values are not checkpoint state: the resumed run encodes the contexts once more
    assert resumed_ledger.pop("teacher_tokens") > ledger.pop("teacher_tokens")
    assert resumed_ledger == ledger


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
    (dict(horizon="rolling", num_train_epochs=1), "horizon='rolling' with max_steps=-1 (num_train_epochs=1): "),
    (dict(rolling_warmup="seeded"), "rolling_warmup='seeded' is unknown; choose one of ['cut', 'prefix']"),
])
def test_bad_rolling_settings_fail_at_construction(settings, message, tmp_path):
    with pytest.raises(ValueError) as error:
        HorizonOPDConfig(output_dir=str(tmp_path), bf16=False, **settings)
    assert message in str(error.value)


def test_an_epoch_of_rolling_rolls_out_every_prompt_once_and_drops_none(tmp_path, student, teacher, tokenizer):
    prompts = Dataset.from_dict({"prompt": [f"{i} + {i + 1} =" for i in range(12)]})
    # 4 slots, chunks of 4 of L = 16: a step starts a prompt only where a rollout ended
    trainer = _rolling(tmp_path, student, teacher, tokenizer, prompts, per_device_train_batch_size=2, max_steps=12)
    drawn = []
    draw = trainer.prompt_stream.next
    trainer.prompt_stream.next = lambda: drawn.append(draw()["prompt"]) or {"prompt": drawn[-1]}
    batches = record_generations(trainer)
    trainer.train()
    assert len(drawn) > 12 and sorted(drawn[:12]) == sorted(prompts["prompt"])  # epoch 0: each prompt once, in order
    assert sorted(drawn[12:24]) == sorted(prompts["prompt"])[:len(drawn[12:24])] or len(set(drawn[12:24])) == \
        len(drawn[12:24])  # epoch 1 starts over without repeating a prompt within it
    assert trainer.cost.prompts_started == len(drawn) == sum(logged(trainer, "horizon/prompts_started")[-1:])
    # every drawn prompt was rolled out: its tokens start some generated row's context
    contexts = {tuple(p[m.bool()].tolist()) for b in batches for p, m in zip(b["prompt_ids"], b["prompt_mask"])}
    for text in drawn[:12]:
        ids = tuple(tokenizer(text)["input_ids"])
        assert any(c[:len(ids)] == ids for c in contexts), text
    assert trainer.prompt_stream.state_dict()["epoch"] >= 1


def test_rolling_trains_on_a_stream(tmp_path, student, teacher, tokenizer, prompts):
    trainer = _rolling(tmp_path, student, teacher, tokenizer, prompts.to_iterable_dataset(), max_steps=3)
    trainer.train()
    assert trainer.state.global_step == 3 and trainer.cost.prompts_started >= 8


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_caches_change_no_loss_and_encode_fewer_tokens(checkpointing, tmp_path, student, teacher, tokenizer,
                                                           prompts):
    runs = []
    for cache in (True, False):  # built and trained one after the other: each starts from the seeded RNG
        runs.append(_rolling(tmp_path / str(cache), copy.deepcopy(student), copy.deepcopy(teacher), tokenizer,
                             prompts, rolling_teacher_cache=cache, rolling_student_cache=cache,
                             gradient_checkpointing=checkpointing))
        runs[-1].train()
    cached, uncached = runs
    assert cached.teacher_cache is not None and uncached.teacher_cache is None
    assert logged(cached, "loss") == pytest.approx(logged(uncached, "loss"), abs=1e-5)
    assert logged(cached, "grad_norm") == pytest.approx(logged(uncached, "grad_norm"), rel=1e-4)
    assert cached.cost.teacher_tokens < uncached.cost.teacher_tokens
    assert cached.cost.student_nograd_tokens == 0 < uncached.cost.student_nograd_tokens
    assert cached.cost.student_grad_tokens == uncached.cost.student_grad_tokens


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

    args = dict(max_steps=4, save_steps=2, horizon="rolling", truncation_ratio=0.25,  # L = 8: chunks of 2
                rolling_warmup="prefix")  # depths spread from step 0
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
