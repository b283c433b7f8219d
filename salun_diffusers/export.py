"""Export an erased model for the UIs: one single-file checkpoint in the original Stable Diffusion layout, and the
LoRA in kohya's key layout.

:func:`save_single_file` writes U-Net, VAE and text encoder(s) of a Stable Diffusion 1.x / 2.x or SDXL pipeline as
one safetensors file in the CompVis (SD 1.x/2.x) or sgm (SDXL) key layout: the format Automatic1111 and ComfyUI load
from their checkpoint folder, and ``StableDiffusionPipeline.from_single_file`` /
``StableDiffusionXLPipeline.from_single_file`` read back. The key maps follow diffusers' conversion scripts
(``scripts/convert_diffusers_to_original_stable_diffusion.py``, ``convert_diffusers_to_original_sdxl.py``) and their
inverse in ``diffusers.loaders.single_file_utils``, generalised to the block counts in the U-Net's and VAE's configs:

- U-Net under ``model.diffusion_model.`` (``input_blocks`` / ``middle_block`` / ``output_blocks``),
- VAE under ``first_stage_model.`` (``encoder.down.N.block.M``; attention projections as 1x1 convolutions),
- text encoder: SD 1.x under ``cond_stage_model.transformer.text_model.`` (OpenAI CLIP, as transformers holds it);
  SD 2.x under ``cond_stage_model.model.`` (OpenCLIP: q/k/v concatenated into ``in_proj_weight``); SDXL the first
  encoder under ``conditioner.embedders.0.transformer.text_model.`` and the second (OpenCLIP, with its
  ``text_projection`` transposed) under ``conditioner.embedders.1.model.``.

Which text-encoder layout a model gets follows its activation, as the original models do: ``quick_gelu`` is OpenAI
CLIP (SD 1.x), ``gelu`` is OpenCLIP (SD 2.x). An SD 2.x text encoder has the 23 layers diffusers keeps (the UIs read
the penultimate layer of the original 24, so the absent last one is never used).

:func:`kohya_lora_state_dict` / :func:`save_kohya_lora` rewrite the diffusers-format LoRA of
:mod:`salun_diffusers.lora` with kohya's keys (``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` /
``.alpha``), the layout Automatic1111's and ComfyUI's LoRA loaders read. Module names follow kohya's trainers:
diffusers names for SD 1.x/2.x (``lora_unet_down_blocks_1_attentions_0_..._to_q``), sgm names for SDXL
(``lora_unet_input_blocks_4_1_..._to_q``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Dict, Mapping, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .families import load_base_pipeline
from .utils import atomic_path

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer.text_model."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model.")
KOHYA_LORA_NAME = "pytorch_lora_weights_kohya.safetensors"
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"

_DOWN_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
_UP_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
_UNET_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
                ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."),
                ("conv_shortcut.", "skip_connection."))
_VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                  ("to_out.0.", "proj_out."))
_OPENCLIP_LAYER = (("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
                   ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))


# ----------------------------------------------------------------------------------------------------------- U-Net
def _layers_per_block(config: Mapping) -> int:
    layers = config["layers_per_block"]
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise ValueError(f"the U-Net has a different layers_per_block per block ({list(layers)}); the original "
                             "Stable Diffusion layout has one count for all blocks: export a standard SD U-Net")
        layers = layers[0]
    return int(layers)


def unet_prefix_map(config: Mapping, state_keys) -> Dict[str, Tuple[str, bool]]:
    """``{diffusers module prefix: (original prefix, is_resnet)}`` for a U-Net with this config. The original U-Net
    numbers its blocks flat: ``input_blocks.0`` is ``conv_in``, then ``layers_per_block`` (resnet, attention) pairs
    and one downsampler per down block; the up blocks have one layer more; the middle block is resnet, attention,
    resnet."""
    for kind, allowed in (("down_block_types", _DOWN_TYPES), ("up_block_types", _UP_TYPES)):
        unknown = [t for t in config[kind] if t not in allowed]
        if unknown:
            raise ValueError(f"U-Net {kind} {unknown} have no original Stable Diffusion layout (supported: "
                             f"{', '.join(allowed)}): export an SD 1.x/2.x or SDXL pipeline")
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"U-Net mid_block_type {config.get('mid_block_type')!r} has no original Stable Diffusion "
                         "layout (supported: UNetMidBlock2DCrossAttn)")
    n = _layers_per_block(config)
    out = {"time_embedding.linear_1.": ("time_embed.0.", False), "time_embedding.linear_2.": ("time_embed.2.", False),
           "conv_in.": ("input_blocks.0.0.", False), "conv_norm_out.": ("out.0.", False),
           "conv_out.": ("out.2.", False), "add_embedding.linear_1.": ("label_emb.0.0.", False),
           "add_embedding.linear_2.": ("label_emb.0.2.", False),
           "mid_block.attentions.0.": ("middle_block.1.", False),
           "mid_block.resnets.0.": ("middle_block.0.", True), "mid_block.resnets.1.": ("middle_block.2.", True)}
    for i in range(len(config["down_block_types"])):
        for j in range(n):
            out[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{(n + 1) * i + j + 1}.0.", True)
            out[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{(n + 1) * i + j + 1}.1.", False)
        out[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{(n + 1) * (i + 1)}.0.op.", False)
    for i in range(len(config["up_block_types"])):
        has_attention = any(k.startswith(f"up_blocks.{i}.attentions.") for k in state_keys)
        for j in range(n + 1):
            out[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{(n + 1) * i + j}.0.", True)
            out[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{(n + 1) * i + j}.1.", False)
        out[f"up_blocks.{i}.upsamplers.0.conv."] = (
            f"output_blocks.{(n + 1) * i + n}.{2 if has_attention else 1}.conv.", False)
    return out


def _map_prefixed(key: str, prefixes: Mapping[str, Tuple[str, bool]], inner=()) -> Optional[str]:
    """``key`` under the longest matching prefix's original prefix (its rest renamed by ``inner`` when the prefix
    says so), or ``None`` when no prefix matches."""
    best = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
    if best is None:
        return None
    new_prefix, renamed = prefixes[best]
    rest = key[len(best):]
    if renamed:
        for old, new in inner:
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
    return new_prefix + rest


def unet_to_original(state: Mapping[str, torch.Tensor], config: Mapping) -> Dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict in the original (CompVis / sgm) key layout, without the
    ``model.diffusion_model.`` prefix. Refuses keys that have no place there (naming them)."""
    prefixes = unet_prefix_map(config, state.keys())
    out, left = {}, []
    for key, value in state.items():
        new = _map_prefixed(key, prefixes, _UNET_RESNET)
        if new is None:
            left.append(key)
        else:
            out[new] = value
    _refuse_leftovers(left, "U-Net")
    return out


def _refuse_leftovers(left, what: str) -> None:
    if left:
        shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
        raise ValueError(f"{len(left)} {what} weights have no place in the original Stable Diffusion layout ({shown}): "
                         "only standard SD 1.x/2.x/SDXL components can be exported as a single file; use the "
                         "diffusers folder (or the LoRA) for this model")


# ------------------------------------------------------------------------------------------------------------- VAE
def vae_to_original(state: Mapping[str, torch.Tensor], config: Mapping) -> Dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict in the original layout (without ``first_stage_model.``): resnets
    ``down.N.block.M`` / ``up.N.block.M`` (the decoder's up blocks numbered from the bottom), the mid block's
    ``block_1``/``attn_1``/``block_2``, and the attention projections as 1x1 convolutions."""
    prefixes: Dict[str, Tuple[str, bool]] = {}
    for part in ("encoder", "decoder"):
        for a, b in (("conv_in.", "conv_in."), ("conv_out.", "conv_out."), ("conv_norm_out.", "norm_out.")):
            prefixes[f"{part}.{a}"] = (f"{part}.{b}", False)
        prefixes[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", True)
        for j in range(2):
            prefixes[f"{part}.mid_block.resnets.{j}."] = (f"{part}.mid.block_{j + 1}.", False)
    for a in ("quant_conv.", "post_quant_conv."):
        prefixes[a] = (a, False)
    n_down, n_up = len(config["down_block_types"]), len(config["up_block_types"])
    for i in range(n_down):
        prefixes[f"encoder.down_blocks.{i}.resnets."] = (f"encoder.down.{i}.block.", False)
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = (f"encoder.down.{i}.downsample.", False)
    for i in range(n_up):
        prefixes[f"decoder.up_blocks.{i}.resnets."] = (f"decoder.up.{n_up - 1 - i}.block.", False)
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = (f"decoder.up.{n_up - 1 - i}.upsample.", False)
    out, left = {}, []
    for key, value in state.items():
        new = _map_prefixed(key, prefixes, _VAE_ATTENTION)
        if new is None:
            left.append(key)
            continue
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)  # linear -> 1x1 conv, as the original VAE holds them
        out[new] = value
    _refuse_leftovers(left, "VAE")
    return out


# --------------------------------------------------------------------------------------------------- text encoders
def _text_keys(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The encoder's keys without ``text_model.`` (transformers >= 5.6 flattened ``CLIPTextModel``; the model with
    projection still nests it)."""
    return {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in state.items()}


def clip_to_original(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """OpenAI CLIP (SD 1.x, SDXL's first encoder): transformers' own names under ``text_model.`` (the prefix
    is added by the caller)."""
    state = _text_keys(state)
    left = [k for k in state if not k.startswith(("embeddings.", "encoder.layers.", "final_layer_norm."))]
    _refuse_leftovers(left, "text encoder")
    return dict(state)


def openclip_to_original(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """OpenCLIP layout (SD 2.x, SDXL's second encoder): ``transformer.resblocks.N`` with q/k/v concatenated into
    ``attn.in_proj_weight`` / ``in_proj_bias``, ``token_embedding``, ``positional_embedding``, ``ln_final`` and the
    projection as a ``[hidden, projection]`` matrix (the transpose of transformers' Linear weight)."""
    state = _text_keys(state)
    out, left, qkv = {}, [], {}
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        elif key.endswith("embeddings.position_ids"):
            continue  # a buffer of older transformers versions, not a weight
        else:
            m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
            if m is None:
                left.append(key)
                continue
            layer, rest = m.groups()
            proj = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if proj:
                qkv.setdefault((layer, proj.group(2)), {})[proj.group(1)] = value
                continue
            for old, new in _OPENCLIP_LAYER:
                if rest.startswith(old):
                    out[f"transformer.resblocks.{layer}.{new}{rest[len(old):]}"] = value
                    break
            else:
                left.append(key)
    for (layer, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            left.append(f"encoder.layers.{layer}.self_attn.*_proj.{kind} (q, k and v are all needed)")
            continue
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[c] for c in "qkv"], dim=0)
    _refuse_leftovers(left, "text encoder")
    return out


# -------------------------------------------------------------------------------------------------------- pipeline
def _component(pipe, name: str, expected: Tuple[str, ...], required: bool = True):
    module = getattr(pipe, name, None)
    if module is None:
        if required:
            raise ValueError(f"the pipeline has no {name}: a single-file checkpoint needs an SD 1.x/2.x or SDXL "
                             "pipeline with U-Net, VAE and text encoder(s)")
        return None
    if type(module).__name__ not in expected:
        raise ValueError(f"the pipeline's {name} is a {type(module).__name__}, not {' or '.join(expected)}: only "
                         "Stable Diffusion 1.x/2.x and SDXL pipelines have an original single-file layout")
    return module


def single_file_family(pipe) -> str:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"``: which original layout the pipeline's components export to."""
    _component(pipe, "unet", ("UNet2DConditionModel",))
    _component(pipe, "vae", ("AutoencoderKL",))
    text_encoder = _component(pipe, "text_encoder", ("CLIPTextModel",))
    if _component(pipe, "text_encoder_2", ("CLIPTextModelWithProjection",), required=False) is not None:
        return "sdxl"
    return "sd2" if text_encoder.config.hidden_act == "gelu" else "sd1"


def original_layout(pipe) -> Dict[str, torch.Tensor]:
    """The pipeline's U-Net, VAE and text encoder(s) under their original single-file keys (tensors as they are:
    same device and dtype, q/k/v concatenated for OpenCLIP)."""
    family = single_file_family(pipe)
    parts = [(UNET_PREFIX, unet_to_original(pipe.unet.state_dict(), pipe.unet.config)),
             (VAE_PREFIX, vae_to_original(pipe.vae.state_dict(), pipe.vae.config))]
    if family == "sd1":
        parts.append((SD1_TEXT_PREFIX, clip_to_original(pipe.text_encoder.state_dict())))
    elif family == "sd2":
        parts.append((SD2_TEXT_PREFIX, openclip_to_original(pipe.text_encoder.state_dict())))
    else:
        parts.append((SDXL_TEXT_PREFIXES[0], clip_to_original(pipe.text_encoder.state_dict())))
        parts.append((SDXL_TEXT_PREFIXES[1], openclip_to_original(pipe.text_encoder_2.state_dict())))
    return {prefix + key: value for prefix, state in parts for key, value in state.items()}


def original_state_dict(pipe, half: bool = False) -> Dict[str, torch.Tensor]:
    """:func:`original_layout` on the CPU, contiguous, floating tensors cast to float16 when ``half``."""
    out = {}
    for key, value in original_layout(pipe).items():
        value = value.detach().to("cpu")
        if half and value.is_floating_point():
            value = value.to(torch.float16)
        out[key] = value.contiguous()
    return out


def _load_pipeline(folder: str):
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise ValueError(f"{folder!r} is not a diffusers pipeline folder (no model_index.json): pass the erased "
                         "pipeline folder (written with --save_pipeline) or a loaded pipeline")
    return load_base_pipeline(folder)


def _check_output(path: str, overwrite: bool, suffix: str = ".safetensors") -> None:
    if not path.endswith(suffix):
        raise ValueError(f"the output file {path!r} must end in {suffix} (the UIs pick checkpoints by extension)")
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{path!r} already exists: pass overwrite=True (--overwrite_output_dir) or choose another file "
                         "name")


def save_single_file(pipe_or_folder, path: str, *, half: bool = False, overwrite: bool = False) -> str:
    """Write the pipeline (a loaded SD 1.x/2.x or SDXL pipeline, or the folder of one) as ONE safetensors
    checkpoint in the original Stable Diffusion layout, the file Automatic1111 / ComfyUI load and
    ``from_single_file`` reads. ``half`` stores float16 (half the size; what the UIs run anyway). The file appears
    only when complete. Returns ``path``."""
    _check_output(path, overwrite)
    pipe = _load_pipeline(pipe_or_folder) if isinstance(pipe_or_folder, (str, os.PathLike)) else pipe_or_folder
    family = single_file_family(pipe)
    tensors = original_state_dict(pipe, half=half)
    scheduler = getattr(pipe, "scheduler", None)
    prediction = scheduler.config.get("prediction_type") if scheduler is not None else None
    metadata = {"format": "pt", "salun_diffusers.family": family, "salun_diffusers.dtype": str(
        torch.float16 if half else pipe.unet.dtype)}
    if prediction:
        metadata["salun_diffusers.prediction_type"] = prediction
    if prediction == "v_prediction" and family != "sd2":
        logger.warning("%s: the model predicts v; the UIs assume epsilon for %s checkpoints: set v-prediction in the "
                       "UI (ComfyUI: a ModelSamplingDiscrete node; Automatic1111: a .yaml config beside the file)",
                       path, family)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    size = os.path.getsize(path)
    logger.info("wrote %s (%s single file, %d tensors, %.1f MB)", path, family, len(tensors), size / 2 ** 20)
    return path


# ------------------------------------------------------------------------------------------------------------ LoRA
def _lora_alphas(path: str) -> Dict[str, float]:
    """``{"*": lora_alpha}`` from a diffusers LoRA file's adapter metadata when it records one (else ``{}``: the
    rank is the alpha, diffusers' default). Per-module patterns are refused rather than guessed."""
    with safe_open(path, "pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    info = json.loads(raw) if raw else {}
    if info.get("unet.alpha_pattern") or info.get("unet.rank_pattern"):
        raise ValueError(f"{path!r} sets per-module alpha/rank patterns, which this converter does not map: export "
                         "the LoRA with one alpha for all modules")
    return {"*": float(info["unet.lora_alpha"])} if info.get("unet.lora_alpha") is not None else {}


def kohya_lora_state_dict(lora_state: Mapping[str, torch.Tensor], unet_config: Mapping,
                          alphas: Optional[Mapping[str, float]] = None) -> Dict[str, torch.Tensor]:
    """Rewrite a U-Net LoRA in diffusers/PEFT keys (``[unet.]<module>.lora_A.weight`` / ``lora_B``, as
    :func:`salun_diffusers.lora.delta_to_lora` and ``save_lora`` make) with kohya's keys:
    ``lora_unet_<module with _>.lora_down.weight`` (= A), ``.lora_up.weight`` (= B) and ``.alpha`` (the LoRA scale
    is ``alpha / rank``; ``alphas`` per module, ``"*"`` for all, default the rank: scale 1 as in the diffusers file).
    SDXL modules get their sgm names (``input_blocks.4.1...``), SD 1.x/2.x keep diffusers' names, as kohya's
    trainers write them."""
    alphas = dict(alphas or {})
    sdxl = unet_config.get("addition_embed_type") == "text_time"
    modules: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in lora_state.items():
        m = re.fullmatch(r"(?:unet\.)?(.+)\.(lora_A|lora_B)(?:\.default)?\.weight", key)
        if m is None:
            raise ValueError(f"{key!r} is not a U-Net LoRA key (expected '<module>.lora_A.weight' / 'lora_B'): "
                             "convert the LoRA file written by --export_lora_rank")
        modules.setdefault(m.group(1), {})[m.group(2)] = value
    prefixes = unet_prefix_map(unet_config, [m + ".weight" for m in modules]) if sdxl else None
    out = {}
    for module, parts in modules.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise ValueError(f"LoRA module {module!r} lacks {'lora_B' if 'lora_A' in parts else 'lora_A'}: the file "
                             "is incomplete; export it again")
        name = module
        if sdxl:
            name = _map_prefixed(module + ".", prefixes, _UNET_RESNET)
            if name is None:
                raise ValueError(f"LoRA module {module!r} has no sgm name; only standard SDXL U-Net modules can be "
                                 "written in kohya's layout")
            name = name[:-1]
        kohya = "lora_unet_" + name.replace(".", "_")
        rank = parts["lora_A"].shape[0]
        out[f"{kohya}.lora_down.weight"] = parts["lora_A"].contiguous()
        out[f"{kohya}.lora_up.weight"] = parts["lora_B"].contiguous()
        out[f"{kohya}.alpha"] = torch.tensor(float(alphas.get(module, alphas.get("*", rank))))
    return out


def save_kohya_lora(lora_file: str, unet_config: Mapping, path: Optional[str] = None, *,
                    overwrite: bool = False) -> str:
    """Write the diffusers-format LoRA ``lora_file`` (or the ``pytorch_lora_weights.safetensors`` in that folder)
    in kohya's layout, by default beside it as ``pytorch_lora_weights_kohya.safetensors``: the file to put in
    Automatic1111's ``models/Lora`` or ComfyUI's ``models/loras``. Returns the path written."""
    if os.path.isdir(lora_file):
        lora_file = os.path.join(lora_file, DIFFUSERS_LORA_NAME)
    if not os.path.isfile(lora_file):
        raise ValueError(f"no LoRA file at {lora_file!r}: export one first (--export_lora_rank)")
    path = path or os.path.join(os.path.dirname(os.path.abspath(lora_file)), KOHYA_LORA_NAME)
    _check_output(path, overwrite)
    state = kohya_lora_state_dict(load_file(lora_file), unet_config, _lora_alphas(lora_file))
    downs = [v for k, v in state.items() if k.endswith(".lora_down.weight")]
    metadata = {"format": "pt", "ss_network_module": "networks.lora",
                "ss_network_dim": str(max((int(v.shape[0]) for v in downs), default=0))}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata=metadata)
    logger.info("wrote %s (kohya layout, %d modules)", path, len(downs))
    return path
