"""Tiny Stable Diffusion components built from config (like diffusers' ``get_dummy_components``) for tests and demos.

Three families: ``"sd1"`` (SD 1.x-shaped, epsilon), ``"sd2"`` (SD 2.x-shaped: linear-projection attention, GELU text
encoder, ``v_prediction``) and ``"sdxl"`` (two text encoders, pooled text embeddings and time ids as added conditioning).
Nothing is downloaded: the tokenizer is written by :func:`salun_diffusers.tokenizer.build_word_tokenizer`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Optional

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel,
                          T5TokenizerFast)

from .families import denoiser, load_base_pipeline
from .masking import load_mask
from .tokenizer import build_word_tokenizer

TEST_WORDS = ("a photo of nude person wearing clothes naked handwritten digit zero one two three four five six seven "
              "eight nine image cat dog church garbage truck parachute tench van gogh style painting").split()
FAMILIES = ("sd1", "sd2", "sdxl")


def _vae(seed: int):
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4, sample_size=16,
    )


def _text_config(tokenizer, hidden_size: int, **kw):
    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden_size, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=2,
        num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=77, **kw)


def _scheduler(prediction_type: str = "epsilon"):
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def get_dummy_components(tokenizer_dir: Optional[str] = None, seed: int = 0, cross_attention_dim: int = 16,
                         family: str = "sd1") -> dict:
    """Components of a ~100k-parameter StableDiffusionPipeline (``family`` "sd1" or "sd2") or
    StableDiffusionXLPipeline ("sdxl"): 16x16 RGB images, 4x8x8 latents."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if family == "sdxl":
        return _sdxl_components(tokenizer_dir, seed, cross_attention_dim)
    sd2 = family == "sd2"
    tokenizer_dir = tokenizer_dir or tempfile.mkdtemp(prefix="salun-tok-")
    tokenizer = build_word_tokenizer(TEST_WORDS, tokenizer_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=4, attention_head_dim=2,
        **({"use_linear_projection": True} if sd2 else {}),
    )
    vae = _vae(seed)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer, cross_attention_dim, **({"hidden_act": "gelu"} if sd2 else {})))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": _scheduler("v_prediction" if sd2 else "epsilon"),
            "safety_checker": None, "feature_extractor": None, "image_encoder": None, "requires_safety_checker": False}


def _sdxl_components(tokenizer_dir: Optional[str], seed: int, cross_attention_dim: int) -> dict:
    """SDXL-shaped: the U-Net attends to both encoders' hidden states concatenated (``cross_attention_dim`` split in
    two) and adds an embedding of the second encoder's pooled projection and six time ids (``text_time``)."""
    tokenizer_dir = tokenizer_dir or tempfile.mkdtemp(prefix="salun-tok-")
    tokenizer = build_word_tokenizer(TEST_WORDS, tokenizer_dir)
    hidden, time_dim = cross_attention_dim // 2, 4
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * hidden, norm_num_groups=4, attention_head_dim=2, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + hidden,
    )
    vae = _vae(seed)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden, hidden_act="gelu"))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, hidden, hidden_act="gelu",
                                                              projection_dim=hidden))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "tokenizer": tokenizer, "tokenizer_2": tokenizer, "scheduler": _scheduler(),
            "feature_extractor": None, "image_encoder": None, "force_zeros_for_empty_prompt": True}


def get_dummy_pipeline(seed: int = 0, family: str = "sd1"):
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls(**get_dummy_components(seed=seed, family=family))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_dummy_pipeline(path: str, seed: int = 0, family: str = "sd1") -> str:
    """Write a tiny pipeline in diffusers' folder layout (loadable by ``DiffusionPipeline.from_pretrained``)."""
    get_dummy_pipeline(seed, family).save_pretrained(path, safe_serialization=True)
    return os.path.abspath(path)


# ------------------------------------------------------------------ flow-matching families (SD3, FLUX)
# Tiny Stable Diffusion 3 and FLUX pipelines built from config (offline), for tests of the flow-matching path.
# 
# * ``"sd3"``: :class:`~diffusers.StableDiffusion3Pipeline` with two tiny ``CLIPTextModelWithProjection`` encoders and
#   no T5 (``text_encoder_3=None``: the pipeline fills the T5 part with zeros), an ``SD3Transformer2DModel`` with
#   2x2 patches, ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` as SD3 ships.
# * ``"flux"``: :class:`~diffusers.FluxPipeline` with a tiny ``CLIPTextModel`` (pooled) and a tiny ``T5EncoderModel``
#   whose ``T5TokenizerFast`` is built from a word list (a unigram vocabulary; nothing downloaded), a
#   ``FluxTransformer2DModel`` (optionally guidance-distilled like FLUX-dev), and the dynamic-shift scheduler.
# 
# Both draw 16x16 RGB images from 4x8x8 VAE latents; the VAE has a non-zero ``shift_factor`` as SD3/FLUX VAEs do.
FLOW_TEST_FAMILIES = ("sd3", "flux")


def _flow_vae(seed: int):

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4, sample_size=16,
        scaling_factor=1.5, shift_factor=0.1)


def build_t5_tokenizer(words=TEST_WORDS, save_directory: Optional[str] = None):
    """A ``T5TokenizerFast`` (unigram, one piece per listed word, ``<pad>``=0, ``</s>``=1, ``<unk>``=2, ``</s>``
    appended) built offline from a ``tokenizers`` object; saved to ``save_directory`` when given."""

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0) for w in dict.fromkeys(w.lower() for w in words)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                extra_ids=0)
    if save_directory:
        tokenizer.save_pretrained(save_directory)
    return tokenizer


def _sd3_components(tokenizer, seed: int) -> dict:

    hidden = 8
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_text_config(tokenizer, hidden, hidden_act="gelu",
                                                            projection_dim=hidden))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, hidden, hidden_act="gelu",
                                                              projection_dim=hidden))
    torch.manual_seed(seed + 2)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=2 * hidden, caption_projection_dim=16,
        pooled_projection_dim=2 * hidden, pos_embed_max_size=8)
    return {"transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
            "vae": _flow_vae(seed), "text_encoder": text_encoder, "tokenizer": tokenizer,
            "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer, "text_encoder_3": None, "tokenizer_3": None}


def _flux_components(tokenizer, seed: int, guidance_embeds: bool) -> dict:

    t5_tokenizer = build_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer, 8, hidden_act="gelu"))
    torch.manual_seed(seed + 1)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        pad_token_id=t5_tokenizer.pad_token_id, eos_token_id=t5_tokenizer.eos_token_id, decoder_start_token_id=0))
    torch.manual_seed(seed + 2)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    return {"transformer": transformer, "scheduler": scheduler, "vae": _flow_vae(seed), "text_encoder": text_encoder,
            "tokenizer": tokenizer, "text_encoder_2": text_encoder_2, "tokenizer_2": t5_tokenizer,
            "image_encoder": None, "feature_extractor": None}


def get_flow_components(family: str = "sd3", seed: int = 0, tokenizer_dir: Optional[str] = None,
                        guidance_embeds: bool = False) -> dict:
    """Components of a tiny ``StableDiffusion3Pipeline`` (``family="sd3"``) or ``FluxPipeline`` (``"flux"``;
    ``guidance_embeds`` makes it guidance-distilled like FLUX-dev)."""
    if family not in FLOW_TEST_FAMILIES:
        raise ValueError(f"family must be one of {FLOW_TEST_FAMILIES}, got {family!r}")
    tokenizer = build_word_tokenizer(TEST_WORDS, tokenizer_dir or tempfile.mkdtemp(prefix="salun-tok-"))
    if family == "sd3":
        components = _sd3_components(tokenizer, seed)
    else:
        components = _flux_components(tokenizer, seed, guidance_embeds)
    for module in components.values():  # eval mode as from_pretrained gives (T5 has dropout)
        if isinstance(module, torch.nn.Module):
            module.eval()
    return components


def get_flow_pipeline(family: str = "sd3", seed: int = 0, guidance_embeds: bool = False):
    """A tiny SD3 or FLUX pipeline (progress bar disabled)."""

    cls = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    pipe = cls(**get_flow_components(family, seed, guidance_embeds=guidance_embeds))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_flow_pipeline(path: str, family: str = "sd3", seed: int = 0, guidance_embeds: bool = False) -> str:
    """Write a tiny SD3/FLUX pipeline in diffusers' folder layout."""
    get_flow_pipeline(family, seed, guidance_embeds).save_pretrained(path, safe_serialization=True)
    return os.path.abspath(path)


def drop_final_outputs(output_dir: str, denoiser: str = "unet") -> None:
    """Leave ``output_dir`` as a run killed after its last checkpoint would: its erasure file, erasure config and
    merged denoiser folder removed (the checkpoints kept), for the resume-equals-uninterrupted tests."""
    for name in ("erasure.safetensors", "erasure_config.json", denoiser):
        path = os.path.join(output_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def changed_inside_mask(result, base_dir: str) -> int:
    """Asserts that an erasure ``result`` (``erase()``'s) left every weight outside its saliency mask bit-identical to
    the base pipeline's at ``base_dir`` (``torch.equal``); returns how many entries inside the mask it changed."""
    mask, _ = load_mask(result.mask_path)
    base = {n: p.detach() for n, p in denoiser(load_base_pipeline(base_dir)).named_parameters()}
    changed = 0
    for name, p in result.unet.named_parameters():
        m = mask[name]
        assert torch.equal(p.detach()[~m], base[name][~m]), name
        changed += int((p.detach()[m] != base[name][m]).sum())
    return changed


class PlainBackward:
    """What a training step needs of an ``accelerate.Accelerator`` to run outside one: ``backward``."""

    @staticmethod
    def backward(loss):
        loss.backward()
