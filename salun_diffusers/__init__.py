"""salun-diffusers: concept erasure for Stable Diffusion and image classifiers with SalUn (arXiv 2310.12508)."""

__version__ = "0.1.0"

from .masking import MaskedUpdate, load_mask, mask_density, mask_from_saliency, save_mask  # noqa: F401
from .saliency import accumulate_gradients, compute_saliency  # noqa: F401
