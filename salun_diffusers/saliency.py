"""Gradient saliency: accumulate the gradient of a forget loss over a forget set, for any ``torch.nn.Module``.

The same function serves the U-Net (diffusion forget loss) and image classifiers (cross-entropy forget loss);
:mod:`salun_diffusers.masking` turns the result into a mask.

Multi-process runs (``accelerate launch --num_processes N``): batch ``i`` is handled by process ``i % N`` and its
randomness comes from a generator seeded with ``seed + i``, so the all-reduced sum equals the single-process sum
(up to floating-point summation order).
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, object, torch.Generator], torch.Tensor]


def accumulate_gradients(
    model: torch.nn.Module,
    batches: Sequence[object],
    loss_fn: LossFn,
    *,
    seed: int = 0,
    accelerator=None,
    desc: str = "saliency",
) -> Dict[str, torch.Tensor]:
    """Sum over ``batches`` of d loss_fn(model, batch, generator) / d theta, for every parameter with requires_grad.

    ``model`` must be the plain (unwrapped) module: gradients are reduced here, once, not by DDP at every backward.
    Returns name -> float32 tensor on the model's device, identical on every process.
    """
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    main = accelerator.is_local_main_process if accelerator is not None else True
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no trainable parameters to compute saliency for")
    if len(batches) == 0:
        raise ValueError("the forget set is empty: saliency needs at least one forget batch")
    device = next(iter(params.values())).device
    was_training = model.training
    model.train()
    for p in params.values():
        p.grad = None
    mine = [i for i in range(len(batches)) if i % world == rank]
    for i in tqdm(mine, desc=desc, disable=not main):
        generator = torch.Generator(device=device).manual_seed(seed + i)
        loss = loss_fn(model, batches[i], generator)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"forget loss is {loss.item()} on batch {i}; check the forget data / precision")
        loss.backward()
    grads = {}
    for n, p in params.items():
        g = p.grad.detach().float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
        grads[n] = g
        p.grad = None
    if world > 1:
        for g in grads.values():
            dist.all_reduce(g, op=dist.ReduceOp.SUM)
    model.train(was_training)
    return grads


def compute_saliency(model, batches, loss_fn, *, seed: int = 0, accelerator=None, desc="saliency"):
    """``|sum of forget-loss gradients|`` per parameter (SalUn's weight saliency). A non-finite saliency is refused:
    its top-k would be meaningless (NaN sorts above every number)."""
    saliency = {n: g.abs_() for n, g in accumulate_gradients(model, batches, loss_fn, seed=seed,
                                                               accelerator=accelerator, desc=desc).items()}
    bad = [n for n, s in saliency.items() if not bool(torch.isfinite(s).all())]
    if bad:
        raise FloatingPointError(f"the saliency (forget-loss gradient) of {bad[0]!r} and {len(bad) - 1} other "
                                 "tensor(s) is not finite; check the forget data, or use --mixed_precision bf16 or no "
                                 "instead of fp16")
    return saliency
