"""Training loop and schedules."""

from advbct.training.loop import OldModel, resolve_device, train_model
from advbct.training.schedule import learning_rate

__all__ = ["OldModel", "learning_rate", "resolve_device", "train_model"]
