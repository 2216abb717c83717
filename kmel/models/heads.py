"""What a classifier's output means: one sigmoid probability (the yes/no tasks) or a softmax over diagnosis
classes, from which the malignant probability is the sum over the malignant classes.

One :class:`ClassifierHead` is read from the records' manifest when training and from ``pipeline.json`` when
serving, and passed down: everything after the model (threshold, calibration, fairness report, predict's
``probability``) works on :meth:`ClassifierHead.malignant_probability`, for either kind of head. Which class a
diagnosis head names is :meth:`ClassifierHead.decide`, everywhere a ``diagnosis`` is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from kmel.config import ConfigError


@dataclass(frozen=True)
class ClassifierHead:
    """``task``; for ``diagnosis`` the ``classes`` in output order, the ``malignant_classes`` among them and
    ``class_draw_share``: each class's share of the training draws (in output order; None when not recorded).

    The shares say how a decision is made, not what the outputs mean: two heads differing only in them are equal
    (records labelled for a head suit it whatever its training drew)."""

    task: str = "malignant"
    classes: tuple[str, ...] = ()
    malignant_classes: tuple[str, ...] = ()
    class_draw_share: tuple[float, ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.task == "diagnosis":
            if len(self.classes) < 2 or not set(self.malignant_classes) <= set(self.classes) or not self.malignant_classes:
                raise ValueError(f"a diagnosis head needs >= 2 classes and malignant classes among them, got "
                                 f"{list(self.classes)} / {list(self.malignant_classes)}")
            share = self.class_draw_share
            if share is not None and (len(share) != len(self.classes) or min(share) < 0 or not max(share) > 0):
                raise ValueError(f"class_draw_share needs one share >= 0 per class {list(self.classes)}, got "
                                 f"{list(share)}")
        elif self.classes or self.class_draw_share is not None:
            raise ValueError(f"task {self.task!r} has one output; classes are for the diagnosis task")

    @property
    def multiclass(self) -> bool:
        return self.task == "diagnosis"

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.multiclass else 1

    @property
    def malignant_index(self) -> list[int]:
        return [i for i, name in enumerate(self.classes) if name in self.malignant_classes]

    @property
    def class_columns(self) -> list[str]:
        """``p_<CLASS>`` for each class (predict's and the report's per-class columns); [] for one output."""
        return [f"p_{name}" for name in self.classes]

    @property
    def class_names(self) -> list[str]:
        """Names of the decision's two sides (binary) or of the classes (diagnosis)."""
        if self.multiclass:
            return list(self.classes)
        return ["benign", "malignant"] if self.task == "malignant" else ["other", self.task]

    def class_index(self, name: str) -> int:
        """The output index of class ``name`` (any case) of a diagnosis head; a clear error otherwise."""
        if not self.multiclass:
            raise ConfigError(f"--explain-class {name}: these models answer yes/no ({self.task}); only a diagnosis "
                              "model (build-records --task diagnosis) has classes to explain")
        if str(name).upper() not in self.classes:
            raise ConfigError(f"--explain-class {name}: not one of the model's classes {list(self.classes)}")
        return self.classes.index(str(name).upper())

    @property
    def decision_rule(self) -> str:
        """How :meth:`decide` names a class, in words (the report and the model card say it)."""
        if not self.multiclass:
            return "probability >= threshold"
        if self.class_draw_share is None:
            return "arg-max of p_c (no training draw shares recorded)"
        return "arg-max of p_c / q_c (q_c: the class's share of the training draws)"

    def decide(self, probabilities: Any) -> np.ndarray:
        """[N] class indices a diagnosis head names for [N, K] class probabilities.

        The softmax learned its posteriors under the training draws' class prior q (class-balanced sampling), so
        p_c / q_c is proportional to the class likelihood, whose arg-max maximises the mean per-class recall
        (balanced multiclass accuracy, the ISIC 2018 / 2019 metric); the arg-max of p favours the classes drawn
        most. A class never drawn (q_c = 0) is never named. Without shares (models from before they were
        recorded): the arg-max of p."""
        if not self.multiclass:
            raise ValueError(f"task {self.task!r} has one output: its decision is the threshold, not a class")
        p = np.asarray(probabilities, dtype=np.float64).reshape(-1, self.n_outputs)
        if self.class_draw_share is None:
            return p.argmax(axis=1)
        q = np.asarray(self.class_draw_share, dtype=np.float64)
        drawn = q > 0
        score = np.full_like(p, -np.inf)
        score[:, drawn] = p[:, drawn] / q[drawn]
        return score.argmax(axis=1)

    def malignant_probability(self, outputs: Any) -> np.ndarray:
        """[N] probabilities of the malignant side from the model's [N, 1] / [N] or [N, K] outputs."""
        out = np.asarray(outputs, dtype=np.float64)
        if not self.multiclass:
            return out.reshape(-1)
        return out.reshape(-1, self.n_outputs)[:, self.malignant_index].sum(axis=1)

    def malignant_target(self, targets: Any) -> np.ndarray:
        """[N] 0/1 truths of the malignant side from record targets (0/1, or class indices)."""
        t = np.asarray(targets).reshape(-1).astype(int)
        return np.isin(t, self.malignant_index).astype(int) if self.multiclass else t

    def to_entry(self) -> dict[str, Any]:
        """The keys ``pipeline.json``'s classifier entry holds for the head."""
        entry: dict[str, Any] = {"task": self.task, "class_names": self.class_names}
        if self.multiclass:
            entry["malignant_classes"] = list(self.malignant_classes)
            if self.class_draw_share is not None:
                entry["class_draw_share"] = dict(zip(self.classes, self.class_draw_share))
        return entry


def head_from_manifest(manifest: Mapping[str, Any]) -> ClassifierHead:
    """The head a record set's labels call for (build-records wrote its task and classes)."""
    task = str(manifest.get("task", "malignant"))
    if task == "diagnosis":
        return ClassifierHead(task, tuple(manifest["classes"]), tuple(manifest["malignant_classes"]))
    return ClassifierHead(task)


def head_from_entry(entry: Mapping[str, Any]) -> ClassifierHead:
    """The head of an exported classifier (``pipeline.json``; entries from before the diagnosis task are binary,
    diagnosis entries from before ``class_draw_share`` was recorded decide by the plain arg-max)."""
    task = str(entry.get("task", "malignant"))
    if task == "diagnosis":
        classes = tuple(entry["class_names"])
        shares = entry.get("class_draw_share")
        if shares is not None:
            missing = [c for c in classes if c not in shares]
            if missing:
                raise ConfigError(f"pipeline.json: the classifier's class_draw_share has no share for {missing}")
            shares = tuple(float(shares[c]) for c in classes)
        return ClassifierHead(task, classes, tuple(entry["malignant_classes"]), shares)
    return ClassifierHead(task)
