"""AdvUnlearn (Zhang et al., NeurIPS 2024): adversarial training of the text encoder for a robust ESD-style erasure.

Official ``train-scripts/AdvUnlearn.py`` (defaults and the README's nudity command), the U-Net frozen:

* **outer loss** (:func:`advunlearn_loss`): the ESD objective on the *attacked* prompt, through the text encoder being
  trained, ``MSE(eps(x_t, TE(adv + prompt), t), eps0 - eta (eps_c - eps0))`` (``x_t`` and both ``eps`` from the base
  model, :func:`~salun_diffusers.methods.esd.esd_sample`), plus ``retain_weight *`` the utility regulariser
  ``MSE(eps(x_r, TE(retain prompts), t), eps_base(x_r, c_r, t))`` on retain prompts partially sampled to the same
  step (``--retain_train reg``);
* **inner attack** (:func:`soft_prompt_attack`, official ``soft_prompt_attack``, ``attack_type prefix_k``,
  ``word_embd``): ``adv_tokens`` (1) continuous token embeddings prepended to the prompt, Adam (lr 1e-3, 30 steps,
  ``pgd``; ``fast_at`` takes the gradient's sign) minimising ``MSE(eps(x_t, TE(adv + prompt), t), eps_base(x_t, c, t))``
  on a fresh draw each step: the embedding that makes the erased model draw the concept again. Redone every outer
  step after ``warmup`` (200) plain ESD steps. ``inner_attack="token"`` uses the project's UnlearnDiffAtk
  (:func:`salun_diffusers.attacks.token_attack`, real vocabulary words) instead; the conditioning attack does not fit
  here (it optimises the U-Net's input directly, so its result never passes through the text encoder being trained);
* **trained weights** (:func:`text_encoder_mask`, official ``text_encoder_full`` with ``component all``): every
  transformer layer and the final layer norm; the token and position embeddings stay.

Public: :data:`ADVUNLEARN_PRESETS`, :class:`AdvUnlearnConfig`, :func:`text_encoder_mask`, :func:`prefix_ids`,
:func:`encode_with_prefix`, :func:`soft_prompt_attack`, :class:`RetainSample`, :func:`retain_sample`,
:func:`advunlearn_loss`, :func:`train_advunlearn`.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..attacks import encode_ids, frozen, token_attack
from ..utils import flag_field as _f
from ..masking import Mask, MaskedUpdate
from ..utils import JsonConfigMixin
from .esd import EsdSample, StateFn, ddim_partial_sample, esd_sample, loop_state, resume_loop

logger = logging.getLogger(__name__)

INNER_ATTACKS = ("soft", "token")
ATTACK_METHODS = ("pgd", "fast_at")
# The README's nudity command on SD v1.4 (--attack_init random --attack_step 30 --retain_train reg --retain_loss_w 0.3
# --train_method text_encoder_full) over the script's defaults (1,000 iterations, lr 1e-5, attack lr 1e-3, one prefix
# token, warmup 200, attack every step, retain batch 5, start guidance 3, negative guidance 1, 50 DDIM steps).
ADVUNLEARN_PRESETS: Dict[str, Dict[str, object]] = {
    "sd14": {"iterations": 1000, "learning_rate": 1e-5, "negative_guidance": 1.0, "start_guidance": 3.0,
             "num_inference_steps": 50, "attack_steps": 30, "attack_lr": 1e-3, "adv_tokens": 1,
             "attack_init": "random", "attack_method": "pgd", "warmup": 200, "attack_every": 1,
             "retain_weight": 0.3, "retain_batch": 5},
    # the bundled digit world (0.14M-weight text encoder; 10 DDIM steps, the world's verdict steps): chosen by
    # benchmarks/bench_peers.py --tune on digits 1, 4, 7 (docs/peers.md); train_erase.py --method advunlearn reads it
    "digits": {"iterations": 200, "learning_rate": 1e-3, "negative_guidance": 1.0, "start_guidance": 3.0,
               "num_inference_steps": 10, "attack_steps": 5, "attack_lr": 1e-3, "adv_tokens": 1,
               "attack_init": "random", "attack_method": "pgd", "warmup": 40, "attack_every": 1,
               "retain_weight": 1.0, "retain_batch": 5},
}


@dataclass
class AdvUnlearnConfig(JsonConfigMixin):
    iterations: int = _f(1000, "Outer (text-encoder) optimizer steps.")
    learning_rate: float = _f(1e-5, "Adam learning rate of the text encoder.")
    negative_guidance: float = _f(1.0, "ESD's eta in the unlearning target.")
    start_guidance: float = _f(3.0, "Guidance of the partial sampling that draws x_t.")
    num_inference_steps: int = _f(50, "DDIM steps of the partial sampling.")
    attack_steps: int = _f(30, "Inner attack steps per attack.")
    attack_lr: float = _f(1e-3, "Inner attack learning rate (Adam on the adversarial token embeddings).")
    adv_tokens: int = _f(1, "Adversarial tokens prepended to the prompt.")
    attack_init: str = _f("random", "random: fresh vocabulary tokens each attack; latest: continue from the last.",
                          choices=["random", "latest"])
    attack_method: str = _f("pgd", "pgd: Adam on the gradient; fast_at: Adam on its sign.",
                            choices=list(ATTACK_METHODS))
    inner_attack: str = _f("soft", "soft: continuous token embeddings (official); token: UnlearnDiffAtk vocabulary "
                                   "words (needs target latents).", choices=list(INNER_ATTACKS))
    warmup: int = _f(200, "Plain ESD steps on the prompt before the first attack.")
    attack_every: int = _f(1, "Redo the attack every this many outer steps.")
    retain_weight: float = _f(0.3, "Weight of the utility regulariser on retain prompts (0: none).")
    retain_batch: int = _f(5, "Retain prompts per outer step.")

    def __post_init__(self):
        for name in ("learning_rate", "attack_lr"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"AdvUnlearn {name} must be a finite number > 0, got {value}")
        for name in ("negative_guidance", "start_guidance", "retain_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"AdvUnlearn {name} must be a finite number >= 0, got {value}")
        for name in ("iterations", "num_inference_steps", "adv_tokens", "attack_every", "retain_batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"AdvUnlearn {name} must be >= 1, got {getattr(self, name)}")
        for name in ("attack_steps", "warmup"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"AdvUnlearn {name} must be >= 0, got {getattr(self, name)}")
        if self.attack_init not in ("random", "latest"):
            raise ValueError(f"attack_init must be 'random' or 'latest', got {self.attack_init!r}")
        if self.attack_method not in ATTACK_METHODS:
            raise ValueError(f"attack_method must be one of {ATTACK_METHODS}, got {self.attack_method!r}")
        if self.inner_attack not in INNER_ATTACKS:
            raise ValueError(f"inner_attack must be one of {INNER_ATTACKS}, got {self.inner_attack!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "AdvUnlearnConfig":
        if name not in ADVUNLEARN_PRESETS:
            raise ValueError(f"no AdvUnlearn preset {name!r}; presets: {sorted(ADVUNLEARN_PRESETS)}")
        return cls(**{**ADVUNLEARN_PRESETS[name], **overrides})


# ------------------------------------------------------------------------------------------------- which weights
def text_encoder_mask(text_encoder: torch.nn.Module, layers: Optional[Sequence[int]] = None,
                      final_layer_norm: bool = True) -> Mask:
    """Every text-encoder parameter -> all-True / all-False bool tensor (the masking module's format): the transformer
    layers (``layers``: their indices, default all) and the final layer norm train; the embeddings stay."""
    mask = {}
    for name, p in text_encoder.named_parameters():
        short = name[len("text_model."):] if name.startswith("text_model.") else name
        train = False
        if short.startswith("encoder.layers."):
            train = layers is None or int(short.split(".")[2]) in set(layers)
        elif short.startswith("final_layer_norm."):
            train = final_layer_norm
        mask[name] = torch.full(p.shape, train, dtype=torch.bool, device=p.device)
    if not any(bool(m.any()) for m in mask.values()):
        raise ValueError("the text-encoder mask selects nothing: no encoder.layers.* / final_layer_norm parameters")
    return mask


# ---------------------------------------------------------------------------------------------------- text side
def prefix_ids(tokenizer, prompt: str, num_tokens: int, slot_ids: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``[1, 77]`` ids: BOS, ``num_tokens`` slots (``slot_ids``, default the padding id), the prompt's tokens, EOS,
    padding (official ``prefix_k``). The slots are positions ``1 .. num_tokens``."""
    n = tokenizer.model_max_length
    pieces = list(tokenizer(prompt, add_special_tokens=False).input_ids) if prompt.strip() else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    slots = list(slot_ids) if slot_ids is not None else [pad] * num_tokens
    if len(slots) != num_tokens:
        raise ValueError(f"{len(slots)} slot ids for {num_tokens} adversarial tokens")
    ids = [tokenizer.bos_token_id, *slots, *pieces][:n - 1] + [tokenizer.eos_token_id]
    return torch.tensor([ids + [pad] * (n - len(ids))])


def encode_with_prefix(text_encoder, ids: torch.Tensor, prefix: Optional[torch.Tensor]) -> torch.Tensor:
    """Hidden states of ``ids`` with the token embeddings at positions ``1 .. k`` replaced by ``prefix`` ``[k, D]``
    (differentiable in ``prefix`` and in the text encoder's weights); ``prefix=None``: the ids as they are."""
    if prefix is None:
        return encode_ids(text_encoder, ids)
    k = prefix.shape[0]

    def edit(out):
        out = out.clone()
        out[:, 1:1 + k] = prefix.to(out.dtype)
        return out
    return encode_ids(text_encoder, ids, edit)


def _random_prefix(text_encoder, num_tokens: int, generator: torch.Generator) -> torch.Tensor:
    table = text_encoder.get_input_embeddings().weight.detach()
    idx = torch.randint(0, table.shape[0], (num_tokens,), generator=generator, device=generator.device)
    return table[idx.to(table.device)].float().clone()


def soft_prompt_attack(unet, text_encoder, ids: torch.Tensor, init: torch.Tensor,
                       draw: Callable[[], EsdSample], *, steps: int = 30, lr: float = 1e-3,
                       method: str = "pgd") -> torch.Tensor:
    """Adversarial prefix embeddings ``[k, D]`` (official soft prompt attack): Adam from ``init`` minimising
    ``MSE(eps(x_t, TE(prefix + prompt), t), eps_base(x_t, c, t))``, a fresh ``draw()`` every step. ``method``
    ``"fast_at"``: Adam on the gradient's sign. The U-Net and text encoder are frozen for the duration (their
    ``requires_grad`` flags restored after); their weights and ``.grad`` are untouched."""
    if method not in ATTACK_METHODS:
        raise ValueError(f"attack method must be one of {ATTACK_METHODS}, got {method!r}")
    prefix = init.detach().float().clone().requires_grad_(True)
    opt = torch.optim.Adam([prefix], lr=lr)
    with frozen(unet, text_encoder), torch.enable_grad():
        for _ in range(steps):
            sample = draw()
            cond = encode_with_prefix(text_encoder, ids, prefix)
            n = sample.x_t.shape[0]
            pred = unet(sample.x_t.to(unet.dtype), sample.t,
                        encoder_hidden_states=cond.expand(n, -1, -1).to(unet.dtype)).sample
            opt.zero_grad(set_to_none=True)
            F.mse_loss(pred.float(), sample.eps_concept).backward()
            if method == "fast_at":
                prefix.grad.sign_()
            opt.step()
    return prefix.detach()


# ------------------------------------------------------------------------------------------------------- losses
@dataclass
class RetainSample:
    """Retain prompts' ids ``[R, 77]``, their partial samples ``x_t`` and the base model's predictions there."""

    ids: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor


@torch.no_grad()
def retain_sample(base_unet, scheduler, ids: torch.Tensor, base_embeds: torch.Tensor, null_embeds: torch.Tensor,
                  step_index: int, *, start_guidance: float = 3.0, num_inference_steps: int = 50,
                  generator: Optional[torch.Generator] = None) -> RetainSample:
    """Partial samples of the retain prompts (``base_embeds`` ``[R, 77, D]``: the base text encoder's) to
    ``step_index`` and the base U-Net's conditional predictions there (the regulariser's targets)."""
    x_t, t = ddim_partial_sample(base_unet, scheduler, base_embeds, null_embeds, step_index,
                                 num_inference_steps=num_inference_steps, guidance_scale=start_guidance,
                                 generator=generator)
    target = base_unet(x_t.to(base_unet.dtype), t, encoder_hidden_states=base_embeds.to(base_unet.dtype)).sample
    return RetainSample(ids, x_t, t, target.float())


def advunlearn_loss(unet, text_encoder, ids: torch.Tensor, prefix: Optional[torch.Tensor], sample: EsdSample,
                    retain: Optional[RetainSample] = None, retain_weight: float = 0.0):
    """``(total, unlearn, retain)``: the ESD loss of the (attacked) prompt through ``text_encoder`` plus
    ``retain_weight *`` the regulariser. Gradients reach the text encoder (the U-Net's are not needed: freeze it)."""
    cond = encode_with_prefix(text_encoder, ids, prefix)
    n = sample.x_t.shape[0]
    pred = unet(sample.x_t.to(unet.dtype), sample.t, encoder_hidden_states=cond.expand(n, -1, -1).to(unet.dtype)).sample
    unlearn = F.mse_loss(pred.float(), sample.target)
    if retain is None or retain_weight == 0:
        return unlearn, unlearn.detach(), torch.zeros(())
    r_cond = encode_ids(text_encoder, retain.ids)
    r_pred = unet(retain.x_t.to(unet.dtype), retain.t, encoder_hidden_states=r_cond.to(unet.dtype)).sample
    kept = F.mse_loss(r_pred.float(), retain.target)
    return unlearn + retain_weight * kept, unlearn.detach(), kept.detach()


# ------------------------------------------------------------------------------------------------------ training
class _TokenAttackPipe:
    """What :func:`~salun_diffusers.attacks.token_attack` reads of a pipeline: the tokenizer, the text encoder."""

    def __init__(self, tokenizer, text_encoder, unet, scheduler):
        self.tokenizer, self.text_encoder, self.unet, self.scheduler = tokenizer, text_encoder, unet, scheduler


def train_advunlearn(unet, text_encoder, tokenizer, scheduler, prompt: str, retain_prompts: Sequence[str],
                     config: AdvUnlearnConfig, *, mask: Optional[Mask] = None,
                     generator: Optional[torch.Generator] = None, target_latents: Optional[torch.Tensor] = None,
                     show_progress: bool = False, state: Optional[dict] = None,
                     on_step: Optional[Callable[[int, StateFn], None]] = None) -> Dict[str, List[float]]:
    """Run AdvUnlearn on ``text_encoder`` in place; ``unet`` (the base U-Net) stays frozen and unchanged.

    The base text encoder's conditionings (concept, ``""``, retain prompts) are computed once before training: they
    condition the partial sampling and the targets, as the official code takes them from the original model.
    ``mask`` (default :func:`text_encoder_mask`) selects the trained text-encoder weights (entries outside it stay
    bit-identical). ``target_latents``: images of the concept, needed by ``inner_attack="token"`` only.
    Returns ``{"loss", "unlearn", "retain"}`` per step.

    Resumable as :func:`~salun_diffusers.methods.esd.train_esd` (``on_step(step, state_fn)``, ``state``): the loop
    state carries the last attack too (its prefix embeddings and token ids, used until the next attack).
    """
    if config.inner_attack == "token" and target_latents is None:
        raise ValueError("inner_attack='token' needs target_latents (latents of images of the concept)")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    retain_prompts = list(retain_prompts)
    unet.requires_grad_(False)
    with torch.no_grad():
        concept_embeds = encode_ids(text_encoder, prefix_ids(tokenizer, prompt, 0)).float()
        null_embeds = encode_ids(text_encoder, prefix_ids(tokenizer, "", 0)).float()
        retain_ids = torch.cat([prefix_ids(tokenizer, p, 0) for p in retain_prompts]) if retain_prompts else None
        retain_embeds = encode_ids(text_encoder, retain_ids).float() if retain_prompts else None
    plain_ids = prefix_ids(tokenizer, prompt, 0)
    adv_ids = prefix_ids(tokenizer, prompt, config.adv_tokens)
    mask = mask if mask is not None else text_encoder_mask(text_encoder)
    guard = MaskedUpdate(text_encoder, mask)
    opt = torch.optim.Adam(guard.trainable_parameters(), lr=config.learning_rate)
    sampling = dict(negative_guidance=config.negative_guidance, start_guidance=config.start_guidance,
                    num_inference_steps=config.num_inference_steps, generator=generator)

    def draw() -> EsdSample:
        return esd_sample(unet, scheduler, concept_embeds, null_embeds, **sampling)

    history: Dict[str, List[float]] = {"loss": [], "unlearn": [], "retain": []}
    prefix, ids = None, plain_ids
    start = 0
    if state is not None:  # after the base conditionings above: they are the base text encoder's
        start, history = resume_loop(state, guard, opt, generator), copy.deepcopy(state["history"])
        prefix, ids = state["prefix"], state["ids"]
        prefix = prefix.to(text_encoder.device) if prefix is not None else None
    was_training = text_encoder.training
    try:
        for step in tqdm(range(start, config.iterations), initial=start, total=config.iterations, desc="AdvUnlearn",
                         disable=not show_progress):
            if step >= config.warmup and (step - config.warmup) % config.attack_every == 0 and config.attack_steps:
                text_encoder.eval()
                if config.inner_attack == "soft":
                    init = (prefix if config.attack_init == "latest" and prefix is not None
                            else _random_prefix(text_encoder, config.adv_tokens, generator))
                    prefix = soft_prompt_attack(unet, text_encoder, adv_ids, init, draw, steps=config.attack_steps,
                                                lr=config.attack_lr, method=config.attack_method)
                    ids = adv_ids
                else:
                    result = token_attack(_TokenAttackPipe(tokenizer, text_encoder, unet, scheduler), target_latents,
                                          prompt, num_tokens=config.adv_tokens, steps=config.attack_steps,
                                          lr=config.attack_lr, generator=generator, unet=unet, scheduler=scheduler)
                    prefix, ids = None, prefix_ids(tokenizer, prompt, config.adv_tokens, result.token_ids)
            text_encoder.train()
            sample = draw()
            retain = None
            if retain_prompts and config.retain_weight > 0:
                pick = torch.randperm(len(retain_prompts), generator=generator, device=generator.device)
                pick = pick[:config.retain_batch].cpu()
                retain = retain_sample(unet, scheduler, retain_ids[pick], retain_embeds[pick], null_embeds,
                                       sample.step_index, start_guidance=config.start_guidance,
                                       num_inference_steps=config.num_inference_steps, generator=generator)
            opt.zero_grad(set_to_none=True)
            loss, unlearn, kept = advunlearn_loss(unet, text_encoder, ids, prefix, sample, retain, config.retain_weight)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"AdvUnlearn loss is not finite at step {step}; lower the learning rate")
            loss.backward()
            guard.mask_gradients()
            opt.step()
            guard.restore()
            history["loss"].append(float(loss.detach()))
            history["unlearn"].append(float(unlearn))
            history["retain"].append(float(kept))
            if on_step is not None:
                on_step(step + 1, lambda: loop_state(step + 1, guard, opt, generator, history, prefix=prefix, ids=ids))
    finally:
        guard.remove_hooks()
        text_encoder.train(was_training)
    return history
