"""A character-level `transformers` tokenizer with a chat template, built offline in a few milliseconds."""

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
CHARACTERS = string.digits + string.ascii_letters + string.punctuation + " \n"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}<eos>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer(number_tokens: int = 0) -> PreTrainedTokenizerFast:
    """One token per character of `CHARACTERS` plus the special tokens; left padding, as TRL's trainers expect.

    With `number_tokens=n`, each three-digit number 000..n-1 is also a single token, alone and followed by a space
    (the demo task's values), so one reasoning step is one token."""
    numbers = [f"{i:03d}" for i in range(number_tokens)] + [f"{i:03d} " for i in range(number_tokens)]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS) + numbers)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    pattern = r"\d\d\d ?|." if number_tokens else "."
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    backend.decoder = decoders.Fuse()  # characters join without separators
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
