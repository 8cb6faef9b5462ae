"""Each teacher's per-token terms over its rows of a micro-batch: what the trainer's loss reduces.

`score` routes a micro-batch's rows to their teachers (one teacher: every row) and puts each teacher's terms back on
the micro-batch's (B, K) completion grid; `teacher_grids` is one teacher's share. A local teacher runs its backbone
(through TRL's forward redirection, handed in, so DeepSpeed materializes its shards) and the loss reads its head; a
teacher server returns log-probs that the loss compares with the student's. Neither branch leaks into the other: the
trainer only ever sees the grids.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import kv_cache
from .loss import (
    Head,
    logit_postprocessing,
    logprobs_at,
    reverse_kl_per_token,
    sampled_kl_per_token,
    token_logprobs,
    topk_disagreement_per_token,
    topk_reverse_kl_per_token,
    zero3_enabled,
)
from .monitor import StepMeter
from .teachers import Teacher, vocab_slice


@dataclass
class Scoring:
    """What scoring needs from the trainer for one micro-batch."""

    loss_type: str
    temperature: float
    meter: StepMeter  # the mode's meter: teacher tokens encoded or scored
    unwrap: Callable  # accelerator.unwrap_model
    forward_redirection: Callable  # TRL's `_forward_redirection`
    last_hidden_state: Callable  # TRL's `_get_last_hidden_state`
    pad_token_id: int
    signal_top_k: int | None = None  # the adaptive policy's top-k signal, when this step measures it


def score(scoring: Scoring, teachers: list[Teacher], routes, unwrapped_student, batch: dict, num_positions: int,
          multimodal_inputs: dict) -> dict:
    """Every teacher's terms over its rows (`routes`: each row's teacher index, or None: `teachers[0]` scores every
    row), on the micro-batch's (B, K) grid in its row order."""
    if routes is None:
        return teacher_grids(scoring, teachers[0], unwrapped_student, batch, num_positions, multimodal_inputs)
    mask = batch["mask"]
    grids, index, idle = {}, routes.to(mask.device), []
    if multimodal_inputs and len(set(routes.tolist())) > 1:
        raise NotImplementedError("Several teachers in one micro-batch of images: the image tensors are not "
                                  "split by row. Route a micro-batch to one teacher (batch by teacher_id).")
    for t, teacher in enumerate(teachers):
        rows = (index == t).nonzero().squeeze(1)
        if len(rows) == 0:
            # Under ZeRO-3 a local teacher's forward and its head's gathers are collectives: every rank runs
            # every local teacher on every micro-batch, an idle one on one row with nothing trained.
            if teacher.model is None or not zero3_enabled():
                continue
            part = {k: (v[:1] if torch.is_tensor(v) else v) for k, v in batch.items()}
            part.update(mask=torch.zeros_like(part["mask"]), slots=None)
            idle.append(teacher_grids(scoring, teacher, unwrapped_student, part, num_positions, multimodal_inputs,
                                      count=False)["per_token"])
            continue
        part = {k: (v[rows.to(v.device)] if torch.is_tensor(v) else v) for k, v in batch.items()}
        part_grids = teacher_grids(scoring, teacher, unwrapped_student, part, num_positions, multimodal_inputs,
                                   meter_index=t)
        for key, grid in part_grids.items():
            if grid is not None:
                grids[key] = grids.get(key, grid.new_zeros(mask.shape)).index_copy(0, rows, grid)
            else:
                grids.setdefault(key, None)
    for grid in idle:  # zeros, kept in the graph so every rank's backward gathers the same heads
        grids["per_token"] = grids["per_token"] + 0.0 * grid.sum()
    return grids


def teacher_grids(scoring: Scoring, teacher: Teacher, unwrapped_student, batch: dict, num_positions: int,
                  multimodal_inputs, meter_index: int | None = None, count: bool = True) -> dict:
    """One teacher's terms over the rows of `batch` (all of a micro-batch, or the rows routed to it), each on the
    rows' (B_t, K) completion grid, zero where the mask is: `per_token` (the loss term), `entropy` (the
    student's), `signal` (the policy's own, or None) and, for the sampled-token losses, `student_logprobs` and
    `teacher_logprobs`. `meter_index`: the teacher's place in the per-teacher logs; `count=False`: a ZeRO-3 idle
    teacher's forward, not a cost of training."""
    student_head = unwrapped_student.get_output_embeddings()
    mask = batch["mask"]
    device = mask.device
    s_weight, s_bias = vocab_slice(student_head, teacher.shared_vocab_size)
    # Project only the positions that are trained on (fewer tiles); Neuron compiles per shape, so it keeps all.
    compact = device.type != "neuron"
    rows = (mask.reshape(-1) != 0) if compact else slice(None)  # (B*K,)
    hidden = batch["hidden"]
    student = Head(hidden.reshape(-1, hidden.size(-1))[rows], s_weight, s_bias,
                   logit_postprocessing(unwrapped_student.config))  # hidden (N, H_s)
    targets = batch["completion_ids"].reshape(-1)[rows]  # (N,)
    if teacher.server is None:
        terms, encoded = local_teacher_terms(scoring, teacher, student, targets, rows, batch["input_ids"],
                                             batch["attention_mask"], num_positions, multimodal_inputs, batch["slots"])
    else:
        terms, encoded = remote_teacher_terms(scoring, teacher, student, targets, rows, batch)

    def to_grid(values):  # (N,) -> (B, K); masked_scatter keeps an all-padding micro-batch connected to the graph
        if values is None:
            return None
        if not compact:
            return values.view(mask.shape)
        return values.new_zeros(mask.shape).masked_scatter(mask.bool(), values)

    grids = {key: to_grid(value) for key, value in terms.items()}
    if count:
        scoring.meter.count("teacher_tokens" if teacher.server is None else "teacher_scored_tokens", encoded)
    if meter_index is not None:
        scoring.meter.add_teacher(meter_index, grids["per_token"], mask, encoded)
    return grids


def local_teacher_terms(scoring: Scoring, teacher: Teacher, student: Head, targets, rows, input_ids, attention_mask,
                        num_positions, multimodal_inputs, slots=None):
    """Per trained position (N,): the loss term, the student's entropy, the policy's signal (or None) and, for
    the sampled-token losses, both log-probs of the actual tokens; `teacher` is a local model. `slots`: each
    row's rolling slot, whose cached context the teacher does not re-encode (`teacher.cache`). Returns them by
    name with the number of tokens the teacher encoded."""
    # The teacher backbone goes through its own wrapper, as in TRL, so DeepSpeed materializes its shards.
    teacher_model = teacher.model
    teacher_model.eval()
    unwrapped_teacher = scoring.unwrap(teacher_model)
    with torch.no_grad():
        if slots is not None and teacher.cache is not None:
            teacher_hidden, encoded = scoring.forward_redirection(
                teacher_model, unwrapped_teacher, kv_cache.cached_teacher_hidden_state, unwrapped_teacher,
                input_ids, attention_mask, num_positions, slots, teacher.cache, scoring.pad_token_id)
        else:
            teacher_hidden = scoring.forward_redirection(
                teacher_model, unwrapped_teacher, scoring.last_hidden_state, unwrapped_teacher, input_ids,
                attention_mask, num_positions, **multimodal_inputs,
            )  # (B, K, H_t)
            encoded = int(attention_mask.sum())
    t_weight, t_bias = vocab_slice(unwrapped_teacher.get_output_embeddings(), teacher.shared_vocab_size)
    t_post = logit_postprocessing(unwrapped_teacher.config)
    h_t = teacher_hidden.to(targets.device).reshape(-1, teacher_hidden.size(-1))[rows]  # (N, H_t)
    h_s, s_weight, s_bias, s_post = student
    temperature = scoring.temperature

    student_logprobs = teacher_logprobs = None
    if scoring.loss_type == "reverse_kl":
        per_token, entropy = reverse_kl_per_token(
            h_s, s_weight, h_t, t_weight, temperature=temperature, student_bias=s_bias,
            teacher_bias=t_bias, student_post=s_post, teacher_post=t_post,
        )  # (N,), (N,)
    else:  # estimators on the sampled tokens' log-probs
        student_logprobs, entropy = token_logprobs(
            h_s, s_weight, targets, temperature=temperature, bias=s_bias, post=s_post, with_entropy=True
        )
        with torch.no_grad():
            teacher_logprobs, _ = token_logprobs(h_t, t_weight, targets, temperature=temperature, bias=t_bias,
                                                 post=t_post)
        per_token = sampled_kl_per_token(student_logprobs, teacher_logprobs)
    signal = None
    if scoring.signal_top_k is not None:
        signal = topk_disagreement_per_token(h_s, s_weight, h_t, t_weight, k=scoring.signal_top_k,
                                             student_bias=s_bias, teacher_bias=t_bias, student_post=s_post,
                                             teacher_post=t_post)
    return {"per_token": per_token, "entropy": entropy, "signal": signal, "student_logprobs": student_logprobs,
            "teacher_logprobs": teacher_logprobs}, encoded


def remote_teacher_terms(scoring: Scoring, teacher: Teacher, student: Head, targets, rows, inputs):
    """As `local_teacher_terms`, with the teacher's log-probs from its server: the actual tokens' for the
    sampled-token losses, the top-k + tail reverse KL for `topk_reverse_kl`. Temperature is 1 (the config
    checks it), the one at which vLLM returns log-probs. Returns the terms with the number of tokens scored."""
    h_s, s_weight, s_bias, s_post = student
    scores = teacher.server.score_batch(inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"],
                                        inputs["completion_mask"])  # raises, naming the URL, on failure
    scored = int(scores.mask.sum())
    head_rows = s_weight.ds_shape[0] if hasattr(s_weight, "ds_shape") else s_weight.size(0)
    scores = scores.restrict_vocab(head_rows)
    device = targets.device
    if scoring.loss_type == "topk_reverse_kl":
        k = scores.topk_ids.size(-1)
        topk_ids = scores.topk_ids.to(device).reshape(-1, k)[rows]  # (N, k)
        teacher_topk = scores.topk_logprobs.to(device).reshape(-1, k)[rows]
        student_topk, entropy = logprobs_at(h_s, s_weight, topk_ids, temperature=scoring.temperature, bias=s_bias,
                                            post=s_post, with_entropy=True)
        return {"per_token": topk_reverse_kl_per_token(student_topk, teacher_topk), "entropy": entropy,
                "signal": None, "student_logprobs": None, "teacher_logprobs": None}, scored
    student_logprobs, entropy = token_logprobs(
        h_s, s_weight, targets, temperature=scoring.temperature, bias=s_bias, post=s_post, with_entropy=True
    )
    teacher_logprobs = scores.actual_logprobs.to(device).reshape(-1)[rows]
    return {"per_token": sampled_kl_per_token(student_logprobs, teacher_logprobs), "entropy": entropy,
            "signal": None, "student_logprobs": student_logprobs, "teacher_logprobs": teacher_logprobs}, scored
