from .pipeline_stable_diffusion_erased import StableDiffusionErasedPipeline, StableDiffusionXLErasedPipeline  # noqa: F401

__all__ = ["StableDiffusionErasedPipeline", "StableDiffusionXLErasedPipeline"]
