"""Erasure phase 2, saliency: the gradient of the forget diffusion loss over every U-Net weight, then a top-k mask
(computed, or reused from ``mask.safetensors`` / ``--mask_path``)."""

from __future__ import annotations

import contextlib
import logging
import os

from ..concepts import ConceptSpec
from ..config import EraseConfig
from ..delta import MASK_NAME, model_fingerprint
from ..masking import load_mask, mask_from_saliency, save_mask
from ..objectives import diffusion_loss
from ..saliency import compute_saliency
from .data import ConceptData, base_model_id

logger = logging.getLogger(__name__)


def saliency_mask(unet, scheduler, data: ConceptData, spec: ConceptSpec, config: EraseConfig, accelerator=None):
    """Global (or per-layer) top-k mask of |grad| of the forget diffusion loss."""
    cond = data.embeds[spec.forget_prompt]
    n = data.forget_latents.shape[0]
    bs = config.saliency_batch_size
    batches = [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext

    def loss_fn(model, idx, generator):
        latents = data.forget_latents[idx]
        with autocast():
            return diffusion_loss(model, scheduler, latents, cond.expand(len(idx)), generator)

    saliency = compute_saliency(unet, batches, loss_fn, seed=config.seed, accelerator=accelerator)
    return mask_from_saliency(saliency, config.mask_ratio, config.mask_scope)


def compute_or_load_mask(unet, scheduler, data: ConceptData, spec: ConceptSpec, config: EraseConfig, accelerator,
                         reuse_saved: bool):
    """The mask: from ``--mask_path``, from ``<output_dir>/mask.safetensors`` when ``reuse_saved`` (a resumed run), or
    computed from saliency and saved. Returns ``(mask, path of the mask file)``."""
    mask_file = os.path.join(config.output_dir, MASK_NAME)
    if config.mask_path or (reuse_saved and os.path.isfile(mask_file)):
        mask, meta = load_mask(config.mask_path or mask_file)
        if meta.get("fingerprint") and meta["fingerprint"] != model_fingerprint(unet):
            raise ValueError(f"mask {config.mask_path or mask_file!r} was computed for a different U-Net; compute a "
                             "new one (drop --mask_path)")
        return mask, config.mask_path or mask_file
    unet.requires_grad_(True)
    mask = saliency_mask(unet, scheduler, data, spec, config, accelerator)
    if accelerator.is_main_process:
        save_mask(mask, mask_file, {"fingerprint": model_fingerprint(unet), "ratio": config.mask_ratio,
                                    "scope": config.mask_scope, "concept": spec.name,
                                    "base_model": base_model_id(config)})
    return mask, mask_file
