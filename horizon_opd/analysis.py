"""The paper's analyses of a teacher-student pair as library functions (arXiv 2605.31490).

`prefix_continuation` (Figs. 9 and 10): how much does a prefix of the teacher's own rollout help the student finish?
"""

import math
from collections.abc import Callable, Sequence

import torch


__all__ = ["prefix_continuation"]


@torch.no_grad()
def prefix_continuation(
    teacher,
    student,
    tokenizer,
    prompts,
    ratios: Sequence[float],
    scorer: Callable[[dict, str], float | bool],
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> list[dict]:
    """Accuracy of the student when it continues the teacher's rollouts from a prefix of each length ratio.

    For every prompt the teacher generates one rollout of at most `max_new_tokens` tokens (greedy, or sampled at
    `temperature` under `seed` when `do_sample=True`; the global RNG is left as it was). Its completion, the n generated
    tokens up to and including EOS, is cut at each ratio r to its first ceil(r * n) tokens (r = 0: no prefix, the
    student alone; r = 1: the teacher's whole rollout, so the student adds nothing). The student then continues
    greedily from prompt + prefix until EOS or the total budget of `max_new_tokens` completion tokens, and
    `scorer(row, completion_text)` scores prefix + continuation (decoded, special tokens dropped).

    Why: a student trained with a truncated horizon (TOPD) may score well because it learned to reason, or only because
    its early tokens now resemble the teacher's and a good start carries it. Comparing the curve of accuracy against r
    before and after distillation separates the two: a student that learned something gains at r = 0, one that merely
    profits from a teacher prefix only gains where r > 0. Ratio 0 reproduces the student's own greedy accuracy and
    ratio 1 the teacher's.

    Args:
        teacher, student: causal LMs sharing `tokenizer` (the prefix's token ids are fed to the student as they are).
        tokenizer: pads on the left here whatever its `padding_side`; needs a pad and an EOS token.
        prompts: a `datasets.Dataset` or a list of dict rows with a `"prompt"` (text, or a conversation rendered with
            the tokenizer's chat template and the generation prompt). The whole row goes to `scorer`.
        ratios: prefix lengths as fractions of each teacher completion, each in [0, 1].
        scorer: `scorer(row, completion_text) -> float | bool`, e.g. exact match against `row["answer"]`.
        max_new_tokens: the completion budget, prefix included.

    Returns:
        One dict per ratio, in the order given: `{"ratio", "accuracy" (mean score), "n" (prompts), "mean_prefix_tokens",
        "scores" (per prompt, in prompt order)}`.
    """
    ratios = [float(r) for r in ratios]
    for r in ratios:
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"ratio {r!r} is outside [0, 1]: ratios are fractions of the teacher's completion, 0 for "
                             f"the student alone and 1 for the teacher's whole rollout.")
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive number of completion tokens.")
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs a pad token and an EOS token: set `tokenizer.pad_token` (e.g. to the "
                         "EOS token).")
    rows = [dict(row) for row in prompts]
    if not rows:
        raise ValueError("prompts is empty: pass at least one row with a 'prompt'.")
    eos = tokenizer.eos_token_id

    prompt_ids = [_encode_prompt(tokenizer, row["prompt"]) for row in rows]
    with torch.random.fork_rng(devices=_cuda_devices(teacher)):
        torch.manual_seed(seed)
        teacher_out = _generate(teacher, tokenizer, prompt_ids, [max_new_tokens] * len(rows), batch_size,
                                do_sample=do_sample, temperature=temperature)
    completions = [_until_eos(ids, eos) for ids in teacher_out]

    results = []
    for ratio in ratios:
        cuts = [math.ceil(round(ratio * len(c), 9)) for c in completions]
        prefixes = [c[:n] for c, n in zip(completions, cuts, strict=True)]
        # A prefix that holds the teacher's EOS, or the whole budget, is already a finished completion.
        budgets = [0 if eos in p else max_new_tokens - len(p) for p in prefixes]
        todo = [i for i, b in enumerate(budgets) if b > 0]
        continued = _generate(student, tokenizer, [prompt_ids[i] + prefixes[i] for i in todo],
                              [budgets[i] for i in todo], batch_size, do_sample=False)
        continuations = [[] for _ in rows]
        for i, ids in zip(todo, continued, strict=True):
            continuations[i] = _until_eos(ids, eos)
        scores = [
            float(scorer(row, tokenizer.decode(prefix + cont, skip_special_tokens=True)))
            for row, prefix, cont in zip(rows, prefixes, continuations, strict=True)
        ]
        results.append({
            "ratio": ratio,
            "accuracy": sum(scores) / len(scores),
            "n": len(scores),
            "mean_prefix_tokens": sum(cuts) / len(cuts),
            "scores": scores,
        })
    return results


def _encode_prompt(tokenizer, prompt) -> list[int]:
    # As `horizon_opd.demo.generate_completions`: conversations through the chat template, text as it is.
    if isinstance(prompt, list):
        prompt = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def _until_eos(ids: list[int], eos: int) -> list[int]:
    """The generated ids up to and including the first EOS (what follows is padding)."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def _cuda_devices(model) -> list:
    device = next(model.parameters()).device
    return [device] if device.type == "cuda" else []


def _generate(model, tokenizer, inputs: list[list[int]], budgets: list[int], batch_size: int, *, do_sample: bool,
              temperature: float = 1.0) -> list[list[int]]:
    """Generated ids for each input (left-padded batches), each cut to its own budget. Rows of a batch share one
    `max_new_tokens` (the batch's largest budget); cutting a row afterwards equals stopping it earlier, since a row's
    tokens never depend on how long the others run."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(inputs), batch_size):
        chunk, chunk_budgets = inputs[start : start + batch_size], budgets[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if do_sample else {
            "do_sample": False}
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             max_new_tokens=max(chunk_budgets), pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **sampling)
        outputs += [row[width:][:budget].tolist() for row, budget in zip(out, chunk_budgets, strict=True)]
    model.train(was_training)
    return outputs
