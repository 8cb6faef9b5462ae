"""The paper's analyses: sequence-level OPD against the exact sequence reverse KL on an enumerated toy, loss windows by
hand, and prefix continuation against the bundled demo pair's own greedy accuracy."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from horizon_opd.analysis import prefix_continuation
from horizon_opd.loss import (
    check_loss_window,
    loss_window_mask,
    loss_window_tokens,
    sampled_kl_per_token,
    sequence_kl_per_token,
)

# ---------------------------------------------------------------------------------------------------------------------
# Sequence-level OPD on an enumerable toy: K positions, vocabulary V, an autoregressive student whose logits at
# position t depend on the previous token, theta[t, y_{t-1}] (y_{-1} = 0), and a fixed teacher of the same form. With
# an EOS id, a rollout ends at its first EOS (inclusive) and the positions after it are masked.
K, V = 3, 4


def _rollouts(eos: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every distinct rollout `(N, K)` and its mask; positions after an EOS are padded with token 0."""
    seen = {}
    for tokens in itertools.product(range(V), repeat=K):
        length = tokens.index(eos) + 1 if eos in tokens else K
        seen.setdefault(tokens[:length], None)
    ids = torch.tensor([list(r) + [0] * (K - len(r)) for r in seen])
    mask = torch.tensor([[1] * len(r) + [0] * (K - len(r)) for r in seen])
    return ids, mask


def _logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log pi(y_t | y_{t-1}) per position `(N, K)` for logits `(K, V, V)` indexed [position, previous token]."""
    previous = torch.cat([torch.zeros_like(ids[:, :1]), ids[:, :-1]], dim=1)
    log_p = F.log_softmax(logits, dim=-1)  # (K, V_prev, V)
    return log_p[torch.arange(K), previous, ids]  # (N, K)


def _toy(seed: int):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(K, V, V, generator=g, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(K, V, V, generator=g, dtype=torch.float64)
    return theta, teacher


@pytest.mark.parametrize("eos", [None, 2])
def test_sequence_estimator_expected_gradient_equals_sequence_reverse_kl_gradient(eos):
    # E_{y ~ pi}[grad sum_t surrogate_t(y)], weighting each enumerated rollout by pi(y), equals grad KL(pi || q) over
    # whole rollouts exactly (sum over positions, no division by the token count): no Monte-Carlo noise.
    theta, teacher = _toy(0)
    ids, mask = _rollouts(eos)
    log_pi = _logprobs(theta, ids) * mask  # (N, K)
    log_q = _logprobs(teacher, ids) * mask
    seq_log_pi, seq_log_q = log_pi.sum(1), log_q.sum(1)  # (N,)
    torch.testing.assert_close(seq_log_pi.exp().sum(), torch.tensor(1.0, dtype=torch.float64))  # all rollouts listed
    sequence_kl = (seq_log_pi.exp() * (seq_log_pi - seq_log_q)).sum()
    exact = torch.autograd.grad(sequence_kl, theta, retain_graph=True)[0]

    weight = seq_log_pi.exp().detach()[:, None]  # pi(y), (N, 1)
    surrogate = sequence_kl_per_token(log_pi, log_q, mask)  # (N, K)
    expected = torch.autograd.grad((weight * surrogate).sum(), theta)[0]
    torch.testing.assert_close(expected, exact, atol=1e-12, rtol=1e-10)
    assert exact.abs().max() > 1e-2  # a non-trivial gradient
    # the value summed over positions is the single-sample estimate of the sequence KL: its expectation is the KL
    torch.testing.assert_close((weight * surrogate).sum(), sequence_kl.detach())
    assert (surrogate[mask == 0] == 0).all()


def test_token_estimator_expected_gradient_is_the_token_kl_gradient_not_the_sequence_one():
    # The token-level sampled estimator, in expectation over rollouts, follows sum_t E_{y<t ~ sg(pi)}[grad KL_t(y<t)]:
    # the reverse KL at every position, with the distribution of the prefixes held fixed. The sequence-level gradient
    # adds how a token changes the positions after it, so the two differ.
    theta, teacher = _toy(1)
    ids, mask = _rollouts(None)
    log_pi, log_q = _logprobs(theta, ids), _logprobs(teacher, ids)
    weight = log_pi.sum(1).exp().detach()[:, None]
    token_grad = torch.autograd.grad((weight * sampled_kl_per_token(log_pi, log_q)).sum(), theta, retain_graph=True)[0]
    sequence_grad = torch.autograd.grad((weight * sequence_kl_per_token(log_pi, log_q, mask)).sum(), theta)[0]

    # sum_t sum_{y<t} sg(pi(y<t)) KL(pi(.|y_{t-1}) || q(.|y_{t-1})) over every prefix (the toy reads y_{t-1} only)
    log_p_all, log_q_all = F.log_softmax(theta, -1), F.log_softmax(teacher, -1)  # (K, V_prev, V)
    token_kl = (log_p_all.exp() * (log_p_all - log_q_all)).sum(-1)  # (K, V_prev)
    prev_prob = torch.zeros(K, V, dtype=torch.float64)  # P(y_{t-1} = v), detached
    prev_prob[0, 0] = 1.0
    for t in range(1, K):
        prev_prob[t] = prev_prob[t - 1] @ log_p_all[t - 1].exp().detach()
    exact_token = torch.autograd.grad((prev_prob * token_kl).sum(), theta)[0]

    torch.testing.assert_close(token_grad, exact_token, atol=1e-12, rtol=1e-10)
    assert (sequence_grad - token_grad).abs().max() > 1e-2
    # the last position has no future: its parameters get the same gradient from both
    torch.testing.assert_close(sequence_grad[-1], token_grad[-1], atol=1e-12, rtol=1e-10)


def test_sequence_advantage_is_the_masked_reward_to_go():
    student = torch.tensor([[-1.0, -2.0, -3.0, -4.0]], requires_grad=True)
    teacher = torch.tensor([[-1.5, -1.0, -2.0, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    surrogate = sequence_kl_per_token(student, teacher, mask)
    # log-ratios log q - log pi: -0.5, 1.0, 1.0 (the masked 4th is ignored); reward-to-go: 1.5, 2.0, 1.0, 0
    torch.testing.assert_close(surrogate.detach(), torch.tensor([[0.5, -1.0, -1.0, 0.0]]))
    (grad,) = torch.autograd.grad(surrogate.sum(), student)
    torch.testing.assert_close(grad, torch.tensor([[-1.5, -2.0, -1.0, 0.0]]))


# ---------------------------------------------------------------------------------------------------------------------
# Loss windows (segment distillation): positions k with start * H <= k < end * H, i.e. [ceil(start * H), ceil(end * H)).


@pytest.mark.parametrize(
    ("horizon", "start", "end", "expected"),
    [
        (10, 0.0, 1.0, (0, 10)),
        (10, 0.0, 0.5, (0, 5)),
        (10, 0.5, 1.0, (5, 10)),
        (10, 0.25, 0.75, (3, 8)),  # 2.5 -> 3, 7.5 -> 8
        (8, 0.25, 0.75, (2, 6)),
        (30, 0.1, 0.2, (3, 6)),  # 0.1 * 30 = 3.0000000000000004 and 0.2 * 30 = 6.000000000000001: no extra token
        (7, 0.0, 0.01, (0, 1)),
        (7, 0.99, 1.0, (6, 7)),  # 6.93 -> 7 would leave the window empty: it keeps its last position
        (8, 0.3, 0.35, (2, 3)),  # 2.4 -> 3 and 2.8 -> 3: the same
    ],
)
def test_loss_window_tokens_by_hand(horizon, start, end, expected):
    assert loss_window_tokens(horizon, start, end) == expected


def test_loss_window_mask_by_hand():
    # horizon 8; row 0 ran the whole horizon (padded to 10), row 1 ended with EOS after 3 tokens
    completion_mask = torch.tensor([[1] * 8 + [0, 0], [1, 1, 1] + [0] * 7])
    window = loss_window_mask(completion_mask, horizon=8, start=0.25, end=0.75)  # positions [2, 6)
    assert window.tolist() == [[0, 0, 1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0, 0, 0]]
    assert window.dtype == completion_mask.dtype
    # windows (0, b) and (b, 1) tile the rollout
    first = loss_window_mask(completion_mask, 8, 0.0, 0.3)
    second = loss_window_mask(completion_mask, 8, 0.3, 1.0)
    assert torch.equal(first + second, completion_mask)


@pytest.mark.parametrize("window", [(0.5, 0.5), (0.6, 0.4), (-0.1, 0.5), (0.0, 1.5), (0.5,), 0.5, ("0", "1"),
                                    (True, 1.0), None])
def test_check_loss_window_names_value_and_fix(window):
    with pytest.raises(ValueError, match=r"loss_window=.*0 <= start < end <= 1"):
        check_loss_window(window)


def test_check_loss_window_accepts_pairs():
    assert check_loss_window([0, 1]) == (0.0, 1.0)
    assert check_loss_window((0.25, 0.5)) == (0.25, 0.5)


# ---------------------------------------------------------------------------------------------------------------------
# Prefix continuation on the bundled demo pair.


@pytest.fixture(scope="module")
def demo():
    from horizon_opd.demo import build_datasets, load_demo_models

    torch.manual_seed(0)
    student, teacher, tokenizer = load_demo_models()
    return student, teacher, tokenizer, build_datasets()["test"].select(range(8))


def _exact_match(row, text):
    from horizon_opd.demo import extract_answer

    return extract_answer(text) == row["answer"]


def test_prefix_continuation_ends_at_the_student_and_the_teacher(demo):
    from horizon_opd.demo import MAX_COMPLETION_LENGTH, accuracy, generate_completions

    student, teacher, tokenizer, prompts = demo
    seen = []

    def scorer(row, text):
        seen.append(text)
        return _exact_match(row, text)

    results = prefix_continuation(teacher, student, tokenizer, prompts, [0.0, 0.5, 1.0], scorer, MAX_COMPLETION_LENGTH)
    texts = [seen[i : i + len(prompts)] for i in range(0, len(seen), len(prompts))]  # one list per ratio
    assert [r["ratio"] for r in results] == [0.0, 0.5, 1.0]
    assert all(r["n"] == 8 for r in results)

    student_texts = generate_completions(student, tokenizer, prompts["prompt"])
    teacher_texts = generate_completions(teacher, tokenizer, prompts["prompt"])
    # ratio 0 is the student alone and ratio 1 the teacher's rollout, text for text
    assert texts[0] == student_texts
    assert texts[2] == teacher_texts
    assert results[0]["accuracy"] == accuracy(student_texts, prompts["answer"])
    assert results[2]["accuracy"] == accuracy(teacher_texts, prompts["answer"])
    assert results[0]["scores"] == [float(_exact_match(row, t)) for row, t in zip(prompts, student_texts, strict=True)]
    assert results[0]["mean_prefix_tokens"] == 0
    # the demo pair differs on these prompts, so the two ends are not the same measurement
    assert results[2]["accuracy"] > results[0]["accuracy"]
    # ratio 0.5 continues the teacher's first half: the completion starts with it
    for text, teacher_text in zip(texts[1], teacher_texts, strict=True):
        teacher_ids = tokenizer(teacher_text, add_special_tokens=False)["input_ids"]
        half = tokenizer.decode(teacher_ids[: -(-(len(teacher_ids) + 1) // 2)])  # ceil(n / 2), n counts the EOS
        assert text.startswith(half)


def test_prefix_continuation_sampling_is_seeded_and_leaves_the_global_rng(demo):
    student, teacher, tokenizer, prompts = demo
    prompts = prompts.select(range(4))
    state = torch.random.get_rng_state()
    # a high temperature: the demo teacher is near-certain (held-out accuracy 1.00), so at 1.5 two seeds agreed
    kwargs = dict(do_sample=True, temperature=4.0, max_new_tokens=24)
    seen = []

    def scorer(row, text):
        seen.append(text)
        return 0.0

    prefix_continuation(teacher, student, tokenizer, prompts, [1.0], scorer, seed=3, **kwargs)
    prefix_continuation(teacher, student, tokenizer, prompts, [1.0], scorer, seed=3, **kwargs)
    prefix_continuation(teacher, student, tokenizer, prompts, [1.0], scorer, seed=4, **kwargs)
    assert seen[:4] == seen[4:8]
    assert seen[:4] != seen[8:]
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(ratios=[0.0, 1.5]), r"ratio 1.5 is outside \[0, 1\]"),
    (dict(max_new_tokens=0), r"max_new_tokens=0"),
    (dict(prompts=[]), r"prompts is empty"),
])
def test_prefix_continuation_rejects_bad_input(demo, kwargs, match):
    student, teacher, tokenizer, prompts = demo
    call = dict(prompts=prompts, ratios=[0.0], max_new_tokens=8) | kwargs
    with pytest.raises(ValueError, match=match):
        prefix_continuation(teacher, student, tokenizer, call["prompts"], call["ratios"], _exact_match,
                            call["max_new_tokens"])
