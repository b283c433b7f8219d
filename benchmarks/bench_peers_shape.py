#!/usr/bin/env python
"""Time and memory of the peer methods (ESD, UCE, AdvUnlearn) at a real model's shape, on any device.

    python benchmarks/bench_peers_shape.py --unet_config ../shared/data/configs/sd14_unet_config.json \
        --tokenizer ../shared/data/models/clip_tokenizer --device cuda          # SD1.4 shape, random weights
    python benchmarks/bench_peers_shape.py --unet_config tiny --device cpu      # seconds, anywhere

Weights are random (an SD1.4-shaped U-Net from its config and a CLIP ViT-L/14-shaped text encoder), so the figures
are speed and memory only, never erasure quality. Per method, after one warm-up iteration:
* ESD-x / ESD-u: seconds per official iteration (partial DDIM sampling from noise to a random step of 50 with
  guidance 3, the base model's two predictions there, one masked Adam step at batch 1) and the peak memory;
* UCE: seconds for the closed-form edit of every cross-attention key/value projection (one erased prompt, ten
  preserved prompts, float64 solves);
* AdvUnlearn: seconds per outer step with its inner soft-prompt attack (``--attack_steps``, official 30) and the
  peak memory (the text encoder trains; the U-Net is frozen).
Peak memory is the CUDA allocator's peak on a GPU, the process's peak RSS on a CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import time

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from salun_diffusers.methods import (AdvUnlearnConfig, EsdConfig, esd_mask, train_advunlearn,  # noqa: E402
                                     train_esd, uce_edit)
from salun_diffusers.testing import get_dummy_components  # noqa: E402

# CLIP ViT-L/14's text tower, as SD 1.x ships it (openai/clip-vit-large-patch14)
VIT_L14_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768)
PRESERVE = ["a photo of a cat", "a photo of a dog", "a church", "a car", "a tree", "a person", "a house",
            "a painting", "a bird", "a mountain"]


def build(args, device):
    if args.unet_config == "tiny":
        parts = get_dummy_components()
        return parts["unet"].to(device), parts["text_encoder"].to(device), parts["tokenizer"]
    with open(args.unet_config) as f:
        config = json.load(f)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).to(device)
    tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer)
    text_encoder = CLIPTextModel(CLIPTextConfig(**VIT_L14_TEXT)).to(device)
    return unet, text_encoder, tokenizer


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@torch.no_grad()
def encode(tokenizer, text_encoder, prompt):
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


def timed(device, fn, repeats):
    fn(1)  # warm-up
    sync(device)
    reset_peak(device)
    start = time.perf_counter()
    fn(repeats)
    sync(device)
    return (time.perf_counter() - start) / repeats, peak_gib(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--unet_config", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                                         "shared", "data", "configs", "sd14_unet_config.json"),
                   help="UNet2DConditionModel config.json, or 'tiny'")
    p.add_argument("--tokenizer", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                                       "shared", "data", "models", "clip_tokenizer"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", default="esd-x,esd-u,uce,advunlearn")
    p.add_argument("--repeats", type=int, default=4, help="timed iterations per method (after one warm-up)")
    p.add_argument("--attack_steps", type=int, default=30, help="AdvUnlearn's inner attack steps (official 30)")
    p.add_argument("--latent_size", type=int, default=None, help="latent side (default: the config's sample_size)")
    p.add_argument("--output", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    unet, text_encoder, tokenizer = build(args, device)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000)
    concept, null = encode(tokenizer, text_encoder, "a photo of a nude person"), encode(tokenizer, text_encoder, "")
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "threads": torch.get_num_threads(), "unet_parameters": sum(t.numel() for t in unet.parameters()),
               "text_encoder_parameters": sum(t.numel() for t in text_encoder.parameters())}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:
        if method in ("esd-x", "esd-u"):
            variant = method
            trained = copy.deepcopy(unet)
            mask = esd_mask(trained, variant)
            generator = torch.Generator(device).manual_seed(0)

            def run(n, trained=trained, mask=mask, variant=variant, generator=generator):
                train_esd(trained, unet, scheduler, concept, null, EsdConfig(variant=variant, iterations=n),
                          mask=mask, generator=generator)

            seconds, peak = timed(device, run, args.repeats)
            results[method] = {"s_per_iteration": seconds, "peak_gib": peak,
                               "trained_weights": int(sum(int(m.sum()) for m in mask.values()))}
            del trained
        elif method == "uce":
            def run(n):
                for _ in range(n):
                    uce_edit(unet, tokenizer, text_encoder, ["a photo of a nude person"], ["a photo of a person"],
                             PRESERVE)

            seconds, peak = timed(device, run, args.repeats)
            results[method] = {"s_per_edit": seconds, "peak_gib": peak}
        elif method == "advunlearn":
            trained_te = copy.deepcopy(text_encoder)
            generator = torch.Generator(device).manual_seed(0)

            def run(n, trained_te=trained_te, generator=generator):
                train_advunlearn(unet, trained_te, tokenizer, scheduler, "a photo of a nude person", PRESERVE[:5],
                                 AdvUnlearnConfig(iterations=n, warmup=0, attack_steps=args.attack_steps),
                                 generator=generator)

            seconds, peak = timed(device, run, max(1, args.repeats // 2))
            results[method] = {"s_per_outer_step": seconds, "peak_gib": peak, "attack_steps": args.attack_steps}
            del trained_te
        else:
            raise SystemExit(f"unknown method {method!r}: choose from esd-x, esd-u, uce, advunlearn")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(method, json.dumps(results[method]), flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
