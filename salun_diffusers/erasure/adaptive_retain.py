"""``--adaptive_retain``: an adaptive, per-retain-prompt weight of SalUn's retain term (issue 17, the retained drop).

The plain retain term ``alpha * MSE`` is spread evenly over the retain prompts, but an erasure's damage falls on a few
of them (on the digit world, the digits that look like the erased one). A fixed *probe* (up to
``--adaptive_retain_probe`` retain images per retain prompt, with noise and timesteps drawn once from a fixed seed) is
scored with the base weights before training (``r0_p``, per prompt) and every ``--adaptive_retain_every`` steps with
the current weights (``r_p``; no gradients). Since the probe's ``x_t``, noise and ``t`` never change, the ratio
``r_p / r0_p`` carries no sampling noise: it moves only with the weights. Each prompt's weight is a multiplicative
(Lagrangian-style) update, clamped:

    w_p <- clamp(w_p * exp(rate * (r_p / r0_p - ref - tolerance)), 1, max)

``ref`` is the mean ratio over the retain prompts (``--adaptive_retain_relative``, the default) or 1. Measured on the
digit world (nine, ``--adversarial --forget_uncond_weight 2``): every retain prompt's probe MSE rises 5-30% during an
erasure, so against 1 every weight climbs to the maximum within ~30 steps, which is a larger alpha, not a
per-prompt weight; against the mean only the prompts taking more than their share of the damage are raised, and a
prompt back under the mean decays to 1.

and the retain term becomes ``alpha * sum_i w_p(i) * MSE_i / batch`` (:func:`~salun_diffusers.objectives.weighted_mse`;
the unconditional retain term of ``--forget_uncond_weight`` is weighted alike). The weights are training state: saved
in checkpoints (accelerate's custom state), so a resumed run equals an uninterrupted one."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Dict, Optional

import torch

from ..config import EraseConfig
from ..families import PromptCond, as_family
from .data import ConceptData

logger = logging.getLogger(__name__)

PROBE_SEED = 1_234_577  # the probe's draws (images, noise, timesteps), beside the run's --seed
PROBE_CHUNK = 64  # probe images per forward pass
NEEDS_RETAIN = ("--adaptive_retain weights the retain term: it needs retain images (--num_retain_images > 0 or "
                "--retain_data_dir) and --alpha > 0; drop --adaptive_retain")


class AdaptiveRetain:
    """The probe, the base and last probe MSE per retain prompt, and the weights (indexed like ``list(data.embeds)``,
    i.e. by ``data.retain_prompt_ids``; prompts without retain images keep weight 1)."""

    def __init__(self, unet, scheduler, data: ConceptData, config: EraseConfig, autocast=None):
        self.family = as_family(scheduler)
        self.config = config
        self.autocast = autocast
        self.names = list(data.embeds)
        ids = data.retain_prompt_ids.cpu()
        self.prompts = sorted(set(ids.tolist()))  # the retain prompts' ids
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + PROBE_SEED)
        picks = []
        for p in self.prompts:
            rows = (ids == p).nonzero().flatten()
            picks.append(rows[torch.randperm(len(rows), generator=gen)[:config.adaptive_retain_probe]])
        self.probe_ids = ids[torch.cat(picks)]
        latents = data.retain_latents[torch.cat(picks).to(data.retain_latents.device)]
        noise_gen = torch.Generator(device=latents.device).manual_seed(config.seed * 1_000_003 + PROBE_SEED + 1)
        self.noisy, self.t, self.target = self.family.noised(latents, noise_gen)
        self.embeds = PromptCond.stack(list(data.embeds.values()))[self.probe_ids.to(data.retain_prompt_ids.device)]
        self.weights = torch.ones(len(self.names))
        self.base = self.score(unet)  # r0_p
        self.last = self.base.clone()
        logger.info("adaptive retain: probe of %d images over %d retain prompts", len(self.probe_ids),
                    len(self.prompts))

    @torch.no_grad()
    def score(self, unet) -> torch.Tensor:
        """The probe's MSE per prompt id (0 for prompts without retain images), with ``unet``'s current weights (in
        eval mode, so that no dropout draws into it; its mode is restored)."""
        was_training = unet.training
        unet.eval()
        try:
            return self._score(unet)
        finally:
            unet.train(was_training)

    def _score(self, unet) -> torch.Tensor:
        per_sample = []
        for i in range(0, len(self.probe_ids), PROBE_CHUNK):
            sl = slice(i, i + PROBE_CHUNK)
            with (self.autocast or contextlib.nullcontext)():
                pred = self.family.predict(unet, self.noisy[sl], self.t[sl], self.embeds[sl])
            per_sample.append((pred.float() - self.target[sl].float()).pow(2).flatten(1).mean(1).cpu())
        per_sample = torch.cat(per_sample).double()
        total = torch.zeros(len(self.names), dtype=torch.float64).index_add_(0, self.probe_ids, per_sample)
        count = torch.zeros(len(self.names), dtype=torch.float64).index_add_(
            0, self.probe_ids, torch.ones_like(per_sample))
        return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))

    def update(self, unet) -> None:
        """Score the probe with the current weights and apply the multiplicative update to each prompt's weight."""
        self.last = self.score(unet)
        c = self.config
        ratio = self.ratios()
        ref = float(ratio[self.prompts].mean()) if c.adaptive_retain_relative else 1.0
        top = math.log(c.adaptive_retain_max)
        for p in self.prompts:
            if self.base[p] > 0:  # in the log domain, clamped there: a large rise cannot overflow exp
                step = c.adaptive_retain_rate * (float(ratio[p]) - ref - c.adaptive_retain_tolerance)
                log_w = math.log(float(self.weights[p])) + (step if math.isfinite(step) else math.inf)
                self.weights[p] = math.exp(min(max(log_w, 0.0), top))

    def ratios(self) -> torch.Tensor:
        return torch.where(self.base > 0, self.last / self.base.clamp(min=1e-30), torch.ones_like(self.base))

    def sample_weights(self, prompt_ids: torch.Tensor, device) -> torch.Tensor:
        """One weight per retain sample (its prompt's)."""
        return self.weights[prompt_ids.cpu()].to(device)

    def report(self) -> Dict[str, Dict[str, float]]:
        """Each retain prompt's weight and last probe ratio r_p / r0_p (logs, metrics.json's ``final``)."""
        ratio = self.ratios()
        return {"weights": {self.names[p]: round(float(self.weights[p]), 4) for p in self.prompts},
                "probe_ratio": {self.names[p]: round(float(ratio[p]), 4) for p in self.prompts}}

    def state_dict(self) -> dict:
        return {"weights": self.weights.clone(), "base": self.base.clone(), "last": self.last.clone()}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["weights"].shape) != tuple(self.weights.shape):
            raise ValueError(f"checkpoint's --adaptive_retain weights cover {state['weights'].shape[0]} prompts, this "
                             f"run has {self.weights.shape[0]}; resume with the same prompts")
        self.weights, self.base, self.last = (state[k].clone() for k in ("weights", "base", "last"))


def check_adaptive_retain_fits(config: EraseConfig, sharded: bool) -> None:
    """Refuse ``--adaptive_retain`` where it does not apply, before any image is drawn."""
    if config.adaptive_retain and sharded:
        raise ValueError("--adaptive_retain scores its probe with the whole denoiser, which sharded weights do not "
                         "hold in one process: drop --adaptive_retain or --shard_weights (and FSDP)")
    if config.adaptive_retain and (not config.alpha or (config.num_retain_images == 0 and not config.retain_data_dir)):
        raise ValueError(NEEDS_RETAIN)


def make_adaptive_retain(unet, scheduler, data: ConceptData, config: EraseConfig, sharded: bool = False,
                         autocast=None) -> Optional[AdaptiveRetain]:
    """The adaptive retain weights of ``--adaptive_retain`` (None when off: the retain term is the plain mean)."""
    if not config.adaptive_retain:
        return None
    check_adaptive_retain_fits(config, sharded)
    if data.retain_latents is None:  # none were drawn (check_adaptive_retain_fits saw the flags)
        raise ValueError(NEEDS_RETAIN)
    return AdaptiveRetain(unet, scheduler, data, config, autocast)
