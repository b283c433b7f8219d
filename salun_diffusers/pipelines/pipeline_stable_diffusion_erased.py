"""Erased pipelines: a StableDiffusionPipeline / StableDiffusionXLPipeline whose ``from_pretrained`` takes an erasure.

    pipe = StableDiffusionErasedPipeline.from_pretrained("CompVis/stable-diffusion-v1-4", erasure="out/no-nudity")
    pipe = StableDiffusionErasedPipeline.from_pretrained("out/no-nudity")   # base model read from the erasure's config
    pipe = StableDiffusionXLErasedPipeline.from_pretrained("out/sdxl-no-nudity")   # an erasure of an SDXL base
"""

from __future__ import annotations

import json
import os
from typing import Optional

from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from ..delta import CONFIG_NAME
from ..loaders import ErasureLoaderMixin

BUNDLED_DIGIT_MODEL = "salun-diffusers/digit-sd"


def resolve_base_model(name_or_path: str) -> str:
    """Map the bundled digit model's id to its folder inside the package; anything else is returned as is."""
    if name_or_path == BUNDLED_DIGIT_MODEL:
        from ..digits import DIGIT_PIPELINE_DIR

        return DIGIT_PIPELINE_DIR
    return name_or_path


def _erasure_dir_config(path) -> Optional[dict]:
    """The erasure config of a train_erase.py output folder that is not itself a pipeline folder."""
    if isinstance(path, str) and os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model_index.json")):
        cfg = os.path.join(path, CONFIG_NAME)
        if os.path.isfile(cfg):
            with open(cfg) as f:
                return json.load(f)
    return None


class _ErasedFromPretrained(ErasureLoaderMixin):
    """``from_pretrained(base, erasure=...)`` or ``from_pretrained(erasure_output_dir)`` for an erased pipeline."""

    _base_family = StableDiffusionPipeline

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, erasure=None, erasure_scale: float = 1.0,
                        **kwargs):
        meta = _erasure_dir_config(pretrained_model_name_or_path)
        if meta is not None and erasure is None:
            erasure = pretrained_model_name_or_path
            base = meta.get("config", {}).get("base_model")
            if not base:
                raise ValueError(f"{pretrained_model_name_or_path!r} records no base model; pass the base model "
                                 "and erasure=... explicitly")
            pretrained_model_name_or_path = base
            kwargs.setdefault("revision", meta.get("config", {}).get("revision"))
        source = resolve_base_model(pretrained_model_name_or_path)
        cls._check_family(source, kwargs.get("revision"))
        pipe = super().from_pretrained(source, *args, **kwargs)
        if erasure is not None:
            pipe.load_erasure(erasure, scale=erasure_scale)
        return pipe

    @classmethod
    def _check_family(cls, source, revision) -> None:
        """Name the right erased class when the base's ``model_index.json`` names the other family."""
        try:
            name = DiffusionPipeline.load_config(source, revision=revision).get("_class_name", "")
        except Exception:  # unreadable here: let from_pretrained report it
            return
        for erased in (StableDiffusionErasedPipeline, StableDiffusionXLErasedPipeline):
            other = erased._base_family
            if name == other.__name__ and not issubclass(cls, other):
                raise ValueError(f"{source!r} is a {name}: load it with {erased.__name__}, not {cls.__name__}")


class StableDiffusionErasedPipeline(_ErasedFromPretrained, StableDiffusionPipeline):
    """SD 1.x / 2.x with ``load_erasure`` / ``unload_erasure`` / ``fuse_erasure`` / ``set_erasure_scale``."""

    _base_family = StableDiffusionPipeline


class StableDiffusionXLErasedPipeline(_ErasedFromPretrained, StableDiffusionXLPipeline):
    """SDXL with ``load_erasure`` / ``unload_erasure`` / ``fuse_erasure`` / ``set_erasure_scale``."""

    _base_family = StableDiffusionXLPipeline
