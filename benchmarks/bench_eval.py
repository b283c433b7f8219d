#!/usr/bin/env python
"""Speed of the audit's two stages, on any device: image generation and NudeNet detection (images/s).

    python benchmarks/bench_eval.py                                     # tiny config-built pipeline, anywhere
    python benchmarks/bench_eval.py --model CompVis/stable-diffusion-v1-4 --device cuda --mixed_precision fp16 \
        --num_images 32 --batch_size 8 --num_inference_steps 50       # a real model (hub id or folder)

Generation runs ``generate_images`` (seeded per row, PNGs written atomically) on ``--num_images`` prompts after one
warm-up batch; NudeNet runs on the generated files and on ``--nudenet_size`` px noise images (NudeNet resizes
to 320 px, so the input size mostly costs decoding). Prints a summary and writes JSON (``--output``).
Timings never belong in tests; they belong here.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from salun_diffusers.evaluation.generate import generate_images, image_path  # noqa: E402
from salun_diffusers.evaluation.prompts import PromptRow  # noqa: E402
from salun_diffusers.utils import resolve_dtype, write_json  # noqa: E402

PROMPTS = ("a photo of a person wearing clothes", "a church in the countryside", "a painting of a dog",
           "a tench swimming in a pond")


def load_pipe(model: str, device, dtype):
    if model == "tiny":
        from salun_diffusers.testing import get_dummy_pipeline

        pipe = get_dummy_pipeline()
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if model == "tiny" and dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    return pipe.to(device)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_generation(pipe, args, work: str) -> dict:
    rows = [PromptRow(str(i), PROMPTS[i % len(PROMPTS)], 1000 + i) for i in range(args.num_images)]
    warm = [PromptRow(f"warm{i}", PROMPTS[0], i) for i in range(args.batch_size)]
    kwargs = dict(batch_size=args.batch_size, num_inference_steps=args.num_inference_steps,
                  resolution=args.resolution, show_progress=False)
    generate_images(pipe, warm, os.path.join(work, "warm"), **kwargs)
    sync(args.device)
    start = time.perf_counter()
    generate_images(pipe, rows, os.path.join(work, "images"), **kwargs)
    sync(args.device)
    seconds = time.perf_counter() - start
    size = Image.open(image_path(os.path.join(work, "images"), rows[0])).size
    return {"images": len(rows), "seconds": seconds, "images_per_s": len(rows) / seconds, "size": list(size)}


def bench_nudenet(paths, label) -> dict:
    from salun_diffusers.evaluation.nudenet import NudeNetDetector

    start = time.perf_counter()
    detector = NudeNetDetector()
    load = time.perf_counter() - start
    detector(paths[0])  # warm-up
    start = time.perf_counter()
    for p in paths:
        detector(p)
    seconds = time.perf_counter() - start
    return {"inputs": label, "images": len(paths), "load_seconds": load, "seconds": seconds,
            "images_per_s": len(paths) / seconds}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (config-built, no download), a hub id or a folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--num_images", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=None, help="image size (default: the model's)")
    parser.add_argument("--nudenet_size", type=int, default=512, help="side of the noise images NudeNet also runs on")
    parser.add_argument("--skip_nudenet", action="store_true")
    parser.add_argument("--num_threads", type=int, default=None,
                        help="torch CPU threads (1 is fastest for the tiny model on a busy machine)")
    parser.add_argument("--output", default="out/bench_eval.json")
    args = parser.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    dtype = resolve_dtype(args.mixed_precision)
    result = {"model": args.model, "device": args.device, "mixed_precision": args.mixed_precision,
              "num_inference_steps": args.num_inference_steps, "batch_size": args.batch_size,
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
              "gpu": torch.cuda.get_device_name(0) if torch.device(args.device).type == "cuda" else None}
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as work:
        pipe = load_pipe(args.model, args.device, dtype)
        result["generation"] = bench_generation(pipe, args, work)
        del pipe
        if not args.skip_nudenet:
            generated = [os.path.join(work, "images", f"{i}.png") for i in range(args.num_images)]
            result["nudenet_generated"] = bench_nudenet(generated, "generated images")
            rng = np.random.default_rng(0)
            noise = []
            for i in range(args.num_images):
                path = os.path.join(work, f"noise{i}.png")
                Image.fromarray(rng.integers(0, 256, (args.nudenet_size, args.nudenet_size, 3),
                                             dtype=np.uint8)).save(path)
                noise.append(path)
            result["nudenet_noise"] = bench_nudenet(noise, f"{args.nudenet_size}px noise PNGs")
    write_json(args.output, result)
    g = result["generation"]
    print(f"generation: {g['images_per_s']:.3f} images/s ({g['images']} images {g['size'][0]}x{g['size'][1]}, "
          f"{args.num_inference_steps} steps, batch {args.batch_size}, {args.model} on {args.device})")
    for key in ("nudenet_generated", "nudenet_noise"):
        if key in result:
            n = result[key]
            print(f"nudenet ({n['inputs']}): {n['images_per_s']:.2f} images/s "
                  f"(detector load {n['load_seconds']:.2f} s)")
    print(f"written to {args.output}")
    return result


if __name__ == "__main__":
    main()
