"""salun-diffusers: concept erasure for Stable Diffusion and image classifiers with SalUn (arXiv 2310.12508).

    from salun_diffusers import EraseConfig, load_erasure
    from salun_diffusers.erase import erase
    from salun_diffusers.pipelines import StableDiffusionErasedPipeline
"""

__version__ = "0.1.0"

from .config import EraseConfig  # noqa: E402,F401
from .loaders import (ErasureLoaderMixin, fuse_erasure, get_erasure_metadata, load_erasure,  # noqa: E402,F401
                      set_erasure_scale, unload_erasure)
from .masking import MaskedUpdate, load_mask, mask_density, mask_from_saliency, save_mask  # noqa: E402,F401
from .saliency import accumulate_gradients, compute_saliency  # noqa: E402,F401

__all__ = ["EraseConfig", "ErasureLoaderMixin", "MaskedUpdate", "accumulate_gradients", "compute_saliency",
           "fuse_erasure", "get_erasure_metadata", "load_erasure", "load_mask", "mask_density", "mask_from_saliency",
           "save_mask", "set_erasure_scale", "unload_erasure"]
