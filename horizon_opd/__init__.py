"""horizon_opd: cheap on-policy distillation by controlling the rollout horizon (arXiv 2605.31490)."""

from .config import HorizonOPDConfig
from .export import merge_adapter
from .horizon import HorizonSchedule, horizon_at, horizon_ratio_at
from .trainer import HorizonOPDTrainer

__version__ = "0.1.0"

__all__ = [
    "HorizonOPDConfig",
    "HorizonOPDTrainer",
    "HorizonSchedule",
    "horizon_at",
    "horizon_ratio_at",
    "merge_adapter",
]
