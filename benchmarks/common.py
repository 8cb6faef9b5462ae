"""What every benchmark child shares: model presets, a synthetic tokenizer, prompts, memory probes and the machine.

Imported only by the child scripts (`bench_step.py`, `bench_loss.py`, `bench_generate.py`): `run.py` and `gpu.py`
never import torch, so they can hold a lock per child and measure nothing themselves.
"""

import gc
import json
import os
import platform
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


PRESETS = {
    # The CPU bars: an ~11M-parameter student distilled from a ~23M teacher, a 32k vocabulary, batch 4, L = 512.
    "cpu": Preset("cpu", 32000, (256, 4, 768, 4, 2), (384, 6, 1152, 6, 2), 4, 512, 32),
    # `--quick`: the same code paths on shapes that take milliseconds.
    "quick": Preset("quick", 512, (64, 2, 128, 2, 1), (96, 2, 192, 2, 1), 2, 32, 12),
    # `gpu.py`: Qwen2.5-1.5B shapes (student and teacher), random weights, bf16, batch 8; L is set per run.
    "qwen2.5-1.5b": Preset("qwen2.5-1.5b", 151936, (1536, 28, 8960, 12, 2), (1536, 28, 8960, 12, 2), 8, 1024, 64,
                           "bfloat16"),
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


def build_model(preset: Preset, role: str, seed: int):
    """A randomly initialised Qwen2 causal LM of the preset's student or teacher shape (tied embeddings, as Qwen2.5)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, intermediate, heads, kv_heads = getattr(preset, role)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=preset.vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max(1024, preset.prompt_tokens + preset.max_completion_length + 8),
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = Qwen2ForCausalLM(config).to(getattr(torch, preset.dtype))
    if torch.cuda.is_available():
        model = model.cuda()
    return model.eval()


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ memory
class PeakMemory:
    """Peak memory of a region, as the bars define it.

    CPU: the process's resident-set high-water mark (VmHWM) minus the RSS at `start()`. `start()` resets the
    high-water mark to the current RSS (Linux `/proc/self/clear_refs`, value 5), so a region is measured on its own
    even after an earlier, larger one in the same process. Without that reset (non-Linux) the peak is the process's
    `ru_maxrss`, which is exact only for the first region of a fresh process — `run.py` gives each measured
    configuration its own process for that reason.
    GPU: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`: tensors only, absolute.
    """

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.baseline_mb = 0.0

    def start(self) -> "PeakMemory":
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.baseline_mb = torch.cuda.memory_allocated() / 2**20
        else:
            _malloc_trim()
            self.resettable = _reset_hwm()
            self.baseline_mb = current_rss_mb()
        return self

    def peak_mb(self) -> float:
        """Absolute peak since `start()` (GPU: allocated tensors; CPU: RSS)."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return hwm_rss_mb()

    def increase_mb(self) -> float:
        return self.peak_mb() - self.baseline_mb

    @property
    def method(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated after reset_peak_memory_stats"
        return "VmHWM (reset via /proc/self/clear_refs) minus RSS at the start" if getattr(
            self, "resettable", False) else "ru_maxrss minus RSS at the start (fresh process)"


def _status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb / 1024
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def hwm_rss_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    import resource

    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss / 2**20 if sys.platform == "darwin" else max_rss / 1024  # bytes on macOS, KiB on Linux


def _malloc_trim() -> None:
    """Give the heap's free memory back to the OS, so a region after a bigger one starts from a clean heap."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------ timing
def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def now() -> float:
    """Wall clock after the device has finished its queued work (a no-op on CPU)."""
    sync()
    return time.perf_counter()


def median(values):
    values = sorted(values)
    if not values:
        return float("nan")
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


# ------------------------------------------------------------------------------------------------ machine
def machine() -> dict:
    """The facts a reader needs to compare two result files."""
    import transformers
    import trl

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram_gb = None
    try:
        with open("/proc/meminfo") as f:
            ram_gb = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": ram_gb,
        "device": "cpu",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device="cuda", gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    return info


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def preset_dict(preset: Preset, **extra) -> dict:
    return {**asdict(preset), **extra}
