"""HorizonOPDTrainer with a teacher behind an HTTP server (`teacher_model_server_url`): real HTTP on 127.0.0.1 against
the loopback server, started in a thread of the test process and stopped by the test. No mocks of the client: the
server is only instrumented (its `complete` is wrapped to record what each request asked it to score)."""

import copy
import math
from collections import Counter

import pytest
import torch
from testing_utils import (
    POLICY_SETTINGS,
    free_port,
    launch_accelerate,
    launch_output,
    logged,
    loss_and_grads,
    make_args,
    read_ranks,
    record_generations,
    tiny_causal_lm,
)

from horizon_opd import HorizonOPDConfig, HorizonOPDTrainer
from horizon_opd.export import distillation_section
from horizon_opd.horizon import horizon_at
from horizon_opd.teachers.remote import TeacherServerError
from horizon_opd.teacher_server import ServerFaults, serve_teacher

MODES = POLICY_SETTINGS


@pytest.fixture
def server(teacher, tokenizer):
    """The conftest teacher served on a free port; records the token-id sequences of every completion request."""
    with serve_teacher(copy.deepcopy(teacher), tokenizer, port=0, model_name="tiny-teacher") as handle:
        handle.received = []  # one list of sequences per request
        complete = handle.complete

        def recording(request):
            handle.received.append([list(ids) for ids in request["prompt"]])
            return complete(request)

        handle.complete = recording
        yield handle


def _remote_trainer(tmp_path, student, url, tokenizer, dataset, **overrides):
    overrides.setdefault("loss_type", "sampled")
    args = make_args(tmp_path, teacher_model_server_url=url, **overrides)
    return HorizonOPDTrainer(model=student, args=args, train_dataset=dataset, processing_class=tokenizer)


def _assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------------------------- remote == local
@pytest.mark.parametrize("loss_type", ["sampled", "sequence"])
def test_remote_sampled_loss_and_gradients_equal_local_teacher(loss_type, tmp_path, student, teacher, tokenizer,
                                                               prompts, server):
    local = HorizonOPDTrainer(model=copy.deepcopy(student), teacher_model=teacher,
                              args=make_args(tmp_path / "local", loss_type=loss_type), train_dataset=prompts,
                              processing_class=tokenizer)
    remote = _remote_trainer(tmp_path / "remote", copy.deepcopy(student), server.url, tokenizer, prompts,
                             loss_type=loss_type)
    assert remote.teacher_model is None and remote.remote_teacher.top_k == 0  # actual tokens' log-probs only
    local.model.train()
    remote.model.train()
    batch = local._generate_and_score_completions([{"prompt": p} for p in prompts["prompt"][:8]])
    assert batch["completion_mask"].sum() > 8 and not batch["completion_mask"].all()  # multi-token, ragged
    _assert_same(loss_and_grads(remote, batch), loss_and_grads(local, batch))
    assert remote._meters["train"].counts["teacher_scored_tokens"] == int(batch["completion_mask"].sum())


def test_topk_loss_approaches_the_exact_reverse_kl_as_k_grows(tmp_path, student, teacher, tokenizer, prompts, server):
    local = HorizonOPDTrainer(model=copy.deepcopy(student), teacher_model=teacher,
                              args=make_args(tmp_path / "local", loss_type="reverse_kl"), train_dataset=prompts,
                              processing_class=tokenizer)
    local.model.train()
    batch = local._generate_and_score_completions([{"prompt": p} for p in prompts["prompt"][:8]])
    exact = loss_and_grads(local, batch)
    vocab = len(tokenizer)
    losses = []
    for k in (1, 4, 16, vocab):
        remote = _remote_trainer(tmp_path / f"k{k}", copy.deepcopy(student), server.url, tokenizer, prompts,
                                 loss_type="topk_reverse_kl", loss_top_k=k)
        remote.model.train()
        result = loss_and_grads(remote, batch)
        losses.append(result[0].item())
    # A lower bound that never decreases with k, and the exact loss and gradients once k covers the vocabulary.
    assert all(a <= b + 1e-6 for a, b in zip(losses, losses[1:])), losses
    assert losses[0] < exact[0].item() - 1e-3, losses
    _assert_same(result, exact)


# ----------------------------------------------------------------------------------------------- horizons
@pytest.mark.parametrize("mode", list(MODES))
def test_each_horizon_sends_the_server_no_more_than_its_horizon(mode, tmp_path, student, tokenizer, prompts, server):
    trainer = _remote_trainer(tmp_path, student, server.url, tokenizer, prompts, **MODES[mode])
    records = record_generations(trainer)
    trainer.train()

    horizons = [r["horizon"] for r in records]
    assert trainer.horizon_history == horizons
    if mode != "adaptive":  # the adaptive policy's horizons depend on what its probes measured
        assert horizons == [horizon_at(step, 4, trainer.horizon_policy) for step in range(4)]
    assert (min(horizons) < 16) == (mode != "full")  # the policy really shortened some steps
    # Every generated completion was sent exactly once, as prompt + completion, and none is longer than its horizon.
    sent, generated, completion_tokens = Counter(), Counter(), 0
    for record in records:
        for b in range(record["completion_ids"].size(0)):
            n = int(record["completion_mask"][b].sum())
            assert n <= record["horizon"]
            prompt = record["prompt_ids"][b][record["prompt_mask"][b].bool()].tolist()
            generated[tuple(prompt + record["completion_ids"][b, :n].tolist())] += 1
            completion_tokens += n
    for request in server.received:
        sent.update(tuple(sequence) for sequence in request)
    assert sent == generated
    assert trainer.teacher_scored_tokens == completion_tokens == trainer.remote_teacher.scored_tokens
    assert logged(trainer, "teacher/scored_tokens")[-1] == completion_tokens
    assert trainer.generated_tokens == completion_tokens
    # 4 steps x 2 micro-batches of 4 sequences, under the chunk size: one request per micro-batch
    assert len(server.received) == 8 and all(len(r) == 4 for r in server.received)


def test_topk_loss_trains_and_card_names_the_server(tmp_path, student, tokenizer, prompts, server):
    trainer = _remote_trainer(tmp_path, student, server.url, tokenizer, prompts, loss_type="topk_reverse_kl",
                              loss_top_k=5, max_steps=2, teacher_server_chunk_size=3)
    trainer.train()
    losses = logged(trainer, "loss")
    assert len(losses) == 2 and all(math.isfinite(v) and v >= 0 for v in losses)
    assert len(server.received) == 2 * 2 * 2  # steps x micro-batches x ceil(4 / 3) chunks
    section = distillation_section(trainer, None)
    assert f"`tiny-teacher` served at {server.url}" in section and "top-5" in section


# ----------------------------------------------------------------------------------------------- vocabulary, length
@pytest.mark.parametrize("reported", [True, False], ids=["loopback", "vllm-like"])
def test_padded_student_never_samples_ids_past_the_tokenizer(reported, tmp_path, tokenizer, prompts, server):
    """A student head padded 25 rows past the tokenizer, biased towards the padding rows: they are suppressed in
    generation (whether or not the server reports its vocabulary, as vLLM does not), so the server only ever scores
    tokenizer ids and the steps train; the loss's student softmax is over the same ids it sampled from."""
    vocab = len(tokenizer)
    padded_student = tiny_causal_lm(vocab + 25, seed=0)
    with torch.no_grad():  # make the padding rows the most likely tokens, so an unsuppressed sampler would pick them
        padded_student.lm_head.weight[vocab:] = 5 * padded_student.lm_head.weight[:vocab].abs().max()
    torch.manual_seed(0)
    ids = tokenizer(prompts["prompt"][:8], return_tensors="pt", padding=True)
    unsuppressed = padded_student.generate(**ids, do_sample=True, max_new_tokens=16, pad_token_id=0)
    assert (unsuppressed[:, ids["input_ids"].size(1):] >= vocab).any()  # the bias really makes sampling pick them
    if not reported:
        server.vocab_size = None  # /v1/models then lists no vocab_size, like vLLM's
    trainer = _remote_trainer(tmp_path, padded_student, server.url, tokenizer, prompts, max_steps=2)
    assert trainer.remote_teacher.vocab_size == (vocab if reported else None)
    assert trainer.shared_vocab_size == vocab
    assert trainer.generation_kwargs["suppress_tokens"] == list(range(vocab, vocab + 25))
    records = record_generations(trainer)
    trainer.train()
    assert trainer.state.global_step == 2 and all(math.isfinite(v) for v in logged(trainer, "loss"))
    for record in records:
        assert record["completion_ids"][record["completion_mask"].bool()].max().item() < vocab
    sent = [t for request in server.received for sequence in request for t in sequence]
    assert len(server.received) == 4 and max(sent) < vocab


def test_server_vocabulary_smaller_than_the_tokenizer_fails_at_construction(tmp_path, student, tokenizer, prompts):
    vocab = len(tokenizer)
    with serve_teacher(tiny_causal_lm(vocab - 5, hidden_size=48, seed=1), port=0) as small:
        with pytest.raises(ValueError, match=rf"{small.url} .* scores ids below {vocab - 5}.* tokenizer has {vocab}"):
            _remote_trainer(tmp_path, student, small.url, tokenizer, prompts)


def test_server_max_model_len_too_short_fails_at_construction(tmp_path, student, teacher, tokenizer, prompts):
    teacher.config.max_position_embeddings = 24  # what the loopback server reports as max_model_len
    longest = max(len(ids) for ids in tokenizer(list(prompts["prompt"]))["input_ids"])
    needed = longest + 16 + 1
    with serve_teacher(teacher, tokenizer, port=0) as short:
        with pytest.raises(ValueError, match=rf"{short.url} .* max_model_len 24, but .* {needed} tokens: the longest "
                                             rf"prompt \({longest} tokens.* max_completion_length 16 .*"
                                             rf"--max-model-len {needed}.*max_completion_length <= {24 - longest - 1}"):
            _remote_trainer(tmp_path, student, short.url, tokenizer, prompts)
        short.max_length = needed  # exactly enough: accepted
        _remote_trainer(tmp_path, student, short.url, tokenizer, prompts)


# ----------------------------------------------------------------------------------------------- failures
def test_server_errors_fail_the_step_naming_the_url(tmp_path, student, teacher, tokenizer, prompts):
    faults = ServerFaults(fail_first=10**6, status=503)
    with serve_teacher(teacher, tokenizer, port=0, faults=faults) as bad:
        trainer = _remote_trainer(tmp_path, student, bad.url, tokenizer, prompts, teacher_server_max_retries=1)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        with pytest.raises(TeacherServerError, match=rf"{bad.url}/v1/completions failed 2 attempt\(s\).*HTTP 503"):
            trainer.train()
        assert bad.completion_requests == 2  # one retry, then the step failed
    assert trainer.state.global_step == 0  # nothing was trained on: no optimizer step, weights unchanged
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_server_timeouts_fail_the_step_naming_the_url(tmp_path, student, teacher, tokenizer, prompts):
    with serve_teacher(teacher, tokenizer, port=0, faults=ServerFaults(delay_s=1.0)) as slow:
        trainer = _remote_trainer(tmp_path, student, slow.url, tokenizer, prompts, teacher_server_timeout=0.2,
                                  teacher_server_max_retries=0)
        with pytest.raises(TeacherServerError, match=rf"{slow.url}/v1/completions failed 1 attempt.*timed out"):
            trainer.train()
    # Stopping the server waited for its handler of the abandoned request, forward pass included: no thread of it is
    # left inside torch when the interpreter exits.
    assert slow.completion_requests == 1 and slow.scored_sequences > 0
    assert trainer.state.global_step == 0


def test_unreachable_server_fails_at_construction_naming_the_url(tmp_path, student, tokenizer, prompts):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(TeacherServerError, match=rf"No teacher server answers at {url}/health"):
        _remote_trainer(tmp_path, student, url, tokenizer, prompts)


def test_teacher_model_and_url_are_exclusive(tmp_path, student, teacher, tokenizer, prompts, server):
    args = make_args(tmp_path, teacher_model_server_url=server.url, loss_type="sampled")
    with pytest.raises(ValueError, match="Both teacher_model .* and teacher_model_server_url"):
        HorizonOPDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                          processing_class=tokenizer)
    with pytest.raises(ValueError, match="needs a teacher_model .* or teacher_model_server_url"):
        HorizonOPDTrainer(model=student, args=make_args(tmp_path), train_dataset=prompts, processing_class=tokenizer)


URL = "http://127.0.0.1:8000"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"teacher_model_server_url": "127.0.0.1:8000", "loss_type": "sampled"}, "'127.0.0.1:8000' is not an http"),
        ({"teacher_model_server_url": URL}, "loss_type='reverse_kl' needs the teacher's full .*'topk_reverse_kl'"),
        ({"teacher_model_server_url": URL, "loss_type": "sampled", "temperature": 0.7},
         "temperature=0.7 .* Use temperature=1.0"),
        ({"teacher_model_server_url": URL, "loss_type": "sampled", "teacher_model_init_kwargs": {"dtype": "float32"}},
         "teacher_model_init_kwargs=.* Drop teacher_model_init_kwargs"),
        ({"loss_type": "topk_reverse_kl"}, "teacher_model_server_url is not set"),
        ({"teacher_model_server_url": URL, "loss_type": "topk_reverse_kl", "loss_top_k": 0}, "loss_top_k=0 must be"),
        ({"teacher_server_timeout": 0}, "teacher_server_timeout=0 must be a positive"),
        ({"teacher_server_max_retries": -1}, "teacher_server_max_retries=-1 must be"),
        ({"teacher_server_chunk_size": 1.5}, "teacher_server_chunk_size=1.5 must be"),
        ({"teacher_model_server_url": URL, "loss_type": "sampled", "horizon": "adaptive",
          "adaptive_signal": "topk_overlap"}, "adaptive_signal='topk_overlap' .* hidden states"),
    ],
)
def test_bad_remote_config_fails_at_construction(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        HorizonOPDConfig(output_dir=str(tmp_path), bf16=False, **overrides)


def test_remote_config_accepts_the_sampled_losses(tmp_path):
    for loss_type in ("sampled", "sequence", "topk_reverse_kl"):
        args = HorizonOPDConfig(output_dir=str(tmp_path), bf16=False, teacher_model_server_url=URL, loss_type=loss_type,
                                horizon="adaptive")
        assert args.teacher_model_server_url == URL


# ----------------------------------------------------------------------------------------------- 2 processes
@pytest.mark.slow
def test_two_processes_share_one_server(tmp_path, teacher, tokenizer, prompts, student):
    """`accelerate launch` 2 CPU processes (gloo), both scoring with one server in this process, for 2 steps."""
    student.save_pretrained(tmp_path / "student")
    prompts.save_to_disk(str(tmp_path / "prompts"))
    # Plain DDP: accelerate's multi-process launcher (torchrun) on CPU processes, which train with gloo.
    config = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "num_machines": 1,
              "machine_rank": 0, "gpu_ids": "all", "mixed_precision": "no", "use_cpu": True,
              "rdzv_backend": "static", "same_network": True, "main_training_function": "main"}
    with serve_teacher(teacher, tokenizer, port=0, model_name="tiny-teacher") as handle:
        settings = {"student": str(tmp_path / "student"), "dataset": str(tmp_path / "prompts"), "url": handle.url,
                    "output_dir": str(tmp_path / "out"), "result_dir": str(tmp_path / "result"),
                    "args": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 2,
                             "max_completion_length": 8, "horizon": "truncated", "truncation_ratio": 0.5,
                             "loss_type": "topk_reverse_kl", "loss_top_k": 4, "learning_rate": 1e-3,
                             "logging_steps": 1, "report_to": "none", "bf16": False, "disable_tqdm": True,
                             "gradient_checkpointing": False, "save_strategy": "no", "seed": 0,
                             "use_cpu": True, "ddp_backend": "gloo"}}  # use_cpu: else no process group
        run = launch_accelerate(config, "remote_teacher_script.py", settings, tmp_path / "launch", timeout=120)
        requests = handle.completion_requests
    assert run.returncode == 0, launch_output(run)
    ranks = read_ranks(tmp_path / "result")
    own = [r["client_scored_tokens"] for r in ranks]
    assert all(n > 0 for n in own)
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["distributed_type"] == "MULTI_CPU" and rank["global_step"] == 2
        assert rank["horizon_history"] == [4, 4] and max(rank["completion_lengths"]) <= 4
        assert rank["teacher_scored_tokens"] == sum(own)  # gathered over both ranks
        assert rank["scored_log"][-1] == sum(own)
        assert all(math.isfinite(v) for v in rank["losses"]) and len(rank["losses"]) == 2
    assert requests == 2 * 2 * 2  # ranks x steps x micro-batches, one request each


# ----------------------------------------------------------------------------------------------- command line
def test_cli_teacher_url_trains_with_the_server(tmp_path):
    from horizon_opd import demo
    from horizon_opd.cli import run

    with serve_teacher(demo.TEACHER_PATH, port=0) as handle:
        results = run(["--quick", "--teacher-url", handle.url, "--methods", "topd0.1", "--steps", "2",
                       "--batch-size", "4", "--eval-every", "2", "--eval-size", "4", "--output-dir", str(tmp_path)])
    (record,) = results["methods"]
    assert results["settings"]["loss_type"] == "topk_reverse_kl" and math.isnan(results["teacher_accuracy"])
    # Training sends the 2 x 4 rollouts of <= ceil(0.1 * L) tokens; the demo's final trainer.evaluate() (4 held-out
    # prompts, full horizon L) is scored by the server too.
    L = results["settings"]["max_completion_length"]
    assert 0 < record["tokens_generated"] <= 2 * 4 * math.ceil(0.1 * L)
    assert record["tokens_generated"] < record["teacher_scored_tokens"] <= record["tokens_generated"] + 4 * L
    assert (tmp_path / "results.json").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--teacher-url", "localhost:8000"], "is not an http"),
        (["--teacher-url", URL, "--loss-type", "reverse_kl"], "needs a local teacher"),
        (["--loss-type", "topk_reverse_kl"], "needs --teacher-url"),
    ],
)
def test_cli_rejects_bad_teacher_url_settings(argv, message, capsys):
    from horizon_opd.cli import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
