"""Validation images during an erasure, as diffusers' training examples draw them: ``--validation_prompts`` every
``--validation_steps`` (and after the last step), saved under ``<output_dir>/validation/step-NNNNNN/`` and logged to
the trackers (tensorboard, wandb)."""

from __future__ import annotations

import logging
import os
import re
from typing import Callable, List, Optional

import numpy as np
import torch

from ..config import EraseConfig
from ..families import denoiser, model_family
from ..utils import atomic_path

logger = logging.getLogger(__name__)


def validation_due(config: EraseConfig, step: int) -> bool:
    if not config.validation_prompts:
        return False
    every = config.validation_steps
    return step == config.max_train_steps or (every > 0 and step % every == 0)


def validation_hook(pipe, config: EraseConfig, accelerator) -> Optional[Callable[[int], None]]:
    """The training loop's per-step callback drawing validation images when due (None without prompts)."""
    if not config.validation_prompts:
        return None

    def hook(step: int) -> None:
        if validation_due(config, step):
            log_validation(pipe, config, accelerator, step)

    return hook


@torch.no_grad()
def log_validation(pipe, config: EraseConfig, accelerator, step: int) -> List[str]:
    """Draw ``num_validation_images`` per prompt with the U-Net being trained (main process only); return the
    image paths. Sampling uses the data-generation steps and guidance; image ``i`` of a prompt is seeded ``seed + i``."""
    if not accelerator.is_main_process:
        return []

    folder = os.path.join(config.output_dir, "validation", f"step-{step:06d}")
    model = denoiser(pipe)
    was_training = model.training
    model.eval()
    extra = {k: v for k, v in model_family(pipe, config).sampling_kwargs().items() if k != "guidance_scale"}
    paths, arrays = [], []
    for j, prompt in enumerate(config.validation_prompts):
        gens = [torch.Generator("cpu").manual_seed(config.seed + i) for i in range(config.num_validation_images)]
        with accelerator.autocast():
            images = pipe([prompt] * len(gens), generator=gens, num_inference_steps=config.data_num_inference_steps,
                          guidance_scale=config.data_guidance_scale, **extra).images
        slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "prompt"
        for i, image in enumerate(images):
            path = os.path.join(folder, f"{j:02d}-{slug}-{i}.png")
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
            paths.append(path)
            arrays.append(np.asarray(image))
    model.train(was_training)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack(arrays), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(a, caption=p) for a, p in zip(arrays, paths)]}, step=step)
    logger.info("validation: %d images in %s", len(paths), folder)
    return paths
