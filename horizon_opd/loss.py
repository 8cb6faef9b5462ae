"""Distillation losses on hidden states, without materializing `[B, K, V]` logits.

The losses reuse TRL's chunked kernels (or row blocks), which project hidden states through the LM head on
`[tokens, vocab]` tiles:

- `reverse_kl_per_token`: the exact token-level reverse KL at every completion position,
      KL(pi_s || pi_t)(x_<t) = sum_v p_s(v) (log p_s(v) - log p_t(v)),
  with p = softmax(logits / temperature) for both models ([`trl.kernels.chunked_divergence.ChunkedDivergenceFunction`]
  with beta=1, the kernel `trl.DistillationTrainer` uses). Gradients reach the student only.
- `sampled_kl_per_token`: the sampled-token estimator (Thinking Machines-style OPD) for teachers that only expose the
  log-prob of the sampled token y_t. With the per-token advantage A_t = log q(y_t) - log pi(y_t) held constant
  (stop-gradient), the surrogate's value is the single-sample KL estimate -A_t and its gradient is the policy gradient
  -A_t * grad log pi(y_t), whose expectation over y_t ~ pi equals the exact reverse-KL gradient (the score-function term
  sum_v grad pi(v) vanishes).
- `sequence_kl_per_token`: sequence-level OPD, the same estimator with each token's advantage summed from that position
  to the end of the rollout (reward-to-go).
- `topk_reverse_kl_per_token` (with `logprobs_at`): the reverse KL on a remote teacher's top-k support plus one tail
  bucket, a lower bound of the exact KL.
- `topk_disagreement_per_token`: not a loss, the adaptive horizon's top-k overlap signal.

`loss_window_mask` restricts training to one segment of the horizon (segment distillation). The reduction is a separate, explicit function (`masked_token_mean`) so the normaliser is visible.
"""

import math
from typing import NamedTuple

import torch
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
from trl.kernels.chunked_logprob import ChunkedLogProbFunction

# Vocabulary tile of the log-prob kernel; the same value TRL's fused SFT/GRPO losses use.
LOGPROB_VOCAB_CHUNK = 32768
# Positions per call of TRL's divergence kernel on CPU. Without Triton the kernel works on float32 [rows, 32768] tiles
# with about a dozen temporaries each, rows = min(N, 4096): 512 MB apiece, which the allocator maps afresh and the
# kernel faults in page by page on every call. Blocks of 128 positions keep each temporary at 16 MiB, reused from the
# heap: the loss of a 4096-position batch at vocab 32k takes ~2x less time and ~5x less memory (benchmarks/README.md).
# GPUs keep TRL's tiling.
CPU_ROW_BLOCK = 128


class Head(NamedTuple):
    """One model's side of a loss: hidden states at the trained positions and the LM head that projects them."""

    hidden: torch.Tensor  # (N, H)
    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None
    post: tuple  # (logit_scale, final_logit_softcapping), `logit_postprocessing`


def logit_postprocessing(config) -> tuple[float, float | None]:
    """(logit_scale, final_logit_softcapping) a model applies to its `lm_head` output, read as TRL reads them."""
    config = config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        # Granite and MiniCPM3 divide by `logits_scaling`; HyperCLOVA X multiplies by it.
        scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
    return (1.0 if scale is None else scale), getattr(config, "final_logit_softcapping", None)


def reverse_kl_per_token(
    student_hidden: torch.Tensor,  # (N, H_s)
    student_weight: torch.Tensor,  # (V, H_s)
    teacher_hidden: torch.Tensor,  # (N, H_t)
    teacher_weight: torch.Tensor,  # (V, H_t)
    *,
    temperature: float = 1.0,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_post: tuple[float, float | None] = (1.0, None),
    teacher_post: tuple[float, float | None] = (1.0, None),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL(student || teacher) and student entropy, both `(N,)` float32, in nats."""

    def divergence(h_s, h_t):
        return ChunkedDivergenceFunction.apply(
            h_s,
            student_weight,
            student_bias,
            h_t,
            teacher_weight,
            teacher_bias,
            1.0,  # beta = 1: reverse KL
            temperature,
            student_post[0],
            student_post[1],
            teacher_post[0],
            teacher_post[1],
        )

    n = student_hidden.size(0)
    if student_hidden.device.type != "cpu" or n <= CPU_ROW_BLOCK or zero3_enabled():
        # Under ZeRO-3 every kernel call gathers the partitioned lm_heads (forward and backward): a collective. One call
        # per rank keeps the number of collectives independent of how many tokens each rank holds.
        return divergence(student_hidden, teacher_hidden)
    # Every position is independent, so row blocks give the same values; see CPU_ROW_BLOCK for why.
    blocks = [
        divergence(student_hidden[i : i + CPU_ROW_BLOCK], teacher_hidden[i : i + CPU_ROW_BLOCK])
        for i in range(0, n, CPU_ROW_BLOCK)
    ]
    return torch.cat([kl for kl, _ in blocks]), torch.cat([entropy for _, entropy in blocks])


@torch.no_grad()
def topk_disagreement_per_token(
    student_hidden: torch.Tensor,  # (N, H_s)
    student_weight: torch.Tensor,  # (V, H_s)
    teacher_hidden: torch.Tensor,  # (N, H_t)
    teacher_weight: torch.Tensor,  # (V, H_t)
    *,
    k: int,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_post: tuple[float, float | None] = (1.0, None),
    teacher_post: tuple[float, float | None] = (1.0, None),
) -> torch.Tensor:
    """Per position, 1 - |top-k(student) & top-k(teacher)| / k: the share of the teacher's k most likely next tokens
    the student does not also rank in its top k (Prune-OPD's overlap signal, arXiv 2605.07804), `(N,)` float32.

    Temperature and softcapping are monotone, so the top-k sets come from the raw projections (times the sign of the
    logit scale). Row blocks keep the `[rows, V]` logits small; under ZeRO-3 the heads are gathered once around them."""
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    out = []
    with maybe_gather_lm_head_ctx(student_weight, student_bias), maybe_gather_lm_head_ctx(teacher_weight, teacher_bias):
        for i in range(0, student_hidden.size(0), CPU_ROW_BLOCK):
            tops = []
            for hidden, weight, bias, post in ((student_hidden, student_weight, student_bias, student_post),
                                               (teacher_hidden, teacher_weight, teacher_bias, teacher_post)):
                logits = hidden[i : i + CPU_ROW_BLOCK].to(weight.dtype) @ weight.T  # (rows, V)
                if bias is not None:
                    logits = logits + bias
                tops.append((logits if post[0] >= 0 else -logits).topk(min(k, logits.size(-1)), dim=-1).indices)
            shared = (tops[0].unsqueeze(-1) == tops[1].unsqueeze(-2)).any(-1).sum(-1)  # (rows,)
            out.append(1.0 - shared.float() / tops[0].size(-1))
    if not out:
        return student_hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)


def zero3_enabled() -> bool:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def token_logprobs(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    targets: torch.Tensor,  # (N,)
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    post: tuple[float, float | None] = (1.0, None),
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / temperature)[target] per position `(N,)`, and the entropy if asked for."""
    logprobs, entropy, *_ = ChunkedLogProbFunction.apply(
        hidden,
        weight,
        bias,
        targets,
        temperature,
        LOGPROB_VOCAB_CHUNK,
        post[1],
        post[0],
        ("entropy",) if with_entropy else (),
    )
    return logprobs, entropy


def sampled_kl_per_token(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Policy-gradient surrogate of the sampled-token reverse-KL estimator, per position.

    value:    log pi(y_t) - log q(y_t)            (single-sample estimate of the token-level reverse KL)
    gradient: -A_t * grad log pi(y_t), with A_t = sg(log q(y_t) - log pi(y_t))
    """
    advantage = (teacher_logprobs - student_logprobs).detach()
    return -advantage * (student_logprobs - student_logprobs.detach()) - advantage


def sequence_kl_per_token(
    student_logprobs: torch.Tensor,  # (B, K)
    teacher_logprobs: torch.Tensor,  # (B, K)
    mask: torch.Tensor,  # (B, K)
) -> torch.Tensor:
    """Policy-gradient surrogate of the sequence-level reverse KL, per position `(B, K)` (zero where `mask` is 0).

    The sequence-level reverse KL of a rollout distribution is
        KL(pi || q) = E_{y ~ pi}[ sum_t log pi(y_t | y_<t) - log q(y_t | y_<t) ].
    Its gradient (score function: E[grad log pi(y)] = 0, and E[grad log pi(y_t | y_<t) | y_<t] = 0 drops the
    log-ratios before t from position t's weight) is
        grad KL = E_{y ~ pi}[ sum_t -A_t grad log pi(y_t | y_<t) ],
        A_t = sum_{j >= t, mask_j = 1} log q(y_j | y_<j) - log pi(y_j | y_<j),
    the teacher-student log-ratio summed from position t to the end of the rollout (reward-to-go, undiscounted). The
    token-level loss (`sampled_kl_per_token`) keeps only the j = t term: it ignores how a token steers the positions
    after it.

    value:    log pi(y_t) - log q(y_t)            (as `sampled_kl_per_token`: summed over t it is the single-sample
                                                   estimate log pi(y) / q(y) of the sequence KL)
    gradient: -A_t * grad log pi(y_t), with A_t = sg(reward-to-go above)

    Normaliser: the identity E_y[grad sum_t surrogate_t] = grad KL(pi || q) holds for the SUM over a rollout's
    positions. `masked_token_mean` divides the batch's sum by its token count, a constant for the batch, so the
    trained gradient is the sequence-KL gradient per completion token, as the token-level losses are per token.
    Masked positions (prompt, padding, after EOS, outside a loss window) contribute neither a value nor a log-ratio.
    """
    mask = mask.bool()
    dtype = student_logprobs.dtype
    # The sum runs over up to K positions: accumulate in at least float32 even for bf16 log-probs.
    log_ratio = torch.where(mask, teacher_logprobs - student_logprobs, 0.0).detach()
    log_ratio = log_ratio.to(torch.promote_types(dtype, torch.float32))  # (B, K)
    advantage = log_ratio.flip(-1).cumsum(-1).flip(-1)  # reward-to-go, (B, K)
    surrogate = -advantage.to(dtype) * (student_logprobs - student_logprobs.detach()) - log_ratio.to(dtype)
    return torch.where(mask, surrogate, 0.0)


def check_loss_window(window) -> tuple[float, float]:
    """`window` as a `(start, end)` pair of floats, or a `ValueError` naming the bad value and the fix."""
    fix = ("it is a (start, end) pair of fractions of the horizon with 0 <= start < end <= 1, e.g. (0.0, 0.5) to train "
           "on the first half of each rollout or (0.5, 1.0) on the second; use None to train on the whole rollout.")
    if not isinstance(window, tuple | list) or len(window) != 2:
        raise ValueError(f"loss_window={window!r} is not a pair: {fix}")
    start, end = window
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (start, end)):
        raise ValueError(f"loss_window={window!r} holds a non-number: {fix}")
    if not (0.0 <= start < end <= 1.0):
        raise ValueError(f"loss_window={window!r} has start={start!r}, end={end!r} out of order or range: {fix}")
    return float(start), float(end)


def loss_window_tokens(horizon: int, start: float, end: float) -> tuple[int, int]:
    """Completion positions [first, stop) of the window [start, end) of a `horizon`-token rollout: the positions k with
    start * horizon <= k < end * horizon, i.e. first = ceil(start * horizon), stop = ceil(end * horizon).

    Both bounds round as `horizon.ratio_to_tokens` does (ceil, after rounding away float noise: 0.1 * 30 -> 3, not 4),
    so `stop` is the number of tokens to generate, the window starts right after the ceil(start * horizon) tokens a
    horizon of `start` would generate, and windows (a, b) and (b, c) tile a rollout without a gap or an overlap. A
    window narrower than a token that holds no position (8 tokens, (0.3, 0.35): [3, 3)) keeps position stop - 1, so it
    is never empty: 0 <= first < stop <= horizon.
    """
    start, end = check_loss_window((start, end))
    if int(horizon) < 1:
        raise ValueError(f"horizon={horizon!r} must be a positive number of tokens.")
    stop = min(horizon, max(1, math.ceil(round(end * horizon, 9))))
    first = min(stop - 1, math.ceil(round(start * horizon, 9)))
    return first, stop


def loss_window_mask(completion_mask: torch.Tensor, horizon: int, start: float, end: float) -> torch.Tensor:
    """`completion_mask` (B, K) with every position outside [ceil(start * horizon), ceil(end * horizon)) set to 0
    (segment distillation, the paper's Fig. 12). Positions count from the first completion token; see
    `loss_window_tokens` for the rounding."""
    first, stop = loss_window_tokens(horizon, start, end)
    positions = torch.arange(completion_mask.size(-1), device=completion_mask.device)
    inside = (positions >= first) & (positions < stop)  # (K,)
    return completion_mask * inside.to(completion_mask.dtype)


def masked_token_mean(per_token: torch.Tensor, mask: torch.Tensor, num_items: torch.Tensor | int | None = None):
    """sum(per_token * mask) / num_items. `num_items` is the number of completion tokens in the whole
    gradient-accumulated batch (so micro-batch losses add up to one token mean); `None` means this mask's count."""
    total = (per_token * mask).sum()
    if num_items is None:
        return total / mask.sum().clamp(min=1)
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.to(total.device)
    return total / num_items


# ----------------------------------------------------------------------------------------------- remote (top-k) teacher
# Elements of one float32 (rows, V) logits tile in `logprobs_at`: 64 MiB, i.e. 512 rows at vocab 32k, 110 at 152k.
LOGITS_TILE_ELEMENTS = 2**24
# Least tail mass: keeps log(1 - sum of the top-k probabilities) finite when the top-k hold all the mass (k = V, or
# float rounding puts the sum at 1); TRL's server trainer uses the same floor (`_add_tail_bucket`).
_TAIL_LOGSUMEXP_MAX = -1e-7


def logprobs_at(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    token_ids: torch.Tensor,  # (N, k)
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    post: tuple[float, float | None] = (1.0, None),
    with_entropy: bool = False,
    tile_elements: int = LOGITS_TILE_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(z / temperature) at k token ids per position `(N, k)` float32, and the entropy `(N,)` if asked.

    z = softcap(scale * (h W^T + b)), `post` = (scale, softcap) as for `token_logprobs` and TRL's kernels. Like TRL's
    chunked kernels, the logits are made in row blocks of at most `tile_elements` entries and only `(N, k)` values and
    the `(N,)` logsumexp are kept; the backward recomputes one `(rows, V)` tile at a time, so no `(N, V)` tensor is ever
    alive (at N = 4096 and V = 152k that would be 2.5 GB). Under ZeRO-3 the head is gathered around the forward and
    again around the backward (`maybe_gather_lm_head_ctx`). Gradients reach `hidden`, `weight` and `bias`; the entropy
    is a metric, without gradient."""
    rows = max(1, tile_elements // weight.size(0))
    logprobs, entropy = _LogProbsAt.apply(hidden, weight, bias, token_ids, temperature, post[0], post[1], rows,
                                          with_entropy)
    return logprobs, (entropy if with_entropy else None)


def _tempered_logits(hidden, weight, bias, scale, softcap, temperature):
    """(z, dz/dy) for y = h W^T + b and z = softcap(scale * y) / temperature, float32 `(rows, V)`."""
    y = torch.nn.functional.linear(hidden, weight, bias).float() * scale
    if softcap is None:
        return y / temperature, scale / temperature
    t = torch.tanh(y / softcap)
    return softcap * t / temperature, scale * (1 - t * t) / temperature


class _LogProbsAt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, token_ids, temperature, scale, softcap, rows, with_entropy):
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        logprobs, lses, entropies = [], [], []
        with torch.no_grad(), maybe_gather_lm_head_ctx(weight, bias):
            for i in range(0, hidden.size(0), rows):
                z, _ = _tempered_logits(hidden[i : i + rows], weight, bias, scale, softcap, temperature)  # (rows, V)
                lse = z.logsumexp(-1)  # (rows,)
                logprobs.append(z.gather(1, token_ids[i : i + rows]) - lse[:, None])
                lses.append(lse)
                if with_entropy:
                    entropies.append(lse - (torch.softmax(z, -1) * z).sum(-1))
        k = token_ids.size(1)
        logprobs = torch.cat(logprobs) if logprobs else hidden.new_zeros(0, k, dtype=torch.float32)
        lse = torch.cat(lses) if lses else hidden.new_zeros(0, dtype=torch.float32)
        entropy = torch.cat(entropies) if entropies else hidden.new_zeros(0, dtype=torch.float32)
        ctx.save_for_backward(hidden, weight, bias, token_ids, lse)
        ctx.settings = (temperature, scale, softcap, rows)
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        hidden, weight, bias, token_ids, lse = ctx.saved_tensors
        temperature, scale, softcap, rows = ctx.settings
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if needs_weight else None
        grad_bias = torch.zeros(bias.shape, device=bias.device, dtype=torch.float32) if needs_bias else None
        if grad_logprobs is not None:
            with maybe_gather_lm_head_ctx(weight, bias):
                for i in range(0, hidden.size(0), rows):
                    h = hidden[i : i + rows]
                    z, dz_dy = _tempered_logits(h, weight, bias, scale, softcap, temperature)  # (rows, V)
                    g = grad_logprobs[i : i + rows].float()  # (rows, k)
                    # d/dz of sum_j g_j (z[id_j] - logsumexp z) = scatter(g) - softmax(z) * sum_j g_j
                    grad_y = torch.exp(z - lse[i : i + rows, None]) * -g.sum(-1, keepdim=True)
                    grad_y.scatter_add_(1, token_ids[i : i + rows], g)
                    grad_y = grad_y * dz_dy
                    if needs_hidden:
                        grad_hidden[i : i + rows] = grad_y.to(weight.dtype) @ weight
                    if needs_weight:
                        grad_weight.addmm_(grad_y.T, h.float())
                    if needs_bias:
                        grad_bias += grad_y.sum(0)
        return (
            None if grad_hidden is None else grad_hidden.to(hidden.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None, None, None, None, None, None,
        )


def topk_reverse_kl_per_token(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Reverse KL on the teacher's top-k support plus one tail bucket, per position `(N,)`, in nats.

    With S the teacher's top-k tokens at a position (entries of `teacher_logprobs` (N, k) that are -inf are padding,
    not in S), p = student and q = teacher probabilities at the same temperature, and the tail masses
    p_R = 1 - sum_{v in S} p(v), q_R = 1 - sum_{v in S} q(v):

        KL_k = sum_{v in S} p(v) (log p(v) - log q(v)) + p_R (log p_R - log q_R)

    `student_logprobs` (N, k) are the student's log-probs at the same ids (see `logprobs_at`); gradients reach them,
    the teacher's are constants. As in TRL's `ServerDistillationTrainer` (`loss_add_tail`) and "Revisiting On-Policy
    Distillation" (arXiv 2603.25562).

    What it estimates, and its bias: KL_k is the exact reverse KL between the two distributions coarse-grained onto
    the k + 1 cells {v} for v in S and the tail. By the log-sum inequality merging cells never raises a KL, so
    KL_k <= KL(p || q), with equality when the tail is empty (k = V) or when p / q is constant on the tail; refining S
    (a larger k) never lowers it. The bias is therefore downward and deterministic (no sampling noise), and its
    gradient moves the student's mass between the teacher's top-k tokens and the tail lump but is blind to how the
    teacher spreads the tail. A tail floor of ~1e-7 (as TRL's) keeps log p_R finite when S holds all the mass.
    """
    dtype = torch.promote_types(student_logprobs.dtype, torch.float32)
    s, t = student_logprobs.to(dtype), teacher_logprobs.to(dtype)
    valid = torch.isfinite(t)
    # Padded slots are replaced before any arithmetic: a where() after exp(-inf) * inf would still send NaN backwards.
    s_safe, t_safe = torch.where(valid, s, 0.0), torch.where(valid, t, 0.0)
    support = torch.where(valid, s_safe.exp() * (s_safe - t_safe), 0.0).sum(-1)  # (N,)

    def log_tail(logprobs):
        # log(1 - sum exp(logprobs)) over the valid slots; a large finite fill keeps logsumexp's gradient finite on
        # rows without any valid slot.
        lse = torch.where(valid, logprobs, -1e30).logsumexp(-1).clamp(max=_TAIL_LOGSUMEXP_MAX)
        return torch.log(-torch.expm1(lse))

    log_p_tail, log_q_tail = log_tail(s_safe), log_tail(t_safe)
    return support + log_p_tail.exp() * (log_p_tail - log_q_tail)
