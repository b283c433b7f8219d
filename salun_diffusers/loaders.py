"""Load a SalUn erasure into a pipeline, the way diffusers loads LoRAs: ``load_*`` / ``unload_*`` / ``fuse_*``.

    pipe = StableDiffusionPipeline.from_pretrained("CompVis/stable-diffusion-v1-4")
    load_erasure(pipe, "out/sd14-no-nudity")          # folder, .safetensors file, hub id, or dict of tensors
    set_erasure_scale(pipe, 0.5)                       # interpolate between base (0) and erased (1)
    unload_erasure(pipe)                               # base weights back, bit for bit
    fuse_erasure(pipe)                                 # make it permanent and free the backup

Everything is validated before any weight changes: the file's sha256 seal (every tensor and the header), format and
version, the fingerprint of the U-Net's names and shapes, strict keys, counts, finite values, and the fingerprint of
the base values the erasure was made from (``check_base=False`` skips only that last check). See
docs/erasure-format.md.
The masked entries' base values are kept on the U-Net so ``unload_erasure`` restores them exactly.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Mapping, Optional, Union

import torch

from .delta import CONFIG_NAME, check_base_values, parse_delta, read_delta

logger = logging.getLogger(__name__)

_STATE = "_salun_erasure"


def read_erasure_dir_config(path) -> Optional[dict]:
    """The erasure config (``erasure_config.json``) of a train_erase.py output folder, whether or not it is also a
    pipeline folder; ``None`` for anything else (a file, a hub id, a plain pipeline folder)."""
    if isinstance(path, str) and os.path.isdir(path):
        cfg = os.path.join(path, CONFIG_NAME)
        if os.path.isfile(cfg):
            with open(cfg) as f:
                return json.load(f)
    return None


def _unet(pipe_or_unet) -> torch.nn.Module:
    """The denoiser an erasure applies to: ``pipe.unet``, ``pipe.transformer`` (SD3, FLUX), or the module itself."""
    unet = pipe_or_unet
    for name in ("unet", "transformer"):
        if getattr(pipe_or_unet, name, None) is not None:
            unet = getattr(pipe_or_unet, name)
            break
    if not isinstance(unet, torch.nn.Module):
        raise TypeError(f"expected a diffusers pipeline with a .unet or .transformer, or the denoiser module, got "
                        f"{type(pipe_or_unet).__name__}")
    return unet


@torch.no_grad()
def _apply(unet, state, scale: float) -> None:
    params = dict(unet.named_parameters())
    for name, m in state["mask"].items():
        p = params[name]
        values = state["values"][name].to(p.device)
        if scale == 1.0:
            new = values.to(p.dtype)
        else:
            base = state["backup"][name].to(p.device).float()
            new = (base + scale * (values.float() - base)).to(p.dtype)
        p.data.masked_scatter_(m.to(p.device), new)
    state["scale"] = scale


def load_erasure(pipe_or_unet, pretrained_or_dict: Union[str, Mapping[str, torch.Tensor]], *, scale: float = 1.0,
                 metadata: Optional[Mapping] = None, revision: Optional[str] = None, subfolder: Optional[str] = None,
                 cache_dir: Optional[str] = None, check_fingerprint: bool = True, check_base: bool = True) -> dict:
    """Apply an erasure to ``pipe.unet`` (or a U-Net) in place. Returns the erasure's metadata.

    ``check_base=False`` applies the erasure even to a U-Net whose values differ from the base it was made from (same
    shapes, e.g. an SD1.4 erasure onto SD1.5); everything else is still verified.
    """
    unet = _unet(pipe_or_unet)
    if getattr(unet, _STATE, None) is not None:
        raise RuntimeError("an erasure is already loaded into this U-Net; call unload_erasure(pipe) first "
                           "(or fuse_erasure(pipe) to keep it and stack another)")
    tensors, meta = read_delta(pretrained_or_dict, metadata=metadata, revision=revision, subfolder=subfolder,
                               cache_dir=cache_dir)
    delta = parse_delta(tensors, meta, unet, check_fingerprint=check_fingerprint, check_base=False)
    params = dict(unet.named_parameters())
    masks = {n: m.to(params[n].device) for n, m in delta.mask.items()}
    backup = {n: params[n].detach()[masks[n]].clone() for n in masks}
    if check_base:  # on the backup: the base values at the masked positions, gathered once; nothing changed yet
        check_base_values(delta.metadata, unet, masks, backup)
    state = {"mask": masks, "values": delta.values, "backup": backup, "metadata": delta.metadata, "scale": None}
    _apply(unet, state, float(scale))
    setattr(unet, _STATE, state)
    logger.info("loaded erasure %r: %d weights in %d tensors (scale %.3g)",
                delta.config.get("concept"), delta.num_changed(), len(masks), scale)
    return delta.metadata


def _state(pipe_or_unet, verb: str):
    unet = _unet(pipe_or_unet)
    state = getattr(unet, _STATE, None)
    if state is None:
        raise RuntimeError(f"no erasure is loaded, nothing to {verb}; call load_erasure(pipe, path) first")
    return unet, state


def set_erasure_scale(pipe_or_unet, scale: float) -> None:
    """Re-apply the loaded erasure at ``scale`` (0 = base weights, 1 = erased weights)."""
    unet, state = _state(pipe_or_unet, "rescale")
    if state["backup"] is None:
        raise RuntimeError("the erasure was fused; its scale can no longer change")
    _apply(unet, state, float(scale))


@torch.no_grad()
def unload_erasure(pipe_or_unet) -> None:
    """Restore the base values of every erased weight (bit-identical)."""
    unet, state = _state(pipe_or_unet, "unload")
    if state["backup"] is None:
        raise RuntimeError("the erasure was fused into the weights and cannot be unloaded; reload the base model")
    params = dict(unet.named_parameters())
    for name, m in state["mask"].items():
        params[name].data.masked_scatter_(m, state["backup"][name].to(params[name].device))
    setattr(unet, _STATE, None)


def fuse_erasure(pipe_or_unet) -> None:
    """Keep the loaded erasure permanently and free its backup (another erasure may then be loaded on top)."""
    unet, _ = _state(pipe_or_unet, "fuse")
    setattr(unet, _STATE, None)


def get_erasure_metadata(pipe_or_unet) -> Optional[dict]:
    state = getattr(_unet(pipe_or_unet), _STATE, None)
    return None if state is None else state["metadata"]


class ErasureLoaderMixin:
    """``pipe.load_erasure(...)`` / ``unload_erasure()`` / ``fuse_erasure()`` / ``set_erasure_scale()``."""

    def load_erasure(self, pretrained_or_dict, **kwargs) -> dict:
        return load_erasure(self, pretrained_or_dict, **kwargs)

    def unload_erasure(self) -> None:
        unload_erasure(self)

    def fuse_erasure(self) -> None:
        fuse_erasure(self)

    def set_erasure_scale(self, scale: float) -> None:
        set_erasure_scale(self, scale)
