"""``--uce_prompt_edit``: UCE's closed-form edit of the prompt's path, on top of SalUn's erasure (issue 17, relearning).

After the masked fine-tuning, every cross-attention key and value projection of the erased U-Net is edited in closed
form (:func:`salun_diffusers.methods.uce_edit`, the official UCE recipe: lamb 0.5, erase scale 1, preserve scale 0.1,
keys and values, ``replace``): each concept's forget-prompt tokens are mapped onto its first pseudo prompt's (SalUn's
own misaligned target), the retain prompts preserved.

Why: relearning (a short fine-tune on real images with the concept's prompt) must then rebuild the prompt's path
through the keys and values as well as undo SalUn's erasure in the U-Net; SalUn's ``--adversarial`` keeps the concept
out of reach of the conditioning attack (docs/robustness/studies.md, "UCE's prompt-path edit").

The erasure then spans the saliency mask and the edited projections (their union is the erasure file's mask); every
weight outside it stays bit-identical to the base, and the base fingerprint covers the union's base values (taken
before training). ``mask.safetensors`` stays the saliency mask (reusable with ``--mask_path``).
"""

from __future__ import annotations

import logging

import torch

from ..concepts import AnySpec
from ..config import EraseConfig
from ..families import SD, check_fits
from ..masking import Mask
from ..methods import UCE_PRESETS, UceConfig, apply_uce, uce_edit, uce_projections

logger = logging.getLogger(__name__)


def check_prompt_edit_fits(pipe, config: EraseConfig, sharded: bool) -> None:
    """Refuse, in one line and before any image is drawn, what the edit does not support: a pipeline other than SD
    1.x/2.x (one CLIP text encoder feeding ``attn2``) and sharded weights."""
    if not config.uce_prompt_edit:
        return
    check_fits(pipe, [SD], "--uce_prompt_edit", "drop --uce_prompt_edit (UCE's edit reads one CLIP text encoder's "
               "tokens into the U-Net's cross-attention)")
    if sharded:
        raise ValueError("--uce_prompt_edit edits whole projections, which --shard_weights splits across processes: "
                         "drop one of them")


def with_edited_projections(unet: torch.nn.Module, mask: Mask) -> Mask:
    """``mask`` with every entry of the projections the edit changes added (the erasure file's mask)."""
    edited = set(uce_projections(unet, with_to_k=True))
    return {n: torch.ones_like(m) if n in edited else m for n, m in mask.items()}


@torch.no_grad()
def apply_prompt_edit(pipe, unet: torch.nn.Module, spec: AnySpec) -> None:
    """UCE's closed form on ``unet``'s current key / value projections: each concept's forget prompt onto its first
    pseudo prompt, the retain prompts preserved."""
    cfg = UceConfig(**UCE_PRESETS["sd14"])  # lamb 0.5, erase 1, preserve 0.1, to_k and to_v, replace
    erased = [c.forget_prompt for c in spec.concepts]
    guides = [c.pseudo_prompts[0] for c in spec.concepts]
    preserved = [p for p in spec.retain_prompts if p not in erased]
    logger.info("--uce_prompt_edit: %d forget prompt(s) mapped onto their pseudo prompts in the cross-attention keys "
                "and values, %d retain prompt(s) preserved", len(erased), len(preserved))
    apply_uce(unet, uce_edit(unet, pipe.tokenizer, pipe.text_encoder, erased, guides, preserved, cfg))
