"""OPD vs TOPD vs POPD on the same step budget: train each method from the same student, evaluate held-out greedy
accuracy at the full horizon along the way, and measure training seconds, generated tokens and peak memory."""

import copy
import math
import os
import platform
import resource
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import PrinterCallback

from ..callbacks import HeldOutEvalCallback
from ..config import HorizonOPDConfig
from ..trainer import HorizonOPDTrainer
from .evaluation import evaluate_accuracy


@dataclass
class Method:
    """A named horizon setting: the `HorizonOPDConfig` fields that differ between methods."""

    name: str
    horizon: dict = field(default_factory=dict)


DEFAULT_METHODS = [
    Method("OPD", {"horizon": "full"}),
    Method("TOPD rho=0.1", {"horizon": "truncated", "truncation_ratio": 0.1}),
    Method("TOPD rho=0.5", {"horizon": "truncated", "truncation_ratio": 0.5}),
    Method("POPD linear 0.1->1", {"horizon": "progressive", "progressive_schedule": "linear",
                                  "progressive_start_ratio": 0.1, "progressive_ramp_fraction": 0.5}),
]


def machine_description() -> str:
    return f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPU cores, torch {torch.__version__}, " \
           f"{torch.get_num_threads()} threads".replace("  ", " ")


class PeakRSS:
    """Peak resident memory (MB) of this process while the block runs, sampled every 20 ms (getrusage's maximum is
    process-lifetime, so it cannot separate methods that run one after another in the same process)."""

    def __enter__(self):
        self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:  # not Linux: fall back to the lifetime maximum
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_method(method: Method, student, teacher, tokenizer, train_dataset, eval_dataset, *, output_dir: str,
               max_steps: int, batch_size: int, learning_rate: float, max_completion_length: int, eval_every: int,
               seed: int, temperature: float = 1.0, on_step=None, extra_args: dict | None = None,
               evaluate=None) -> dict:
    """Distill a copy of `student` with one method; returns the record written to results.json."""
    evaluate = evaluate or (lambda model: evaluate_accuracy(model, tokenizer, eval_dataset, max_completion_length))
    args = HorizonOPDConfig(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        learning_rate=learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(5, max_steps // 10),
        max_completion_length=max_completion_length,
        temperature=temperature,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        gradient_checkpointing=False,  # tiny models: recomputation costs time and saves nothing that matters
        bf16=False,
        seed=seed,
        **method.horizon,
        **(extra_args or {}),
    )
    callback = HeldOutEvalCallback(evaluate, every=eval_every, on_step=on_step)
    trainer = HorizonOPDTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=args,
                                train_dataset=train_dataset, processing_class=tokenizer, callbacks=[callback])
    trainer.remove_callback(PrinterCallback)  # the progress bar and the final table report progress instead
    with PeakRSS() as memory:
        trainer.train()
    curve = callback.curve
    return {
        "name": method.name,
        "seed": seed,
        "horizon": {**method.horizon, "max_completion_length": max_completion_length},
        "final_accuracy": curve[-1]["accuracy"],
        "train_seconds": curve[-1]["train_seconds"],
        "tokens_generated": trainer.generated_tokens,
        "peak_memory_mb": round(memory.peak, 1),
        "curve": curve,
        "horizons": [e["horizon/tokens"] for e in trainer.state.log_history if "horizon/tokens" in e],
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "model": trainer.model,
    }


def time_to_reach(curve: list[dict], target: float) -> float | None:
    """Training seconds at the first evaluation whose accuracy is >= target (None if never)."""
    for point in curve:
        if point["accuracy"] >= target - 1e-9:
            return point["train_seconds"]
    return None


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))
