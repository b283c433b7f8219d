"""The pipeline families SalUn erases from, and what their U-Nets are conditioned on.

* **Stable Diffusion 1.x / 2.x** (``StableDiffusionPipeline``; 2.x may predict ``v``): one CLIP text encoder, the
  U-Net takes ``encoder_hidden_states`` only.
* **SDXL** (``StableDiffusionXLPipeline``): two text encoders whose penultimate hidden states are concatenated, plus
  ``added_cond_kwargs``: the pooled ``text_embeds`` of the second encoder and six ``time_ids`` (original size, crop
  top-left, target size).

A prompt's conditioning is a :class:`PromptCond`; :func:`encode_prompts` makes it with the pipeline's own
``encode_prompt`` (so training sees exactly what sampling sees) and the objectives pass it to the U-Net with
:func:`unet_kwargs`. A plain tensor still works wherever a ``PromptCond`` does (SD 1.x/2.x hidden states).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from tqdm.auto import tqdm

from .hub import BUNDLED_DIGIT_MODEL, resolve_base_model

logger = logging.getLogger(__name__)

SD = "StableDiffusionPipeline"
SDXL = "StableDiffusionXLPipeline"
PIPELINE_CLASSES = (SD, SDXL)


def pipeline_class_name(pipe) -> str:
    """``"StableDiffusionXLPipeline"`` for an SDXL pipeline (also a subclass, e.g. the erased one), else
    ``"StableDiffusionPipeline"`` (SD 1.x and 2.x). Refuses pipelines without a conditional U-Net and text encoder."""
    if isinstance(pipe, StableDiffusionXLPipeline):
        return SDXL
    if isinstance(pipe, StableDiffusionPipeline):
        return SD
    raise ValueError(f"{type(pipe).__name__} is not supported: SalUn erases from text-to-image Stable Diffusion 1.x/"
                     f"2.x ({SD}) and SDXL ({SDXL}) pipelines")


def load_base_pipeline(source: str, *, revision: Optional[str] = None, variant: Optional[str] = None,
                       torch_dtype: Optional[torch.dtype] = None):
    """A Stable Diffusion 1.x/2.x or SDXL pipeline folder or hub id as the class its ``model_index.json`` names, with
    the safety checker off (the forget data is, by design, the concept the checker would blank)."""
    kwargs = dict(revision=revision, variant=variant)
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    try:
        index = DiffusionPipeline.load_config(source, revision=revision)
        if "safety_checker" in index:  # only SD 1.x/2.x have one; SDXL would warn about the unexpected argument
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise OSError(f"could not load the base model {source!r}: {exc}. Pass a local folder or a hub id that is "
                      "reachable (set HF_HUB_OFFLINE=1 to use the local cache only)") from exc
    pipeline_class_name(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def base_model_id(config) -> str:
    """The base model an erasure config names (``pretrained_model_name_or_path``), else the bundled digit model."""
    return config.pretrained_model_name_or_path or BUNDLED_DIGIT_MODEL


def load_erasure_base(config):
    """The base pipeline of an erasure config (:class:`~salun_diffusers.config.EraseConfig`: model, revision,
    variant), as :func:`load_base_pipeline` loads it."""
    return load_base_pipeline(resolve_base_model(base_model_id(config)), revision=config.revision,
                              variant=config.variant)


def training_scheduler(pipe):
    """A DDPM scheduler with the pipeline's noise schedule (for noising training latents; SD 2.x's ``v`` prediction
    comes with it)."""
    return DDPMScheduler.from_config(pipe.scheduler.config)


def vae_dtype(pipe, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype to run a frozen VAE in under ``weight_dtype``: SDXL's VAE overflows in fp16 (its config says
    ``force_upcast``; the SDXL pipeline upcasts it too), so float32 there, else ``weight_dtype``."""
    upcast = pipeline_class_name(pipe) == SDXL and getattr(pipe.vae.config, "force_upcast", False)
    return torch.float32 if upcast and weight_dtype == torch.float16 else weight_dtype


def _load_pixels(paths: Sequence[str], size: int) -> torch.Tensor:
    arrays = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # truncated, not an image
            raise ValueError(f"image {p!r} cannot be read ({exc}); replace or remove it (a generated image in the "
                             "cache is drawn again once removed)") from None
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def encode_images(vae, paths: Sequence[str], size: int, batch_size: int = 16, desc: str = "encode") -> torch.Tensor:
    """Latents (distribution mode, times the VAE scaling factor) of image files, in float32 on the VAE's device."""
    out = []
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    for start in tqdm(range(0, len(paths), batch_size), desc=desc, disable=len(paths) <= batch_size):
        pixels = _load_pixels(paths[start:start + batch_size], size).to(vae.device, vae.dtype)
        latents = vae.encode(pixels).latent_dist.mode()
        out.append(((latents - shift) * scale).float())
    return torch.cat(out)


def text_encoders(pipe):
    """The pipeline's text encoders (one for SD, two for SDXL)."""
    return [m for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m is not None]


@dataclass
class PromptCond:
    """What the U-Net is conditioned on for one prompt (``embeds`` [77, D]; ``added`` values unbatched, e.g.
    ``text_embeds`` [P] and ``time_ids`` [6]) or for a batch (a leading batch dimension on every tensor).

    ``added`` is ``None`` for SD 1.x/2.x and the U-Net's ``added_cond_kwargs`` for SDXL."""

    embeds: torch.Tensor
    added: Optional[Dict[str, torch.Tensor]] = None

    def _map(self, fn) -> "PromptCond":
        return PromptCond(fn(self.embeds), None if self.added is None else {k: fn(v) for k, v in self.added.items()})

    def expand(self, batch_size: int) -> "PromptCond":
        """One prompt's conditioning as a batch of ``batch_size`` (a view, like ``Tensor.expand``)."""
        return self._map(lambda t: t.expand(batch_size, *t.shape))

    def __getitem__(self, index) -> "PromptCond":
        """Rows of a batch (an index tensor or slice), like tensor indexing."""
        return self._map(lambda t: t[index])

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def to(self, *args, **kwargs) -> "PromptCond":
        return self._map(lambda t: t.to(*args, **kwargs))

    @staticmethod
    def stack(conds: Sequence["PromptCond"]) -> "PromptCond":
        """Single-prompt conditionings as one batch (like ``torch.stack``)."""
        first = conds[0]
        added = None if first.added is None else {k: torch.stack([c.added[k] for c in conds]) for k in first.added}
        return PromptCond(torch.stack([c.embeds for c in conds]), added)


Cond = Union[PromptCond, torch.Tensor]


def unet_kwargs(cond: Cond) -> dict:
    """Keyword arguments of ``unet(sample, t, **unet_kwargs(cond))`` for a batch of conditionings."""
    if isinstance(cond, torch.Tensor):
        return {"encoder_hidden_states": cond}
    if cond.added is None:
        return {"encoder_hidden_states": cond.embeds}
    return {"encoder_hidden_states": cond.embeds, "added_cond_kwargs": cond.added}


def cat_conds(conds: Sequence[Cond]) -> Cond:
    """Batches of conditionings one after another (``torch.cat`` along the batch), tensors or :class:`PromptCond`."""
    if isinstance(conds[0], torch.Tensor):
        return torch.cat(list(conds))
    added = None if conds[0].added is None else {k: torch.cat([c.added[k] for c in conds]) for k in conds[0].added}
    return PromptCond(torch.cat([c.embeds for c in conds]), added)


def sdxl_time_ids(height: int, width: int) -> torch.Tensor:
    """SDXL's micro-conditioning for an uncropped image drawn at its own size: ``(h, w, 0, 0, h, w)``, as the SDXL
    pipeline passes by default (diffusers' SDXL training script passes the image's original size and crop)."""
    return torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], size: Optional[int] = None,
                   unconditional: bool = True) -> Dict[str, PromptCond]:
    """The conditioning (float32) of each distinct prompt, made by the pipeline's own ``encode_prompt``.

    With ``unconditional``, key ``""`` holds the pipeline's classifier-free-guidance unconditional conditioning (the
    empty prompt's encoding for SD; zeros for SDXL with ``force_zeros_for_empty_prompt``). ``size`` (SDXL): the
    training resolution the time ids name (default: the pipeline's native size)."""
    device = text_encoders(pipe)[0].device
    keys = list(dict.fromkeys(p for p in prompts if not (unconditional and p == "")))
    out: Dict[str, PromptCond] = {}
    if pipeline_class_name(pipe) == SD:
        for prompt in keys:
            out[prompt] = PromptCond(pipe.encode_prompt(prompt, device, 1, False)[0][0].float())
        if unconditional:
            out[""] = PromptCond(pipe.encode_prompt("", device, 1, True)[1][0].float())
        return out
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    time_ids = sdxl_time_ids(size, size).to(device)
    for prompt in keys:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, do_classifier_free_guidance=False)
        out[prompt] = PromptCond(embeds[0].float(), {"text_embeds": pooled[0].float(), "time_ids": time_ids})
    if unconditional:
        _, embeds, _, pooled = pipe.encode_prompt("", device=device, do_classifier_free_guidance=True)
        out[""] = PromptCond(embeds[0].float(), {"text_embeds": pooled[0].float(), "time_ids": time_ids})
    return out


def check_fits(pipe, allowed: Sequence[str], what: str, fix: str = "pick another base model or concept") -> None:
    """Refuse a pipeline whose class is not among ``allowed`` (e.g. a preset's pipeline classes)."""
    name = pipeline_class_name(pipe)
    if name not in allowed:
        raise ValueError(f"{what} fits {' or '.join(allowed)}, not {name}; {fix}")


__all__ = ["PIPELINE_CLASSES", "PromptCond", "base_model_id", "cat_conds", "check_fits", "encode_images",
           "encode_prompts", "load_base_pipeline", "load_erasure_base", "pipeline_class_name", "sdxl_time_ids",
           "text_encoders", "training_scheduler", "unet_kwargs", "vae_dtype"]
