"""Erasure phase 3, masked fine-tuning: ``MSE(eps(x_t|c), eps(x_t|c').detach()) + alpha * retain MSE`` on the masked
weights only, under accelerate (mixed precision, accumulation, trackers, checkpoint-N, resume). After every optimizer
step the masked values are written into the weights; the weights outside the mask are never written (bit-identical to
the base), and the optimizer state covers the masked values only. With ``--optimizer_in_backward`` a
:class:`~salun_diffusers.masking.MaskedAdamW` updates each weight's masked entries during backward instead."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
import torch.distributed as dist
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..concepts import ConceptSpec
from ..config import EraseConfig
from ..families import PromptCond
from ..masking import MaskedAdamW, MaskedUpdate, _local, sum_over_shards
from ..objectives import retain_loss, salun_loss
from .checkpoints import load_sharded_checkpoint, save_checkpoint, save_sharded_checkpoint
from .data import ConceptData
from .sharpness import check_relearn_fits, make_perturbation
from .sharding import gather_full, global_grad_norm, shard_denoiser, sharding_requested

logger = logging.getLogger(__name__)


def _step_generators(seed: int, step: int, micro: int, rank: int, device):
    """Per-(step, micro-batch, process) randomness: identical whether or not the run was resumed."""
    s = (seed * 1_000_003 + step * 1009 + micro * 31 + rank) % (2 ** 63)
    return torch.Generator().manual_seed(s), torch.Generator(device=device).manual_seed(s + 1)


def make_optimizer(params, config: EraseConfig) -> torch.optim.Optimizer:
    """The optimizer over the masked weights (8-bit AdamW from bitsandbytes with ``--use_8bit_adam``)."""
    params = list(params)
    optim, extra = torch.optim.AdamW, {}
    if all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
           for p in params):
        # the fused kernel: the same AdamW maths in one pass over all tensors (measured on the digit U-Net's masked
        # half, 206 tensors, 1 CPU thread: 2.0 ms per step instead of 7.7 ms)
        extra["fused"] = True
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes "
                             "(or salun-diffusers[8bit]), or drop --use_8bit_adam") from None
        optim, extra = bnb.optim.AdamW8bit, {}
    return optim(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                 weight_decay=config.adam_weight_decay, eps=config.adam_epsilon, **extra)


class TrainingDiverged(FloatingPointError):
    """A non-finite loss, gradient or weight: the run stops before it can write a checkpoint or an erasure."""


def check_finite(value: torch.Tensor, what: str, step: int, config: EraseConfig) -> None:
    if not bool(torch.isfinite(value).all()):
        raise diverged(f"the {what} is {value.float().max().item()}", step, config)


def diverged(what: str, step: int, config: EraseConfig) -> TrainingDiverged:
    fixes = f"lower --learning_rate (now {config.learning_rate:g})"
    fixes += f" or --max_grad_norm (now {config.max_grad_norm:g})" if config.max_grad_norm > 0 else \
        " or clip gradients with --max_grad_norm 1"
    if config.mixed_precision == "fp16":
        fixes += ", or use --mixed_precision bf16 or no (fp16 overflows)"
    return TrainingDiverged(f"training diverged at step {step}: {what}; no erasure was written and earlier "
                            f"checkpoints are kept. Rerun with {fixes}")


def clip_and_check_gradients(accelerator, params, config: EraseConfig, step: int, sharded: bool = False) -> None:
    """Clip to ``max_grad_norm`` (if > 0) and stop on a non-finite gradient norm. Under fp16 the gradient scaler
    skips steps with overflowing gradients by design, so only the loss and the weights are checked there.
    ``sharded``: each process holds a part of the gradients; the norm is over all of them (all-reduced)."""
    if sharded:
        norm = global_grad_norm(params)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, config.max_grad_norm, norm)
    elif config.max_grad_norm > 0:
        norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if config.mixed_precision != "fp16" and norm is not None:
        check_finite(torch.as_tensor(norm), "gradient norm", step, config)


def check_finite_loss(loss: torch.Tensor, step: int, config: EraseConfig, accelerator) -> None:
    """Stop on a non-finite loss. Several processes (each its own batch's loss): in every process when it is
    non-finite in any (one all-reduce of the losses), as one stopping alone would leave the others waiting in the
    next collective (the gradient reduction)."""
    if accelerator.num_processes == 1:
        check_finite(loss, "loss", step, config)
        return
    losses = torch.zeros(accelerator.num_processes, device=loss.device)
    losses[accelerator.process_index] = loss.detach().float()
    dist.all_reduce(losses)  # a sum of one loss and zeros: each process's loss, inf and nan included
    bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
    if bad:
        raise diverged(f"the loss is {losses[bad[0]].item()} in process {bad[0]}", step, config)


def check_finite_weights(unet, step: int, config: EraseConfig) -> None:
    """Stop on a non-finite weight; sharded weights: each process checks its shards, the flags are summed over the
    processes (one all-reduce), so every process stops alike."""
    params = dict(unet.named_parameters())
    flags = sum_over_shards([int(not bool(torch.isfinite(_local(p)).all())) for p in params.values()],
                            params.values())
    bad = [n for n, flag in zip(params, flags) if flag]
    if bad:
        raise diverged(f"weight {bad[0]!r} (and {len(bad) - 1} more) is not finite", step, config)


def sharpness_aware_backward(accelerator, unet, scheduler, perturbation, latents, f_emb, pseudo_emb, r_lat, r_emb,
                             config: EraseConfig, noise_gen, adv_emb, seed: int, step: int, uncond_emb=None):
    """``--relearn_rho`` (:mod:`.sharpness`): backward of SalUn's forget term at the weights moved by the relearning
    move (drawn with ``seed``, undone exactly after), then of ``alpha *`` the retain term at the weights."""
    relearn_gen = torch.Generator(device=latents.device).manual_seed(seed)
    perturbation.apply(unet, scheduler, latents, f_emb, relearn_gen,
                       check=lambda norm: check_finite(norm, "relearning gradient norm", step, config))
    try:
        forget, _, _ = salun_loss(unet, scheduler, latents, f_emb, pseudo_emb, None, None, config.alpha, noise_gen,
                                  adv_emb, config.adversarial_weight, uncond_emb, config.forget_uncond_weight)
        check_finite(forget, "loss", step, config)
        accelerator.backward(forget)
    finally:
        perturbation.undo()
    retain = torch.zeros((), device=forget.device)
    if r_lat is not None and config.alpha != 0:
        retain = retain_loss(unet, scheduler, r_lat, r_emb, noise_gen, uncond_emb)
        check_finite(retain, "loss", step, config)
        accelerator.backward(config.alpha * retain)
    return forget.detach() + config.alpha * retain.detach(), forget.detach(), retain.detach()


@dataclass
class TrainResult:
    unet: torch.nn.Module  # unwrapped
    logs: dict  # last step's loss terms and lr


def train(unet, scheduler, data: ConceptData, spec: ConceptSpec, config: EraseConfig, mask: Mapping[str, torch.Tensor],
          accelerator, resume_path: Optional[str] = None,
          on_step: Optional[Callable[[int], None]] = None, adversary=None) -> TrainResult:
    """Run ``config.max_train_steps`` SalUn steps on the masked weights of ``unet`` (resuming from ``resume_path``);
    ``on_step(step)`` runs after each optimizer step (e.g. validation images). ``adversary`` (``--adversarial``,
    :mod:`.adversarial`) adds the forget objective on adversarial conditionings. Sharded
    (:mod:`.sharding`: ``--shard_weights`` or an FSDP accelerate config): ``unet`` is sharded (erase.py did it before
    the saliency pass), the optimizer and scheduler are stepped here rather than by accelerate, and the returned
    module is the gathered one on the main process (the sharded one elsewhere)."""
    device = accelerator.device
    sharded = sharding_requested(config, accelerator)
    check_relearn_fits(config, accelerator.num_processes, sharded)
    if sharded:  # erase.py shards it before the saliency pass (a no-op then)
        unet = shard_denoiser(unet, accelerator)
    # one process: gradients gathered into the masked values during backward (one full-size gradient at a time);
    # under DDP the full gradients are reduced first, then gathered
    if config.optimizer_in_backward:  # AdamW steps each weight in backward: no flat values nor gradients kept
        if accelerator.num_processes > 1:
            raise ValueError("--optimizer_in_backward needs one process (gradients are reduced across processes "
                             "after backward): drop it or run one process")
        guard = optimizer = MaskedAdamW(
            unet, mask, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon, weight_decay=config.adam_weight_decay,
            check=lambda name, grad: check_finite(grad, f"gradient of {name!r}", global_step + 1, config))
    else:
        guard = MaskedUpdate(unet, mask, hooks=accelerator.num_processes == 1)
        optimizer = make_optimizer(guard.trainable_parameters(), config)
    # accelerate's prepared scheduler steps once per process at each optimizer step; the sharded loop steps it once
    per_step = 1 if sharded else accelerator.num_processes
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * per_step,
                                 num_training_steps=config.max_train_steps * per_step)
    if sharded:  # accelerate's FSDP2 prepare would shard again (and refuses an optimizer without its model)
        unet_prepared = unet
    else:
        unet_prepared, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    perturbation = make_perturbation(unet, mask, config)
    global_step = 0
    if adversary is not None:
        accelerator.register_for_checkpointing(adversary)  # its bank of adversarial conditionings
    if resume_path:
        logger.info("resuming from %s", resume_path)
        if sharded:  # this process's part: its masked values (written into its shards), optimizer, scheduler
            def restore(state):
                guard.load_values(state["values"])
                optimizer.load_state_dict(state["optimizer"])
                lr_scheduler.load_state_dict(state["lr_scheduler"])
                torch.set_rng_state(state["rng"])
                if "device_rng" in state:
                    torch.cuda.set_rng_state(state["device_rng"], device)

            load_sharded_checkpoint(accelerator, resume_path, restore)
        else:
            accelerator.load_state(resume_path)
            guard.reload()  # the masked values the optimizer trains, from the loaded weights
        global_step = int(os.path.basename(resume_path.rstrip("/")).split("-")[1])
    if accelerator.is_main_process and config.report_to:
        accelerator.init_trackers("salun-erase", config={k: v for k, v in config.to_dict().items()
                                                         if isinstance(v, (int, float, str, bool))})

    # each forget image maps onto its own concept's pseudo prompt(s): a table of every concept's pseudo prompts,
    # one concept's at offsets[k] .. offsets[k] + counts[k]; a draw in [0, lcm of the counts) picks one uniformly
    members = spec.concepts
    forget_table = PromptCond.stack([data.embeds[c.forget_prompt] for c in members])
    pseudo = PromptCond.stack([data.embeds[p] for c in members for p in c.pseudo_prompts])
    counts = torch.tensor([len(c.pseudo_prompts) for c in members])
    offsets = torch.cumsum(counts, 0) - counts
    draws = math.lcm(*counts.tolist())
    concept_ids = data.concept_ids()
    retain_table = PromptCond.stack(list(data.embeds.values()))
    # --forget_uncond_weight: the forget objective (and the retain term) on the unconditional branch too
    u_emb = data.embeds[""] if config.forget_uncond_weight else None
    bs = config.train_batch_size
    bar = tqdm(range(config.max_train_steps), initial=global_step, desc="erase",
               disable=not accelerator.is_local_main_process)
    logs = {}
    unet_prepared.train()
    while global_step < config.max_train_steps:
        for micro in range(config.gradient_accumulation_steps):
            idx_gen, noise_gen = _step_generators(config.seed, global_step, micro, accelerator.process_index, device)
            f_idx = torch.randint(0, data.forget_latents.shape[0], (bs,), generator=idx_gen)
            k = concept_ids[f_idx]
            p_idx = offsets[k] + torch.randint(0, draws, (bs,), generator=idx_gen) % counts[k]
            # one concept: its forget prompt's conditioning broadcast, as before several were possible
            f_emb = forget_table[0].expand(bs) if len(members) == 1 else forget_table[k]
            r_lat = r_emb = None
            if data.retain_latents is not None:
                r_idx = torch.randint(0, data.retain_latents.shape[0], (bs,), generator=idx_gen)
                r_lat = data.retain_latents[r_idx]
                r_emb = retain_table[data.retain_prompt_ids[r_idx]]
            adv_emb = None if adversary is None else adversary.embeds(
                accelerator.unwrap_model(unet_prepared), global_step, f_idx, data.forget_latents[f_idx],
                seed=idx_gen.initial_seed() + 2)
            with accelerator.accumulate(unet_prepared), accelerator.autocast():
                if perturbation is None:
                    loss, forget_term, retain_term = salun_loss(
                        unet_prepared, scheduler, data.forget_latents[f_idx], f_emb,
                        pseudo[p_idx], r_lat, r_emb, config.alpha, noise_gen, adv_emb, config.adversarial_weight,
                        u_emb, config.forget_uncond_weight)
                    check_finite_loss(loss, global_step + 1, config, accelerator)
                    accelerator.backward(loss)
                else:  # --relearn_rho: the forget term one relearning step away, the retain term at the weights
                    loss, forget_term, retain_term = sharpness_aware_backward(
                        accelerator, unet_prepared, scheduler, perturbation, data.forget_latents[f_idx], f_emb,
                        pseudo[p_idx], r_lat, r_emb, config, noise_gen, adv_emb, idx_gen.initial_seed() + 3,
                        global_step + 1, u_emb)
                if accelerator.sync_gradients:
                    # several processes: the gradients are gathered once reduced over them (DDP reduces the ones
                    # accumulated since the last sync; with hooks, one process, they were gathered in backward)
                    guard.mask_gradients()
                    clip_and_check_gradients(accelerator, guard.trainable_parameters(), config, global_step + 1,
                                             sharded)
                if accelerator.sync_gradients or not sharded:  # prepared: accelerate skips them between syncs
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
        guard.restore()
        global_step += 1
        bar.update(1)
        logs = {"loss": loss.item(), "forget_loss": forget_term.item(), "retain_loss": retain_term.item(),
                "lr": lr_scheduler.get_last_lr()[0]}
        bar.set_postfix(loss=f"{logs['loss']:.4f}")
        accelerator.log(logs, step=global_step)
        if on_step is not None:
            on_step(global_step)
        if config.checkpointing_steps and global_step % config.checkpointing_steps == 0 \
                and global_step < config.max_train_steps:
            check_finite_weights(unet, global_step, config)  # a checkpoint is never saved from a non-finite state
            if sharded:  # each process its part; the randomness is drawn per step (_step_generators), the global
                # generator's state is kept for modules that draw from it (dropout)
                save_sharded_checkpoint(accelerator, config, global_step, {
                    "values": {n: v.detach() for n, v in guard.values.items()}, "optimizer": optimizer.state_dict(),
                    "lr_scheduler": lr_scheduler.state_dict(), "rng": torch.get_rng_state(),
                    **({"device_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})})
            else:
                save_checkpoint(accelerator, config, global_step)
    bar.close()
    check_finite_weights(unet, global_step, config)  # nor an erasure
    guard.remove_hooks()
    accelerator.wait_for_everyone()
    if sharded:  # the gather is collective: every process takes part, the main one gets the module
        full = gather_full(unet, accelerator)
        return TrainResult(full if full is not None else unet, logs)
    return TrainResult(accelerator.unwrap_model(unet_prepared), logs)
