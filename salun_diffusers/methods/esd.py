"""ESD (Erased Stable Diffusion; Gandikota et al., ICCV 2023): fine-tune the U-Net toward negatively guided noise.

The objective (official ``train-scripts/train-esd.py``)::

    eps_theta(x_t, c, t)  ->  eps_base(x_t, t) - eta * (eps_base(x_t, c, t) - eps_base(x_t, t))

where ``x_t`` is drawn by partial sampling: DDIM (``num_inference_steps`` = 50, eta 0) from Gaussian noise with the
concept prompt at classifier-free guidance ``start_guidance`` (3), stopped at a random step ``k`` of the 50, and the
training timestep is the sampler's timestep at that step, so ``x_t`` carries exactly the noise level the U-Net is
asked about (:func:`esd_sample`). One Adam step per draw, batch 1.

Which weights train is a boolean mask in :mod:`salun_diffusers.masking`'s format (:func:`esd_mask`), so SalUn's
:class:`~salun_diffusers.masking.MaskedUpdate` trains them and every other weight stays bit-identical:

* ``esd-x``: the cross-attention blocks (``attn2``: ``to_q``, ``to_k``, ``to_v``, ``to_out``), official ``xattn``;
* ``esd-u``: everything except cross-attention, the time embedding and the output head, official ``noxattn``
  (its names ``attn2``, ``time_embed``, ``out.`` are diffusers' ``attn2``, ``time_embedding.``, ``conv_norm_out.``
  and ``conv_out.``);
* ``esd-full``: every U-Net weight, official ``full``.

Public: :data:`ESD_VARIANTS`, :data:`ESD_PRESETS`, :class:`EsdConfig`, :func:`is_esd_parameter`, :func:`esd_mask`,
:class:`EsdSample`, :func:`ddim_partial_sample`, :func:`esd_sample`, :func:`esd_loss`, :func:`loop_state`,
:func:`resume_loop`, :func:`train_esd`.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from ..utils import flag_field as _f
from ..masking import Mask, MaskedUpdate
from ..utils import JsonConfigMixin

logger = logging.getLogger(__name__)

ESD_VARIANTS = ("esd-x", "esd-u", "esd-full")

# The paper's SD v1.4 recipe (train-scripts/train-esd.py defaults and README): negative guidance 1.0, lr 1e-5,
# 1,000 iterations of batch 1, Adam without decay, start guidance 3, 50 DDIM steps.
# A value may be a {variant: value} dict where the variants differ. "digits": the bundled digit world (1.0M-weight
# U-Net: the SD1.4 learning rate barely moves it; 10 DDIM steps, the world's verdict steps). Chosen by
# benchmarks/bench_peers.py --tune on digits 1, 4, 7 (docs/peers.md); train_erase.py --method esd-* reads them.
ESD_PRESETS: Dict[str, Dict[str, object]] = {
    "sd14": {"negative_guidance": 1.0, "learning_rate": 1e-5, "iterations": 1000, "batch_size": 1,
             "start_guidance": 3.0, "num_inference_steps": 50},
    "digits": {"negative_guidance": 1.0, "learning_rate": {"esd-x": 1e-3, "esd-u": 1e-4, "esd-full": 1e-4},
               "iterations": {"esd-x": 150, "esd-u": 300, "esd-full": 300}, "batch_size": 1, "start_guidance": 3.0,
               "num_inference_steps": 10},
}


@dataclass
class EsdConfig(JsonConfigMixin):
    variant: str = _f("esd-x", "Which U-Net weights train: esd-x (cross-attention), esd-u (all but cross-attention, "
                               "time embedding and output head), esd-full (all).", choices=list(ESD_VARIANTS))
    negative_guidance: float = _f(1.0, "eta: how far the target moves against the concept's guidance direction.")
    learning_rate: float = _f(1e-5, "Adam learning rate (no weight decay, as the official script).")
    iterations: int = _f(1000, "Optimizer steps; each draws a fresh x_t by partial sampling.")
    batch_size: int = _f(1, "Partial samples per step (official: 1).")
    start_guidance: float = _f(3.0, "Classifier-free guidance of the partial sampling that draws x_t.")
    num_inference_steps: int = _f(50, "DDIM steps of the partial sampling; x_t stops at a random one of them.")

    def __post_init__(self):
        if self.variant not in ESD_VARIANTS:
            raise ValueError(f"ESD variant must be one of {ESD_VARIANTS}, got {self.variant!r}")
        for name in ("negative_guidance", "learning_rate", "start_guidance"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "learning_rate" and value == 0):
                raise ValueError(f"ESD {name} must be a finite number {'> 0' if name == 'learning_rate' else '>= 0'}, "
                                 f"got {value}")
        for name in ("iterations", "batch_size", "num_inference_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ESD {name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "EsdConfig":
        """The preset's values (a per-variant value for ``overrides``' variant, default esd-x) under ``overrides``."""
        if name not in ESD_PRESETS:
            raise ValueError(f"no ESD preset {name!r}; presets: {sorted(ESD_PRESETS)}")
        variant = overrides.get("variant", cls.variant)
        values = {k: v[variant] if isinstance(v, dict) else v for k, v in ESD_PRESETS[name].items()}
        return cls(**{**values, **overrides})


# ------------------------------------------------------------------------------------------------- which weights
_NOT_U = ("time_embedding.", "conv_norm_out.", "conv_out.")  # official noxattn: 'time_embed', 'out.' (and 'attn2')


def is_esd_parameter(name: str, variant: str) -> bool:
    """Whether U-Net parameter ``name`` (diffusers naming) trains under ``variant``."""
    cross = ".attn2." in f".{name}"
    if variant == "esd-x":
        return cross
    if variant == "esd-u":
        return not cross and not name.startswith(_NOT_U)
    if variant == "esd-full":
        return True
    raise ValueError(f"ESD variant must be one of {ESD_VARIANTS}, got {variant!r}")


def esd_mask(unet: torch.nn.Module, variant: str) -> Mask:
    """Every U-Net parameter name -> an all-True or all-False bool tensor of its shape (the masking module's format;
    :func:`~salun_diffusers.masking.mask_density` then gives the share of U-Net weights that train)."""
    mask = {name: torch.full(p.shape, is_esd_parameter(name, variant), dtype=torch.bool, device=p.device)
            for name, p in unet.named_parameters()}
    if not any(bool(m.any()) for m in mask.values()):
        raise ValueError(f"{variant} selects no weight of this U-Net (no cross-attention layers?); ESD needs a "
                         "UNet2DConditionModel")
    return mask


# ------------------------------------------------------------------------------------------------------ drawing
@dataclass
class EsdSample:
    """One ESD training draw: ``x_t`` ``[B, C, h, w]``, its timestep ``t`` ``[B]``, the base model's unconditional
    and concept predictions there, and the regression target ``eps0 - eta * (eps_c - eps0)``."""

    x_t: torch.Tensor
    t: torch.Tensor
    eps_uncond: torch.Tensor
    eps_concept: torch.Tensor
    target: torch.Tensor
    step_index: int


def _ddim(scheduler):
    return DDIMScheduler.from_config(scheduler.config)


def _expand(embeds: torch.Tensor, n: int) -> torch.Tensor:
    return embeds.expand(n, -1, -1) if embeds.shape[0] == 1 and n > 1 else embeds


@torch.no_grad()
def ddim_partial_sample(unet, scheduler, cond: torch.Tensor, uncond: torch.Tensor, step_index: int, *,
                        num_inference_steps: int = 50, guidance_scale: float = 3.0,
                        generator: Optional[torch.Generator] = None, batch_size: Optional[int] = None,
                        latent_size: Optional[int] = None):
    """DDIM (eta 0) from Gaussian noise for the first ``step_index`` of ``num_inference_steps`` steps, with
    classifier-free guidance ``guidance_scale`` between ``cond`` and ``uncond`` (``[B or 1, 77, D]``).

    Returns ``(x_t, t)``: the latents after those steps and the timestep they are at (``timesteps[step_index]``;
    ``step_index`` 0 gives pure noise at the first timestep). ``scheduler``: any diffusers scheduler whose config
    describes the noise schedule (a DDIM scheduler is made from it).
    """
    ddim = _ddim(scheduler)
    ddim.set_timesteps(num_inference_steps, device=cond.device)
    if not 0 <= step_index < len(ddim.timesteps):
        raise ValueError(f"step_index must be in [0, {len(ddim.timesteps)}), got {step_index}")
    n = batch_size or cond.shape[0]
    size = latent_size or unet.config.sample_size
    shape = (n, unet.config.in_channels, size, size)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    latents = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(cond.device)
    latents = latents * ddim.init_noise_sigma
    both = torch.cat([_expand(uncond, n), _expand(cond, n)]).to(unet.dtype)
    for t in ddim.timesteps[:step_index]:
        inp = ddim.scale_model_input(torch.cat([latents, latents]), t).to(unet.dtype)
        e_u, e_c = unet(inp, t, encoder_hidden_states=both).sample.float().chunk(2)
        latents = ddim.step(e_u + guidance_scale * (e_c - e_u), t, latents).prev_sample
    t = ddim.timesteps[step_index]
    return latents, torch.full((n,), int(t), device=latents.device, dtype=torch.long)


@torch.no_grad()
def esd_sample(base_unet, scheduler, concept_embeds: torch.Tensor, null_embeds: torch.Tensor, *,
               negative_guidance: float = 1.0, start_guidance: float = 3.0, num_inference_steps: int = 50,
               batch_size: int = 1, generator: Optional[torch.Generator] = None, step_index: Optional[int] = None,
               sampler_unet=None, latent_size: Optional[int] = None) -> EsdSample:
    """Draw ``x_t`` the official way and the ESD target on it.

    ``step_index`` (default: uniform over ``num_inference_steps``, from ``generator``) is where the partial DDIM
    sampling stops. ``sampler_unet`` draws ``x_t`` (default ``base_unet``; the official CompVis script samples with
    the U-Net being trained, its diffusers port with the base). The target's predictions are always the base's.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if step_index is None:
        step_index = int(torch.randint(0, num_inference_steps, (1,), generator=generator, device=gen_device))
    x_t, t = ddim_partial_sample(sampler_unet if sampler_unet is not None else base_unet, scheduler, concept_embeds,
                                 null_embeds, step_index, num_inference_steps=num_inference_steps,
                                 guidance_scale=start_guidance, generator=generator, batch_size=batch_size,
                                 latent_size=latent_size)
    n = x_t.shape[0]
    both = torch.cat([_expand(null_embeds, n), _expand(concept_embeds, n)]).to(base_unet.dtype)
    e0, ep = base_unet(torch.cat([x_t, x_t]).to(base_unet.dtype), torch.cat([t, t]),
                       encoder_hidden_states=both).sample.float().chunk(2)
    return EsdSample(x_t, t, e0, ep, e0 - negative_guidance * (ep - e0), step_index)


def esd_loss(unet, sample: EsdSample, embeds: torch.Tensor) -> torch.Tensor:
    """``MSE(eps_theta(x_t, embeds, t), target)`` (``embeds``: the concept prompt's, or an adversarial one)."""
    n = sample.x_t.shape[0]
    pred = unet(sample.x_t.to(unet.dtype), sample.t, encoder_hidden_states=_expand(embeds, n).to(unet.dtype)).sample
    return F.mse_loss(pred.float(), sample.target)


# ---------------------------------------------------------------------------------------------- resumable loops
StateFn = Callable[[], dict]  # the loop state after the step just made (see loop_state)


def loop_state(step: int, guard: MaskedUpdate, optimizer: torch.optim.Optimizer, generator: torch.Generator,
               history, **extra) -> dict:
    """What a masked training loop needs to continue bit-identically after ``step`` optimizer steps: the trained
    (masked) values, the optimizer's state, the generator's state (every draw of the loop comes from it), the history
    so far and a method's ``extra`` (tensors, numbers, lists or ``None``: what ``torch.load(weights_only=True)`` reads
    back). The tensors are the loop's own: save the state before the next step."""
    return {"step": step, "values": {n: v.detach() for n, v in guard.values.items()},
            "optimizer": optimizer.state_dict(), "generator": generator.get_state(), "history": copy.deepcopy(history),
            **extra}


@torch.no_grad()
def resume_loop(state: dict, guard: MaskedUpdate, optimizer: torch.optim.Optimizer,
                generator: torch.Generator) -> int:
    """Load a :func:`loop_state` into a new loop (its module still at the base values): the trained values are
    written into the masked weights, the optimizer and generator continue where they were. Returns the step."""
    if set(state["values"]) != set(guard.values):
        raise ValueError("the saved loop state trains other weights than this run (another method or model); resume "
                         "it with the run that wrote it")
    for name, value in guard.values.items():
        value.copy_(state["values"][name])
    guard.restore()
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    return int(state["step"])


# ------------------------------------------------------------------------------------------------------ training
def train_esd(unet, base_unet, scheduler, concept_embeds: torch.Tensor, null_embeds: torch.Tensor,
              config: EsdConfig, *, mask: Optional[Mask] = None, generator: Optional[torch.Generator] = None,
              show_progress: bool = False, check_finite: bool = True, state: Optional[dict] = None,
              on_step: Optional[Callable[[int, StateFn], None]] = None) -> List[float]:
    """Run ESD on ``unet`` in place (``base_unet``: a frozen copy of the base U-Net). Returns the loss per step.

    ``mask`` (default :func:`esd_mask` of ``config.variant``) selects the weights that train, through
    :class:`~salun_diffusers.masking.MaskedUpdate`: every entry outside it stays bit-identical. Adam (the official
    optimizer: no weight decay, no clipping) over the masked values.

    Resumable: ``on_step(step, state_fn)`` runs after every step (``state_fn()``: the :func:`loop_state`, e.g. to
    save a checkpoint); ``state`` (such a state, ``unet`` at the base values) continues from it, and the run ends
    bit-identical to an uninterrupted one.
    """
    mask = mask if mask is not None else esd_mask(unet, config.variant)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    base_unet.requires_grad_(False)
    guard = MaskedUpdate(unet, mask)
    opt = torch.optim.Adam(guard.trainable_parameters(), lr=config.learning_rate)
    losses: List[float] = []
    start = 0
    if state is not None:
        start, losses = resume_loop(state, guard, opt, generator), list(state["history"])
    try:
        for step in tqdm(range(start, config.iterations), initial=start, total=config.iterations,
                         desc=f"ESD ({config.variant})", disable=not show_progress):
            sample = esd_sample(base_unet, scheduler, concept_embeds, null_embeds,
                                negative_guidance=config.negative_guidance, start_guidance=config.start_guidance,
                                num_inference_steps=config.num_inference_steps, batch_size=config.batch_size,
                                generator=generator)
            opt.zero_grad(set_to_none=True)
            loss = esd_loss(unet, sample, concept_embeds)
            if check_finite and not torch.isfinite(loss):
                raise FloatingPointError(f"ESD loss is not finite at step {step}; lower --learning_rate")
            loss.backward()
            guard.mask_gradients()
            opt.step()
            guard.restore()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step + 1, lambda: loop_state(step + 1, guard, opt, generator, losses))
    finally:
        guard.remove_hooks()
    return losses
