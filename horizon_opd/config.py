import dataclasses
import os
import warnings
from dataclasses import dataclass, field

from trl import DistillationConfig

from .horizon import HORIZON_POLICIES, HorizonPolicy, horizon_settings
from .loss import check_loss_window
from .rollout import WARMUPS

LOSS_TYPES = ("reverse_kl", "sampled", "sequence", "topk_reverse_kl")
# What each loss needs from a teacher served over HTTP: the actual tokens' log-probs, or the teacher's top-k as well.
REMOTE_LOSS_TYPES = ("sampled", "sequence", "topk_reverse_kl")
# Sampling settings that change the distribution rollouts are drawn from. The loss scores softmax(logits / temperature)
# over the whole vocabulary, so any of these makes the rollouts come from another distribution than the one it assumes.
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "do_sample")


def _bf16_accelerator_available() -> bool:
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return is_torch_bf16_gpu_available() or is_torch_xla_available()


def _copy_field(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return field(default_factory=f.default_factory, metadata=f.metadata)
    return field(default=f.default, metadata=f.metadata)


# The horizon policies' settings (declared with the policies in horizon.py, once) as config fields and CLI flags.
HorizonSettings = dataclasses.make_dataclass(
    "HorizonSettings", [(f.name, f.type, _copy_field(f)) for f in horizon_settings()]
)


@dataclass
class HorizonOPDConfig(DistillationConfig, HorizonSettings):
    r"""
    Configuration class for the [`HorizonOPDTrainer`].

    Extends [`~trl.DistillationConfig`] with the rollout horizon of on-policy distillation (OPD), following "Are Full
    Rollouts Necessary for On-Policy Distillation?" (arXiv 2605.31490). `max_completion_length` is the full horizon L;
    the fields below decide how much of it the student generates at each optimizer step. Every other field is TRL's.

    Parameters:
        > Parameters that control the rollout horizon

        horizon (`str`, *optional*, defaults to `"full"`):
            The horizon policy: `"full"` (OPD), `"truncated"` (TOPD: ceil(truncation_ratio * L) tokens for all of
            training), `"progressive"` (POPD: grows from a short prefix to L), `"anchored"` (TOPD plus a full-horizon
            step every `anchor_every` steps) or `"adaptive"` (full-horizon probes measure where the student drifts and
            set the horizon in between). Each policy's settings (`truncation_ratio`, `progressive_*`, `anchor_every`,
            `adaptive_*`) are declared with the policy in `horizon_opd/horizon.py`, where their help text lives;
            `HorizonOPDConfig` takes them as fields and `--flags`.

        rollout_max_tokens (`int` or `None`, *optional*, defaults to `None`):
            A cut in tokens rather than a ratio (ESR, arXiv 2605.27028, trained on the first N = 100 tokens): every
            rollout ends after at most this many tokens, in any horizon mode (the horizon becomes min(horizon, N);
            with `horizon="rolling"` a rollout ends at N). `None`: rollouts may run to `max_completion_length`.

        rolling_warmup (`str`, *optional*, defaults to `"cut"`):
            How `horizon="rolling"` spreads its slots over the rollout's depths at the start. `"cut"`: every slot starts
            at depth 0 and slot i's first rollout ends early, after n - floor(i n / S) of its n chunks, so by step n
            the depths are spread; nothing extra is generated. `"prefix"`: step 0 generates one prefix per slot (up to
            n - 1 chunks) and slot i keeps floor(i n / S) chunks of it; spread from step 0, at about half a full
            rollout's decode iterations and tokens per slot, once.

        rolling_teacher_cache (`bool`, *optional*, defaults to `True`):
            With `horizon="rolling"` and a local teacher, keep each slot's teacher keys and values across steps (the
            teacher is frozen, so a context encodes to the same values at every step) and run the teacher only on each
            step's new tokens. Costs the teacher's KV memory for every context in flight (`horizon_opd/kv_cache.py`
            gives the sizes); `False` re-encodes each context at every step. Models with sliding-window layers are
            never cached.

        rolling_student_cache (`bool`, *optional*, defaults to `True`):
            With `horizon="rolling"`, the student's loss reads the contexts' keys and values from the step's own
            generation (the same weights wrote them) instead of re-encoding each context without grad. Holds
            generation's KV cache until the step's last micro-batch. Not with vLLM generation (its cache lives in
            another process), where the context is re-encoded.

        rolling_student_memory (`bool`, *optional*, defaults to `False`):
            With `horizon="rolling"`, keep each slot's student keys and values across steps and continue generation
            from them, so no context is re-encoded (Transformer-XL's memory; `horizon_opd/student_memory.py`). An
            approximation: a slot's memory was written by the weights of up to ceil(L / chunk) - 1 steps ago (logged
            as `rolling/memory_age_mean` and `_max`). Needs `rolling_student_cache` (the loss reads the same keys and
            values). On the colocated vLLM engine the memory is the engine's prefix cache, kept across weight syncs
            (TRL resets it at each), so a slot's context blocks serve its next chunk. Not checkpointed: a resumed run
            re-encodes each context once.

        rolling_context_grad (`bool`, *optional*, defaults to `False`):
            With `horizon="rolling"`, the student's loss forward runs each chunk's context with grad, as OPD's forward
            runs the whole rollout: the chunk's loss then also trains the weights through the context's keys and
            values (full backprop instead of truncated). It closed rolling's gap to OPD on the mismatch task
            (docs/results.md, "What rolling's gap is made of"), at the student's fwd+bwd over context + chunk
            instead of chunk + 1 per slot. Not with `rolling_student_memory` (the context is encoded again anyway).

        rolling_memory_refresh_every (`int` or `None`, *optional*, defaults to `None`):
            With `rolling_student_memory`, re-encode a slot's context under the current weights once its oldest kept
            position is this many steps old (1: every step, exact rolling); on vLLM, reset the engine's prefix cache
            every this many steps. `None`: never; a slot's memory ends with its rollout.

        > Parameters that control the loss

        loss_type (`str`, *optional*, defaults to `"reverse_kl"`):
            `"reverse_kl"`: the exact token-level KL(student || teacher) over the vocabulary at every completion
            position (TRL's chunked kernel with beta=1). `"sampled"`: the sampled-token estimator (per-token advantage
            log q(y_t) - log pi(y_t), stop-gradient, policy-gradient surrogate), for teachers that only expose
            log-probs of the sampled tokens. `"sequence"`: sequence-level OPD (the paper's Figs. 3 and 14), the same
            estimator with each token's advantage summed from that position to the end of the rollout (reward-to-go).
            `"topk_reverse_kl"` (remote teacher only): the reverse KL restricted to the teacher's top-`loss_top_k`
            tokens plus one tail bucket holding the rest of both distributions' mass (as TRL's server trainer and
            "Revisiting OPD", arXiv 2603.25562). `"sampled"` and `"sequence"` are unbiased in expectation over the
            rollouts (the log-probs of the actual tokens are exact; the estimate is noisy). `"topk_reverse_kl"` has no
            sampling noise but a downward bias: it is the exact KL between both distributions coarse-grained onto the
            top-k + tail cells, so it never exceeds the full reverse KL and equals it when k covers the vocabulary;
            its gradient is blind to how the teacher spreads the tail.
        loss_window (`list[float]` or `None`, *optional*, defaults to `None`):
            Segment distillation (the paper's Fig. 12): `[start, end]` as fractions of the step's horizon H. Rollouts
            stop at ceil(end * H) tokens and only positions [ceil(start * H), ceil(end * H)) are trained on; the loss
            is still divided by the batch's generated tokens. `None` trains on every generated token.

        > Parameters that control the remote teacher

        teacher_model_server_url (`str`, `dict[str, str]` or `None`, *optional*, defaults to `None`):
            Root URL of a server that scores sequences for the teacher instead of a local `teacher_model` (TRL's
            `ServerDistillationConfig` name): vLLM's OpenAI-compatible server (`vllm serve TEACHER`) or the loopback
            server `python -m horizon_opd.teacher_server`, e.g. `"http://127.0.0.1:8000"`. The trainer posts prompt +
            completion token ids to `/v1/completions` with `prompt_logprobs`, and only the completion tokens each
            step generated are scored, so a shorter horizon also means fewer tokens scored. Needs `loss_type`
            `"sampled"`, `"sequence"` or `"topk_reverse_kl"` (a server returns log-probs, not full distributions)
            and `temperature=1.0` (vLLM computes `prompt_logprobs` at temperature 1). Several teachers: a dict
            `{name: URL}` (a JSON object on the command line), alone or beside a dict `teacher_model` with other
            names; each row's `teacher_id_column` names its teacher.
        teacher_id_column (`str`, *optional*, defaults to `"teacher_id"`):
            With several teachers (a dict `teacher_model` and/or a dict `teacher_model_server_url`), the dataset
            column that names each prompt's teacher (TRL's `AsyncDistillationTrainer` name). Every row must name one
            of the teachers. Not read with one teacher.
        loss_top_k (`int`, *optional*, defaults to `20`):
            k of `"topk_reverse_kl"`: the teacher's top-k tokens asked for at each position. vLLM refuses k above its
            `--max-logprobs` (default 20). The sampled-token losses ask for the actual tokens' log-probs only.
        teacher_server_timeout (`float`, *optional*, defaults to `120.0`):
            Seconds one request to the teacher server may take before it counts as failed.
        teacher_server_max_retries (`int`, *optional*, defaults to `3`):
            Further attempts after a failed request (connection error, timeout, HTTP 408/429/5xx), with exponential
            back-off; then the step fails with an error naming the URL. No partial batch is trained on.
        teacher_server_chunk_size (`int`, *optional*, defaults to `16`):
            Sequences per request; a micro-batch is split into chunks sent concurrently. `0` sends it in one request.

        > Parameters that control the diagnostics

        position_bins (`int`, *optional*, defaults to `8`):
            Number of equal-width bins over the horizon in which the teacher-student reverse KL is logged
            (`kl_by_position/bin_{i}`, token-weighted over each logging window), the paper's Fig. 13. `0` turns it off.
        alarm_factor (`float`, *optional*, defaults to `2.0`):
            The collapse alarm (`horizon/alarm`, `horizon_opd.monitor.CollapseAlarm`) fires when the reverse KL of the
            last quarter of positions of full-horizon rollouts (full, anchor, probe and rolling steps; evaluation),
            read per source once its baseline has settled, stays above `alarm_factor` times its source's best (and
            above 0.1 nats) for two readings in a row.
        alarm_repetition (`float`, *optional*, defaults to `0.5`):
            The alarm also fires when more than this fraction of full-horizon rollouts end in a repeated loop, for two
            readings in a row, and at least half this fraction more than at the start (a student that loops before
            training is not drifting).

    > [!NOTE]
    > `beta` must stay at 1.0 (reverse KL): the horizon methods are defined for the reverse KL, and a silently
    > different divergence would not be the objective this trainer documents. `bf16` follows TRL's default (on) where
    > a bf16 accelerator is present or `use_cpu=True`; left unset on a machine without one, it is off (float32).
    """

    horizon: str = field(
        default="full",
        metadata={"help": "Rollout horizon policy.", "choices": list(HORIZON_POLICIES)},
    )
    rollout_max_tokens: int | None = field(
        default=None,
        metadata={"help": "End every rollout after at most this many tokens, in any horizon mode (e.g. 100)."},
    )
    rolling_warmup: str = field(
        default="cut",
        metadata={"help": "How rolling rollouts spread their depths at the start.", "choices": list(WARMUPS)},
    )
    rolling_teacher_cache: bool = field(
        default=True,
        metadata={"help": "Rolling rollouts: keep each slot's teacher keys and values across steps."},
    )
    rolling_student_cache: bool = field(
        default=True,
        metadata={"help": "Rolling rollouts: the student's loss reads the contexts' keys and values from generation."},
    )
    rolling_student_memory: bool = field(
        default=False,
        metadata={"help": "Rolling rollouts: keep each slot's student keys and values across steps (approximate)."},
    )
    rolling_context_grad: bool = field(
        default=False,
        metadata={"help": "Rolling rollouts: the loss backpropagates through each chunk's context too."},
    )
    rolling_memory_refresh_every: int | None = field(
        default=None,
        metadata={"help": "With rolling_student_memory: re-encode a slot once its memory is this many steps old."},
    )
    loss_type: str = field(
        default="reverse_kl",
        metadata={"help": "Distillation loss.", "choices": list(LOSS_TYPES)},
    )
    loss_window: list[float] | None = field(
        default=None,
        metadata={"help": "Train only on positions [start, end) of the horizon, as two fractions, e.g. 0.5 1.0."},
    )
    teacher_model_server_url: dict[str, str] | str | None = field(
        default=None,
        metadata={"help": "URL of a teacher server (vLLM /v1/completions with prompt_logprobs) used instead of a local "
                          "teacher, e.g. http://127.0.0.1:8000; several teachers: a JSON object {name: URL}."},
    )
    teacher_id_column: str = field(
        default="teacher_id",
        metadata={"help": "Several teachers: the dataset column naming each prompt's teacher."},
    )
    loss_top_k: int = field(
        default=20,
        metadata={"help": "k of loss_type='topk_reverse_kl': teacher top-k log-probs asked for per position."},
    )
    teacher_server_timeout: float = field(
        default=120.0,
        metadata={"help": "Seconds one request to the teacher server may take."},
    )
    teacher_server_max_retries: int = field(
        default=3,
        metadata={"help": "Retries of a failed request to the teacher server before the step fails."},
    )
    teacher_server_chunk_size: int = field(
        default=16,
        metadata={"help": "Sequences per request to the teacher server; 0 sends a micro-batch in one request."},
    )
    position_bins: int = field(
        default=8,
        metadata={"help": "Bins over the horizon for the per-position reverse-KL diagnostic; 0 disables it."},
    )
    alarm_factor: float = field(
        default=2.0,
        metadata={"help": "Collapse alarm: late-position full-horizon KL above alarm_factor x its best, twice."},
    )
    alarm_repetition: float = field(
        default=0.5,
        metadata={"help": "Collapse alarm: fraction of full-horizon rollouts ending in a repeated loop, in (0, 1]."},
    )

    def __post_init__(self):
        if self.bf16 is None and not self.fp16 and not self.use_cpu and not _bf16_accelerator_available():
            # TRL defaults bf16 to True, which transformers rejects on a machine without a bf16 GPU unless use_cpu is
            # set; fall back to float32 there so the same script runs on a laptop.
            self.bf16 = False
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} is unknown; choose one of {list(LOSS_TYPES)}.")
        if self.beta != 1.0:
            raise ValueError(
                f"beta={self.beta!r}: HorizonOPDTrainer trains the reverse KL (beta=1.0). Leave beta at 1.0, or use "
                f"trl.DistillationTrainer for forward KL / JSD."
            )
        if self.loss_window is not None:
            self.loss_window = list(check_loss_window(self.loss_window))
            if self.horizon == "adaptive" and self.loss_window[1] < 1.0:
                raise ValueError(f"loss_window={self.loss_window} with horizon='adaptive': rollouts stop at the "
                                 f"window's end, so the adaptive probes never reach the full horizon they measure. "
                                 f"End the window at 1.0, or use another horizon.")
        if isinstance(self.position_bins, bool) or not isinstance(self.position_bins, int) or self.position_bins < 0:
            raise ValueError(f"position_bins={self.position_bins!r} must be an integer >= 0 (0 disables the metric).")
        if not (isinstance(self.alarm_factor, int | float) and self.alarm_factor > 1.0):
            raise ValueError(f"alarm_factor={self.alarm_factor!r} must be a number > 1, e.g. 2.0 (the alarm fires "
                             f"when the late-position KL doubles from its best).")
        if not (isinstance(self.alarm_repetition, int | float) and 0.0 < self.alarm_repetition <= 1.0):
            raise ValueError(f"alarm_repetition={self.alarm_repetition!r} must be a fraction in (0, 1], e.g. 0.5.")
        self._check_rolling()
        self._check_remote_teacher()
        self._check_generation_kwargs()
        self._check_sampling_settings()
        if self.deepspeed_plugin is not None:
            self._check_deepspeed_processes()
        self.horizon_policy()  # validates the horizon settings now, at construction
        if self.horizon == "rolling":
            self._check_rolling_steps()

    def _check_rolling_steps(self) -> None:
        if self.max_steps is None or self.max_steps <= 0:
            raise ValueError(
                f"horizon='rolling' with max_steps={self.max_steps} (num_train_epochs={self.num_train_epochs}): a rolling "
                f"step starts a prompt only where a rollout ended, so how many steps an epoch of prompts takes depends "
                f"on the rollouts' lengths, and an epoch count cannot say when to stop. Set max_steps: about "
                f"N x c / S steps roll out N prompts once, with S slots (per_device_train_batch_size x "
                f"gradient_accumulation_steps x processes) and c the mean chunks per rollout (at most "
                f"ceil(1 / truncation_ratio)); the log's horizon/prompts_started counts them.")

    def horizon_policy(self) -> HorizonPolicy:
        """A new policy object for these settings (the trainer keeps its own, which may hold state)."""
        if self.horizon not in HORIZON_POLICIES:
            raise ValueError(f"horizon={self.horizon!r} is not a horizon policy; choose one of "
                             f"{list(HORIZON_POLICIES)}.")
        return HorizonPolicy.from_config(self)

    def _check_rolling(self) -> None:
        n = self.rollout_max_tokens
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"rollout_max_tokens={n!r} must be an integer >= 1 (a rollout's length in tokens), or "
                             f"None to let rollouts run to max_completion_length.")
        if self.rolling_warmup not in WARMUPS:
            raise ValueError(f"rolling_warmup={self.rolling_warmup!r} is unknown; choose one of {list(WARMUPS)}.")
        self._check_student_memory()
        if self.horizon != "rolling":
            return
        if self.loss_window is not None:
            raise ValueError(f"loss_window={self.loss_window} with horizon='rolling': a rolled chunk is already a window "
                             f"of its rollout. Drop loss_window, or use horizon='truncated'.")
        if self.loss_type == "sequence":
            raise ValueError("loss_type='sequence' with horizon='rolling': the sequence-level advantage sums to the end "
                             "of the rollout, which a chunk does not reach. Use loss_type='reverse_kl' or 'sampled'.")
        beams = (self.generation_kwargs or {}).get("num_beams", 1)
        if self.rolling_student_cache and beams > 1:
            raise ValueError(f"generation_kwargs sets num_beams={beams} with horizon='rolling' and "
                             f"rolling_student_cache=True: beam search keeps {beams} cache rows per rollout, so the "
                             f"loss would read another row's keys and values. Drop num_beams, or set "
                             f"rolling_student_cache=False.")

    def _check_student_memory(self) -> None:
        k = self.rolling_memory_refresh_every
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"rolling_memory_refresh_every={k!r} must be an integer >= 1 (steps), or None to never "
                             f"refresh.")
        if k is not None and not self.rolling_student_memory:
            raise ValueError(f"rolling_memory_refresh_every={k} without rolling_student_memory: there is no memory to "
                             f"refresh. Set rolling_student_memory=True, or drop rolling_memory_refresh_every.")
        if self.rolling_context_grad and self.horizon != "rolling":
            raise ValueError(f"rolling_context_grad=True with horizon={self.horizon!r}: only a rolled chunk has a "
                             f"context encoded without grad. Use horizon='rolling', or drop rolling_context_grad.")
        if not self.rolling_student_memory:
            return
        if self.rolling_context_grad:
            raise ValueError("rolling_student_memory=True with rolling_context_grad=True: the loss re-encodes every "
                             "context with grad, so the memory would save nothing. Choose one of the two.")
        if self.horizon != "rolling":
            raise ValueError(f"rolling_student_memory=True with horizon={self.horizon!r}: only rolling rollouts carry "
                             f"contexts across steps. Use horizon='rolling', or drop rolling_student_memory.")
        if not self.rolling_student_cache:
            raise ValueError("rolling_student_memory=True with rolling_student_cache=False: the loss reads the memory "
                             "through the student cache. Set rolling_student_cache=True.")
        if self.use_vllm and self.vllm_mode != "colocate":
            raise ValueError(f"rolling_student_memory=True with vllm_mode={self.vllm_mode!r}: the memory keeps the "
                             f"colocated engine's prefix cache across weight syncs; a server's is not kept. Use "
                             f"vllm_mode='colocate', or drop rolling_student_memory.")

    def _check_remote_teacher(self) -> None:
        for name, low in (("loss_top_k", 1), ("teacher_server_max_retries", 0), ("teacher_server_chunk_size", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}.")
        if isinstance(self.teacher_server_timeout, bool) or not (
                isinstance(self.teacher_server_timeout, int | float) and self.teacher_server_timeout > 0):
            raise ValueError(f"teacher_server_timeout={self.teacher_server_timeout!r} must be a positive number of "
                             f"seconds, e.g. 120.")
        if not isinstance(self.teacher_id_column, str) or not self.teacher_id_column:
            raise ValueError(f"teacher_id_column={self.teacher_id_column!r} must be a column name, e.g. 'teacher_id'.")
        urls = self.teacher_server_urls()  # parses a JSON object given as a string
        url = self.teacher_model_server_url
        if urls is None:
            if self.loss_type == "topk_reverse_kl":
                raise ValueError(
                    "loss_type='topk_reverse_kl' approximates the reverse KL from a teacher server's top-k log-probs, "
                    "but teacher_model_server_url is not set. Set teacher_model_server_url, or use "
                    "loss_type='reverse_kl' (exact) with a local teacher_model."
                )
            return
        for name, one in urls.items():
            if not isinstance(one, str) or not one.startswith(("http://", "https://")):
                where = "" if name is None else f"[{name!r}]"
                raise ValueError(f"teacher_model_server_url{where}={one!r} is not an http(s) URL; pass the server's "
                                 f"root, e.g. 'http://127.0.0.1:8000'.")
        if self.loss_type not in REMOTE_LOSS_TYPES:
            raise ValueError(
                f"loss_type={self.loss_type!r} needs the teacher's full next-token distributions, which a teacher "
                f"server (teacher_model_server_url={url!r}) does not return. Use loss_type='topk_reverse_kl' (top-k + "
                f"tail reverse KL) or 'sampled' (sampled-token estimator)."
            )
        if self.temperature != 1.0:
            raise ValueError(
                f"temperature={self.temperature!r} with teacher_model_server_url={url!r}: vLLM returns prompt_logprobs "
                f"at temperature 1 whatever the request says, so the teacher could not be scored at "
                f"{self.temperature!r}. Use temperature=1.0, or a local teacher_model."
            )
        if self.teacher_model_init_kwargs is not None and not isinstance(url, dict):  # a dict may sit beside local ones
            raise ValueError(
                f"teacher_model_init_kwargs={self.teacher_model_init_kwargs!r} with teacher_model_server_url={url!r}: "
                f"no teacher is loaded here. Drop teacher_model_init_kwargs (set dtype etc. on the server)."
            )
        if self.horizon == "adaptive" and self.adaptive_signal == "topk_overlap":
            raise ValueError(
                f"adaptive_signal='topk_overlap' with teacher_model_server_url={url!r}: the top-k overlap signal needs "
                f"the teacher's hidden states, which a server does not return. Use adaptive_signal='reverse_kl'."
            )

    def teacher_server_urls(self) -> dict | None:
        """The teacher servers by name: `{name: URL}` for a dict (a JSON object string is parsed here, once), `{None:
        URL}` for one URL, None without a server."""
        url = self.teacher_model_server_url
        if isinstance(url, str) and url.lstrip().startswith("{"):  # the command line's JSON object
            import json

            try:
                url = json.loads(url)
            except json.JSONDecodeError as error:
                raise ValueError(f"teacher_model_server_url={url!r} starts like a JSON object but does not parse "
                                 f"({error}); pass e.g. '{{\"math\": \"http://127.0.0.1:8000\"}}'.") from None
            self.teacher_model_server_url = url
        if url is None:
            return None
        if isinstance(url, dict):
            if not url:
                raise ValueError("teacher_model_server_url={} names no teacher server; pass {name: URL, ...}, one URL, "
                                 "or None.")
            for name in url:
                if not isinstance(name, str) or not name:
                    raise ValueError(f"teacher_model_server_url has the key {name!r}; teacher names are non-empty "
                                     f"strings, the values of the dataset's teacher_id_column.")
            return dict(url)
        return {None: url}

    def _check_generation_kwargs(self) -> None:
        gen_kwargs = self.generation_kwargs or {}
        for key in ("max_new_tokens", "max_length", "max_tokens"):
            if key in gen_kwargs:
                raise ValueError(
                    f"generation_kwargs sets {key}={gen_kwargs[key]!r}, which would override the rollout horizon. "
                    f"Remove it: set max_completion_length (the full horizon L) and the horizon fields instead."
                )
        for key in SAMPLING_KEYS:
            if key in gen_kwargs:
                raise ValueError(
                    f"generation_kwargs sets {key}={gen_kwargs[key]!r}: the rollouts would be sampled from another "
                    f"distribution than softmax(logits / temperature), the one the loss scores (and the sampled "
                    f"estimator would be biased). Remove it from generation_kwargs; set the config's `temperature` "
                    f"instead, which generation and the loss share."
                )

    def _check_sampling_settings(self) -> None:
        truncated = {k: v for k, v in (("top_p", self.top_p if self.top_p != 1.0 else None),
                                       ("top_k", self.top_k or None), ("min_p", self.min_p)) if v is not None}
        if not truncated:
            return
        message = (f"{', '.join(f'{k}={v!r}' for k, v in truncated.items())} truncates the sampling distribution, "
                   f"but the loss scores the student's full softmax(logits / temperature)")
        if self.loss_type in ("sampled", "sequence"):
            raise ValueError(f"{message}: the sampled estimator's gradient is then biased. Leave top_p=1.0, top_k=0 "
                             f"and min_p=None with loss_type={self.loss_type!r}.")
        warnings.warn(f"{message}: rollouts are drawn off-policy. Leave top_p=1.0, top_k=0 and min_p=None for "
                      f"on-policy distillation.", stacklevel=3)

    def _check_deepspeed_processes(self) -> None:
        """`accelerate launch` started WORLD_SIZE processes; fail if the trainer would train as if it were alone."""
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != self.world_size:
            raise ValueError(
                f"accelerate launch started {launched} DeepSpeed processes but this one sees a world of "
                f"{self.world_size}: without a GPU, accelerate picks no communication backend. Pass ddp_backend='gloo' "
                f"(--ddp_backend gloo) to run DeepSpeed on CPU."
            )
