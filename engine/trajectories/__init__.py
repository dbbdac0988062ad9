"""Expert trajectories: training experts (``train``, ``experts``), the sharded store they are saved in
(``store`` reads it, ``writer`` writes it, ``lease`` shares the work between writers)."""

from engine.trajectories.lease import LeaseLost
from engine.trajectories.store import ExpertStatus, StoreMismatch, TrajectoryStore, param_infos
from engine.trajectories.train import ExpertConfig, ExpertData, TrainState, train_expert
from engine.trajectories.writer import StoreWriter, record_expert

__all__ = [
    "ExpertConfig",
    "ExpertData",
    "ExpertStatus",
    "LeaseLost",
    "StoreMismatch",
    "StoreWriter",
    "TrainState",
    "TrajectoryStore",
    "param_infos",
    "record_expert",
    "train_expert",
]
