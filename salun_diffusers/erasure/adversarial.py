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

SD3 / FLUX (the family object a flow family): the inner attacks go through it (flow-matching loss), and the bank
holds the pooled embeddings beside the hidden states (both optimised by the conditioning attack); the token attack
fits SD3 only (FLUX's hidden states come from T5, which does not read the CLIP words it types). SDXL is refused
(:func:`check_adversarial_fits`, before any image is drawn).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from ..attacks import CONDITIONING_DEFAULTS, conditioning_attack, token_attack
from ..concepts import ConceptSpec
from ..config import EraseConfig
from ..families import FLUX, SD, SD3, PromptCond, check_fits, map_cond
from .data import ConceptData

logger = logging.getLogger(__name__)


def check_adversarial_fits(pipe, config: EraseConfig) -> None:
    """Refuse, in one line saying why, a family the inner attack cannot take: SDXL (two text encoders and time ids
    the attacks do not optimise), and the token attack on FLUX."""
    check_fits(pipe, [SD, SD3, FLUX], "--adversarial", "drop --adversarial (its attacks do not optimise SDXL's two "
               "text encoders' hidden states and added time ids)")
    if config.adversarial_attack == "token":
        check_fits(pipe, [SD, SD3], "--adversarial_attack token", "use --adversarial_attack conditioning (FLUX's "
                   "prompt hidden states come from T5, which does not read the CLIP words the token attack types)")


class Adversary:
    """The inner attack of ``--adversarial`` and its state (the bank of adversarial conditionings)."""

    def __init__(self, pipe, scheduler, data: ConceptData, spec: ConceptSpec, config: EraseConfig):
        self.pipe, self.scheduler, self.config = pipe, scheduler, config
        if len(spec.concepts) > 1 and config.adversarial_attack == "token":
            raise ValueError("--adversarial_attack token attacks one forget prompt; with several concepts use "
                             "--adversarial_attack conditioning")
        self.prompt = spec.concepts[0].forget_prompt
        self.flow = bool(getattr(scheduler, "flow", False))
        # the hidden states (SD 1.x/2.x: the whole conditioning) of each concept's forget prompt
        conds = torch.stack([data.embeds[c.forget_prompt].embeds.detach().float().cpu() for c in spec.concepts])
        # one adversarial conditioning per forget image, started from its concept's forget prompt's
        self.bank = conds[data.concept_ids()].clone()
        self.pooled = None  # SD3 / FLUX: the pooled embeddings of each bank entry
        if self.flow:
            pooled = torch.stack([data.embeds[c.forget_prompt].added["pooled_projections"].detach().float().cpu()
                                  for c in spec.concepts])
            self.pooled = pooled[data.concept_ids()].clone()

    def state_dict(self) -> dict:
        return {"bank": self.bank} if self.pooled is None else {"bank": self.bank, "pooled": self.pooled}

    def load_state_dict(self, state: dict) -> None:
        for key, ours in self.state_dict().items():
            if key not in state or tuple(state[key].shape) != tuple(ours.shape):
                found = tuple(state[key].shape) if key in state else "none"
                raise ValueError(f"checkpoint's adversarial bank ({key}) has shape {found}, this run's forget set "
                                 f"needs {tuple(ours.shape)}; resume with the same forget data")
        self.bank = state["bank"].clone()
        if self.pooled is not None:
            self.pooled = state["pooled"].clone()

    def _entries(self, forget_idx: torch.Tensor, device):
        """The bank's conditionings of ``forget_idx`` (SD3 / FLUX: a PromptCond with the pooled embeddings)."""
        if self.pooled is None:
            return self.bank[forget_idx].to(device)
        return PromptCond(self.bank[forget_idx], {"pooled_projections": self.pooled[forget_idx]}).to(device)

    def embeds(self, unet, step: int, forget_idx: torch.Tensor, forget_latents: torch.Tensor, seed: int):
        """Adversarial conditionings ``[B, 77, D]`` for the step's forget latents (attacking ``unet`` first on every
        ``adversarial_every``-th step; in between, the bank's latest ones). SD3 / FLUX: a PromptCond."""
        device = forget_latents.device
        if step % self.config.adversarial_every == 0:  # the attacks leave the U-Net's weights and .grad alone
            generator = torch.Generator(device=device).manual_seed(seed)
            adv = self._attack(unet, forget_latents, self._entries(forget_idx, device), generator)
            if self.pooled is None:
                self.bank[forget_idx] = adv.detach().float().cpu()
            else:
                self.bank[forget_idx] = adv.embeds.detach().float().cpu()
                self.pooled[forget_idx] = adv.added["pooled_projections"].detach().float().cpu()
        return self._entries(forget_idx, device)

    def _attack(self, unet, latents, init, generator):
        if self.config.adversarial_attack == "token":
            result = token_attack(self.pipe, latents, self.prompt, steps=self.config.adversarial_steps,
                                  generator=generator, unet=unet, scheduler=self.scheduler if self.flow else None)
            return map_cond(result.embeds, lambda t: t.expand(latents.shape[0], *t.shape[1:]))
        # the timesteps of the audit's conditioning attack (salun-attack's default), where what an image shows is
        # decided; one noise draw per forget image (the step's batch already holds several)
        return conditioning_attack(unet, self.scheduler, latents, init, steps=self.config.adversarial_steps,
                                   lr=self.config.adversarial_lr, generator=generator,
                                   min_timestep=CONDITIONING_DEFAULTS["min_timestep"])


def make_adversary(pipe, scheduler, data: ConceptData, spec: ConceptSpec, config: EraseConfig) -> Optional[Adversary]:
    """The inner attack of ``--adversarial`` (None without it)."""
    return Adversary(pipe, scheduler, data, spec, config) if config.adversarial else None
