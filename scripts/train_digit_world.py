#!/usr/bin/env python
"""Train the bundled "digit world" on real MNIST digits: a tiny Stable Diffusion pipeline and a digit judge (CPU).

    python scripts/train_digit_world.py --output_dir salun_diffusers/assets --seed 0 [--mnist_dir ../shared/data/mnist]

Steps (all seeded): (1) a small CNN judge on 8,000 MNIST test-set digits (2,000 held out), with random affine
augmentation; (2) an ``AutoencoderKL`` (32x32 RGB <-> 4x8x8 latents) on all 10,000 digits, whose ``scaling_factor``
is set to 1/std of the latents; (3) a CLIP text encoder and ``UNet2DConditionModel`` trained jointly on the cached
latents with prompts "a handwritten digit seven" (10% empty prompts for classifier-free guidance), keeping an EMA of
the weights. It writes ``digit-sd/`` (``StableDiffusionPipeline.save_pretrained``), ``digit-judge/`` and
``digit-world-metrics.json`` (judge accuracy, per-digit accuracy of generated images, U-Net cost, sizes, times).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from salun_diffusers.data import load_mnist  # noqa: E402
from salun_diffusers.digits import (  # noqa: E402
    DIGIT_SAMPLING, DIGIT_WORDS, DigitJudge, digit_prompt, judge_accuracy, judge_split, mnist_images)
from salun_diffusers.tokenizer import build_word_tokenizer  # noqa: E402
from salun_diffusers.utils import write_json  # noqa: E402

logger = logging.getLogger("train_digit_world")
PROMPT_WORDS = ("a", "handwritten", "digit", *DIGIT_WORDS)


@dataclass
class DigitWorldConfig:
    output_dir: str = field(default="salun_diffusers/assets", metadata={
        "help": "Folder receiving digit-sd/, digit-judge/ and digit-world-metrics.json (replaced if present)."})
    mnist_dir: Optional[str] = field(default=None, metadata={
        "help": "Folder with t10k-images-idx3-ubyte.gz / t10k-labels-idx1-ubyte.gz (default ../shared/data/mnist)."})
    max_images: Optional[int] = field(default=None, metadata={
        "help": "Use only the first N digits (smoke tests); default all 10,000."})
    seed: int = field(default=0, metadata={"help": "Seed for the data split, initialisation, batches and noise."})
    num_threads: int = field(default=1, metadata={
        "help": "torch CPU threads (1 is fastest on a busy 2-core machine: these models are too small to split)."})
    # judge
    judge_train_size: int = field(default=8000, metadata={"help": "Digits the judge trains on (rest held out)."})
    judge_epochs: int = field(default=6, metadata={"help": "Judge training epochs."})
    judge_batch_size: int = field(default=128, metadata={"help": "Judge batch size."})
    judge_lr: float = field(default=3e-3, metadata={"help": "Judge peak learning rate (AdamW, one-cycle)."})
    # VAE
    vae_epochs: int = field(default=2, metadata={"help": "VAE training epochs over the 10,000 digits."})
    vae_batch_size: int = field(default=64, metadata={"help": "VAE batch size."})
    vae_lr: float = field(default=2e-3, metadata={"help": "VAE peak learning rate (AdamW, cosine)."})
    vae_kl_weight: float = field(default=1e-5, metadata={
        "help": "Weight of the KL term (per latent element) against the per-pixel L1+L2 reconstruction loss."})
    # text encoder + U-Net
    unet_steps: int = field(default=1600, metadata={"help": "Joint text-encoder/U-Net optimisation steps."})
    unet_batch_size: int = field(default=64, metadata={"help": "Diffusion batch size."})
    unet_lr: float = field(default=1e-3, metadata={"help": "Diffusion peak learning rate (AdamW, warmup + cosine)."})
    ema_decay: float = field(default=0.995, metadata={"help": "EMA decay of the saved diffusion weights."})
    cond_dropout: float = field(default=0.1, metadata={"help": "Share of empty prompts (classifier-free guidance)."})
    snr_gamma: float = field(default=5.0, metadata={"help": "Min-SNR loss weighting gamma (0 = plain MSE)."})
    # evaluation
    eval_n_per_digit: int = field(default=50, metadata={"help": "Generated images per digit for the quality gate."})


# ------------------------------------------------------------------------------------------------------- models
def build_models(tokenizer):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 16, 32], layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16)
    return vae, text_encoder, unet


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def random_affine(x: torch.Tensor, gen: torch.Generator, max_deg=12.0, max_shift=0.15, scale=(0.9, 1.1)):
    """Random rotation / scale / shift of a batch [N, C, H, W] (background 0), as judge augmentation."""
    n = x.shape[0]
    ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(max_deg)
    s = torch.empty(n).uniform_(*scale, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * max_shift
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


# ------------------------------------------------------------------------------------------------------ phases
def train_judge(cfg, grey: torch.Tensor, labels: torch.Tensor, train_idx, gen) -> DigitJudge:
    torch.manual_seed(cfg.seed)
    judge = DigitJudge()
    judge.config["train_split"] = {"seed": cfg.seed, "n_train": len(train_idx), "n_total": len(labels)}
    x_tr, y_tr = grey[train_idx], labels[train_idx]
    steps_per_epoch = math.ceil(len(x_tr) / cfg.judge_batch_size)
    total = cfg.judge_epochs * steps_per_epoch
    opt = torch.optim.AdamW(judge.parameters(), lr=cfg.judge_lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.judge_lr, total_steps=total)
    judge.train()
    bar = tqdm(total=total, desc="judge")
    for _ in range(cfg.judge_epochs):
        perm = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(perm), cfg.judge_batch_size):
            idx = perm[i:i + cfg.judge_batch_size]
            loss = F.cross_entropy(judge(random_affine(x_tr[idx], gen)), y_tr[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return judge.eval()


def train_vae(cfg, vae, images: torch.Tensor, gen):
    steps_per_epoch = math.ceil(len(images) / cfg.vae_batch_size)
    total = cfg.vae_epochs * steps_per_epoch
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total, warmup=100))
    vae.train()
    bar = tqdm(total=total, desc="vae")
    for _ in range(cfg.vae_epochs):
        perm = torch.randperm(len(images), generator=gen)
        for i in range(0, len(perm), cfg.vae_batch_size):
            x = images[perm[i:i + cfg.vae_batch_size]]
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
            rec = vae.decode(z).sample
            rec_loss = F.mse_loss(rec, x) + F.l1_loss(rec, x)
            kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
            loss = rec_loss + cfg.vae_kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(rec=f"{rec_loss.item():.4f}", kl=f"{kl.item():.1f}")
    bar.close()
    return vae.eval()


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 500):
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch_size), desc="encode", leave=False):
        post = vae.encode(images[i:i + batch_size]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def ema_update(ema_params, params, decay: float):
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def train_diffusion(cfg, unet, text_encoder, tokenizer, lat_mean, lat_std, labels, scaling, gen):
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                beta_schedule="scaled_linear", clip_sample=False)
    alphas_cumprod = noise_sched.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    prompts = [digit_prompt(d) for d in range(10)] + [""]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, cfg.unet_steps, warmup=100))
    unet.train()
    text_encoder.train()
    perm, pos, running = torch.randperm(len(labels), generator=gen), 0, None
    bar = tqdm(range(cfg.unet_steps), desc="unet+text")
    for step in bar:
        if pos + cfg.unet_batch_size > len(perm):
            perm, pos = torch.randperm(len(labels), generator=gen), 0
        idx = perm[pos:pos + cfg.unet_batch_size]
        pos += cfg.unet_batch_size
        b = len(idx)
        z = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scaling
        prompt_idx = torch.where(torch.rand(b, generator=gen) < cfg.cond_dropout, 10, labels[idx])
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, 1000, (b,), generator=gen)
        cond = text_encoder(ids)[0][prompt_idx]
        pred = unet(noise_sched.add_noise(z, noise, t), t, cond).sample
        loss = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        if cfg.snr_gamma > 0:
            loss = loss * torch.clamp(snr[t], max=cfg.snr_gamma) / snr[t]
        loss = loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_update(ema_params, params, min(cfg.ema_decay, (1 + step) / (10 + step)))
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
    return ema_unet, ema_text


def unet_step_ms(unet, text_encoder, batch_size: int = 16, repeats: int = 10) -> dict:
    """Median wall time of one U-Net forward+backward (and forward only) at ``batch_size``."""
    unet.train()
    x = torch.randn(batch_size, 4, 8, 8)
    t = torch.randint(0, 1000, (batch_size,))
    cond = torch.randn(batch_size, text_encoder.config.max_position_embeddings, text_encoder.config.hidden_size)
    fb, fw = [], []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        unet(x, t, cond).sample.pow(2).mean().backward()
        t1 = time.perf_counter()
        with torch.no_grad():
            unet(x, t, cond)
        if i >= 2:
            fb.append(t1 - t0)
            fw.append(time.perf_counter() - t1)
    unet.zero_grad(set_to_none=True)
    unet.eval()
    return {"fwd_bwd_ms": 1000 * float(np.median(fb)), "fwd_ms": 1000 * float(np.median(fw)),
            "batch_size": batch_size}


def replace_dir(src: str, dst: str) -> None:
    """Move the finished folder ``src`` over ``dst`` (old one removed only once the new one is in place)."""
    old = None
    if os.path.exists(dst):
        old = dst + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    if old:
        shutil.rmtree(old)


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


# -------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(DigitWorldConfig).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    times, t_start = {}, time.perf_counter()
    os.makedirs(cfg.output_dir, exist_ok=True)

    raw, labels_np = load_mnist(cfg.mnist_dir, split="test")
    raw, labels_np = raw[:cfg.max_images], labels_np[:cfg.max_images]
    images = mnist_images(raw)  # [N, 3, 32, 32] in [-1, 1]
    labels = torch.from_numpy(labels_np)
    grey = (images[:, :1] + 1) / 2
    logger.info("MNIST: %d digits", len(labels))

    # (1) judge
    t0 = time.perf_counter()
    train_idx, held_idx = judge_split(len(labels), cfg.seed, cfg.judge_train_size)
    judge = train_judge(cfg, grey, labels, train_idx, gen)
    judge_held = float((judge.predict(grey[held_idx]) == labels[held_idx]).float().mean())
    judge_train = float((judge.predict(grey[train_idx]) == labels[train_idx]).float().mean())
    times["judge_s"] = time.perf_counter() - t0
    logger.info("judge: held-out accuracy %.4f (train %.4f), %.0fs", judge_held, judge_train, times["judge_s"])

    # (2) VAE
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer = build_word_tokenizer(PROMPT_WORDS, tok_dir)
    torch.manual_seed(cfg.seed)
    vae, text_encoder, unet = build_models(tokenizer)
    vae = train_vae(cfg, vae, images, gen)
    lat_mean, lat_std = encode_latents(vae, images)
    with torch.no_grad():
        recon = torch.cat([vae.decode(lat_mean[i:i + 500]).sample for i in range(0, len(images), 500)])
    vae_rec_mse = float(F.mse_loss(recon, images))
    judge_on_recon = float((judge.predict(((recon[held_idx] + 1) / 2).clamp(0, 1)) == labels[held_idx]).float().mean())
    latent_std = float((lat_mean + lat_std * torch.randn(lat_mean.shape, generator=gen)).std())
    scaling = 1.0 / latent_std
    vae.register_to_config(scaling_factor=scaling)
    times["vae_s"] = time.perf_counter() - t0
    logger.info("vae: reconstruction mse %.4f, judge on held-out reconstructions %.4f, latent std %.3f, %.0fs",
                vae_rec_mse, judge_on_recon, latent_std, times["vae_s"])

    # (3) text encoder + U-Net
    t0 = time.perf_counter()
    ema_unet, ema_text = train_diffusion(cfg, unet, text_encoder, tokenizer, lat_mean, lat_std, labels, scaling, gen)
    times["diffusion_s"] = time.perf_counter() - t0

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=ema_text, tokenizer=tokenizer, unet=ema_unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    # save (each folder written aside, then moved into place)
    sd_dir, judge_dir = os.path.join(cfg.output_dir, "digit-sd"), os.path.join(cfg.output_dir, "digit-judge")
    tmp_root = tempfile.mkdtemp(prefix=".tmp-digit-world-", dir=cfg.output_dir)
    pipe.save_pretrained(os.path.join(tmp_root, "digit-sd"), safe_serialization=True)
    # transformers 5 saves only tokenizer.json; write vocab.json + merges.txt (same ids) so transformers 4 loads it too
    shutil.rmtree(os.path.join(tmp_root, "digit-sd", "tokenizer"))
    build_word_tokenizer(PROMPT_WORDS, os.path.join(tmp_root, "digit-sd", "tokenizer"))
    judge.save_pretrained(os.path.join(tmp_root, "digit-judge"))
    replace_dir(os.path.join(tmp_root, "digit-sd"), sd_dir)
    replace_dir(os.path.join(tmp_root, "digit-judge"), judge_dir)
    shutil.rmtree(tmp_root)
    times["train_total_s"] = time.perf_counter() - t_start

    # evaluation of the saved pipeline
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir)
    pipe.set_progress_bar_config(disable=True)
    judge = DigitJudge.from_pretrained(judge_dir)
    quality = judge_accuracy(pipe, judge, n_per_digit=cfg.eval_n_per_digit, seed=cfg.seed, batch_size=100)
    times["quality_eval_s"] = time.perf_counter() - t0
    cost = unet_step_ms(copy.deepcopy(pipe.unet), pipe.text_encoder)
    times["total_s"] = time.perf_counter() - t_start
    metrics = {
        "command": "python scripts/train_digit_world.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": asdict(cfg),
        "judge": {"heldout_accuracy": judge_held, "train_accuracy": judge_train, "n_heldout": len(held_idx),
                  "n_train": len(train_idx), "params": n_params(judge)},
        "vae": {"reconstruction_mse": vae_rec_mse, "judge_accuracy_on_heldout_reconstructions": judge_on_recon,
                "scaling_factor": scaling, "params": n_params(pipe.vae)},
        "generation": {"sampling": DIGIT_SAMPLING, **quality},
        "unet": {"params": n_params(pipe.unet), **cost},
        "text_encoder": {"params": n_params(pipe.text_encoder)},
        "asset_bytes": {"digit-sd": dir_size(sd_dir), "digit-judge": dir_size(judge_dir)},
        "times_s": {k: round(v, 1) for k, v in times.items()},
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                     "transformers": __import__("transformers").__version__},
    }
    write_json(os.path.join(cfg.output_dir, "digit-world-metrics.json"), metrics)

    per_digit = " ".join(f"{d}:{a:.2f}" for d, a in quality["per_digit"].items())
    print(f"judge held-out accuracy: {judge_held:.4f} ({len(held_idx)} digits)")
    print(f"generated digits judged correct ({cfg.eval_n_per_digit}/digit, {DIGIT_SAMPLING}): "
          f"mean {quality['mean']:.3f}, min {quality['min']:.3f}")
    print(f"per digit: {per_digit}")
    print(f"U-Net: {n_params(pipe.unet) / 1e6:.2f}M params, fwd+bwd {cost['fwd_bwd_ms']:.1f} ms, "
          f"fwd {cost['fwd_ms']:.1f} ms at batch 16")
    print(f"assets: digit-sd {metrics['asset_bytes']['digit-sd'] / 1e6:.2f} MB, "
          f"digit-judge {metrics['asset_bytes']['digit-judge'] / 1e6:.2f} MB")
    print(f"time: {times['total_s']:.0f}s total ({', '.join(f'{k} {v:.0f}s' for k, v in times.items())})")
    return metrics


if __name__ == "__main__":
    main()
