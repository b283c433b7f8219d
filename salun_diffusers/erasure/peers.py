"""The peer erasure methods as methods of ``train_erase.py`` (``--method esd-x | esd-u | esd-full | uce |
advunlearn``): each name maps to its preset, its knobs and a runner over the loaded base pipeline.

* :func:`resolve_method` fills the peer knobs left unset (``None``) in the :class:`~salun_diffusers.config.EraseConfig`
  from the method's preset: ``"digits"`` on the bundled digit model, else the official SD1.4 recipe ``"sd14"``
  (``<METHOD>_PRESETS`` in :mod:`salun_diffusers.methods`), so ``train_config.json`` records the values the run used.
* :func:`run_peer` runs the method on the pipeline in place and returns a :class:`PeerRun`: the module it changed
  (the U-Net, or the text encoder for AdvUnlearn), the mask of the weights the method may change (every weight
  outside it stays bit-identical), the component's name and the base values' fingerprint taken before the change.
* The training peers (ESD, AdvUnlearn) save ``checkpoint-N`` every ``--checkpointing_steps`` steps and resume from
  one (``--resume_from_checkpoint``) through SalUn's checkpoint functions (:mod:`.checkpoints`: crash-safe, sealed,
  checked against the run's settings, pruned); a resumed run ends bit-identical to an uninterrupted one. UCE is one
  closed-form solve: nothing to checkpoint.

:func:`salun_diffusers.erase.erase` writes the result exactly as a SalUn run's (the sealed erasure file over the
changed component, the merged component folder, the pipeline folder, metrics and model card).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional

import torch

from ..attacks import encode_prompt
from ..concepts import AnySpec, digit_prompt
from ..config import EraseConfig
from ..delta import base_values_digest
from ..families import base_model_id
from ..hub import BUNDLED_DIGIT_MODEL, resolve_base_model
from ..masking import Mask
from ..methods import (NEXT_DIGIT, AdvUnlearnConfig, EsdConfig, UceConfig, apply_uce, esd_mask, text_encoder_mask,
                       train_advunlearn, train_esd, uce_edit, uce_mask)
from .checkpoints import load_peer_checkpoint, save_peer_checkpoint
from .training import TrainingDiverged

logger = logging.getLogger(__name__)

# EraseConfig field -> the method config's field, per method (what --learning_rate etc. set)
_ESD_KEYS = {"learning_rate": "learning_rate", "max_train_steps": "iterations", "negative_guidance": "negative_guidance",
             "start_guidance": "start_guidance", "partial_sampling_steps": "num_inference_steps"}
_UCE_KEYS = {"preserve_scale": "preserve_scale", "guide_prompt": "guide_prompt"}
_ADVUNLEARN_KEYS = {**_ESD_KEYS, "alpha": "retain_weight", "attack_steps": "attack_steps", "attack_warmup": "warmup"}


@dataclass
class PeerRun:
    module: torch.nn.Module  # what the method changed, in place
    mask: Mask  # the weights it may change (every parameter of ``module`` named)
    component: str  # the pipeline folder of ``module``: "unet" or "text_encoder"
    base_digest: Dict[str, str]  # delta.base_values_digest of the base values at ``mask``, before the change
    logs: dict  # the last step's loss terms (training methods)
    history: dict  # per-step losses


@dataclass
class _Peer:
    keys: Mapping[str, str]
    make_config: Callable[..., object]  # (preset name, **overrides) -> the method's config
    run: Callable[..., PeerRun]  # (pipe, method config, spec, generator, state=, on_step=) -> PeerRun


def preset_name(config: EraseConfig) -> str:
    """``"digits"`` for the bundled digit model, else ``"sd14"`` (the official recipe, for real models)."""
    bundled = resolve_base_model(BUNDLED_DIGIT_MODEL)
    return "digits" if resolve_base_model(base_model_id(config)) == bundled else "sd14"


def method_config(config: EraseConfig):
    """The method's own config (``EsdConfig``, ``UceConfig``, ``AdvUnlearnConfig``): its preset under the flags given."""
    peer = PEERS[config.method]
    given = {theirs: getattr(config, ours) for ours, theirs in peer.keys.items() if getattr(config, ours) is not None}
    return peer.make_config(preset_name(config), **given)


def resolve_method(config: EraseConfig) -> Optional[dict]:
    """Write the method's resolved knobs into ``config`` (the ones left ``None`` take its preset's values); returns
    ``{"method", "preset", "config"}`` for the records (``None`` for SalUn, whose presets the config applies itself).
    Idempotent."""
    if config.method == "salun":
        return None
    resolved = method_config(config)
    for ours, theirs in PEERS[config.method].keys.items():
        setattr(config, ours, getattr(resolved, theirs))
    return {"method": config.method, "preset": preset_name(config), "config": resolved.to_dict()}


def _run_esd(pipe, cfg: EsdConfig, spec: AnySpec, generator: torch.Generator, **resume) -> PeerRun:
    unet = pipe.unet
    mask = esd_mask(unet, cfg.variant)
    digest = base_values_digest(unet, mask)
    base = copy.deepcopy(unet).requires_grad_(False)
    losses = train_esd(unet, base, pipe.scheduler, encode_prompt(pipe, spec.forget_prompt), encode_prompt(pipe, ""),
                       cfg, mask=mask, generator=generator, show_progress=True, **resume)
    del base
    return PeerRun(unet, mask, "unet", digest, {"loss": losses[-1]}, {"loss": losses})


def _guide(cfg: UceConfig, prompt: str) -> str:
    """The guide prompt of one erased prompt: ``cfg.guide_prompt``, or for :data:`NEXT_DIGIT` (the digit preset,
    chosen by benchmarks/bench_peers.py's tuning) the next digit's prompt."""
    if cfg.guide_prompt != NEXT_DIGIT:
        return cfg.guide_prompt
    for d in range(10):
        if digit_prompt(d) == prompt:
            return digit_prompt((d + 1) % 10)
    raise ValueError(f"--guide_prompt {NEXT_DIGIT!r} maps a digit onto the next one, and {prompt!r} is not a digit "
                     "prompt: pass --guide_prompt '' or a prompt of your own")


def _run_uce(pipe, cfg: UceConfig, spec: AnySpec, generator: torch.Generator, **_) -> PeerRun:
    """One closed-form solve: no loop to resume or checkpoint (the config refuses those flags)."""
    unet = pipe.unet
    mask = uce_mask(unet, cfg.with_to_k)
    digest = base_values_digest(unet, mask)
    erased = [c.forget_prompt for c in spec.concepts]
    preserved = [p for p in spec.retain_prompts if p not in erased]
    logger.info("UCE: %d erased prompt(s) onto %r, %d preserved", len(erased), cfg.guide_prompt, len(preserved))
    apply_uce(unet, uce_edit(unet, pipe.tokenizer, pipe.text_encoder, erased, [_guide(cfg, p) for p in erased],
                             preserved, cfg))
    return PeerRun(unet, mask, "unet", digest, {"erased_prompts": erased, "preserved_prompts": preserved}, {})


def _run_advunlearn(pipe, cfg: AdvUnlearnConfig, spec: AnySpec, generator: torch.Generator, **resume) -> PeerRun:
    text_encoder = pipe.text_encoder
    mask = text_encoder_mask(text_encoder)
    digest = base_values_digest(text_encoder, mask)
    retain = [p for p in spec.retain_prompts if p != spec.forget_prompt]
    history = train_advunlearn(pipe.unet, text_encoder, pipe.tokenizer, pipe.scheduler, spec.forget_prompt, retain,
                               cfg, mask=mask, generator=generator, show_progress=True, **resume)
    text_encoder.eval()
    return PeerRun(text_encoder, mask, "text_encoder", digest, {k: v[-1] for k, v in history.items()}, history)


PEERS: Dict[str, _Peer] = {
    **{v: _Peer(_ESD_KEYS, lambda preset, _v=v, **kw: EsdConfig.preset(preset, variant=_v, **kw), _run_esd)
       for v in ("esd-x", "esd-u", "esd-full")},
    "uce": _Peer(_UCE_KEYS, UceConfig.preset, _run_uce),
    "advunlearn": _Peer(_ADVUNLEARN_KEYS, AdvUnlearnConfig.preset, _run_advunlearn),
}


def _checkpointer(config: EraseConfig) -> Optional[Callable]:
    """The loops' ``on_step``: ``checkpoint-N`` every ``--checkpointing_steps`` steps, not after the last (the erasure
    follows), as SalUn's run; a state holding a non-finite trained value is never saved."""
    every = config.checkpointing_steps
    if not every:
        return None

    def on_step(step: int, state_fn) -> None:
        if step % every or step >= config.max_train_steps:
            return
        state = state_fn()
        if not all(bool(torch.isfinite(v).all()) for v in state["values"].values()):
            raise TrainingDiverged(f"training diverged at step {step}: a trained weight is not finite; no erasure was "
                                   "written and earlier checkpoints are kept. Rerun with a lower --learning_rate "
                                   f"(now {config.learning_rate:g})")
        save_peer_checkpoint(config, step, state)
    return on_step


def run_peer(pipe, config: EraseConfig, spec: AnySpec, resume_path: Optional[str] = None) -> PeerRun:
    """Run ``config.method`` on ``pipe`` (an SD 1.x/2.x pipeline, float32, at the base values) in place, seeded with
    ``--seed``; from the checkpoint ``resume_path`` (checked by
    :func:`~salun_diffusers.erasure.checkpoints.resolve_resume`) when given."""
    cfg = method_config(config)
    generator = torch.Generator().manual_seed(config.seed)
    logger.info("%s (%s preset): %s", config.method, preset_name(config), cfg.to_dict())
    state = load_peer_checkpoint(resume_path) if resume_path else None
    if state is not None:
        logger.info("resuming from %s (step %d)", resume_path, state["step"])
    return PEERS[config.method].run(pipe, cfg, spec, generator, state=state, on_step=_checkpointer(config))


__all__ = ["PEERS", "PeerRun", "method_config", "preset_name", "resolve_method", "run_peer"]
