"""One-cycle learning rate (Smith & Topin, 2018) as a graph-safe Keras schedule."""

from __future__ import annotations

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kmel")
class OneCycleSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Cosine warm-up from ``max_lr / div_factor`` to ``max_lr`` over ``warmup_fraction`` of the steps,
    then cosine annealing to ``max_lr / (div_factor · final_div_factor)`` at ``total_steps``; constant after."""

    def __init__(self, max_lr: float, total_steps: int, warmup_fraction: float = 0.3, div_factor: float = 25.0,
                 final_div_factor: float = 1e4):
        self.max_lr = float(max_lr)
        self.total_steps = max(1, int(total_steps))
        self.warmup_fraction = float(warmup_fraction)
        self.div_factor = float(div_factor)
        self.final_div_factor = float(final_div_factor)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        start = self.max_lr / self.div_factor
        end = start / self.final_div_factor
        warm = max(1.0, self.warmup_fraction * self.total_steps)
        rest = max(1.0, self.total_steps - warm)
        up = ops.clip(step / warm, 0.0, 1.0)
        down = ops.clip((step - warm) / rest, 0.0, 1.0)
        warm_lr = start + (self.max_lr - start) * (1 - ops.cos(math.pi * up)) / 2
        anneal_lr = end + (self.max_lr - end) * (1 + ops.cos(math.pi * down)) / 2
        return ops.where(step < warm, warm_lr, anneal_lr)

    def get_config(self):
        return {"max_lr": self.max_lr, "total_steps": self.total_steps, "warmup_fraction": self.warmup_fraction,
                "div_factor": self.div_factor, "final_div_factor": self.final_div_factor}
