"""The SDXL erased pipeline as a single-file diffusers community pipeline (needs ``pip install salun-diffusers``).

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0",
                                             custom_pipeline="pipelines/pipeline_stable_diffusion_xl_erased.py",
                                             trust_remote_code=True)   # diffusers asks for it for local code
    pipe.load_erasure("out/sdxl-no-nudity")      # also set_erasure_scale / unload_erasure / fuse_erasure

The implementation is salun_diffusers.pipelines.StableDiffusionXLErasedPipeline; this file only names it.
"""

import salun_diffusers.pipelines as _salun_pipelines


class StableDiffusionXLErasedPipeline(_salun_pipelines.StableDiffusionXLErasedPipeline):
    pass
