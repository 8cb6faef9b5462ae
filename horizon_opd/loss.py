"""Token-level distillation losses on hidden states, without materializing `[B, K, V]` logits.

Both losses reuse TRL's chunked kernels, which project hidden states through the LM head on `[tokens, vocab]` tiles:

- `reverse_kl_per_token`: the exact token-level reverse KL at every completion position,
      KL(pi_s || pi_t)(x_<t) = sum_v p_s(v) (log p_s(v) - log p_t(v)),
  with p = softmax(logits / temperature) for both models ([`trl.kernels.chunked_divergence.ChunkedDivergenceFunction`]
  with beta=1, the kernel `trl.DistillationTrainer` uses). Gradients reach the student only.
- `sampled_kl_per_token`: the sampled-token estimator (Thinking Machines-style OPD) for teachers that only expose the
  log-prob of the sampled token y_t. With the per-token advantage A_t = log q(y_t) - log pi(y_t) held constant
  (stop-gradient), the surrogate's value is the single-sample KL estimate -A_t and its gradient is the policy gradient
  -A_t * grad log pi(y_t), whose expectation over y_t ~ pi equals the exact reverse-KL gradient (the score-function term
  sum_v grad pi(v) vanishes).

Reductions are separate, explicit functions (`masked_token_mean`, `position_bin_sums`) so the normaliser is visible.
"""

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
    if student_hidden.device.type != "cpu" or n <= CPU_ROW_BLOCK:
        return divergence(student_hidden, teacher_hidden)
    # Every position is independent, so row blocks give the same values; see CPU_ROW_BLOCK for why.
    blocks = [
        divergence(student_hidden[i : i + CPU_ROW_BLOCK], teacher_hidden[i : i + CPU_ROW_BLOCK])
        for i in range(0, n, CPU_ROW_BLOCK)
    ]
    return torch.cat([kl for kl, _ in blocks]), torch.cat([entropy for _, entropy in blocks])


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


def masked_token_mean(per_token: torch.Tensor, mask: torch.Tensor, num_items: torch.Tensor | int | None = None):
    """sum(per_token * mask) / num_items. `num_items` is the number of completion tokens in the whole
    gradient-accumulated batch (so micro-batch losses add up to one token mean); `None` means this mask's count."""
    total = (per_token * mask).sum()
    if num_items is None:
        return total / mask.sum().clamp(min=1)
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.to(total.device)
    return total / num_items


def position_bin_sums(
    per_token: torch.Tensor, mask: torch.Tensor, horizon: int, num_bins: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of `per_token` (B, K) over `num_bins` equal-width bins of completion positions [0, horizon).

    Position k falls in bin floor(k * num_bins / horizon); positions past the horizon (padding only) go to the last.
    """
    positions = torch.arange(per_token.size(1), device=per_token.device)
    bins = (positions * num_bins // max(1, horizon)).clamp(max=num_bins - 1).expand_as(per_token)  # (B, K)
    mask = mask.to(per_token.dtype)
    sums = torch.zeros(num_bins, device=per_token.device, dtype=torch.float32)
    counts = torch.zeros(num_bins, device=per_token.device, dtype=torch.float32)
    sums.index_add_(0, bins.reshape(-1), (per_token.detach() * mask).reshape(-1).float())
    counts.index_add_(0, bins.reshape(-1), mask.reshape(-1).float())
    return sums, counts
