"""The remote teacher: the HTTP client against the loopback server (real HTTP on 127.0.0.1, no mocks), the server's
vLLM response format against TRL's parser, and the top-k + tail reverse KL against exact references."""

import math

import pytest
import torch
import torch.nn.functional as F

from horizon_opd.demo.tokenizer import build_char_tokenizer
from horizon_opd.loss import (
    logprobs_at,
    reverse_kl_per_token,
    sampled_kl_per_token,
    token_logprobs,
    topk_reverse_kl_per_token,
)
from horizon_opd.teachers.remote import RemoteTeacher, TeacherServerError, format_sequence_logprobs
from horizon_opd.teacher_server import ServerFaults, serve_teacher
from testing_utils import tiny_causal_lm


@pytest.fixture(scope="module")
def char_tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def teacher(char_tokenizer):
    return tiny_causal_lm(len(char_tokenizer), hidden_size=48, seed=1, max_position_embeddings=256)


@pytest.fixture(scope="module")
def server(teacher, char_tokenizer):
    with serve_teacher(teacher, char_tokenizer, port=0, model_name="tiny-teacher", batch_size=3) as handle:
        yield handle


def _batch(vocab_size, seed=0, n=5):
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab_size, (int(torch.randint(1, 6, (1,), generator=generator)),), generator=generator)
               .tolist() for _ in range(n)]
    completions = [torch.randint(3, vocab_size, (int(torch.randint(0, 9, (1,), generator=generator)),),
                                 generator=generator).tolist() for _ in range(n)]
    completions[0] = completions[0] or [5]  # at least one non-empty completion
    return prompts, completions


def _local_logprobs(model, prompt, completion):
    """log softmax of the unpadded sequence's logits at the completion positions: (len(completion), V)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].float()
    return F.log_softmax(logits, -1)[len(prompt) - 1 : len(prompt) + len(completion) - 1]


# ----------------------------------------------------------------------------------------------- client vs local model
def test_server_logprobs_equal_local_model(server, teacher):
    prompts, completions = _batch(teacher.config.vocab_size)
    client = RemoteTeacher(server.url, top_k=5, chunk_size=0)
    scores = client.score(prompts, completions)
    width = max(map(len, completions))
    assert scores.actual_logprobs.shape == (5, width) and scores.topk_ids.shape == (5, width, 5)
    for b, (prompt, completion) in enumerate(zip(prompts, completions)):
        n = len(completion)
        local = _local_logprobs(teacher, prompt, completion)  # (n, V)
        assert scores.mask[b].tolist() == [True] * n + [False] * (width - n)
        actual = local.gather(1, torch.tensor(completion)[:, None])[:, 0]
        torch.testing.assert_close(scores.actual_logprobs[b, :n], actual, atol=1e-5, rtol=0)
        top = local.topk(5, dim=-1)
        assert torch.equal(scores.topk_ids[b, :n], top.indices)
        torch.testing.assert_close(scores.topk_logprobs[b, :n], top.values, atol=1e-5, rtol=0)
        # Padding: never a contribution to a loss.
        assert (scores.actual_logprobs[b, n:] == 0).all() and (scores.topk_logprobs[b, n:] == -math.inf).all()
    assert client.scored_tokens == sum(map(len, completions))
    assert client.model == "tiny-teacher"


def test_score_batch_on_trl_padded_layout_equals_lists(server, teacher):
    prompts, completions = _batch(teacher.config.vocab_size, seed=1, n=4)
    client = RemoteTeacher(server.url, top_k=3)
    P, K = max(map(len, prompts)), max(map(len, completions)) + 2  # extra right padding beyond the longest completion
    prompt_ids, prompt_mask = torch.zeros(4, P, dtype=torch.long), torch.zeros(4, P, dtype=torch.long)
    completion_ids, completion_mask = torch.zeros(4, K, dtype=torch.long), torch.zeros(4, K, dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        prompt_ids[b, P - len(p) :], prompt_mask[b, P - len(p) :] = torch.tensor(p), 1  # left-padded, as TRL
        completion_ids[b, : len(c)], completion_mask[b, : len(c)] = torch.tensor(c, dtype=torch.long), 1
        completion_ids[b, len(c) :] = 7  # tokens after EOS: masked, never sent
    padded = client.score_batch(prompt_ids, prompt_mask, completion_ids, completion_mask)
    listed = client.score(prompts, completions)
    assert padded.mask.shape == (4, K) and torch.equal(padded.mask, completion_mask.bool())
    width = listed.mask.size(1)
    assert torch.equal(padded.actual_logprobs[:, :width], listed.actual_logprobs)
    assert torch.equal(padded.topk_ids[:, :width], listed.topk_ids)
    assert torch.equal(padded.topk_logprobs[:, :width], listed.topk_logprobs)
    assert (padded.topk_logprobs[:, width:] == -math.inf).all()
    holes = completion_mask.clone()
    holes[0, 0] = 0
    with pytest.raises(ValueError, match="prefix"):
        client.score_batch(prompt_ids, prompt_mask, completion_ids, holes)


def test_chunked_requests_equal_one_request(server, teacher):
    prompts, completions = _batch(teacher.config.vocab_size, seed=2, n=7)
    one = RemoteTeacher(server.url, top_k=4, chunk_size=0)
    chunked = RemoteTeacher(server.url, top_k=4, chunk_size=2, max_concurrent_requests=3)
    before = server.completion_requests
    a = one.score(prompts, completions)
    assert server.completion_requests - before == 1
    b = chunked.score(prompts, completions)
    assert server.completion_requests - before == 1 + 4  # ceil(7 / 2) chunks
    for field in ("actual_logprobs", "topk_ids", "topk_logprobs", "mask"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_top_k_zero_gives_actual_token_only(server, teacher):
    prompts, completions = _batch(teacher.config.vocab_size, seed=3, n=3)
    scores = RemoteTeacher(server.url, top_k=0).score(prompts, completions)
    full = RemoteTeacher(server.url, top_k=2).score(prompts, completions)
    assert scores.topk_ids.shape[-1] == 0
    assert torch.equal(scores.actual_logprobs, full.actual_logprobs)


# ----------------------------------------------------------------------------------------------- failures
@pytest.fixture
def faulty_server(teacher, char_tokenizer, request):
    with serve_teacher(teacher, char_tokenizer, port=0, faults=request.param) as handle:
        yield handle


@pytest.mark.parametrize("faulty_server", [ServerFaults(fail_first=10**6, status=500)], indirect=True)
def test_persistent_500_is_retried_then_fails_naming_url(faulty_server):
    client = RemoteTeacher(faulty_server.url, model="m", top_k=2, max_retries=2, retry_backoff=0.0)
    with pytest.raises(TeacherServerError) as error:
        client.score([[1, 5]], [[6, 7]])
    message = str(error.value)
    assert f"{faulty_server.url}/v1/completions" in message and "HTTP 500" in message and "3 attempt" in message
    assert faulty_server.completion_requests == 3  # 1 + max_retries, then no more
    assert client.scored_tokens == 0


@pytest.mark.parametrize("faulty_server", [ServerFaults(fail_first=2, status=503)], indirect=True)
def test_transient_errors_are_retried_and_recover(faulty_server, server):
    client = RemoteTeacher(faulty_server.url, model="m", top_k=2, max_retries=2, retry_backoff=0.0)
    scores = client.score([[1, 5]], [[6, 7]])
    assert faulty_server.completion_requests == 3
    healthy = RemoteTeacher(server.url, top_k=2).score([[1, 5]], [[6, 7]])
    assert torch.equal(scores.actual_logprobs, healthy.actual_logprobs)


@pytest.mark.parametrize("faulty_server", [ServerFaults(fail_first=1, status=500)], indirect=True)
def test_one_failed_chunk_fails_the_whole_batch(faulty_server, teacher):
    # One of the 3 chunks gets the 500 and no retries are allowed: nothing of the batch may come back.
    prompts, completions = _batch(teacher.config.vocab_size, seed=4, n=6)
    client = RemoteTeacher(faulty_server.url, model="m", top_k=2, max_retries=0, chunk_size=2)
    with pytest.raises(TeacherServerError, match="HTTP 500"):
        client.score(prompts, completions)
    assert client.scored_tokens == 0


@pytest.mark.parametrize("faulty_server", [ServerFaults(delay_s=1.0)], indirect=True)
def test_timeout_is_retried_then_fails_naming_url(faulty_server):
    client = RemoteTeacher(faulty_server.url, model="m", top_k=2, timeout=0.2, max_retries=1, retry_backoff=0.0)
    with pytest.raises(TeacherServerError) as error:  # a full 1 s answer would have succeeded
        client.score([[1, 5]], [[6, 7]])
    assert f"{faulty_server.url}/v1/completions" in str(error.value) and "timed out" in str(error.value)
    assert client.requests_sent == 2


def test_bad_request_is_not_retried(server):
    client = RemoteTeacher(server.url, model="m", top_k=2, max_retries=3, retry_backoff=0.0)
    with pytest.raises(TeacherServerError, match=r"refused the request: HTTP 400.*token ids must lie"):
        client.score([[1, 5]], [[10**6]])
    assert client.requests_sent == 1


def test_no_server_fails_naming_url():
    from socket import socket

    with socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    client = RemoteTeacher(url, model="m", max_retries=1, retry_backoff=0.0, timeout=2)
    with pytest.raises(TeacherServerError, match=f"No teacher server answers at {url}/health"):
        client.health()
    with pytest.raises(TeacherServerError, match=f"{url}/v1/completions failed 2 attempt"):
        client.score([[1]], [[2]])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(base_url="localhost:8000"), "not an http"),
        (dict(top_k=-1), "top_k=-1"),
        (dict(max_retries=-1), "max_retries=-1"),
        (dict(timeout=0), "timeout=0"),
        (dict(max_concurrent_requests=0), "max_concurrent_requests=0"),
    ],
)
def test_bad_client_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RemoteTeacher(**{"base_url": "http://127.0.0.1:1", **kwargs})


def test_health_and_models_endpoints(server, teacher):
    client = RemoteTeacher(server.url + "/v1/")  # a base URL given with /v1 works too
    client.health()
    assert client.base_url == server.url and client.model == "tiny-teacher"
    # What a trainer checks at construction: the ids the server scores and the longest sequence it takes.
    assert client.vocab_size == teacher.config.vocab_size and client.max_model_len == 256
    # A model name the server does not list (e.g. an adapter under another name): its limits are unknown.
    other = RemoteTeacher(server.url, model="not-listed")
    assert other.model == "not-listed" and other.vocab_size is None and other.max_model_len is None


def test_loopback_models_answer_has_vllm_fields_and_vocab_size(server, teacher, monkeypatch):
    import json
    import urllib.request

    with urllib.request.urlopen(f"{server.url}/v1/models", timeout=10) as response:
        body = json.loads(response.read())
    assert body["object"] == "list"
    (entry,) = body["data"]
    assert entry["id"] == entry["root"] == "tiny-teacher" and entry["object"] == "model"
    assert entry["max_model_len"] == teacher.config.max_position_embeddings == 256  # vLLM's field
    assert entry["vocab_size"] == teacher.config.vocab_size  # the loopback server's own: the head's rows
    # Without a vocab_size (as vLLM answers) the client reports it unknown.
    monkeypatch.setattr(server, "vocab_size", None)
    with urllib.request.urlopen(f"{server.url}/v1/models", timeout=10) as response:
        assert "vocab_size" not in json.loads(response.read())["data"][0]
    client = RemoteTeacher(server.url)
    assert client.vocab_size is None and client.max_model_len == 256


def _stub_trainer(student_vocab, tokenizer, use_vllm):
    """What `attach_teacher_server` reads of a trainer (a real one cannot be built with use_vllm without vLLM)."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    return SimpleNamespace(_tokenizer=tokenizer, model=tiny_causal_lm(student_vocab, max_position_embeddings=256),
                           use_vllm=use_vllm, generation_kwargs={}, generation_config=GenerationConfig(),
                           args=SimpleNamespace(max_completion_length=16), train_dataset=None, eval_dataset=None)


def test_attach_server_suppresses_student_ids_past_the_tokenizer(server, char_tokenizer, monkeypatch):
    from horizon_opd.teachers.remote import attach_teacher_server

    vocab = len(char_tokenizer)
    same = _stub_trainer(vocab, char_tokenizer, use_vllm=False)
    assert attach_teacher_server(same, RemoteTeacher(server.url)) is None and "suppress_tokens" not in \
        same.generation_kwargs
    for reported in (vocab, None):  # the loopback server's answer, and vLLM's (no vocab_size)
        monkeypatch.setattr(server, "vocab_size", reported)
        padded = _stub_trainer(vocab + 10, char_tokenizer, use_vllm=False)
        assert attach_teacher_server(padded, RemoteTeacher(server.url)) == vocab
        assert padded.generation_kwargs["suppress_tokens"] == list(range(vocab, vocab + 10))
        assert padded.generation_config.suppress_tokens == list(range(vocab, vocab + 10))


def test_attach_server_with_vllm_generation_refuses_a_padded_student_the_server_cannot_score(server, char_tokenizer,
                                                                                             monkeypatch):
    from horizon_opd.teachers.remote import attach_teacher_server

    vocab = len(char_tokenizer)
    with pytest.raises(ValueError, match=rf"student's vocab_size {vocab + 10} exceeds the {vocab} ids the teacher "
                                         rf"server {server.url} scores.*use_vllm=False"):
        attach_teacher_server(_stub_trainer(vocab + 10, char_tokenizer, use_vllm=True), RemoteTeacher(server.url))
    # vLLM's /v1/models does not say which ids it scores: warned, not refused, and nothing is suppressed or sliced.
    monkeypatch.setattr(server, "vocab_size", None)
    trainer = _stub_trainer(vocab + 10, char_tokenizer, use_vllm=True)
    with pytest.warns(UserWarning, match=rf"{vocab + 10} rows but the tokenizer {vocab} tokens.*{server.url} does not"):
        assert attach_teacher_server(trainer, RemoteTeacher(server.url)) is None
    assert "suppress_tokens" not in trainer.generation_kwargs


# ----------------------------------------------------------------------------------------------- TRL seam
def test_trl_parser_reads_vllm_format_without_vllm():
    """Pins the vLLM `prompt_logprobs` format TRL parses (one entry per prompt token, None first; a dict keyed by the
    token id string holding the top-k by rank and the actual token with its own rank) and that TRL's parser is callable
    without vLLM: only `VLLMClient.__init__` requires it."""
    from trl.generation.vllm_client import VLLMClient
    from trl.import_utils import is_vllm_available

    if not is_vllm_available():
        with pytest.raises(ImportError):
            VLLMClient(base_url="http://127.0.0.1:1")
    choice = {  # as vLLM 0.x returns for prompt [1, 9, 4] with prompt_logprobs=2
        "index": 0, "text": "x", "logprobs": None, "finish_reason": "length",
        "prompt_logprobs": [
            None,
            {"9": {"logprob": -0.1, "rank": 1, "decoded_token": "a"},
             "3": {"logprob": -2.5, "rank": 2, "decoded_token": "b"}},
            {"4": {"logprob": -6.0, "rank": 7, "decoded_token": "c"},  # the actual token, outside the top-2
             "8": {"logprob": -0.3, "rank": 1, "decoded_token": "d"},
             "5": {"logprob": -1.9, "rank": 2, "decoded_token": "e"}},
        ],
    }
    parsed = format_sequence_logprobs(choice, [1, 9, 4], prompt_length=1, top_k=2)
    assert parsed == {
        "logprobs": [[-0.1, -2.5], [-0.3, -1.9]],
        "logprob_token_ids": [[9, 3], [8, 5]],
        "actual_logprobs": [[-0.1], [-6.0]],  # the actual token's log-prob even outside the top-k
        "actual_token_ids": [[9], [4]],
    }
    assert format_sequence_logprobs(choice, [1, 9, 4], 1, 3)["logprobs"][0] == [-0.1, -2.5, -math.inf]  # padded


def test_loopback_response_has_vllm_fields(server):
    import json
    import urllib.request

    payload = {"model": "tiny-teacher", "prompt": [[1, 9, 4]], "max_tokens": 1, "prompt_logprobs": 2}
    request = urllib.request.Request(f"{server.url}/v1/completions", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = json.loads(response.read())
    assert body["object"] == "text_completion" and body["model"] == "tiny-teacher"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    entries = choice["prompt_logprobs"]
    assert len(entries) == 3 and entries[0] is None
    for position, entry in enumerate(entries[1:], start=1):
        ranks = sorted(item["rank"] for item in entry.values())
        assert ranks[:2] == [1, 2] and str([1, 9, 4][position]) in entry
        assert all(set(item) == {"logprob", "rank", "decoded_token"} for item in entry.values())


# ----------------------------------------------------------------------------------------------- top-k loss maths
def _exact_reverse_kl(log_p, log_q):
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _lumped_reverse_kl(log_p, log_q, support):
    """Dense reference: reverse KL between p and q coarse-grained onto the `support` ids (N, k) plus one tail cell."""
    in_support = torch.zeros_like(log_p, dtype=torch.bool).scatter(1, support, True)
    p, q = log_p.exp(), log_q.exp()
    cells = torch.where(in_support, p * (log_p - log_q), 0.0).sum(-1)
    p_tail, q_tail = (p * ~in_support).sum(-1), (q * ~in_support).sum(-1)
    return cells + p_tail * (p_tail.log() - q_tail.log())


def test_topk_kl_equals_exact_reverse_kl_when_k_is_the_vocabulary():
    torch.manual_seed(0)
    N, V = 6, 9
    student_logits = torch.randn(N, V, requires_grad=True)
    log_q = F.log_softmax(torch.randn(N, V), -1)
    top = log_q.topk(V, -1)
    log_p = F.log_softmax(student_logits, -1)
    value = topk_reverse_kl_per_token(log_p.gather(1, top.indices), top.values)
    exact = _exact_reverse_kl(log_p, log_q)
    torch.testing.assert_close(value, exact, atol=1e-5, rtol=1e-5)
    weights = torch.rand(N)
    (grad,) = torch.autograd.grad((value * weights).sum(), student_logits, retain_graph=True)
    (ref,) = torch.autograd.grad((exact * weights).sum(), student_logits)
    torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-5)


def test_topk_kl_is_a_lower_bound_that_grows_to_the_exact_kl():
    torch.manual_seed(1)
    N, V = 32, 50
    log_p = F.log_softmax(torch.randn(N, V) * 2, -1)
    log_q = F.log_softmax(torch.randn(N, V) * 2, -1)
    exact = _exact_reverse_kl(log_p, log_q)
    previous = torch.zeros(N)
    gaps = []
    for k in (1, 2, 5, 10, 25, 40, 50):
        top = log_q.topk(k, -1)
        value = topk_reverse_kl_per_token(log_p.gather(1, top.indices), top.values)
        assert (value >= previous - 1e-5).all(), k  # refining the support never lowers it
        assert (value <= exact + 1e-5).all(), k  # log-sum inequality: a lower bound
        previous = value
        gaps.append((exact - value).mean().item())
    assert gaps[0] > 0.1 and gaps[-1] < 1e-5


def test_topk_kl_gradient_matches_dense_lumped_reference():
    torch.manual_seed(2)
    N, V, k = 5, 8, 3
    logits = torch.randn(N, V, dtype=torch.float64, requires_grad=True)
    log_q = F.log_softmax(torch.randn(N, V, dtype=torch.float64), -1)
    top = log_q.topk(k, -1)

    def ours(z):
        return topk_reverse_kl_per_token(F.log_softmax(z, -1).gather(1, top.indices), top.values)

    torch.testing.assert_close(ours(logits), _lumped_reverse_kl(F.log_softmax(logits, -1), log_q, top.indices))
    weights = torch.rand(N, dtype=torch.float64)
    (grad,) = torch.autograd.grad((ours(logits) * weights).sum(), logits)
    reference = _lumped_reverse_kl(F.log_softmax(logits, -1), log_q, top.indices)
    (ref,) = torch.autograd.grad((reference * weights).sum(), logits)
    torch.testing.assert_close(grad, ref)
    assert torch.autograd.gradcheck(ours, (logits,))


def test_topk_kl_ignores_padded_slots_without_nan_gradients():
    torch.manual_seed(3)
    N, V = 4, 10
    logits = torch.randn(N, V, requires_grad=True)
    log_q = F.log_softmax(torch.randn(N, V), -1)
    top = log_q.topk(4, -1)
    ids, values = top.indices.clone(), top.values.clone()
    values[0, 2:], ids[0, 2:] = -math.inf, 0  # row 0: the server sent only 2 of 4
    values[1, :], ids[1, :] = -math.inf, 0  # row 1: nothing (all mass in the tail -> KL 0)
    log_p = F.log_softmax(logits, -1)
    value = topk_reverse_kl_per_token(log_p.gather(1, ids), values)
    two = topk_reverse_kl_per_token(log_p[:1].gather(1, top.indices[:1, :2]), top.values[:1, :2])
    torch.testing.assert_close(value[0], two[0])
    assert abs(value[1].item()) < 1e-6
    (grad,) = torch.autograd.grad(value.sum(), logits)
    assert torch.isfinite(grad).all()


def test_topk_kl_equals_trl_server_trainer_tail_bucket():
    from trl.experimental.server_distillation.server_distillation_trainer import _add_tail_bucket, _jsd_divergence

    torch.manual_seed(4)
    N, V, k = 6, 30, 5
    log_p = F.log_softmax(torch.randn(N, V), -1)
    log_q = F.log_softmax(torch.randn(N, V), -1)
    top = log_q.topk(k, -1)
    valid = torch.ones(N, k, dtype=torch.bool)
    s, mask = _add_tail_bucket(log_p.gather(1, top.indices), valid)
    t, _ = _add_tail_bucket(top.values, valid)
    trl_value = _jsd_divergence(s, t, beta=1.0, support_mask=mask).sum(-1)  # beta=1: reverse KL
    torch.testing.assert_close(topk_reverse_kl_per_token(log_p.gather(1, top.indices), top.values), trl_value)


@pytest.mark.parametrize("post", [(1.0, None), (0.5, 3.0)])
def test_logprobs_at_matches_dense_log_softmax_in_row_blocks(post):
    torch.manual_seed(5)
    N, H, V, k, temperature = 13, 6, 11, 3, 0.7
    hidden = torch.randn(N, H, requires_grad=True)
    weight, bias = torch.randn(V, H, requires_grad=True), torch.randn(V, requires_grad=True)
    ids = torch.randint(0, V, (N, k))
    # 4 rows per tile: 4 blocks, each recomputed in the backward.
    values, entropy = logprobs_at(hidden, weight, ids, temperature=temperature, bias=bias, post=post,
                                  with_entropy=True, tile_elements=4 * V)
    z = (hidden @ weight.T + bias) * post[0]
    if post[1] is not None:
        z = post[1] * torch.tanh(z / post[1])
    log_p = F.log_softmax(z / temperature, -1)
    torch.testing.assert_close(values, log_p.gather(1, ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, -(log_p.exp() * log_p).sum(-1), atol=1e-5, rtol=1e-5)
    weights = torch.rand(N, k)
    grads = torch.autograd.grad((values * weights).sum(), (hidden, weight, bias))
    refs = torch.autograd.grad((log_p.gather(1, ids) * weights).sum(), (hidden, weight, bias))
    for grad, ref in zip(grads, refs):
        torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-5)
    # Under no_grad (the teacher side, metrics) it gives the same values.
    with torch.no_grad():
        plain, _ = logprobs_at(hidden, weight, ids, temperature=temperature, bias=bias, post=post, tile_elements=4 * V)
    torch.testing.assert_close(plain, values.detach())


# ----------------------------------------------------------------------------------------------- remote == local
def test_remote_teacher_losses_equal_local_teacher(server, teacher):
    """The same teacher served and loaded locally: the sampled loss and its gradients agree to 1e-5, and the top-k
    loss with k = V equals the local exact reverse KL."""
    V = teacher.config.vocab_size
    student = tiny_causal_lm(V, hidden_size=32, seed=0, max_position_embeddings=256)
    prompts, completions = _batch(V, seed=6, n=4)
    client = RemoteTeacher(server.url, top_k=V, chunk_size=2)
    scores = client.score(prompts, completions)
    mask = scores.mask.reshape(-1)
    targets = torch.tensor([t for c in completions for t in c])

    def hidden_states(model, grad):
        rows = []
        for p, c in zip(prompts, completions):
            if not c:
                continue
            with torch.set_grad_enabled(grad):
                out = model(input_ids=torch.tensor([p + c]), output_hidden_states=True)
            rows.append(out.hidden_states[-1][0, len(p) - 1 : len(p) + len(c) - 1])
        return torch.cat(rows)  # (N, H)

    h_s, h_t = hidden_states(student, True), hidden_states(teacher, False)
    w_s, w_t = student.lm_head.weight, teacher.lm_head.weight
    student_lp, _ = token_logprobs(h_s, w_s, targets)
    local_teacher_lp, _ = token_logprobs(h_t, w_t, targets)
    remote_teacher_lp = scores.actual_logprobs.reshape(-1)[mask]
    torch.testing.assert_close(remote_teacher_lp, local_teacher_lp, atol=1e-5, rtol=0)
    remote_loss = sampled_kl_per_token(student_lp, remote_teacher_lp).mean()
    local_loss = sampled_kl_per_token(student_lp, local_teacher_lp).mean()
    torch.testing.assert_close(remote_loss, local_loss, atol=1e-5, rtol=0)
    grad_remote = torch.autograd.grad(remote_loss, w_s, retain_graph=True)[0]
    grad_local = torch.autograd.grad(local_loss, w_s, retain_graph=True)[0]
    torch.testing.assert_close(grad_remote, grad_local, atol=1e-5, rtol=1e-5)

    ids = scores.topk_ids.reshape(-1, V)[mask]
    student_topk, _ = logprobs_at(h_s, w_s, ids)
    topk = topk_reverse_kl_per_token(student_topk, scores.topk_logprobs.reshape(-1, V)[mask])
    exact, _ = reverse_kl_per_token(h_s, w_s, h_t, w_t)
    torch.testing.assert_close(topk, exact, atol=1e-5, rtol=1e-5)
    grad_topk = torch.autograd.grad(topk.mean(), w_s, retain_graph=True)[0]
    grad_exact = torch.autograd.grad(exact.mean(), w_s)[0]
    torch.testing.assert_close(grad_topk, grad_exact, atol=1e-5, rtol=1e-5)


def test_restrict_vocab_moves_teacher_padding_ids_to_the_tail(server, teacher):
    prompts, completions = _batch(teacher.config.vocab_size, seed=7, n=2)
    scores = RemoteTeacher(server.url, top_k=teacher.config.vocab_size).score(prompts, completions)
    student_vocab = teacher.config.vocab_size - 10  # a student whose head lacks the teacher's last 10 rows
    restricted = scores.restrict_vocab(student_vocab)
    dropped = scores.topk_ids >= student_vocab
    assert dropped.any() and (restricted.topk_ids < student_vocab).all()
    assert (restricted.topk_logprobs[dropped] == -math.inf).all()
    assert torch.equal(restricted.topk_logprobs[~dropped], scores.topk_logprobs[~dropped])
