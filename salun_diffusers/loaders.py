"""Load SalUn erasures into a pipeline, the way diffusers loads LoRAs: ``load_*`` / ``unload_*`` / ``fuse_*``.

    pipe = StableDiffusionPipeline.from_pretrained("CompVis/stable-diffusion-v1-4")
    load_erasure(pipe, "out/sd14-no-nudity")          # folder, .safetensors file, hub id, or dict of tensors
    set_erasure_scale(pipe, 0.5)                       # interpolate between base (0) and erased (1)
    unload_erasure(pipe)                               # base weights back, bit for bit
    fuse_erasure(pipe)                                 # make it permanent and free the backup

Everything is validated before any weight changes: the file's sha256 seal (every tensor and the header), format and
version, the fingerprint of the U-Net's names and shapes, strict keys, counts, finite values, and the fingerprint of
the base values the erasure was made from (``check_base=False`` skips only that last check). See
docs/erasure-format.md.

**Stacking** (docs/erasure-format.md, "Stacking"): several erasures may be loaded one after another. Each one's base
fingerprint says what it was made from, and decides how it composes:

* made *on top* of what is loaded (``train_erase.py --pretrained_model_name_or_path`` an erasure's output folder, and
  that erasure loaded first): its values replace the U-Net's at its mask; with every scale 1 the U-Net is then
  bit-identical to that run's merged U-Net;
* made *beside* it, from the same base (two single erasures of one base): its change (values minus the base's values)
  is added at its mask; where the masks do not overlap this is exactly its values, where they overlap the two
  changes add up (order-independent up to float rounding);
* anything else (another base; a fused erasure below it) is refused with the fix.

The values the U-Net had at each erasure's mask before it was applied are kept, so ``unload_erasure`` restores the
base exactly (``only_last=True``: the U-Net as it was before the last load).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from typing import Dict, List, Mapping, Optional, Union

import torch

from .delta import CONFIG_NAME, check_base_values, erasure_id, parse_delta, read_delta
from .families import denoiser_folder

logger = logging.getLogger(__name__)

_STATE = "_salun_erasure"  # on the U-Net: the list of loaded erasures (layers), bottom first; None when none
# the pipeline components an erasure may change (its metadata's ``component``; none recorded: the denoiser)
COMPONENTS = ("unet", "transformer", "text_encoder")
_LOAD_ORDER = itertools.count()  # each loaded layer's place in the order of loads, across components


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


def _target(pipe_or_unet, component: Optional[str]) -> torch.nn.Module:
    """The module an erasure of ``component`` (``None``: the denoiser) applies to: ``pipe.<component>``, or the
    module itself when a module is passed."""
    if component and not isinstance(pipe_or_unet, torch.nn.Module):
        module = getattr(pipe_or_unet, component, None)
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"this erasure changes the {component}, which {type(pipe_or_unet).__name__} does not have; "
                            "load it into the pipeline it was made for")
        return module
    return _unet(pipe_or_unet)


def _modules(pipe_or_unet) -> List[torch.nn.Module]:
    """The modules erasures may be loaded into: the module itself, or the pipeline's components."""
    if isinstance(pipe_or_unet, torch.nn.Module):
        return [pipe_or_unet]
    found = [getattr(pipe_or_unet, n, None) for n in COMPONENTS]
    return [m for m in found if isinstance(m, torch.nn.Module)] or [_unet(pipe_or_unet)]


def _layers(unet) -> List[dict]:
    return getattr(unet, _STATE, None) or []


def _all_layers(pipe_or_unet) -> List[tuple]:
    """``(module, layer)`` of every loaded erasure, in the order they were loaded."""
    pairs = [(m, layer) for m in _modules(pipe_or_unet) for layer in _layers(m)]
    return sorted(pairs, key=lambda pair: pair[1]["order"])


@torch.no_grad()
def _apply(unet, layer: dict, scale: float, backup: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Write one layer at ``scale`` onto the U-Net's current values, recording them as the layer's backup first.

    ``ref`` (the values of the model the erasure was made from, at its mask) is the backup for a layer made on top of
    what is loaded, and the base's values for one made beside it. Where the U-Net still holds ``ref`` the new value is
    ``ref + scale * (values - ref)`` (exactly the values at scale 1); elsewhere the layer's change is added."""
    params = dict(unet.named_parameters())
    layer["backup"] = backup or {n: params[n].detach()[m].clone() for n, m in layer["mask"].items()}
    for name, m in layer["mask"].items():
        p = params[name]
        values = layer["values"][name].to(p.device)
        backup = layer["backup"][name]
        ref = backup if layer["ref"] is None else layer["ref"][name].to(p.device)
        if scale == 1.0:
            own = values.to(p.dtype)
        else:
            own = (ref.float() + scale * (values.float() - ref.float())).to(p.dtype)
        if layer["ref"] is not None:  # beside: add the change where an earlier erasure moved the value
            added = (backup.float() + scale * (values.float() - ref.float())).to(p.dtype)
            own = torch.where(backup == ref, own, added)
        p.data.masked_scatter_(m, own)
    layer["scale"] = scale


@torch.no_grad()
def _restore(unet, layer: dict) -> None:
    params = dict(unet.named_parameters())
    for name, m in layer["mask"].items():
        params[name].data.masked_scatter_(m, layer["backup"][name].to(params[name].device))


@torch.no_grad()
def _base_values(unet, layers: List[dict], masks: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The values the U-Net had before any loaded erasure, at ``masks`` (nothing changes: per tensor, a copy with the
    backups written back, the bottom layer's last)."""
    params = dict(unet.named_parameters())
    out = {}
    for name, m in masks.items():
        touching = [layer for layer in layers if name in layer["mask"]]
        if not touching:
            out[name] = params[name].detach()[m].clone()
            continue
        full = params[name].detach().clone()
        for layer in reversed(touching):
            full.masked_scatter_(layer["mask"][name], layer["backup"][name].to(full.device))
        out[name] = full[m]
    return out


def _concept(metadata: Mapping) -> str:
    cfg = metadata.get("config") if isinstance(metadata.get("config"), dict) else {}
    return str(cfg.get("concept", "?"))


def _stack_position(unet, layers, delta, masks, backup) -> Optional[dict]:
    """How a new erasure stacks onto ``layers`` (base check on): ``None`` = on top of what is loaded (its base is the
    U-Net as it is now), else the base's values at its mask (beside: made from the same base). Raises when neither."""
    try:
        check_base_values(delta.metadata, unet, masks, backup)
        return None
    except ValueError:
        if not layers:
            raise
        base = _base_values(unet, layers, masks)
        try:
            check_base_values(delta.metadata, unet, masks, base)
        except ValueError:
            scales = sorted({layer["scale"] for layer in layers} - {1.0})
            hint = (f" (the loaded erasures are at scale {scales[0]:g}: an erasure made on top of them matches only at "
                    "scale 1; set_erasure_scale(pipe, 1.0) first)" if scales else "")
            loaded = ", ".join(repr(_concept(layer["metadata"])) for layer in layers)
            made_from = (delta.config or {}).get("base_model")
            raise ValueError(f"this erasure of {_concept(delta.metadata)!r} was made neither from the base beneath the "
                             f"loaded erasure(s) {loaded} nor on top of them{hint}; unload_erasure(pipe) and load the "
                             f"erasures it was made on top of first, in order, or load it onto its own base "
                             f"({made_from!r})") from None
        return base


def load_erasure(pipe_or_unet, pretrained_or_dict: Union[str, Mapping[str, torch.Tensor]], *, scale: float = 1.0,
                 metadata: Optional[Mapping] = None, revision: Optional[str] = None, subfolder: Optional[str] = None,
                 cache_dir: Optional[str] = None, check_fingerprint: bool = True, check_base: bool = True) -> dict:
    """Apply an erasure to ``pipe.unet`` (``pipe.transformer``; ``pipe.text_encoder`` for an erasure whose metadata
    names that component, e.g. AdvUnlearn's; or the module passed) in place, on top of any erasures already loaded (see the module
    docstring: on top of them, or beside them from the same base). Returns the erasure's metadata.

    ``check_base=False`` applies the erasure even to a U-Net whose values differ from the base it was made from (same
    shapes, e.g. an SD1.4 erasure onto SD1.5): its values then replace the U-Net's; everything else is still verified.
    """
    tensors, meta = read_delta(pretrained_or_dict, metadata=metadata, revision=revision, subfolder=subfolder,
                               cache_dir=cache_dir)
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    unet = _target(pipe_or_unet, config.get("component"))  # the U-Net, transformer or text encoder it changed
    layers = _layers(unet)
    delta = parse_delta(tensors, meta, unet, check_fingerprint=check_fingerprint, check_base=False)
    ident = erasure_id(delta.metadata)
    if ident is not None and any(layer["id"] == ident for layer in layers):
        raise RuntimeError(f"this erasure of {_concept(delta.metadata)!r} is already loaded into this U-Net; "
                           "unload_erasure(pipe) first to load it again")
    params = dict(unet.named_parameters())
    masks = {n: m.to(params[n].device) for n, m in delta.mask.items()}
    ref = backup = None
    if check_base:  # on the values at the masked positions, gathered once; nothing changed yet
        backup = {n: params[n].detach()[masks[n]].clone() for n in masks}
        ref = _stack_position(unet, layers, delta, masks, backup)
    if ref is not None:
        moved = sum(int((backup[n] != ref[n]).sum()) for n in masks)
        if moved:
            logger.warning(
                "this erasure of %r was made beside the loaded erasure(s), from the same base; %.0f%% of its %d weights "
                "were changed by them too, and there the changes add up. On the digit world three single-digit "
                "erasures stacked this way lost 17 points of retained accuracy where one joint run lost 0.5 "
                "(docs/multi.md): erase the concepts together (train_erase.py --concept a b c) instead",
                _concept(delta.metadata), 100 * moved / max(1, delta.num_changed()), delta.num_changed())
    parents = [p.get("id") for p in (delta.config.get("stacked_on") or []) if isinstance(p, dict)]
    missing = [p for p in parents if p not in {layer["id"] for _, layer in _all_layers(pipe_or_unet)}]
    if missing and ref is None:
        logger.warning("this erasure of %r was made from an erased model (erasure %s); that erasure is not loaded "
                       "here, so unless this U-Net already holds it (the erased folder's own U-Net) the result lacks "
                       "it: load it first", _concept(delta.metadata), ", ".join(missing))
    layer = {"mask": masks, "values": delta.values, "ref": ref, "backup": None, "metadata": delta.metadata,
             "scale": None, "id": ident, "stacked": "beside" if ref is not None else "on top" if layers else "base",
             "component": config.get("component") or denoiser_folder(unet), "order": next(_LOAD_ORDER)}
    _apply(unet, layer, float(scale), backup)
    setattr(unet, _STATE, layers + [layer])
    logger.info("loaded erasure %r: %d weights in %d tensors (scale %.3g%s)", delta.config.get("concept"),
                delta.num_changed(), len(masks), scale,
                f", {layer['stacked']} {len(layers)} loaded erasure(s)" if layers else "")
    return delta.metadata


def _state(pipe_or_unet, verb: str) -> List[tuple]:
    """``(module, its layers)`` of every component holding loaded erasures; refuses when none does."""
    held = [(m, _layers(m)) for m in _modules(pipe_or_unet) if _layers(m)]
    if not held:
        raise RuntimeError(f"no erasure is loaded, nothing to {verb}; call load_erasure(pipe, path) first")
    return held


@torch.no_grad()
def set_erasure_scale(pipe_or_unet, scale: float) -> None:
    """Re-apply the loaded erasure(s) at ``scale`` (0 = base weights, 1 = erased weights); with several loaded, every
    one at this scale (unwound to the base, then applied again in order; each component on its own)."""
    for unet, layers in _state(pipe_or_unet, "rescale"):
        for layer in reversed(layers):
            _restore(unet, layer)
        for layer in layers:
            _apply(unet, layer, float(scale))


@torch.no_grad()
def unload_erasure(pipe_or_unet, only_last: bool = False) -> None:
    """Restore the base values of every erased weight (bit-identical; the U-Net's and, for a text-encoder erasure,
    the text encoder's); ``only_last``: undo only the erasure loaded last, leaving its module exactly as it was
    before that load."""
    held = _state(pipe_or_unet, "unload")
    if only_last:
        held = [max(held, key=lambda pair: pair[1][-1]["order"])]
    for unet, layers in held:
        for layer in reversed(layers[-1:] if only_last else layers):
            _restore(unet, layer)
        setattr(unet, _STATE, layers[:-1] if only_last and len(layers) > 1 else None)


def fuse_erasure(pipe_or_unet) -> None:
    """Keep the loaded erasure(s) permanently and free the backups. The fused values are then the U-Net's own: an
    erasure made on top of them loads; one made beside them from the base is refused where its mask meets the fused
    changes (the base values there are gone, so its base cannot be checked)."""
    for unet, _ in _state(pipe_or_unet, "fuse"):
        setattr(unet, _STATE, None)


def get_erasure_metadata(pipe_or_unet) -> Optional[dict]:
    """The metadata of the erasure loaded last (``None`` when none is loaded)."""
    pairs = _all_layers(pipe_or_unet)
    return pairs[-1][1]["metadata"] if pairs else None


def get_loaded_erasures(pipe_or_unet) -> List[dict]:
    """The loaded erasures, in the order they were loaded (each component's bottom first): ``concept``, ``id`` (see
    :func:`erasure_id`), ``stacked`` ("base", "on top" or "beside", within its component), ``component``, ``scale``,
    ``num_changed`` and the ``metadata``."""
    return [{"concept": _concept(layer["metadata"]), "id": layer["id"], "stacked": layer["stacked"],
             "component": layer["component"], "scale": layer["scale"],
             "num_changed": sum(v.numel() for v in layer["values"].values()),
             "metadata": layer["metadata"]} for _, layer in _all_layers(pipe_or_unet)]


class ErasureLoaderMixin:
    """``pipe.load_erasure(...)`` / ``unload_erasure()`` / ``fuse_erasure()`` / ``set_erasure_scale()``."""

    def load_erasure(self, pretrained_or_dict, **kwargs) -> dict:
        return load_erasure(self, pretrained_or_dict, **kwargs)

    def unload_erasure(self, only_last: bool = False) -> None:
        unload_erasure(self, only_last=only_last)

    def fuse_erasure(self) -> None:
        fuse_erasure(self)

    def set_erasure_scale(self, scale: float) -> None:
        set_erasure_scale(self, scale)
