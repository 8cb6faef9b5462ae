"""The distillation loss alone (forward + backward), from hidden states to the student's gradients.

    python benchmarks/bench_loss.py --shapes 32000:512 151936:2048 --impls horizon --out loss.json

One sequence of `--length` completion positions (batch 1, every position trained on), student and teacher hidden
states of width `--hidden`, LM heads of `--vocab` rows; the student's hidden states and head take gradients. Each
implementation starts from the same tensors and includes its own LM-head projection:

- `horizon`: `HorizonOPDTrainer`'s path — compact the trained positions, `reverse_kl_per_token` (TRL's
  `ChunkedDivergenceFunction`, beta=1), scatter back, `masked_token_mean`;
- `trl_chunked`: `trl.trainer.distillation_trainer._chunked_divergence_loss` with beta=1 (what
  `trl.DistillationTrainer` runs);
- `gkd`: the two `[N, V]` logits (`hidden @ head.T`, as the models' `lm_head` computes them) then
  `GKDTrainer.generalized_jsd_loss` with beta=1.

Peak memory is the memory above what the inputs already hold (`horizon_opd.demo.measure.PeakRSS`: the heap is
trimmed and the high-water mark reset before each measurement, so shapes measured in increasing size in one process
are each measured on their own); time is that call's, or the median of `--repeats` further calls.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import PeakRSS, median, now  # noqa: E402

import torch  # noqa: E402

IMPLS = ("horizon", "trl_chunked", "gkd")


def make_inputs(vocab: int, length: int, hidden: int, dtype, device):
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)

    return {
        "h_s": randn(1, length, hidden).requires_grad_(True),  # (B, K, H)
        "h_t": randn(1, length, hidden),
        "w_s": randn(vocab, hidden, scale=hidden**-0.5).requires_grad_(True),  # (V, H)
        "w_t": randn(vocab, hidden, scale=hidden**-0.5),
        "mask": torch.ones(1, length, dtype=torch.long, device=device),  # (B, K)
    }


def loss_fn(impl: str):
    if impl == "horizon":
        from horizon_opd.loss import masked_token_mean, reverse_kl_per_token

        def horizon(h_s, h_t, w_s, w_t, mask):
            # HorizonOPDTrainer._compute_loss from the hidden states on
            valid = mask.reshape(-1) != 0
            per_token, _ = reverse_kl_per_token(h_s.reshape(-1, h_s.size(-1))[valid], w_s,
                                                h_t.reshape(-1, h_t.size(-1))[valid], w_t)
            per_token = per_token.new_zeros(mask.shape).masked_scatter(mask.bool(), per_token)
            return masked_token_mean(per_token, mask)

        return horizon
    if impl == "trl_chunked":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        def trl_chunked(h_s, h_t, w_s, w_t, mask):
            return _chunked_divergence_loss(h_s, h_t, w_s, w_t, mask, beta=1.0)[0]

        return trl_chunked
    if impl == "gkd":
        from trl.experimental.gkd import GKDTrainer

        def gkd(h_s, h_t, w_s, w_t, mask):
            student_logits = h_s @ w_s.t()  # (B, K, V)
            with torch.no_grad():
                teacher_logits = h_t @ w_t.t()
            labels = torch.where(mask.bool(), 0, -100)
            return GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=labels, beta=1.0)

        return gkd
    raise ValueError(impl)


def measure(impl: str, inputs: dict, repeats: int) -> dict:
    fn = loss_fn(impl)

    def call():
        inputs["h_s"].grad = inputs["w_s"].grad = None
        start = now()
        loss = fn(**inputs)
        loss.backward()
        elapsed = now() - start
        return loss.item(), elapsed

    # A tiny call first loads the code the big one runs (code pages count in RSS too).
    tiny = {k: (v[:, :4] if k in ("h_s", "h_t", "mask") else v) for k, v in inputs.items()}
    fn(**tiny).backward()
    with PeakRSS() as memory:
        value, first = call()
    figures = common.memory_figures(memory)
    times = [call()[1] for _ in range(repeats)]
    inputs["h_s"].grad = inputs["w_s"].grad = None
    return {"impl": impl, "loss": value, "peak_memory_mb": figures["peak_memory_increase_mb"],
            "time_s": median(times) if times else first, "first_call_s": first, "times_s": times,
            "memory_method": figures["memory_method"]}


def main(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--shapes", nargs="+", required=True, metavar="VOCAB:LENGTH",
                        help="measured in this order, e.g. 32000:512 151936:2048")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--repeats", type=int, default=0, help="timed calls after the first (default: time the first)")
    args = common.parse_args(parser, argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for impl in args.impls:
        loss_fn(impl)  # import everything before any memory is measured
    results = []
    for shape in args.shapes:
        vocab, length = map(int, shape.split(":"))
        inputs = make_inputs(vocab, length, args.hidden, torch.float32, device)
        for impl in args.impls:
            result = measure(impl, inputs, args.repeats)
            result.update(vocab=vocab, length=length, hidden=args.hidden)
            results.append(result)
        del inputs
    common.write_json(args.out, {"kind": "loss", "machine": common.machine_info(), "results": results})


if __name__ == "__main__":
    main()
