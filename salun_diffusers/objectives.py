"""SalUn's diffusion objectives.

* forget (saliency) loss: the ordinary diffusion MSE on forget latents with the forget prompt;
* erase loss: ``MSE(eps(x_t | c), eps(x_t | c').detach())`` on forget latents (c: forget prompt, c': misaligned
  pseudo prompt) plus ``alpha *`` the ordinary diffusion MSE on retain latents.

Noise and timesteps are drawn from an explicit ``torch.Generator`` so every step is reproducible (resume,
multi-process saliency).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from .families import Cond, as_family, cat_conds, unet_kwargs

# ``scheduler`` below: a family object (:func:`~salun_diffusers.families.model_family`: U-Net DDPM noise with the
# epsilon / v target, or flow matching with the velocity target) or a DDPM scheduler (a U-Net family's noise).


def sample_noise_and_timesteps(latents: torch.Tensor, scheduler, generator: torch.Generator,
                               min_timestep: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gaussian noise and timesteps ``t ~ U{min_timestep .. num_train_timesteps - 1}`` drawn from ``generator``
    (U-Net families)."""
    return as_family(scheduler).sample_noise_and_timesteps(latents, generator, min_timestep)


def diffusion_target(scheduler, latents, noise, timesteps):
    return as_family(scheduler).target(latents, noise, timesteps)


def noised(scheduler, latents, generator, min_timestep: int = 0):
    """``(x_t, t, target)`` for a denoising loss on ``latents``: noise and timesteps drawn from ``generator``."""
    return as_family(scheduler).noised(latents, generator, min_timestep)


def diffusion_loss(unet, scheduler, latents, embeds: Cond, generator, added_cond_kwargs=None,
                   min_timestep: int = 0) -> torch.Tensor:
    """Standard denoising MSE (used for saliency on forget data, as the retain loss and as the attacks' loss).
    ``embeds``: a batch of :class:`~salun_diffusers.families.PromptCond` (SDXL's added conditioning included) or of
    hidden states (then SDXL's ``added_cond_kwargs`` separately)."""
    family = as_family(scheduler)
    noisy, t, target = family.noised(latents, generator, min_timestep)
    if added_cond_kwargs is not None:
        pred = unet(noisy, t, **{**unet_kwargs(embeds), "added_cond_kwargs": added_cond_kwargs}).sample
    else:
        pred = family.predict(unet, noisy, t, embeds)
    return F.mse_loss(pred.float(), target.float())


def retain_loss(unet, scheduler, latents, embeds: Cond, generator, uncond_embeds=None) -> torch.Tensor:
    """The retain term alone (:func:`salun_loss`'s, in its own pass): the ordinary denoising MSE of the retain
    images; with ``uncond_embeds`` (one prompt's conditioning, ``--forget_uncond_weight``) plus the unconditional
    prediction's MSE on the same ``x_t``."""
    family = as_family(scheduler)
    noisy, t, target = family.noised(latents, generator)
    loss = F.mse_loss(family.predict(unet, noisy, t, embeds).float(), target.float())
    if uncond_embeds is not None:
        loss = loss + F.mse_loss(family.predict(unet, noisy, t, uncond_embeds.expand(len(latents))).float(),
                                 target.float())
    return loss


def salun_loss(unet, scheduler, forget_latents, forget_embeds: Cond, pseudo_embeds: Cond, retain_latents,
               retain_embeds: Cond, alpha: float, generator: torch.Generator, adversarial_embeds=None,
               adversarial_weight: float = 1.0, uncond_embeds=None, uncond_weight: float = 0.0):
    """SalUn's erase loss. Returns ``(total, forget_term, retain_term)``.

    The forget and retain predictions come from one denoiser pass over both batches (the same values as two passes:
    every sample is computed on its own; fewer, larger ops: measured 17% less CPU time per step on the digit U-Net
    at batch 16). With ``adversarial_embeds`` (``--adversarial``) the forget term also maps the adversarial
    conditionings onto the same target: ``+ adversarial_weight * MSE(eps(x_t | c_adv), eps(x_t | c').detach())``.
    With ``uncond_embeds`` (the empty prompt's conditioning, one prompt; ``--forget_uncond_weight``) the unconditional
    branch too: ``+ uncond_weight * MSE(eps(x_t | ""), eps(x_t | c').detach())``, so that no prompt at all (what
    inpainting from context and classifier-free guidance's other half run on) completes the concept either; and the
    retain term gains the unconditional branch's ordinary MSE on the retain images (its target without the concept).
    Flow families: the same with velocities (the pseudo prompt's velocity at the same ``x_t`` and sigma)."""
    family = as_family(scheduler)
    noisy, t, _ = family.noised(forget_latents, generator)
    with torch.no_grad():
        target = family.predict(unet, noisy, t, pseudo_embeds)
    with_retain = retain_latents is not None and alpha != 0
    if with_retain:
        r_noisy, r_t, r_target = family.noised(retain_latents, generator)
        n = noisy.shape[0]
        both = family.predict(unet, torch.cat([noisy, r_noisy]), torch.cat([t, r_t]),
                              cat_conds([forget_embeds, retain_embeds]))
        pred, r_pred = both[:n], both[n:]
    else:
        pred = family.predict(unet, noisy, t, forget_embeds)
    forget = F.mse_loss(pred.float(), target.float())
    if adversarial_embeds is not None:
        adv = family.predict(unet, noisy, t, adversarial_embeds.to(pred.dtype))
        forget = forget + adversarial_weight * F.mse_loss(adv.float(), target.float())
    uncond = uncond_embeds is not None and uncond_weight
    if uncond:
        unc = family.predict(unet, noisy, t, uncond_embeds.expand(noisy.shape[0]))
        forget = forget + uncond_weight * F.mse_loss(unc.float(), target.float())
    if not with_retain:
        return forget, forget.detach(), torch.zeros((), device=forget.device)
    retain = F.mse_loss(r_pred.float(), r_target.float())
    if uncond:  # the unconditional branch keeps denoising the retained images (their posterior without the concept)
        r_unc = family.predict(unet, r_noisy, r_t, uncond_embeds.expand(r_noisy.shape[0]))
        retain = retain + F.mse_loss(r_unc.float(), r_target.float())
    return forget + alpha * retain, forget.detach(), retain.detach()
