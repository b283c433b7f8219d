"""salun-diffusers: concept erasure for Stable Diffusion and image classifiers with SalUn (arXiv 2310.12508).

    from salun_diffusers import EraseConfig, load_erasure
    from salun_diffusers.erase import erase
    from salun_diffusers.pipelines import StableDiffusionErasedPipeline
"""

__version__ = "0.1.0"


def _quiet_torchvision_fallback() -> None:
    """Drop transformers' import-time notice that an image processor falls back to its PIL version without
    torchvision: diffusers' pipelines import CLIP/Siglip processors at import, nothing here needs torchvision, and
    the PIL version is what runs. Installed before anything imports diffusers; other warnings pass."""
    import logging

    class _Filter(logging.Filter):
        def filter(self, record):
            return "requires torchvision (not installed); falling back to" not in record.getMessage()

    logging.getLogger("transformers.utils.import_utils").addFilter(_Filter())


_quiet_torchvision_fallback()

from .config import EraseConfig  # noqa: E402,F401
from .loaders import (ErasureLoaderMixin, fuse_erasure, get_erasure_metadata, load_erasure,  # noqa: E402,F401
                      set_erasure_scale, unload_erasure)
from .masking import MaskedUpdate, load_mask, mask_density, mask_from_saliency, save_mask  # noqa: E402,F401
from .saliency import accumulate_gradients, compute_saliency  # noqa: E402,F401

__all__ = ["EraseConfig", "ErasureLoaderMixin", "MaskedUpdate", "accumulate_gradients", "compute_saliency",
           "fuse_erasure", "get_erasure_metadata", "load_erasure", "load_mask", "mask_density", "mask_from_saliency",
           "save_mask", "set_erasure_scale", "unload_erasure"]
