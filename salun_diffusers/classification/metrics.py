"""SalUn's classifier metrics: UA, RA, TA, MIA-efficacy, average gap to Retrain, and the result tables.

All metrics are percentages (0-100) as in the paper:

* UA  -- unlearning accuracy, ``100 - accuracy on the forget set``;
* RA  -- accuracy on the retain set;
* TA  -- test accuracy (class-wise forgetting: test samples of the remaining classes only);
* MIA -- MIA-efficacy: a confidence-based membership-inference attacker is trained to tell retain samples
  (members) from test samples (non-members); MIA is the share of forget samples it calls non-members;
* average gap -- mean over (UA, RA, TA, MIA) of ``|metric - Retrain's metric|``.

The attacker (``mia="svc"``, the default) is the paper's: scikit-learn ``SVC(C=3, gamma="auto", kernel="rbf")``
fitted on the softmax confidence of the true class, members vs non-members, and MIA-efficacy is the share of forget
samples it predicts as non-members (OPTML-Group/Unlearn-Saliency@a6e89fd, Classification/evaluation/SVC_MIA.py:53-82,
105-108, 130-132; main_random.py:165-185: shadow members = as many retain samples as there are test samples).
``mia="threshold"`` is the project's earlier attacker: the cut on the same confidence (equivalently on the per-sample
loss ``-log p_true``) with the best balanced accuracy, computed exactly, without scikit-learn.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch.nn import functional as F

METRICS = ("UA", "RA", "TA", "MIA")
MIA_ATTACKS = ("svc", "threshold")


@torch.no_grad()
def predict_logits(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Logits of ``model`` (in eval mode) on ``x``, returned on the CPU as float32."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent (NaN for an empty set)."""
    if len(labels) == 0:
        return float("nan")
    return 100.0 * (logits.argmax(1) == labels.to(logits.device)).double().mean().item()


def true_class_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample ``-log p_true`` in float64 (keeps confidences near 1 apart), on the CPU."""
    logp = F.log_softmax(logits.double(), dim=1)
    return -logp.gather(1, labels.view(-1, 1).long().to(logp.device)).squeeze(1).cpu()


def fit_confidence_threshold(member_loss: torch.Tensor, nonmember_loss: torch.Tensor) -> float:
    """The loss threshold ``t`` (predict non-member when loss > t) with the best balanced accuracy on the shadow sets.

    Exact: every cut between consecutive sorted values is tried; ties go to the lowest threshold. The cut is placed
    midway between the two neighbouring values.
    """
    values = torch.cat([member_loss, nonmember_loss]).double()
    is_member = torch.cat([torch.ones(len(member_loss)), torch.zeros(len(nonmember_loss))]).double()
    order = torch.argsort(values, stable=True)
    values, is_member = values[order], is_member[order]
    # cut after position i: samples 0..i are called members
    tpr = torch.cumsum(is_member, 0) / len(member_loss)            # members called members
    tnr = 1 - torch.cumsum(1 - is_member, 0) / len(nonmember_loss)  # non-members called non-members
    balanced = (tpr + tnr) / 2
    valid = torch.ones_like(balanced, dtype=torch.bool)
    valid[:-1] = values[1:] > values[:-1]  # only cut between distinct values
    balanced[~valid] = -1.0
    i = int(torch.nonzero(balanced >= balanced.max() - 1e-12)[0])  # first (lowest) of the best cuts
    if i == len(values) - 1 or balanced[i] <= 0.5:  # no cut beats calling everyone a member or everyone a non-member
        return float(values[-1])
    return float((values[i] + values[i + 1]) / 2)


def true_class_confidence(logits: torch.Tensor, labels: torch.Tensor) -> "np.ndarray":
    """Softmax probability of the true class, ``[N, 1]`` float64 (the official attack's "confidence" feature)."""
    return torch.exp(-true_class_loss(logits, labels)).numpy().reshape(-1, 1)


def svc_mia_efficacy(member_logits, member_labels, nonmember_logits, nonmember_labels, target_logits,
                     target_labels) -> float:
    """The paper's attack: ``SVC(C=3, gamma="auto", kernel="rbf")`` on the true-class confidence of members (label 1)
    and non-members (label 0); returns the percent of target samples it predicts as non-members."""
    try:
        from sklearn.svm import SVC
    except ImportError:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("the SVC membership attack needs scikit-learn: pip install scikit-learn "
                          "(or pass mia='threshold')") from None
    x = np.concatenate([true_class_confidence(member_logits, member_labels),
                        true_class_confidence(nonmember_logits, nonmember_labels)])
    if not np.isfinite(x).all():
        raise FloatingPointError("the model's outputs are not finite; the membership attack cannot be fitted")
    y = np.concatenate([np.ones(len(member_labels)), np.zeros(len(nonmember_labels))])
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
    return 100.0 * float(1.0 - clf.predict(true_class_confidence(target_logits, target_labels)).mean())


def mia_efficacy(member_logits: torch.Tensor, member_labels: torch.Tensor, nonmember_logits: torch.Tensor,
                 nonmember_labels: torch.Tensor, target_logits: torch.Tensor, target_labels: torch.Tensor,
                 attack: str = "svc") -> float:
    """Percent of the target (forget) samples that a membership attacker calls non-members.

    The attacker is fitted on members (retain samples) vs non-members (test samples): ``attack="svc"`` is the
    paper's :func:`svc_mia_efficacy`, ``"threshold"`` the best cut of :func:`fit_confidence_threshold`.
    """
    if len(member_labels) == 0 or len(nonmember_labels) == 0:
        raise ValueError("the MIA attacker needs both member (retain) and non-member (test) samples")
    if attack not in MIA_ATTACKS:
        raise ValueError(f"unknown MIA attack {attack!r}; use one of {MIA_ATTACKS}")
    if attack == "svc":
        return svc_mia_efficacy(member_logits, member_labels, nonmember_logits, nonmember_labels, target_logits,
                                target_labels)
    threshold = fit_confidence_threshold(true_class_loss(member_logits, member_labels),
                                         true_class_loss(nonmember_logits, nonmember_labels))
    return 100.0 * (true_class_loss(target_logits, target_labels) > threshold).double().mean().item()


@torch.no_grad()
def evaluate_unlearning(model: torch.nn.Module, train_x: torch.Tensor, train_y: torch.Tensor,
                        forget_idx: torch.Tensor, retain_idx: torch.Tensor, test_x: torch.Tensor,
                        test_y: torch.Tensor, *, forget_class: Optional[int] = None, seed: int = 0,
                        batch_size: int = 1000, mia: str = "svc") -> Dict[str, float]:
    """UA, RA, TA and MIA (percent) of ``model`` for one forget/retain split.

    With ``forget_class`` (class-wise forgetting), TA and the attacker's non-member set use only test samples of the
    other classes. The attacker's member set is a seeded random subset of the retain set as large as that test set.
    """
    if forget_class is not None:
        keep = test_y != forget_class
        test_x, test_y = test_x[keep], test_y[keep]
    forget_logits = predict_logits(model, train_x[forget_idx], batch_size)
    test_logits = predict_logits(model, test_x, batch_size)
    retain_logits = predict_logits(model, train_x[retain_idx], batch_size)
    retain_y = train_y[retain_idx]
    shadow = torch.randperm(len(retain_idx), generator=torch.Generator().manual_seed(seed))[:len(test_y)]
    if mia not in MIA_ATTACKS:
        raise ValueError(f"unknown MIA attack {mia!r}; use one of {MIA_ATTACKS}")
    attacks = {f"MIA_{a}": mia_efficacy(retain_logits[shadow], retain_y[shadow], test_logits, test_y,
                                        forget_logits, train_y[forget_idx], attack=a) for a in MIA_ATTACKS}
    return {
        "UA": 100.0 - accuracy(forget_logits, train_y[forget_idx]),
        "RA": accuracy(retain_logits, retain_y),
        "TA": accuracy(test_logits, test_y),
        "MIA": attacks[f"MIA_{mia}"],
        **attacks,  # both attackers' efficacy, for comparison (MIA is the one the gap uses)
    }


def average_gap(metrics: Mapping[str, float], reference: Mapping[str, float], keys: Sequence[str] = METRICS) -> float:
    """Mean over ``keys`` of ``|metrics[k] - reference[k]|`` (SalUn's "Avg. Gap" to Retrain)."""
    return sum(abs(metrics[k] - reference[k]) for k in keys) / len(keys)


def _mean_std(values: Iterable[float]):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


SUMMARY_KEYS = METRICS + ("gap", "rte")


def summarize(runs: Sequence[Mapping[str, Mapping[str, float]]]) -> Dict[str, Dict[str, List[Optional[float]]]]:
    """``runs``: one ``{method: {metric: value}}`` per seed -> ``{method: {metric: [mean, std]}}`` (sample std)."""
    methods: List[str] = []
    for run in runs:
        methods += [m for m in run if m not in methods]
    return {m: {k: list(_mean_std(run[m].get(k) for run in runs if m in run)) for k in SUMMARY_KEYS}
            for m in methods}


def format_table(summary: Mapping[str, Mapping[str, Sequence[Optional[float]]]], title: str = "") -> str:
    """Markdown table: UA, RA, TA, MIA-Efficacy, Avg. Gap (percent points) and RTE (seconds), mean ± std."""
    def cell(pair, digits):
        mean, std = pair
        return "–" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"

    lines = [f"**{title}**", ""] if title else []
    lines += ["| Method | UA | RA | TA | MIA-Efficacy | Avg. Gap ↓ | RTE (s) |", "|---|---|---|---|---|---|---|"]
    for method, row in summary.items():
        cells = [cell(row[k], 2) for k in METRICS] + [cell(row["gap"], 2), cell(row["rte"], 1)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
