"""Tiny Stable Diffusion components built from config (like diffusers' ``get_dummy_components``) for tests and demos.

Nothing is downloaded: the tokenizer is written by :func:`salun_diffusers.tokenizer.build_word_tokenizer`.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

import torch

TEST_WORDS = ("a photo of nude person wearing clothes naked handwritten digit zero one two three four five six seven "
              "eight nine image cat dog church garbage truck parachute tench van gogh style painting").split()


def get_dummy_components(tokenizer_dir: Optional[str] = None, seed: int = 0, cross_attention_dim: int = 16) -> dict:
    """Components of a ~100k-parameter StableDiffusionPipeline: 16x16 RGB images, 4x8x8 latents."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer import build_word_tokenizer

    tokenizer_dir = tokenizer_dir or tempfile.mkdtemp(prefix="salun-tok-")
    tokenizer = build_word_tokenizer(TEST_WORDS, tokenizer_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=4, attention_head_dim=2,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4, sample_size=16,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=cross_attention_dim, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=2,
        num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=77,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler,
            "safety_checker": None, "feature_extractor": None, "image_encoder": None, "requires_safety_checker": False}


def get_dummy_pipeline(seed: int = 0):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**get_dummy_components(seed=seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_dummy_pipeline(path: str, seed: int = 0) -> str:
    """Write a tiny pipeline in diffusers' folder layout (loadable by ``StableDiffusionPipeline.from_pretrained``)."""
    get_dummy_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return os.path.abspath(path)
