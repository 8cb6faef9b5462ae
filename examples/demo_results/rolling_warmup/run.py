"""Rolling's two warm-ups side by side on the main job (3 seeds, evaluations every 5 steps)."""
from pathlib import Path

import torch

from horizon_opd.demo import build_datasets, load_demo_models, MAX_COMPLETION_LENGTH
from horizon_opd.demo.compare import Method, run_comparison
from horizon_opd.demo.evaluation import evaluate_accuracy

torch.set_num_threads(2)
student, teacher, tokenizer = load_demo_models()
data = build_datasets()
methods = [Method("Rolling rho=0.1 cut", {"horizon": "rolling", "truncation_ratio": 0.1, "rolling_warmup": "cut"}),
           Method("Rolling rho=0.1 prefix", {"horizon": "rolling", "truncation_ratio": 0.1, "rolling_warmup": "prefix"})]
run_comparison(methods, student, teacher, tokenizer, data["train"], data["test"], seeds=[0, 1, 2],
               out=Path("examples/demo_results/rolling_warmup"), steps=60, batch_size=32, learning_rate=1e-3,
               max_completion_length=MAX_COMPLETION_LENGTH, eval_every=5,
               evaluate=lambda m: evaluate_accuracy(m, tokenizer, data["test"], MAX_COMPLETION_LENGTH))
