"""Expert trajectories: training experts (``train``) and the sharded store they are saved in (``store``)."""

from engine.trajectories.store import (
    ExpertStatus,
    LeaseLost,
    StoreMismatch,
    TrajectoryStore,
    param_infos,
    record_expert,
)
from engine.trajectories.train import (
    ExpertConfig,
    ExpertData,
    TrainState,
    build_seeded,
    infonce_loss,
    train_expert,
)

__all__ = [
    "ExpertConfig",
    "ExpertData",
    "ExpertStatus",
    "LeaseLost",
    "StoreMismatch",
    "TrainState",
    "TrajectoryStore",
    "build_seeded",
    "infonce_loss",
    "param_infos",
    "record_expert",
    "train_expert",
]
