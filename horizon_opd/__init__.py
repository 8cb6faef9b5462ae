"""horizon_opd: cheap on-policy distillation by controlling the rollout horizon (arXiv 2605.31490).

The library: `HorizonOPDConfig` and `HorizonOPDTrainer`, the horizon policies, the per-position diagnostics and
`merge_adapter`. The embedded demo (task, bundled models, the OPD/TOPD/POPD comparison) lives in `horizon_opd.demo`.
"""

from .callbacks import HeldOutEvalCallback
from .config import HorizonOPDConfig
from .diagnostics import kl_by_position
from .export import merge_adapter
from .horizon import (
    HORIZON_POLICIES,
    AdaptiveHorizon,
    AnchoredHorizon,
    HorizonPolicy,
    ProgressiveHorizon,
    TruncatedHorizon,
    horizon_at,
)
from .trainer import HorizonOPDTrainer

__version__ = "0.2.0"

__all__ = [
    "HORIZON_POLICIES",
    "AdaptiveHorizon",
    "AnchoredHorizon",
    "HeldOutEvalCallback",
    "HorizonOPDConfig",
    "HorizonOPDTrainer",
    "HorizonPolicy",
    "ProgressiveHorizon",
    "TruncatedHorizon",
    "horizon_at",
    "kl_by_position",
    "merge_adapter",
]
