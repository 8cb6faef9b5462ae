"""One optimizer step of a distillation trainer, timed and broken down; one or more configurations per process.

    python benchmarks/bench_step.py --preset cpu --configs full --out step_full.json

Every configuration trains the same student from the same teacher on the same prompts, batch and seed, for a warm-up
step and then `--steps` measured steps (the median is reported). The step is split by one hook, `StepTimer`, which
reads the time at public seams only — Trainer callbacks, `nn.Module` forward hooks, tensor gradient hooks — and
replaces no method or function of the trainers:

- `generation` (the rollout): from `on_step_begin` to the first forward of the training pass (the student with
  gradients on, or the teacher): collating, tokenising, `generate`, masking and padding — what TRL's
  `_prepare_inputs` covers (GKD: its `generate_on_policy_outputs`). For HorizonOPDTrainer it ends where
  `_generate_and_score_completions` returns (the one method the timer wraps, to read the clock only);
- `student_context`: from there to the training pass: for rolling rollouts, the student's no-grad forward over each
  chunk's context (prompt + earlier chunks); about zero otherwise;
- `teacher_forward`, `student_forward`: forward hooks on the two backbones (`model.base_model`, as TRL calls them;
  for GKD the whole models, because `GKDTrainer` calls them with their LM heads);
- `loss`: the divergence, forward and backward: from the end of the last backbone forward until the gradient reaches
  the student's last hidden states (GKD: its logits; a tensor hook). The chunked kernels project through both LM
  heads inside it. No public seam marks where backward starts inside `training_step` (`accelerator.backward(loss)`
  has no callback), so forward and backward are one figure; `bench_loss.py` times the loss alone;
- `student_backward`: the rest of the backward, until the last student parameter's gradient is accumulated
  (`register_post_accumulate_grad_hook`);
- `optimizer`: from there to `on_step_end`: gradient clipping, `optimizer.step`, the LR scheduler and `zero_grad`;
- `overhead`: the step's wall clock minus all of the above (fetching the batch, metrics, logging...).

The step's wall clock is the time between consecutive `on_step_end` callbacks, so it covers the whole training loop.
TRL's own `profiling_context` timers report only to wandb / MLflow / Trackio (none is installed here, and GKDTrainer
has none), so they cannot be read; TRL's `step_time` metric (the `training_step` call) is read from the log history
and stored next to each step as `training_step`, a cross-check of the breakdown.
"""

import math
import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets the offline environment before transformers is imported)
from common import PRESETS, PeakRSS, median, now  # noqa: E402

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from horizon_opd.monitor import COUNTERS  # noqa: E402

CONFIGS = {
    "trl_distillation": {"trainer": "trl"},
    "gkd": {"trainer": "gkd"},
    "full": {"trainer": "horizon", "horizon": "full"},
    "truncated_0.1": {"trainer": "horizon", "horizon": "truncated", "truncation_ratio": 0.1},
    "truncated_0.25": {"trainer": "horizon", "horizon": "truncated", "truncation_ratio": 0.25},
    "truncated_0.5": {"trainer": "horizon", "horizon": "truncated", "truncation_ratio": 0.5},
    # Rolling rollouts: each measured step continues the pool's rollouts by one chunk of ceil(0.1 L) tokens (the
    # warm-up step seeds the pool at staggered depths: the "prefix" warm-up, so the measured steps see the steady
    # state's depth mix), so the student re-encodes a mix of context depths each step; the teacher keeps each slot's
    # keys and values across steps (`rolling_teacher_cache`) and the student's loss reads generation's
    # (`rolling_student_cache`); `_nocache` turns the teacher's off, `_uncached` both (every context encoded 3 times).
    "rolling_0.1": {"trainer": "horizon", "horizon": "rolling", "truncation_ratio": 0.1, "rolling_warmup": "prefix"},
    "rolling_0.1_nocache": {"trainer": "horizon", "horizon": "rolling", "truncation_ratio": 0.1,
                            "rolling_warmup": "prefix", "rolling_teacher_cache": False},
    "rolling_0.1_uncached": {"trainer": "horizon", "horizon": "rolling", "truncation_ratio": 0.1,
                             "rolling_warmup": "prefix", "rolling_teacher_cache": False,
                             "rolling_student_cache": False},
    # `rolling_student_memory`: generation continues from each slot's student keys and values kept across steps, so
    # the measured steps' prefill is each new prompt and each context's last token (stale keys, an approximation).
    "rolling_0.1_memory": {"trainer": "horizon", "horizon": "rolling", "truncation_ratio": 0.1,
                           "rolling_warmup": "prefix", "rolling_student_memory": True},
    # Stages [0.1, 0.25, 0.5, 1.0] x L starting at [0, 25, 50, 75] % of max_steps; the last stage is reached by
    # starting at global step 75 of 100, as a resumed run would.
    "progressive_first": {"trainer": "horizon", "horizon": "progressive", "progressive_schedule": "stages",
                          "start_fraction": 0.0},
    "progressive_last": {"trainer": "horizon", "horizon": "progressive", "progressive_schedule": "stages",
                         "start_fraction": 0.75},
}
MAX_STEPS = 100  # the schedule's length; training is stopped after the measured steps
SEGMENTS = ("generation", "student_context", "teacher_forward", "student_forward", "loss", "student_backward",
            "optimizer")


class StepTimer(TrainerCallback):
    """Times the parts of every optimizer step (see the module docstring) and counts its generated tokens.

    Installs forward hooks on the two backbones and post-accumulate-grad hooks on the student's parameters; they only
    read the clock (after a device sync), so what the trainer computes is unchanged. Stops training after
    `total_steps` steps. `records` holds one dict per step."""

    def __init__(self, trainer, kind: str, prompt_tokens: int, total_steps: int):
        self.trainer, self.kind, self.prompt_tokens, self.total_steps = trainer, kind, prompt_tokens, total_steps
        self.records = []
        self.step = None  # the current step's marks; None between steps
        student = trainer.accelerator.unwrap_model(trainer.model)
        teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
        # TRL and HorizonOPDTrainer run the backbones and project through the LM heads inside the loss; GKD calls the
        # whole models.
        student_part, teacher_part = (student, teacher) if kind == "gkd" else (student.base_model, teacher.base_model)
        student_part.register_forward_pre_hook(self._student_starts, with_kwargs=True)
        student_part.register_forward_hook(self._student_ends)
        teacher_part.register_forward_pre_hook(self._teacher_starts)
        teacher_part.register_forward_hook(self._teacher_ends)
        self.parameters = [p for p in student.parameters() if p.requires_grad]
        for parameter in self.parameters:
            parameter.register_post_accumulate_grad_hook(self._gradient_accumulated)
        if kind == "horizon":  # the end of the rollout, which a rolling step's no-grad context forward follows
            generate_and_score = trainer._generate_and_score_completions

            def timed(inputs):
                batch = generate_and_score(inputs)
                if self.step is not None:
                    self.step["generation_end"] = now()
                return batch

            trainer._generate_and_score_completions = timed
            self.cost = dict(trainer.cost.state_dict())

    # ------------------------------------------------------------------------------------------- callbacks
    def on_train_begin(self, args, state, control, **kwargs):
        self.last_end = now()

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = {"begin": now(), "tokens": 0, "student_forward": 0.0, "teacher_forward": 0.0,
                     "training_start": None, "forward_end": None, "open": {}, "loss_done": None, "gradients": 0,
                     "backward_end": None, "generation_end": None}

    def on_step_end(self, args, state, control, **kwargs):
        end, s = now(), self.step
        backward_end = s["backward_end"]
        generation_end = s["generation_end"] or s["training_start"]
        record = {
            "global_step": state.global_step,
            "horizon": self._horizon(args),
            "tokens": s["tokens"],
            "step": end - self.last_end,
            "generation": _span(s["begin"], generation_end),
            "student_context": _span(generation_end, s["training_start"]),
            "teacher_forward": s["teacher_forward"],
            "student_forward": s["student_forward"],
            "loss": _span(s["forward_end"], s["loss_done"]),
            "student_backward": _span(s["loss_done"], backward_end),
            "optimizer": _span(backward_end, end),
        }
        record["overhead"] = record["step"] - sum(record[k] for k in SEGMENTS)
        if self.kind == "horizon":  # the trainer's own cost ledger: exact for rolled chunks, whose context the
            cost = self.trainer.cost.state_dict()  # attention-mask count below would take for generated tokens
            record["tokens"] = cost["generated_tokens"] - self.cost["generated_tokens"]
            record["decode_iterations"] = cost["decode_iterations"] - self.cost["decode_iterations"]
            for name in COUNTERS:  # what each model encoded this step, with and without grad
                record[name] = cost[name] - self.cost[name]
            self.cost = cost
        self.records.append(record)
        self.step = None
        self.last_end = now()
        if len(self.records) >= self.total_steps:
            control.should_training_stop = True

    def _horizon(self, args) -> int:
        if self.kind == "horizon":  # HorizonOPDTrainer records the horizon every step used
            return self.trainer.horizon_history[-1]
        return args.max_new_tokens if self.kind == "gkd" else args.max_completion_length  # TRL: always L

    # ------------------------------------------------------------------------------------------- hooks
    def _training_pass(self) -> bool:
        return self.step is not None and torch.is_grad_enabled()

    def _starts_training_pass(self, t: float) -> None:
        if self.step["training_start"] is None:
            self.step["training_start"] = t

    def _student_starts(self, module, args, kwargs):
        if not self._training_pass():  # the rollout's forwards run without gradients
            return
        t = now()
        self._starts_training_pass(t)
        self.step["open"]["student"] = t
        mask = kwargs.get("attention_mask")
        if mask is not None:  # every prompt has exactly `prompt_tokens` tokens, so the rest are generated ones
            self.step["tokens"] += int(mask.sum()) - mask.size(0) * self.prompt_tokens

    def _student_ends(self, module, args, output):
        if not self._training_pass() or "student" not in self.step["open"]:
            return
        t = now()
        self.step["student_forward"] += t - self.step["open"].pop("student")
        self.step["forward_end"] = max(t, self.step["forward_end"] or t)
        (output.logits if self.kind == "gkd" else output.last_hidden_state).register_hook(self._loss_gradient)

    def _teacher_starts(self, module, args):
        if self.step is None:
            return
        t = now()
        self._starts_training_pass(t)
        self.step["open"]["teacher"] = t

    def _teacher_ends(self, module, args, output):
        if self.step is None or "teacher" not in self.step["open"]:
            return
        t = now()
        self.step["teacher_forward"] += t - self.step["open"].pop("teacher")
        self.step["forward_end"] = max(t, self.step["forward_end"] or t)

    def _loss_gradient(self, grad):
        if self.step is not None and self.step["loss_done"] is None:
            self.step["loss_done"] = now()

    def _gradient_accumulated(self, parameter):
        if self.step is None:
            return
        self.step["gradients"] += 1
        # sync (on GPU) only for the last parameter: one wait per backward, not one per parameter
        last = self.step["gradients"] == len(self.parameters)
        self.step["backward_end"] = now() if last else time.perf_counter()


def _span(start, end) -> float:
    return end - start if start is not None and end is not None else math.nan


class FastForward(TrainerCallback):
    """Starts training at `global_step = start_step`, as a resumed run would be, to measure a late schedule stage."""

    def __init__(self, start_step: int):
        self.start_step = start_step

    def on_train_begin(self, args, state, control, **kwargs):
        state.global_step = self.start_step


def make_trainer(name: str, preset, tokenizer, output_dir: str):
    from datasets import Dataset

    spec = dict(CONFIGS[name])
    kind = spec.pop("trainer")
    start_fraction = spec.pop("start_fraction", 0.0)
    # on_device: a 7B teacher initialised on the CPU takes minutes of a lent GPU's time (ignored without CUDA)
    student = common.build_model(preset, "student", seed=0, on_device=True)
    teacher = common.build_model(preset, "teacher", seed=1, on_device=True)
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
    with PeakRSS() as memory, tempfile.TemporaryDirectory() as output_dir:
        trainer, kind, start_step, params = make_trainer(name, preset, tokenizer, output_dir)
        timer = StepTimer(trainer, kind, preset.prompt_tokens, warmup + steps)
        trainer.add_callback(FastForward(start_step))
        trainer.add_callback(timer)
        wall = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - wall
        # TRL's own `step_time` metric (the `training_step` call), logged every step (logging_steps=1)
        trl_step_time = {e["step"]: e["step_time"] for e in trainer.state.log_history if "step_time" in e}
        del trainer
    records = timer.records
    for record in records:
        record["training_step"] = trl_step_time.get(record["global_step"], math.nan)
    measured = records[warmup:]
    keys = ("step", *SEGMENTS, "overhead", "tokens", "training_step")  # training_step: NaN for GKD (no metric)
    if all("decode_iterations" in r for r in measured):  # HorizonOPDTrainer's cost ledger
        keys += ("decode_iterations", *COUNTERS)
    result = {
        "config": name,
        "trainer": {"trl": "trl.DistillationTrainer", "gkd": "trl.experimental.gkd.GKDTrainer",
                    "horizon": "HorizonOPDTrainer"}[kind],
        "spec": CONFIGS[name],
        "params": params,
        "horizon_tokens": measured[0]["horizon"],
        "horizons_seen": [r["horizon"] for r in records],
        "warmup_steps": warmup,
        "measured_steps": len(measured),
        "median": {k: median([r[k] for r in measured]) for k in keys},
        "steps": measured,
        **common.memory_figures(memory),
        "train_wall_s": wall,
    }
    result["median"]["overhead_fraction"] = median([r["overhead"] / r["step"] for r in measured])
    return result


def main(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--configs", nargs="+", default=["full"], choices=sorted(CONFIGS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-completion-length", type=int, default=None, help="override the preset's L")
    parser.add_argument("--batch-size", type=int, default=None, help="override the preset's batch size")
    args = common.parse_args(parser, argv)
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
    common.write_json(args.out, {"kind": "step", "preset": common.preset_dict(preset), "machine": common.machine_info(),
                                 "results": results})


if __name__ == "__main__":
    main()
