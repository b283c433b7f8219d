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

``--uce_adversarial_rounds R`` (RECE, Gong et al., ECCV 2024): R rounds after the edit, each a conditioning attack on
the edited U-Net (``--uce_adversarial_images`` forget latents, 64 by default, taken in turn from each concept and
attacked in training-batch chunks, warm-started from the ``--adversarial`` bank or the forget prompt); every token row
of each conditioning found joins the erased rows, mapped onto the pseudo prompt's row at its position (weight
``uce_adversarial_weight`` per round, split over its images), and UCE is solved again from the trained weights over the
prompts' pairs and every round's rows so far.
"""

from __future__ import annotations

import logging

import math
from typing import Optional

import torch

from ..attacks import CONDITIONING_DEFAULTS, conditioning_attack
from ..concepts import AnySpec
from ..config import EraseConfig
from ..families import SD, check_fits
from ..masking import Mask
from ..methods import UCE_PRESETS, UceConfig, apply_uce, token_embeddings, uce_edit, uce_projections
from .adversarial import Adversary
from .data import ConceptData

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


def round_images(concept_ids: torch.Tensor, wanted: int) -> torch.Tensor:
    """The forget images a round attacks: the first ``wanted`` taken in turn from each concept (each concept's own in
    order), so that with several concepts every one is attacked; one concept: the first ``wanted``."""
    rank = torch.zeros_like(concept_ids)
    for k in concept_ids.unique():
        where = concept_ids == k
        rank[where] = torch.arange(int(where.sum()))
    order = sorted(range(len(concept_ids)), key=lambda i: (int(rank[i]), int(concept_ids[i])))
    return torch.tensor(order[:wanted], dtype=torch.long)


@torch.no_grad()
def apply_prompt_edit(pipe, unet: torch.nn.Module, spec: AnySpec, config: EraseConfig, scheduler, data: ConceptData,
                      adversary: Optional[Adversary] = None) -> None:
    """UCE's closed form on ``unet``'s current key / value projections: each concept's forget prompt onto its first
    pseudo prompt, the retain prompts preserved; then the ``--uce_adversarial_rounds`` (module docstring)."""
    cfg = UceConfig(**UCE_PRESETS["sd14"])  # lamb 0.5, erase 1, preserve 0.1, to_k and to_v, replace
    erased = [c.forget_prompt for c in spec.concepts]
    guides = [c.pseudo_prompts[0] for c in spec.concepts]
    preserved = [p for p in spec.retain_prompts if p not in erased]
    logger.info("--uce_prompt_edit: %d forget prompt(s) mapped onto their pseudo prompts in the cross-attention keys "
                "and values, %d retain prompt(s) preserved", len(erased), len(preserved))
    trained = {n: layer.weight.detach().clone() for n, layer in uce_projections(unet, cfg.with_to_k).items()}

    kept = None
    if config.uce_preserve_word_weight and preserved:  # each retain prompt's last word and end token rows
        hidden, last = token_embeddings(pipe.tokenizer, pipe.text_encoder, preserved)
        rows = torch.cat([hidden[i, j:j + 2] for i, j in enumerate(last)])
        kept = math.sqrt(config.uce_preserve_word_weight / cfg.preserve_scale) * rows

    def edit(extra=None):  # always solved from the trained weights
        apply_uce(unet, trained)
        apply_uce(unet, uce_edit(unet, pipe.tokenizer, pipe.text_encoder, erased, guides, preserved, cfg, extra,
                                 extra_preserve=kept))

    edit()
    if not config.uce_adversarial_rounds:
        return
    wanted, concept_ids = config.uce_adversarial_images, data.concept_ids()
    picked = round_images(concept_ids, wanted)
    latents = data.forget_latents[picked]
    n, device = latents.shape[0], latents.device
    if n < wanted:
        logger.info("--uce_adversarial_images %d: the forget set has %d images, every one is attacked", wanted, n)
    ids = concept_ids[picked]
    init = (adversary.bank[picked] if adversary is not None else  # [n, 77, D], moved once for every round
            torch.stack([data.embeds[p].embeds.float().cpu() for p in erased])[ids]).to(device, torch.float32)
    # each image's target rows: its concept's pseudo prompt, position by position (UCE's replace: v* = W0 g); the
    # same every round (the attack starts from init each round and does not change it)
    pseudo = token_embeddings(pipe.tokenizer, pipe.text_encoder, guides)[0][ids].float()
    scale = math.sqrt(config.uce_adversarial_weight / n)  # each row's squared error weighs weight / n
    target_rows = scale * pseudo.reshape(-1, pseudo.shape[-1]).to(device)
    inputs, targets = [], []
    was_training = unet.training
    unet.eval()
    chunk = config.train_batch_size  # the training batch's memory, whatever the image count
    for r in range(config.uce_adversarial_rounds):
        generator = torch.Generator(device).manual_seed(config.seed + 7919 * (r + 1))
        adv = torch.cat([conditioning_attack(unet, scheduler, latents[i:i + chunk], init[i:i + chunk],
                                             steps=config.uce_adversarial_steps, lr=config.adversarial_lr,
                                             generator=generator, min_timestep=CONDITIONING_DEFAULTS["min_timestep"])
                         for i in range(0, n, chunk)])
        inputs.append(scale * adv.reshape(-1, adv.shape[-1]))
        targets.append(target_rows)
        edit((torch.cat(inputs), torch.cat(targets)))
        logger.info("--uce_adversarial_rounds: round %d of %d, %d adversarial rows erased", r + 1,
                    config.uce_adversarial_rounds, sum(len(x) for x in inputs))
    unet.train(was_training)
