"""A GPU cost model of one training step per horizon method: a MODEL, not a measurement (torch-free).

    python benchmarks/gpu_model.py                  # the README tables: H100/H200, L = 1024 and 4096, 1.5B/7B pair
    python benchmarks/gpu_model.py --batch 128 --prompt 512 --length 8192
    python benchmarks/gpu_model.py --measured benchmarks/results/gpu.json   # gpu.py's measured rates replace assumed

No GPU has run these benchmarks (benchmarks/README.md): this module predicts what a step would cost on one, from

- the step's COUNTS, per method: sequential decode iterations (the longest rollout of the batch), tokens generated,
  tokens forwarded by the student with and without gradients, tokens the teacher encodes. They follow from each
  method's horizon (`horizon_opd.horizon`'s policies, loaded from the file so no torch is imported) and, for the
  adaptive policy, from the horizons the demo run measured (examples/demo_results/results.json); a training run's
  results.json records them too (its "counts"), and `measured_counts` prices those as measured;
- the GPU's RATES: vendor peak HBM bandwidth and dense BF16 FLOP/s (cited in `GPUS`) times efficiency factors that
  are ASSUMED (`Assumptions`), or the per-iteration decode latency and achieved FLOP/s that `gpu.py` MEASURES on a
  CUDA machine (`Rates.measured`).

The formula, per optimizer step of B rollouts (every term in seconds):

    step = decode + prefill + student_context + student_train + teacher + optimizer

    decode          = sum over the step's decode iterations i of  max(memory(i), compute, floor)
      memory(i)     = (W_s + B * ctx_i * kv_s) / (HBM * eff)       W_s student weight bytes, kv_s KV bytes per token,
                                                                   ctx_i = context at iteration i (prompt + prefix + i)
      compute       = 2 * N_s * B / (FLOPS * mfu)                  the batch's matmuls: above memory(i) only past
                                                                   B ~ 170 on an H100 at the assumed efficiencies
      floor         = a per-iteration latency floor: 0 for an engine at the bandwidth bound (vLLM-style, CUDA
                      graphs); ~20 ms for transformers' eager `generate`, which waits on kernel launches
    prefill         = 2 * Nb_s * B * (P + prefix) / (FLOPS * mfu)      student, no grad, before decoding
    student_context = 2 * Nb_s * B * (P + prefix - 1) / (FLOPS * mfu)  rolling only: the context again, for the loss
    student_train   = 3 * 2 * (Nb_s * tokens_grad + Nh_s * trained) / (FLOPS * mfu)      forward + backward;
                      tokens_grad = B (P + horizon), or B (chunk + 1) for rolling (its context runs without gradients)
    teacher         = 2 * (Nb_t * tokens_teacher + Nh_t * trained) / (FLOPS * mfu)
    optimizer       = N_s * bytes_per_param / (HBM * eff)              AdamW reads and writes every parameter

with Nb the backbone (non-embedding) parameters, Nh the LM head (vocab x hidden): the trainers run the backbone over
prompt + completion and the LM heads only over the trained completion positions (inside the chunked loss), and
`generate` projects only each new token. Not modelled: attention FLOPs (4 x layers x ctx x hidden per token, ~6% of
2N at 1k context for the 1.5B student, ~26% at 4k: so at L = 4096 the re-encoded contexts and the cached teacher's
chunk, which still attends to its whole context, cost more than priced), the loss's softmax work, the trainer's own
overhead (0.7% of a CPU step, measured), data loading, and communication (one GPU).

What a method changes is only the counts. OPD, TOPD, POPD, anchored and adaptive generate `horizon` tokens per
rollout from the prompt, so decode iterations = horizon (every rollout assumed to reach it, no early EOS: in the demo
97-100% of the horizon was generated) and the student and the teacher see prompt + horizon tokens. `rolling` (every
rollout advances by one chunk of c = ceil(rho L) tokens per step, continued across steps) decodes c iterations a step,
like TOPD, and as built (`rolling_step`): generation encodes the context (prompt + prefix of depth d) in its
prefill, the student's loss reads the context's keys and values from that generation (same weights) and runs the
chunk + 1 tokens with grad, and the teacher, which keeps each slot's keys and values across steps
(horizon_opd/kv_cache.py), encodes prompt + chunk at depth 0 and chunk + 1 after. Two variants are priced beside it:
the teacher cache only (the student re-encoding its context without grad for the loss: vLLM generation, or
`rolling_student_cache=False`) and uncached (the teacher too re-encoding context + chunk every step).Its
depth runs over 0, c, 2c, ... within each rollout, so its cost is averaged over that cycle (mean depth (n - 1) c / 2
for n = ceil(L / c) chunks, ~L/2). The wide methods run ceil(B / rho) prompts (slots) per step, OPD's trained tokens
per update in c decode iterations: their decode reads B / rho slots' KV every iteration (memory(i) above), and their
re-encoded contexts scale with the slots. `cache_memory` gives each KV cache's bytes: tokens held x layers x 2 x
kv_heads x head_dim x dtype bytes.

Two cost views of the same counts (the issue's): on a CPU (compute-bound) train seconds follow tokens generated (the
CPU benchmark: TOPD 0.1's step is 0.102 of full's, its tokens 0.102, its FLOPs 0.120); on a GPU a step's generation
follows its sequential decode iterations, nearly flat in B until the batch is compute-bound. The tables give both
(tokens vs OPD, decode iterations vs OPD) and the model's seconds, which rest on the GPU view and the assumed rates;
seconds per trained position compare methods at equal training signal (the wide methods' purpose). Which view a claim
rests on is said where it is made.
"""

import argparse
import importlib.util
import json
import math
import os
import sys
from dataclasses import dataclass, field, replace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEMO_RESULTS = os.path.join(ROOT, "examples", "demo_results", "results.json")


# ------------------------------------------------------------------------------------------------ hardware (cited)
@dataclass(frozen=True)
class GPU:
    name: str
    hbm_bytes_per_s: float  # peak memory bandwidth, vendor figure
    bf16_flops: float  # peak dense BF16 tensor FLOP/s, vendor figure (the datasheets print 2x, "with sparsity")
    memory_bytes: float  # GPU memory, vendor figure
    source: str


GPUS = {
    "H100": GPU("H100 SXM", 3.35e12, 989e12, 80e9,
                "NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): 80 GB HBM3 at 3.35 TB/s; BF16 Tensor "
                "Core 1,979 TFLOPS with sparsity, 989 dense"),
    "H200": GPU("H200 SXM", 4.8e12, 989e12, 141e9,
                "NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): 141 GB HBM3e at 4.8 TB/s; same Hopper "
                "compute as H100 SXM, 1,979 TFLOPS BF16 with sparsity, 989 dense"),
    "A6000": GPU("RTX A6000", 768e9, 154.8e12, 48e9,
                 "NVIDIA RTX A6000 datasheet: 48 GB GDDR6 at 768 GB/s; 309.7 TFLOPS tensor with sparsity, 154.8 dense"),
}


def gpu_for(device_name: str | None) -> GPU | None:
    """The cited GPU whose key appears in a CUDA device name ("NVIDIA H200" -> H200), or None."""
    for key, gpu in GPUS.items():
        if device_name and key.lower() in device_name.lower():
            return gpu
    return None


# ------------------------------------------------------------------------------------------------ models
@dataclass(frozen=True)
class Model:
    name: str
    backbone_params: int  # everything but the embedding table and the LM head
    head_params: int  # the LM head, vocab x hidden (the embedding table too when tied)
    kv_bytes_per_token: int  # K and V of every layer for one token
    dtype_bytes: int = 2

    @property
    def params(self) -> int:
        """The parameters a decode iteration reads in full: backbone + LM head (an untied input embedding table is
        read one row per token, so it is left out)."""
        return self.backbone_params + self.head_params

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes


def qwen2_model(name: str, vocab: int, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int,
                dtype_bytes: int = 2) -> Model:
    """A Qwen2-architecture model's parameter split and KV size from its shape (q/k/v biases, SwiGLU MLP, RMSNorm)."""
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    attention = hidden * hidden + hidden + 2 * (hidden * kv + kv) + hidden * hidden  # q (+bias), k, v (+bias), o
    layer = attention + 3 * hidden * intermediate + 2 * hidden  # + gate/up/down, two norms
    return Model(name, layers * layer + hidden, vocab * hidden, 2 * layers * kv * dtype_bytes, dtype_bytes)


# Qwen2.5-1.5B(-Instruct) and Qwen2.5-7B(-Instruct) shapes (their config.json); 1.54B and 7.62B parameters in all,
# as their model cards say (the 7B's untied input embedding, 0.54B, is not read in full per token: not counted here).
STUDENT = qwen2_model("Qwen2.5-1.5B", 151936, 1536, 28, 8960, 12, 2)
TEACHER = qwen2_model("Qwen2.5-7B", 152064, 3584, 28, 18944, 28, 4)


# ------------------------------------------------------------------------------------------------ assumptions
@dataclass(frozen=True)
class Assumptions:
    """The inputs no measurement here gives; `gpu.py` on a GPU measures what replaces the first three."""

    bandwidth_efficiency: float = 0.7  # achieved / peak HBM bandwidth of decode; vendor peak is never reached
    mfu: float = 0.4  # achieved / peak dense BF16 FLOP/s of forward and backward (Llama 3 reports 38-43% on H100)
    decode_floor_s: float = 0.0  # per-iteration latency floor: 0 = an engine at the bandwidth bound
    optimizer_bytes_per_param: float = 22.0  # AdamW, bf16 weights and grads, fp32 moments: read+write w, m, v; read g


HF_EAGER_FLOOR_S = 0.020  # transformers' eager generate: ~19 ms per token for gemma-2b in HF's own benchmark runs
                          # (hf-internal-testing/benchmark_results), launch-bound: an assumed floor, not measured here


# ------------------------------------------------------------------------------------------------ pure cost functions
def weights_read_seconds(params: float, dtype_bytes: float, bandwidth: float, efficiency: float = 1.0) -> float:
    """Seconds to stream `params` weights of `dtype_bytes` once from memory: the memory-bound floor of one decode
    iteration (1e9 params x 2 bytes at 3.35e12 B/s = 0.597 ms)."""
    return params * dtype_bytes / (bandwidth * efficiency)


def compute_seconds(flops: float, peak_flops: float, mfu: float) -> float:
    return flops / (peak_flops * mfu)


def forward_flops(model: Model, backbone_tokens: float, head_tokens: float) -> float:
    """2 FLOPs per parameter per token: the backbone over `backbone_tokens`, the LM head over `head_tokens`."""
    return 2.0 * (model.backbone_params * backbone_tokens + model.head_params * head_tokens)


def train_flops(model: Model, backbone_tokens: float, head_tokens: float) -> float:
    """Forward + backward: 3x the forward (6 FLOPs per parameter per token)."""
    return 3.0 * forward_flops(model, backbone_tokens, head_tokens)


def decode_sum(a: float, b: float, floor: float, start: int, iterations: int) -> float:
    """sum_{i=0}^{iterations-1} max(a + b * (start + i), floor), in closed form (b >= 0)."""
    n = int(iterations)
    if n <= 0:
        return 0.0
    if b <= 0:
        return n * max(a + b * start, floor)
    below = min(n, max(0, math.ceil((floor - a) / b - start)))  # iterations still at the floor
    while below > 0 and a + b * (start + below - 1) >= floor:  # float safety at the crossing
        below -= 1
    while below < n and a + b * (start + below) < floor:
        below += 1
    rest = n - below
    return below * floor + rest * (a + b * start) + b * (below + n - 1) * rest / 2.0


# ------------------------------------------------------------------------------------------------ rates
class Rates:
    """Seconds for decode iterations and for FLOPs: from cited peaks x assumed efficiencies, or measured (gpu.py)."""

    def __init__(self, gpu: GPU, assumptions: Assumptions = Assumptions(), measured: dict | None = None):
        self.gpu, self.a, self.measured = gpu, assumptions, measured
        self.achieved = {}  # kind -> achieved FLOP/s, measured
        self.decode_points = []  # (batch, context, seconds per iteration), measured, for the student
        if measured:
            for kind in ("student_forward", "student_train", "teacher_forward"):
                m = measured.get("compute", {}).get(kind)
                if m:
                    self.achieved[kind] = m["flops"] / m["seconds"]
            self.decode_points = sorted((p["batch"], p["context"], p["seconds_per_iteration"])
                                        for p in measured.get("decode", []))

    def _bandwidth(self) -> float:
        return self.gpu.hbm_bytes_per_s * self.a.bandwidth_efficiency

    def decode_line(self, model: Model, batch: int) -> tuple[float, float, float]:
        """(a, b, floor): one decode iteration at context c takes max(a + b c, floor) seconds."""
        b = batch * model.kv_bytes_per_token / self._bandwidth()
        if self.decode_points:
            seconds, context = _interpolate(self.decode_points, batch)
            return seconds - b * context, b, 0.0
        compute = compute_seconds(2.0 * model.params * batch, self.gpu.bf16_flops, self.a.mfu)
        return model.weight_bytes / self._bandwidth(), b, max(compute, self.a.decode_floor_s)

    def decode_seconds(self, model: Model, batch: int, start_context: int, iterations: int) -> float:
        a, b, floor = self.decode_line(model, batch)
        return decode_sum(a, b, floor, start_context, iterations)

    def flops_seconds(self, flops: float, kind: str) -> float:
        if kind in self.achieved:
            return flops / self.achieved[kind]
        return compute_seconds(flops, self.gpu.bf16_flops, self.a.mfu)

    def optimizer_seconds(self, model: Model) -> float:
        return model.params * self.a.optimizer_bytes_per_param / self._bandwidth()

    def sources(self) -> dict:
        """Where each rate comes from, for the tables."""
        g, a = self.gpu, self.a
        device = (self.measured or {}).get("device", "GPU")
        peak = f"{g.name} peak {g.hbm_bytes_per_s / 1e12:g} TB/s, {g.bf16_flops / 1e12:g} TFLOPS (cited)"
        if self.measured:
            peak += ", for the terms still assumed (KV growth with context, optimizer)"
            if gpu_for(device) is None:
                peak += f": {device} is not among the cited GPUs"
        out = {"peaks": peak}
        if self.decode_points:
            out["decode"] = (f"measured on {device}: seconds per decode iteration at batch "
                             f"{', '.join(str(p[0]) for p in self.decode_points)} (gpu.py)")
        else:
            out["decode"] = (f"assumed: bandwidth efficiency {a.bandwidth_efficiency:g}, floor "
                             f"{a.decode_floor_s * 1e3:g} ms per iteration")
        for kind in ("student_forward", "student_train", "teacher_forward"):
            out[kind] = (f"measured on {device}: {self.achieved[kind] / 1e12:.3g} TFLOP/s achieved" if kind in
                         self.achieved else f"assumed: MFU {a.mfu:g}")
        return out


def _interpolate(points: list[tuple], batch: int) -> tuple[float, float]:
    """Linear interpolation of (seconds, context) in batch over measured (batch, context, seconds); linear
    extrapolation from the two nearest points outside."""
    if len(points) == 1:
        return points[0][2], points[0][1]
    lo, hi = points[0], points[1]
    for left, right in zip(points, points[1:]):
        lo, hi = left, right
        if batch <= right[0]:
            break
    t = (batch - lo[0]) / (hi[0] - lo[0])
    return lo[2] + t * (hi[2] - lo[2]), lo[1] + t * (hi[1] - lo[1])


# ------------------------------------------------------------------------------------------------ what a step processes
@dataclass(frozen=True)
class StepShape:
    """The counts of one optimizer step of `batch` rollouts (tokens summed over the batch)."""

    batch: int
    decode_iterations: int  # sequential decode steps: the longest rollout
    decode_start_context: int  # context when decoding starts: prompt + prefix
    generated_tokens: int
    trained_positions: int  # positions the loss is computed on (the student's and the teacher's LM heads)
    prefill_tokens: int  # student, no grad, before decoding (prompt + prefix)
    student_context_tokens: int  # student, no grad, for the loss (rolling: the context again, but its last token)
    student_train_tokens: int  # student backbone with gradients
    teacher_tokens: int  # teacher backbone


def standard_step(batch: int, prompt: int, horizon: int) -> StepShape:
    """OPD / TOPD / POPD / anchored / adaptive: every rollout starts at the prompt and generates `horizon` tokens."""
    return StepShape(batch, horizon, prompt, batch * horizon, batch * horizon, batch * prompt, 0,
                     batch * (prompt + horizon), batch * (prompt + horizon))


CACHES = ("memory", "both", "teacher", "none", "grad")


def rolling_step(batch: int, prompt: int, depth: int, chunk: int, cache: str = "both") -> StepShape:
    """Rolling: each of `batch` slots continues its rollout from a prefix of `depth` tokens by one chunk. Generation
    encodes the context (prompt + prefix) in its prefill; the student's loss runs the context's last token and the
    chunk (chunk + 1) with grad. What else is encoded depends on `cache` (horizon_opd/kv_cache.py):

    - "both" (the default as built): the frozen teacher keeps each slot's keys and values across steps, so it encodes
      prompt + chunk when a slot starts (depth 0), then the context's last token + the chunk; the student's loss
      reads the context's keys and values from the step's generation, so no context runs again without grad;
    - "teacher" (`rolling_student_cache=False`, or vLLM generation, whose cache is in another process): the teacher as
      "both", and the student's loss runs the context but its last token without grad;
    - "none" (both caches off): that, and the teacher over context + chunk every step;
    - "memory" (`rolling_student_memory`): as "both", and generation continues from the student's keys and values
      kept per slot across steps, so its prefill encodes the prompt when a slot starts, then only the context's last
      token (the memory was written by older weights: an approximation, horizon_opd/student_memory.py);
    - "grad" (`rolling_context_grad`): the teacher as "both", and the student's loss runs context + chunk with grad
      (full backprop through the context), so its fwd+bwd covers the whole sequence, as OPD's does."""
    if cache not in CACHES:
        raise ValueError(f"cache={cache!r}: use one of {CACHES}")
    context = prompt + depth
    if cache == "none":
        teacher = context + chunk
    else:
        teacher = prompt + chunk if depth == 0 else chunk + 1
    nograd = 0 if cache in ("both", "memory", "grad") else max(context - 1, 0)
    prefill = context if cache != "memory" or depth == 0 else 1
    grad = context + chunk if cache == "grad" else chunk + 1
    return StepShape(batch, chunk, context, batch * chunk, batch * chunk, batch * prefill, batch * nograd,
                     batch * grad, batch * teacher)


def rolling_cycle(batch: int, prompt: int, length: int, ratio: float, cache: str = "both") -> list[StepShape]:
    """One rollout's life under rolling: chunks of c = ceil(ratio L) at depths 0, c, 2c, ... (the last one shorter);
    every step of the cycle once, so their mean is the mean over a run whether rollouts are in phase or staggered
    (staggered, a step waits on its longest chunk: c every step, a little above the mean)."""
    chunk = ratio_to_tokens(ratio, length)
    return [rolling_step(batch, prompt, depth, min(chunk, length - depth), cache) for depth in range(0, length, chunk)]


def wide_batch(batch: int, ratio: float) -> int:
    """ceil(B / rho): the prompts (slots) a wide method runs per step, OPD's tokens per update in chunks of rho L
    (as horizon_opd.demo.compare's `<method>-wide<rho>`; rounded first: 32 / 0.1 is 320.00000000000006)."""
    return math.ceil(round(batch / ratio, 6))


def step_seconds(shape: StepShape, student: Model, teacher: Model, rates: Rates) -> dict:
    """The predicted seconds of one step, by term (see the module docstring), and their total."""
    out = {
        "decode": rates.decode_seconds(student, shape.batch, shape.decode_start_context, shape.decode_iterations),
        "prefill": rates.flops_seconds(forward_flops(student, shape.prefill_tokens, 0), "student_forward"),
        "student_context": rates.flops_seconds(forward_flops(student, shape.student_context_tokens, 0),
                                               "student_forward"),
        "student_train": rates.flops_seconds(train_flops(student, shape.student_train_tokens,
                                                         shape.trained_positions), "student_train"),
        "teacher": rates.flops_seconds(forward_flops(teacher, shape.teacher_tokens, shape.trained_positions),
                                       "teacher_forward"),
        "optimizer": rates.optimizer_seconds(student),
    }
    out["step"] = sum(out.values())
    return out


def step_flops(shape: StepShape, student: Model, teacher: Model) -> float:
    """All FLOPs of a step: what a compute-bound machine pays."""
    return (forward_flops(student, shape.prefill_tokens + shape.student_context_tokens, 0)
            + forward_flops(student, 0, shape.generated_tokens)  # each new token's LM head ...
            + forward_flops(student, shape.generated_tokens, 0)  # ... and backbone
            + train_flops(student, shape.student_train_tokens, shape.trained_positions)
            + forward_flops(teacher, shape.teacher_tokens, shape.trained_positions))


# ------------------------------------------------------------------------------------------------ methods
def torch_free_module(name: str):
    """horizon_opd/<name>.py, loaded from its file: the package's __init__ imports torch, `horizon` and `to_target`
    do not, so the cost model and the to-target tables run in seconds, beside a training run, without slowing it."""
    path = os.path.join(ROOT, "horizon_opd", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_horizon_opd_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module


def ratio_to_tokens(ratio: float, length: int) -> int:
    """ceil(ratio * L) in [1, L], as horizon_opd.horizon.ratio_to_tokens."""
    return min(length, max(1, math.ceil(round(ratio * length, 9))))


@dataclass
class Method:
    name: str
    shapes: list  # StepShape per step (or per phase of rolling's cycle); the method's cost is their mean
    source: str  # where the schedule comes from


def demo_adaptive_ratios(path: str = DEMO_RESULTS, name: str = "Adaptive 0.1-1") -> tuple[list[float], str] | None:
    """The adaptive policy's horizons as the demo measured them (all seeds), as ratios of its L: ceil(0.1 L) reads as
    0.1 and L as 1 (the policy's bounds), any other h as h / L."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        results = json.load(f)
    runs = [m for m in results.get("methods", []) if m.get("name") == name]
    if not runs:
        return None
    L = runs[0]["horizon"].get("max_completion_length") or results["settings"]["max_completion_length"]
    low = ratio_to_tokens(runs[0]["horizon"].get("adaptive_min_ratio", 0.1), L)
    ratios = [0.1 if h == low else 1.0 if h == L else h / L for run in runs for h in run["horizons"]]
    return ratios, (f"measured: the demo's adaptive horizons ({len(runs)} seeds x {len(runs[0]['horizons'])} steps, "
                    f"L = {L})")


def methods(batch: int, prompt: int, length: int, rho: float = 0.1, steps: int = 100,
            demo_results: str = DEMO_RESULTS) -> list[Method]:
    """The methods of the demo's table (its settings), plus rolling, at full horizon `length`, over a run of `steps`;
    then the wide methods, on ceil(B / rho) prompts (slots) per step: OPD's tokens per update at a chunk's decode
    iterations."""
    h = torch_free_module("horizon")

    def scheduled(name, policy, source):
        horizons = [h.horizon_at(s, steps, policy) for s in range(steps)]
        return Method(name, [standard_step(batch, prompt, x) for x in horizons], source)

    out = [
        scheduled("OPD", h.HorizonPolicy(max_completion_length=length), "horizon L (definition)"),
        scheduled(f"TOPD rho={rho:g}", h.TruncatedHorizon(max_completion_length=length, truncation_ratio=rho),
                  "ceil(rho L) (definition)"),
        scheduled("POPD linear 0.1->1", h.ProgressiveHorizon(max_completion_length=length),
                  f"the library's linear schedule over {steps} steps"),
        scheduled(f"Anchored rho={rho:g} every 10",
                  h.AnchoredHorizon(max_completion_length=length, truncation_ratio=rho, anchor_every=10),
                  "the library's schedule (L every 10th step)"),
    ]
    adaptive = demo_adaptive_ratios(demo_results)
    if adaptive:
        ratios, source = adaptive
        out.append(Method("Adaptive 0.1-1", [standard_step(batch, prompt, ratio_to_tokens(r, length)) for r in ratios],
                          source))
    wide, chunk = wide_batch(batch, rho), ratio_to_tokens(rho, length)
    out += [
        Method(f"Rolling rho={rho:g}", rolling_cycle(batch, prompt, length, rho),
               "chunk ceil(rho L), depths 0, c, 2c, ...; each context encoded once per step per model (as built)"),
        Method(f"Rolling rho={rho:g}, context with grad", rolling_cycle(batch, prompt, length, rho, cache="grad"),
               "as rolling, the loss backpropagating through each context (rolling_context_grad)"),
        Method(f"TOPD rho={rho:g} wide", [standard_step(wide, prompt, chunk)],
               f"ceil(B / rho) = {wide} prompts, horizon ceil(rho L) (definition)"),
        Method(f"Rolling rho={rho:g} wide", rolling_cycle(wide, prompt, length, rho),
               f"ceil(B / rho) = {wide} slots, each context encoded once per step per model (as built)"),
        Method(f"Rolling rho={rho:g} wide, student memory", rolling_cycle(wide, prompt, length, rho, cache="memory"),
               f"ceil(B / rho) = {wide} slots, generation continuing from each slot's kept keys and values "
               f"(rolling_student_memory: no context re-encoded)"),
        Method(f"Rolling rho={rho:g} wide, context with grad", rolling_cycle(wide, prompt, length, rho, cache="grad"),
               f"ceil(B / rho) = {wide} slots, the loss backpropagating through each context (rolling_context_grad)"),
        Method(f"Rolling rho={rho:g} wide, teacher cache only", rolling_cycle(wide, prompt, length, rho,
                                                                             cache="teacher"),
               f"ceil(B / rho) = {wide} slots, the student re-encoding its contexts for the loss (vLLM generation)"),
        Method(f"Rolling rho={rho:g} wide, uncached", rolling_cycle(wide, prompt, length, rho, cache="none"),
               f"ceil(B / rho) = {wide} slots, both caches off: the teacher and the loss re-encode every context"),
    ]
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def evaluate(method: Method, student: Model, teacher: Model, rates: Rates) -> dict:
    """The method's mean counts and predicted seconds per step."""
    seconds = [step_seconds(s, student, teacher, rates) for s in method.shapes]
    row = {"method": method.name, "source": method.source, "batch": method.shapes[0].batch}
    for key in ("decode_iterations", "generated_tokens", "trained_positions", "prefill_tokens",
                "student_train_tokens", "teacher_tokens"):
        row[key] = _mean(getattr(s, key) for s in method.shapes)
    row["student_nograd_tokens"] = _mean(s.prefill_tokens + s.student_context_tokens for s in method.shapes)
    row["flops"] = _mean(step_flops(s, student, teacher) for s in method.shapes)
    for key in seconds[0]:
        row[key] = _mean(s[key] for s in seconds)
    # a ratio of means: over a run, seconds spent per position trained on (what an OPD-equivalent update costs)
    row["seconds_per_trained"] = row["step"] / row["trained_positions"]
    return row


def cache_memory(scenario: "Scenario") -> list[dict]:
    """The keys and values each cache holds: tokens x the model's KV bytes per token (layers x 2 x kv_heads x
    head_dim x dtype bytes: 57,344 for Qwen2.5-7B in bf16, 28,672 for Qwen2.5-1.5B). Rolling's teacher cache holds
    each slot's prompt + chunks so far from one step to the next; generation's student cache lives within a step.
    "mean": slots at staggered depths, the run's steady state (the library's pool staggers them); "peak": every
    slot at its last chunk at once (slots in phase)."""
    s = scenario
    wide, chunk = wide_batch(s.batch, s.rho), ratio_to_tokens(s.rho, s.length)

    def held(cycle):  # tokens a slot holds once its chunk is encoded: prompt + depth + chunk
        return _mean(c.decode_start_context + c.decode_iterations for c in cycle), s.prompt + s.length

    rolling = held(rolling_cycle(1, s.prompt, s.length, s.rho))
    cases = [(f"Rolling rho={s.rho:g} wide", "teacher, kept across steps", s.teacher, wide, rolling),
             (f"Rolling rho={s.rho:g} wide", "student, in generate", s.student, wide, rolling),
             (f"Rolling rho={s.rho:g} wide, student memory", "student, kept across steps", s.student, wide, rolling),
             (f"Rolling rho={s.rho:g}", "teacher, kept across steps", s.teacher, s.batch, rolling),
             (f"TOPD rho={s.rho:g} wide", "student, in generate", s.student, wide, (s.prompt + chunk,) * 2),
             ("OPD", "student, in generate", s.student, s.batch, (s.prompt + s.length,) * 2)]
    return [{"method": method, "cache": cache, "slots": slots, "tokens_per_slot": mean, "peak_tokens_per_slot": peak,
             "bytes_per_token": model.kv_bytes_per_token, "bytes": slots * mean * model.kv_bytes_per_token,
             "peak_bytes": slots * peak * model.kv_bytes_per_token}
            for method, cache, model, slots, (mean, peak) in cases]


# ------------------------------------------------------------------------------------------------ tables
@dataclass
class Scenario:
    batch: int = 64  # rollouts per optimizer step (assumed)
    prompt: int = 256  # prompt tokens (assumed)
    length: int = 1024  # L
    rho: float = 0.1
    steps: int = 100
    student: Model = STUDENT
    teacher: Model = TEACHER
    assumptions: Assumptions = field(default_factory=Assumptions)


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,.0f}"


def _f(x, digits=2):
    return "–" if x is None else f"{x:,.{digits}f}"


def counts_table(rows: list[dict]) -> list[str]:
    opd = rows[0]
    lines = ["| method | rollouts (slots) / step | decode iterations | tokens generated | trained positions | "
             "student tokens fwd+bwd | student tokens no-grad (prefill + context) | teacher tokens | "
             "tokens vs OPD (CPU view) | decode iterations vs OPD (GPU view) | FLOPs vs OPD |", "|---|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['method']} | {r['batch']} | {_f(r['decode_iterations'], 0)} | "
                     f"{_f(r['generated_tokens'], 0)} | {_f(r['trained_positions'], 0)} | "
                     f"{_f(r['student_train_tokens'], 0)} | {_f(r['student_nograd_tokens'], 0)} | "
                     f"{_f(r['teacher_tokens'], 0)} | {r['generated_tokens'] / opd['generated_tokens']:.3f} | "
                     f"{r['decode_iterations'] / opd['decode_iterations']:.3f} | {r['flops'] / opd['flops']:.3f} |")
    return lines


def seconds_table(columns: list[tuple[str, list[dict]]]) -> list[str]:
    """The first column's breakdown, then each column's step seconds and ratio to OPD."""
    first = columns[0][1]
    head = ["method", "decode", "student no-grad (prefill + context)", "student fwd+bwd", "teacher fwd", "optimizer"]
    head += [f"{name}: step s (vs OPD)" for name, _ in columns]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---|" * (len(head) - 1)]
    for i, r in enumerate(first):
        cells = [r["method"], _f(r["decode"]), _f(r["prefill"] + r["student_context"]), _f(r["student_train"]),
                 _f(r["teacher"]), _f(r["optimizer"], 3)]
        for _, rows in columns:
            cells.append(f"{rows[i]['step']:.2f} ({rows[i]['step'] / rows[0]['step']:.3f})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def per_token_table(columns: list[tuple[str, list[dict]]]) -> list[str]:
    """Each column's seconds per 1,000 trained positions and ratio to OPD's: the price of an OPD-equivalent update."""
    head = ["method", "trained positions / step"] + [f"{name}: s per 1k trained (vs OPD)" for name, _ in columns]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---|" * (len(head) - 1)]
    for i, r in enumerate(columns[0][1]):
        cells = [r["method"], _f(r["trained_positions"], 0)]
        for _, rows in columns:
            per, opd = rows[i]["seconds_per_trained"], rows[0]["seconds_per_trained"]
            cells.append(f"{per * 1e3:.3f} ({per / opd:.3f})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def memory_table(rows: list[dict]) -> list[str]:
    lines = ["| method | KV cache | slots | tokens per slot, mean (peak) | KV bytes per token | GB, mean (peak) | "
             f"of an H100's {GPUS['H100'].memory_bytes / 1e9:g} GB / an H200's {GPUS['H200'].memory_bytes / 1e9:g} "
             "GB, mean |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['cache']} | {r['slots']} | {r['tokens_per_slot']:,.0f} "
                     f"({r['peak_tokens_per_slot']:,}) | {r['bytes_per_token']:,} | {r['bytes'] / 1e9:.1f} "
                     f"({r['peak_bytes'] / 1e9:.1f}) | {r['bytes'] / GPUS['H100'].memory_bytes:.2f} / "
                     f"{r['bytes'] / GPUS['H200'].memory_bytes:.2f} |")
    return lines


def predict(scenario: Scenario, rates: Rates, demo_results: str = DEMO_RESULTS) -> list[dict]:
    ms = methods(scenario.batch, scenario.prompt, scenario.length, scenario.rho, scenario.steps, demo_results)
    return [evaluate(m, scenario.student, scenario.teacher, rates) for m in ms]


ESR = {"short_tokens": 100, "long_tokens": 1000, "short_s": 8.0, "long_s": 194.0, "gpu": "A6000",
       "source": "ESR (arXiv 2605.27028): 194 s vs 8 s per step for ~1000- vs 100-token rollouts on one RTX A6000"}


def esr_check(student: Model = STUDENT, teacher: Model = TEACHER, prompts=(64, 256),
              batches=(8, 64)) -> tuple[list[str], list[dict]]:
    """What the model predicts for ESR's published comparison (one RTX A6000, ~1000- vs 100-token rollouts, 194 s vs
    8 s per step: 24x for 10x the tokens), with this project's 1.5B/7B pair: ESR's models, batch, prompts and
    generation engine are not inputs we have, so the rows span the assumed ones."""
    gpu = GPUS[ESR["gpu"]]
    rows = []
    for engine, floor in (("bandwidth-bound engine", 0.0), (f"HF eager, {HF_EAGER_FLOOR_S * 1e3:g} ms floor",
                                                            HF_EAGER_FLOOR_S)):
        rates = Rates(gpu, Assumptions(decode_floor_s=floor))
        for batch in batches:
            for prompt in prompts:
                short = step_seconds(standard_step(batch, prompt, ESR["short_tokens"]), student, teacher, rates)
                long = step_seconds(standard_step(batch, prompt, ESR["long_tokens"]), student, teacher, rates)
                rows.append({"engine": engine, "batch": batch, "prompt": prompt, "short": short["step"],
                             "long": long["step"], "ratio": long["step"] / short["step"],
                             "decode_ratio": long["decode"] / short["decode"]})
    lines = ["| A6000, model: engine | rollouts / step | prompt tokens | step at 100 tokens (s) | "
             "step at 1000 tokens (s) | ratio | decode-only ratio |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['batch']} | {r['prompt']} | {r['short']:.2f} | {r['long']:.2f} | "
                     f"{r['ratio']:.1f}x | {r['decode_ratio']:.1f}x |")
    lines.append(f"| ESR, measured (their models and batch) | ? | ? | {ESR['short_s']:g} | {ESR['long_s']:g} | "
                 f"{ESR['long_s'] / ESR['short_s']:.0f}x | – |")
    return lines, rows


REAL_MODEL_RESULTS = os.path.join(ROOT, "examples", "real_model", "results.json")


MEASURED_COUNTS = ("prompts_started", "prefill_tokens", "student_nograd_tokens", "student_grad_tokens",
                   "teacher_tokens")  # horizon_opd.monitor.COUNTERS, as a run record's "counts" holds them


def _pooled_counts(all_runs: list[dict], settings: dict, label, file: str) -> list[dict]:
    """One counts row per method of a results file, its seeds pooled, per step: decode iterations, tokens generated
    and trained, the fill, and, where every run recorded its "counts" (files from before the counters have none:
    None), what each forward encoded. `measured` names the figures the runs recorded. `label(batch, seeds)` names
    the row's run, `file` its results file."""
    L = settings["max_completion_length"]
    rows = []
    for name in dict.fromkeys(m["name"] for m in all_runs):
        runs = [m for m in all_runs if m["name"] == name]
        batch = runs[0].get("batch_size") or settings["batch_size"]
        steps = sum(len(m["horizons"]) for m in runs)
        recorded = all(m.get("decode_iterations") is not None for m in runs)
        counted = all("counts" in m for m in runs)
        decode = sum(m["decode_iterations"] if recorded else sum(m["horizons"]) for m in runs) / steps
        tokens = sum(m["tokens_generated"] for m in runs) / steps
        trained = all("trained_tokens" in m for m in runs)
        row = {"run": label(batch, len(runs)), "file": file, "method": name, "batch": batch,
               "decode_iterations": decode, "decode_recorded": recorded, "tokens": tokens,
               "trained": sum(m["trained_tokens"] for m in runs) / steps if trained else None,
               "fill": tokens / (batch * sum(sum(m["horizons"]) for m in runs) / steps), "L": L,
               "measured": [key for key, have in (("tokens_generated", True), ("decode_iterations", recorded),
                                                  ("trained_tokens", trained)) if have]}
        for key in MEASURED_COUNTS:
            row[key] = sum(m["counts"][key] for m in runs) / steps if counted else None
        if counted:
            row["measured"] += MEASURED_COUNTS
        rows.append(row)
    return rows


def measured_shape(row: dict) -> StepShape | None:
    """A `measured_counts` row's mean step as a `StepShape`, every count measured (None without the run's "counts"):
    decoding starts at the mean context generation encoded (prefill tokens / rollouts)."""
    if row["prefill_tokens"] is None or row["trained"] is None or not row["decode_recorded"]:
        return None
    return StepShape(row["batch"], round(row["decode_iterations"]), round(row["prefill_tokens"] / row["batch"]),
                     row["tokens"], row["trained"], row["prefill_tokens"], row["student_nograd_tokens"],
                     row["student_grad_tokens"], row["teacher_tokens"])


def measured_counts(demo: str = DEMO_RESULTS, real_model: str = REAL_MODEL_RESULTS,
                    priced: tuple[Model, Model, Rates] | None = None) -> tuple[list[str], list[dict]]:
    """The per-method counts the training runs measured (their results.json): decode iterations per step (recorded
    by the trainer's `CostLedger` where the file has them, else the step's horizon, an upper bound), tokens generated
    and trained per step, the fill (tokens / (rollouts x horizon): 1 when every rollout reaches the horizon) and,
    from files whose runs carry "counts", the tokens each forward encoded per step. With `priced` (student, teacher,
    rates), a row with every count measured is priced as is (`measured_shape`): seconds per trained position against
    its file's OPD's; the rows of an older file are not priced."""
    rows = []
    if os.path.exists(demo):
        with open(demo) as f:
            results = json.load(f)
        L = results["settings"]["max_completion_length"]
        rows += _pooled_counts(results["methods"], results["settings"], lambda batch, seeds:
                               f"demo (L = {L}, {batch} rollouts, {seeds} seeds)", demo)
    if os.path.exists(real_model):
        with open(real_model) as f:
            results = json.load(f)
        L = results["settings"]["max_completion_length"]
        # the per-(method, seed) format lists "runs" with their own batch and cost ledger; the older one "methods"
        runs = results["runs"] if "runs" in results else list(results["methods"].values())
        rows += _pooled_counts(runs, results["settings"], lambda batch, seeds:
                               f"real model (SmolLM2, L = {L}, {batch} rollouts, {seeds} "
                               f"seed{'s' if seeds > 1 else ''})", real_model)
    if priced:
        opd = {}  # per file, OPD's seconds per trained position
        for r in rows:
            shape = measured_shape(r)
            r["seconds_per_trained"] = (None if shape is None else
                                        step_seconds(shape, *priced)["step"] / shape.trained_positions)
            if r["method"] == "OPD":
                opd[r["file"]] = r["seconds_per_trained"]
        for r in rows:
            base = opd.get(r["file"])
            r["vs_opd"] = r["seconds_per_trained"] / base if base and r["seconds_per_trained"] else None
    lines = ["| run (measured) | method | decode iterations / step | of L | tokens generated / step | fill | "
             "trained / step | prefill / step | student no-grad / step | student grad / step | teacher / step | "
             "s per 1k trained, priced (vs OPD) |", "|---|" + "---|" * 11]
    for r in rows:
        mark = "" if r["decode_recorded"] else " (horizon)"
        price = "–" if r.get("seconds_per_trained") is None else (
            f"{r['seconds_per_trained'] * 1e3:.3f}" + (f" ({r['vs_opd']:.3f})" if r.get("vs_opd") else ""))
        lines.append(f"| {r['run']} | {r['method']} | {r['decode_iterations']:.1f}{mark} | "
                     f"{r['decode_iterations'] / r['L']:.3f} | {r['tokens']:.0f} | {r['fill']:.3f} | "
                     f"{_f(r['trained'], 0)} | {_f(r['prefill_tokens'], 0)} | {_f(r['student_nograd_tokens'], 0)} | "
                     f"{_f(r['student_grad_tokens'], 0)} | {_f(r['teacher_tokens'], 0)} | {price} |")
    return lines, rows


LATEST = os.path.join(HERE, "results", "latest.json")


def cpu_check(path: str = LATEST) -> tuple[list[str], list[dict]] | None:
    """The CPU benchmark (measured, benchmarks/results/latest.json) against the model's two views: measured step time
    of each horizon as a fraction of `full`'s, next to the fractions of tokens, decode iterations and FLOPs."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        results = json.load(f)
    preset, steps = results.get("preset"), results.get("steps", {})
    if not preset or "full" not in steps:
        return None
    vocab, batch, prompt = preset["vocab_size"], preset["batch_size"], preset["prompt_tokens"]
    student = qwen2_model("cpu student", vocab, *preset["student"], dtype_bytes=4)
    teacher = qwen2_model("cpu teacher", vocab, *preset["teacher"], dtype_bytes=4)
    full = steps["full"]
    L = full["horizon_tokens"]
    rows = []
    for config in ("truncated_0.1", "truncated_0.25", "truncated_0.5", "full"):
        if config not in steps:
            continue
        r = steps[config]
        h = r["horizon_tokens"]
        rows.append({"config": config, "horizon": h, "step": r["median"]["step"] / full["median"]["step"],
                     "rollout": r["median"]["generation"] / full["median"]["generation"],
                     "tokens": r["median"]["tokens"] / full["median"]["tokens"], "decode_iterations": h / L,
                     "flops": step_flops(standard_step(batch, prompt, h), student, teacher)
                     / step_flops(standard_step(batch, prompt, L), student, teacher)})
    lines = ["| CPU benchmark (measured) | horizon | step vs full | rollout vs full | tokens vs full | "
             "decode iterations vs full | FLOPs vs full (model) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['horizon']} | {r['step']:.3f} | {r['rollout']:.3f} | {r['tokens']:.3f} | "
                     f"{r['decode_iterations']:.3f} | {r['flops']:.3f} |")
    return lines, rows


def sensitivity(scenario: Scenario, gpu: GPU, batches=(8, 64, 256), prompts=(64, 256, 1024)) -> list[str]:
    """TOPD's and rolling's step time as a fraction of OPD's, over the two assumed inputs that move it most."""
    lines = ["| rollouts / step | prompt tokens | TOPD / OPD, engine | TOPD / OPD, HF eager | rolling / OPD, engine | "
             "rolling / OPD, HF eager |", "|---|---|---|---|---|---|"]
    for batch in batches:
        for prompt in prompts:
            cells = []
            for floor in (0.0, HF_EAGER_FLOOR_S):
                rates = Rates(gpu, replace(scenario.assumptions, decode_floor_s=floor))
                opd = step_seconds(standard_step(batch, prompt, scenario.length), scenario.student, scenario.teacher,
                                   rates)["step"]
                topd = step_seconds(standard_step(batch, prompt, ratio_to_tokens(scenario.rho, scenario.length)),
                                    scenario.student, scenario.teacher, rates)["step"]
                rolling = _mean(step_seconds(s, scenario.student, scenario.teacher, rates)["step"]
                                for s in rolling_cycle(batch, prompt, scenario.length, scenario.rho))
                cells.append((topd / opd, rolling / opd))
            lines.append(f"| {batch} | {prompt} | {cells[0][0]:.3f} | {cells[1][0]:.3f} | {cells[0][1]:.3f} | "
                         f"{cells[1][1]:.3f} |")
    return lines


def report(scenario: Scenario, measured: dict | None = None, demo_results: str = DEMO_RESULTS,
           lengths: tuple[int, ...] | None = None) -> tuple[str, dict]:
    """The markdown of the model's tables, and their rows: per full horizon in `lengths` (default: the scenario's),
    the counts, the step seconds, the seconds per trained position and the caches' memory; then, once, the checks.
    With `measured` (gpu.py's `costs`), the measured rates replace the assumed ones and the measured models' shapes
    replace the default pair."""
    if measured:
        gpu = gpu_for(measured.get("device")) or GPUS["H100"]
        student = Model(**measured["models"]["student"])
        teacher = Model(**measured["models"]["teacher"])
        scenario = replace(scenario, student=student, teacher=teacher)
        columns = [(f"{measured.get('device', 'GPU')} measured", Rates(gpu, scenario.assumptions, measured))]
    else:
        a = scenario.assumptions
        columns = [("H100 engine", Rates(GPUS["H100"], a)),
                   ("H100 HF eager", Rates(GPUS["H100"], replace(a, decode_floor_s=HF_EAGER_FLOOR_S))),
                   ("H200 engine", Rates(GPUS["H200"], a))]
    s = scenario
    dtype = {2: "bf16", 4: "fp32"}.get(s.student.dtype_bytes, f"{s.student.dtype_bytes}-byte weights")
    lines, tables = [], []
    for length in lengths or (s.length,):
        at = replace(s, length=length)
        predicted = [(name, predict(at, rates, demo_results)) for name, rates in columns]
        memory = cache_memory(at)
        lines += [f"**L = {length}.** Student {s.student.name} ({_count(s.student.params)} parameters read per decode "
                  f"iteration), teacher {s.teacher.name} ({_count(s.teacher.params)}), {dtype}, B = {s.batch} rollouts "
                  f"per step (the wide methods {wide_batch(s.batch, s.rho)}), prompt {s.prompt} tokens, L = {length}, "
                  f"rho = {s.rho:g}; schedules over {s.steps} steps.", "",
                  "Per step (means over the schedule; tokens summed over the batch):", ""]
        lines += counts_table(predicted[0][1])
        lines += ["", "Predicted seconds per step (the breakdown is the first column's):", ""]
        lines += seconds_table(predicted)
        lines += ["", "Predicted seconds per 1,000 trained positions (a ratio of means over the run):", ""]
        lines += per_token_table(predicted)
        lines += ["", "The KV caches' memory (the teacher's kept across steps; the student's within a step):", ""]
        lines += memory_table(memory) + [""]
        tables.append({"length": length, "columns": {name: rows for name, rows in predicted}, "cache_memory": memory})
    lines += ["Rates: " + "; ".join(f"{k}: {v}" for k, v in columns[0][1].sources().items()), ""]
    payload = {"scenario": {"batch": s.batch, "prompt": s.prompt, "lengths": [t["length"] for t in tables],
                            "rho": s.rho, "steps": s.steps, "student": s.student.__dict__,
                            "teacher": s.teacher.__dict__, "assumptions": s.assumptions.__dict__},
               "tables": tables, "sources": {name: rates.sources() for name, rates in columns}}
    if not measured:
        lines += [f"Sensitivity (H100, L = {s.length}, rolling with its teacher cache) to the batch and the prompt "
                  "length (both assumed):", ""]
        lines += sensitivity(s, GPUS["H100"]) + [""]
        esr_lines, esr_rows = esr_check(s.student, s.teacher)
        lines += ["Check against ESR's published ratio (a full-horizon step at 100 vs 1000 tokens; the model at this "
                  "pair):", ""]
        lines += esr_lines + [""]
        payload["esr"] = esr_rows
        counts_lines, counts_rows = measured_counts(demo_results, priced=(s.student, s.teacher, columns[0][1]))
        if counts_rows:
            lines += ["The counts as the training runs measured them, per step (fill = tokens / (rollouts x horizon); "
                      "\"(horizon)\": the file predates the recorded decode iterations, so the step's horizon, an "
                      "upper bound, stands in; \"–\": the file predates the forwards' counters; priced: the run's "
                      f"measured counts at this pair on the {columns[0][0]} rates, against its file's OPD):", ""]
            lines += counts_lines + [""]
            payload["measured_counts"] = counts_rows
        cpu = cpu_check()
        if cpu:
            lines += ["Check against the CPU benchmark (measured: benchmarks/results/latest.json; FLOPs from the "
                      "model at its shapes):", ""]
            lines += cpu[0] + [""]
            payload["cpu_check"] = cpu[1]
    return "\n".join(lines), payload


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=Scenario.batch, help="rollouts per optimizer step (assumed)")
    parser.add_argument("--prompt", type=int, default=Scenario.prompt, help="prompt tokens (assumed)")
    parser.add_argument("--length", type=int, nargs="+", default=[1024, 4096],
                        help="full horizon L; several: a set of tables per L")
    parser.add_argument("--rho", type=float, default=Scenario.rho)
    parser.add_argument("--steps", type=int, default=Scenario.steps, help="run length the schedules are averaged over")
    parser.add_argument("--bandwidth-efficiency", type=float, default=Assumptions.bandwidth_efficiency)
    parser.add_argument("--mfu", type=float, default=Assumptions.mfu)
    parser.add_argument("--measured", default=None, help="gpu.py's results JSON (or bench_costs.py's): the measured "
                                                         "rates replace the assumed ones")
    parser.add_argument("--demo-results", default=DEMO_RESULTS, help="results.json with the adaptive schedule")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    measured = None
    if args.measured:
        with open(args.measured) as f:
            loaded = json.load(f)
        measured = loaded if loaded.get("kind") == "costs" else loaded.get("costs")  # bench_costs.py's, or gpu.py's
        if not measured:
            print(f"gpu_model.py: {args.measured} holds no measured `costs` (run gpu.py on a CUDA machine)",
                  file=sys.stderr)
            return 2
    scenario = Scenario(args.batch, args.prompt, args.length[0], args.rho, args.steps,
                        assumptions=Assumptions(args.bandwidth_efficiency, args.mfu))
    text, payload = report(scenario, measured, args.demo_results, tuple(args.length))
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
