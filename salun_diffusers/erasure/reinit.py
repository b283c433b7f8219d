"""``--reinit_fraction``: re-initialise the most salient masked weights before the masked fine-tune (issue 17,
relearning).

SalUn's fine-tune redirects the erased prompt (onto the pseudo prompt) but leaves the weights that held the concept
close to their base values, so a short relearning fine-tune finds the concept again ("dormant knowledge"). Here the
top ``reinit_fraction`` of the *masked* weights by saliency (the same |gradient| of the forget loss the mask was
ranked by: the weights the concept depends on most) are reset once, before step 0, and the usual SalUn fine-tune
(forget term + alpha * retain term) then trains them back from the reset values: the retained concepts are
distilled into them again, the erased one is not.

``--reinit_mode zero`` sets them to 0; ``random`` draws each from a normal with its weight tensor's own mean and
standard deviation (over the whole tensor, base values), seeded with ``--seed``. Only entries inside the mask are
reset, so the weights outside it stay bit-identical to the base. The reset is deterministic and happens once: a
resumed run loads the trained weights from its checkpoint and does not reset again.

``--reinit_distill``: the fine-tune's targets come from a frozen copy of the base denoiser (taken before the reset)
instead of the current, partly reset one and the noise: the pseudo prompt's base prediction on the forget images,
each retain prompt's (and with ``--forget_uncond_weight`` the empty prompt's) base prediction on the retain images.
One more no-grad forward of the retain batch per step and a second copy of the denoiser in memory.
"""

from __future__ import annotations

import copy
import logging
from typing import Dict, Mapping

import torch

from ..config import EraseConfig
from ..masking import mask_from_saliency

logger = logging.getLogger(__name__)

REINIT_SEED_OFFSET = 2_000_003  # the random reset's generator: seed + offset, apart from the other seeded draws


def check_reinit_fits(config: EraseConfig, sharded: bool) -> None:
    """Refuse, in one line, what the reset does not support: sharded weights, a mask without its saliency
    (``--mask_path``) and several concepts with a combined mask other than ``sum``."""
    if not config.reinit_fraction:
        return
    if sharded:
        raise ValueError("--reinit_fraction resets unsharded weights: drop --reinit_fraction or --shard_weights")
    if config.mask_path:
        raise ValueError("--reinit_fraction ranks the masked weights by their saliency, which --mask_path does not "
                         "store: drop --mask_path (the saliency pass runs again) or --reinit_fraction")
    if config.reinit_distill and config.relearn_rho:
        raise ValueError("--reinit_distill's targets are not wired into --relearn_rho's two-pass step: drop one")
    if len(config.concept_spec().concepts) > 1 and config.saliency_combine != "sum":
        raise ValueError("--reinit_fraction ranks by one saliency: use --saliency_combine sum with several concepts, "
                         "or drop --reinit_fraction")


def reinit_selection(saliency: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor],
                     fraction: float) -> Dict[str, torch.Tensor]:
    """The top ``fraction`` of the masked entries by saliency (exactly ``round(fraction * masked)``, at least one;
    ties as :func:`~salun_diffusers.masking.mask_from_saliency`), always a subset of ``mask``."""
    masked = sum(int(m.sum()) for m in mask.values())
    total = sum(s.numel() for s in saliency.values())
    k = max(1, round(fraction * masked))
    inside = {n: torch.where(mask[n].to(s.device), s, torch.zeros_like(s)) for n, s in saliency.items()}
    top = mask_from_saliency(inside, k / total)
    return {n: top[n] & mask[n].to(top[n].device) for n in top}


@torch.no_grad()
def reinitialise(unet: torch.nn.Module, selection: Mapping[str, torch.Tensor], config: EraseConfig) -> int:
    """Reset ``unet``'s entries where ``selection`` is True (``config.reinit_mode``); returns how many."""
    gen = torch.Generator().manual_seed(config.seed + REINIT_SEED_OFFSET)
    count = 0
    for name, p in sorted(unet.named_parameters()):
        sel = selection.get(name)
        if sel is None or not bool(sel.any()):
            continue
        sel = sel.to(p.device)
        if config.reinit_mode == "zero":
            p[sel] = 0
        else:  # a draw per selected entry from the tensor's own statistics (one entry: std 0)
            base = p.detach().float()
            std = float(base.std()) if base.numel() > 1 else 0.0
            draw = torch.randn(int(sel.sum()), generator=gen) * std + float(base.mean())
            p[sel] = draw.to(p.device, p.dtype)
        count += int(sel.sum())
    logger.info("reinit: %d masked weights reset (%s)", count, config.reinit_mode)
    return count



def base_teacher(unet: torch.nn.Module, config: EraseConfig):
    """``--reinit_distill``: a frozen copy of ``unet`` (the base, before any reset), else None."""
    if not (config.reinit_fraction and config.reinit_distill):
        return None
    return copy.deepcopy(unet).requires_grad_(False).eval()
