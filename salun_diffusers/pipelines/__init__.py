from .pipeline_stable_diffusion_erased import StableDiffusionErasedPipeline  # noqa: F401

__all__ = ["StableDiffusionErasedPipeline"]
