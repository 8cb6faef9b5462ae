"""What a training step measured, accumulated exactly: per-position sums and counts, gathered over ranks once per
optimizer step, read by the horizon policy, the logs and the collapse alarm.

Per-position *means* cannot be averaged across micro-batches, ranks or logging steps without their token counts, so
everything here keeps sums and counts until the moment a mean is shown.
"""

import math
import warnings

import torch

from .horizon import StepRecord, bin_means

# The alarm watches this last share of positions of full-horizon rollouts: where truncated training never reaches.
LATE_FRACTION = 0.25
# The alarm smooths the late KL over its full-horizon observations (one step's late tokens are few and spiky), and
# ignores rises while the smoothed value stays below this share of its first value.
ALARM_SMOOTHING = 0.5
ALARM_FLOOR = 0.5
# A rollout "ends in a loop" when its last max(3p, LOOP_MIN_SPAN) tokens repeat a unit of p <= LOOP_MAX_PERIOD tokens.
LOOP_MIN_SPAN = 24
LOOP_MAX_PERIOD = 16


def ends_in_loop(ids: list[int], max_period: int = LOOP_MAX_PERIOD, min_span: int = LOOP_MIN_SPAN) -> bool:
    """Whether the sequence ends with one unit of at most `max_period` tokens repeated over at least
    max(3 * period, `min_span`) tokens (a degenerate loop, not a short repeated value)."""
    for period in range(1, max_period + 1):
        span = max(3 * period, min_span)
        if len(ids) < span:
            return False
        tail = ids[-span:]
        if all(tail[i] == tail[i - period] for i in range(period, span)):
            return True
    return False


class StepMeter:
    """One optimizer step's per-position sums and counts on this rank (`add_tokens`, once per micro-batch) and its
    rollouts (`add_rollouts`, once per generation); `finish` gathers them over ranks in one collective."""

    def __init__(self, max_completion_length: int):
        self.length = max_completion_length
        self._tensors = None
        self.rollouts = self.repeating = self.generated_tokens = 0
        self.decode_iterations = 0  # this rank's sequential decode steps: the longest rollout of each generate call

    def add_tokens(self, per_token: torch.Tensor, mask: torch.Tensor, signal: torch.Tensor | None = None,
                   offsets: torch.Tensor | None = None) -> None:
        """per_token, mask, signal: (B, K); masked-out positions count nothing. Column k of row b is completion
        position offsets[b] + k (a rolled chunk starts where its rollout's earlier chunks end; default 0), < L."""
        device = per_token.device
        mask = mask.to(device, torch.float64)
        if self._tensors is None:
            self._tensors = {"kl": torch.zeros(self.length, dtype=torch.float64, device=device),
                             "count": torch.zeros(self.length, dtype=torch.float64, device=device)}
        if offsets is None:
            positions = torch.arange(per_token.size(1), device=device).expand_as(mask)  # (B, K)
        else:
            positions = offsets.to(device).view(-1, 1) + torch.arange(per_token.size(1), device=device)  # (B, K)
        keep = mask != 0
        if keep.any() and int(positions[keep].max()) >= self.length:
            raise ValueError(f"a trained token sits at completion position {int(positions[keep].max())}, past "
                             f"max_completion_length={self.length}")
        positions = positions.clamp(max=self.length - 1).reshape(-1)  # masked padding past L counts zero anyway
        self._tensors["kl"].index_add_(0, positions, (per_token.detach().double() * mask).reshape(-1))
        self._tensors["count"].index_add_(0, positions, mask.reshape(-1))
        if signal is not None:
            self._tensors.setdefault("signal", torch.zeros_like(self._tensors["kl"]))
            self._tensors["signal"].index_add_(0, positions, (signal.detach().double() * mask).reshape(-1))

    def add_rollouts(self, completion_ids: list[list[int]]) -> None:
        """The rollouts one generate call returned: priced (`add_generation`), counted and checked for loops."""
        self.add_generation(completion_ids)
        self.count_rollouts(completion_ids)

    def count_rollouts(self, rollouts: list[list[int]]) -> None:
        """Whole rollouts (for rolling rollouts, those that finished this step), counted and checked for loops."""
        self.rollouts += len(rollouts)
        self.repeating += sum(ends_in_loop(list(ids)) for ids in rollouts)

    def add_generation(self, completion_ids: list[list[int]]) -> None:
        """Price one generate call: its tokens, and its decode iterations = its longest sequence, which the whole
        batched call waits for."""
        self.generated_tokens += sum(len(ids) for ids in completion_ids)
        self.decode_iterations += max((len(ids) for ids in completion_ids), default=0)

    def finish(self, step: int, horizon: int, accelerator, with_signal: bool = False) -> StepRecord:
        """Sum over ranks (one all-reduce, the same on every rank whatever its token count) and reset."""
        device = accelerator.device
        zeros = torch.zeros(self.length, dtype=torch.float64, device=device)
        parts = self._tensors or {}
        # Ranks decode in parallel, so the step waits for the slowest: each rank writes its decode iterations in its
        # own cell, and the max is read after the sum (still one collective).
        world = max(1, accelerator.num_processes)
        per_rank = torch.zeros(world, dtype=torch.float64, device=device)
        per_rank[getattr(accelerator, "process_index", 0)] = self.decode_iterations
        packed = torch.cat([parts.get("kl", zeros).to(device), parts.get("count", zeros).to(device),
                            parts.get("signal", zeros).to(device) if with_signal else zeros[:0], per_rank,
                            torch.tensor([self.rollouts, self.repeating, self.generated_tokens], dtype=torch.float64,
                                         device=device)])
        if accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, reduction="sum")
        values = packed.tolist()
        L = self.length
        record = StepRecord(
            step=step, horizon=horizon, kl_sums=values[:L], kl_counts=values[L:2 * L],
            signal_sums=values[2 * L:3 * L] if with_signal else None,
            rollouts=int(values[-3]), repeating=int(values[-2]), generated_tokens=int(values[-1]),
            decode_iterations=int(max(values[-3 - world:-3])),
        )
        self.__init__(self.length)
        return record


class CostLedger:
    """What training has cost so far, over all ranks: the figures a horizon saves, in the units each machine pays in.

    - `decode_iterations`: sequential decode steps, summed over optimizer steps, each step counting its longest
      rollout on the slowest rank. A GPU step waits on these (one forward per token for the whole batch).
    - `generated_tokens`: tokens sampled for training. A compute-bound machine (a CPU) pays per token.
    - `trained_tokens`: token positions the loss was computed on (after any loss window).
    - `teacher_scored_tokens`: tokens a teacher server scored (its bill, evaluation requests included); 0 with a
      local teacher.
    - `steps`: optimizer steps so far.

    Evaluation rollouts are not training cost: apart from the server's bill, they are not counted here."""

    FIELDS = ("steps", "decode_iterations", "generated_tokens", "trained_tokens", "teacher_scored_tokens")

    def __init__(self):
        for name in self.FIELDS:
            setattr(self, name, 0)

    def add_step(self, record: StepRecord) -> None:
        self.steps += 1
        self.decode_iterations += record.decode_iterations
        self.generated_tokens += record.generated_tokens
        self.trained_tokens += int(round(sum(record.kl_counts)))

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}

    def load_state_dict(self, state: dict) -> None:
        for name in self.FIELDS:
            setattr(self, name, int(state.get(name, 0)))

    def metrics(self) -> dict[str, float]:
        """Cumulative figures for the training log (`horizon/decode_iterations`, ...)."""
        out = {f"horizon/{name}": float(getattr(self, name)) for name in self.FIELDS[1:4]}
        out["teacher/scored_tokens"] = float(self.teacher_scored_tokens)
        return out


class LogWindow:
    """The steps since the last log, summed per position: `metrics` gives what one log line shows.

    `horizon/tokens` is the longest horizon of the window and the `kl_by_position` bins split [0, `horizon/kl_span`)
    (that horizon, or past it the deepest position trained, as rolled chunks are) into
    equal-width bins, each the token-weighted mean over every step and rank of the window, so the bins recombine
    exactly into the window's mean per-token KL (not a mean of means, and not mixed across horizons: a position is
    binned by where it is, whatever the horizon of its step)."""

    def __init__(self, max_completion_length: int, num_bins: int):
        self.length, self.num_bins = max_completion_length, num_bins
        self.reset()

    def reset(self):
        self.kl_sums = [0.0] * self.length
        self.kl_counts = [0.0] * self.length
        self.horizons: list[int] = []
        self.decode_iterations: list[int] = []
        self.rollouts = self.repeating = 0

    def add(self, record: StepRecord) -> None:
        self.kl_sums = [a + b for a, b in zip(self.kl_sums, record.kl_sums, strict=True)]
        self.kl_counts = [a + b for a, b in zip(self.kl_counts, record.kl_counts, strict=True)]
        self.horizons.append(record.horizon)
        self.decode_iterations.append(record.decode_iterations)
        self.rollouts += record.rollouts
        self.repeating += record.repeating

    def metrics(self) -> dict[str, float]:
        if not self.horizons:
            return {}
        horizon = max(self.horizons)
        # rolled chunks are trained past the step's horizon (the chunk): bin over every position trained
        span = max([horizon] + [p + 1 for p, c in enumerate(self.kl_counts) if c > 0])
        out = {"horizon/tokens": float(horizon), "horizon/ratio": horizon / self.length,
               "horizon/mean_tokens": sum(self.horizons) / len(self.horizons),
               "horizon/step_decode_iterations": sum(self.decode_iterations) / len(self.decode_iterations),
               "horizon/kl_span": float(span)}
        if self.rollouts:
            out["horizon/repeating"] = self.repeating / self.rollouts
        if self.num_bins:
            for i, mean in enumerate(bin_means(self.kl_sums, self.kl_counts, span, self.num_bins)):
                out[f"kl_by_position/bin_{i}"] = math.nan if mean is None else mean
        return out


def late_mean(sums: list[float], counts: list[float], length: int) -> float | None:
    """Token-weighted mean over the last LATE_FRACTION of positions [ceil(0.75 L), L)."""
    start = math.ceil(length * (1 - LATE_FRACTION))
    total, count = sum(sums[start:length]), sum(counts[start:length])
    return total / count if count > 0 else None


class CollapseAlarm:
    """Watches for truncation collapse, in every horizon mode. It fires when

    - the reverse KL of the late positions of full-horizon rollouts (full steps, anchor and probe steps, evaluation),
      smoothed over those observations (EMA, ALARM_SMOOTHING), exceeds `factor` x the lowest value it has had and is
      back above ALARM_FLOOR of its first value (so a late KL that is already near zero can jitter without firing), or
    - more than `repetition` of a step's rollouts end in a loop, when at first fewer than half that share did,

    and warns once, naming what rose and the remedy. `active` is whether the last observation met a condition."""

    def __init__(self, max_completion_length: int, factor: float, repetition: float, horizon_name: str):
        self.length, self.factor, self.repetition, self.horizon_name = max_completion_length, factor, repetition, \
            horizon_name
        self.late: float | None = None  # smoothed late-position KL
        self.first_late: float | None = None
        self.best_late: tuple[float, int] | None = None  # (lowest smoothed value, step)
        self.lowest_repeating: float | None = None
        self.active = False
        self.warned = False
        self.events: list[dict] = []

    def observe(self, step: int, horizon: int, kl_sums, kl_counts, rollouts: int = 0, repeating: int = 0,
                source: str = "training") -> bool:
        reasons = []
        late = late_mean(kl_sums, kl_counts, self.length) if horizon >= self.length else None
        if late is not None:
            self.late = late if self.late is None else ALARM_SMOOTHING * late + (1 - ALARM_SMOOTHING) * self.late
            if self.first_late is None:
                self.first_late = self.late
            # the sampled estimators' per-token values can be negative: a ratio to a best <= 0 means nothing
            if (self.best_late is not None and self.best_late[0] > 0 and self.late > self.factor * self.best_late[0]
                    and self.late > ALARM_FLOOR * self.first_late):
                reasons.append(
                    f"the reverse KL of the last {LATE_FRACTION:.0%} of positions at the full horizon ({source}, "
                    f"smoothed) rose to {self.late:.3g} nats, {self.late / self.best_late[0]:.1f}x its best "
                    f"({self.best_late[0]:.3g} at step {self.best_late[1]}; {self.first_late:.3g} at the start)")
            if self.best_late is None or self.late < self.best_late[0]:
                self.best_late = (self.late, step)
        if rollouts:
            share = repeating / rollouts
            if (share > self.repetition and self.lowest_repeating is not None
                    and self.lowest_repeating < self.repetition / 2):
                reasons.append(f"{share:.0%} of the rollouts end in a repeated loop (at most "
                               f"{self.lowest_repeating:.0%} earlier)")
            self.lowest_repeating = share if self.lowest_repeating is None else min(self.lowest_repeating, share)
        if late is None and not rollouts:
            return self.active
        self.active = bool(reasons)
        if reasons:
            self.events.append({"step": step, "source": source, "reasons": reasons})
            if not self.warned:
                self.warned = True
                remedy = ("use horizon='anchored' (a full-horizon step every anchor_every steps) or horizon='adaptive'"
                          if self.horizon_name in ("truncated", "progressive") else
                          "lower the learning rate, or make full-horizon steps more frequent (anchor_every / "
                          "adaptive_probe_every)")
                warnings.warn(f"horizon/alarm at step {step}: {'; and '.join(reasons)}. The late positions are "
                              f"drifting (truncation collapse): {remedy}.", stacklevel=2)
        return self.active

    def state_dict(self) -> dict:
        return {"late": self.late, "first_late": self.first_late, "best_late": self.best_late,
                "lowest_repeating": self.lowest_repeating, "active": self.active, "warned": self.warned,
                "events": self.events}

    def load_state_dict(self, state: dict) -> None:
        self.late, self.first_late = state.get("late"), state.get("first_late")
        self.best_late = tuple(state["best_late"]) if state.get("best_late") else None
        self.lowest_repeating = state.get("lowest_repeating")
        self.active, self.warned = bool(state.get("active")), bool(state.get("warned"))
        self.events = list(state.get("events", []))
