"""SalUn's classifier metrics: UA, RA, TA, MIA-efficacy, average gap to Retrain, and the result tables.

All metrics are percentages (0-100) as in the paper:

* UA  -- unlearning accuracy, ``100 - accuracy on the forget set``;
* RA  -- accuracy on the retain set;
* TA  -- test accuracy (class-wise forgetting: test samples of the remaining classes only);
* MIA -- MIA-efficacy: a confidence-based membership-inference attacker is trained to tell retain samples
  (members) from test samples (non-members); MIA is the share of forget samples it calls non-members;
* average gap -- mean over (UA, RA, TA, MIA) of ``|metric - Retrain's metric|``.

The attacker is a logistic regression (fitted by Newton's method, no scikit-learn needed) on two per-sample
features of the model's softmax output: the log of the cross-entropy loss (``-log p_true``) and the log of the
prediction entropy. The log spreads the near-1 confidences of a well-trained model, where members and non-members
differ. The paper's code uses an RBF SVM on the confidence; on one monotone feature both reduce to a threshold.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch.nn import functional as F

METRICS = ("UA", "RA", "TA", "MIA")


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


def membership_features(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[N, 2]`` float64: log(-log p_true) and log(entropy), from the softmax of ``logits``."""
    logp = F.log_softmax(logits.double(), dim=1)
    loss = -logp.gather(1, labels.view(-1, 1).long().to(logp.device)).squeeze(1)
    entropy = -(logp.exp() * logp).sum(1)
    return torch.stack([loss.clamp_min(1e-30).log(), entropy.clamp_min(1e-30).log()], 1).cpu()


class LogisticAttack:
    """L2-regularised logistic regression on standardised features, fitted by Newton's method."""

    def __init__(self, l2: float = 1e-3, iterations: int = 50):
        self.l2, self.iterations = l2, iterations

    def fit(self, features: torch.Tensor, is_member: torch.Tensor) -> "LogisticAttack":
        x = features.double()
        self.mean = x.mean(0)
        self.std = x.std(0).where(x.std(0) > 1e-12, torch.ones_like(self.mean))
        a = torch.cat([(x - self.mean) / self.std, torch.ones(len(x), 1, dtype=torch.float64)], 1)
        t = is_member.double()
        w = torch.zeros(a.shape[1], dtype=torch.float64)
        reg = torch.full_like(w, self.l2 * len(x))
        reg[-1] = 0.0  # no penalty on the bias
        for _ in range(self.iterations):
            p = torch.sigmoid(a @ w)
            grad = a.T @ (p - t) + reg * w
            hess = (a * (p * (1 - p)).unsqueeze(1)).T @ a + torch.diag(reg) + 1e-9 * torch.eye(len(w), dtype=w.dtype)
            step = torch.linalg.solve(hess, grad)
            w = w - step
            if step.abs().max() < 1e-10:
                break
        self.weight = w
        return self

    def member_probability(self, features: torch.Tensor) -> torch.Tensor:
        a = (features.double() - self.mean) / self.std
        return torch.sigmoid(a @ self.weight[:-1] + self.weight[-1])


def mia_efficacy(member_logits: torch.Tensor, member_labels: torch.Tensor, nonmember_logits: torch.Tensor,
                 nonmember_labels: torch.Tensor, target_logits: torch.Tensor, target_labels: torch.Tensor) -> float:
    """Percent of the target (forget) samples that an attacker trained on members vs non-members calls non-member."""
    if len(member_labels) == 0 or len(nonmember_labels) == 0:
        raise ValueError("the MIA attacker needs both member (retain) and non-member (test) samples")
    feats = torch.cat([membership_features(member_logits, member_labels),
                       membership_features(nonmember_logits, nonmember_labels)])
    is_member = torch.cat([torch.ones(len(member_labels)), torch.zeros(len(nonmember_labels))])
    attack = LogisticAttack().fit(feats, is_member)
    p = attack.member_probability(membership_features(target_logits, target_labels))
    return 100.0 * (p < 0.5).double().mean().item()


@torch.no_grad()
def evaluate_unlearning(model: torch.nn.Module, train_x: torch.Tensor, train_y: torch.Tensor,
                        forget_idx: torch.Tensor, retain_idx: torch.Tensor, test_x: torch.Tensor,
                        test_y: torch.Tensor, *, forget_class: Optional[int] = None, seed: int = 0,
                        batch_size: int = 1000) -> Dict[str, float]:
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
    return {
        "UA": 100.0 - accuracy(forget_logits, train_y[forget_idx]),
        "RA": accuracy(retain_logits, retain_y),
        "TA": accuracy(test_logits, test_y),
        "MIA": mia_efficacy(retain_logits[shadow], retain_y[shadow], test_logits, test_y,
                            forget_logits, train_y[forget_idx]),
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
