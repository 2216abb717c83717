"""AdamW with a lower learning rate for pretrained layers than for a new head (discriminative fine-tuning).

Adam moves every weight by about the learning rate per step, whatever the size of its gradient. A
new head needs ~1e-3 to learn in a few hundred steps; at that rate a pretrained convolution kernel
(entries ~0.01–0.05) is rewritten within an epoch, and the ImageNet features are lost (measured:
unfreezing EfficientNet-Lite0's top blocks at 4.5e-4 took the training AUC from 0.69 to 0.52 in one
epoch). One rate cannot serve both, so the rate of every variable outside the head is multiplied
by ``scale``.
"""

from __future__ import annotations

from typing import Any, Sequence

import keras


@keras.saving.register_keras_serializable(package="kmel")
class LayerScaledAdamW(keras.optimizers.AdamW):
    """AdamW whose learning rate is ``scale`` × the schedule's for every variable not in ``full_rate_layers``.

    ``full_rate_layers``: names of the layers (the first part of a variable's path) that learn at the
    full rate — the new head. ``scale`` = 1 is plain AdamW.
    """

    def __init__(self, *args, full_rate_layers: Sequence[str] = (), scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0.0 < float(scale) <= 1.0:
            raise ValueError(f"scale must be in (0, 1], got {scale}")
        self.full_rate_layers = tuple(full_rate_layers)
        self.scale = float(scale)
        self._rate_factors: list[float] = []

    def build(self, variables):
        super().build(variables)
        self._rate_factors = [1.0 if v.path.split("/")[0] in self.full_rate_layers else self.scale
                              for v in variables]

    def rate_factor(self, variable) -> float:
        """The factor for one of the variables the optimizer was built with."""
        return self._rate_factors[self._get_variable_index(variable)]

    def update_step(self, gradient, variable, learning_rate):
        factor = self.rate_factor(variable)
        if factor != 1.0:
            learning_rate = learning_rate * factor
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "full_rate_layers": list(self.full_rate_layers), "scale": self.scale}


def make_classifier_optimizer(cc: Any, total_steps: int) -> LayerScaledAdamW:
    """The optimizer ``fit_classifier`` trains with: a one-cycle schedule to ``max_learning_rate`` over
    ``total_steps``, the head (kmel.models.classifier.HEAD_LAYERS) at the full rate and every pretrained
    layer at ``backbone_lr_scale`` × it (``cc``: a :class:`kmel.config.ClassifierConfig`)."""
    from kmel.models.classifier import HEAD_LAYERS
    from kmel.training.schedules import OneCycleSchedule

    schedule = OneCycleSchedule(cc.max_learning_rate, total_steps=total_steps, warmup_fraction=cc.warmup_fraction)
    return LayerScaledAdamW(schedule, weight_decay=cc.weight_decay, full_rate_layers=HEAD_LAYERS,
                            scale=cc.backbone_lr_scale)
