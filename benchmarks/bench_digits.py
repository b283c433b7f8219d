#!/usr/bin/env python
"""Erasure quality on the digit world: erase each digit from the bundled MNIST text-to-image model, judge it.

    python benchmarks/bench_digits.py --output_dir out/bench-digits                  # all digits, all ratios
    python benchmarks/bench_digits.py --digits 7 --ratios 0.5 --lora_ranks 4,16,64   # one digit

For every digit and mask ratio (0.5 is SalUn's default; 1.0 is the unmasked ESD-like fine-tune with the same loss),
the digit is erased with ``salun_diffusers.erase`` and the bundled judge scores images of all ten prompts:
UA (share of the erased digit's images not called that digit) and retained accuracy (accuracy on the other nine),
before and after, with wall time. The SalUn (ratio 0.5) erasure is also exported as LoRAs at --lora_ranks, loaded
with ``pipe.load_lora_weights`` and judged the same way. Writes report.json, report.md, samples.png (before/after
grid) and ratios.png (UA and retained accuracy against mask ratio) into --output_dir.
This is the digit world (a real model trained on real MNIST), not Stable Diffusion.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from salun_diffusers.concepts import DIGIT_WORDS  # noqa: E402
from salun_diffusers.config import EraseConfig  # noqa: E402
from salun_diffusers.digits import DigitJudge, generate_digits, load_digit_pipeline  # noqa: E402
from salun_diffusers.erase import erase  # noqa: E402
from salun_diffusers.lora import delta_to_lora, save_lora  # noqa: E402
from salun_diffusers.reporting import EVAL_SEED, digit_scores  # noqa: E402
from salun_diffusers.utils import write_json, write_text  # noqa: E402

logger = logging.getLogger("bench_digits")
SALUN_RATIO = 0.5


def _ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text):
    return [float(x) for x in text.split(",") if x.strip()]


def sample_grid(rows, path):
    """rows: list of (label, images [n, H, W, 3] in [0, 1]) -> one PNG, a row per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(imgs) for _, imgs in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.6 + 1.6, len(rows) * 0.62 + 0.3), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(imgs):
                ax.imshow(imgs[c])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ratio_plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({r["mask_ratio"] for r in runs})
    # average over the digits erased at every ratio, so each point covers the same digits
    common = set.intersection(*({r["digit"] for r in runs if r["mask_ratio"] == x} for x in ratios))
    runs = [r for r in runs if r["digit"] in common]
    ua = [np.mean([r["unlearning_accuracy"] for r in runs if r["mask_ratio"] == x]) for x in ratios]
    ra = [np.mean([r["retained_accuracy"] for r in runs if r["mask_ratio"] == x]) for x in ratios]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(ratios, [100 * v for v in ua], "o-", label="UA (erased digit)")
    ax.plot(ratios, [100 * v for v in ra], "s-", label="retained accuracy (other digits)")
    ax.set_xlabel("mask ratio (1.0 = unmasked, ESD-like)")
    ax.set_ylabel("%")
    ax.set_title(f"Digit world: erasure vs mask ratio (digits {', '.join(map(str, sorted(common)))})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", default="out/bench-digits")
    p.add_argument("--digits", type=_ints, default=list(range(10)))
    p.add_argument("--ratios", type=_floats, default=[0.1, 0.3, 0.5, 0.7, 1.0])
    p.add_argument("--sweep_digits", type=_ints, default=None,
                   help="digits the ratios other than 0.5 (SalUn) and 1.0 (unmasked) run on (default: all --digits)")
    p.add_argument("--lora_ranks", type=_ints, default=[4, 16, 64])
    p.add_argument("--lora_digits", type=_ints, default=None, help="digits whose SalUn erasure is exported as LoRAs "
                   "(default: all --digits)")
    p.add_argument("--n_per_digit", type=int, default=50, help="judged images per digit prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--erase_args", default="{}", help="JSON of extra EraseConfig fields, e.g. '{\"max_train_steps\": 100}'")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    cache = os.path.join(args.output_dir, "data-cache")
    judge = DigitJudge.from_pretrained()
    extra = json.loads(args.erase_args)

    t = time.perf_counter()
    base = load_digit_pipeline()
    base_acc = digit_scores(base, judge, 0, args.n_per_digit)["per_digit_accuracy"]  # judges all ten prompts
    print(f"base model: judge accuracy per digit {[round(base_acc[d], 2) for d in range(10)]} "
          f"({time.perf_counter() - t:.0f}s)")

    runs, loras, grid = [], [], []
    for d in args.digits:
        for ratio in args.ratios:
            if args.sweep_digits is not None and ratio not in (SALUN_RATIO, 1.0) and d not in args.sweep_digits:
                continue
            out = os.path.join(args.output_dir, "runs", f"{DIGIT_WORDS[d]}-r{ratio:g}")
            cfg = EraseConfig(concept=DIGIT_WORDS[d], mask_ratio=ratio, output_dir=out, cache_dir=cache,
                              overwrite_output_dir=True, seed=args.seed, save_merged_unet=False,
                              save_pipeline="none", **extra)
            t0 = time.perf_counter()
            result = erase(cfg, pipe=load_digit_pipeline())
            wall = time.perf_counter() - t0
            scores = digit_scores(result.pipeline, judge, d, args.n_per_digit)
            others_before = np.mean([base_acc[o] for o in range(10) if o != d])
            run = {"digit": d, "mask_ratio": ratio, "method": "SalUn" if ratio == SALUN_RATIO else
                   ("unmasked (ESD-like)" if ratio == 1.0 else f"mask {ratio:g}"), "wall_seconds": wall,
                   "unlearning_accuracy": scores["unlearning_accuracy"],
                   "unlearning_accuracy_before": 1.0 - base_acc[d],
                   "retained_accuracy": scores["retained_accuracy"], "retained_accuracy_before": others_before,
                   "retained_drop_points": 100 * (others_before - scores["retained_accuracy"]),
                   "per_digit_accuracy": scores["per_digit_accuracy"]}
            runs.append(run)
            print(f"digit {d} ratio {ratio:g}: UA {run['unlearning_accuracy']:.1%}, retained "
                  f"{run['retained_accuracy']:.1%} (before {others_before:.1%}), {wall:.0f}s")
            if ratio == SALUN_RATIO:
                grid.append((f"{d} base", generate_digits(base, d, 8, seed=EVAL_SEED + 1000 * d)))
                grid.append((f"{d} SalUn", generate_digits(result.pipeline, d, 8, seed=EVAL_SEED + 1000 * d)))
                for rank in (args.lora_ranks if args.lora_digits is None or d in args.lora_digits else []):
                    state, stats = delta_to_lora(base.unet, result.unet, rank)
                    lora_dir = os.path.join(out, f"lora-r{rank}")
                    save_lora(state, lora_dir)
                    lp = load_digit_pipeline()
                    lp.load_lora_weights(lora_dir)
                    ls = digit_scores(lp, judge, d, args.n_per_digit)
                    loras.append({"digit": d, "rank": rank, "energy_kept": stats["energy_kept"],
                                  "lora_parameters": stats["parameters"],
                                  "unlearning_accuracy": ls["unlearning_accuracy"],
                                  "retained_accuracy": ls["retained_accuracy"],
                                  "salun_unlearning_accuracy": run["unlearning_accuracy"]})
                    print(f"  LoRA rank {rank}: UA {ls['unlearning_accuracy']:.1%}, retained "
                          f"{ls['retained_accuracy']:.1%}, energy kept {stats['energy_kept']:.1%}")
            del result
            write_report(args, base_acc, runs, loras, grid, extra)
    return write_report(args, base_acc, runs, loras, grid, extra, final=True)


def write_report(args, base_acc, runs, loras, grid, extra, final=False):
    report = {"world": "digit (bundled MNIST text-to-image model, judged by the bundled digit classifier)",
              "n_per_digit": args.n_per_digit, "seed": args.seed, "base_per_digit_accuracy": base_acc,
              "runs": runs, "lora": loras, "erase_args": extra,
              "torch_threads": torch.get_num_threads(), "complete": final}
    write_json(os.path.join(args.output_dir, "report.json"), report)
    write_text(os.path.join(args.output_dir, "report.md"), markdown(report))
    if grid:
        sample_grid(grid, os.path.join(args.output_dir, "samples.png"))
    if len({r["mask_ratio"] for r in runs}) > 1:
        ratio_plot(runs, os.path.join(args.output_dir, "ratios.png"))
    if final:
        print(markdown(report))
    return report


def markdown(report) -> str:
    runs, loras = report["runs"], report["lora"]
    lines = ["# Digit-world erasure benchmark", "",
             f"{report['world']}; {report['n_per_digit']} judged images per digit prompt.", "",
             "## By mask ratio (mean over erased digits)", "",
             "| method | mask ratio | digits | UA | retained acc. | retained drop (points) | min UA | max drop | s/erasure |",
             "|---|---|---|---|---|---|---|---|---|"]
    for ratio in sorted({r["mask_ratio"] for r in runs}):
        rs = [r for r in runs if r["mask_ratio"] == ratio]
        digits = ",".join(str(r["digit"]) for r in rs) if len(rs) < 10 else "all"
        lines.append(f"| {rs[0]['method']} | {ratio:g} | {digits} | {np.mean([r['unlearning_accuracy'] for r in rs]):.1%} | "
                     f"{np.mean([r['retained_accuracy'] for r in rs]):.1%} | "
                     f"{np.mean([r['retained_drop_points'] for r in rs]):+.2f} | "
                     f"{min(r['unlearning_accuracy'] for r in rs):.1%} | "
                     f"{max(r['retained_drop_points'] for r in rs):+.2f} | "
                     f"{np.mean([r['wall_seconds'] for r in rs]):.0f} |")
    salun = [r for r in runs if r["mask_ratio"] == SALUN_RATIO]
    if salun:
        lines += ["", "## SalUn (mask ratio 0.5) per digit", "",
                  "| digit | UA before | UA after | retained before | retained after | drop (points) | s |",
                  "|---|---|---|---|---|---|---|"]
        for r in salun:
            lines.append(f"| {r['digit']} | {r['unlearning_accuracy_before']:.1%} | {r['unlearning_accuracy']:.1%} | "
                         f"{r['retained_accuracy_before']:.1%} | {r['retained_accuracy']:.1%} | "
                         f"{r['retained_drop_points']:+.2f} | {r['wall_seconds']:.0f} |")
    if loras:
        lines += ["", "## SalUn exported as LoRA (SVD of the delta; mean over digits)", "",
                  "| rank | UA | share of SalUn's UA kept | retained acc. | delta energy kept |", "|---|---|---|---|---|"]
        for rank in sorted({x["rank"] for x in loras}):
            xs = [x for x in loras if x["rank"] == rank]
            kept = np.mean([x["unlearning_accuracy"] / max(x["salun_unlearning_accuracy"], 1e-9) for x in xs])
            lines.append(f"| {rank} | {np.mean([x['unlearning_accuracy'] for x in xs]):.1%} | {kept:.1%} | "
                         f"{np.mean([x['retained_accuracy'] for x in xs]):.1%} | "
                         f"{np.mean([x['energy_kept'] for x in xs]):.1%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
