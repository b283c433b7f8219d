#!/usr/bin/env python
"""Build salun_diffusers/assets/digit-data.npz: the bundled digit model's forget / retain images for the digit presets
at seed 0, so a first `train_erase.py --concept <digit>` draws none (like the shipped base verdict).

    python scripts/build_digit_data.py            # ~40 s on one CPU thread

Every digit prompt gets images for the forget seeds (0 .. num_forget_images-1) and the retain seeds
(50000 .. 50000 + num_retain_images/9 - 1), drawn exactly as erasure/data.py draws them (same generator, settings and
batch size), stored as uint8 RGB with the key that ties them to the model's weights and the settings.
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from salun_diffusers.concepts import DIGIT_WORDS, PRESETS, digit_prompt  # noqa: E402
from salun_diffusers.data_cache import shipped_array_name, shipped_arrays_sha256, shipped_data_key  # noqa: E402
from salun_diffusers.digits import ASSETS_DIR, DIGIT_PIPELINE_DIR, SHIPPED_DATA_ASSET, load_digit_pipeline  # noqa: E402
from salun_diffusers.erasure.data import generate_concept_images  # noqa: E402


def main():
    torch.set_num_threads(1)
    defaults = PRESETS[DIGIT_WORDS[0]].defaults
    steps, guidance = defaults["data_num_inference_steps"], defaults["data_guidance_scale"]
    n_forget, n_retain = defaults["num_forget_images"], defaults["num_retain_images"] // 9
    pipe = load_digit_pipeline()
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    arrays = {"key": np.array(shipped_data_key(pipe, steps, guidance, size))}
    with tempfile.TemporaryDirectory() as tmp:
        for d in range(10):
            prompt = digit_prompt(d)
            for first, n in ((0, n_forget), (50_000, n_retain)):
                seeds = list(range(first, first + n))
                paths = generate_concept_images(pipe, prompt, seeds, os.path.join(tmp, f"{d}-{first}"),
                                                num_inference_steps=steps, guidance_scale=guidance, size=size,
                                                batch_size=64)
                arrays[shipped_array_name(prompt, first)] = np.stack([np.asarray(Image.open(p).convert("RGB"))
                                                                      for p in paths])
    images = {k: v for k, v in arrays.items() if k != "key"}
    arrays["sha256"] = np.array(shipped_arrays_sha256(images))
    out = os.path.join(ASSETS_DIR, SHIPPED_DATA_ASSET)
    np.savez_compressed(out, **arrays)
    print(f"{out}: {len(images)} arrays, {os.path.getsize(out) / 1e6:.2f} MB (model {DIGIT_PIPELINE_DIR})")


if __name__ == "__main__":
    main()
