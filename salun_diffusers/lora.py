"""Export an erasure as a LoRA that ``pipe.load_lora_weights`` loads (diffusers / PEFT format).

Each Linear and Conv2d weight's delta ``W_erased - W_base`` is factored by truncated SVD: ``B @ A`` with
``B = U_r S_r`` and ``A = V_r^T`` (conv kernels flattened to ``[out, in*kh*kw]``; A becomes a kh x kw conv, B a 1x1
conv, as PEFT builds conv LoRAs). ``lora_alpha == r`` so PEFT's scaling is 1. Biases and norm weights cannot be
expressed as a LoRA and are left out; :func:`delta_to_lora` reports how much of the delta's energy the LoRA keeps.
"""

from __future__ import annotations

import logging
from typing import Dict, Tuple

import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

logger = logging.getLogger(__name__)


@torch.no_grad()
def delta_to_lora(base_unet: torch.nn.Module, erased_unet: torch.nn.Module, rank: int,
                  min_delta: float = 0.0) -> Tuple[Dict[str, torch.Tensor], dict]:
    """LoRA state dict (PEFT keys without the ``unet.`` prefix) approximating ``erased - base`` at ``rank``.

    Returns ``(state_dict, stats)``; stats has ``energy_kept`` (share of the squared delta norm the LoRA captures,
    over all parameters) and the number of layers.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    base = dict(base_unet.named_parameters())
    state: Dict[str, torch.Tensor] = {}
    total_energy = kept_energy = 0.0
    layers = 0
    for name, p in erased_unet.named_parameters():
        if name not in base or base[name].shape != p.shape:
            raise ValueError(f"U-Nets differ at {name!r}: export needs the erased U-Net and its own base")
        delta = (p.detach().float() - base[name].detach().float().to(p.device)).cpu()
        energy = float(delta.pow(2).sum())
        total_energy += energy
        if energy <= min_delta or not name.endswith(".weight") or delta.ndim not in (2, 4):
            continue
        module = name[: -len(".weight")]
        flat = delta.reshape(delta.shape[0], -1)
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        r = min(rank, s.numel())
        b = u[:, :r] * s[:r]
        a = vh[:r]
        kept_energy += float(s[:r].pow(2).sum())
        if delta.ndim == 4:
            state[f"{module}.lora_A.weight"] = a.reshape(r, *delta.shape[1:]).contiguous()
            state[f"{module}.lora_B.weight"] = b.reshape(delta.shape[0], r, 1, 1).contiguous()
        else:
            state[f"{module}.lora_A.weight"] = a.contiguous()
            state[f"{module}.lora_B.weight"] = b.contiguous()
        layers += 1
    stats = {"rank": rank, "layers": layers, "energy_kept": kept_energy / total_energy if total_energy else 1.0,
             "parameters": sum(t.numel() for t in state.values())}
    return state, stats


def save_lora(state: Dict[str, torch.Tensor], save_directory: str,
              weight_name: str = "pytorch_lora_weights.safetensors", component: str = "unet"):
    """Write a LoRA in diffusers' layout (``unet.``-prefixed PEFT keys; ``component="transformer"``: the
    ``transformer.``-prefixed keys SD3 and FLUX pipelines load), loadable by ``pipe.load_lora_weights``."""
    if component == "transformer":
        StableDiffusion3Pipeline.save_lora_weights(save_directory, transformer_lora_layers=state,
                                                   weight_name=weight_name, safe_serialization=True)
    else:
        StableDiffusionPipeline.save_lora_weights(save_directory, unet_lora_layers=state, weight_name=weight_name,
                                                  safe_serialization=True)
    return save_directory
