"""Machine-unlearning methods for image classifiers, sharing one training loop.

=========  =====================================================================================================
retrain    train a fresh model on the retain set only (the gold standard the others are compared with)
ft         fine-tune on the retain set
rl         random labels: each epoch one pass over the forget set with random labels, then one over the retain set
ga         gradient ascent on the forget-set cross-entropy
l1         FT with an l1 penalty on the weights (the "l1-sparse" baseline; its weight decays linearly to 0)
salun      SalUn: a mask of the weights most salient for the forget loss (``compute_saliency`` + top-k
           ``mask_from_saliency``), then RL updating the masked weights only (``MaskedUpdate``)
=========  =====================================================================================================

Entry point: :func:`unlearn`. Every method except ``retrain`` starts from a copy of the given (original) model.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..masking import MaskedUpdate, mask_density, mask_from_saliency
from ..saliency import compute_saliency
from .data import iterate_batches

logger = logging.getLogger(__name__)

METHODS = ("retrain", "ft", "rl", "ga", "l1", "salun")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine")
AUGMENTS = ("crop_flip", "crop", "none")
RL_SCHEMES = ("official", "mixed")
Batch = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class MethodConfig:
    """Hyperparameters of one training / unlearning run (each method uses the fields that apply to it)."""

    epochs: int = field(default=5, metadata={"help": "passes over the method's training data"})
    lr: float = field(default=0.01, metadata={"help": "learning rate"})
    batch_size: int = field(default=256, metadata={"help": "mini-batch size (official: 256, arg_parser.py:69)"})
    optimizer: str = field(default="sgd", metadata={"help": "sgd (momentum) or adamw"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "weight decay (decoupled for adamw)"})
    schedule: str = field(default="constant", metadata={"help": "learning-rate schedule: constant or cosine"})
    l1_alpha: float = field(default=5e-4, metadata={"help": "l1: initial weight of the l1 penalty"})
    mask_ratio: float = field(default=0.5, metadata={"help": "salun: share of weights updated (top saliency)"})
    mask_scope: str = field(default="global", metadata={"help": "salun: top-k over all weights or per layer"})
    augment: str = field(default="crop_flip", metadata={
        "help": "training-batch augmentation: crop_flip = random crop (zero padding crop_padding) + horizontal flip, "
                "the official train transform (Classification/dataset.py:549-555); crop; none"})
    crop_padding: int = field(default=4, metadata={"help": "padding of the random crop (official: 4)"})
    rl_scheme: str = field(default="official", metadata={
        "help": "rl/salun relabelling. official (Classification/unlearn/RL.py:123-159, the CIFAR-10 path): each epoch "
                "one pass over the forget set with labels drawn uniformly from all classes per batch, then one pass "
                "over the retain set; mixed: forget samples with random *wrong* labels shuffled into the retain set"})

    def __post_init__(self):
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; use one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; use one of {SCHEDULES}")
        if self.weight_decay < 0 or self.l1_alpha < 0 or not 0 <= self.momentum < 1:
            raise ValueError("weight_decay and l1_alpha must be >= 0 and momentum in [0, 1)")
        if not 0.0 < self.mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1], got {self.mask_ratio}")
        if self.mask_scope not in ("global", "layer"):
            raise ValueError(f"mask_scope must be 'global' or 'layer', got {self.mask_scope!r}")
        if self.augment not in AUGMENTS or self.rl_scheme not in RL_SCHEMES or self.crop_padding < 0:
            raise ValueError(f"augment must be one of {AUGMENTS}, rl_scheme one of {RL_SCHEMES} and crop_padding "
                             f">= 0; got {self.augment!r}, {self.rl_scheme!r}, {self.crop_padding}")

    def replace(self, **changes) -> "MethodConfig":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            valid = [f.name for f in dataclasses.fields(self)]
            raise ValueError(f"unknown hyperparameter(s) {unknown}; valid: {valid}")
        return dataclasses.replace(self, **changes)


@dataclass
class UnlearnResult:
    model: torch.nn.Module
    seconds: float
    mask: Optional[Dict[str, torch.Tensor]] = None
    info: Dict[str, float] = field(default_factory=dict)


def make_classifier_optimizer(params, cfg: MethodConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def random_wrong_labels(labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random label different from the true one, for every sample."""
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    return (labels + shift) % num_classes


def random_labels(labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """A label drawn uniformly from all ``num_classes`` (the true one included), as the official RL does."""
    return torch.randint(0, num_classes, labels.shape, generator=generator)


def shuffled_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator) -> List[Batch]:
    return [(x[i], y[i]) for i in iterate_batches(len(y), batch_size, generator)]


def relabel_epoch(forget: Batch, retain: Batch, cfg: MethodConfig, num_classes: int,
                  generator: torch.Generator) -> List[Batch]:
    """One epoch of RL / SalUn batches, fresh random labels each call.

    ``cfg.rl_scheme == "official"`` (Classification/unlearn/RL.py:123-159): the shuffled forget set with labels drawn
    uniformly from all classes, then the shuffled retain set. ``"mixed"``: forget samples with random *wrong* labels
    shuffled together with the retain set.
    """
    (fx, fy), (rx, ry) = forget, retain
    if cfg.rl_scheme == "official":
        return (shuffled_batches(fx, random_labels(fy, num_classes, generator), cfg.batch_size, generator)
                + shuffled_batches(rx, ry, cfg.batch_size, generator))
    x = torch.cat([fx, rx])
    y = torch.cat([random_wrong_labels(fy, num_classes, generator), ry])
    return shuffled_batches(x, y, cfg.batch_size, generator)


def black_level(x: torch.Tensor) -> torch.Tensor:
    """Per-channel value of a black pixel in normalised images ``[N, C, H, W]`` (their minimum): the fill of the
    zero padding that torchvision's ``RandomCrop(padding=4)`` adds before normalisation."""
    return x.amin(dim=(0, 2, 3))


def augment_batch(x: torch.Tensor, generator: torch.Generator, *, padding: int = 4, flip: bool = True,
                  fill: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Random crop (``padding`` pixels of ``fill`` on every side, then a crop back to the input size) and, with
    ``flip``, a horizontal flip with probability 1/2; per sample, on the batch's device."""
    n, c, h, w = x.shape
    if padding > 0:
        fill = black_level(x) if fill is None else fill
        padded = fill.to(x).view(1, c, 1, 1).expand(n, c, h + 2 * padding, w + 2 * padding).clone()
        padded[:, :, padding:padding + h, padding:padding + w] = x
        dy, dx = (torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device) for _ in range(2))
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]
        x = padded.permute(0, 2, 3, 1)[torch.arange(n, device=x.device)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    if flip:
        flips = (torch.rand(n, generator=generator) < 0.5).to(x.device).view(n, 1, 1, 1)
        x = torch.where(flips, x.flip(-1), x)
    return x.contiguous()


def fit(model: torch.nn.Module, cfg: MethodConfig, epoch_batches: Callable[[int], List[Batch]],
        loss_fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, int], torch.Tensor], *,
        guard: Optional[MaskedUpdate] = None, desc: str = "train", seed: int = 0,
        fill: Optional[torch.Tensor] = None) -> torch.nn.Module:
    """The shared loop: ``cfg.epochs`` passes over ``epoch_batches(epoch)`` minimising ``loss_fn(model, x, y, epoch)``.

    Training batches are augmented as ``cfg.augment`` says (seeded by ``seed``; ``fill``: the padding value per
    channel, default the black level of the first batch).

    With ``guard`` (a :class:`MaskedUpdate`), only the masked weights move: gradients are masked after backward and
    the weights outside the mask are restored after every optimizer step.
    """
    device = next(model.parameters()).device
    params = guard.trainable_parameters() if guard is not None else [p for p in model.parameters() if p.requires_grad]
    optimizer = make_classifier_optimizer(params, cfg)
    schedule = None
    aug_gen = torch.Generator().manual_seed(seed + 1_000_003)
    model.train()
    bar = tqdm(total=cfg.epochs, desc=desc, disable=None, leave=False)
    for epoch in range(cfg.epochs):
        batches = epoch_batches(epoch)
        if schedule is None and cfg.schedule == "cosine":
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs * len(batches)))
        for x, y in batches:
            if cfg.augment != "none":
                fill = black_level(x) if fill is None else fill
                x = augment_batch(x, aug_gen, padding=cfg.crop_padding, flip=cfg.augment == "crop_flip", fill=fill)
            loss = loss_fn(model, x.to(device), y.to(device), epoch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss became {loss.item()} in epoch {epoch}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if guard is not None:
                guard.mask_gradients()
            optimizer.step()
            if guard is not None:
                guard.restore()
            if schedule is not None:
                schedule.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):  # the last step can still blow up
        raise FloatingPointError(f"{desc}: weights became non-finite; lower the learning rate")
    return model


def train_classifier(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: MethodConfig, *, seed: int = 0,
                     desc: str = "train") -> torch.nn.Module:
    """Plain cross-entropy training (used for the original model and for Retrain)."""
    gen = torch.Generator().manual_seed(seed)
    return fit(model, cfg, lambda e: shuffled_batches(x, y, cfg.batch_size, gen),
               lambda m, bx, by, e: F.cross_entropy(m(bx), by), desc=desc, seed=seed, fill=black_level(x))


def salun_mask(model: torch.nn.Module, forget_x: torch.Tensor, forget_y: torch.Tensor, ratio: float = 0.5,
               scope: str = "global", batch_size: int = 128) -> Dict[str, torch.Tensor]:
    """SalUn's weight-saliency mask: top-``ratio`` of ``|grad of the forget-set cross-entropy|``.

    The gradients are taken with the model in eval mode (batch-norm uses its running statistics, which stay
    untouched), as in the SalUn reference code.
    """
    batches = [(forget_x[i], forget_y[i]) for i in iterate_batches(len(forget_y), batch_size)]
    device = next(model.parameters()).device

    def loss_fn(m, batch, generator):
        m.eval()  # compute_saliency switches to train mode; keep batch-norm statistics frozen
        bx, by = batch
        return F.cross_entropy(m(bx.to(device)), by.to(device), reduction="sum") / len(forget_y)

    saliency = compute_saliency(model, batches, loss_fn, desc="salun saliency")
    return mask_from_saliency(saliency, ratio=ratio, scope=scope)


def unlearn(model: torch.nn.Module, method: str, forget: Batch, retain: Batch, cfg: MethodConfig, *,
            num_classes: int, seed: int = 0, model_fn: Optional[Callable[[], torch.nn.Module]] = None) -> UnlearnResult:
    """Run one unlearning ``method`` on (a copy of) ``model``.

    Args:
        model: the original model, trained on forget + retain; left unchanged.
        method: one of :data:`METHODS`.
        forget, retain: ``(images, labels)`` tensors.
        cfg: the method's hyperparameters.
        num_classes: number of classes (for random labels).
        seed: seeds the data order and the random labels.
        model_fn: builds a freshly initialised model; needed by ``retrain`` only.

    Returns:
        :class:`UnlearnResult` with the unlearned model and the wall-clock run time (RTE) in seconds.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    (fx, fy), (rx, ry) = forget, retain
    if len(fy) == 0 or len(ry) == 0:
        raise ValueError("the forget and retain sets must both be non-empty")
    if method == "retrain" and model_fn is None:
        raise ValueError("retrain trains from scratch: pass model_fn, a callable returning a freshly initialised model")
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    mask, guard, info = None, None, {}
    if method == "retrain":
        device = next(model.parameters()).device
        new = train_classifier(model_fn().to(device), rx, ry, cfg, seed=seed, desc="retrain")
        return UnlearnResult(new, time.perf_counter() - start)
    new = copy.deepcopy(model)
    trainable = {n for n, p in new.named_parameters() if p.requires_grad}

    def ce(m, bx, by, epoch):
        return F.cross_entropy(m(bx), by)

    def retain_batches(epoch):
        return shuffled_batches(rx, ry, cfg.batch_size, gen)

    def relabel_batches(epoch):
        return relabel_epoch(forget, retain, cfg, num_classes, gen)

    run = dict(seed=seed, fill=torch.minimum(black_level(fx), black_level(rx)))

    if method == "ft":
        fit(new, cfg, retain_batches, ce, desc="ft", **run)
    elif method == "l1":
        def l1_loss(m, bx, by, epoch):
            alpha = cfg.l1_alpha * (1 - epoch / max(cfg.epochs, 1))
            return F.cross_entropy(m(bx), by) + alpha * sum(p.abs().sum() for p in m.parameters() if p.requires_grad)

        fit(new, cfg, retain_batches, l1_loss, desc="l1", **run)
    elif method == "ga":
        fit(new, cfg, lambda e: shuffled_batches(fx, fy, cfg.batch_size, gen),
            lambda m, bx, by, e: -F.cross_entropy(m(bx), by), desc="ga", **run)
    elif method == "rl":
        fit(new, cfg, relabel_batches, ce, desc="rl", **run)
    else:  # salun
        mask = salun_mask(new, fx, fy, ratio=cfg.mask_ratio, scope=cfg.mask_scope, batch_size=cfg.batch_size)
        info["mask_density"] = mask_density(mask)
        guard = MaskedUpdate(new, mask)
        fit(new, cfg, relabel_batches, ce, guard=guard, desc="salun", **run)
        for n, p in new.named_parameters():  # MaskedUpdate froze unmasked tensors; give back the original flags
            p.requires_grad_(n in trainable)
    return UnlearnResult(new, time.perf_counter() - start, mask=mask, info=info)
