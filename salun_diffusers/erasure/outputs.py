"""Erasure phase 4, outputs: what ``output_dir`` receives (checked before any work, written at the end):
``erasure.safetensors`` + ``erasure_config.json``, the merged ``unet/``, ``metrics.json`` and the model card."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from typing import Iterator, Mapping, Optional, Tuple

import torch

from .. import __version__
from ..concepts import ConceptSpec
from ..config import EraseConfig
from ..delta import CONFIG_NAME, MASK_NAME, WEIGHTS_NAME, build_delta, save_delta
from ..utils import atomic_dir, resolve_dtype, write_json, write_text
from .checkpoints import check_same_run
from .data import base_model_id


LOCK_NAME = ".salun-erase.lock"
FINAL_OUTPUTS = (WEIGHTS_NAME, MASK_NAME, "unet", "README.md")  # what a run would replace in --output_dir


class OutputDirBusy(OSError):
    """Another run holds the output folder's lock."""


@contextlib.contextmanager
def output_lock(output_dir: str, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<output_dir>/.salun-erase.lock`` for the whole run: one writer per output
    folder. The OS releases it when the process ends in any way (kill -9 included), so it is never stale; the file
    records the holder (pid, host, start time) for the refusal message."""
    if not enabled:
        yield
        return
    import fcntl

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with open(path) as f:
                holder = f.read().strip() or "a run that is starting"
            raise OutputDirBusy(f"{output_dir!r} is in use by another run ({holder}); wait for it to finish or "
                                "choose another --output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def _check_writable(folder: str, flag: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ValueError(f"{flag} {folder!r} is not a writable folder ({exc.strerror or exc}); choose another "
                         f"{flag}") from None


def _check_readable(config: EraseConfig) -> None:
    for flag in ("forget_data_dir", "retain_data_dir"):
        folder = getattr(config, flag)
        if folder is None:
            continue
        try:
            os.listdir(folder)
        except OSError as exc:
            raise ValueError(f"--{flag} {folder!r} cannot be read ({exc.strerror or exc}); pass a folder of "
                             "images") from None
    if config.mask_path:
        from ..masking import load_mask

        load_mask(config.mask_path)  # a mask file is small: read it all now rather than after hours of data


def estimate_output_bytes(config: EraseConfig) -> Optional[int]:
    """Rough disk need of a run (merged U-Net, checkpoints with AdamW state, erasure), from the base U-Net's file
    size; ``None`` when the base model is not a local folder."""
    from ..pipelines.pipeline_stable_diffusion_erased import resolve_base_model

    unet_dir = os.path.join(resolve_base_model(base_model_id(config)), "unet")
    if not os.path.isdir(unet_dir):
        return None
    weights = [f for f in os.listdir(unet_dir) if f.endswith((".safetensors", ".bin"))
               and (f".{config.variant}." in f) == bool(config.variant)]
    size = max((os.path.getsize(os.path.join(unet_dir, f)) for f in weights), default=0)
    fp32 = size * (2 if config.variant in ("fp16", "bf16") else 1)
    kept = 0
    if config.checkpointing_steps:
        kept = config.max_train_steps // config.checkpointing_steps
        if config.checkpoints_total_limit:
            kept = min(kept, config.checkpoints_total_limit + 1)  # the new one is complete before the oldest goes
    return int(fp32 * (3 * kept + int(config.save_merged_unet) + config.mask_ratio))


def check_before_compute(config: EraseConfig) -> None:
    """Before any work: the output (and cache) folder is writable, the inputs are readable, and the disk has room."""
    _check_writable(config.output_dir, "--output_dir")
    if config.cache_dir:
        _check_writable(config.cache_dir, "--cache_dir")
    _check_readable(config)
    need = estimate_output_bytes(config)
    if need:
        free = shutil.disk_usage(config.output_dir).free
        if free < need:
            raise ValueError(f"--output_dir {config.output_dir!r} has {free / 2**30:.2f} GiB free but the run needs "
                             f"about {need / 2**30:.2f} GiB (merged U-Net, checkpoints, erasure); free space, choose "
                             "another --output_dir, or keep fewer checkpoints (--checkpoints_total_limit) or no merged "
                             "U-Net (--no-save_merged_unet)")


def check_output_dir(config: EraseConfig) -> None:
    """Refuse to overwrite an existing erasure unless asked (or resuming the same run), before any work is done."""
    out = config.output_dir
    existing = [n for n in FINAL_OUTPUTS if os.path.lexists(os.path.join(out, n))]
    if config.mask_path and os.path.abspath(config.mask_path) == os.path.abspath(os.path.join(out, MASK_NAME)):
        existing.remove(MASK_NAME)  # the input mask of this run, not overwritten
    if not existing or config.overwrite_output_dir:
        return
    if not config.resume_from_checkpoint:
        raise FileExistsError(f"{out!r} already holds {', '.join(existing)}; choose another --output_dir, or pass "
                              "--overwrite_output_dir to replace it (--resume_from_checkpoint latest to finish the "
                              "run that wrote it)")
    record = os.path.join(out, "train_config.json")
    if not os.path.isfile(record):
        raise FileExistsError(f"{out!r} already holds {', '.join(existing)} but no train_config.json, so resuming "
                              "cannot tell whether it is the same run; choose another --output_dir, or pass "
                              "--overwrite_output_dir to replace it")
    with open(record) as f:
        check_same_run(json.load(f), config, f"the run in {out!r}")


def write_outputs(config: EraseConfig, spec: ConceptSpec, unet, mask: Mapping[str, torch.Tensor],
                  metrics: dict) -> Tuple[str, Optional[str]]:
    """Write the erasure, the merged U-Net (if asked), metrics and model card. Returns ``(erasure path, unet dir)``."""
    delta = build_delta(unet, mask, erasure_metadata(config, spec), dtype=resolve_dtype(config.delta_dtype))
    erasure_path = save_delta(delta, config.output_dir)
    unet_dir = None
    if config.save_merged_unet:
        unet_dir = os.path.join(config.output_dir, "unet")
        with atomic_dir(unet_dir) as tmp:
            unet.save_pretrained(tmp, safe_serialization=True)
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
