#!/usr/bin/env python
"""Knowledge probes on the digit world: base, retrained reference, SalUn and --adversarial erasures.

    OMP_NUM_THREADS=1 python benchmarks/bench_probes.py --digits 2,7 --models base,reference,plain,adversarial \\
        --output_dir out/probes [--jobs N]
    python benchmarks/bench_probes.py --digits 2,7 --models base,reference,plain,adversarial --output_dir out/probes \\
        --merge                                  # one table + plot per digit from the finished runs

Each (digit, model) runs ``salun_diffusers.attacks.probes.run_probes`` (context inpainting, SDEdit, relearning,
strong conditioning attack; real held-out MNIST images of the digit; the bundled judge) into
``<output_dir>/<word>-<model>/`` (resumable). Models: ``base`` (the bundled pipeline), ``reference`` (retrained without
the digit, ``benchmarks/build_references.py``, from ``--references``), and the erasures of :data:`CANDIDATES`
(``plain``, ``adversarial``: the digit preset's defaults, alpha 4 with --adversarial; ``adversarial-alpha2``: the
alpha 2 that docs/robustness.md's issue-17 tables measured), erased here with the digit preset (or reused from
``<output_dir>/runs``). The probes' own command is ``salun-probe``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.build_references import DEFAULT_DIR, load_reference  # noqa: E402
from salun_diffusers.attacks.probes import (  # noqa: E402
    ProbeSettings, digit_images, probe_report, probes_plot, run_probes)
from salun_diffusers.concepts import DIGIT_WORDS, digit_prompt  # noqa: E402
from salun_diffusers.config import EraseConfig  # noqa: E402
from salun_diffusers.delta import WEIGHTS_NAME  # noqa: E402
from salun_diffusers.digits import load_digit_pipeline  # noqa: E402
from salun_diffusers.erase import erase  # noqa: E402
from salun_diffusers.evaluation.judges import make_judge  # noqa: E402
from salun_diffusers.loaders import load_erasure  # noqa: E402
from salun_diffusers.utils import read_json_or_none, write_text  # noqa: E402

# erasure candidates: EraseConfig fields over the digit preset
CANDIDATES = {"plain": {}, "adversarial": {"adversarial": True},
              "adversarial-alpha2": {"adversarial": True, "alpha": 2.0}}


def model_pipe(args, digit: int, model: str):
    if model == "base":
        return load_digit_pipeline()
    if model == "reference":
        return load_reference(args.references, digit)
    cfg = EraseConfig(concept=DIGIT_WORDS[digit], output_dir=os.path.join(args.output_dir, "runs",
                                                                          f"{DIGIT_WORDS[digit]}-{model}"),
                      overwrite_output_dir=True, seed=args.seed, save_merged_unet=False, save_pipeline="none",
                      verdict_images=0, threads=1, **CANDIDATES[model])
    if not os.path.isfile(os.path.join(cfg.output_dir, WEIGHTS_NAME)):
        erase(cfg, pipe=load_digit_pipeline())
    pipe = load_digit_pipeline()
    load_erasure(pipe, cfg.output_dir)
    return pipe


def settings(args, digit: int) -> ProbeSettings:
    return ProbeSettings(concept_prompt=digit_prompt(digit), n_images=args.n_images, relearn_steps=args.relearn_steps,
                         attack_steps=args.attack_steps, keep=args.keep)


def run_one(args, digit: int, model: str) -> dict:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    pipe = model_pipe(args, digit, model)
    s = settings(args, digit)
    images = digit_images(digit, max(s.n_images, s.relearn_images))
    res = run_probes(s, pipe, make_judge("digit", digit=digit), images,
                     os.path.join(args.output_dir, f"{DIGIT_WORDS[digit]}-{model}"), label=model)
    print(f"digit {digit} {model}: probes done in {time.perf_counter() - t0:.0f}s", flush=True)
    return res


def merge(args):
    for d in args.digit_list:
        found = [read_json_or_none(os.path.join(args.output_dir, f"{DIGIT_WORDS[d]}-{m}", "results.json"))
                 for m in args.model_list]
        found = [r for r in found if r]
        if not found:
            continue
        text = f"Digit {d} ({DIGIT_WORDS[d]}), digit world, 1 thread per process.\n\n" + probe_report(found)
        write_text(os.path.join(args.output_dir, f"probes-{DIGIT_WORDS[d]}.md"), text)
        probes_plot(found, os.path.join(args.output_dir, f"probes-{DIGIT_WORDS[d]}.png"))
        print(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--digits", default="2,7")
    p.add_argument("--models", default="base,reference,plain,adversarial")
    p.add_argument("--output_dir", default="out/probes")
    p.add_argument("--references", default=DEFAULT_DIR)
    p.add_argument("--n_images", type=int, default=34)
    p.add_argument("--relearn_steps", type=int, default=100)
    p.add_argument("--attack_steps", type=int, default=300)
    p.add_argument("--keep", default="top")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--merge", action="store_true")
    args = p.parse_args(argv)
    args.digit_list = [int(x) for x in args.digits.split(",") if x.strip()]
    args.model_list = [m for m in args.models.split(",") if m.strip()]
    if args.merge:
        return merge(args)
    todo = [(d, m) for d in args.digit_list for m in args.model_list]
    if args.jobs > 1 and len(todo) > 1:
        os.makedirs(args.output_dir, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        rest = [a for a in (argv if argv is not None else sys.argv[1:])]
        keep = []
        skip = False
        for a in rest:
            if skip or a.split("=")[0] in ("--jobs", "--digits", "--models"):
                skip = not skip and "=" not in a
                continue
            keep.append(a)
        procs, pending = [], list(todo)
        while pending or procs:
            while pending and len(procs) < args.jobs:
                d, m = pending.pop(0)
                log = open(os.path.join(args.output_dir, f"log-{DIGIT_WORDS[d]}-{m}.txt"), "w")
                procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--digits", str(d),
                                               "--models", m, *keep], env=env, stdout=log, stderr=log))
            time.sleep(2)
            procs = [q for q in procs if q.poll() is None]
        return merge(args)
    for d, m in todo:
        run_one(args, d, m)
    merge(args)


if __name__ == "__main__":
    main()
