#!/usr/bin/env python
"""Train the flow-matching "digit world": a tiny Stable Diffusion 3 pipeline on real MNIST digits (CPU, one thread).

    python scripts/train_flow_digit_world.py --output_dir salun_diffusers/assets --seed 0

It reuses the U-Net digit world's VAE (``assets/digit-sd/vae``, 32x32 RGB <-> 4x8x8 latents, with ``shift_factor``
0.0 added to its config as SD3 decodes ``z / scaling_factor + shift_factor``), its tokenizer's vocabulary and its
judge (``assets/digit-judge``), and trains two tiny ``CLIPTextModelWithProjection`` text encoders (``text_encoder``,
``text_encoder_2``; no T5: ``text_encoder_3=None``, so the pipeline fills the T5 part of the prompt with zeros) jointly
with an ``SD3Transformer2DModel`` by rectified flow (``salun_diffusers.flow_matching``): ``x_t = (1 - sigma) x0 +
sigma noise``, target ``noise - x0``, sigmas logit-normal (mean 0, std 1) shifted by the scheduler's ``shift``,
prompts "a handwritten digit seven" with 10% empty prompts for classifier-free guidance, conditioning through the
pipeline's own ``encode_prompt``, and an EMA of the weights. The digits are then drawn by the standard
``StableDiffusion3Pipeline.__call__`` (``SD3_DIGIT_SAMPLING``) and judged. It writes ``digit-sd3/``
(``StableDiffusion3Pipeline.save_pretrained``) and ``digit-sd3-metrics.json``.

Sampling must pass ``max_sequence_length`` (the T5 length, 256 by default in the pipeline) as trained: the zero T5
tokens take part in the joint attention, so their count matters (``SD3_DIGIT_SAMPLING`` has it; measured on the
shipped world, 10 images per digit: 100% judged right at 8 (and at 1), 66% mean / 10% worst digit at the default 256).

Shipped world (seed 0, defaults): 1800 steps in 1221 s of training on 1 thread beside other jobs (22 min in all),
500/500 generated digits judged right; 3.6 MB.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/: the U-Net world's trainer

from salun_diffusers.data import load_mnist  # noqa: E402
from salun_diffusers.digits import (  # noqa: E402
    ASSETS_DIR, DIGIT_PIPELINE_DIR, DigitJudge, digit_prompt, judge_accuracy, mnist_images)
from salun_diffusers.flow_matching import (  # noqa: E402
    encode_flow_prompts, flow_matching_loss, model_latents, noisy_latents, predict_velocity, sample_sigmas)
from salun_diffusers.tokenizer import build_word_tokenizer  # noqa: E402
from salun_diffusers.utils import write_json  # noqa: E402

from train_digit_world import (  # noqa: E402
    PROMPT_WORDS, cosine_lr, dir_size, ema_update, encode_latents, n_params, replace_dir)

logger = logging.getLogger("train_flow_digit_world")
# T5 length the world is trained (and must be sampled) with: the zero T5 tokens join the attention.
SD3_MAX_SEQUENCE_LENGTH = 8
SD3_DIGIT_SAMPLING = {"num_inference_steps": 20, "guidance_scale": 4.0, "height": 32, "width": 32,
                      "max_sequence_length": SD3_MAX_SEQUENCE_LENGTH}


@dataclass
class FlowDigitWorldConfig:
    output_dir: str = field(default="salun_diffusers/assets", metadata={
        "help": "Folder receiving digit-sd3/ and digit-sd3-metrics.json (replaced if present)."})
    mnist_dir: Optional[str] = field(default=None, metadata={
        "help": "Folder with t10k-images-idx3-ubyte.gz / t10k-labels-idx1-ubyte.gz (default ../shared/data/mnist)."})
    max_images: Optional[int] = field(default=None, metadata={
        "help": "Use only the first N digits (smoke tests); default all 10,000."})
    vae_dir: str = field(default=os.path.join(DIGIT_PIPELINE_DIR, "vae"), metadata={
        "help": "AutoencoderKL reused (default: the U-Net digit world's)."})
    judge_dir: str = field(default=os.path.join(ASSETS_DIR, "digit-judge"), metadata={"help": "Digit judge."})
    seed: int = field(default=0, metadata={"help": "Seed for initialisation, batches, sigmas and noise."})
    num_threads: int = field(default=1, metadata={"help": "torch CPU threads."})
    device: str = field(default="cpu", metadata={
        "help": "Torch device (the shipped world is trained on CPU; cuda only speeds up size/steps searches)."})
    text_max_length: int = field(default=16, metadata={
        "help": "CLIP tokenizer model_max_length (same vocabulary as digit-sd's tokenizer; prompts are 6 tokens)."})
    # model size
    num_layers: int = field(default=4, metadata={"help": "SD3 transformer joint blocks."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads (head dim 16)."})
    head_dim: int = field(default=16, metadata={"help": "Attention head dimension."})
    text_hidden: int = field(default=32, metadata={"help": "Hidden size of each CLIP text encoder."})
    # training
    steps: int = field(default=1800, metadata={"help": "Optimisation steps."})
    batch_size: int = field(default=64, metadata={"help": "Batch size."})
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate (AdamW, warmup + cosine)."})
    ema_decay: float = field(default=0.995, metadata={"help": "EMA decay of the saved weights."})
    cond_dropout: float = field(default=0.1, metadata={"help": "Share of empty prompts (classifier-free guidance)."})
    shift: float = field(default=1.0, metadata={
        "help": "FlowMatchEulerDiscreteScheduler shift (SD3 uses 3.0 at 1024 px; 8x8 latents need none)."})
    sigma_scheme: str = field(default="logit_normal", metadata={"help": "logit_normal (SD3's default) or uniform."})
    # evaluation
    eval_n_per_digit: int = field(default=50, metadata={"help": "Generated images per digit for the quality gate."})
    no_save: bool = field(default=False, metadata={"help": "Only train and judge (size/steps search)."})


def build_pipeline(cfg, tokenizer, vae):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    def clip(seed):
        torch.manual_seed(seed)
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
            projection_dim=cfg.text_hidden, num_hidden_layers=3, num_attention_heads=2, hidden_act="gelu",
            max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))

    text_encoder, text_encoder_2 = clip(cfg.seed), clip(cfg.seed + 1)
    torch.manual_seed(cfg.seed + 2)
    inner = cfg.num_heads * cfg.head_dim
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=cfg.num_layers,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads, joint_attention_dim=2 * cfg.text_hidden,
        caption_projection_dim=inner, pooled_projection_dim=2 * cfg.text_hidden, pos_embed_max_size=8)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                    tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)


def train(cfg, pipe, x0_mean, x0_std, labels, gen):
    """Joint text-encoder/transformer flow-matching training; returns the EMA copies of the three modules."""
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    emas = [copy.deepcopy(m).eval() for m in modules]
    params = [p for m in modules for p in m.parameters()]
    ema_params = [p for m in emas for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, cfg.steps, warmup=100))
    for m in modules:
        m.train()
    prompts = [digit_prompt(d) for d in range(10)] + [""]
    perm, pos, running = torch.randperm(len(labels), generator=gen), 0, None
    bar = tqdm(range(cfg.steps), desc="sd3 transformer+text")
    for step in bar:
        if pos + cfg.batch_size > len(perm):
            perm, pos = torch.randperm(len(labels), generator=gen), 0
        idx = perm[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        b = len(idx)
        eps = torch.randn(x0_mean[idx].shape, generator=gen).to(cfg.device)  # drawn on CPU: same on any device
        x0 = model_latents(pipe.vae, x0_mean[idx] + x0_std[idx] * eps)
        prompt_idx = torch.where(torch.rand(b, generator=gen) < cfg.cond_dropout, 10, labels[idx]).to(cfg.device)
        cond = encode_flow_prompts(pipe, prompts, max_sequence_length=SD3_MAX_SEQUENCE_LENGTH).index(prompt_idx)
        noise = torch.randn(x0.shape, generator=gen).to(cfg.device)
        sigmas = sample_sigmas(pipe.scheduler, b, generator=gen, scheme=cfg.sigma_scheme, device=cfg.device)
        pred = predict_velocity(pipe, noisy_latents(x0, noise, sigmas), sigmas, cond)
        loss = flow_matching_loss(pred, x0, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_update(ema_params, params, min(cfg.ema_decay, (1 + step) / (10 + step)))
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
    return emas, running


def main(argv=None) -> dict:
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(FlowDigitWorldConfig).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if cfg.sigma_scheme not in ("logit_normal", "uniform"):
        raise SystemExit(f"error: --sigma_scheme must be logit_normal or uniform, got {cfg.sigma_scheme!r}")
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    times, t_start = {}, time.perf_counter()

    raw, labels_np = load_mnist(cfg.mnist_dir, split="test")
    images, labels = mnist_images(raw[:cfg.max_images]), torch.from_numpy(labels_np[:cfg.max_images])
    vae = AutoencoderKL.from_pretrained(cfg.vae_dir).eval()
    vae.register_to_config(shift_factor=0.0)  # SD3 decodes z / scaling_factor + shift_factor
    vae.requires_grad_(False)
    lat_mean, lat_std = encode_latents(vae, images)
    vae.to(cfg.device)
    lat_mean, lat_std = lat_mean.to(cfg.device), lat_std.to(cfg.device)
    times["encode_s"] = time.perf_counter() - t_start
    logger.info("MNIST: %d digits encoded to latents %s in %.0fs", len(labels), tuple(lat_mean.shape[1:]),
                times["encode_s"])

    tok_dir = tempfile.mkdtemp(prefix="salun-sd3-tok-")
    tokenizer = build_word_tokenizer(PROMPT_WORDS, tok_dir, model_max_length=cfg.text_max_length)
    pipe = build_pipeline(cfg, tokenizer, vae).to(cfg.device)
    pipe.set_progress_bar_config(disable=True)

    t0 = time.perf_counter()
    (ema_tr, ema_te, ema_te2), final_loss = train(cfg, pipe, lat_mean, lat_std, labels, gen)
    times["train_s"] = time.perf_counter() - t0
    pipe = StableDiffusion3Pipeline(transformer=ema_tr, scheduler=pipe.scheduler, vae=vae, text_encoder=ema_te,
                                    tokenizer=tokenizer, text_encoder_2=ema_te2, tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)

    out_dir = os.path.join(cfg.output_dir, "digit-sd3")
    if not cfg.no_save:
        os.makedirs(cfg.output_dir, exist_ok=True)
        tmp_root = tempfile.mkdtemp(prefix=".tmp-digit-sd3-", dir=cfg.output_dir)
        pipe.save_pretrained(os.path.join(tmp_root, "digit-sd3"), safe_serialization=True)
        for name in ("tokenizer", "tokenizer_2"):  # vocab.json + merges.txt (transformers 4 and 5 load them)
            shutil.rmtree(os.path.join(tmp_root, "digit-sd3", name))
            build_word_tokenizer(PROMPT_WORDS, os.path.join(tmp_root, "digit-sd3", name),
                                 model_max_length=cfg.text_max_length)
        replace_dir(os.path.join(tmp_root, "digit-sd3"), out_dir)
        shutil.rmtree(tmp_root)
        pipe = StableDiffusion3Pipeline.from_pretrained(  # judge what was saved (no T5: pass None)
            out_dir, text_encoder_3=None, tokenizer_3=None).to(cfg.device)
        pipe.set_progress_bar_config(disable=True)
    shutil.rmtree(tok_dir)

    t0 = time.perf_counter()
    judge = DigitJudge.from_pretrained(cfg.judge_dir, device=cfg.device)
    quality = judge_accuracy(pipe, judge, n_per_digit=cfg.eval_n_per_digit, seed=cfg.seed, batch_size=100,
                             **SD3_DIGIT_SAMPLING)
    times["quality_eval_s"] = time.perf_counter() - t0
    times["total_s"] = time.perf_counter() - t_start
    metrics = {
        "command": "python scripts/train_flow_digit_world.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": asdict(cfg),
        "objective": {"kind": "rectified flow (velocity noise - x0)", "sigma_scheme": cfg.sigma_scheme,
                      "scheduler_shift": cfg.shift, "final_loss_ema98": final_loss},
        "generation": {"pipeline": "StableDiffusion3Pipeline.__call__", "sampling": SD3_DIGIT_SAMPLING, **quality},
        "params": {"transformer": n_params(pipe.transformer), "text_encoder": n_params(pipe.text_encoder),
                   "text_encoder_2": n_params(pipe.text_encoder_2), "vae (reused)": n_params(pipe.vae)},
        "asset_bytes": {"digit-sd3": dir_size(out_dir) if not cfg.no_save else None},
        "times_s": {k: round(v, 1) for k, v in times.items()},
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                     "transformers": __import__("transformers").__version__},
    }
    if not cfg.no_save:
        write_json(os.path.join(cfg.output_dir, "digit-sd3-metrics.json"), metrics)
    per_digit = " ".join(f"{d}:{a:.2f}" for d, a in quality["per_digit"].items())
    print(f"generated digits judged correct ({cfg.eval_n_per_digit}/digit, {SD3_DIGIT_SAMPLING}): "
          f"mean {quality['mean']:.3f}, min {quality['min']:.3f}")
    print(f"per digit: {per_digit}")
    print(f"transformer {n_params(pipe.transformer) / 1e6:.2f}M params, text encoders "
          f"{(n_params(pipe.text_encoder) + n_params(pipe.text_encoder_2)) / 1e6:.2f}M; final loss {final_loss:.4f}")
    if not cfg.no_save:
        print(f"asset: {out_dir} {metrics['asset_bytes']['digit-sd3'] / 1e6:.2f} MB")
    print(f"time: {times['total_s']:.0f}s total ({', '.join(f'{k} {v:.0f}s' for k, v in times.items())}), "
          f"{torch.get_num_threads()} thread(s)")
    return metrics


if __name__ == "__main__":
    main()
