"""How often must `anchored` probe at lr 2e-3 to hold off truncation collapse, and are its full-horizon steps the
outsized ones? The collapse regime of the README (100 steps x 32 prompts, lr 2e-3, evaluation every 10 steps, the
16-prompt full-horizon watch) with `anchor_every` = 5 and 3, seeds 0-2, one run per process:

    python examples/demo_results/collapse/anchor_frequency.py 5 0     # anchor_every, seed -> anchor_every5_seed0.json

Each JSON holds the accuracy curve, tokens, train seconds, the horizon and gradient norm (before clipping) of every
step, and the alarm steps."""

import json
import sys
from pathlib import Path

import torch

from horizon_opd.demo import MAX_COMPLETION_LENGTH, build_datasets, load_demo_models, method, run_method

anchor_every, seed = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(2)
student, teacher, tokenizer = load_demo_models()
data = build_datasets()
record = run_method(method("anchored"), student, teacher, tokenizer, data["train"], data["test"],
                    output_dir="/tmp/anchor_frequency", max_steps=100, batch_size=32, learning_rate=2e-3,
                    max_completion_length=MAX_COMPLETION_LENGTH, eval_every=10, seed=seed,
                    extra_args={"anchor_every": anchor_every})
out = Path(__file__).parent / f"anchor_every{anchor_every}_seed{seed}.json"
out.write_text(json.dumps({key: record[key] for key in ("seed", "horizon", "final_accuracy", "train_seconds",
                                                         "tokens_generated", "curve", "horizons", "grad_norms")}
                          | {"alarm_steps": [e["step"] for e in record["alarm_events"]]}, indent=1))
print(out, [(p["step"], p["accuracy"]) for p in record["curve"]])
