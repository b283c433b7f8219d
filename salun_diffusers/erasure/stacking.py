"""Erasing again from an erased model: ``--pretrained_model_name_or_path`` a ``train_erase.py`` output folder.

Such a folder is a pipeline whose erased component (``unet/``; ``text_encoder/`` for an AdvUnlearn erasure, as its
metadata's ``component`` says) holds its erasure, beside it. Before any work the erasure's seal and fingerprint are
verified and that component must hold exactly its values (a folder changed after it was written is refused). The new
erasure, of any method and any component, is made *on top* of it: its base fingerprint is taken from the folder's
weights, and its ``stacked_on`` field lists the erasures beneath it (the folder's own ``stacked_on`` first, then the
folder's erasure), so :func:`~salun_diffusers.loaders.load_erasure` stacks them exactly, each on its own component
(docs/erasure-format.md).
"""

from __future__ import annotations

import json
import logging
import os
from typing import List, Optional

import diffusers
import torch
import transformers

from ..config import EraseConfig
from ..delta import WEIGHTS_NAME, erasure_id, parse_delta, read_delta
from ..families import base_model_id, denoiser, denoiser_folder
from ..hub import resolve_base_model

logger = logging.getLogger(__name__)

_LIBRARIES = {"diffusers": diffusers, "transformers": transformers}


def _component_module(model, base_dir: str, component: Optional[str]) -> torch.nn.Module:
    """The folder's ``component`` (``None``, an older erasure's: the denoiser) as the run loaded it: the pipeline's
    (``model`` a pipeline), ``model`` itself when it is that component, else read from the folder (a denoiser passed
    alone: the erasure changed another component, e.g. AdvUnlearn's text encoder)."""
    if component is None:
        return model if isinstance(model, torch.nn.Module) else denoiser(model)
    if not isinstance(model, torch.nn.Module):
        module = getattr(model, component, None)
        if isinstance(module, torch.nn.Module):
            return module
        raise ValueError(f"the erasure in {base_dir!r} changes the {component}, which this pipeline lacks; erase from "
                         "its base model instead")
    if denoiser_folder(model) == component:
        return model
    with open(os.path.join(base_dir, "model_index.json")) as f:
        library, class_name = json.load(f)[component]
    return getattr(_LIBRARIES[library], class_name).from_pretrained(base_dir, subfolder=component)


@torch.no_grad()
def erased_base_lineage(config: EraseConfig, model) -> List[dict]:
    """The erasures the base model already holds (``[]`` for a model that is no erasure's output), bottom first:
    ``{"id", "concept", "base_model"}`` each. ``model``: the loaded base pipeline, or its denoiser. Raises
    ``ValueError`` when the component the folder's erasure changed does not hold it."""
    base_dir = resolve_base_model(base_model_id(config))
    path = os.path.join(base_dir, WEIGHTS_NAME)
    if not os.path.isdir(base_dir) or not os.path.isfile(path):
        return []
    tensors, meta = read_delta(path)  # the seal: a damaged erasure file is refused here
    module = _component_module(model, base_dir, (meta.get("config") or {}).get("component"))
    component = (meta.get("config") or {}).get("component") or denoiser_folder(module)
    delta = parse_delta(tensors, meta, module, check_base=False)  # the architecture fingerprint, keys, counts
    params = dict(module.named_parameters())
    for name, mask in delta.mask.items():
        p = params[name].detach()
        held = p[mask.to(p.device)].to(delta.values[name].dtype).cpu()
        if not torch.equal(held, delta.values[name]):
            what = "U-Net" if component == "unet" else component.replace("_", " ")
            raise ValueError(f"the {what} in {base_dir!r} does not hold the erasure beside it ({WEIGHTS_NAME}: "
                             f"{name!r} differs), so the folder was changed after train_erase.py wrote it; erase from "
                             f"its base model ({delta.config.get('base_model')!r}) instead, or make that erasure again")
    below = [dict(p) for p in (delta.config.get("stacked_on") or []) if isinstance(p, dict)]
    own = {"id": erasure_id(meta), "concept": delta.config.get("concept"), "base_model": delta.config.get("base_model")}
    logger.info("erasing again from an erased model: %s holds the erasure of %r in its %s%s", base_dir,
                own["concept"], component,
                f" (on top of {', '.join(repr(p.get('concept')) for p in below)})" if below else "")
    return below + [own]
