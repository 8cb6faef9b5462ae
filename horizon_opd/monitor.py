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
# The collapse alarm (`CollapseAlarm`) reads full-horizon observations only and keeps one baseline per source (training
# steps at the full horizon; evaluation): the first ALARM_SETTLE readings of a source, and all its readings in the
# first ALARM_SETTLE_STEPS steps from its first one, only set its baseline.
ALARM_SETTLE = 3
ALARM_SETTLE_STEPS = 10
# A condition must hold on this many consecutive readings to fire (a one-off spike never does).
ALARM_PERSISTENCE = 2
# A late KL at or below max(ALARM_MIN_KL nats per token, ALARM_FLOOR x the run's first late KL) never fires, whatever
# its ratio to its best: a solved late region's KL jumps 10x between steps on healthy runs.
ALARM_MIN_KL = 0.1
ALARM_FLOOR = 0.5
# A reading pools a source's consecutive full-horizon observations until they hold this many late tokens (late KL) or
# this many rollouts (loops): one step's few late tokens or rollouts cannot tell drift from noise.
ALARM_MIN_TOKENS = 32
ALARM_MIN_ROLLOUTS = 16
# A rollout "ends in a loop" when its last max(3p, LOOP_MIN_SPAN) tokens repeat a unit of p <= LOOP_MAX_PERIOD tokens.
LOOP_MIN_SPAN = 24
LOOP_MAX_PERIOD = 16
# What a step's forwards encode, counted so a machine can be priced from counts (non-padding tokens, all ranks):
# - prompts_started: rollouts begun (a rolling step starts one per freed slot; other modes one per row);
# - prefill_tokens: prompt/context tokens generation encoded before its first sampled token;
# - prefill_cached_tokens: those of them a vLLM engine's prefix cache held, so it did not encode them (0 with
#   transformers' `generate`, which encodes every one);
# - student_grad_tokens / student_nograd_tokens: tokens the student's loss forward ran with / without grad (a rolled
#   chunk's context runs without grad);
# - teacher_tokens: tokens a local teacher encoded for the loss (a rolling slot's cached context is not re-encoded).
COUNTERS = ("prompts_started", "prefill_tokens", "prefill_cached_tokens", "student_grad_tokens", "student_nograd_tokens",
            "teacher_tokens")
# A `StepMeter` also counts the tokens teacher servers scored (their bill, evaluation included): gathered in the same
# collective, kept apart from the `COUNTERS` (the record's `teacher_scored_tokens`, not its `counts`).
METER_COUNTERS = COUNTERS + ("teacher_scored_tokens",)


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
    rollouts (`add_rollouts`, once per generation); `finish` gathers them over ranks in one collective. With several
    teachers (`num_teachers` > 0), `add_teacher` also sums each teacher's KL, trained tokens and encoded tokens."""

    def __init__(self, max_completion_length: int, num_teachers: int = 0):
        self.length = max_completion_length
        self.num_teachers = num_teachers
        self._tensors = None
        self.rollouts = self.repeating = self.generated_tokens = 0
        self.decode_iterations = 0  # this rank's sequential decode steps: the longest rollout of each generate call
        self.counts = dict.fromkeys(METER_COUNTERS, 0)
        self.teacher_sums = [[0.0, 0.0, 0.0] for _ in range(num_teachers)]

    def add_teacher(self, index: int, per_token: torch.Tensor, mask: torch.Tensor, teacher_tokens: int) -> None:
        """Teacher `index`'s share of a micro-batch: its rows' per-token KL and mask (B_t, K), and the tokens it
        encoded (a local teacher) or scored (a server) for them."""
        mask = mask.to(per_token.device, torch.float64)
        sums = self.teacher_sums[index]
        sums[0] += float((per_token.detach().double() * mask).sum())
        sums[1] += float(mask.sum())
        sums[2] += int(teacher_tokens)

    def count(self, name: str, value) -> None:
        """Add `value` to one of the `METER_COUNTERS` (a tensor is read once, here)."""
        self.counts[name] += int(value)

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
                            torch.tensor([self.counts[name] for name in METER_COUNTERS], dtype=torch.float64,
                                         device=device),
                            torch.tensor([v for sums in self.teacher_sums for v in sums], dtype=torch.float64,
                                         device=device),
                            torch.tensor([self.rollouts, self.repeating, self.generated_tokens], dtype=torch.float64,
                                         device=device)])
        if accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, reduction="sum")
        values = packed.tolist()
        L = self.length
        teachers = 3 * self.num_teachers  # just before the last three values
        teacher_values = values[len(values) - 3 - teachers:len(values) - 3]
        del values[len(values) - 3 - teachers:len(values) - 3]
        record = StepRecord(
            step=step, horizon=horizon, kl_sums=values[:L], kl_counts=values[L:2 * L],
            signal_sums=values[2 * L:3 * L] if with_signal else None,
            rollouts=int(values[-3]), repeating=int(values[-2]), generated_tokens=int(values[-1]),
            decode_iterations=int(max(values[-3 - len(METER_COUNTERS) - world:-3 - len(METER_COUNTERS)])),
            counts={name: int(v) for name, v in zip(COUNTERS, values[-3 - len(METER_COUNTERS):-4], strict=True)},
            teacher_sums=[teacher_values[i:i + 3] for i in range(0, teachers, 3)] if teachers else None,
            teacher_scored_tokens=int(values[-4]),
        )
        self.__init__(self.length, self.num_teachers)
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
    - the `COUNTERS` (prompts started, prefill tokens, tokens the student encoded with and without grad, tokens a
      local teacher encoded): what each forward encoded, to price a machine from counts.

    - with several teachers, per teacher (`teachers[name]`): the tokens trained against it and the tokens it encoded
      (a local teacher) or scored (a server) for training.

    Evaluation rollouts are not training cost: apart from the server's bill, they are not counted here."""

    FIELDS = ("steps", "decode_iterations", "generated_tokens", "trained_tokens", "teacher_scored_tokens") + COUNTERS

    def __init__(self, teacher_names: list[str] | None = None):
        for name in self.FIELDS:
            setattr(self, name, 0)
        self.teachers = {name: {"trained_tokens": 0, "teacher_tokens": 0} for name in teacher_names or []}

    def add_step(self, record: StepRecord) -> None:
        self.steps += 1
        self.decode_iterations += record.decode_iterations
        self.generated_tokens += record.generated_tokens
        self.trained_tokens += int(round(sum(record.kl_counts)))
        self.teacher_scored_tokens += record.teacher_scored_tokens
        for name, value in record.counts.items():
            setattr(self, name, getattr(self, name) + value)
        for totals, (_, trained, encoded) in zip(self.teachers.values(), record.teacher_sums or [], strict=False):
            totals["trained_tokens"] += int(round(trained))
            totals["teacher_tokens"] += int(round(encoded))

    def add_evaluation(self, record: StepRecord) -> None:
        """An evaluation is no training cost, but a teacher server bills the tokens it scored for it."""
        self.teacher_scored_tokens += record.teacher_scored_tokens

    def state_dict(self) -> dict:
        state = {name: getattr(self, name) for name in self.FIELDS}
        if self.teachers:
            state["teachers"] = {name: dict(totals) for name, totals in self.teachers.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        for name in self.FIELDS:
            setattr(self, name, int(state.get(name, 0)))
        saved = state.get("teachers", {})
        for name, totals in self.teachers.items():
            totals.update({k: int(v) for k, v in saved.get(name, {}).items()})

    def metrics(self) -> dict[str, float]:
        """Cumulative figures for the training log (`horizon/decode_iterations`, ...; `teachers/<name>/...`)."""
        out = {f"horizon/{name}": float(getattr(self, name)) for name in self.FIELDS[1:4] + COUNTERS}
        out["teacher/scored_tokens"] = float(self.teacher_scored_tokens)
        for name, totals in self.teachers.items():
            for key, value in totals.items():
                out[f"teachers/{name}/{key}"] = float(value)
        return out


class LogWindow:
    """The steps since the last log, summed per position: `metrics` gives what one log line shows.

    `horizon/tokens` is the longest horizon of the window and the `kl_by_position` bins split [0, `horizon/kl_span`)
    (that horizon, or past it the deepest position trained, as rolled chunks are) into
    equal-width bins, each the token-weighted mean over every step and rank of the window, so the bins recombine
    exactly into the window's mean per-token KL (not a mean of means, and not mixed across horizons: a position is
    binned by where it is, whatever the horizon of its step)."""

    def __init__(self, max_completion_length: int, num_bins: int, teacher_names: list[str] | None = None):
        self.length, self.num_bins = max_completion_length, num_bins
        self.teacher_names = list(teacher_names or [])
        self.reset()

    def reset(self):
        self.kl_sums = [0.0] * self.length
        self.kl_counts = [0.0] * self.length
        self.horizons: list[int] = []
        self.decode_iterations: list[int] = []
        self.rollouts = self.repeating = 0
        self.teacher_sums = [[0.0, 0.0] for _ in self.teacher_names]  # KL sum, trained tokens

    def add(self, record: StepRecord) -> None:
        for sums, (kl, trained, _) in zip(self.teacher_sums, record.teacher_sums or [], strict=False):
            sums[0] += kl
            sums[1] += trained
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
        trained = sum(count for _, count in self.teacher_sums)
        for name, (kl, count) in zip(self.teacher_names, self.teacher_sums, strict=True):
            out[f"teachers/{name}/kl"] = kl / count if count else math.nan
            out[f"teachers/{name}/share"] = count / trained if trained else math.nan
        return out


def late_mean(sums: list[float], counts: list[float], length: int) -> float | None:
    """Token-weighted mean over the last LATE_FRACTION of positions [ceil(0.75 L), L)."""
    start = math.ceil(length * (1 - LATE_FRACTION))
    total, count = sum(sums[start:length]), sum(counts[start:length])
    return total / count if count > 0 else None


class CollapseAlarm:
    """Watches for collapse in every horizon mode, on full-horizon observations only: training steps that reach the
    full horizon L (full steps, anchors, probes, rolling steps) and evaluation.

    Each source (training, evaluation: different rollouts, different measurements) keeps its own baseline, started at
    its first full-horizon observation, so a progressive or adaptive run is not compared with a baseline from before
    its horizon reached L. A source's observations are read in *readings*: one observation, or consecutive ones pooled
    until they hold `min_tokens` late tokens (late KL) or `min_rollouts` rollouts (loops), so a step with a handful of
    late tokens (a rolled chunk that happens to reach them, a small batch) is not read alone. A source's first `settle`
    readings, over at least `settle_steps` steps, only set its baseline. A reading is *high* when

    - its late KL (the reverse KL of the last LATE_FRACTION of positions) is above `factor` x the best its source has
      had and above max(`min_kl`, `floor` x the run's first late KL): a late KL near zero jitters 10x between steps on
      healthy runs; or
    - more than `repetition` of its rollouts end in a loop, and at least `repetition` / 2 more than over its source's
      first readings: a student that loops before training is not drifting;

    and the alarm fires when `persistence` consecutive readings (whatever their source) are high on the same
    condition. It warns once, saying what it saw and the remedy for the horizon mode `horizon_name`. `active` is whether
    the last full-horizon observation fired it; `events` lists every firing; `trace` keeps every observation raw, which
    `horizon_opd.alarm_study` replays through this class and a resumed run replays to rebuild the rule's state."""

    RULES = ("late", "loops")

    def __init__(self, max_completion_length: int, factor: float, repetition: float, horizon_name: str, *,
                 settle: int = ALARM_SETTLE, persistence: int = ALARM_PERSISTENCE, min_kl: float = ALARM_MIN_KL,
                 floor: float = ALARM_FLOOR, min_tokens: int = ALARM_MIN_TOKENS,
                 min_rollouts: int = ALARM_MIN_ROLLOUTS, settle_steps: int = ALARM_SETTLE_STEPS):
        self.length, self.factor, self.repetition, self.horizon_name = max_completion_length, factor, repetition, \
            horizon_name
        self.settle, self.settle_steps, self.persistence, self.min_kl, self.floor = settle, settle_steps, persistence, \
            min_kl, floor
        self.min_tokens, self.min_rollouts = min_tokens, min_rollouts
        self.active = False
        self.warned = False
        self.events: list[dict] = []
        self.trace: list[dict] = []  # every observation, raw
        self._reset_rule()

    def _reset_rule(self) -> None:
        self.first_late: tuple[float, int] | None = None  # the run's first late-KL reading and its step
        self.training_reach = 0  # the furthest position a training step reached
        self.sources: dict[str, dict] = {}  # per source: what is pooled so far, its readings, its baselines
        self.streaks: dict[str, list[dict]] = {rule: [] for rule in self.RULES}  # high readings in a row, per rule

    def observe(self, step: int, horizon: int, kl_sums, kl_counts, rollouts: int = 0, repeating: int = 0,
                source: str = "training") -> bool:
        """One step's (or one evaluation's) per-position KL sums and counts and its rollout counts; `horizon` is how
        far its rollouts reached (L for evaluation). Returns `active`."""
        late = tokens = None
        if horizon >= self.length:
            late = late_mean(kl_sums, kl_counts, self.length)
            tokens = int(round(sum(kl_counts[math.ceil(self.length * (1 - LATE_FRACTION)):self.length])))
        return self.observe_values(step, horizon, late, rollouts, repeating, source, late_tokens=tokens)

    def observe_values(self, step: int, horizon: int, late: float | None, rollouts: int = 0, repeating: int = 0,
                       source: str = "training", late_tokens: int | None = None) -> bool:
        """`observe` once the late KL is measured (None when the horizon < L or no rollout reached the late
        positions), with its token count (None: unknown, read as enough): what a replay of `trace` calls."""
        self.trace.append({"step": step, "source": source, "horizon": horizon, "late": late, "late_tokens": late_tokens,
                           "rollouts": rollouts, "repeating": repeating})
        if source == "training":
            self.training_reach = max(self.training_reach, horizon)
        if horizon < self.length or (late is None and not rollouts):
            return self.active  # no view of the late positions or of whole rollouts
        state = self.sources.setdefault(source, {
            "first_step": step, "late": [0.0, 0], "late_readings": 0, "best": None,
            "loops": [0, 0], "loop_readings": 0, "loop_baseline": [0, 0]})
        readings = []  # per rule read: "" (not high enough to fire) or what fired it
        if late is not None:
            readings.append(self._late_rule(state, step, late, late_tokens, source))
        if rollouts:
            readings.append(self._loop_rule(state, step, rollouts, repeating, source))
        readings = [r for r in readings if r is not None]
        if not readings:
            return self.active  # pooled, not read yet
        reasons = [r for r in readings if r]
        self.active = bool(reasons)
        if reasons:
            self.events.append({"step": step, "source": source, "reasons": reasons})
            if not self.warned:
                self.warned = True
                warnings.warn(f"horizon/alarm at step {step} (horizon={self.horizon_name!r}): "
                              f"{'; and '.join(reasons)}. {self.remedy()}.", stacklevel=3)
        return self.active

    def _late_rule(self, state: dict, step: int, late: float, tokens: int | None, source: str) -> str | None:
        """None: pooled, no reading yet; "": read, no alarm; else what fired."""
        pooled = state["late"]
        if tokens is None:  # a trace written before token counts were kept: one observation, one reading
            pooled[:] = [late, 1]
        else:
            pooled[0] += late * tokens
            pooled[1] += tokens
            if pooled[1] < self.min_tokens:
                return None  # too few late tokens yet to read
        reading = pooled[0] / pooled[1]
        pooled[:] = [0.0, 0]
        if self.first_late is None:
            self.first_late = (reading, step)
        floor = max(self.min_kl, self.floor * self.first_late[0])
        best = state["best"]
        state["late_readings"] += 1
        high = (self._settled(state, "late_readings", step) and best is not None and reading > floor
                and (best[0] <= 0 or reading > self.factor * best[0]))  # a sampled estimate can be <= 0: floor only
        if best is None or reading < best[0]:
            state["best"] = (reading, step)
        streak = self._streak("late", high, {"step": step, "source": source, "seen": f"{reading:.3g}"})
        if len(streak) < self.persistence:
            return ""
        return (f"the reverse KL of the last {LATE_FRACTION:.0%} of positions of full-horizon rollouts was "
                f"{self._seen(streak)} nats per token: above {self.factor:g}x its best ({best[0]:.3g} at step "
                f"{best[1]}, {source}) and above {floor:.3g} (the first reading, at step {self.first_late[1]}: "
                f"{self.first_late[0]:.3g})")

    def _loop_rule(self, state: dict, step: int, rollouts: int, repeating: int, source: str) -> str | None:
        pooled = state["loops"]
        pooled[0] += repeating
        pooled[1] += rollouts
        if pooled[1] < self.min_rollouts:
            return None
        looping, total = pooled
        pooled[:] = [0, 0]
        share, baseline = looping / total, state["loop_baseline"]
        high = False
        state["loop_readings"] += 1
        if not self._settled(state, "loop_readings", step):  # the share at the start of this source: its baseline
            baseline[0] += looping
            baseline[1] += total
        else:
            high = share > self.repetition and share >= baseline[0] / baseline[1] + self.repetition / 2
        streak = self._streak("loops", high, {"step": step, "source": source,
                                              "seen": f"{share:.0%} ({looping}/{total})"})
        if len(streak) < self.persistence:
            return ""
        return (f"the share of rollouts ending in a repeated loop was {self._seen(streak)}, against "
                f"{baseline[0] / baseline[1]:.0%} ({baseline[0]}/{baseline[1]}) in the full-horizon {source} rollouts "
                f"of steps {state['first_step']}-{state['loop_readings_until']}")

    def _settled(self, state: dict, readings: str, step: int) -> bool:
        """Whether a source's baseline is set: after its first `settle` readings and `settle_steps` steps (the first
        steps of training, learning-rate warmup included, move the late positions most, on healthy runs too)."""
        settled = state[readings] > max(1, self.settle) and step - state["first_step"] >= self.settle_steps
        if not settled:
            state[f"{readings}_until"] = step
        return settled

    def _streak(self, rule: str, high: bool, reading: dict) -> list[dict]:
        streak = self.streaks[rule]
        if high:
            streak.append(reading)
            del streak[:-self.persistence]
        else:
            streak.clear()
        return streak

    @staticmethod
    def _seen(streak: list[dict]) -> str:
        return ", ".join(f"{r['seen']} at step {r['step']} ({r['source']})" for r in streak)

    def remedy(self) -> str:
        """What to do, for the horizon mode the alarm watches."""
        capped = self.training_reach < self.length and self.horizon_name in ("full", "rolling")  # rollout_max_tokens
        if self.horizon_name in ("truncated", "progressive") or capped:
            return ("Training does not reach the late positions, which drift (truncation collapse): use "
                    "horizon='rolling' (every position trained at a truncated decode cost) or horizon='anchored' / "
                    "'adaptive' (full-horizon steps now and then), or lower the learning rate")
        if self.horizon_name in ("anchored", "adaptive"):
            return ("The full-horizon steps do not hold the late positions: lower the learning rate, or make "
                    "full-horizon steps more frequent (anchor_every / adaptive_probe_every)")
        return ("Every position is trained in this mode, so this is not truncation collapse: lower the learning rate, "
                "or use more prompts per step (a token-matched OPD at this update size decays too: the update is "
                "noisy, not the horizon)")

    def state_dict(self) -> dict:
        return {"active": self.active, "warned": self.warned, "events": self.events, "trace": self.trace}

    def load_state_dict(self, state: dict) -> None:
        """Rebuilds the rule's state by replaying the saved trace (so a checkpoint from before the trace existed
        restarts the baselines), then restores what had fired."""
        self._reset_rule()
        self.trace, self.warned = [], True  # the replay does not warn
        observe_trace(self, state.get("trace", []))
        self.active, self.warned = bool(state.get("active")), bool(state.get("warned"))
        self.events = list(state.get("events", []))


def observe_trace(alarm, trace: list[dict]) -> None:
    """Feeds `alarm` (a `CollapseAlarm`, or any rule with its `observe_values`) every observation of a recorded
    `trace`, in order: how a resumed run rebuilds its alarm and how `horizon_opd.alarm_study` replays a run."""
    for t in trace:
        alarm.observe_values(t["step"], t["horizon"], t.get("late"), t.get("rollouts", 0), t.get("repeating", 0),
                             source=t.get("source", "training"), late_tokens=t.get("late_tokens"))
