#!/usr/bin/env python
"""Build what each bundled digit world ships besides its weights (salun_diffusers/assets/<world>-*), so a first
`train_erase.py --concept <digit>` on it draws neither data nor the base model's verdict:

* ``<world>-data.npz``: its forget / retain images for the digit presets at seed 0;
* ``<world>-verdict-base.json``: the judge's scores of the base model, as train_erase.py's verdict judges it.

    python scripts/build_digit_data.py                   # both worlds, ~2 min on one CPU thread
    python scripts/build_digit_data.py --world digit-sd3 # one (digit: the U-Net world, digit-sd3: the SD3 one)

Every prompt of a digit preset gets images for the seeds an erasure draws it with (forget: 0 .. num_forget_images-1;
retain: 50000 .. 50000 + its share of num_retain_images - 1, the world's own preset settings and retain prompts),
drawn exactly as erasure/data.py draws them (the pipeline as train_erase.py loads it, same generator, settings, batch
size and pipeline-call settings), stored as uint8 RGB with the key that ties them to the model's weights and the
settings. A file whose content would not change is left as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from salun_diffusers.concepts import DIGIT_WORDS  # noqa: E402
from salun_diffusers.config import EraseConfig  # noqa: E402
from salun_diffusers.data_cache import shipped_array_name, shipped_arrays_sha256, shipped_data_key  # noqa: E402
from salun_diffusers.digits import (BUNDLED_WORLDS, SHIPPED_DATA_SUFFIX, SHIPPED_VERDICT_SUFFIX,  # noqa: E402
                                    DigitJudge, shipped_asset)
from salun_diffusers.erasure.data import data_batch_size, generate_concept_images  # noqa: E402
from salun_diffusers.families import load_base_pipeline, model_family  # noqa: E402
from salun_diffusers.hub import BUNDLED_MODELS  # noqa: E402
from salun_diffusers.reporting import VERDICT_STEPS, base_verdict_entry  # noqa: E402
from salun_diffusers.utils import atomic_path, read_json_or_none, write_json  # noqa: E402


def preset_draws(model_id: str):
    """The (prompt, first seed) -> image count an erasure of each digit preset draws on ``model_id``, and the
    generation settings (from the preset's config, as train_erase.py resolves it)."""
    draws, settings = {}, None
    for word in DIGIT_WORDS:
        config = EraseConfig(concept=word, pretrained_model_name_or_path=model_id, output_dir="unused")
        spec = config.concept_spec()
        seed = config.seed * 100_000
        draws[(spec.forget_prompt, seed)] = config.num_forget_images
        k = len(spec.retain_prompts)
        for j, prompt in enumerate(spec.retain_prompts):  # the split erasure/data.py's prepare_data makes
            n = config.num_retain_images // k + (1 if j < config.num_retain_images % k else 0)
            draws[(prompt, seed + 50_000)] = max(n, draws.get((prompt, seed + 50_000), 0))
        settings = settings or config
    return draws, settings


def build_data(pipe, model_id: str, out: str) -> None:
    draws, config = preset_draws(model_id)
    family = model_family(pipe, config)
    size = config.resolution or family.native_size()
    sampling = {k: v for k, v in family.sampling_kwargs().items() if k != "guidance_scale"}
    steps, guidance = config.data_num_inference_steps, config.data_guidance_scale
    gen = dict(num_inference_steps=steps, guidance_scale=guidance, size=size,
               batch_size=data_batch_size(config, family.denoiser), **sampling)
    arrays = {"key": np.array(shipped_data_key(pipe, steps, guidance, size, None, "no", sampling))}
    with tempfile.TemporaryDirectory() as tmp:
        for i, ((prompt, first), n) in enumerate(sorted(draws.items())):
            paths = generate_concept_images(pipe, prompt, list(range(first, first + n)), os.path.join(tmp, str(i)),
                                            **gen)
            arrays[shipped_array_name(prompt, first)] = np.stack([np.asarray(Image.open(p).convert("RGB"))
                                                                  for p in paths])
    images = {k: v for k, v in arrays.items() if k != "key"}
    arrays["sha256"] = np.array(shipped_arrays_sha256(images))
    if os.path.isfile(out):
        with np.load(out, allow_pickle=False) as old:
            if sorted(old.files) == sorted(arrays) and all(np.array_equal(old[k], arrays[k]) for k in arrays):
                print(f"{out}: unchanged ({len(images)} arrays)")
                return
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    print(f"{out}: {len(images)} arrays, {sum(len(v) for v in images.values())} images, "
          f"{os.path.getsize(out) / 1e6:.2f} MB")


def build_verdict(pipe, out: str) -> None:
    entry = base_verdict_entry(pipe, DigitJudge.from_pretrained(), num_inference_steps=VERDICT_STEPS)
    if read_json_or_none(out) == json.loads(json.dumps(entry)):  # as written (JSON keys are strings)
        print(f"{out}: unchanged")
        return
    write_json(out, entry)
    print(f"{out}: base retained accuracy {entry['scores']['retained_accuracy']:.1%}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", action="append", choices=sorted(BUNDLED_WORLDS),
                        help="a bundled world to build for (repeatable; default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for world in args.world or list(BUNDLED_WORLDS):
        folder = BUNDLED_WORLDS[world]
        model_id = next(i for i, d in BUNDLED_MODELS.items() if d == folder)
        pipe = load_base_pipeline(folder)  # as train_erase.py loads it (data and verdict)
        build_data(pipe, model_id, shipped_asset(world, SHIPPED_DATA_SUFFIX))
        build_verdict(pipe, shipped_asset(world, SHIPPED_VERDICT_SUFFIX))


if __name__ == "__main__":
    main()
