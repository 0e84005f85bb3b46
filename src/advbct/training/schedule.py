"""Learning-rate schedule: optional linear warm-up, then multi-step decay at epoch milestones.

A pure function of the global step, so a resumed run continues on exactly the same curve.
"""

from __future__ import annotations

from advbct.config import OptimConfig


def learning_rate(cfg: OptimConfig, global_step: int, steps_per_epoch: int) -> float:
    """The rate of ``global_step``: ``lr`` times ``gamma`` per milestone passed, ramped up linearly over the
    warm-up epochs."""
    epoch = global_step // max(1, steps_per_epoch)
    lr = cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    if global_step < warmup_steps:
        lr *= (global_step + 1) / warmup_steps
    return lr
