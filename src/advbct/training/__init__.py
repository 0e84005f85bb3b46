"""Training: the loop (``loop.py``) over a run folder, a setup, a step and a logger."""

from advbct.training.loop import train_model
from advbct.training.schedule import learning_rate
from advbct.training.setup import OldModel

__all__ = ["OldModel", "learning_rate", "train_model"]
