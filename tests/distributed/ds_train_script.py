"""A few HorizonOPDTrainer steps under `accelerate launch` (DeepSpeed or FSDP) on CPU; launched by the tests through
`testing_utils.launch_accelerate`.

Usage: accelerate launch --config_file <accelerate yaml> tests/distributed/ds_train_script.py <settings.json>

Each rank writes `<result_dir>/rank{r}.json`: the horizon and completion lengths of every generation batch it made,
its log history and final step, so the test can compare ranks. Settings (all JSON keys):
  student, teacher, dataset: local paths (save_pretrained / save_to_disk); output_dir, result_dir; `teacher` may be
           {name: path} (several teachers), with teacher_ids: the dataset's teacher_id column, one name per row
  args: HorizonOPDConfig overrides; resume_from: checkpoint path or null
  eos_rank: this rank's rollouts all stop at their first token (every token but EOS is suppressed), so the ranks
            generate different numbers of tokens within one step
  horizon_rank: this rank's rollouts never stop at EOS (EOS is suppressed): they all run to the horizon
  check_bad_teacher: first build a trainer with a quantized-looking teacher and record the error message
  lora: LoraConfig kwargs; the student trains an adapter (peft_config)
  record_weights: record which student and teacher parameters changed in training (full values, gathered under
                  ZeRO-3) and the trained student's logits on a fixed input, for the LoRA checks
  suppress_past_tokenizer: never sample ids past the tokenizer, also when both heads are larger than it (models whose
                           vocab_size is set for their size, not for the tokenizer)
  report_partitioning: record how ZeRO-3 holds the student's and teacher's lm_head and embedding weights after
                       training (full and local numel, persistence), to check that they really are partitioned
  runs: a list of settings, each overriding the ones above, trained one after the other in the same processes (one
        launch for several runs); run i writes to <output_dir>/<name>, <result_dir>/<name>
"""

import contextlib
import json
import os
import sys

import torch
from datasets import load_from_disk
from testing_utils import end_launched_process
from transformers import AutoModelForCausalLM

from horizon_opd import HorizonOPDConfig, HorizonOPDTrainer
from horizon_opd.demo.tokenizer import build_char_tokenizer

# A fixed input for the logits of the trained student (token ids of the char tokenizer).
LOGITS_INPUT = [[5, 6, 7, 8, 9, 10, 11, 12]]


def _full_values(model) -> dict[str, torch.Tensor]:
    """Every parameter's full value: a ZeRO-3 parameter holds an empty shard, so gather it first."""
    params = dict(model.named_parameters())
    partitioned = [p for p in params.values() if hasattr(p, "ds_id")]
    gather = contextlib.nullcontext()
    if partitioned:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(partitioned)
    with gather:
        return {name: p.detach().clone().float() for name, p in params.items()}


def _zero3_holding(weight: torch.Tensor) -> dict:
    """How ZeRO-3 holds `weight` on this rank: its full numel, the numel of this rank's shard, whether DeepSpeed keeps
    it whole (persistent: below `stage3_param_persistence_threshold`, never partitioned) and what it holds now."""
    if not hasattr(weight, "ds_id"):
        return {"zero3": False, "numel": weight.numel()}
    return {"zero3": True, "full_numel": weight.ds_numel, "shard_numel": weight.ds_tensor.numel(),
            "persistent": bool(weight.ds_persist), "held_numel": weight.numel(), "shape": list(weight.ds_shape)}


def train_once(settings: dict, tokenizer, dataset) -> None:
    args = HorizonOPDConfig(output_dir=settings["output_dir"], **settings["args"])
    rank = args.process_index
    plugin = args.deepspeed_plugin
    result = {"rank": rank, "world_size": args.world_size, "zero_stage": plugin.zero_stage if plugin else None}

    if settings.get("check_bad_teacher"):
        quantized = AutoModelForCausalLM.from_pretrained(settings["teacher"])
        quantized.is_loaded_in_4bit = True  # what bitsandbytes sets; ZeRO-3 cannot partition packed 4-bit weights
        try:
            HorizonOPDTrainer(model=settings["student"], teacher_model=quantized, args=args, train_dataset=dataset,
                              processing_class=tokenizer)
        except ValueError as error:
            result["bad_teacher_error"] = str(error)

    peft_config = None
    if settings.get("lora"):
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", **settings["lora"])
    if settings.get("teacher_ids"):
        dataset = dataset.add_column("teacher_id", settings["teacher_ids"])
    trainer = HorizonOPDTrainer(model=settings["student"], teacher_model=settings["teacher"], args=args,
                                train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
    first_teacher = trainer.teachers[0].model
    suppress = []
    if settings.get("eos_rank") == rank:
        suppress += [i for i in range(len(tokenizer)) if i != tokenizer.eos_token_id]
    if settings.get("horizon_rank") == rank:
        suppress.append(tokenizer.eos_token_id)
    if trainer.shared_vocab_size is not None or settings.get("suppress_past_tokenizer"):
        # a padded student could sample ids past the tokenizer, which the teacher cannot embed
        suppress += list(range(len(tokenizer), trainer.model.config.vocab_size))
    trainer.generation_config.suppress_tokens = suppress or None

    generations = []
    generate_and_score = trainer._generate_and_score_completions

    def recording(inputs):
        batch = generate_and_score(inputs)
        generations.append({
            "step": trainer.state.global_step,
            "horizon": trainer.current_horizon(),
            "completion_lengths": batch["completion_mask"].sum(1).tolist(),
            # rolling rollouts: where each chunk starts in its rollout, and the chunks themselves (resume checks)
            "completion_offsets": batch["completion_offsets"].tolist() if "completion_offsets" in batch else None,
            "completion_ids": batch["completion_ids"].tolist(),
            "teacher_index": batch["teacher_index"].tolist() if "teacher_index" in batch else None,
        })
        return batch

    trainer._generate_and_score_completions = recording
    per_row = []  # each micro-batch's per-row loss (the per-token KL summed over each row's completion)
    if settings.get("record_per_row"):
        observe = trainer.book.meters["train"].add_tokens

        def recording_rows(per_token, mask, *args, **kwargs):
            per_row.append((per_token.detach() * mask).sum(-1).tolist())
            return observe(per_token, mask, *args, **kwargs)

        trainer.book.meters["train"].add_tokens = recording_rows
    record = settings.get("record_weights")
    if record:
        student_before, teacher_before = _full_values(trainer.model), _full_values(first_teacher)
    trainer.train(resume_from_checkpoint=settings.get("resume_from"))

    teacher_heads = [trainer.accelerator.unwrap_model(t.model).get_output_embeddings().weight
                     for t in trainer.teachers]
    result.update(
        generations=generations,
        global_step=trainer.state.global_step,
        log_history=trainer.state.log_history,
        shared_vocab_size=trainer.shared_vocab_size,
        horizon_history=list(trainer.horizon_history),
        policy_decisions=[d["ratio"] for d in getattr(trainer.horizon_policy, "decisions", [])],
        teacher_head_partitioned=all(hasattr(h, "ds_shape") and h.numel() == 0 for h in teacher_heads),
        ledger=trainer.cost.state_dict(),
        per_row=per_row,
    )
    if settings.get("report_partitioning"):
        result["partitioning"] = {
            f"{role}.{name}": _zero3_holding(getattr(model, getter)().weight)
            for role, model in (("student", trainer.accelerator.unwrap_model(trainer.model)),
                                ("teacher", trainer.accelerator.unwrap_model(first_teacher)))
            for name, getter in (("lm_head", "get_output_embeddings"), ("embed_tokens", "get_input_embeddings"))
        }
    result["distributed_type"] = trainer.accelerator.distributed_type.value
    result["fsdp_version"] = trainer.accelerator.fsdp_plugin.fsdp_version if trainer.is_fsdp_enabled else None
    result["student_head_type"] = type(trainer.model.get_output_embeddings().weight).__name__  # DTensor under FSDP2
    engine = getattr(trainer, "deepspeed", None)
    if engine is not None:
        # the optimizer DeepSpeed steps (DeepSpeedCPUAdam when the optimizer states are offloaded) and where it put
        # the optimizer states and the parameters
        result["base_optimizer"] = type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__
        offload = {"optimizer": engine.zero_offload_optimizer(), "param": engine.zero_offload_param()}
        result["offload"] = {k: None if v is None else getattr(v.device, "value", str(v.device))
                             for k, v in offload.items()}
    if record:
        student_after, teacher_after = _full_values(trainer.model), _full_values(first_teacher)
        result["student_changed"] = sorted(n for n, v in student_after.items() if not torch.equal(v, student_before[n]))
        result["student_unchanged"] = sorted(n for n, v in student_after.items() if torch.equal(v, student_before[n]))
        result["teacher_changed"] = sorted(n for n, v in teacher_after.items() if not torch.equal(v, teacher_before[n]))
        result["student_checksums"] = {n: v.double().sum().item() for n, v in student_after.items()}
        trainer.save_model()  # on every rank: under ZeRO-3 saving gathers the weights (a collective)
        model = trainer.model
        model.eval()
        with torch.no_grad():  # every rank runs the same forward: under ZeRO-3 its weight gathers are collectives
            result["logits"] = model(input_ids=torch.tensor(LOGITS_INPUT)).logits.tolist()
    os.makedirs(settings["result_dir"], exist_ok=True)
    with open(os.path.join(settings["result_dir"], f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def main(settings_path: str) -> None:
    with open(settings_path) as f:
        settings = json.load(f)
    torch.set_num_threads(1)  # two ranks share the machine's two cores
    tokenizer = build_char_tokenizer()
    dataset = load_from_disk(settings["dataset"])
    runs = settings.pop("runs", None)
    if runs is None:
        train_once(settings, tokenizer, dataset)
        return
    for run in runs:
        run = {**settings, **run}
        run["args"] = {**settings.get("args", {}), **run.get("args", {})}
        run["output_dir"] = os.path.join(settings["output_dir"], run["name"])
        run["result_dir"] = os.path.join(settings["result_dir"], run["name"])
        train_once(run, tokenizer, dataset)


if __name__ == "__main__":
    main(sys.argv[1])
    # Every result is on disk. Leave without the interpreter's teardown, where native threads (gloo's workers, and
    # DeepSpeed's CPU ops when loaded) can abort a rank that succeeded.
    end_launched_process()
