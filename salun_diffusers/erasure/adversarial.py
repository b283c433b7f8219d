"""``--adversarial``: AdvUnlearn-style robust erasure on top of SalUn (the inner attack of the training loop).

Every ``adversarial_every`` optimizer steps the inner attack -- the project's own attack from
:mod:`salun_diffusers.attacks`, with a small budget (``adversarial_steps``) -- looks for conditionings that make the
*current* erased U-Net reconstruct the step's forget latents, i.e. draw the concept again. The outer step then applies
SalUn's forget objective to those conditionings as well, ``MSE(eps(x_t | c_adv), eps(x_t | c').detach())``, next to
the ordinary forget term and the retain loss (:func:`salun_diffusers.objectives.salun_loss`); the saliency mask still
limits which weights change.

The conditioning attack is warm-started: every forget image keeps its latest adversarial conditioning in a bank
(started from the forget prompt), and each inner attack continues from it against the current U-Net, so many cheap
inner attacks add up to a strong adversary. The bank is part of the training state (saved in ``checkpoint-N`` with
accelerate's ``register_for_checkpointing``), and every inner attack is seeded by its step, so a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from ..attacks import CONDITIONING_DEFAULTS, conditioning_attack, token_attack
from ..concepts import ConceptSpec
from ..config import EraseConfig
from .data import ConceptData

logger = logging.getLogger(__name__)


class Adversary:
    """The inner attack of ``--adversarial`` and its state (the bank of adversarial conditionings)."""

    def __init__(self, pipe, scheduler, data: ConceptData, spec: ConceptSpec, config: EraseConfig):
        self.pipe, self.scheduler, self.config = pipe, scheduler, config
        if len(spec.concepts) > 1 and config.adversarial_attack == "token":
            raise ValueError("--adversarial_attack token attacks one forget prompt; with several concepts use "
                             "--adversarial_attack conditioning")
        self.prompt = spec.concepts[0].forget_prompt
        # the hidden states (SD 1.x/2.x: the whole conditioning) of each concept's forget prompt
        conds = torch.stack([data.embeds[c.forget_prompt].embeds.detach().float().cpu() for c in spec.concepts])
        # one adversarial conditioning per forget image, started from its concept's forget prompt's
        self.bank = conds[data.concept_ids()].clone()

    def state_dict(self) -> dict:
        return {"bank": self.bank}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["bank"].shape) != tuple(self.bank.shape):
            raise ValueError(f"checkpoint's adversarial bank has shape {tuple(state['bank'].shape)}, this run's "
                             f"forget set needs {tuple(self.bank.shape)}; resume with the same forget data")
        self.bank = state["bank"].clone()

    def embeds(self, unet, step: int, forget_idx: torch.Tensor, forget_latents: torch.Tensor,
               seed: int) -> torch.Tensor:
        """Adversarial conditionings ``[B, 77, D]`` for the step's forget latents (attacking ``unet`` first on every
        ``adversarial_every``-th step; in between, the bank's latest ones)."""
        device = forget_latents.device
        if step % self.config.adversarial_every == 0:  # the attacks leave the U-Net's weights and .grad alone
            generator = torch.Generator(device=device).manual_seed(seed)
            adv = self._attack(unet, forget_latents, self.bank[forget_idx].to(device), generator)
            self.bank[forget_idx] = adv.detach().float().cpu()
        return self.bank[forget_idx].to(device)

    def _attack(self, unet, latents, init, generator):
        if self.config.adversarial_attack == "token":
            result = token_attack(self.pipe, latents, self.prompt, steps=self.config.adversarial_steps,
                                  generator=generator, unet=unet)
            return result.embeds.expand(latents.shape[0], -1, -1)
        # the timesteps of the audit's conditioning attack (salun-attack's default), where what an image shows is
        # decided; one noise draw per forget image (the step's batch already holds several)
        return conditioning_attack(unet, self.scheduler, latents, init, steps=self.config.adversarial_steps,
                                   lr=self.config.adversarial_lr, generator=generator,
                                   min_timestep=CONDITIONING_DEFAULTS["min_timestep"])


def make_adversary(pipe, scheduler, data: ConceptData, spec: ConceptSpec, config: EraseConfig) -> Optional[Adversary]:
    """The inner attack of ``--adversarial`` (None without it)."""
    return Adversary(pipe, scheduler, data, spec, config) if config.adversarial else None
