"""What every benchmark child shares: model presets, a synthetic tokenizer, prompts and timing.

Imported only by the child scripts (`bench_step.py`, `bench_loss.py`, `bench_generate.py`): `run.py` and `gpu.py`
never import torch, so they can hold a lock per child and measure nothing themselves. The memory probe and the
machine's description are the library's (`horizon_opd.demo.measure`), shared with the demo's comparison.
"""

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
# Benchmark the checkout this file lives in, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from horizon_opd.demo.measure import PeakRSS, machine_info  # noqa: E402,F401  (re-exported for the children)


@dataclass(frozen=True)
class Preset:
    """Shapes of one benchmark setting: the two models, the vocabulary, the batch and the full horizon L."""

    name: str
    vocab_size: int
    student: tuple  # (hidden, layers, intermediate, heads, kv_heads)
    teacher: tuple
    batch_size: int
    max_completion_length: int  # L
    prompt_tokens: int  # every prompt has exactly this many tokens (chat markers included)
    dtype: str = "float32"
    teacher_tied: bool = True  # the teacher's LM head shares the embedding table (Qwen2.5-7B's does not)


PRESETS = {
    # The CPU bars: an ~11M-parameter student distilled from a ~23M teacher, a 32k vocabulary, batch 4, L = 512.
    "cpu": Preset("cpu", 32000, (256, 4, 768, 4, 2), (384, 6, 1152, 6, 2), 4, 512, 32),
    # `--quick`: the same code paths on shapes that take milliseconds.
    "quick": Preset("quick", 512, (64, 2, 128, 2, 1), (96, 2, 192, 2, 1), 2, 32, 12),
    # `gpu.py`: Qwen2.5-1.5B shapes (student and teacher), random weights, bf16, batch 8; L is set per run.
    "qwen2.5-1.5b": Preset("qwen2.5-1.5b", 151936, (1536, 28, 8960, 12, 2), (1536, 28, 8960, 12, 2), 8, 1024, 64,
                           "bfloat16"),
    # `gpu.py`'s cost measurements (bench_costs.py): the pair of the GPU cost model (gpu_model.py), Qwen2.5-1.5B and
    # Qwen2.5-7B shapes (the 7B's 152064-row vocabulary trimmed to the student's, its LM head untied).
    "qwen2.5-1.5b-7b": Preset("qwen2.5-1.5b-7b", 151936, (1536, 28, 8960, 12, 2), (3584, 28, 18944, 28, 4), 8, 1024,
                              64, "bfloat16", teacher_tied=False),
    # `gpu.py --tiny`: the GPU script's path on CPU-sized shapes.
    "tiny": Preset("tiny", 512, (64, 2, 128, 2, 1), (96, 2, 192, 2, 1), 2, 16, 12),
}

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}<eos>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A child's command line, described by its docstring's first paragraph; `parse_args` adds the flags every child
    takes (`--threads`, `--out`)."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0])


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse a child's flags plus `--threads` (torch's threads, applied here) and `--out` (the JSON it writes)."""
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer over `vocab_size` synthetic words `w0, w1, ...` (specials first), with a chat template.

    A real-sized vocabulary matters here: the LM head and the loss scale with it, and the char tokenizer has ~100."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS))]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"], padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def prompt_texts(preset: Preset, n: int, seed: int = 0) -> list[str]:
    """`n` prompts of random words; with the two chat markers each is exactly `preset.prompt_tokens` tokens."""
    rng = random.Random(seed)
    n_words = preset.prompt_tokens - 2
    high = preset.vocab_size - len(SPECIAL_TOKENS) - 1
    return [" ".join(f"w{rng.randint(0, high)}" for _ in range(n_words)) for _ in range(n)]


def build_model(preset: Preset, role: str, seed: int, on_device: bool = False):
    """A randomly initialised Qwen2 causal LM of the preset's student or teacher shape (tied embeddings, as Qwen2.5,
    unless the preset unties the teacher's). `on_device`: initialised on the GPU, then cast (a 7B model initialised on
    the CPU takes minutes); otherwise built on the CPU, then cast and moved."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, intermediate, heads, kv_heads = getattr(preset, role)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=preset.vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max(1024, preset.prompt_tokens + preset.max_completion_length + 8),
        tie_word_embeddings=preset.teacher_tied if role == "teacher" else True, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    dtype = getattr(torch, preset.dtype)
    if on_device and torch.cuda.is_available():
        with torch.device("cuda"):
            model = Qwen2ForCausalLM(config)
        return model.to(dtype).eval()
    model = Qwen2ForCausalLM(config).to(dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    return model.eval()


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ timing
def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def now() -> float:
    """Wall clock after the device has finished its queued work (a no-op on CPU)."""
    sync()
    return time.perf_counter()


def median(values):
    """The median; NaN if any value is NaN (a mark that was never reached must not vanish into a median)."""
    values = list(values)
    if any(math.isnan(v) for v in values):
        return math.nan
    values = sorted(values)
    if not values:
        return float("nan")
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def memory_figures(memory: PeakRSS) -> dict:
    """The peak-memory fields of a result from a finished probe: on GPU the allocated tensors, on CPU the RSS; the
    bars use `peak_memory_increase_mb`, the peak above the probe's entry."""
    if memory.peak_cuda is not None:
        return {"peak_memory_mb": memory.peak_cuda, "peak_memory_increase_mb": memory.peak_cuda - memory.baseline_cuda,
                "baseline_memory_mb": memory.baseline_cuda,
                "memory_method": "torch.cuda.max_memory_allocated after reset_peak_memory_stats"}
    return {"peak_memory_mb": memory.peak, "peak_memory_increase_mb": memory.increase,
            "baseline_memory_mb": memory.baseline, "memory_method": memory.method + ", minus the RSS at entry"}


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def preset_dict(preset: Preset, **extra) -> dict:
    return {**asdict(preset), **extra}
