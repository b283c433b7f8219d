"""Quick digit-world run of the peer methods (ESD-x, ESD-u, UCE, AdvUnlearn): erase one digit with a few settings each,
judge it (unlearning accuracy, retained accuracy drop) and time it. A first coarse tune, not the benchmark
(benchmarks/bench_peers.py is that).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python scripts/try_methods.py --digit 7 --output out/try-methods.jsonl

Each setting starts from a fresh copy of the bundled digit pipeline (salun_diffusers/assets/digit-sd); one process,
one thread. Every finished setting is appended to ``--output`` as a JSON line, so a killed run keeps what it did.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from typing import Dict, List

import torch

from salun_diffusers.attacks import encode_prompt
from salun_diffusers.concepts import digit_prompt
from salun_diffusers.digits import load_digit_pipeline
from salun_diffusers.methods import (AdvUnlearnConfig, EsdConfig, UceConfig, apply_uce, train_advunlearn, train_esd,
                                     uce_edit)
from salun_diffusers.reporting import digit_verdict

# Coarse grid on the digit world (at most 4 settings per method). The digit U-Net is 1.0M weights, its text encoder
# 0.14M: the SD1.4 learning rates (1e-5) barely move them in a few hundred steps, so the grid climbs from there.
# Partial sampling uses 10 DDIM steps (the digit model's verdict steps) instead of 50, for time.
SETTINGS: Dict[str, List[dict]] = {
    "esd-x": [dict(learning_rate=1e-4, iterations=300), dict(learning_rate=1e-3, iterations=300),
              dict(learning_rate=3e-3, iterations=300)],
    "esd-u": [dict(learning_rate=1e-5, iterations=300), dict(learning_rate=1e-4, iterations=300),
              dict(learning_rate=1e-3, iterations=300), dict(learning_rate=3e-4, iterations=300)],
    "uce": [dict(guide="", preserve_scale=0.1), dict(guide="", preserve_scale=1.0),
            dict(guide="next", preserve_scale=0.1), dict(guide="next", preserve_scale=1.0)],
    "advunlearn": [dict(learning_rate=1e-4, iterations=100, warmup=20, retain_weight=0.3),
                   dict(learning_rate=1e-3, iterations=100, warmup=20, retain_weight=0.3),
                   dict(learning_rate=1e-3, iterations=100, warmup=20, retain_weight=1.0),
                   dict(learning_rate=1e-3, iterations=200, warmup=40, retain_weight=1.0)],
}
DIGIT_SAMPLING_STEPS = 10


def run_one(method: str, setting: dict, digit: int, seed: int) -> dict:
    pipe = load_digit_pipeline()
    prompt = digit_prompt(digit)
    others = [digit_prompt(d) for d in range(10) if d != digit]
    gen = torch.Generator().manual_seed(seed)
    wall, cpu = time.perf_counter(), time.process_time()
    if method in ("esd-x", "esd-u"):
        config = EsdConfig(variant=method, num_inference_steps=DIGIT_SAMPLING_STEPS, **setting)
        base = copy.deepcopy(pipe.unet).requires_grad_(False)
        train_esd(pipe.unet, base, pipe.scheduler, encode_prompt(pipe, prompt), encode_prompt(pipe, ""), config,
                  generator=gen)
    elif method == "uce":
        options = dict(setting)
        guide = digit_prompt((digit + 1) % 10) if options.pop("guide") == "next" else ""
        config = UceConfig(**options)
        apply_uce(pipe.unet, uce_edit(pipe.unet, pipe.tokenizer, pipe.text_encoder, [prompt], [guide], others, config))
    elif method == "advunlearn":
        config = AdvUnlearnConfig(num_inference_steps=DIGIT_SAMPLING_STEPS, attack_steps=5, **setting)
        train_advunlearn(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, prompt, others, config,
                         generator=gen)
    else:
        raise ValueError(f"unknown method {method!r}")
    seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
    pipe.unet.eval()
    pipe.text_encoder.eval()
    verdict = digit_verdict(load_digit_pipeline(), pipe, digit)
    return {"method": method, "setting": setting, "config": config.to_dict(), "digit": digit,
            "unlearning_accuracy": verdict["after"]["unlearning_accuracy"],
            "retained_accuracy": verdict["after"]["retained_accuracy"], "retained_drop": verdict["retained_drop"],
            "per_digit_accuracy": verdict["after"]["per_digit_accuracy"], "seconds": seconds,
            "cpu_seconds": cpu_seconds, "threads": torch.get_num_threads(), "line": verdict["line"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--digit", type=int, default=7)
    parser.add_argument("--methods", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--index", type=int, nargs="+", default=None,
                        help="run only these settings (0-based positions in each method's list); default: all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="out/try-methods.jsonl")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    for method in args.methods:
        for i, setting in enumerate(SETTINGS[method]):
            if args.index is not None and i not in args.index:
                continue
            row = run_one(method, setting, args.digit, args.seed)
            with open(args.output, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{method:10s} {json.dumps(setting):70s} UA {row['unlearning_accuracy']:6.1%}  drop "
                  f"{row['retained_drop'] * 100:+5.1f} pts  {row['seconds']:6.1f} s (cpu {row['cpu_seconds']:.1f})",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
