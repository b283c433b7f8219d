"""Gradient saliency: accumulate the gradient of a forget loss over a forget set, for any ``torch.nn.Module``.

The same function serves the U-Net (diffusion forget loss) and image classifiers (cross-entropy forget loss);
:mod:`salun_diffusers.masking` turns the result into a mask. :func:`retain_aware_saliency` discounts it by a retain
loss's saliency, so the mask leaves out the weights the retained data rely on.

Multi-process runs (``accelerate launch --num_processes N``): batch ``i`` is handled by process ``i % N`` and its
randomness comes from a generator seeded with ``seed + i``, so the all-reduced sum equals the single-process sum
(up to floating-point summation order). Sharded (FSDP2, :mod:`salun_diffusers.erasure.sharding`): the same split,
but every backward is collective, so a process with fewer batches runs zero-weighted backwards to match the others,
and the gradients stay as each process's shard (``DTensor`` s; the reduce-scatter's mean times N is the sum).
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .masking import DTensor, _local, sum_over_shards

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
    Returns name -> float32 tensor on the model's device, identical on every process; a sharded model (FSDP2
    ``fully_shard``, weights ``DTensor`` s): name -> float32 ``DTensor``, each process holding its shard of the sum.
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
    sharded = any(isinstance(p, DTensor) for p in params.values())
    mine = [(i, 1.0) for i in range(len(batches)) if i % world == rank]
    if sharded:  # every backward is collective: as many as the process with the most batches, the extra ones weigh 0
        mine += [(0, 0.0)] * (-(-len(batches) // world) - len(mine))
    for i, weight in tqdm(mine, desc=desc, disable=not main):
        generator = torch.Generator(device=device).manual_seed(seed + i)
        loss = loss_fn(model, batches[i], generator)
        bad = torch.tensor(-1.0 if torch.isfinite(loss) else float(i), device=device)
        if sharded:  # every process stops on a non-finite loss, none waits in the next (collective) backward
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad >= 0:
            raise FloatingPointError(f"forget loss is not finite on batch {int(bad)}; check the forget data / "
                                     "precision")
        (loss * weight if weight != 1.0 else loss).backward()
    grads = {}
    for n, p in params.items():
        g = p.grad.detach().float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
        grads[n] = g.mul_(world) if sharded else g  # the reduce-scatter averaged over the processes
        p.grad = None
    if world > 1 and not sharded:
        for g in grads.values():
            dist.all_reduce(g, op=dist.ReduceOp.SUM)
    model.train(was_training)
    return grads


def compute_saliency(model, batches, loss_fn, *, seed: int = 0, accelerator=None, desc="saliency"):
    """``|sum of forget-loss gradients|`` per parameter (SalUn's weight saliency). A non-finite saliency is refused:
    its top-k would be meaningless (NaN sorts above every number)."""
    saliency = {n: g.abs_() for n, g in accumulate_gradients(model, batches, loss_fn, seed=seed,
                                                               accelerator=accelerator, desc=desc).items()}
    flags = [int(not bool(torch.isfinite(_local(s)).all())) for s in saliency.values()]
    flags = sum_over_shards(flags, saliency.values())  # each process checked its shards: every process raises alike
    bad = [n for n, flag in zip(saliency, flags) if flag]
    if bad:
        raise FloatingPointError(f"the saliency (forget-loss gradient) of {bad[0]!r} and {len(bad) - 1} other "
                                 "tensor(s) is not finite; check the forget data, or use --mixed_precision bf16 or no "
                                 "instead of fp16")
    return saliency


def saliency_total(saliency: Dict[str, torch.Tensor]) -> float:
    """The sum of every entry (float64, tensor by tensor); sharded (``DTensor``) saliencies: of every process's
    shards (an all-reduce: collective)."""
    total = sum(float(_local(t).double().sum()) for t in saliency.values())
    return float(sum_over_shards([total], saliency.values(), torch.float64)[0])


def retain_aware_saliency(forget: Dict[str, torch.Tensor], retain: Dict[str, torch.Tensor],
                          weight: float) -> Dict[str, torch.Tensor]:
    """Forget saliency discounted where the retain saliency is high: ``f / (1 + weight * r / f)`` per weight, with
    ``f`` and ``r`` the forget and retain saliencies (``|gradient|``, e.g. from :func:`compute_saliency`) each divided
    by its mean over all weights (sharded saliencies: over every process's shards). ``weight`` 0 returns ``forget``
    itself (SalUn's saliency); a weight whose retain saliency is ``weight`` times its forget saliency counts half as
    much as one the retain loss does not touch, so a top-k mask of the result leaves out the weights the retained data
    rely on. Non-negative, as masks need."""
    if weight < 0:
        raise ValueError(f"the retain saliency weight must be >= 0, got {weight}")
    if weight == 0:
        return forget
    if set(forget) != set(retain):
        raise ValueError("forget and retain saliencies must cover the same parameters")

    def mean(s):
        return saliency_total(s) / max(1, sum(t.numel() for t in s.values())) or 1.0

    f_mean, r_mean = mean(forget), mean(retain)
    out = {}
    for n, f in forget.items():
        f = f.float() / f_mean
        r = retain[n].float() / r_mean
        # f * f / (f + w r) == f / (1 + w r / f); 0 where f is 0 (no forget saliency, never preferred)
        out[n] = torch.where(f > 0, f * f / (f + weight * r),
                             torch.zeros_like(f))
    return out
