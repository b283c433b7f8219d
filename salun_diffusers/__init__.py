"""salun-diffusers: concept erasure for Stable Diffusion and image classifiers with SalUn (arXiv 2310.12508).

    from salun_diffusers import EraseConfig, load_erasure
    from salun_diffusers.erase import erase
    from salun_diffusers.pipelines import StableDiffusionErasedPipeline
"""

import logging
import warnings



def _quiet_unactionable_notices() -> None:
    """Drop two notices printed on every run that a user cannot act on; installed before anything imports diffusers,
    matching those exact messages only (every other warning passes):

    * transformers: an image processor "requires torchvision (not installed); falling back to" its PIL version.
      diffusers' pipelines import CLIP/Siglip processors at import; nothing here needs torchvision.
    * huggingface_hub: "The `local_dir_use_symlinks` argument is deprecated", which diffusers' own config loader
      passes when a pipeline is loaded by hub id.
    """
    class _Filter(logging.Filter):
        def filter(self, record):
            return "requires torchvision (not installed); falling back to" not in record.getMessage()

    logging.getLogger("transformers.utils.import_utils").addFilter(_Filter())
    warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated",
                            category=UserWarning)


_quiet_unactionable_notices()

from .utils import __version__  # noqa: E402,F401
from .config import EraseConfig  # noqa: E402,F401
from .loaders import (ErasureLoaderMixin, fuse_erasure, get_erasure_metadata, get_loaded_erasures,  # noqa: E402,F401
                      load_erasure, set_erasure_scale, unload_erasure)
from .masking import MaskedUpdate, load_mask, mask_density, mask_from_saliency, save_mask  # noqa: E402,F401
from .saliency import accumulate_gradients, compute_saliency  # noqa: E402,F401

__all__ = ["EraseConfig", "ErasureLoaderMixin", "MaskedUpdate", "accumulate_gradients", "compute_saliency",
           "fuse_erasure", "get_erasure_metadata", "get_loaded_erasures", "load_erasure", "load_mask", "mask_density", "mask_from_saliency",
           "save_mask", "set_erasure_scale", "unload_erasure"]
