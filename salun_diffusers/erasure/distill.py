"""``--distill_steps``: re-noise the masked weights of the erased denoiser and distil the erasure back into them
(UNDO, Lee et al. 2025, "Distillation Robustifies Unlearning"; issue 17, relearning).

An erasure that only hides a concept keeps it *dormant*: a short fine-tune on a few images brings it back faster than
a model that never learned it can learn it. UNDO's answer is to take the weights away from where the concept lived
and rebuild only the erased model's behaviour: after SalUn's fine-tune the erased denoiser becomes a frozen teacher;
its masked entries are shrunk and perturbed,

    theta_m <- (1 - a) * theta_m + a * std(theta) * eps        (a = --distill_noise; eps ~ N(0, 1), seeded)

and ``--distill_steps`` steps of distillation train them back to the teacher's predictions: the retain images with
their prompts, the forget images with the forget prompt (the teacher's erased answer) and, with ``--adversarial``,
with the inner attack's banked conditionings, each also unconditionally (classifier-free guidance's other half). The
student learns what the teacher *does* on that data, not what the teacher's weights still hold.

Only masked entries are re-noised and trained (:class:`~salun_diffusers.masking.MaskedUpdate`), so every weight outside
the saliency mask stays bit-identical to the base, as in SalUn. Every draw is seeded from ``--seed``: the phase is
deterministic, and a resumed erasure (which restarts it after the last SalUn step) equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Mapping, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..concepts import ConceptSpec
from ..config import EraseConfig
from ..families import PromptCond, as_family, cat_conds
from ..masking import MaskedUpdate
from .data import ConceptData

logger = logging.getLogger(__name__)

DISTILL_SEED = 7_368_787  # the phase's draws (perturbation, batches, noise), beside the run's --seed


def check_distill_fits(config: EraseConfig, num_processes: int, sharded: bool) -> None:
    """Refuse ``--distill_steps`` where it does not apply, before any image is drawn."""
    if config.distill_steps and (sharded or num_processes > 1):
        raise ValueError("--distill_steps distils into the whole denoiser in one process (it keeps a frozen copy as "
                         "the teacher): run one process without --shard_weights, or drop --distill_steps")


def _perturb(unet, mask: Mapping[str, torch.Tensor], noise: float, generator: torch.Generator) -> None:
    """Shrink and perturb the masked entries of ``unet``'s weights in place (entries outside the mask untouched)."""
    with torch.no_grad():
        for name, p in unet.named_parameters():
            m = mask.get(name)
            if m is None or not bool(m.any()):
                continue
            m = m.to(p.device)
            scale = p.detach().float().std() if p.numel() > 1 else p.detach().float().abs().mean()
            eps = torch.randn(p.shape, generator=generator).to(p.device, torch.float32)
            moved = (1.0 - noise) * p.detach().float() + noise * scale * eps
            p.data[m] = moved[m].to(p.dtype)


def distill_erasure(unet, scheduler, data: ConceptData, spec: ConceptSpec, config: EraseConfig,
                    mask: Mapping[str, torch.Tensor], adversary=None, autocast=None) -> Tuple[torch.nn.Module, float]:
    """Re-noise ``unet``'s masked weights and distil the erased ``unet`` (its state on entry) back into them for
    ``config.distill_steps`` steps; returns ``unet`` (trained in place) and the last distillation loss.
    ``adversary``: the ``--adversarial`` inner attack, whose banked conditionings are distilled too."""
    family = as_family(scheduler)
    device = next(unet.parameters()).device
    teacher = copy.deepcopy(unet).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + DISTILL_SEED)
    _perturb(unet, mask, config.distill_noise, gen)
    guard = MaskedUpdate(unet, mask)
    optimizer = torch.optim.AdamW(guard.trainable_parameters(),
                                  lr=config.distill_learning_rate or config.learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                                  weight_decay=0.0)
    retain_table = PromptCond.stack(list(data.embeds.values()))
    forget_table = PromptCond.stack([data.embeds[c.forget_prompt] for c in spec.concepts])
    concept_ids = data.concept_ids()
    empty = data.embeds.get("")
    bs = config.train_batch_size
    was_training = unet.training
    unet.train()
    loss = torch.zeros(())
    try:
        for step in tqdm(range(config.distill_steps), desc="distil", leave=False):
            lat, conds = [], []
            if data.retain_latents is not None:
                r_idx = torch.randint(0, data.retain_latents.shape[0], (bs,), generator=gen)
                lat.append(data.retain_latents[r_idx])
                conds.append(retain_table[data.retain_prompt_ids[r_idx]])
            f_idx = torch.randint(0, data.forget_latents.shape[0], (bs,), generator=gen)
            lat.append(data.forget_latents[f_idx])
            conds.append(forget_table[concept_ids[f_idx]])
            if adversary is not None:  # the banked adversarial conditionings of the same forget images
                lat.append(data.forget_latents[f_idx])
                banked = adversary._entries(f_idx, device)
                conds.append(banked if isinstance(banked, PromptCond) else PromptCond(banked))
            lat = torch.cat(lat).to(device)
            cond = cat_conds(conds).to(device)
            noise_gen = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))
            noisy, t, _ = family.noised(lat, noise_gen)
            if empty is not None:  # the unconditional branch on the same x_t
                noisy, t = torch.cat([noisy, noisy]), torch.cat([t, t])
                cond = cat_conds([cond, empty.expand(lat.shape[0]).to(device)])
            with (autocast or contextlib.nullcontext)():
                with torch.no_grad():
                    target = family.predict(teacher, noisy, t, cond)
                pred = family.predict(unet, noisy, t, cond)
                loss = F.mse_loss(pred.float(), target.float())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"--distill_steps: the distillation loss is {loss.item()} at step "
                                         f"{step + 1}; lower --distill_learning_rate or --distill_noise")
            loss.backward()
            guard.mask_gradients()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            guard.restore()
    finally:
        guard.remove_hooks()
        unet.train(was_training)
    logger.info("distilled the erasure into re-noised masked weights: %d steps, noise %.3g, last loss %.5f",
                config.distill_steps, config.distill_noise, float(loss.detach()))
    return unet, float(loss.detach())
