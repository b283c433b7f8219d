#!/usr/bin/env python
"""Retrained references: the digit world's text encoder and U-Net retrained from scratch on MNIST without one digit.

    OMP_NUM_THREADS=1 python benchmarks/build_references.py --digits 2,7 --output_dir benchmarks/cache/references
    OMP_NUM_THREADS=1 python benchmarks/build_references.py --digits 0,1,2,3,4,5,6,7,8,9 --jobs 10   # a big machine

The way unlearning is judged: a model that never learned the digit. Each reference keeps the bundled pipeline's VAE,
tokenizer and scheduler and retrains the CLIP text encoder and ``UNet2DConditionModel`` exactly as
``scripts/train_digit_world.py`` does (its ``build_models`` / ``encode_latents`` / ``train_diffusion``, imported, same
settings: 1,600 steps, batch 64, EMA), on the 10,000 MNIST test digits minus every image of the left-out digit
(10% empty prompts as for the base). One seed (``--seed``). Each is written as ``<output_dir>/without-<digit>/`` (an
ordinary ``StableDiffusionPipeline`` folder, loadable like the bundled one) with ``reference.json``: the judged
per-digit accuracy of its images (``judge_accuracy``, ``--n_per_digit`` images per digit, the bundled judge), the
command, threads and times. A folder whose ``reference.json`` matches the settings is reused. ``--jobs N`` builds N
digits side by side, each process single-threaded. Not shipped and not committed (benchmarks/cache/ is ignored).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from salun_diffusers.data import load_mnist  # noqa: E402
from salun_diffusers.digits import (  # noqa: E402
    DIGIT_PIPELINE_DIR, DIGIT_SAMPLING, DigitJudge, judge_accuracy, load_digit_pipeline, mnist_images)
from salun_diffusers.utils import read_json_or_none, write_json  # noqa: E402
from scripts.train_digit_world import (  # noqa: E402
    DigitWorldConfig, build_models, encode_latents, replace_dir, train_diffusion)

logger = logging.getLogger("build_references")
DEFAULT_DIR = os.path.join("benchmarks", "cache", "references")


def reference_dir(output_dir: str, digit: int) -> str:
    """Where the reference that never learned ``digit`` lives."""
    return os.path.join(output_dir, f"without-{int(digit)}")


def load_reference(output_dir: str, digit: int, device="cpu"):
    """The reference pipeline for ``digit`` (progress bar off); OSError when it was not built."""
    from diffusers import StableDiffusionPipeline

    path = reference_dir(output_dir, digit)
    if not os.path.isfile(os.path.join(path, "reference.json")):
        raise OSError(f"no reference without digit {digit} in {path}: build it with "
                      f"python benchmarks/build_references.py --digits {digit} --output_dir {output_dir}")
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def settings(args, digit: int) -> dict:
    return {"digit": int(digit), "seed": args.seed, "unet_steps": args.unet_steps, "n_per_digit": args.n_per_digit,
            "max_images": args.max_images}


def build_one(args, digit: int) -> dict:
    """Train, save and judge the reference without ``digit`` (reused when already built with the same settings)."""
    from diffusers import StableDiffusionPipeline

    out = reference_dir(args.output_dir, digit)
    record = read_json_or_none(os.path.join(out, "reference.json"))
    if record and record.get("settings") == settings(args, digit):
        print(f"digit {digit}: reusing {out}")
        return record
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cfg = DigitWorldConfig(seed=args.seed, unet_steps=args.unet_steps, max_images=args.max_images)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * (digit + 1))
    base = load_digit_pipeline()
    raw, labels_np = load_mnist(args.mnist_dir, split="test")
    raw, labels_np = raw[:cfg.max_images], labels_np[:cfg.max_images]
    keep = labels_np != digit
    images, labels = mnist_images(raw[keep]), torch.from_numpy(labels_np[keep])
    lat_mean, lat_std = encode_latents(base.vae, images)  # the shipped VAE: the latents the base was trained on
    _, text_encoder, unet = build_models(base.tokenizer)  # fresh text encoder and U-Net (the VAE built here unused)
    ema_unet, ema_text = train_diffusion(cfg, unet, text_encoder, base.tokenizer, lat_mean, lat_std, labels,
                                         base.vae.config.scaling_factor, gen)
    train_s = time.perf_counter() - t0
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=ema_text, tokenizer=base.tokenizer, unet=ema_unet,
                                   scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    os.makedirs(args.output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-without-{digit}-", dir=args.output_dir)
    pipe.save_pretrained(os.path.join(tmp, "sd"), safe_serialization=True)
    shutil.rmtree(os.path.join(tmp, "sd", "tokenizer"))  # the bundled tokenizer files as shipped (transformers 4 too)
    shutil.copytree(os.path.join(DIGIT_PIPELINE_DIR, "tokenizer"), os.path.join(tmp, "sd", "tokenizer"))
    quality = judge_accuracy(pipe, DigitJudge.from_pretrained(), n_per_digit=args.n_per_digit, seed=args.eval_seed,
                             batch_size=100)
    others = [a for d, a in quality["per_digit"].items() if d != digit]
    record = {"settings": settings(args, digit), "digit": int(digit), "trained_on": int(keep.sum()),
              "per_digit_accuracy": quality["per_digit"], "left_out_accuracy": quality["per_digit"][int(digit)],
              "others_mean": sum(others) / len(others), "others_min": min(others), "sampling": DIGIT_SAMPLING,
              "eval_seed": args.eval_seed, "train_seconds": round(train_s, 1),
              "total_seconds": round(time.perf_counter() - t0, 1), "torch_threads": torch.get_num_threads(),
              "command": "python benchmarks/build_references.py " + " ".join(args.argv)}
    write_json(os.path.join(tmp, "sd", "reference.json"), record)
    replace_dir(os.path.join(tmp, "sd"), out)
    shutil.rmtree(tmp)
    print(f"digit {digit}: trained on {record['trained_on']} images in {train_s:.0f}s; judged (n={args.n_per_digit}) "
          f"left-out digit {record['left_out_accuracy']:.0%}, others mean {record['others_mean']:.1%} "
          f"(min {record['others_min']:.0%}); per digit "
          + " ".join(f"{d}:{a:.2f}" for d, a in quality["per_digit"].items()))
    return record


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9", help="comma-separated digits to leave out, one each")
    p.add_argument("--output_dir", default=DEFAULT_DIR, help="where without-<digit>/ folders are written")
    p.add_argument("--jobs", type=int, default=1, help="references built side by side (processes of 1 thread each)")
    p.add_argument("--seed", type=int, default=0, help="initialisation, batches and noise")
    p.add_argument("--unet_steps", type=int, default=DigitWorldConfig.unet_steps,
                   help="text encoder + U-Net steps (the base's 1,600)")
    p.add_argument("--n_per_digit", type=int, default=50, help="judged images per digit for reference.json")
    p.add_argument("--eval_seed", type=int, default=0, help="image i of digit d uses seed eval_seed + 1000*d + i")
    p.add_argument("--max_images", type=int, default=None, help="first N MNIST digits only (smoke tests)")
    p.add_argument("--mnist_dir", default=None, help="MNIST folder (default ../shared/data/mnist)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args.digit_list = [int(x) for x in args.digits.split(",") if x.strip()]
    except ValueError:
        p.error(f"--digits must be comma-separated digits, got {args.digits!r}")
    if not args.digit_list or any(not 0 <= d <= 9 for d in args.digit_list):
        p.error(f"--digits must name digits 0-9, got {args.digits!r}")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.jobs == 1 or len(args.digit_list) == 1:
        return [build_one(args, d) for d in args.digit_list]
    # side by side: one child process per digit (each 1 thread), at most --jobs at a time
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    passed, skip = [], False
    for a in args.argv:  # the other options, passed on to every child
        if skip or a.split("=")[0] in ("--jobs", "--digits"):
            skip = not skip and "=" not in a
            continue
        passed.append(a)
    pending, running, failed = list(args.digit_list), [], []
    while pending or running:
        while pending and len(running) < args.jobs:
            d = pending.pop(0)
            running.append((d, subprocess.Popen([sys.executable, os.path.abspath(__file__), "--digits", str(d),
                                                 *passed], env=env)))
        time.sleep(2)
        for d, proc in list(running):
            if proc.poll() is not None:
                running.remove((d, proc))
                if proc.returncode:
                    failed.append(d)
    if failed:
        raise SystemExit(f"references failed for digits {failed}")
    return [read_json_or_none(os.path.join(reference_dir(args.output_dir, d), "reference.json"))
            for d in args.digit_list]


if __name__ == "__main__":
    main()
