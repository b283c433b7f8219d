"""Peer erasure methods beside SalUn, one module each (peft style): pure functions over diffusers models.

* :mod:`.esd` — ESD (Gandikota et al., ICCV 2023): fine-tune the U-Net toward negatively guided noise; ESD-x / ESD-u /
  ESD-full as boolean masks in :mod:`salun_diffusers.masking`'s format.
* :mod:`.uce` — UCE (Gandikota et al., WACV 2024): closed-form edit of the cross-attention key/value projections.
* :mod:`.advunlearn` — AdvUnlearn (Zhang et al., NeurIPS 2024): adversarial training of the text encoder.

Each module's docstring gives the official recipe it follows; docs/peers.md lists the deviations.
"""

from .advunlearn import (ADVUNLEARN_PRESETS, AdvUnlearnConfig, advunlearn_loss, encode_with_prefix, prefix_ids,
                         retain_sample, soft_prompt_attack, text_encoder_mask, train_advunlearn)
from .esd import (ESD_PRESETS, ESD_VARIANTS, EsdConfig, EsdSample, ddim_partial_sample, esd_loss, esd_mask, esd_sample,
                  is_esd_parameter, train_esd)
from .uce import (NEXT_DIGIT, UCE_PRESETS, UceConfig, apply_uce, erase_pairs, token_embeddings, uce_closed_form,
                  uce_edit, uce_mask,
                  uce_projections)

__all__ = ["ADVUNLEARN_PRESETS", "AdvUnlearnConfig", "advunlearn_loss", "encode_with_prefix", "prefix_ids",
           "retain_sample", "soft_prompt_attack", "text_encoder_mask", "train_advunlearn",
           "ESD_PRESETS", "ESD_VARIANTS", "EsdConfig", "EsdSample", "ddim_partial_sample", "esd_loss", "esd_mask",
           "esd_sample", "is_esd_parameter", "train_esd",
           "NEXT_DIGIT", "UCE_PRESETS", "UceConfig", "apply_uce", "erase_pairs", "token_embeddings", "uce_closed_form",
           "uce_edit",
           "uce_mask", "uce_projections"]
