"""UCE (Unified Concept Editing; Gandikota et al., WACV 2024): a closed-form edit of the cross-attention key and value
projections, no training.

For every projection ``W`` (``attn2.to_v``, and ``attn2.to_k`` by default) of every cross-attention layer, UCE
solves (official ``train-scripts/train_erase.py``, ``edit_model``)::

    min_W'  lamb * ||W' - W||^2 + erase_scale * sum_i ||W' c_i - v*_i||^2 + preserve_scale * sum_j ||W' c_j - W c_j||^2

    W' = (lamb W + erase_scale sum_i v*_i c_i^T + preserve_scale sum_j W c_j c_j^T)
         (lamb I + erase_scale sum_i c_i c_i^T + preserve_scale sum_j c_j c_j^T)^-1

``c_i``: text-encoder outputs of the erased concept's tokens (from its last word token on: the word, the end token and
the padding, aligned with the guide prompt's tokens from its last word on), ``v*_i = W g_i`` the base projection
of the aligned guide tokens (``technique="replace"``; ``"tensor"`` removes the component along the concept's
output instead), ``c_j`` every token of each preserved prompt (``""`` when none is given, as the official code).
Computed here in float64 (:func:`uce_closed_form`), written back in the weights' dtype.

Public: :data:`UCE_PRESETS`, :class:`UceConfig`, :func:`uce_projections`, :func:`uce_mask`,
:func:`token_embeddings`, :func:`erase_pairs`, :func:`uce_closed_form`, :func:`uce_edit`, :func:`apply_uce`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..utils import flag_field as _f
from ..masking import Mask
from ..utils import JsonConfigMixin

logger = logging.getLogger(__name__)

TECHNIQUES = ("replace", "tensor")
# Official SD v1.4 call (train_erase.py __main__): lamb 0.5, erase_scale 1, preserve_scale 0.1 (its flag default),
# to_k and to_v, technique replace, guide " " (the unconditional) when none is given.
# "digits": the bundled digit world, the other digits preserved, each digit mapped onto the next one (NEXT_DIGIT):
# chosen by benchmarks/bench_peers.py --tune on digits 1, 4, 7 (docs/peers.md); train_erase.py --method uce reads it.
NEXT_DIGIT = "<next digit>"
UCE_PRESETS: Dict[str, Dict[str, object]] = {
    "sd14": {"lamb": 0.5, "erase_scale": 1.0, "preserve_scale": 0.1, "with_to_k": True, "technique": "replace",
             "guide_prompt": ""},
    "digits": {"lamb": 0.5, "erase_scale": 1.0, "preserve_scale": 0.1, "with_to_k": True, "technique": "replace",
               "guide_prompt": NEXT_DIGIT},
}


@dataclass
class UceConfig(JsonConfigMixin):
    lamb: float = _f(0.5, "Weight of staying close to the base projection (||W' - W||^2).")
    erase_scale: float = _f(1.0, "Weight of mapping the erased concept's tokens onto the guide's outputs.")
    preserve_scale: float = _f(0.1, "Weight of keeping the preserved prompts' outputs.")
    with_to_k: bool = _f(True, "Edit the keys (to_k) as well as the values (to_v).")
    technique: str = _f("replace", "replace: erased tokens map to the guide's outputs; tensor: their outputs lose the "
                                   "component along the concept's.", choices=list(TECHNIQUES))
    guide_prompt: str = _f("", "The prompt every erased prompt maps onto ('' = the unconditional, official); read by "
                               "the caller of uce_edit (train_erase.py --method uce).")

    def __post_init__(self):
        for name in ("lamb", "erase_scale", "preserve_scale"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"UCE {name} must be a finite number >= 0, got {value}")
        if self.lamb == 0 and self.preserve_scale == 0:
            logger.warning("UCE with lamb 0 and preserve_scale 0: the solve is determined by the erased tokens alone")
        if self.technique not in TECHNIQUES:
            raise ValueError(f"UCE technique must be one of {TECHNIQUES}, got {self.technique!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "UceConfig":
        if name not in UCE_PRESETS:
            raise ValueError(f"no UCE preset {name!r}; presets: {sorted(UCE_PRESETS)}")
        return cls(**{**UCE_PRESETS[name], **overrides})


def uce_projections(unet: torch.nn.Module, with_to_k: bool = True) -> Dict[str, torch.nn.Linear]:
    """Parameter name of each edited weight (``...attn2.to_v.weight``, ``...attn2.to_k.weight``) -> its Linear."""
    out = {}
    for name, module in unet.named_modules():
        if name.endswith("attn2.to_v") or (with_to_k and name.endswith("attn2.to_k")):
            if not isinstance(module, torch.nn.Linear) or module.bias is not None:
                raise ValueError(f"UCE edits bias-free linear cross-attention projections; {name} is {module!r}")
            out[f"{name}.weight"] = module
    if not out:
        raise ValueError("this U-Net has no cross-attention projections (attn2.to_k / to_v) for UCE to edit")
    return out


def uce_mask(unet: torch.nn.Module, with_to_k: bool = True) -> Mask:
    """The weights UCE changes, in the masking module's format (every U-Net parameter, all-True or all-False)."""
    edited = set(uce_projections(unet, with_to_k))
    return {name: torch.full(p.shape, name in edited, dtype=torch.bool, device=p.device)
            for name, p in unet.named_parameters()}


@torch.no_grad()
def token_embeddings(tokenizer, text_encoder, prompts: Sequence[str]) -> Tuple[torch.Tensor, List[int]]:
    """Text-encoder outputs ``[N, 77, D]`` of ``prompts`` (padded to the maximum length as the pipeline does) and each
    prompt's index of its last word token (``attention_mask.sum() - 2``: before the end token)."""
    inputs = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    hidden = text_encoder(inputs.input_ids.to(text_encoder.device))[0]
    return hidden, [int(m.sum()) - 2 for m in inputs.attention_mask]


def erase_pairs(tokenizer, text_encoder, erase_prompts: Sequence[str], guide_prompts: Sequence[str]):
    """Aligned ``(c, g)`` token rows ``[L, D]`` per erased prompt: the erased prompt's outputs from its last word token
    on and the guide's from its last word token on, cut to the same length (official alignment). An empty guide is
    ``" "`` (official)."""
    if len(erase_prompts) != len(guide_prompts):
        raise ValueError(f"UCE needs one guide prompt per erased prompt: {len(erase_prompts)} erased, "
                         f"{len(guide_prompts)} guides")
    pairs = []
    for old, new in zip(erase_prompts, guide_prompts):
        hidden, (i_old, i_new) = token_embeddings(tokenizer, text_encoder, [old, new or " "])
        far = max(i_old, i_new)
        n = hidden.shape[1]
        pairs.append((hidden[0, i_old:n - (far - i_old)], hidden[1, i_new:n - (far - i_new)]))
    return pairs


def uce_closed_form(weight: torch.Tensor, erase_inputs: torch.Tensor, erase_targets: torch.Tensor,
                    preserve_inputs: Optional[torch.Tensor], *, lamb: float, erase_scale: float,
                    preserve_scale: float) -> torch.Tensor:
    """The UCE solution for one projection, in float64.

    ``weight`` ``[out, d]``; ``erase_inputs`` ``[N, d]`` with ``erase_targets`` ``[N, out]``; ``preserve_inputs``
    ``[M, d]`` (their targets are the base outputs ``weight @ c``). Returns ``W'`` ``[out, d]`` float64.
    """
    w = weight.detach().double()
    c_e, v_e = erase_inputs.detach().double(), erase_targets.detach().double()
    d = w.shape[1]
    mat1 = lamb * w + erase_scale * v_e.T @ c_e
    mat2 = lamb * torch.eye(d, dtype=torch.float64, device=w.device) + erase_scale * c_e.T @ c_e
    if preserve_inputs is not None and preserve_inputs.numel():
        c_p = preserve_inputs.detach().double()
        gram = c_p.T @ c_p
        mat1 = mat1 + preserve_scale * w @ gram
        mat2 = mat2 + preserve_scale * gram
    # W' mat2 = mat1 (mat2 symmetric): solve rather than invert
    return torch.linalg.solve(mat2, mat1.T).T


@torch.no_grad()
def uce_edit(unet, tokenizer, text_encoder, erase_prompts: Sequence[str], guide_prompts: Sequence[str],
             preserve_prompts: Sequence[str] = (), config: Optional[UceConfig] = None,
             extra_erase: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
             extra_preserve: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """The edited weights (parameter name -> new weight in its dtype) of every cross-attention key/value projection.
    Nothing in ``unet`` changes; :func:`apply_uce` writes them. ``extra_erase``: further erased rows ``(c [N, d],
    g [N, d])`` beside the prompts' pairs, each mapped onto ``W g`` (``replace``, whatever the technique; e.g.
    adversarial conditionings, ``--uce_adversarial_rounds``)."""
    config = config or UceConfig()
    if not erase_prompts:
        raise ValueError("UCE needs at least one prompt to erase")
    projections = uce_projections(unet, config.with_to_k)
    pairs = erase_pairs(tokenizer, text_encoder, erase_prompts, guide_prompts)
    c_e = torch.cat([c for c, _ in pairs] + ([] if extra_erase is None else [extra_erase[0]])).double()
    preserve = list(preserve_prompts) or [""]  # official: the empty prompt when no preserved concepts are given
    hidden, _ = token_embeddings(tokenizer, text_encoder, preserve)
    c_p = hidden.reshape(-1, hidden.shape[-1]).double()
    if extra_preserve is not None:  # further kept rows, pre-scaled by sqrt(their weight / preserve_scale)
        c_p = torch.cat([c_p, extra_preserve.double().to(c_p.device)])
    new = {}
    for name, layer in projections.items():
        w = layer.weight.detach().double()
        targets = []
        for c, g in pairs:
            v = g.double() @ w.T  # the base projection of the guide tokens
            if config.technique == "tensor":
                u = c.double() @ w.T
                u = u / u.norm()
                v = v - (u * v).sum() * u
            targets.append(v)
        if extra_erase is not None:
            targets.append(extra_erase[1].double() @ w.T)
        solved = uce_closed_form(w, c_e, torch.cat(targets), c_p, lamb=config.lamb, erase_scale=config.erase_scale,
                                 preserve_scale=config.preserve_scale)
        new[name] = solved.to(layer.weight.dtype)
    return new


@torch.no_grad()
def apply_uce(unet, weights: Dict[str, torch.Tensor]) -> None:
    """Write :func:`uce_edit`'s weights into ``unet`` (names checked first; shapes must match)."""
    params = dict(unet.named_parameters())
    for name, value in weights.items():
        if name not in params or params[name].shape != value.shape:
            raise ValueError(f"UCE weight {name!r} {tuple(value.shape)} does not fit this U-Net")
    for name, value in weights.items():
        params[name].copy_(value)
