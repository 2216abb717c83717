"""Evaluation: threshold choice and per-group fairness with bootstrap intervals, calibration, the report
files, and evaluating exported models on records or a ``predict`` output."""

from kmel import lazy_exports

_EXPORTS = {
    "choose_threshold": "kmel.evaluation.fairness",
    "fairness_report": "kmel.evaluation.fairness",
    "summary_metrics": "kmel.evaluation.fairness",
    "rank_gaps": "kmel.evaluation.fairness",
    "tone_agreement": "kmel.evaluation.fairness",
    "fit_temperature": "kmel.evaluation.calibration",
    "fit_class_temperature": "kmel.evaluation.calibration",
    "diagnosis_metrics": "kmel.evaluation.diagnosis",
    "add_diagnosis_report": "kmel.evaluation.diagnosis",
    "expected_calibration_error": "kmel.evaluation.calibration",
    "calibration_report": "kmel.evaluation.calibration",
    "write_report": "kmel.evaluation.report",
    "evaluate_exported": "kmel.evaluation.evaluate",
    "evaluate_predictions": "kmel.evaluation.evaluate",
    "predict_records": "kmel.evaluation.evaluate",
    "write_split_report": "kmel.evaluation.evaluate",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
