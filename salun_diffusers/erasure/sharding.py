"""Sharded saliency and masked training (``--shard_weights``, or an ``accelerate launch`` FSDP config): each process
holds 1/N of every denoiser weight, of its gradient, of its saliency and mask, and of the masked optimizer state
(FSDP2, ``torch.distributed.fsdp.fully_shard``).

* :func:`sharding_requested`: accelerate set ``DistributedType.FSDP`` (GPUs with an FSDP config), or
  ``--shard_weights`` (CPU processes, where accelerate turns an FSDP config into a plain multi-CPU run); both take
  this path. :func:`check_sharding` refuses, in one line each, what the sharded loop does not do.
* :func:`shard_denoiser`: ``fully_shard`` on every block of the denoiser's block lists (the U-Net's down/up blocks,
  the transformers' blocks), then on the root: weights become ``DTensor`` s sharded on dim 0, gathered block by block
  in forward and backward; gradients are reduce-scattered (averaged over processes, as DDP does). Done once, after
  the data and before the saliency pass (``erase.py``); training reuses the sharded module.
* The saliency pass (:func:`~salun_diffusers.saliency.accumulate_gradients`) keeps each process's gradient shards,
  and :func:`~salun_diffusers.masking.mask_from_saliency` selects the global top-k over them without gathering them:
  the mask comes out sharded (``DTensor`` s); :func:`gather_mask` gathers it on the main process, to write it.
* :class:`~salun_diffusers.masking.MaskedUpdate` trains each process's local shard (its part of a sharded mask, or a
  loaded whole mask sliced as the weight is).
* :func:`base_digest`: the base values' fingerprint, the masked entries gathered weight by weight on the main process.
* :func:`gather_full`: the trained weights gathered into a plain module on the main process, which writes the outputs.
* Checkpoints (``--checkpointing_steps``): each process writes its part (its masked values, optimizer and lr scheduler
  state) as ``rank-R.pt`` into one sealed folder, resumed by as many processes
  (:func:`~salun_diffusers.erasure.checkpoints.save_sharded_checkpoint`).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType

try:  # torch >= 2.7 (FSDP2's public API, distribute_tensor(src_data_rank=None) in masking.py)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
except ImportError:  # pragma: no cover
    fully_shard, FSDPModule = None, ()

from ..config import EraseConfig
from ..delta import base_values_digest
from ..masking import DTensor


def sharding_requested(config: EraseConfig, accelerator) -> bool:
    return bool(config.shard_weights) or accelerator.distributed_type == DistributedType.FSDP


def check_sharding(config: EraseConfig, accelerator) -> None:
    """Refuse, before any image is drawn, what the sharded training loop does not do (one line each)."""
    how = "--shard_weights" if config.shard_weights else "an FSDP accelerate config"
    if fully_shard is None or tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 7):
        raise ValueError(f"{how} needs torch >= 2.7 (FSDP2's fully_shard), this is {torch.__version__}: "
                         "pip install -U torch, or run without sharding")
    if accelerator.num_processes < 2:
        raise ValueError(f"{how} shards the weights over processes but this run has one: start several "
                         "(accelerate launch --num_processes N, or torchrun --nproc_per_node N), or drop --shard_weights")
    refused = [(config.optimizer_in_backward, "--optimizer_in_backward", "it needs one process"),
               (config.adversarial, "--adversarial", "its inner attack is not written for sharded weights"),
               (config.validation_prompts, "--validation_prompts", "the main process would draw alone"),
               (config.mixed_precision == "fp16", "--mixed_precision fp16", "use bf16: no gradient scaler here")]
    for bad, flag, why in refused:
        if bad:
            raise ValueError(f"{flag} does not work with {how} ({why}): drop {flag}, or "
                             "run without sharding (each process with the whole model)")


def shard_denoiser(model: torch.nn.Module, accelerator) -> torch.nn.Module:
    """``fully_shard`` each block of the model's top-level block lists, then the model (in place; returned; a model
    sharded already is returned as it is)."""
    if isinstance(model, FSDPModule):
        return model
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    for child in model.children():
        if isinstance(child, torch.nn.ModuleList):
            for block in child:
                fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def global_grad_norm(params) -> torch.Tensor:
    """The 2-norm of the gradients of every process's ``params`` (each process holds a disjoint part)."""
    grads = [p.grad for p in params if p.grad is not None]
    local = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=params[0].device)
    square = local.float().square()
    dist.all_reduce(square)
    return square.sqrt()


def gather_mask(mask: Mapping[str, torch.Tensor], accelerator) -> Optional[Dict[str, torch.Tensor]]:
    """The whole mask on the main process (None elsewhere), e.g. to write it: each sharded (``DTensor``) mask
    gathered in turn onto its CPU (collective: every process calls it), a whole one taken as it is."""
    full = {}
    for name, m in mask.items():
        if isinstance(m, DTensor):  # one weight's mask at a time, in every process
            m = m.to(torch.uint8).full_tensor().bool().cpu()
        if accelerator.is_main_process:
            full[name] = m
    return full if accelerator.is_main_process else None


def base_digest(model: torch.nn.Module, mask: Mapping[str, torch.Tensor],
                full_mask: Optional[Mapping[str, torch.Tensor]], accelerator) -> Optional[Dict[str, str]]:
    """:func:`~salun_diffusers.delta.base_values_digest` of the sharded ``model`` on the main process (None
    elsewhere; ``full_mask``: the whole mask there). Every process calls it: each masked weight is gathered in turn
    and the main process keeps its masked entries (on the CPU: 4 bytes per masked weight)."""
    params = dict(model.named_parameters())
    values = {}
    for name in sorted(mask):
        p = params[name].detach()
        p = p.full_tensor() if isinstance(p, DTensor) else p
        if accelerator.is_main_process:
            values[name] = p[full_mask[name].to(p.device)].cpu()
    return base_values_digest(model, full_mask, values=values) if accelerator.is_main_process else None


def gather_full(model: torch.nn.Module, accelerator) -> Optional[torch.nn.Module]:
    """The sharded ``model``'s full weights in a plain module of its class on the CPU of the main process (None
    elsewhere); every process must call it (the gather is collective)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not accelerator.is_main_process:
        return None
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # fully_shard subclassed it
    with torch.device("meta"):
        plain = cls.from_config(model.config)
    for name, buffer in model.named_buffers():  # buffers are not sharded; non-persistent ones are not in the state
        owner, _, attr = name.rpartition(".")
        plain.get_submodule(owner)._buffers[attr] = buffer.detach().to("cpu", copy=True)
    plain.load_state_dict(state, assign=True)
    return plain.requires_grad_(False)
