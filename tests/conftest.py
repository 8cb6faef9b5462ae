import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from horizon_opd.demo.tokenizer import build_char_tokenizer  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_causal_lm(vocab_size: int, hidden_size: int = 32, seed: int = 0, num_layers: int = 2) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 small enough to train in milliseconds on a CPU."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture
def student(tokenizer):
    return tiny_causal_lm(len(tokenizer), hidden_size=32, seed=0)


@pytest.fixture
def teacher(tokenizer):
    return tiny_causal_lm(len(tokenizer), hidden_size=48, seed=1)


@pytest.fixture(scope="session")
def prompts():
    return Dataset.from_dict({"prompt": [f"{i} + {i + 1} =" for i in range(16)]})


@pytest.fixture(scope="session")
def chat_prompts():
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"add {i} {i + 2}"}] for i in range(16)]})
