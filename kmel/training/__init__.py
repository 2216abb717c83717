"""Training: ``fit_segmenter`` and ``fit_classifier`` with their losses, callbacks, schedules, optimizer and
distribution strategies."""

from kmel import lazy_exports

_EXPORTS = {
    "fit_fusion": "kmel.training.fusion",
    "fit_segmenter": "kmel.training.train",
    "fit_classifier": "kmel.training.train",
    "clear_training_state": "kmel.training.train",
    "weights_digest": "kmel.training.train",
    "TverskyLoss": "kmel.training.losses",
    "DiceCoefficient": "kmel.training.losses",
    "IoUScore": "kmel.training.losses",
    "ThresholdedJaccard": "kmel.training.losses",
    "SparseFocalCrossentropy": "kmel.training.losses",
    "make_classifier_metrics": "kmel.training.metrics",
    "OneCycleSchedule": "kmel.training.schedules",
    "LayerScaledAdamW": "kmel.training.optimizers",
    "make_strategy": "kmel.training.distribute",
    "set_precision": "kmel.training.distribute",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
