"""Erased pipelines: a StableDiffusionPipeline / StableDiffusionXLPipeline whose ``from_pretrained`` takes an erasure.

    pipe = StableDiffusionErasedPipeline.from_pretrained("CompVis/stable-diffusion-v1-4", erasure="out/no-nudity")
    pipe = StableDiffusionErasedPipeline.from_pretrained("out/no-nudity")   # base model read from the erasure's config
    # an erasure made from an erased model's folder: its base with that erasure loaded first, then this one on top
    pipe = StableDiffusionXLErasedPipeline.from_pretrained("out/sdxl-no-nudity")   # an erasure of an SDXL base

A ``train_erase.py`` output folder is a pipeline of its own too (``StableDiffusionPipeline.from_pretrained(out)``
gives the merged U-Net). These classes instead load the base and apply the erasure, so ``set_erasure_scale`` and
``unload_erasure`` work; where the base cannot be loaded, a self-contained output folder is loaded as it is.
"""

from __future__ import annotations

import logging
import os

from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from ..hub import resolve_base_model
from ..loaders import ErasureLoaderMixin, read_erasure_dir_config

logger = logging.getLogger(__name__)


class _ErasedFromPretrained(ErasureLoaderMixin):
    """``from_pretrained(base, erasure=...)`` or ``from_pretrained(output_dir)`` for an erased pipeline class."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, erasure=None, erasure_scale: float = 1.0,
                        check_base: bool = True, **kwargs):
        """``check_base=False``: apply the erasure even onto base weights other than those it was made from."""
        meta = read_erasure_dir_config(pretrained_model_name_or_path)
        if meta is not None and erasure is None:
            out_dir, erasure = pretrained_model_name_or_path, pretrained_model_name_or_path
            base = meta.get("config", {}).get("base_model")
            if not base:
                raise ValueError(f"{pretrained_model_name_or_path!r} records no base model; pass the base model "
                                 "and erasure=... explicitly")
            if read_erasure_dir_config(resolve_base_model(base)) is not None and erasure_scale == 1.0:
                # made on top of another erasure (erasing again from an erased model): its base, with that erasure
                # loaded (recursively), then this one on top: unload_erasure goes back to the original base
                pipe = cls.from_pretrained(base, *args, check_base=check_base, **kwargs)
                pipe.load_erasure(erasure, check_base=check_base)
                return pipe
            revision = kwargs.pop("revision", None) or meta.get("config", {}).get("revision")
            cls._check_family(resolve_base_model(base), revision)
            try:
                pipe = super().from_pretrained(resolve_base_model(base), *args, revision=revision, **kwargs)
            except (OSError, ValueError):
                if erasure_scale != 1.0 or not os.path.isfile(os.path.join(out_dir, "model_index.json")):
                    raise
                logger.warning("base model %r not available; loading the merged pipeline in %s (set_erasure_scale "
                               "and unload_erasure need the base)", base, out_dir)
                return super().from_pretrained(out_dir, *args, **kwargs)
        else:
            cls._check_family(resolve_base_model(pretrained_model_name_or_path), kwargs.get("revision"))
            pipe = super().from_pretrained(resolve_base_model(pretrained_model_name_or_path), *args, **kwargs)
        if erasure is not None:
            pipe.load_erasure(erasure, scale=erasure_scale, check_base=check_base)
        return pipe

    @classmethod
    def _check_family(cls, source, revision) -> None:
        """Name the right erased class when the base's ``model_index.json`` names the other family."""
        try:
            name = DiffusionPipeline.load_config(source, revision=revision).get("_class_name", "")
        except Exception:  # noqa: BLE001  (not readable here: from_pretrained reports it, or falls back)
            return
        for erased, family in ((StableDiffusionErasedPipeline, StableDiffusionPipeline),
                               (StableDiffusionXLErasedPipeline, StableDiffusionXLPipeline)):
            if name == family.__name__ and not issubclass(cls, family):
                raise ValueError(f"{source!r} is a {name}: load it with {erased.__name__}, not {cls.__name__}")


class StableDiffusionErasedPipeline(_ErasedFromPretrained, StableDiffusionPipeline):
    """SD 1.x / 2.x with ``load_erasure`` / ``unload_erasure`` / ``fuse_erasure`` / ``set_erasure_scale``."""


class StableDiffusionXLErasedPipeline(_ErasedFromPretrained, StableDiffusionXLPipeline):
    """SDXL with ``load_erasure`` / ``unload_erasure`` / ``fuse_erasure`` / ``set_erasure_scale``."""
