"""The rates the GPU cost model (`gpu_model.py`) otherwise assumes, measured: decode latency per iteration at several
batch sizes, and the achieved FLOP/s of the student's forward, the student's forward + backward and the teacher's
forward, on the preset's models (random weights).

    python benchmarks/bench_costs.py --preset qwen2.5-1.5b-7b --out costs.json    # what gpu.py runs on a GPU
    python benchmarks/bench_costs.py --preset tiny --out costs.json               # the same path on CPU, tiny shapes

- decode: `model.generate` of the student (TRL's sampling settings, KV cache, no compilation, as the trainers run
  it) on `batch` prompts of the preset's length, for n1 and n2 new tokens with EOS suppressed (`min_new_tokens`);
  (t(n2) - t(n1)) / (n2 - n1) is the latency of one decode iteration, prefill excluded, at the mean context
  prompt + (n1 + n2) / 2. This is the `generate` the trainer uses: its per-iteration overhead is measured with it.
- compute: one call of the full model (LM head over every position) on `--compute-batch` x `--compute-length` tokens:
  the student without gradients, the student with `loss.backward()` (labels = inputs), the teacher without
  gradients; median of `--repeats` calls after a warm-up call. Achieved FLOP/s = the model's FLOPs
  (`gpu_model.forward_flops` / `train_flops` at the measured models' parameter split) / seconds.

Writes {"kind": "costs", "device", "machine", "preset", "models": {role: gpu_model.Model fields}, "decode": [...],
"compute": {...}} to `--out`; `gpu.py` stores it as its results' `costs`, which `gpu_model.Rates.measured` reads.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets the offline environment before transformers is imported)
import gpu_model  # noqa: E402  (torch-free)
from common import PRESETS, median, now  # noqa: E402

import torch  # noqa: E402


def model_fields(model, name: str) -> dict:
    """The model's parameter split and KV size as `gpu_model.Model` fields."""
    config = model.config
    head = model.get_output_embeddings().weight
    embedding = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # a tied head is counted once
    backbone = total - embedding.numel() - (0 if head is embedding else head.numel())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype_bytes = next(model.parameters()).element_size()
    return {"name": name, "backbone_params": backbone, "head_params": head.numel(),
            "kv_bytes_per_token": 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype_bytes,
            "dtype_bytes": dtype_bytes}


def random_ids(batch: int, length: int, vocab: int, generator) -> torch.Tensor:
    low = len(common.SPECIAL_TOKENS)  # ordinary words only: no EOS or padding in the inputs
    return torch.randint(low, vocab, (batch, length), generator=generator)


def measure_decode(model, preset, batch_sizes, n1: int, n2: int, device) -> list[dict]:
    from transformers import GenerationConfig

    generator = torch.Generator().manual_seed(0)
    points = []

    def generate(ids, new_tokens):
        config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                                  temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=2,
                                  disable_compile=True)
        start = now()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        elapsed = now() - start
        assert out.size(1) == ids.size(1) + new_tokens, "generation stopped early"
        return elapsed

    for batch in batch_sizes:
        ids = random_ids(batch, preset.prompt_tokens, preset.vocab_size, generator).to(device)
        generate(ids, 2)  # warm-up at this batch size
        t1, t2 = generate(ids, n1), generate(ids, n2)
        points.append({"batch": batch, "context": preset.prompt_tokens + (n1 + n2) / 2, "n1": n1, "n2": n2,
                       "seconds_n1": t1, "seconds_n2": t2, "seconds_per_iteration": (t2 - t1) / (n2 - n1)})
        print(f"[costs] decode batch {batch}: {1e3 * points[-1]['seconds_per_iteration']:.2f} ms per iteration",
              flush=True)
    return points


def measure_compute(model, fields: dict, kind: str, batch: int, length: int, repeats: int, device) -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = random_ids(batch, length, model.config.vocab_size, generator).to(device)
    spec = gpu_model.Model(**fields)
    tokens = batch * length
    train = kind == "student_train"
    flops = (gpu_model.train_flops if train else gpu_model.forward_flops)(spec, tokens, tokens)

    def call():
        start = now()
        if train:
            model.train()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(input_ids=ids)
        return now() - start

    call()  # warm-up
    times = [call() for _ in range(repeats)]
    model.eval()
    seconds = median(times)
    print(f"[costs] {kind}: {tokens} tokens in {seconds:.3f} s, {flops / seconds / 1e12:.2f} TFLOP/s", flush=True)
    return {"tokens": tokens, "batch": batch, "length": length, "seconds": seconds, "times": times, "flops": flops,
            "seconds_per_token": seconds / tokens}


def main(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--preset", default="qwen2.5-1.5b-7b", choices=sorted(PRESETS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 8 32 64 128 (tiny: 1 2)")
    parser.add_argument("--new-tokens", type=int, nargs=2, default=None, metavar=("N1", "N2"),
                        help="the two generation lengths (default 32 288; tiny: 4 12)")
    parser.add_argument("--compute-batch", type=int, default=None, help="default 4 (tiny: 2)")
    parser.add_argument("--compute-length", type=int, default=None, help="default 1024 (tiny: 16)")
    parser.add_argument("--repeats", type=int, default=3)
    args = common.parse_args(parser, argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tiny = args.preset in ("tiny", "quick")
    preset = PRESETS[args.preset]
    batch_sizes = args.batch_sizes or ([1, 2] if tiny else [1, 8, 32, 64, 128])
    n1, n2 = args.new_tokens or ((4, 12) if tiny else (32, 288))
    compute_batch = args.compute_batch or (2 if tiny else 4)
    compute_length = args.compute_length or (16 if tiny else 1024)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = common.machine_info()

    student = common.build_model(preset, "student", seed=0, on_device=True)
    fields = {"student": model_fields(student, f"{preset.name} student")}
    decode = measure_decode(student, preset, batch_sizes, n1, n2, device)
    compute = {"student_forward": measure_compute(student, fields["student"], "student_forward", compute_batch,
                                                  compute_length, args.repeats, device),
               "student_train": measure_compute(student, fields["student"], "student_train", compute_batch,
                                                compute_length, args.repeats, device)}
    del student
    if device == "cuda":
        torch.cuda.empty_cache()
    teacher = common.build_model(preset, "teacher", seed=1, on_device=True)
    fields["teacher"] = model_fields(teacher, f"{preset.name} teacher")
    compute["teacher_forward"] = measure_compute(teacher, fields["teacher"], "teacher_forward", compute_batch,
                                                 compute_length, args.repeats, device)
    common.write_json(args.out, {"kind": "costs", "device": machine.get("gpu") or machine.get("cpu"),
                                 "machine": machine, "preset": common.preset_dict(preset), "models": fields,
                                 "decode": decode, "compute": compute})


if __name__ == "__main__":
    main()
