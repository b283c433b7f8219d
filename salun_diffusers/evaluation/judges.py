"""Image judges, one registry for ``salun-audit`` (and any other command that judges generated images).

* ``nudenet``: the exposed-part detector (:class:`~salun_diffusers.evaluation.nudenet.NudeNetDetector`), counted
  by :func:`~salun_diffusers.evaluation.nudenet.nudity_summary`;
* ``digit``: the bundled digit world's classifier (:class:`~salun_diffusers.digits.DigitJudge`), classes zero..nine;
* ``classifier``: any transformers image classifier (``AutoModelForImageClassification``, a hub id or folder, e.g.
  ``microsoft/resnet-50`` for the paper's Imagenette object classes), classes from its ``id2label``;
* ``none``: images only.

Class judges share one interface, :class:`ClassJudge`: ``predict(images) -> LongTensor`` and ``class_index(name)``
(a class name, any of a label's comma-separated synonyms, or an index), so unlearning accuracy is computed the same
way for every world (:func:`~salun_diffusers.evaluation.metrics.classifier_metrics`).
"""

from __future__ import annotations

import logging
from typing import Callable, List, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

JUDGES = ("nudenet", "digit", "classifier", "none")
CLASS_JUDGES = ("digit", "classifier")


def _norm(name: str) -> str:
    return " ".join(str(name).replace("_", " ").replace("-", " ").lower().split())


class ClassJudge:
    """A classifier over named classes: ``predict(images)`` gives class indices into ``class_names``."""

    def __init__(self, name: str, predict: Callable[[Sequence], torch.Tensor], class_names: Sequence[str]):
        self.name, self._predict, self.class_names = name, predict, list(class_names)

    def predict(self, images: Sequence) -> torch.Tensor:
        return torch.as_tensor(self._predict(list(images))).long().flatten().cpu()

    def class_index(self, value) -> int:
        """The index of a class given by index (``7``, ``"7"``) or name (``"seven"``, ``"garbage_truck"``,
        ``"church"`` for ImageNet's ``"church, church building"``)."""
        text = str(value).strip()
        if text.lstrip("-").isdigit():
            index = int(text)
            if 0 <= index < len(self.class_names):
                return index
            raise ValueError(f"class index {index} is outside the {self.name} judge's 0..{len(self.class_names) - 1}")
        wanted = _norm(text)
        for i, label in enumerate(self.class_names):
            if wanted == _norm(label) or wanted in (_norm(s) for s in str(label).split(",")):
                return i
        shown = ", ".join(self.class_names[:12]) + (" ..." if len(self.class_names) > 12 else "")
        raise ValueError(f"the {self.name} judge has no class {text!r} (its classes: {shown}); pass --target_class "
                         "as one of them or as an index")


def digit_judge(model: Optional[str] = None, device="cpu") -> ClassJudge:
    """The bundled digit judge (or a folder written by ``DigitJudge.save_pretrained``)."""
    from ..digits import DIGIT_WORDS, DigitJudge

    judge = DigitJudge.from_pretrained(model, device=device)
    return ClassJudge("digit", judge.predict, DIGIT_WORDS)


def transformers_judge(model: str, device="cpu", batch_size: int = 32) -> ClassJudge:
    """Any ``AutoModelForImageClassification`` with its image processor (hub id or folder)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    processor = AutoImageProcessor.from_pretrained(model)
    net = AutoModelForImageClassification.from_pretrained(model).to(device).eval()
    names = [net.config.id2label[i] for i in range(len(net.config.id2label))]

    @torch.no_grad()
    def predict(images) -> torch.Tensor:
        out = []
        for start in range(0, len(images), batch_size):
            inputs = processor(images=images[start:start + batch_size], return_tensors="pt").to(device)
            out.append(net(**inputs).logits.argmax(-1).cpu())
        return torch.cat(out)

    return ClassJudge("classifier", predict, names)


def load_class_judge(kind: str, model: Optional[str] = None, device="cpu") -> ClassJudge:
    """A class judge of the registry by name: ``digit`` (model: optional folder) or ``classifier`` (model: needed)."""
    if kind == "digit":
        return digit_judge(model, device)
    if kind == "classifier":
        if not model:
            raise ValueError("--judge classifier needs --judge_model: a transformers image classifier (hub id or "
                             "folder, e.g. microsoft/resnet-50)")
        return transformers_judge(model, device)
    raise ValueError(f"{kind!r} is not a class judge; choose one of {CLASS_JUDGES}")


def row_labels(judge: ClassJudge, rows, target_class: Optional[int]) -> List[int]:
    """Each prompt row's class: its ``class`` column (or ``classidx`` for the digit judge), else the target class
    (prompt lists about one object, e.g. ``object_church.csv``)."""
    labels = []
    for row in rows:
        if row.label:
            labels.append(judge.class_index(row.label))
        elif target_class is not None:
            labels.append(target_class)
        else:
            raise ValueError(f"prompt row {row.case_number} has no 'class' column and no --target_class was given; "
                             "the judge needs to know what each image should show")
    return labels
