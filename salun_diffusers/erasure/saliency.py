"""Erasure phase 2, saliency: the gradient of the forget diffusion loss over every U-Net weight, then a top-k mask
(computed, or reused from ``mask.safetensors`` / ``--mask_path``).

The loss is the official SalUn one by default (``--saliency_loss guided``; OPTML-Group/Unlearn-Saliency@a6e89fd,
SD/train-scripts/generate_mask.py:57-62): ``MSE(noise, (1+w) eps(x_t, c) - w eps(x_t, ""))`` with w = 7.5, the
classifier-free-guided prediction the sampler actually uses, gradients through both branches.
``--saliency_loss conditional`` takes the plain ``MSE(noise, eps(x_t, c))``.

``--saliency_retain_weight w`` (> 0) makes the mask retain-aware: the same loss on the retain images with their own
prompts gives a retain saliency, and the mask ranks weights by the forget saliency discounted where the retain one is
high (:func:`salun_diffusers.saliency.retain_aware_saliency`), so training cannot move the weights the retained
concepts rely on most.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.nn.functional as F

from ..concepts import ConceptSpec
from ..config import EraseConfig
from ..delta import MASK_NAME, model_fingerprint
from ..families import PromptCond, as_family, base_model_id, cat_conds
from ..masking import load_mask, mask_from_saliency, save_mask
from ..objectives import diffusion_loss
from ..saliency import compute_saliency, retain_aware_saliency, saliency_total
from .data import ConceptData
from .reinit import reinit_selection
from .sharding import gather_mask

logger = logging.getLogger(__name__)


UNCOND_PROMPT = ""
RETAIN_SEED_OFFSET = 1_000_000  # the retain saliency pass's noise seeds: seed + offset + batch, apart from the forget's


def guided_diffusion_loss(unet, scheduler, latents, embeds, uncond_embeds, guidance_scale: float,
                          generator) -> torch.Tensor:
    """``MSE(target, (1 + w) * eps(x_t, c) - w * eps(x_t, ""))``: the official SalUn saliency loss (one batched
    denoiser call for both branches; the gradient flows through both, as in the official code). ``scheduler``: a
    family object or a DDPM scheduler (:func:`~salun_diffusers.families.as_family`); flow families guide velocities."""
    family = as_family(scheduler)
    noisy, t, target = family.noised(latents, generator)
    out = family.predict(unet, torch.cat([noisy, noisy]), torch.cat([t, t]), cat_conds([embeds, uncond_embeds]))
    cond, uncond = out.chunk(2)
    pred = (1 + guidance_scale) * cond.float() - guidance_scale * uncond.float()
    return F.mse_loss(pred, target.float())


def concept_batches(data: ConceptData, batch_size: int):
    """Forget-set batches of one concept each, ``(concept index, latent indices)``, concept by concept (one concept:
    consecutive batches over the whole forget set)."""
    ids = data.concept_ids()
    out = []
    for k in sorted(set(ids.tolist())):
        idx = torch.nonzero(ids == k).flatten().tolist()
        out += [(k, idx[i:i + batch_size]) for i in range(0, len(idx), batch_size)]
    return out


def combine_saliencies(per_concept, how: str, ratio: float, scope: str):
    """One mask from several concepts' saliencies (name -> |gradient| each): ``normalized`` divides each concept's
    saliency by its total (so a concept with small gradients counts as much as one with large) and sums them before
    the top-``ratio``; ``union`` takes each concept's top ``ratio / k`` and their union (at most ``ratio``).
    Sharded saliencies (``DTensor`` s): the totals and the top-k are over every process's shards, the masks sharded."""
    if how == "union":
        masks = [mask_from_saliency(s, ratio / len(per_concept), scope) for s in per_concept]
        return {n: torch.stack([m[n] for m in masks]).any(0) for n in masks[0]}
    total = {n: torch.zeros_like(t) for n, t in per_concept[0].items()}
    for s in per_concept:
        norm = saliency_total(s) or 1.0
        for n, t in s.items():
            total[n].add_(t, alpha=1.0 / norm)
    return mask_from_saliency(total, ratio, scope)


def saliency_mask(unet, scheduler, data: ConceptData, spec: ConceptSpec, config: EraseConfig, accelerator=None):
    """Global (or per-layer) top-k mask of |grad| of the forget loss (``config.saliency_loss``), one pass over the
    forget set. Several concepts: each batch holds one concept's images with its prompt; ``--saliency_combine``
    says how their saliencies make one mask (``sum``: the gradient of all forget losses together). Returns
    ``(mask, reinit)``: ``reinit`` the masked entries ``--reinit_fraction`` resets (:mod:`.reinit`), None when off."""
    conds = [data.embeds[c.forget_prompt] for c in spec.concepts]
    guided = config.saliency_loss == "guided"
    if guided and UNCOND_PROMPT not in data.embeds:
        raise ValueError("the guided saliency loss needs the empty prompt's embedding (prepare_data adds it)")
    batches = concept_batches(data, config.saliency_batch_size)
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext

    def loss(model, latents, c, generator):
        with autocast():
            if guided:
                uncond = data.embeds[UNCOND_PROMPT].expand(len(latents))
                return guided_diffusion_loss(model, scheduler, latents, c, uncond, config.saliency_guidance_scale,
                                             generator)
            return diffusion_loss(model, scheduler, latents, c, generator)

    def loss_fn(model, batch, generator):
        k, idx = batch
        return loss(model, data.forget_latents[idx], conds[k].expand(len(idx)), generator)

    if len(spec.concepts) == 1 or config.saliency_combine == "sum":
        forget = compute_saliency(unet, batches, loss_fn, seed=config.seed, accelerator=accelerator)
        retain = retain_saliency(unet, data, loss, config, accelerator) if config.saliency_retain_weight or (
            config.reinit_fraction and config.reinit_retain_weight) else None
        saliency = retain_aware_saliency(forget, retain, config.saliency_retain_weight) \
            if config.saliency_retain_weight else forget
        mask = mask_from_saliency(saliency, config.mask_ratio, config.mask_scope)
        if not config.reinit_fraction:
            return mask, None
        # --reinit_retain_weight: the reset ranks the masked weights by the forget saliency discounted where the
        # retain saliency is high (the weights the erased concept needs and the retained ones do not)
        rank = retain_aware_saliency(forget, retain, config.reinit_retain_weight) \
            if config.reinit_retain_weight else saliency
        return mask, reinit_selection(rank, mask, config.reinit_fraction)
    per_concept = []
    for k in range(len(spec.concepts)):  # the same batches and noise seeds as the summed pass, one concept at a time
        first = next(i for i, b in enumerate(batches) if b[0] == k)
        mine = [b for b in batches if b[0] == k]
        per_concept.append(compute_saliency(unet, mine, loss_fn, seed=config.seed + first, accelerator=accelerator,
                                            desc=f"saliency {spec.concepts[k].name}"))
    return combine_saliencies(per_concept, config.saliency_combine, config.mask_ratio, config.mask_scope), None


def retain_saliency(unet, data: ConceptData, loss, config: EraseConfig, accelerator=None):
    """|gradient| of the saliency loss on the retain images, each with its own prompt (one pass, batches of
    ``saliency_batch_size``; noise seeds apart from the forget pass's)."""
    if data.retain_latents is None:
        flag = "--saliency_retain_weight" if config.saliency_retain_weight else "--reinit_retain_weight"
        raise ValueError(f"{flag} needs retain images: set --num_retain_images > 0 or --retain_data_dir, or drop "
                         f"{flag}")
    table = PromptCond.stack(list(data.embeds.values()))
    n, bs = data.retain_latents.shape[0], config.saliency_batch_size
    batches = [torch.arange(i, min(i + bs, n)) for i in range(0, n, bs)]

    def loss_fn(model, idx, generator):
        return loss(model, data.retain_latents[idx], table[data.retain_prompt_ids[idx]], generator)

    return compute_saliency(unet, batches, loss_fn, seed=config.seed + RETAIN_SEED_OFFSET, accelerator=accelerator,
                            desc="retain saliency")


def compute_or_load_mask(unet, scheduler, data: ConceptData, spec: ConceptSpec, config: EraseConfig, accelerator,
                         reuse_saved: bool):
    """The mask: from ``--mask_path``, from ``<output_dir>/mask.safetensors`` when ``reuse_saved`` (a resumed run), or
    computed from saliency and saved. Returns ``(mask, path of the mask file, reinit)``, ``reinit`` the entries
    ``--reinit_fraction`` resets (None when off or when the mask was loaded, which has no saliency); a sharded ``unet``'s computed mask is
    sharded too (``DTensor`` s, each process its part; the main process gathers it to write it)."""
    mask_file = os.path.join(config.output_dir, MASK_NAME)
    if config.mask_path or (reuse_saved and os.path.isfile(mask_file)):
        mask, meta = load_mask(config.mask_path or mask_file)
        if meta.get("fingerprint") and meta["fingerprint"] != model_fingerprint(unet):
            raise ValueError(f"mask {config.mask_path or mask_file!r} was computed for a different U-Net; compute a "
                             "new one (drop --mask_path)")
        return mask, config.mask_path or mask_file, None
    unet.requires_grad_(True)
    mask, reinit = saliency_mask(unet, scheduler, data, spec, config, accelerator)
    whole = gather_mask(mask, accelerator)  # collective when sharded; None except on the main process
    if accelerator.is_main_process:
        save_mask(whole, mask_file, {"fingerprint": model_fingerprint(unet), "ratio": config.mask_ratio,
                                    "scope": config.mask_scope, "concept": spec.name,
                                    **({"saliency_combine": config.saliency_combine} if len(spec.concepts) > 1 else {}),
                                    "saliency_loss": config.saliency_loss,
                                    "saliency_guidance_scale": config.saliency_guidance_scale,
                                    **({"saliency_retain_weight": config.saliency_retain_weight}
                                       if config.saliency_retain_weight else {}),
                                    "base_model": base_model_id(config)})
    return mask, mask_file, reinit
