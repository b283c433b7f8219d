"""Erasure phase 4, outputs: what ``output_dir`` receives (checked before any work, written at the end):
``erasure.safetensors`` + ``erasure_config.json``, the merged ``unet/``, ``metrics.json`` and the model card."""

from __future__ import annotations

import os
from typing import Mapping, Optional, Tuple

import torch

from .. import __version__
from ..concepts import ConceptSpec
from ..config import EraseConfig
from ..delta import CONFIG_NAME, MASK_NAME, WEIGHTS_NAME, build_delta, save_delta
from ..utils import resolve_dtype, write_json, write_text
from .data import base_model_id


def check_output_dir(config: EraseConfig) -> None:
    """Refuse to overwrite an existing erasure unless asked, before any work is done."""
    existing = os.path.join(config.output_dir, WEIGHTS_NAME)
    if os.path.exists(existing) and not config.overwrite_output_dir and not config.resume_from_checkpoint:
        raise FileExistsError(f"{existing} already exists; choose another --output_dir, or pass "
                              "--overwrite_output_dir to replace it")


def write_outputs(config: EraseConfig, spec: ConceptSpec, unet, mask: Mapping[str, torch.Tensor],
                  metrics: dict, base_digest: Optional[Mapping[str, str]] = None) -> Tuple[str, Optional[str]]:
    """Write the erasure, the merged U-Net (if asked), metrics and model card. Returns ``(erasure path, unet dir)``.
    ``base_digest``: :func:`~salun_diffusers.delta.base_values_digest` of the base U-Net, taken before training."""
    delta = build_delta(unet, mask, erasure_metadata(config, spec), dtype=resolve_dtype(config.delta_dtype),
                        base_digest=base_digest)
    erasure_path = save_delta(delta, config.output_dir)
    unet_dir = None
    if config.save_merged_unet:
        unet_dir = os.path.join(config.output_dir, "unet")
        unet.save_pretrained(unet_dir, safe_serialization=True)
    metrics["num_changed_weights"] = delta.num_changed()
    write_json(os.path.join(config.output_dir, "metrics.json"), metrics)
    write_text(os.path.join(config.output_dir, "README.md"), model_card(config, spec, metrics))
    return erasure_path, unet_dir


def erasure_metadata(config: EraseConfig, spec: ConceptSpec) -> dict:
    cfg = {k: v for k, v in config.to_dict().items() if k not in ("output_dir", "cache_dir", "resume_from_checkpoint",
                                                                   "overwrite_output_dir", "logging_dir", "report_to")}
    cfg.update({"base_model": base_model_id(config), "concept": spec.name, "forget_prompt": spec.forget_prompt,
                "pseudo_prompts": list(spec.pseudo_prompts), "retain_prompts": list(spec.retain_prompts),
                "salun_diffusers_version": __version__})
    return cfg


def model_card(config: EraseConfig, spec: ConceptSpec, metrics: dict) -> str:
    base = base_model_id(config)
    return f"""---
library_name: diffusers
base_model: {base}
tags:
- stable-diffusion
- concept-erasure
- machine-unlearning
- salun
- salun-diffusers
---

# SalUn erasure of "{spec.name}" from `{base}`

This folder holds a [SalUn](https://arxiv.org/abs/2310.12508) (saliency unlearning) erasure of the concept
**{spec.name}** from the U-Net of `{base}`, made with salun-diffusers {__version__}.
Only the {metrics.get('mask_density', 0):.1%} most salient U-Net weights ({metrics.get('num_changed_weights', 0):,})
were changed; every other weight is bit-identical to the base model.

## Use

```python
from diffusers import StableDiffusionPipeline
from salun_diffusers import load_erasure

pipe = StableDiffusionPipeline.from_pretrained("{base}")
load_erasure(pipe, "path/to/this/folder")   # or the StableDiffusionErasedPipeline below
```

```python
from salun_diffusers.pipelines import StableDiffusionErasedPipeline

pipe = StableDiffusionErasedPipeline.from_pretrained("path/to/this/folder")
```

{"The erased U-Net is also saved in full: `UNet2DConditionModel.from_pretrained(folder, subfolder='unet')`." if config.save_merged_unet else ""}

## Training

| setting | value |
|---|---|
| forget prompt | {spec.forget_prompt} |
| pseudo prompt(s) c' | {'; '.join(spec.pseudo_prompts[:4])}{' ...' if len(spec.pseudo_prompts) > 4 else ''} |
| retain prompt(s) | {'; '.join(spec.retain_prompts[:4])}{' ...' if len(spec.retain_prompts) > 4 else ''} |
| forget / retain images | {config.num_forget_images} / {config.num_retain_images} |
| mask | {config.mask_scope} top {config.mask_ratio:g} of gradient saliency |
| steps, batch, lr, alpha | {config.max_train_steps}, {config.train_batch_size}, {config.learning_rate:g}, {config.alpha:g} |
| seed | {config.seed} |
| wall time | {metrics.get('total_seconds', 0):.1f} s |

Files: `{WEIGHTS_NAME}` (masked values + packed mask), `{CONFIG_NAME}`, `{MASK_NAME}`, `train_config.json`,
`metrics.json`.

## Limitations

Erasure reduces, but does not guarantee the absence of, the concept; adversarial prompts can recover erased
concepts. Audit the model (e.g. `salun-audit` with NudeNet over I2P) before relying on it.
"""
