#!/usr/bin/env python
"""Erasing several digits at once on the digit world: joint vs sequential vs stacked single erasures.

    python benchmarks/bench_multi.py --output_dir out/bench-multi                       # digits 7,1,4,2,9; k = 1,2,3,5
    python benchmarks/bench_multi.py --output_dir out/bench-multi --combines sum,normalized,union

For every k in --ks the first k of --digits are erased from the bundled MNIST text-to-image model three ways:

* **joint**: one run, ``EraseConfig(concept=[...])`` (one mask from all forget sets, each digit mapped to its own
  pseudo digit, one retain set of the other digits), once per --combines (how the per-digit saliencies make the mask);
* **sequential**: one single-digit run after another, each from the previous run's output folder
  (``--pretrained_model_name_or_path`` an erased model), k runs in all;
* **stacked**: k single-digit runs from the base, loaded onto the base pipeline together with ``load_erasure``
  (made beside each other: their changes add where masks overlap).

The bundled judge scores --n_per_digit images of every digit prompt (20 sampling steps, seeds from EVAL_SEED):
UA of each erased digit (share of its images not called that digit), retained accuracy on the digits not erased and
its drop against the base model on the same digits; time is the erase() call's CPU seconds (process time, one torch
thread: the machine is shared, wall time is reported beside it) and its ratio to the k = 1 run. Writes report.json,
report.md and retained.png (retained accuracy against the number of erased digits) into --output_dir.
This is the digit world (a real model trained on real MNIST), not Stable Diffusion.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from salun_diffusers.concepts import DIGIT_WORDS  # noqa: E402
from salun_diffusers.config import EraseConfig  # noqa: E402
from salun_diffusers.digits import DigitJudge, load_digit_pipeline  # noqa: E402
from salun_diffusers.erase import erase  # noqa: E402
from salun_diffusers.loaders import load_erasure, unload_erasure  # noqa: E402
from salun_diffusers.reporting import digit_scores, erasure_scores  # noqa: E402
from salun_diffusers.utils import write_json, write_text  # noqa: E402

logger = logging.getLogger("bench_multi")


def _ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def run_erase(out_root, name, digits, base=None, combine="sum", extra=None):
    """One erasure (joint when several digits); returns (the erased pipeline, run record). An output folder that
    already holds this run's record is reused (a benchmark stopped half-way continues)."""
    from diffusers import StableDiffusionPipeline

    out = os.path.join(out_root, name)
    record_path = os.path.join(out, "bench_run.json")
    words = [DIGIT_WORDS[d] for d in digits]
    if os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        logger.info("reusing %s", out)
        return StableDiffusionPipeline.from_pretrained(out, safety_checker=None), record
    cfg = EraseConfig(concept=words if len(words) > 1 else words[0], output_dir=out, overwrite_output_dir=True,
                      pretrained_model_name_or_path=base, saliency_combine=combine, **(extra or {}))
    wall, cpu = time.perf_counter(), time.process_time()
    result = erase(cfg, pipe=None if base else load_digit_pipeline())
    record = {"name": name, "digits": list(digits), "base": base, "combine": combine,
              "wall_seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu,
              "max_train_steps": cfg.max_train_steps, "mask_density": result.metrics["mask_density"],
              "num_changed_weights": result.metrics.get("num_changed_weights"),
              "pseudo": {c.name: list(c.pseudo_prompts) for c in cfg.concept_spec().concepts}}
    write_json(record_path, record)
    return result.pipeline, record


def judged(pipe, judge, digits, base_acc, n):
    acc = digit_scores(pipe, judge, 0, n)["per_digit_accuracy"]
    after, before = erasure_scores(acc, list(digits)), erasure_scores(base_acc, list(digits))
    return {"per_digit_accuracy": acc, "ua_per_digit": after["unlearning_accuracy_per_digit"],
            "ua_min": min(after["unlearning_accuracy_per_digit"].values()),
            "retained": after["retained_accuracy"], "base_retained": before["retained_accuracy"],
            "retained_drop": before["retained_accuracy"] - after["retained_accuracy"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", default="out/bench-multi")
    p.add_argument("--digits", type=_ints, default=[7, 1, 4, 2, 9], help="erased in this order (the first k)")
    p.add_argument("--ks", type=_ints, default=[1, 2, 3, 5])
    p.add_argument("--combines", default="sum,normalized", help="--saliency_combine values for the joint runs")
    p.add_argument("--methods", default="joint,sequential,stacked")
    p.add_argument("--n_per_digit", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--erase_args", default="{}", help="JSON of extra EraseConfig fields (e.g. for a smoke run)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    extra = json.loads(args.erase_args)
    extra.setdefault("threads", args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    methods = args.methods.split(",")
    combines = [c for c in args.combines.split(",") if c]
    judge = DigitJudge.from_pretrained()
    base_acc = digit_scores(load_digit_pipeline(), judge, 0, args.n_per_digit)["per_digit_accuracy"]
    rows = []

    def add(method, k, digits, pipe, runs):
        row = {"method": method, "k": k, "digits": list(digits), **judged(pipe, judge, digits, base_acc,
                                                                          args.n_per_digit),
               "cpu_seconds": sum(r["cpu_seconds"] for r in runs), "wall_seconds": sum(r["wall_seconds"] for r in runs),
               "runs": [r["name"] for r in runs], "max_train_steps": sum(r["max_train_steps"] for r in runs),
               "mask_density": runs[-1]["mask_density"] if len(runs) == 1 else None}
        rows.append(row)
        logger.info("%s k=%d: UA %s, retained %.1f%% (drop %.1f points), %.1f CPU s", method, k,
                    {d: f"{u:.0%}" for d, u in row["ua_per_digit"].items()}, 100 * row["retained"],
                    100 * row["retained_drop"], row["cpu_seconds"])
        write_report(args, base_acc, rows)

    singles = {}
    if "joint" in methods or "stacked" in methods:  # k = 1 is also the first single
        for combine in combines:
            for k in args.ks:
                if "joint" not in methods and k > 1:
                    continue
                if k == 1 and combine != combines[0]:
                    continue  # one digit: nothing to combine
                digits = args.digits[:k]
                pipe, rec = run_erase(args.output_dir, f"joint-{combine}-k{k}", digits, combine=combine, extra=extra)
                if k == 1:
                    singles[digits[0]] = rec
                if "joint" in methods:
                    add(f"joint ({combine})" if k > 1 else "single", k, digits, pipe, [rec])
    if "sequential" in methods:
        base, runs = None, []
        for i, d in enumerate(args.digits[:max(args.ks)]):
            pipe, rec = run_erase(args.output_dir, f"sequential-{i + 1}", [d], base=base, extra=extra)
            runs.append(rec)
            base = os.path.join(args.output_dir, f"sequential-{i + 1}")
            if i + 1 in args.ks and i + 1 > 1:
                add("sequential", i + 1, args.digits[:i + 1], pipe, list(runs))
    if "stacked" in methods:
        pipe = load_digit_pipeline()
        before = {n: t.detach().clone() for n, t in pipe.unet.named_parameters()}
        for i, d in enumerate(args.digits[:max(args.ks)]):
            if d not in singles:
                _, singles[d] = run_erase(args.output_dir, f"single-{d}", [d], extra=extra)
            load_erasure(pipe, os.path.join(args.output_dir, singles[d]["name"]))
            if i + 1 in args.ks and i + 1 > 1:
                add("stacked", i + 1, args.digits[:i + 1], pipe, [singles[x] for x in args.digits[:i + 1]])
        unload_erasure(pipe)
        exact = all(torch.equal(t.detach(), before[n]) for n, t in pipe.unet.named_parameters())
        logger.info("stacked erasures unloaded: base restored bit for bit: %s", exact)
        rows.append({"method": "unload check", "base_restored_bit_for_bit": exact})
    write_report(args, base_acc, rows, final=True)
    print(markdown(json.load(open(os.path.join(args.output_dir, "report.json")))))


def write_report(args, base_acc, rows, final=False):
    report = {"args": vars(args), "base_per_digit_accuracy": base_acc, "rows": rows, "complete": final,
              "torch_threads": torch.get_num_threads(),
              "world": "digit world (bundled MNIST text-to-image model, judged by the bundled classifier)"}
    write_json(os.path.join(args.output_dir, "report.json"), report)
    write_text(os.path.join(args.output_dir, "report.md"), markdown(report))
    plot(report, os.path.join(args.output_dir, "retained.png"))


def markdown(report) -> str:
    rows = [r for r in report["rows"] if "k" in r]
    one = next((r for r in rows if r["k"] == 1), None)
    lines = ["| method | k | digits erased | UA per erased digit | retained (base) on the other digits | drop (points) "
             "| steps | CPU s | x one digit's CPU s (budget) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        uas = {int(d): float(u) for d, u in r["ua_per_digit"].items()}
        ua = ", ".join(f"{d}: {uas[d]:.0%}" for d in r["digits"])
        ratio = f"{r['cpu_seconds'] / one['cpu_seconds']:.2f} ({1 + 0.5 * (r['k'] - 1):.1f})" if one else ""
        lines.append(f"| {r['method']} | {r['k']} | {', '.join(map(str, r['digits']))} | {ua} | "
                     f"{100 * r['retained']:.1f}% ({100 * r['base_retained']:.1f}%) | {100 * r['retained_drop']:.1f} | "
                     f"{r['max_train_steps']} | {r['cpu_seconds']:.1f} | {ratio} |")
    check = [r for r in report["rows"] if r.get("method") == "unload check"]
    if check:
        lines.append(f"\nStacked erasures unloaded: base restored bit for bit: {check[0]['base_restored_bit_for_bit']}")
    return "\n".join(lines) + "\n"


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if "k" in r]
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for method in dict.fromkeys(r["method"] for r in rows if r["k"] > 1):
        pts = sorted([(1, next((100 * r["retained"] for r in rows if r["k"] == 1), None))] +
                     [(r["k"], 100 * r["retained"]) for r in rows if r["method"] == method])
        pts = [(k, v) for k, v in pts if v is not None]
        ax.plot([k for k, _ in pts], [v for _, v in pts], marker="o", label=method)
    base = sorted((r["k"], 100 * r["base_retained"]) for r in rows if r["method"] == rows[0]["method"] or r["k"] == 1)
    ax.plot([k for k, _ in base], [v for _, v in base], "k--", lw=1, label="base model (same digits)")
    ax.set_xticks(sorted({r["k"] for r in rows}))
    ax.set_xlabel("digits erased (k)")
    ax.set_ylabel("retained accuracy on the other digits (%)")
    ax.set_title("digit world: erasing k digits", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
