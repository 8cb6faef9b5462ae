"""Held-out greedy accuracy of a model on the demo task, at the full horizon."""

import torch

from .task import MAX_COMPLETION_LENGTH, accuracy


@torch.no_grad()
def generate_completions(model, tokenizer, prompts, max_new_tokens: int = MAX_COMPLETION_LENGTH,
                         batch_size: int = 128) -> list[str]:
    """Greedy completions (text, special tokens dropped) for conversational or plain-text prompts."""
    was_training = model.training
    model.eval()
    completions = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        if isinstance(chunk[0], list):
            texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in chunk]
        else:
            texts = list(chunk)
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        completions += tokenizer.batch_decode(out[:, enc["input_ids"].size(1):], skip_special_tokens=True)
    model.train(was_training)
    return completions


def evaluate_accuracy(model, tokenizer, dataset, max_new_tokens: int = MAX_COMPLETION_LENGTH) -> float:
    """Exact-match accuracy of greedy completions against `dataset["answer"]`, in [0, 1]."""
    completions = generate_completions(model, tokenizer, dataset["prompt"], max_new_tokens)
    return accuracy(completions, dataset["answer"])
