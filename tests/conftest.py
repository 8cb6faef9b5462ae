"""Fixtures only; shared helpers (tiny models, configs, launches) live in tests/testing_utils.py."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from testing_utils import tiny_causal_lm  # noqa: E402

from horizon_opd.demo.tokenizer import build_char_tokenizer  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
