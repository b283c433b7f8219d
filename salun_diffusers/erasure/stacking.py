"""Erasing again from an erased model: ``--pretrained_model_name_or_path`` a ``train_erase.py`` output folder.

Such a folder is a pipeline whose ``unet/`` is the erased U-Net, with its erasure beside it. Before any work the
erasure's seal and fingerprint are verified and the folder's U-Net must hold exactly its values (a folder changed
after it was written is refused). The new erasure is made *on top* of it: its base fingerprint is the erased U-Net's,
and its ``stacked_on`` field lists the erasures beneath it (the folder's own ``stacked_on`` first, then the folder's
erasure), so :func:`~salun_diffusers.loaders.load_erasure` stacks it exactly on top of them (docs/erasure-format.md).
"""

from __future__ import annotations

import logging
import os
from typing import List

import torch

from ..config import EraseConfig
from ..delta import WEIGHTS_NAME, erasure_id, parse_delta, read_delta
from ..families import base_model_id
from ..hub import resolve_base_model

logger = logging.getLogger(__name__)


@torch.no_grad()
def erased_base_lineage(config: EraseConfig, unet) -> List[dict]:
    """The erasures the base model already holds (``[]`` for a model that is no erasure's output), bottom first:
    ``{"id", "concept", "base_model"}`` each. Raises ``ValueError`` when the folder's U-Net does not hold its erasure."""
    base_dir = resolve_base_model(base_model_id(config))
    path = os.path.join(base_dir, WEIGHTS_NAME)
    if not os.path.isdir(base_dir) or not os.path.isfile(path):
        return []
    tensors, meta = read_delta(path)  # the seal: a damaged erasure file is refused here
    delta = parse_delta(tensors, meta, unet, check_base=False)  # the architecture fingerprint, keys, counts
    params = dict(unet.named_parameters())
    for name, mask in delta.mask.items():
        p = params[name].detach()
        held = p[mask.to(p.device)].to(delta.values[name].dtype).cpu()
        if not torch.equal(held, delta.values[name]):
            raise ValueError(f"the U-Net in {base_dir!r} does not hold the erasure beside it ({WEIGHTS_NAME}: "
                             f"{name!r} differs), so the folder was changed after train_erase.py wrote it; erase from "
                             f"its base model ({delta.config.get('base_model')!r}) instead, or make that erasure again")
    below = [dict(p) for p in (delta.config.get("stacked_on") or []) if isinstance(p, dict)]
    own = {"id": erasure_id(meta), "concept": delta.config.get("concept"), "base_model": delta.config.get("base_model")}
    logger.info("erasing again from an erased model: %s holds the erasure of %r%s", base_dir, own["concept"],
                f" (on top of {', '.join(repr(p.get('concept')) for p in below)})" if below else "")
    return below + [own]
