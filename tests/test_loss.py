"""The loss functions against explicit formulas, GKD's `generalized_jsd_loss`, and the exact reverse-KL gradient."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from trl.experimental.gkd import GKDTrainer

from horizon_opd.loss import (
    masked_token_mean,
    reverse_kl_per_token,
    sampled_kl_per_token,
    token_logprobs,
)


def _explicit_reverse_kl(student_logits, teacher_logits, temperature):
    log_p = F.log_softmax(student_logits / temperature, dim=-1)
    log_q = F.log_softmax(teacher_logits / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)  # sum_v p_s(v) (log p_s(v) - log p_t(v))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_reverse_kl_matches_explicit_formula_and_gradients(temperature):
    torch.manual_seed(0)
    N, H_s, H_t, V = 6, 5, 7, 11
    h_s = torch.randn(N, H_s, dtype=torch.float64).float().requires_grad_()
    w_s = torch.randn(V, H_s).requires_grad_()
    h_t, w_t = torch.randn(N, H_t), torch.randn(V, H_t)
    kl, entropy = reverse_kl_per_token(h_s, w_s, h_t, w_t, temperature=temperature)
    expected = _explicit_reverse_kl(h_s @ w_s.T, h_t @ w_t.T, temperature)
    torch.testing.assert_close(kl, expected, atol=1e-5, rtol=1e-5)
    log_p = F.log_softmax((h_s @ w_s.T) / temperature, -1)
    torch.testing.assert_close(entropy, -(log_p.exp() * log_p).sum(-1), atol=1e-5, rtol=1e-5)

    weights = torch.rand(N)
    (grad_h, grad_w) = torch.autograd.grad((kl * weights).sum(), (h_s, w_s))
    (ref_h, ref_w) = torch.autograd.grad((expected * weights).sum(), (h_s, w_s))
    torch.testing.assert_close(grad_h, ref_h, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad_w, ref_w, atol=1e-5, rtol=1e-4)


def test_reverse_kl_matches_gkd_generalized_jsd_beta_1():
    torch.manual_seed(1)
    B, K, H, V = 2, 4, 8, 13
    h_s, w_s, h_t, w_t = torch.randn(B, K, H), torch.randn(V, H), torch.randn(B, K, H), torch.randn(V, H)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    labels = torch.where(mask.bool(), torch.zeros_like(mask), torch.full_like(mask, -100))
    gkd = GKDTrainer.generalized_jsd_loss(h_s @ w_s.T, h_t @ w_t.T, labels=labels, beta=1.0, temperature=0.9)
    kl, _ = reverse_kl_per_token(h_s.reshape(-1, H), w_s, h_t.reshape(-1, H), w_t, temperature=0.9)
    ours = masked_token_mean(kl.view(B, K), mask)
    torch.testing.assert_close(ours, gkd, atol=1e-5, rtol=1e-5)


def test_token_logprobs_matches_log_softmax():
    torch.manual_seed(2)
    h, w = torch.randn(5, 4), torch.randn(9, 4)
    targets = torch.tensor([0, 3, 8, 2, 2])
    logprobs, entropy = token_logprobs(h, w, targets, temperature=1.3, with_entropy=True)
    log_p = F.log_softmax((h @ w.T) / 1.3, -1)
    torch.testing.assert_close(logprobs, log_p.gather(1, targets[:, None]).squeeze(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, -(log_p.exp() * log_p).sum(-1), atol=1e-5, rtol=1e-5)


def test_sampled_estimator_expected_gradient_equals_exact_reverse_kl_gradient():
    # Enumerate every token of a small vocabulary at 3 positions and weight each sampled-token gradient by pi(y):
    # E_{y ~ pi}[grad surrogate(y)] must equal grad KL(pi || q) exactly (no Monte-Carlo noise).
    torch.manual_seed(3)
    positions, V = 3, 6
    student_logits = torch.randn(positions, V, dtype=torch.float64, requires_grad=True)
    teacher_logits = torch.randn(positions, V, dtype=torch.float64)
    log_q = F.log_softmax(teacher_logits, -1)
    exact = torch.autograd.grad(_explicit_reverse_kl(student_logits, teacher_logits, 1.0).sum(), student_logits)[0]

    log_pi = F.log_softmax(student_logits, -1)
    probs = log_pi.exp().detach()
    expected_grad = torch.zeros_like(student_logits)
    expected_value = torch.zeros(positions, dtype=torch.float64)
    for t, y in itertools.product(range(positions), range(V)):
        surrogate = sampled_kl_per_token(log_pi[t, y], log_q[t, y])
        grad = torch.autograd.grad(surrogate, student_logits, retain_graph=True)[0]
        expected_grad += probs[t, y] * grad
        expected_value[t] += probs[t, y] * surrogate.detach()
    torch.testing.assert_close(expected_grad, exact, atol=1e-10, rtol=1e-8)
    # its value is the single-sample KL estimate, whose expectation is the exact KL
    torch.testing.assert_close(expected_value, _explicit_reverse_kl(student_logits, teacher_logits, 1.0).detach())


def test_masked_token_mean_uses_the_given_normaliser():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_token_mean(per_token, mask).item() == pytest.approx((1 + 2 + 4) / 3)
    assert masked_token_mean(per_token, mask, torch.tensor(7.0)).item() == pytest.approx(7 / 7)


def test_topk_disagreement_by_hand():
    from horizon_opd.loss import topk_disagreement_per_token

    torch.manual_seed(0)
    hidden, weight = torch.randn(300, 8), torch.randn(50, 8)  # 300 rows: more than one CPU row block
    same = topk_disagreement_per_token(hidden, weight, hidden, weight, k=5)
    assert same.shape == (300,) and torch.all(same == 0)
    # teacher logits are the student's negated: top-5 and bottom-5 of 50 never overlap
    apart = topk_disagreement_per_token(hidden, weight, hidden, -weight, k=5)
    assert torch.all(apart == 1)
    # by hand on 4 tokens, k = 2: student ranks {0, 1}, teacher ranks {1, 2} -> one shared -> 0.5
    eye = torch.eye(4)
    student = topk_disagreement_per_token(torch.tensor([[4.0, 3.0, 1.0, 0.0]]), eye,
                                          torch.tensor([[0.0, 3.0, 4.0, 1.0]]), eye, k=2)
    assert student.tolist() == [0.5]
