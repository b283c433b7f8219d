"""Tiny Stable Diffusion components built from config (like diffusers' ``get_dummy_components``) for tests and demos.

Three families: ``"sd1"`` (SD 1.x-shaped, epsilon), ``"sd2"`` (SD 2.x-shaped: linear-projection attention, GELU text
encoder, ``v_prediction``) and ``"sdxl"`` (two text encoders, pooled text embeddings and time ids as added conditioning).
Nothing is downloaded: the tokenizer is written by :func:`salun_diffusers.tokenizer.build_word_tokenizer`.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

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
