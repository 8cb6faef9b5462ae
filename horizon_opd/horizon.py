"""Rollout-horizon policies: how many tokens the student may generate at a given optimizer step.

This module is the one home of every horizon setting. A policy is one class: its dataclass fields with `help`
metadata are its settings (they become `HorizonOPDConfig` fields and command-line flags), `ratio(step, max_steps)` is
the horizon as a fraction of L = `max_completion_length`, and `observe`/`state_dict`/`load_state_dict` let a policy
learn from what a step measured. Adding a policy means adding a class here and listing it in `HORIZON_POLICIES`; the
config, the trainer, the command line, the model card and results.json read it from there.

| `horizon=` | policy | horizon at step s of S |
|---|---|---|
| `full` | OPD | L |
| `truncated` | TOPD | ceil(rho * L) for all of training |
| `progressive` | POPD | grows from rho_0 * L to L (linear ramp or stages), then stays at L |
| `anchored` | TOPD + anchors | ceil(rho * L), and L on every `anchor_every`-th step (steps 0, k, 2k, ...) |
| `rolling` | rolling rollouts | ceil(rho * L) per step, continuing each rollout where the last step left it, until EOS or L |
| `adaptive` | measured | L on probe steps (step 0, then every k <= `adaptive_probe_every` steps); in between, a ratio set from the per-position signal the probes measured |

`full`, `truncated`, `progressive` and `anchored` are pure functions of the step: a run resumed from a checkpoint
continues them exactly. `adaptive` keeps a small state (its current ratio and reference profiles) that the trainer
saves with each checkpoint and updates from metrics gathered over all ranks, so every rank derives the same horizon.
"""

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar


def ratio_to_tokens(ratio: float, max_completion_length: int) -> int:
    """ceil(ratio * L), clamped to [1, L]. Rounded first so float noise (0.1 * 30 = 3.0000000000000004) does not add a
    token."""
    return min(max_completion_length, max(1, math.ceil(round(ratio * max_completion_length, 9))))


def horizon_at(step: int, max_steps: int, policy: "HorizonPolicy") -> int:
    """The horizon in tokens at optimizer step `step` (0-based) of `max_steps`: ceil(ratio * L), in [1, L]."""
    return ratio_to_tokens(policy.ratio(step, max_steps), policy.max_completion_length)


def setting(default, help: str, choices: Sequence | None = None):
    """A policy setting: a dataclass field whose `help` (and `choices`) become the config's and the CLI's."""
    metadata = {"help": help, **({"choices": list(choices)} if choices else {})}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class StepRecord:
    """What one optimizer step measured, summed over its micro-batches and gathered over all ranks.

    `kl_sums[p]` and `kl_counts[p]` are the sum of the per-token reverse KL and the number of trained tokens at
    completion position p (0-based, p < L); `signal_sums` is the same for the policy's own signal where it is not the
    KL (e.g. top-k disagreement). `rollouts`, `cut` and `repeating` count the step's rollouts, those stopped by the
    horizon (no EOS), and those ending in a repeated loop; `generated_tokens` and `decode_iterations` what generating
    them cost (tokens over all ranks; sequential decode steps of the slowest rank)."""

    step: int
    horizon: int
    kl_sums: list[float]
    kl_counts: list[float]
    signal_sums: list[float] | None = None
    rollouts: int = 0
    cut: int = 0
    repeating: int = 0
    generated_tokens: int = 0
    decode_iterations: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # the `monitor.COUNTERS`, summed over ranks
    # several teachers: per teacher (in the trainer's order) [KL sum, trained tokens, tokens it encoded or scored]
    teacher_sums: list[list[float]] | None = None
    teacher_scored_tokens: int = 0  # tokens teacher servers scored for the step (or the evaluation), over all ranks

    def signal(self) -> tuple[list[float], list[float]]:
        return (self.signal_sums if self.signal_sums is not None else self.kl_sums), self.kl_counts


@dataclass
class HorizonPolicy:
    """Base class: the full horizon at every step. Subclasses declare their settings as fields made with `setting`."""

    name: ClassVar[str] = "full"
    alias: ClassVar[str] = "opd"  # its name on the command line (`horizon-opd --methods opd ...`)
    alias_setting: ClassVar[str | None] = None  # the setting a number after the alias sets (`topd0.25`)
    summary: ClassVar[str] = "OPD: rollouts may run to L tokens"
    signal: ClassVar[str] = "reverse_kl"  # which per-position signal `observe` needs

    max_completion_length: int = 512

    def __post_init__(self):
        if self.max_completion_length is None or int(self.max_completion_length) < 1:
            raise ValueError(
                f"max_completion_length={self.max_completion_length!r} must be an integer >= 1: it is the full rollout "
                f"horizon L that horizon ratios are fractions of."
            )

    # ---- the interface the trainer uses
    def ratio(self, step: int, max_steps: int) -> float:
        """The horizon as a fraction of L at optimizer step `step` (0-based) of `max_steps`."""
        return 1.0

    def observe(self, record: StepRecord) -> None:
        """Learn from what a step measured; stateless policies ignore it."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ---- descriptions (model card, CLI, results.json)
    @classmethod
    def settings(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if "help" in f.metadata]

    @classmethod
    def from_config(cls, args) -> "HorizonPolicy":
        policy_cls = HORIZON_POLICIES[args.horizon]
        return policy_cls(max_completion_length=args.max_completion_length,
                          **{f.name: getattr(args, f.name) for f in policy_cls.settings()})

    def label(self) -> str:
        """A short name with the settings that tell runs apart, e.g. `TOPD rho=0.1`."""
        return "OPD"

    def describe(self) -> str:
        """One line for the model card: the policy, its settings and the token counts they give."""
        return f"`{self.name}` ({self.summary}), L = {self.max_completion_length}"

    def setting_values(self) -> dict:
        return {"horizon": self.name, **{f.name: getattr(self, f.name) for f in self.settings()}}


def _check_ratio(name: str, value) -> None:
    if isinstance(value, bool) or not (isinstance(value, int | float) and 0.0 < value <= 1.0):
        raise ValueError(
            f"{name}={value!r} is outside (0, 1]. It is a fraction of max_completion_length: use e.g. 0.1 for a 10% "
            f"horizon, or 1.0 for the full horizon."
        )


def _check_positive_int(name: str, value, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1 ({meaning}).")


@dataclass
class TruncatedHorizon(HorizonPolicy):
    name: ClassVar[str] = "truncated"
    alias: ClassVar[str] = "topd"
    alias_setting: ClassVar[str] = "truncation_ratio"
    summary: ClassVar[str] = "TOPD: every rollout stops at ceil(rho * L) tokens"

    truncation_ratio: float = setting(0.1, "Fraction rho of max_completion_length generated in `truncated` and "
                                           "`anchored` modes, in (0, 1].")

    def __post_init__(self):
        super().__post_init__()
        _check_ratio("truncation_ratio", self.truncation_ratio)

    def ratio(self, step, max_steps):
        return float(self.truncation_ratio)

    def label(self):
        return f"TOPD rho={self.truncation_ratio:g}"

    def describe(self):
        return (f"`truncated` (TOPD): every rollout stops at ceil(rho * L) = {horizon_at(0, 1, self)} tokens, with rho "
                f"= `truncation_ratio` = {self.truncation_ratio} and L = {self.max_completion_length}")


@dataclass
class ProgressiveHorizon(HorizonPolicy):
    name: ClassVar[str] = "progressive"
    alias: ClassVar[str] = "popd"
    summary: ClassVar[str] = "POPD: the horizon grows from a short prefix to L, then stays at L"

    progressive_schedule: str = setting("linear", "Shape of the `progressive` horizon: `linear` (from "
                                        "progressive_start_ratio * L to L over the first progressive_ramp_fraction "
                                        "of max_steps) or `stages` (piecewise constant).", choices=("linear", "stages"))
    progressive_start_ratio: float = setting(0.1, "Horizon ratio at step 0 of the linear progressive schedule, in "
                                                  "(0, 1].")
    progressive_ramp_fraction: float = setting(0.5, "Fraction of max_steps over which the linear progressive schedule "
                                                    "reaches the full horizon, in (0, 1].")
    progressive_stage_ratios: list[float] = setting([0.1, 0.25, 0.5, 1.0], "Horizon ratio of each stage of the "
                                                    "`stages` schedule: non-decreasing, ending at 1.0.")
    progressive_stage_fractions: list[float] = setting([0.0, 0.25, 0.5, 0.75], "Fraction of max_steps at which each "
                                                       "stage starts: strictly increasing, from 0.0.")

    def __post_init__(self):
        super().__post_init__()
        self.progressive_stage_ratios = list(self.progressive_stage_ratios)
        self.progressive_stage_fractions = list(self.progressive_stage_fractions)
        if self.progressive_schedule not in ("linear", "stages"):
            raise ValueError(f"progressive_schedule={self.progressive_schedule!r} is unknown; choose one of "
                             f"['linear', 'stages'].")
        if self.progressive_schedule == "linear":
            _check_ratio("progressive_start_ratio", self.progressive_start_ratio)
            if not 0.0 < self.progressive_ramp_fraction <= 1.0:
                raise ValueError(
                    f"progressive_ramp_fraction={self.progressive_ramp_fraction!r} is outside (0, 1]. It is the "
                    f"fraction of max_steps over which the horizon grows to L: use e.g. 0.5 to reach L half-way "
                    f"through training."
                )
            return
        ratios, fractions = self.progressive_stage_ratios, self.progressive_stage_fractions
        if len(ratios) == 0 or len(ratios) != len(fractions):
            raise ValueError(
                f"progressive_stage_ratios={ratios} and progressive_stage_fractions={fractions} must be non-empty and "
                f"of equal length: one start fraction of max_steps for each stage's horizon ratio."
            )
        for r in ratios:
            _check_ratio("progressive_stage_ratios entry", r)
        if any(b < a for a, b in zip(ratios, ratios[1:])):
            raise ValueError(f"progressive_stage_ratios={ratios} decreases. A progressive horizon only grows: sort the "
                             f"ratios in non-decreasing order.")
        if ratios[-1] != 1.0:
            raise ValueError(f"progressive_stage_ratios={ratios} never reaches the full horizon L: end the list with "
                             f"1.0.")
        if fractions[0] != 0.0:
            raise ValueError(f"progressive_stage_fractions={fractions} must start at 0.0 so the first stage covers the "
                             f"first step.")
        if any(not 0.0 <= f < 1.0 for f in fractions) or any(b <= a for a, b in zip(fractions, fractions[1:])):
            raise ValueError(f"progressive_stage_fractions={fractions} must be strictly increasing fractions of "
                             f"max_steps in [0, 1), e.g. [0.0, 0.25, 0.5, 0.75].")

    def ratio(self, step, max_steps):
        progress = step / max(1, max_steps)  # in [0, 1) during training
        if self.progressive_schedule == "linear":
            # 1. grow linearly from the start ratio over the ramp; 2. stay at the full horizon afterwards
            start = self.progressive_start_ratio
            return min(1.0, start + (1.0 - start) * min(1.0, progress / self.progressive_ramp_fraction))
        stage = max(i for i, f in enumerate(self.progressive_stage_fractions) if f <= progress + 1e-12)
        return float(self.progressive_stage_ratios[stage])

    def label(self):
        if self.progressive_schedule == "linear":
            return f"POPD linear {self.progressive_start_ratio:g}->1"
        return "POPD stages"

    def describe(self):
        L = self.max_completion_length
        if self.progressive_schedule == "linear":
            return (f"`progressive` (POPD), `linear` schedule: the horizon grows from rho_0 * L = {horizon_at(0, 1, self)} "
                    f"tokens (`progressive_start_ratio` = {self.progressive_start_ratio}) to L = {L} over the first "
                    f"{self.progressive_ramp_fraction:.0%} of the steps (`progressive_ramp_fraction`), then stays at L")
        stages = ", ".join(f"{r} from {f:.0%}" for r, f in zip(self.progressive_stage_ratios,
                                                               self.progressive_stage_fractions, strict=True))
        return f"`progressive` (POPD), `stages` schedule: horizon ratio of L = {L} by fraction of the steps: {stages}"


@dataclass
class AnchoredHorizon(TruncatedHorizon):
    """TOPD with anchor steps: the truncated horizon rho * L, and the full horizon L on steps 0, k, 2k, ... Anchor
    steps train like any other step, so the student also practises its late positions (the guard against truncation
    collapse), and they measure the full-horizon KL profile the collapse alarm reads. Anchoring whole steps rather
    than a share of each batch: batched generation lasts as long as its longest rollout, so one full rollout in a
    batch costs nearly what a full batch does."""

    name: ClassVar[str] = "anchored"
    alias: ClassVar[str] = "anchored"
    alias_setting: ClassVar[str] = "truncation_ratio"
    summary: ClassVar[str] = "TOPD with a full-horizon anchor step every `anchor_every` steps"

    anchor_every: int = setting(10, "In `anchored` mode, every anchor_every-th optimizer step (0, k, 2k, ...) "
                                    "generates at the full horizon L; the others at truncation_ratio * L.")

    def __post_init__(self):
        super().__post_init__()
        _check_positive_int("anchor_every", self.anchor_every, "an anchor step at the full horizon every that many "
                            "optimizer steps, e.g. 10")

    def ratio(self, step, max_steps):
        return 1.0 if step % self.anchor_every == 0 else float(self.truncation_ratio)

    def label(self):
        return f"Anchored rho={self.truncation_ratio:g} every {self.anchor_every}"

    def describe(self):
        tokens = ratio_to_tokens(self.truncation_ratio, self.max_completion_length)
        return (f"`anchored`: rollouts stop at ceil(rho * L) = {tokens} tokens (rho = `truncation_ratio` = "
                f"{self.truncation_ratio}), and run to L = {self.max_completion_length} on steps 0, "
                f"{self.anchor_every}, {2 * self.anchor_every}, ... (`anchor_every` = {self.anchor_every})")


ADAPTIVE_SIGNALS = ("reverse_kl", "topk_overlap")


@dataclass
class AdaptiveHorizon(HorizonPolicy):
    """The horizon set from measurement. Probe steps run at the full horizon L (step 0, then every
    `adaptive_probe_every` steps or sooner); their per-position signal (reverse KL, or 1 - top-k overlap of student
    and teacher, Prune-OPD's) is binned into `adaptive_bins` bins over L. Between probes the student trains on the
    first `ratio * L` tokens, starting at `adaptive_min_ratio`.

    At each probe, each bin past the current horizon (the untrained suffix) is checked for drift (`adaptive_decision`):
    it *rose* when it exceeds its best by more than `adaptive_tolerance` of its first level, and it *lags* when its
    improvement since the first probe is less than the trained prefix's raised to `adaptive_carry` (training on the
    prefix is not carrying over to it). On drift the next probe comes twice as soon (at least 2 steps on), and drift
    inside the horizon's reach (not in the last bin, which only a full-horizon step trains) extends the horizon at
    once over the last drifting bin; without drift the horizon halves towards the minimum and the probe interval
    doubles back towards `adaptive_probe_every`. Extending at once and shrinking by halves is the smoothing: a noisy
    probe cannot swing the horizon between its bounds, and a drift is answered at the next step."""

    name: ClassVar[str] = "adaptive"
    alias: ClassVar[str] = "adaptive"
    alias_setting: ClassVar[str] = "adaptive_min_ratio"
    summary: ClassVar[str] = "the horizon is set from per-position measurements at full-horizon probe steps"

    adaptive_min_ratio: float = setting(0.1, "Smallest horizon ratio the `adaptive` policy uses between probes, in "
                                             "(0, 1].")
    adaptive_max_ratio: float = setting(1.0, "Largest horizon ratio the `adaptive` policy uses between probes, in "
                                             "[adaptive_min_ratio, 1].")
    adaptive_probe_every: int = setting(10, "In `adaptive` mode, the longest interval between full-horizon probe "
                                            "steps (the first is step 0; after a drift they come twice as often).")
    adaptive_signal: str = setting("reverse_kl", "Per-position signal the `adaptive` policy compares: `reverse_kl` "
                                   "(the loss's own per-token KL) or `topk_overlap` (1 - |top-k(student) & "
                                   "top-k(teacher)| / k, Prune-OPD's).", choices=ADAPTIVE_SIGNALS)
    adaptive_tolerance: float = setting(0.25, "In `adaptive` mode a late bin drifts when it rises above its best by "
                                              "more than this fraction of its first level, > 0.")
    adaptive_carry: float = setting(0.5, "In `adaptive` mode a late bin lags when its improvement factor since the "
                                         "first probe is worse than the trained prefix's to this power, in (0, 1].")
    adaptive_min_signal: float = setting(0.01, "In `adaptive` mode a late bin whose signal is at or below this level "
                                               "(nats of reverse KL per token, or top-k disagreement) never counts "
                                               "as drifting: near zero, relative changes are noise. >= 0.")
    adaptive_bins: int = setting(8, "Equal-width bins over L in which the `adaptive` policy compares its signal.")
    adaptive_top_k: int = setting(8, "k of the `topk_overlap` signal.")

    def __post_init__(self):
        super().__post_init__()
        _check_ratio("adaptive_min_ratio", self.adaptive_min_ratio)
        _check_ratio("adaptive_max_ratio", self.adaptive_max_ratio)
        if self.adaptive_max_ratio < self.adaptive_min_ratio:
            raise ValueError(f"adaptive_max_ratio={self.adaptive_max_ratio!r} is below adaptive_min_ratio="
                             f"{self.adaptive_min_ratio!r}: raise the maximum or lower the minimum.")
        _check_positive_int("adaptive_probe_every", self.adaptive_probe_every,
                            "the longest interval between full-horizon probe steps, e.g. 10")
        if self.adaptive_signal not in ADAPTIVE_SIGNALS:
            raise ValueError(f"adaptive_signal={self.adaptive_signal!r} is unknown; choose one of "
                             f"{list(ADAPTIVE_SIGNALS)}.")
        if isinstance(self.adaptive_tolerance, bool) or not (isinstance(self.adaptive_tolerance, int | float)
                                                             and self.adaptive_tolerance > 0):
            raise ValueError(f"adaptive_tolerance={self.adaptive_tolerance!r} must be a number > 0, e.g. 0.25 (a "
                             f"late bin drifts when it rises 25% of its first level above its best).")
        if isinstance(self.adaptive_carry, bool) or not (isinstance(self.adaptive_carry, int | float)
                                                         and 0 < self.adaptive_carry <= 1):
            raise ValueError(f"adaptive_carry={self.adaptive_carry!r} must be in (0, 1], e.g. 0.5 (a late bin lags "
                             f"when it improved less than the square root of the trained prefix's improvement).")
        if isinstance(self.adaptive_min_signal, bool) or not (isinstance(self.adaptive_min_signal, int | float)
                                                              and self.adaptive_min_signal >= 0):
            raise ValueError(f"adaptive_min_signal={self.adaptive_min_signal!r} must be a number >= 0, e.g. 0.01 "
                             f"(late bins at or below 0.01 nats of reverse KL never count as drifting).")
        _check_positive_int("adaptive_bins", self.adaptive_bins, "bins over the full horizon, e.g. 8")
        if self.adaptive_bins > self.max_completion_length:
            raise ValueError(f"adaptive_bins={self.adaptive_bins} exceeds max_completion_length="
                             f"{self.max_completion_length}: use at most one bin per position.")
        _check_positive_int("adaptive_top_k", self.adaptive_top_k, "the k of the top-k overlap signal, e.g. 8")
        self.current_ratio = float(self.adaptive_min_ratio)
        self.interval = int(self.adaptive_probe_every)
        self.next_probe = 0
        self.first_profile: list[float] | None = None  # the signal by bin at the first probe
        self.best_profile: list[float] | None = None  # the lowest signal each bin reached at a probe
        self.decisions: list[dict] = []  # one entry per probe: what it measured and what it chose

    @property
    def signal(self):  # read by the trainer: which per-position signal to measure on probe steps
        return self.adaptive_signal

    def ratio(self, step, max_steps):
        return 1.0 if step >= self.next_probe else self.current_ratio

    def observe(self, record: StepRecord) -> None:
        if record.step < self.next_probe or record.horizon < self.max_completion_length:
            return
        sums, counts = record.signal()
        profile = bin_means(sums, counts, self.max_completion_length, self.adaptive_bins)
        decision = adaptive_decision(profile, self.first_profile, self.best_profile, self.current_ratio,
                                     min_ratio=self.adaptive_min_ratio, max_ratio=self.adaptive_max_ratio,
                                     tolerance=self.adaptive_tolerance, carry=self.adaptive_carry,
                                     min_signal=self.adaptive_min_signal)
        if self.first_profile is None:
            self.first_profile = profile
        self.best_profile = [p if b is None or (p is not None and p < b) else b
                             for p, b in zip(profile, self.best_profile or profile, strict=True)]
        self.current_ratio = decision["ratio"]
        if self.decisions:  # after a drift probe twice as often; while stable, back towards the longest interval
            self.interval = (max(2, self.interval // 2) if decision["drifting_bins"]
                             else min(self.adaptive_probe_every, self.interval * 2))
        self.next_probe = record.step + self.interval
        self.decisions.append({"step": record.step, "next_probe": self.next_probe, **decision})

    def state_dict(self):
        return {"current_ratio": self.current_ratio, "interval": self.interval, "next_probe": self.next_probe,
                "first_profile": self.first_profile, "best_profile": self.best_profile, "decisions": self.decisions}

    def load_state_dict(self, state):
        self.current_ratio = float(state["current_ratio"])
        self.interval, self.next_probe = int(state["interval"]), int(state["next_probe"])
        self.first_profile, self.best_profile = state["first_profile"], state["best_profile"]
        self.decisions = list(state.get("decisions", []))

    def label(self):
        return f"Adaptive {self.adaptive_min_ratio:g}-{self.adaptive_max_ratio:g}"

    def describe(self):
        return (f"`adaptive`: full-horizon probes (L = {self.max_completion_length}) at most "
                f"{self.adaptive_probe_every} steps apart measure the `{self.adaptive_signal}` signal by position; "
                f"between probes the horizon ratio moves within [{self.adaptive_min_ratio}, {self.adaptive_max_ratio}],"
                f" extending over late positions that drift and halving while none does")


def bin_means(sums: Sequence[float], counts: Sequence[float], horizon: int, num_bins: int) -> list[float | None]:
    """Token-weighted mean of a per-position signal in `num_bins` equal-width bins over positions [0, horizon):
    position p falls in bin floor(p * num_bins / horizon). `None` for a bin no token reached."""
    bin_sums, bin_counts = [0.0] * num_bins, [0.0] * num_bins
    for p in range(min(horizon, len(sums))):
        b = min(num_bins - 1, p * num_bins // horizon)
        bin_sums[b] += sums[p]
        bin_counts[b] += counts[p]
    return [s / c if c > 0 else None for s, c in zip(bin_sums, bin_counts, strict=True)]


def adaptive_decision(profile: list[float | None], first: list[float | None] | None, best: list[float | None] | None,
                      ratio: float, *, min_ratio: float, max_ratio: float, tolerance: float, carry: float,
                      min_signal: float = 0.0) -> dict:
    """The adaptive controller as a pure function of one probe's binned signal (`profile`, bins over L) and the
    references: the first probe's profile and each bin's best. Returns the next ratio and why.

    1. The trained prefix is the bins the current ratio covers; the others are the suffix.
    2. A suffix bin b drifts if it *rose*: now_b - best_b > tolerance * first_b (a rise measured against the bin's
       own starting level, so noise on a bin that is already near zero does not count), or if it *lags*: its
       improvement factor now_b / first_b exceeds the prefix's improvement factor to the power `carry` (with carry
       0.5, a prefix that improved 100x asks the suffix for at least 10x). A bin at or below `min_signal` never
       drifts: a bin that starts near zero (1e-4 nats) would otherwise "lag" on every probe, since any noise is a
       large factor of its first level (on the demo this kept one run probing every 2 steps at 3e-4 to 1e-3 nats).
    3. Drift in an interior bin: extend the ratio to the end of the last such bin (at once). Otherwise halve it. Clip
       to the bounds. Drift in the last bin cannot be covered by anything shorter than L: the policy answers any
       drift by probing (at L) twice as soon instead.
    """
    num_bins = len(profile)
    trained = max(1, min(num_bins, math.ceil(round(ratio * num_bins, 9))))  # bins (partly) inside the horizon
    if first is None or best is None:  # first probe: nothing to compare with yet; keep the starting ratio
        return {"ratio": ratio, "drifting_bins": [], "profile": profile, "prefix_improvement": None}

    def mean_of(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    prefix_now, prefix_first = mean_of(profile[:trained]), mean_of(first[:trained])
    prefix_improvement = prefix_now / prefix_first if prefix_now is not None and prefix_first else None
    drifting = []
    for b in range(trained, num_bins):
        now, its_best, its_first = profile[b], best[b], first[b]
        if now is None or not its_first or now <= min_signal:
            continue
        rose = its_best is not None and now - its_best > tolerance * its_first
        lags = (prefix_improvement is not None and prefix_improvement < 1
                and now / its_first > prefix_improvement ** carry)
        if rose or lags:
            drifting.append(b)
    # The last bin can only be reached by full-horizon steps: its drift is answered by probing sooner (the caller),
    # and only interior drift extends every step's horizon.
    interior = [b for b in drifting if b < num_bins - 1]
    new_ratio = (max(interior) + 1) / num_bins if interior else ratio / 2
    new_ratio = min(max_ratio, max(min_ratio, new_ratio))
    return {"ratio": new_ratio, "drifting_bins": drifting, "profile": profile,
            "prefix_improvement": prefix_improvement}


@dataclass
class RollingHorizon(TruncatedHorizon):
    """Rollouts continued chunk by chunk across steps (`horizon_opd/rollout.py`): every step decodes one chunk of
    ceil(rho * L) tokens per rollout, TOPD's decode iterations, and every position up to L is trained. The horizon this
    policy gives is the chunk; where a chunk sits in its rollout is the rollout pool's business."""

    name: ClassVar[str] = "rolling"
    alias: ClassVar[str] = "rolling"
    alias_setting: ClassVar[str] = "truncation_ratio"
    summary: ClassVar[str] = ("rolling: every step continues each rollout by one chunk of ceil(rho * L) tokens, until "
                              "EOS or L")

    def label(self):
        return f"Rolling rho={self.truncation_ratio:g}"

    def describe(self):
        return (f"`rolling`: every step continues each rollout in flight by a chunk of ceil(rho * L) = "
                f"{horizon_at(0, 1, self)} tokens (rho = `truncation_ratio` = {self.truncation_ratio}) until it stops "
                f"(EOS) or reaches L = {self.max_completion_length}; only the new chunk is trained on, at its true "
                f"positions")


HORIZON_POLICIES: dict[str, type[HorizonPolicy]] = {
    cls.name: cls for cls in (HorizonPolicy, TruncatedHorizon, ProgressiveHorizon, AnchoredHorizon, AdaptiveHorizon,
                              RollingHorizon)
}


def horizon_settings() -> list[dataclasses.Field]:
    """Every policy setting, once (a setting two policies share, like `truncation_ratio`, is declared once), in
    declaration order: the fields `HorizonOPDConfig` adds for the horizon."""
    seen = {}
    for cls in HORIZON_POLICIES.values():
        for f in cls.settings():
            seen.setdefault(f.name, f)
    return list(seen.values())


def policy_from_alias(method: str) -> tuple[type[HorizonPolicy], dict]:
    """Resolve a command-line method name (`opd`, `topd0.1`, `popd`, `popd-stages`, `anchored`, `adaptive0.2`) to
    `(policy class, settings)`. Raises ValueError naming the accepted names."""
    presets = {"popd-stages": (ProgressiveHorizon, {"progressive_schedule": "stages"})}
    if method in presets:
        return presets[method]
    for cls in HORIZON_POLICIES.values():
        if method == cls.alias:
            return cls, {}
        if cls.alias_setting and method.startswith(cls.alias) and method != cls.alias:
            suffix = method[len(cls.alias):]
            try:
                return cls, {cls.alias_setting: float(suffix)}
            except ValueError:
                break
    raise ValueError(f"unknown method {method!r}: use one of {method_names()}")


def method_names() -> list[str]:
    names = []
    for cls in HORIZON_POLICIES.values():
        names.append(f"{cls.alias}[<{cls.alias_setting}>]" if cls.alias_setting else cls.alias)
    return names + ["popd-stages"]
