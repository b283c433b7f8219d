#!/usr/bin/env python
"""Speed and memory of SalUn's three phases for any U-Net config, on any device.

    python benchmarks/bench_erase.py --unet_config ../shared/data/configs/sd14_unet_config.json --device cuda \
        --mixed_precision bf16 --batch_size 8                       # SD1.4-shaped U-Net, random weights
    python benchmarks/bench_erase.py --unet_config benchmarks/configs/sdxl_unet_config.json --device cuda \
        --mixed_precision bf16 --batch_size 8                       # SDXL-shaped (random added conditioning too)
    python benchmarks/bench_erase.py --unet_config tiny --device cpu    # seconds, anywhere
    python benchmarks/bench_erase.py --transformer_config flux-dev --device cuda --weight_dtype bf16 \
        --mixed_precision bf16 --gradient_checkpointing --optimizers in_backward --batch_size 1 \
        --phases saliency,train                                      # FLUX.1-dev-shaped (12B), random weights
    python benchmarks/bench_erase.py --transformer_config flux-tiny --device cpu   # the same path, seconds on CPU

Reports (JSON to --output, and a table on stdout):
* saliency: seconds per forget sample (forward + backward of the diffusion loss, gradients accumulated);
* training: seconds per SalUn step (forget + pseudo + retain passes at --batch_size, masked AdamW, restore);
* sampling: images/s of a --num_inference_steps CFG denoising loop (U-Net only; VAE/text encoder excluded; a
  transformer: Euler steps of the flow without CFG, as FLUX-dev samples);
* peak memory of each phase (CUDA allocator peak on GPU, process peak RSS on CPU).
Weights are random: speed and memory do not depend on them. Timings never belong in tests; they belong here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from salun_diffusers.families import FlowFamily, PromptCond, cat_conds, sdxl_time_ids, unet_kwargs  # noqa: E402
from salun_diffusers.masking import MaskedAdamW, MaskedUpdate, mask_from_saliency  # noqa: E402
from salun_diffusers.objectives import diffusion_loss, salun_loss  # noqa: E402
from salun_diffusers.saliency import compute_saliency  # noqa: E402

SD14_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "configs",
                           "sd14_unet_config.json")


def build_unet(spec: str, device, pretrained: str = None):
    from diffusers import UNet2DConditionModel

    if pretrained:
        return UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet").to(device)
    if spec == "tiny":
        from salun_diffusers.testing import get_dummy_components

        return get_dummy_components()["unet"].to(device)
    if spec == "digit":
        from salun_diffusers.digits import DIGIT_PIPELINE_DIR

        return UNet2DConditionModel.from_pretrained(DIGIT_PIPELINE_DIR, subfolder="unet").to(device)
    if not os.path.isfile(spec):
        raise SystemExit(f"--unet_config {spec!r} not found: pass a UNet2DConditionModel config.json, 'tiny' or "
                         "'digit' (SD1.4's is at ../shared/data/configs/sd14_unet_config.json, SD 2.1's and SDXL's in "
                         "benchmarks/configs/)")
    with open(spec) as f:
        config = json.load(f)
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(config).to(device)


# FLUX.1-dev's published transformer config (black-forest-labs/FLUX.1-dev, transformer/config.json): 12B parameters
FLUX_DEV_CONFIG = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 19,
                   "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
                   "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
                   "axes_dims_rope": [16, 56, 56]}
FLUX_TINY_CONFIG = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 16, "num_layers": 1,
                    "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
                    "joint_attention_dim": 16, "pooled_projection_dim": 8, "guidance_embeds": True,
                    "axes_dims_rope": [4, 4, 8]}
SD3_TINY_CONFIG = {"_class_name": "SD3Transformer2DModel", "sample_size": 8, "patch_size": 2, "in_channels": 4,
                   "out_channels": 4, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2,
                   "joint_attention_dim": 16, "caption_projection_dim": 16, "pooled_projection_dim": 16,
                   "pos_embed_max_size": 8}
TRANSFORMER_CONFIGS = {"flux-dev": FLUX_DEV_CONFIG, "flux-tiny": FLUX_TINY_CONFIG, "sd3-tiny": SD3_TINY_CONFIG}


def build_transformer(spec: str, device, dtype):
    """A flow transformer with random weights, built directly on ``device`` in ``dtype`` (FLUX-dev in bf16: 24 GB,
    never a float32 copy), and a stand-in pipeline (transformer + the family's scheduler) for :class:`FlowFamily`."""
    from types import SimpleNamespace

    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    if spec in TRANSFORMER_CONFIGS:
        config = dict(TRANSFORMER_CONFIGS[spec])
    elif os.path.isfile(spec):
        with open(spec) as f:
            config = json.load(f)
    else:
        raise SystemExit(f"--transformer_config {spec!r}: pass {', '.join(TRANSFORMER_CONFIGS)} or a transformer "
                         "config.json (with _class_name)")
    cls = getattr(diffusers, config.pop("_class_name"))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls.from_config(config)
    finally:
        torch.set_default_dtype(default)
    flux = cls.__name__.startswith("Flux")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=flux, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    return model, SimpleNamespace(transformer=model, scheduler=scheduler)


class Peak:
    """Peak memory of a phase: CUDA allocator peak, or the process's peak RSS on CPU (monotone: an upper bound)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.gib = torch.cuda.max_memory_allocated() / 2 ** 30
        else:
            self.gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        return False


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_sampling(sample, steps: int, device):
    """``(seconds, Peak)`` of ``sample(steps)`` after a 2-step warm-up, device work synchronised."""
    sample(2)
    with Peak(device) as peak:
        sync(device)
        start = time.perf_counter()
        sample(steps)
        sync(device)
        return time.perf_counter() - start, peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--unet_config", default=SD14_CONFIG if os.path.isfile(SD14_CONFIG) else "tiny",
                   help="UNet2DConditionModel config.json, or 'tiny' / 'digit' (default: SD1.4's when present)")
    p.add_argument("--pretrained_model_name_or_path", default=None, help="Use a real pipeline's unet/ instead.")
    p.add_argument("--transformer_config", default=None,
                   help="Benchmark a flow-matching transformer instead of a U-Net: 'flux-dev' (FLUX.1-dev's published "
                        "config, 12B), 'flux-tiny', 'sd3-tiny' or a transformer config.json with _class_name")
    p.add_argument("--weight_dtype", default="fp32", choices=["fp32", "bf16"],
                   help="dtype of the denoiser's weights (bf16: half the memory of weights and optimizer state)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--text_length", type=int, default=None,
                   help="text tokens of the conditioning (default: 77 for U-Nets; transformers: 512, FLUX's T5 length)")
    p.add_argument("--guidance", type=float, default=3.5, help="FLUX-dev's embedded guidance")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mixed_precision", default="bf16" if torch.cuda.is_available() else "no",
                   choices=["no", "fp16", "bf16"], help="autocast dtype for saliency and training")
    p.add_argument("--sample_dtype", default="fp16" if torch.cuda.is_available() else "fp32",
                   choices=["fp32", "fp16", "bf16"], help="U-Net dtype for the sampling loop")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--latent_size", type=int, default=None, help="latent side (default: config sample_size)")
    p.add_argument("--saliency_batches", type=int, default=3)
    p.add_argument("--train_steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--sample_batch", type=int, default=4)
    p.add_argument("--mask_ratio", type=float, default=0.5)
    p.add_argument("--phases", default="saliency,train,sample")
    p.add_argument("--optimizers", default="adamw",
                   help="training phase, in this order: 'adamw' (MaskedUpdate + torch AdamW) and/or 'in_backward' "
                        "(MaskedAdamW, --optimizer_in_backward). On CPU the peak RSS only grows: list in_backward "
                        "first to measure both in one process")
    p.add_argument("--output", default=None, help="JSON output path")
    args = p.parse_args(argv)

    from diffusers import DDIMScheduler, DDPMScheduler

    device = torch.device(args.device)
    wdt = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.weight_dtype]
    family = None  # a U-Net (DDPM noise, epsilon target) unless a transformer config is given
    if args.transformer_config:
        unet, stand_in = build_transformer(args.transformer_config, device, wdt)
        family = FlowFamily(stand_in, guidance_scale=args.guidance)
        cfg = unet.config
        flux = family.family == "flux"
        channels = cfg.in_channels // 4 if flux else cfg.in_channels  # FLUX packs 2x2 latent patches
        size = args.latent_size or (128 if flux else cfg.sample_size)  # FLUX: 1024 px = 128 latents
        dim, text_len = cfg.joint_attention_dim, args.text_length or 512
    else:
        unet = build_unet(args.unet_config, device, args.pretrained_model_name_or_path).to(wdt)
        cfg = unet.config
        channels = cfg.in_channels
        size = args.latent_size or cfg.sample_size
        dim = cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else cfg.cross_attention_dim[0]
        text_len = args.text_length or 77
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    n_params = sum(p.numel() for p in unet.parameters())
    amp = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else (lambda: torch.autocast(device.type,
                                                                                                      enabled=False))
    sched = family or DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator(device=device).manual_seed(0)
    bs = args.batch_size
    latents = torch.randn(bs * max(args.saliency_batches, 2), channels, size, size, generator=g, device=device)
    cond = [PromptCond(c) for c in torch.randn(3, text_len, dim, generator=g, device=device)]
    if family is not None:  # pooled text embeddings beside the hidden states
        cond = [PromptCond(c.embeds, {"pooled_projections": torch.randn(cfg.pooled_projection_dim, generator=g,
                                                                        device=device)}) for c in cond]
    elif cfg.addition_embed_type == "text_time":  # SDXL: pooled text embeddings and time ids as added conditioning
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        time_ids = sdxl_time_ids(8 * size, 8 * size).to(device)
        cond = [PromptCond(c.embeds, {"text_embeds": torch.randn(pooled, generator=g, device=device),
                                      "time_ids": time_ids}) for c in cond]
    result = {"unet_config": None if family else args.unet_config, "transformer_config": args.transformer_config,
              "weight_dtype": args.weight_dtype, "gradient_checkpointing": args.gradient_checkpointing,
              "text_length": text_len, "parameters": n_params, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "mixed_precision": args.mixed_precision, "batch_size": bs,
              "latent_size": size, "threads": torch.get_num_threads()}
    print(f"{type(unet).__name__}: {n_params / 1e6:.1f}M parameters ({args.weight_dtype}), latents "
          f"{channels}x{size}x{size}, device {device}")
    if device.type == "cuda":
        result["weights_gib"] = torch.cuda.memory_allocated() / 2 ** 30
    phases = args.phases.split(",")

    mask = None
    if "saliency" in phases or "train" in phases:
        unet.requires_grad_(True)
        batches = [list(range(i * bs, (i + 1) * bs)) for i in range(args.saliency_batches)]

        def loss_fn(model, idx, gen):
            with autocast():
                return diffusion_loss(model, sched, latents[idx], cond[0].expand(len(idx)), gen)

        compute_saliency(unet, batches[:1], loss_fn)  # warm-up
        with Peak(device) as peak:
            sync(device)
            t = time.perf_counter()
            sal = compute_saliency(unet, batches, loss_fn)
            sync(device)
            dt = time.perf_counter() - t
        t = time.perf_counter()
        mask = mask_from_saliency(sal, args.mask_ratio)
        sync(device)
        result.update({"saliency_s_per_sample": dt / (bs * len(batches)), "saliency_peak_gib": peak.gib,
                       "mask_seconds": time.perf_counter() - t})
        del sal
        print(f"saliency: {result['saliency_s_per_sample'] * 1e3:.1f} ms/sample, peak {peak.gib:.2f} GiB, "
              f"top-k mask over {n_params / 1e6:.0f}M weights in {result['mask_seconds']:.2f}s")

    for optimizer in (args.optimizers.split(",") if "train" in phases else []):
        if optimizer == "in_backward":
            guard = opt = MaskedAdamW(unet, mask, lr=1e-5, weight_decay=1e-2)
        else:
            guard = MaskedUpdate(unet, mask)
            opt = torch.optim.AdamW(guard.trainable_parameters(), lr=1e-5, weight_decay=1e-2)

        def step(i):
            gen = torch.Generator(device=device).manual_seed(i)
            with autocast():
                loss, _, _ = salun_loss(unet, sched, latents[:bs], cond[0].expand(bs), cond[1].expand(bs),
                                        latents[bs:2 * bs], cond[2].expand(bs), 0.1, gen)
            loss.backward()
            guard.mask_gradients()
            opt.step()
            opt.zero_grad(set_to_none=True)
            guard.restore()

        step(0)  # warm-up (allocates optimizer state)
        with Peak(device) as peak:
            sync(device)
            t = time.perf_counter()
            for i in range(args.train_steps):
                step(i + 1)
            sync(device)
            dt = time.perf_counter() - t
        key = "train" if optimizer == "adamw" else f"train_{optimizer}"
        result.update({f"{key}_s_per_step": dt / args.train_steps, f"{key}_peak_gib": peak.gib})
        print(f"training ({optimizer}): {dt / args.train_steps:.3f} s/step (batch {bs}: forget + pseudo + retain), "
              f"peak {peak.gib:.2f} GiB")
        guard.remove_hooks()
        del guard, opt
        unet.zero_grad(set_to_none=True)

    if "sample" in phases and family is not None:
        unet.requires_grad_(False)
        n = args.sample_batch
        text = cond[0].expand(n)

        @torch.no_grad()
        def sample(steps):
            x = torch.randn(n, channels, size, size, generator=g, device=device)
            sigmas = torch.linspace(1.0, 0.0, steps + 1, device=device)
            for i in range(steps):
                with autocast():
                    v = family.predict(unet, x.to(wdt), sigmas[i].expand(n), text)
                x = x + (sigmas[i + 1] - sigmas[i]) * v.float()
            return x

        dt, peak = timed_sampling(sample, args.num_inference_steps, device)
        result.update({"sample_images_per_s": n / dt, "sample_s_per_image": dt / n, "sample_peak_gib": peak.gib,
                       "num_inference_steps": args.num_inference_steps})
        print(f"sampling: {n / dt:.3f} images/s ({dt / n:.2f} s/image, {args.num_inference_steps} Euler steps), "
              f"peak {peak.gib:.2f} GiB")
    elif "sample" in phases:
        sdt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.sample_dtype]
        unet.requires_grad_(False)
        unet.to(dtype=sdt)
        ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                             set_alpha_to_one=False)
        n = args.sample_batch
        text = unet_kwargs(cat_conds([cond[1].expand(n), cond[0].expand(n)]).to(sdt))

        @torch.no_grad()
        def sample(steps):
            ddim.set_timesteps(steps)
            x = torch.randn(n, cfg.in_channels, size, size, generator=g, device=device, dtype=sdt)
            for t in ddim.timesteps:
                eps = unet(torch.cat([x, x]), t, **text).sample
                uncond, cond_eps = eps.chunk(2)
                x = ddim.step(uncond + 7.5 * (cond_eps - uncond), t, x).prev_sample
            return x

        dt, peak = timed_sampling(sample, args.num_inference_steps, device)
        result.update({"sample_images_per_s": n / dt, "sample_s_per_image": dt / n, "sample_peak_gib": peak.gib,
                       "num_inference_steps": args.num_inference_steps, "sample_dtype": args.sample_dtype})
        print(f"sampling: {n / dt:.3f} images/s ({dt / n:.2f} s/image, {args.num_inference_steps} CFG steps, "
              f"{args.sample_dtype}), peak {peak.gib:.2f} GiB")

    if args.output:
        from salun_diffusers.utils import write_json

        write_json(args.output, result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
