"""Flow matching (rectified flow) for the transformer pipelines: Stable Diffusion 3 and FLUX.

What the erasure needs to train an SD3/FLUX transformer the way its pipeline samples from it:

* sigmas: ``u`` drawn uniformly or logit-normally in (0, 1) (SD3 paper, diffusers' ``train_dreambooth_sd3``), then
  shifted exactly as :class:`~diffusers.FlowMatchEulerDiscreteScheduler.set_timesteps` shifts its sampling sigmas:
  the static ``shift`` (SD3: ``shift * s / (1 + (shift - 1) * s)``) or, when ``use_dynamic_shifting`` (FLUX), the
  resolution-dependent ``time_shift(mu, 1, s)`` with ``mu`` from the image sequence length as ``FluxPipeline``
  computes it. Timesteps are ``sigma * num_train_timesteps`` (continuous, as at sampling).
* noising ``x_t = (1 - sigma) x0 + sigma noise`` and the velocity target ``noise - x0`` (the transformer predicts it;
  the Euler step is ``x += (sigma_next - sigma) * v``).
* the transformer's keyword arguments for a batch, conditioning from the pipeline's own ``encode_prompt``:
  SD3 ``hidden_states, timestep, encoder_hidden_states, pooled_projections``; FLUX ``hidden_states`` packed into
  2x2 patches, ``img_ids``, ``txt_ids``, ``pooled_projections``, ``guidance`` (guidance-distilled models only) and
  ``timestep = sigma`` (``FluxPipeline`` divides its timesteps by 1000).

Latents are always handled unpacked, ``[B, C, H, W]`` in the transformer's space (``(vae_latent - shift_factor) *
scaling_factor``); :func:`predict_velocity` unpacks FLUX's output back to that layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["FLOW_FAMILIES", "FlowConditioning", "compute_mu", "encode_flow_prompts", "flow_family",
           "flow_matching_loss", "flux_image_ids", "image_seq_len", "model_latents", "noisy_latents",
           "pack_flux_latents", "pipeline_mu", "predict_velocity", "sample_sigmas", "shift_sigmas",
           "transformer_kwargs", "unpack_flux_latents", "velocity_target"]

FLOW_FAMILIES = ("sd3", "flux")
SIGMA_SCHEMES = ("logit_normal", "uniform")


def flow_family(pipe) -> str:
    """``"sd3"`` or ``"flux"`` from the pipeline's transformer class; ValueError for anything else."""
    name = type(getattr(pipe, "transformer", None)).__name__.removeprefix("FSDP")  # sharded: FSDP2 prefixes it
    if name.startswith("SD3Transformer"):
        return "sd3"
    if name.startswith("FluxTransformer"):
        return "flux"
    raise ValueError(f"not a flow-matching transformer pipeline (SD3 or FLUX): {type(pipe).__name__} with "
                     f"transformer {name}")


# ---------------------------------------------------------------------------------------------------- sigmas
def image_seq_len(pipe, height: int, width: int) -> int:
    """Image tokens the transformer sees for a ``height`` x ``width`` latent (SD3: patch_size^2 patches; FLUX: 2x2)."""
    patch = pipe.transformer.config.patch_size if flow_family(pipe) == "sd3" else 2
    return (height // patch) * (width // patch)


def compute_mu(scheduler, seq_len: int) -> float:
    """FLUX's resolution-dependent shift ``mu`` (``FluxPipeline``'s ``calculate_shift``, from the scheduler config)."""
    cfg = scheduler.config
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return seq_len * m + (base_shift - m * base_len)


def pipeline_mu(pipe, height: int, width: int) -> Optional[float]:
    """The ``mu`` the pipeline samples a ``height`` x ``width`` latent with: FLUX's :func:`compute_mu` of the image
    sequence length when the scheduler uses dynamic shifting, else None (SD3's static ``shift``)."""
    if not pipe.scheduler.config.get("use_dynamic_shifting"):
        return None
    return compute_mu(pipe.scheduler, image_seq_len(pipe, height, width))


def shift_sigmas(scheduler, sigmas: torch.Tensor, mu: Optional[float] = None) -> torch.Tensor:
    """Apply the shift ``scheduler.set_timesteps`` applies to its sampling sigmas (static ``shift``, or
    ``time_shift(mu, 1, sigmas)`` when ``use_dynamic_shifting``; then ``shift_terminal`` if configured)."""
    cfg = scheduler.config
    if cfg.get("use_karras_sigmas") or cfg.get("use_exponential_sigmas") or cfg.get("use_beta_sigmas") or \
            cfg.get("invert_sigmas"):
        raise ValueError("flow matching supports FlowMatchEulerDiscreteScheduler without karras/exponential/beta or "
                         "inverted sigmas")
    if cfg.get("use_dynamic_shifting"):
        if mu is None:
            raise ValueError("this scheduler uses dynamic shifting (FLUX): pass mu (compute_mu of the image "
                             "sequence length)")
        sigmas = scheduler.time_shift(mu, 1.0, sigmas)
    else:
        shift = scheduler.shift if hasattr(scheduler, "shift") else cfg.get("shift", 1.0)
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    if cfg.get("shift_terminal"):
        sigmas = scheduler.stretch_shift_to_terminal(sigmas)
    return sigmas


def sample_sigmas(scheduler, batch_size: int, generator: Optional[torch.Generator] = None,
                  scheme: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                  mu: Optional[float] = None, device=None) -> torch.Tensor:
    """``batch_size`` training sigmas in (0, 1), float32: ``u`` logit-normal (``sigmoid(N(logit_mean, logit_std))``,
    the SD3 paper's default) or uniform, then :func:`shift_sigmas`. Timesteps are ``sigma * num_train_timesteps``."""
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.randn(batch_size, generator=generator) * logit_std + logit_mean)
    elif scheme == "uniform":
        u = torch.rand(batch_size, generator=generator)
    else:
        raise ValueError(f"sigma scheme must be one of {SIGMA_SCHEMES}, got {scheme!r}")
    sigmas = shift_sigmas(scheduler, u.double(), mu=mu).float()
    return sigmas.to(device) if device is not None else sigmas


# ------------------------------------------------------------------------------------------- noising and loss
def _expand(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - sigma) x0 + sigma noise`` (one sigma per sample)."""
    s = _expand(sigmas, x0)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching target ``noise - x0`` (d x_t / d sigma)."""
    return noise - x0


def flow_matching_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, reduction: str = "mean"):
    """MSE between the predicted velocity and ``noise - x0`` (``reduction="none"``: one value per sample)."""
    per_sample = F.mse_loss(pred.float(), velocity_target(x0, noise).float(), reduction="none")
    per_sample = per_sample.flatten(1).mean(1)
    return per_sample if reduction == "none" else per_sample.mean()


def model_latents(vae, vae_latents: torch.Tensor) -> torch.Tensor:
    """VAE latents -> the transformer's space, ``(z - shift_factor) * scaling_factor`` (the pipelines decode with the
    inverse). A missing ``shift_factor`` counts as 0."""
    shift = vae.config.get("shift_factor") or 0.0
    return (vae_latents - shift) * vae.config.scaling_factor


# ------------------------------------------------------------------------------------------------- FLUX packing
def pack_flux_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, H/2 * W/2, 4C]`` (``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches: height and width must be even, got {h}x{w}")
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_flux_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_flux_latents` for a ``height`` x ``width`` latent."""
    b, _, c4 = packed.shape
    x = packed.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def flux_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``img_ids`` ``[H/2 * W/2, 3]`` (``FluxPipeline._prepare_latent_image_ids``: 0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------- conditioning
@dataclass
class FlowConditioning:
    """Text conditioning of a batch as the pipeline's ``encode_prompt`` gives it (one row per prompt)."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    text_ids: Optional[torch.Tensor] = None  # FLUX only

    def index(self, idx) -> "FlowConditioning":
        """Rows ``idx`` (e.g. the prompts of a batch's samples); ``text_ids`` are shared by all rows."""
        return FlowConditioning(self.prompt_embeds[idx], self.pooled_prompt_embeds[idx], self.text_ids)


def encode_flow_prompts(pipe, prompts: Sequence[str], max_sequence_length: Optional[int] = None,
                        device=None) -> FlowConditioning:
    """Encode ``prompts`` with the pipeline's own ``encode_prompt`` (gradients flow if the text encoders train).

    ``max_sequence_length`` is the T5 length (SD3 default 256, FLUX 512); pass what sampling uses."""
    prompts = list(prompts)
    family = flow_family(pipe)
    device = device or pipe._execution_device
    kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    if family == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                  do_classifier_free_guidance=False, **kw)
        return FlowConditioning(embeds, pooled)
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, **kw)
    return FlowConditioning(embeds, pooled, text_ids)


def transformer_kwargs(pipe, latents: torch.Tensor, sigmas: torch.Tensor, cond: FlowConditioning,
                       guidance_scale: Optional[float] = None) -> Dict[str, torch.Tensor]:
    """Keyword arguments for ``pipe.transformer`` on noisy ``latents`` ``[B, C, H, W]`` at ``sigmas`` ``[B]``, as the
    pipeline's denoising loop builds them (``return_dict=False`` included).

    ``guidance_scale`` is the distilled guidance FLUX-dev embeds (required for ``guidance_embeds`` models, ignored
    otherwise; SD3 does classifier-free guidance outside the transformer)."""
    family = flow_family(pipe)
    n_train = pipe.scheduler.config.num_train_timesteps
    if len(cond.prompt_embeds) != len(latents):
        raise ValueError(f"{len(cond.prompt_embeds)} prompt embeddings for {len(latents)} latents")
    sigmas = sigmas.to(latents.device, torch.float32).reshape(-1).expand(len(latents))
    if family == "sd3":
        return {"hidden_states": latents, "timestep": sigmas * n_train, "encoder_hidden_states": cond.prompt_embeds,
                "pooled_projections": cond.pooled_prompt_embeds, "return_dict": False}
    h, w = latents.shape[-2:]
    guidance = None
    if pipe.transformer.config.guidance_embeds:
        if guidance_scale is None:
            raise ValueError("this FLUX transformer is guidance-distilled (guidance_embeds): pass guidance_scale")
        guidance = torch.full((len(latents),), float(guidance_scale), device=latents.device, dtype=torch.float32)
    return {"hidden_states": pack_flux_latents(latents),
            # FluxPipeline passes timestep / 1000 with timestep = sigma * 1000, i.e. sigma itself
            "timestep": (sigmas * n_train) / 1000,
            "guidance": guidance, "pooled_projections": cond.pooled_prompt_embeds,
            "encoder_hidden_states": cond.prompt_embeds, "txt_ids": cond.text_ids,
            "img_ids": flux_image_ids(h, w, latents.device, latents.dtype), "return_dict": False}


def predict_velocity(pipe, latents: torch.Tensor, sigmas: torch.Tensor, cond: FlowConditioning,
                     guidance_scale: Optional[float] = None) -> torch.Tensor:
    """The transformer's velocity for ``latents`` ``[B, C, H, W]``, in the same layout."""
    out = pipe.transformer(**transformer_kwargs(pipe, latents, sigmas, cond, guidance_scale))[0]
    if flow_family(pipe) == "flux":
        out = unpack_flux_latents(out, *latents.shape[-2:])
    return out

