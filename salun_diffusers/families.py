"""The pipeline families SalUn erases from, and what their U-Nets are conditioned on.

* **Stable Diffusion 1.x / 2.x** (``StableDiffusionPipeline``; 2.x may predict ``v``): one CLIP text encoder, the
  U-Net takes ``encoder_hidden_states`` only.
* **SDXL** (``StableDiffusionXLPipeline``): two text encoders whose penultimate hidden states are concatenated, plus
  ``added_cond_kwargs``: the pooled ``text_embeds`` of the second encoder and six ``time_ids`` (original size, crop
  top-left, target size).
* **SD3** (``StableDiffusion3Pipeline``) and **FLUX** (``FluxPipeline``): flow-matching transformers
  (``pipe.transformer``) conditioned on CLIP + T5 hidden states and pooled CLIP embeddings (FLUX-dev also on its
  distilled guidance); they predict the velocity ``noise - x0`` at a shifted sigma (:mod:`.flow_matching`).

The erasure's phases see a family through one object, :func:`model_family` (:class:`UNetFamily` or
:class:`FlowFamily`): the denoiser of the pipeline, prompt conditioning by the pipeline's ``encode_prompt``, latents
from images, noise / timesteps / training target (``noised``), the model call (``predict``) and the sampling settings.

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
from diffusers import (DDPMScheduler, DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline,
                       StableDiffusionPipeline, StableDiffusionXLPipeline)
from PIL import Image
from tqdm.auto import tqdm

from . import flow_matching as fm
from .digits import flow_sampling_defaults
from .hub import BUNDLED_DIGIT_MODEL, resolve_base_model

logger = logging.getLogger(__name__)

SD = "StableDiffusionPipeline"
SDXL = "StableDiffusionXLPipeline"
SD3 = "StableDiffusion3Pipeline"
FLUX = "FluxPipeline"
UNET_CLASSES = (SD, SDXL)
FLOW_CLASSES = (SD3, FLUX)
PIPELINE_CLASSES = UNET_CLASSES + FLOW_CLASSES


def pipeline_class_name(pipe) -> str:
    """The family's pipeline class name (also for a subclass, e.g. an erased pipeline): ``StableDiffusionPipeline``
    (SD 1.x and 2.x), ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline`` or ``FluxPipeline``. Refuses
    any other pipeline."""
    for cls, name in ((StableDiffusionXLPipeline, SDXL), (StableDiffusionPipeline, SD),
                      (StableDiffusion3Pipeline, SD3), (FluxPipeline, FLUX)):
        if isinstance(pipe, cls):
            return name
    raise ValueError(f"{type(pipe).__name__} is not supported: SalUn erases from text-to-image Stable Diffusion 1.x/"
                     f"2.x ({SD}), SDXL ({SDXL}), SD3 ({SD3}) and FLUX ({FLUX}) pipelines")


def is_flow_model(name_or_path: str) -> bool:
    """Whether a base model (folder, bundled id or cached hub id) is an SD3 / FLUX pipeline (its ``model_index.json``
    names a transformer); False where its index cannot be read."""
    try:
        index = DiffusionPipeline.load_config(resolve_base_model(name_or_path))
    except (OSError, ValueError):
        return False
    return index.get("_class_name") in FLOW_CLASSES or (index.get("transformer") or [None])[0] is not None


def denoiser(pipe) -> torch.nn.Module:
    """The network SalUn erases from: ``pipe.transformer`` (SD3, FLUX) or ``pipe.unet``."""
    return pipe.transformer if pipeline_class_name(pipe) in FLOW_CLASSES else pipe.unet


def denoiser_folder(model) -> str:
    """The pipeline folder a denoiser is saved in: ``"transformer"`` for a transformer, else ``"unet"``."""
    return "transformer" if "Transformer" in type(model).__name__ else "unet"


def native_size(pipe) -> int:
    """The image size the pipeline draws by default (pixels)."""
    if getattr(pipe, "transformer", None) is not None:  # SD3, FLUX
        return pipe.default_sample_size * pipe.vae_scale_factor
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def load_base_pipeline(source: str, *, revision: Optional[str] = None, variant: Optional[str] = None,
                       torch_dtype: Optional[torch.dtype] = None):
    """A Stable Diffusion 1.x/2.x or SDXL pipeline folder or hub id as the class its ``model_index.json`` names, with
    the safety checker off (the forget data is, by design, the concept the checker would blank)."""
    kwargs = dict(revision=revision, variant=variant)
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    try:
        index = DiffusionPipeline.load_config(source, revision=revision)
        if index.get("text_encoder_3", [None])[0] is None and "text_encoder_3" in index:
            kwargs.update(text_encoder_3=None, tokenizer_3=None)  # SD3 without T5, as SD3 allows
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
    """The pipeline's text encoders (one for SD, two for SDXL and FLUX, up to three for SD3)."""
    return [m for m in (getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2", "text_encoder_3"))
            if m is not None]


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


def map_cond(cond: Cond, fn) -> Cond:
    """``fn`` applied to a conditioning's tensor, or to every tensor of a :class:`PromptCond` (e.g. ``.to``,
    ``.repeat``, ``.detach``)."""
    return fn(cond) if isinstance(cond, torch.Tensor) else cond._map(fn)


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


# ------------------------------------------------------------------------------------------------- the families
class UNetFamily:
    """SD 1.x/2.x/XL: DDPM noising at ``t ~ U{min_timestep .. T-1}``, the epsilon or ``v`` target of the pipeline's
    scheduler, ``unet(x_t, t, **unet_kwargs(cond)).sample``. ``pipe`` may be None (noise and model call only, e.g.
    for the attacks, which pass a scheduler)."""

    flow = False

    def __init__(self, pipe=None, scheduler=None):
        self.pipe = pipe
        self.scheduler = scheduler if scheduler is not None else training_scheduler(pipe)
        self.config = self.scheduler.config

    # pipeline side
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    def native_size(self) -> int:
        return native_size(self.pipe)

    def sampling_kwargs(self) -> dict:
        """Extra keyword arguments of the pipeline's ``__call__`` that make it sample as trained (none here)."""
        return {}

    def encode_prompts(self, prompts: Sequence[str], size: Optional[int] = None,
                       unconditional: bool = True) -> Dict[str, "PromptCond"]:
        return encode_prompts(self.pipe, prompts, size, unconditional)

    def encode_images(self, paths: Sequence[str], size: int, desc: str = "encode") -> torch.Tensor:
        return encode_images(self.pipe.vae, paths, size, desc=desc)

    # training side
    def sample_noise_and_timesteps(self, latents: torch.Tensor, generator: torch.Generator, min_timestep: int = 0):
        """Gaussian noise and timesteps ``t ~ U{min_timestep .. num_train_timesteps - 1}`` drawn from ``generator``."""
        noise = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=torch.float32)
        timesteps = torch.randint(min_timestep, self.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator, device=generator.device)
        return noise.to(latents.device, latents.dtype), timesteps.to(latents.device)

    def target(self, latents, noise, timesteps):
        kind = self.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"prediction_type {kind!r} is not supported; use an epsilon or v_prediction scheduler")

    def noised(self, latents: torch.Tensor, generator: torch.Generator, min_timestep: int = 0):
        """``(x_t, t, target)`` for a denoising loss on ``latents``: noise and timesteps drawn from ``generator``."""
        noise, t = self.sample_noise_and_timesteps(latents, generator, min_timestep)
        return self.scheduler.add_noise(latents, noise, t), t, self.target(latents, noise, t)

    def predict(self, model, x_t: torch.Tensor, t: torch.Tensor, cond: "Cond") -> torch.Tensor:
        return model(x_t, t, **unet_kwargs(cond)).sample


class FlowFamily(UNetFamily):
    """SD3 / FLUX (rectified flow): sigmas logit-normal (or uniform) in (0, 1) with the pipeline's own shift (FLUX:
    the dynamic ``mu`` of the latent size), ``x_t = (1 - s) x0 + s noise``, target ``noise - x0``; the transformer is
    called as the pipeline's denoising loop calls it (:func:`~salun_diffusers.flow_matching.transformer_kwargs`).
    ``t`` in this family is sigma. Conditioning: :class:`PromptCond` with ``added = {"pooled_projections": ...}``
    (FLUX's ``txt_ids`` are zeros of the text length, rebuilt per call). ``max_sequence_length``: the T5 length
    sampling uses (None: the pipeline's default); ``guidance_scale``: the distilled guidance of FLUX-dev models."""

    flow = True

    def __init__(self, pipe, max_sequence_length: Optional[int] = None, guidance_scale: Optional[float] = None,
                 sigma_scheme: str = "logit_normal"):
        self.pipe = pipe
        self.family = fm.flow_family(pipe)
        self.scheduler = pipe.scheduler
        self.config = self.scheduler.config
        self.max_sequence_length = max_sequence_length
        guided = self.family == "flux" and bool(pipe.transformer.config.guidance_embeds)
        self.guidance_scale = (3.5 if guidance_scale is None else guidance_scale) if guided else None
        self.sigma_scheme = sigma_scheme

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    def sampling_kwargs(self) -> dict:
        kw = {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}
        if self.guidance_scale is not None:
            kw["guidance_scale"] = self.guidance_scale
        return kw

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], size: Optional[int] = None,
                       unconditional: bool = True) -> Dict[str, "PromptCond"]:
        """Each distinct prompt through the pipeline's ``encode_prompt`` (CLIP + T5, pooled); ``""`` (the
        unconditional branch of the guided saliency loss) is the empty prompt's encoding, as SD3 encodes its
        default negative prompt."""
        device = text_encoders(self.pipe)[0].device
        keys = list(dict.fromkeys(prompts))
        if unconditional and "" not in keys:
            keys.append("")
        out: Dict[str, PromptCond] = {}
        for prompt in keys:
            c = fm.encode_flow_prompts(self.pipe, [prompt], self.max_sequence_length, device=device)
            out[prompt] = PromptCond(c.prompt_embeds[0].float(),
                                     {"pooled_projections": c.pooled_prompt_embeds[0].float()})
        return out

    def prompt_conds(self, prompts: Sequence[str]) -> "PromptCond":
        """The batched conditioning (float32) of ``prompts`` through the pipeline's ``encode_prompt``, with gradients
        flowing (e.g. to edited token embeddings of the text encoders: the prompt attacks)."""
        device = text_encoders(self.pipe)[0].device
        c = fm.encode_flow_prompts(self.pipe, list(prompts), self.max_sequence_length, device=device)
        return PromptCond(c.prompt_embeds.float(), {"pooled_projections": c.pooled_prompt_embeds.float()})

    def noised(self, latents: torch.Tensor, generator: torch.Generator, min_timestep: int = 0):
        noise = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=torch.float32)
        b = latents.shape[0]
        if self.sigma_scheme == "logit_normal":
            u = torch.sigmoid(torch.randn(b, generator=generator, device=generator.device, dtype=torch.float32))
        else:
            u = torch.rand(b, generator=generator, device=generator.device, dtype=torch.float32)
        mu = fm.pipeline_mu(self.pipe, *latents.shape[-2:])
        sigmas = fm.shift_sigmas(self.scheduler, u.double().cpu(), mu=mu).float()
        if min_timestep:  # the attacks' lowest timestep, as a sigma
            sigmas = sigmas.clamp(min=min_timestep / self.config.num_train_timesteps)
        noise, sigmas = noise.to(latents.device, latents.dtype), sigmas.to(latents.device)
        return fm.noisy_latents(latents, noise, sigmas), sigmas, fm.velocity_target(latents, noise)

    def predict(self, model, x_t: torch.Tensor, t: torch.Tensor, cond: "Cond") -> torch.Tensor:
        if not isinstance(cond, PromptCond) or cond.added is None:
            raise ValueError(f"{self.family} transformers need pooled prompt embeddings with the hidden states: pass a "
                             "PromptCond from FlowFamily.encode_prompts")
        embeds = cond.embeds.to(x_t.dtype)
        text_ids = None
        if self.family == "flux":  # FluxPipeline's txt_ids: zeros of the text length
            text_ids = torch.zeros(embeds.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        c = fm.FlowConditioning(embeds, cond.added["pooled_projections"].to(x_t.dtype), text_ids)
        out = model(**fm.transformer_kwargs(self.pipe, x_t, t, c, self.guidance_scale))[0]
        return fm.unpack_flux_latents(out, *x_t.shape[-2:]) if self.family == "flux" else out


def model_family(pipe, config=None) -> UNetFamily:
    """The family object of a pipeline: :class:`FlowFamily` for SD3 / FLUX, else :class:`UNetFamily`. ``config`` (an
    :class:`~salun_diffusers.config.EraseConfig`) may set the T5 length (``max_sequence_length``, default: the
    bundled flow world's own, else the pipeline's) and FLUX-dev's distilled guidance (``flux_guidance_scale``)."""
    if pipeline_class_name(pipe) not in FLOW_CLASSES:
        return UNetFamily(pipe)
    length = getattr(config, "max_sequence_length", None)
    if length is None and config is not None:
        length = flow_sampling_defaults(resolve_base_model(base_model_id(config))).get("max_sequence_length")
    return FlowFamily(pipe, length, getattr(config, "flux_guidance_scale", None))


def pipeline_family(pipe) -> UNetFamily:
    """:func:`model_family` of a loaded pipeline with the sampling settings of the folder it was loaded from (the
    bundled SD3 digit world's T5 length; none for other models)."""
    if pipeline_class_name(pipe) not in FLOW_CLASSES:
        return UNetFamily(pipe)
    source = getattr(pipe, "name_or_path", None)
    return FlowFamily(pipe, flow_sampling_defaults(source).get("max_sequence_length") if source else None)


def model_class_name(name_or_path: str) -> Optional[str]:
    """The pipeline class a base model's ``model_index.json`` names (folder, bundled id or cached hub id); None
    where its index cannot be read."""
    try:
        return DiffusionPipeline.load_config(resolve_base_model(name_or_path)).get("_class_name")
    except (OSError, ValueError):
        return None


def as_family(scheduler_or_family) -> UNetFamily:
    """A family object from what the objectives are given: a family object as is, a (DDPM) scheduler wrapped."""
    if isinstance(scheduler_or_family, UNetFamily):
        return scheduler_or_family
    return UNetFamily(None, scheduler_or_family)


def check_fits(pipe, allowed: Sequence[str], what: str, fix: str = "pick another base model or concept") -> None:
    """Refuse a pipeline whose class is not among ``allowed`` (e.g. a preset's pipeline classes)."""
    name = pipeline_class_name(pipe)
    if name not in allowed:
        raise ValueError(f"{what} fits {' or '.join(allowed)}, not {name}; {fix}")


__all__ = ["FLOW_CLASSES", "FLUX", "FlowFamily", "PIPELINE_CLASSES", "PromptCond", "SD", "SD3", "SDXL",
           "UNET_CLASSES", "UNetFamily", "as_family", "base_model_id", "cat_conds", "check_fits", "denoiser",
           "denoiser_folder", "encode_images", "encode_prompts", "is_flow_model", "load_base_pipeline",
           "load_erasure_base", "map_cond", "model_class_name", "model_family", "native_size", "pipeline_class_name",
           "pipeline_family", "sdxl_time_ids", "text_encoders", "training_scheduler", "unet_kwargs", "vae_dtype"]
