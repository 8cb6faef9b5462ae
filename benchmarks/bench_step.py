"""One optimizer step of a distillation trainer, timed and broken down; one or more configurations per process.

    python benchmarks/bench_step.py --preset cpu --configs full --out step_full.json

Every configuration trains the same student from the same teacher on the same prompts, batch and seed, for a warm-up
step and then `--steps` measured steps (the median is reported). The step is split by wrapping the trainer's methods
(nothing is changed in what they compute):

- `generation`: the rollout (`_generate_single_turn` for TRL's `DistillationTrainer` and `HorizonOPDTrainer`,
  `generate_on_policy_outputs` for GKD);
- `teacher_forward`, `student_forward`: the two backbones on prompt + completion (for GKD the student forward also
  projects every position through the LM head, because `GKDTrainer` calls the whole model);
- `loss_forward`: the divergence function (`_chunked_divergence_loss`, `reverse_kl_per_token`,
  `generalized_jsd_loss`); the chunked kernels project through both LM heads inside it;
- `loss_backward`: backward from the loss to the student's hidden states (GKD: to its logits), marked by a gradient
  hook; `student_backward`: the rest of the backward pass;
- `optimizer`: gradient clipping, `optimizer.step`, the LR scheduler and `zero_grad`;
- `overhead`: the step's wall clock minus all of the above (tokenising, padding, batching, logging, metrics...).

The step's wall clock is the time between consecutive `on_step_end` callbacks, so it covers the whole training loop.
"""

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets the offline environment before transformers is imported)
from common import PRESETS, PeakMemory, median, now  # noqa: E402

import torch  # noqa: E402

CONFIGS = {
    "trl_distillation": {"trainer": "trl"},
    "gkd": {"trainer": "gkd"},
    "full": {"trainer": "horizon", "horizon": "full"},
    "truncated_0.1": {"trainer": "horizon", "horizon": "truncated", "truncation_ratio": 0.1},
    "truncated_0.25": {"trainer": "horizon", "horizon": "truncated", "truncation_ratio": 0.25},
    "truncated_0.5": {"trainer": "horizon", "horizon": "truncated", "truncation_ratio": 0.5},
    # Stages [0.1, 0.25, 0.5, 1.0] x L starting at [0, 25, 50, 75] % of max_steps; the last stage is reached by
    # starting at global step 75 of 100, as a resumed run would.
    "progressive_first": {"trainer": "horizon", "horizon": "progressive", "progressive_schedule": "stages",
                          "start_fraction": 0.0},
    "progressive_last": {"trainer": "horizon", "horizon": "progressive", "progressive_schedule": "stages",
                         "start_fraction": 0.75},
}
MAX_STEPS = 100  # the schedule's length; training is stopped after the measured steps
SEGMENTS = ("generation", "teacher_forward", "student_forward", "loss_forward", "loss_backward", "student_backward",
            "optimizer")


class StepClock:
    """Per-step sums of the segments above, filled by the wrappers that `instrument` installs."""

    def __init__(self):
        self.current = defaultdict(float)
        self.steps = []
        self.in_generation = False
        self.backward_start = None
        self.hook_time = None

    def add(self, name, seconds):
        self.current[name] += seconds

    def timed(self, name, fn, generation=False):
        def wrapper(*args, **kwargs):
            start = now()
            self.in_generation = generation
            try:
                out = fn(*args, **kwargs)
            finally:
                self.in_generation = False
                self.add(name, now() - start)
            if generation:
                self.add("tokens", _count_tokens(out))
            return out

        return wrapper

    def mark_loss_backward_done(self, grad):
        if self.hook_time is None:
            self.hook_time = now()


def _count_tokens(out) -> int:
    if isinstance(out, list):  # DistillationTrainer: one list of completion ids per prompt
        return sum(len(ids) for ids in out)
    _, attention_mask, labels = out  # GKD: (ids, attention_mask, labels); labels are -100 outside the completion
    return int((labels != -100).sum())


def instrument(trainer, kind: str, clock: StepClock):
    """Wrap the trainer's methods so every segment of a step is timed; returns a function that undoes the one
    module-level patch (the loss function, which the trainers look up as a module global)."""
    undo = lambda: None  # noqa: E731
    if kind == "gkd":
        trainer.generate_on_policy_outputs = clock.timed("generation", trainer.generate_on_policy_outputs, True)
        trainer.generalized_jsd_loss = clock.timed("loss_forward", trainer.generalized_jsd_loss)
        _time_module(trainer.model, "student_forward", clock, grad_hook=lambda out: out.logits)
        _time_module(trainer.teacher_model, "teacher_forward", clock)
    else:
        generate = clock.timed("generation", trainer._generate_single_turn, True)

        def generate_single_turn(*args, **kwargs):
            clock.current["horizon"] = trainer.current_horizon() if kind == "horizon" else trainer.max_completion_length
            return generate(*args, **kwargs)

        trainer._generate_single_turn = generate_single_turn
        original = trainer._get_last_hidden_state

        def last_hidden_state(unwrapped_model, *args, **kwargs):
            is_teacher = unwrapped_model is trainer.accelerator.unwrap_model(trainer.teacher_model)
            start = now()
            hidden = original(unwrapped_model, *args, **kwargs)
            clock.add("teacher_forward" if is_teacher else "student_forward", now() - start)
            if hidden.requires_grad:
                hidden.register_hook(clock.mark_loss_backward_done)
            return hidden

        trainer._get_last_hidden_state = last_hidden_state
        if kind == "trl":
            import trl.trainer.distillation_trainer as module

            attribute = "_chunked_divergence_loss"
        else:
            import horizon_opd.trainer as module

            attribute = "reverse_kl_per_token"
        loss_fn = getattr(module, attribute)
        setattr(module, attribute, clock.timed("loss_forward", loss_fn))
        undo = lambda: setattr(module, attribute, loss_fn)  # noqa: E731

    backward = trainer.accelerator.backward

    def timed_backward(loss, **kwargs):
        clock.hook_time = None
        start = now()
        backward(loss, **kwargs)
        end = now()
        split = clock.hook_time if clock.hook_time is not None else start
        clock.add("loss_backward", split - start)
        clock.add("student_backward", end - split)

    trainer.accelerator.backward = timed_backward

    training_step = trainer.training_step

    def timed_training_step(*args, **kwargs):
        out = training_step(*args, **kwargs)
        clock.training_step_end = now()
        return out

    trainer.training_step = timed_training_step
    return undo


def _time_module(module, name, clock, grad_hook=None):
    starts = {}

    def pre(mod, args, kwargs):
        if not clock.in_generation:
            starts[id(mod)] = now()

    def post(mod, args, kwargs, output):
        if not clock.in_generation and id(mod) in starts:
            clock.add(name, now() - starts.pop(id(mod)))
            if grad_hook is not None and torch.is_grad_enabled():
                grad_hook(output).register_hook(clock.mark_loss_backward_done)

    module.register_forward_pre_hook(pre, with_kwargs=True)
    module.register_forward_hook(post, with_kwargs=True)


def make_trainer(name: str, preset, tokenizer, output_dir: str):
    from datasets import Dataset

    spec = dict(CONFIGS[name])
    kind = spec.pop("trainer")
    start_fraction = spec.pop("start_fraction", 0.0)
    student = common.build_model(preset, "student", seed=0)
    teacher = common.build_model(preset, "teacher", seed=1)
    texts = common.prompt_texts(preset, n=8 * preset.batch_size)
    common_args = dict(
        output_dir=output_dir, per_device_train_batch_size=preset.batch_size, gradient_accumulation_steps=1,
        max_steps=MAX_STEPS, learning_rate=1e-5, logging_steps=1, save_strategy="no", report_to="none",
        gradient_checkpointing=False, disable_tqdm=True, seed=0, bf16=preset.dtype == "bfloat16",
        dataloader_num_workers=0, temperature=1.0, beta=1.0,
    )
    if kind == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        data = Dataset.from_dict({"messages": [[{"role": "user", "content": t}, {"role": "assistant", "content": "w0"}]
                                               for t in texts]})
        args = GKDConfig(lmbda=1.0, max_new_tokens=preset.max_completion_length,
                         max_length=preset.prompt_tokens + preset.max_completion_length + 8, **common_args)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                 processing_class=tokenizer)
    else:
        data = Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in texts]})
        if kind == "trl":
            from trl import DistillationConfig, DistillationTrainer

            args = DistillationConfig(max_completion_length=preset.max_completion_length, **common_args)
            trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                          processing_class=tokenizer)
        else:
            from horizon_opd import HorizonOPDConfig, HorizonOPDTrainer

            args = HorizonOPDConfig(max_completion_length=preset.max_completion_length, **spec, **common_args)
            trainer = HorizonOPDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                        processing_class=tokenizer)
    params = {"student": common.n_params(student), "teacher": common.n_params(teacher)}
    return trainer, kind, int(start_fraction * MAX_STEPS), params


def run_config(name: str, preset, tokenizer, warmup: int, steps: int) -> dict:
    from transformers import TrainerCallback

    memory = PeakMemory().start()
    clock = StepClock()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer, kind, start_step, params = make_trainer(name, preset, tokenizer, output_dir)
        undo = instrument(trainer, kind, clock)
        total = warmup + steps

        class Recorder(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                state.global_step = start_step  # fast-forward into the schedule, as a resumed run would be
                self.last = now()

            def on_step_end(self, args, state, control, **kwargs):
                end = now()
                record = dict(clock.current)
                record["optimizer"] = end - clock.training_step_end
                record["step"] = end - self.last
                record["overhead"] = record["step"] - sum(record.get(s, 0.0) for s in SEGMENTS)
                record.setdefault("horizon", preset.max_completion_length)
                clock.steps.append(record)
                clock.current = defaultdict(float)
                self.last = now()
                if len(clock.steps) >= total:
                    control.should_training_stop = True

        trainer.add_callback(Recorder())
        wall = time.perf_counter()
        try:
            trainer.train()
        finally:
            undo()
        wall = time.perf_counter() - wall
        peak, increase = memory.peak_mb(), memory.increase_mb()
        horizon_seen = [s["horizon"] for s in clock.steps]
        del trainer
    measured = clock.steps[warmup:]
    keys = ("step", *SEGMENTS, "overhead", "tokens")
    result = {
        "config": name,
        "trainer": {"trl": "trl.DistillationTrainer", "gkd": "trl.experimental.gkd.GKDTrainer",
                    "horizon": "HorizonOPDTrainer"}[kind],
        "spec": CONFIGS[name],
        "params": params,
        "horizon_tokens": measured[0]["horizon"] if kind == "horizon" else preset.max_completion_length,
        "horizons_seen": horizon_seen,
        "warmup_steps": warmup,
        "measured_steps": len(measured),
        "median": {k: median([s.get(k, 0.0) for s in measured]) for k in keys},
        "steps": measured,
        "peak_memory_mb": peak,
        "peak_memory_increase_mb": increase,
        "baseline_memory_mb": memory.baseline_mb,
        "memory_method": memory.method,
        "train_wall_s": wall,
    }
    result["median"]["overhead_fraction"] = median([s["overhead"] / s["step"] for s in measured])
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--configs", nargs="+", default=["full"], choices=sorted(CONFIGS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-completion-length", type=int, default=None, help="override the preset's L")
    parser.add_argument("--batch-size", type=int, default=None, help="override the preset's batch size")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    preset = PRESETS[args.preset]
    overrides = {k: v for k, v in (("max_completion_length", args.max_completion_length),
                                   ("batch_size", args.batch_size)) if v is not None}
    if overrides:
        from dataclasses import replace

        preset = replace(preset, **overrides)
    tokenizer = common.build_tokenizer(preset.vocab_size)
    # Import every trainer before any memory baseline is taken, so library code never counts as a step's memory.
    import trl  # noqa: F401
    import trl.experimental.gkd  # noqa: F401

    import horizon_opd  # noqa: F401

    results = [run_config(name, preset, tokenizer, args.warmup, args.steps) for name in args.configs]
    common.write_json(args.out, {"kind": "step", "preset": common.preset_dict(preset), "machine": common.machine(),
                                 "results": results})


if __name__ == "__main__":
    main()
