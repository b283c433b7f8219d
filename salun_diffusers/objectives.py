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

from .families import Cond, cat_conds, unet_kwargs


def sample_noise_and_timesteps(latents: torch.Tensor, scheduler, generator: torch.Generator,
                               min_timestep: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gaussian noise and timesteps ``t ~ U{min_timestep .. num_train_timesteps - 1}`` drawn from ``generator``."""
    noise = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=torch.float32)
    timesteps = torch.randint(min_timestep, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                              device=generator.device)
    return noise.to(latents.device, latents.dtype), timesteps.to(latents.device)


def diffusion_target(scheduler, latents, noise, timesteps):
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {kind!r} is not supported; use an epsilon or v_prediction scheduler")


def noised(scheduler, latents, generator, min_timestep: int = 0):
    """``(x_t, t, target)`` for a diffusion loss on ``latents``: noise and timesteps drawn from ``generator``."""
    noise, t = sample_noise_and_timesteps(latents, scheduler, generator, min_timestep)
    return scheduler.add_noise(latents, noise, t), t, diffusion_target(scheduler, latents, noise, t)


def diffusion_loss(unet, scheduler, latents, embeds: Cond, generator, added_cond_kwargs=None,
                   min_timestep: int = 0) -> torch.Tensor:
    """Standard denoising MSE (used for saliency on forget data, as the retain loss and as the attacks' loss).
    ``embeds``: a batch of :class:`~salun_diffusers.families.PromptCond` (SDXL's added conditioning included) or of
    hidden states (then SDXL's ``added_cond_kwargs`` separately)."""
    noisy, t, target = noised(scheduler, latents, generator, min_timestep)
    kwargs = unet_kwargs(embeds)
    if added_cond_kwargs is not None:
        kwargs["added_cond_kwargs"] = added_cond_kwargs
    pred = unet(noisy, t, **kwargs).sample
    return F.mse_loss(pred.float(), target.float())


def salun_loss(unet, scheduler, forget_latents, forget_embeds: Cond, pseudo_embeds: Cond, retain_latents,
               retain_embeds: Cond, alpha: float, generator: torch.Generator, adversarial_embeds=None,
               adversarial_weight: float = 1.0):
    """SalUn's erase loss. Returns ``(total, forget_term, retain_term)``.

    The forget and retain predictions come from one U-Net pass over both batches (the same values as two passes:
    every sample is computed on its own; fewer, larger ops: measured 17% less CPU time per step on the digit U-Net
    at batch 16). With ``adversarial_embeds`` (``--adversarial``) the forget term also maps the adversarial
    conditionings onto the same target: ``+ adversarial_weight * MSE(eps(x_t | c_adv), eps(x_t | c').detach())``."""
    noise, t = sample_noise_and_timesteps(forget_latents, scheduler, generator)
    noisy = scheduler.add_noise(forget_latents, noise, t)
    with torch.no_grad():
        target = unet(noisy, t, **unet_kwargs(pseudo_embeds)).sample
    with_retain = retain_latents is not None and alpha != 0
    if with_retain:
        r_noisy, r_t, r_target = noised(scheduler, retain_latents, generator)
        n = noisy.shape[0]
        both = unet(torch.cat([noisy, r_noisy]), torch.cat([t, r_t]),
                    **unet_kwargs(cat_conds([forget_embeds, retain_embeds]))).sample
        pred, r_pred = both[:n], both[n:]
    else:
        pred = unet(noisy, t, **unet_kwargs(forget_embeds)).sample
    forget = F.mse_loss(pred.float(), target.float())
    if adversarial_embeds is not None:
        adv = unet(noisy, t, encoder_hidden_states=adversarial_embeds.to(pred.dtype)).sample
        forget = forget + adversarial_weight * F.mse_loss(adv.float(), target.float())
    if not with_retain:
        return forget, forget.detach(), torch.zeros((), device=forget.device)
    retain = F.mse_loss(r_pred.float(), r_target.float())
    return forget + alpha * retain, forget.detach(), retain.detach()
