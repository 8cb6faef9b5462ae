from dataclasses import dataclass, field

from trl import DistillationConfig

from .horizon import HorizonSchedule


def _bf16_accelerator_available() -> bool:
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return is_torch_bf16_gpu_available() or is_torch_xla_available()

LOSS_TYPES = ("reverse_kl", "sampled")


@dataclass
class HorizonOPDConfig(DistillationConfig):
    r"""
    Configuration class for the [`HorizonOPDTrainer`].

    Extends [`~trl.DistillationConfig`] with the rollout horizon of on-policy distillation (OPD), following "Are Full
    Rollouts Necessary for On-Policy Distillation?" (arXiv 2605.31490). `max_completion_length` is the full horizon L;
    the fields below decide how much of it the student generates at each optimizer step. Every other field is TRL's.

    Parameters:
        > Parameters that control the rollout horizon

        horizon (`str`, *optional*, defaults to `"full"`):
            `"full"` (OPD: rollouts may run to L tokens), `"truncated"` (TOPD: rollouts stop at
            ceil(truncation_ratio * L) tokens for all of training) or `"progressive"` (POPD: the horizon grows from a
            short prefix to L during training, then stays at L).
        truncation_ratio (`float`, *optional*, defaults to `0.1`):
            Fraction of L generated in `"truncated"` mode, in (0, 1].
        progressive_schedule (`str`, *optional*, defaults to `"linear"`):
            Shape of the `"progressive"` horizon: `"linear"` (from `progressive_start_ratio * L` to L over the first
            `progressive_ramp_fraction` of `max_steps`) or `"stages"` (piecewise constant, see below).
        progressive_start_ratio (`float`, *optional*, defaults to `0.1`):
            Horizon ratio at step 0 of the linear progressive schedule, in (0, 1].
        progressive_ramp_fraction (`float`, *optional*, defaults to `0.5`):
            Fraction of `max_steps` over which the linear schedule reaches L, in (0, 1].
        progressive_stage_ratios (`list[float]`, *optional*, defaults to `[0.1, 0.25, 0.5, 1.0]`):
            Horizon ratio of each stage of the `"stages"` schedule: non-decreasing, ending at 1.0.
        progressive_stage_fractions (`list[float]`, *optional*, defaults to `[0.0, 0.25, 0.5, 0.75]`):
            Fraction of `max_steps` at which each stage starts: strictly increasing, starting at 0.0.

        > Parameters that control the loss

        loss_type (`str`, *optional*, defaults to `"reverse_kl"`):
            `"reverse_kl"`: the exact token-level KL(student || teacher) over the vocabulary at every completion
            position (TRL's chunked kernel with beta=1). `"sampled"`: the sampled-token estimator (per-token advantage
            log q(y_t) - log pi(y_t), stop-gradient, policy-gradient surrogate), for teachers that only expose
            log-probs of the sampled tokens.
        position_bins (`int`, *optional*, defaults to `8`):
            Number of equal-width bins over the current horizon in which the teacher-student reverse KL is logged
            (`kl_by_position/bin_{i}`), the per-position diagnostic of the paper's Fig. 13. `0` turns it off.

    > [!NOTE]
    > `beta` must stay at 1.0 (reverse KL): the horizon methods are defined for the reverse KL, and a silently
    > different divergence would not be the objective this trainer documents. `bf16` follows TRL's default (on) where
    > a bf16 accelerator is present or `use_cpu=True`; left unset on a machine without one, it is off (float32).
    """

    horizon: str = field(
        default="full",
        metadata={"help": "Rollout horizon mode.", "choices": ["full", "truncated", "progressive"]},
    )
    truncation_ratio: float = field(
        default=0.1,
        metadata={"help": "Fraction of max_completion_length generated in `truncated` mode, in (0, 1]."},
    )
    progressive_schedule: str = field(
        default="linear",
        metadata={"help": "Shape of the `progressive` horizon.", "choices": ["linear", "stages"]},
    )
    progressive_start_ratio: float = field(
        default=0.1,
        metadata={"help": "Horizon ratio at step 0 of the linear progressive schedule, in (0, 1]."},
    )
    progressive_ramp_fraction: float = field(
        default=0.5,
        metadata={"help": "Fraction of max_steps over which the linear progressive schedule reaches the full horizon."},
    )
    progressive_stage_ratios: list[float] = field(
        default_factory=lambda: [0.1, 0.25, 0.5, 1.0],
        metadata={"help": "Horizon ratio of each stage of the `stages` schedule: non-decreasing, ending at 1.0."},
    )
    progressive_stage_fractions: list[float] = field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75],
        metadata={"help": "Fraction of max_steps at which each stage starts: strictly increasing, from 0.0."},
    )
    loss_type: str = field(
        default="reverse_kl",
        metadata={"help": "Distillation loss.", "choices": ["reverse_kl", "sampled"]},
    )
    position_bins: int = field(
        default=8,
        metadata={"help": "Bins over the current horizon for the per-position reverse-KL diagnostic; 0 disables it."},
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
        if not isinstance(self.position_bins, int) or self.position_bins < 0:
            raise ValueError(f"position_bins={self.position_bins!r} must be an integer >= 0 (0 disables the metric).")
        gen_kwargs = self.generation_kwargs or {}
        for key in ("max_new_tokens", "max_length", "max_tokens"):
            if key in gen_kwargs:
                raise ValueError(
                    f"generation_kwargs sets {key}={gen_kwargs[key]!r}, which would override the rollout horizon. "
                    f"Remove it: set max_completion_length (the full horizon L) and the horizon fields instead."
                )
        self.horizon_schedule  # validates the horizon fields now, at construction

    @property
    def horizon_schedule(self) -> HorizonSchedule:
        return HorizonSchedule.from_config(self)
