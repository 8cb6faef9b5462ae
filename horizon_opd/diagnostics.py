"""Reading the trainer's per-position diagnostic back out of its log history (the paper's Fig. 13)."""

import re


def kl_by_position(log_history: list[dict], prefix: str = "") -> list[dict]:
    """The reverse KL(student || teacher) by rollout position that [`HorizonOPDTrainer`] logged, one row per log entry
    that has it, in log order: `{"step", "horizon", "positions", "kl"}`.

    At each logging step the trainer splits the positions it trained, [0, H) with H = `horizon/kl_span` (the horizon
    `horizon/tokens`, or more with rolling rollouts, whose chunks sit past it), into n equal-width bins and logs
    the mean per-token KL of bin i, positions [i * H / n, (i + 1) * H / n), as `kl_by_position/bin_{i}` (NaN where no
    rollout reached the bin). `kl` lists those n means and `positions` the bin centres (i + 0.5) * H / n in tokens, so
    rows with different horizons share one axis (divide by L = `max_completion_length` for relative position).

    `log_history` is `trainer.state.log_history`. Training entries are read by default; `prefix="eval_"` reads those
    of `trainer.evaluate()` instead, whose rollouts always run to the full horizon L, whatever the training horizon.
    Entries without the diagnostic (the final summary, `position_bins=0`) are skipped.
    """
    bin_key = re.compile(rf"^{re.escape(prefix)}kl_by_position/bin_(\d+)$")
    rows = []
    for entry in log_history:
        bins = sorted((int(m.group(1)), value) for key, value in entry.items() if (m := bin_key.match(key)))
        if not bins or f"{prefix}horizon/tokens" not in entry:
            continue
        n, horizon = len(bins), entry[f"{prefix}horizon/tokens"]
        span = entry.get(f"{prefix}horizon/kl_span", horizon)  # past the horizon for rolled chunks
        rows.append({
            "step": entry.get("step"),
            "horizon": horizon,
            "positions": [(i + 0.5) * span / n for i in range(n)],
            "kl": [value for _, value in bins],
        })
    return rows
