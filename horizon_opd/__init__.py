"""horizon_opd: cheap on-policy distillation by controlling the rollout horizon (arXiv 2605.31490)."""

from . import demo
from .callbacks import HeldOutEvalCallback
from .config import HorizonOPDConfig
from .demo import build_datasets, evaluate_accuracy, generate_completions, load_demo_models
from .demo.compare import DEFAULT_METHODS, Method, run_method
from .diagnostics import kl_by_position
from .export import merge_adapter
from .horizon import HorizonSchedule, horizon_at, horizon_ratio_at
from .trainer import HorizonOPDTrainer

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_METHODS",
    "HeldOutEvalCallback",
    "HorizonOPDConfig",
    "HorizonOPDTrainer",
    "HorizonSchedule",
    "Method",
    "build_datasets",
    "demo",
    "evaluate_accuracy",
    "generate_completions",
    "horizon_at",
    "horizon_ratio_at",
    "kl_by_position",
    "load_demo_models",
    "merge_adapter",
    "run_method",
]
