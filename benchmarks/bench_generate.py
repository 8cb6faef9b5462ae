"""The rollout floor: bare `model.generate` on the trainers' prompts, batch and sampling settings.

    python benchmarks/bench_generate.py --preset cpu --horizons 52 512 --out generate.json

The student of the preset samples `horizon` new tokens for the same chat-formatted prompts the trainers see (one
batch, left-padded), with TRL's sampling settings (temperature 1, top-k 0, top-p 1, KV cache, no compilation).
Tokens per second over `--repeats` calls (median) is the speed a trainer's rollout can at best reach.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import PRESETS, median, now  # noqa: E402

import torch  # noqa: E402


def main(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--horizons", type=int, nargs="+", required=True)
    parser.add_argument("--repeats", type=int, default=2)
    args = common.parse_args(parser, argv)
    from transformers import GenerationConfig

    preset = PRESETS[args.preset]
    tokenizer = common.build_tokenizer(preset.vocab_size)
    model = common.build_model(preset, "student", seed=0)
    texts = common.prompt_texts(preset, n=preset.batch_size)
    prompts = tokenizer.apply_chat_template([[{"role": "user", "content": t}] for t in texts],
                                            add_generation_prompt=True, tokenize=False)
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)

    def generate(horizon):
        config = GenerationConfig(max_new_tokens=horizon, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                  disable_compile=True)
        start = now()
        with torch.no_grad():
            out = model.generate(**batch, generation_config=config)
        elapsed = now() - start
        completion = out[:, batch["input_ids"].size(1):]
        is_eos = completion == tokenizer.eos_token_id
        # tokens up to and including the first EOS, as the trainers count them
        lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, completion.size(1))
        return elapsed, int(lengths.sum())

    torch.manual_seed(0)
    generate(min(8, min(args.horizons)))  # warm-up, not counted
    results = []
    for horizon in args.horizons:
        times, tokens = zip(*(generate(horizon) for _ in range(args.repeats)))
        results.append({"horizon": horizon, "batch_size": preset.batch_size, "time_s": median(times),
                        "tokens": median(tokens), "tokens_per_s": median(tokens) / median(times), "times_s": times})
    common.write_json(args.out, {"kind": "generate", "preset": common.preset_dict(preset),
                                 "machine": common.machine_info(), "results": results})


if __name__ == "__main__":
    main()
