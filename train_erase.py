#!/usr/bin/env python
"""Erase a concept from a Stable Diffusion model with SalUn.

    accelerate launch train_erase.py --concept nudity \
        --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 --output_dir out/sd14-no-nudity
    python train_erase.py --concept seven          # the bundled digit model, on CPU in about a minute

Flags mirror the fields of ``salun_diffusers.config.EraseConfig`` (``--help`` lists them all).
"""

import argparse
import json
import logging
import os
import sys

import salun_diffusers.erase as erase_module
from salun_diffusers import families
from salun_diffusers.cli_args import build_parser, config_from_args, run_main
from salun_diffusers.concepts import read_concepts_file
from salun_diffusers.config import EraseConfig
from salun_diffusers.hub import BUNDLED_MODELS
from salun_diffusers.reporting import digit_verdict, summarize_erasure
from salun_diffusers.utils import write_json

PROG = "train_erase.py"
RESUME_HINT = "continue with --resume_from_checkpoint latest"
OOM_ADVICE = ("Add --gradient_checkpointing (--resume_from_checkpoint latest then continues the run), or start afresh "
              "with a lower --train_batch_size or --mixed_precision bf16")


def erase_parser() -> argparse.ArgumentParser:
    """The flags: one per field of ``EraseConfig``, ``--concepts_file`` and ``--debug``."""
    parser = build_parser(PROG, __doc__.split("\n")[0], EraseConfig)
    parser.add_argument("--concepts_file", default=None,
                        help="CSV (header forget_prompt,pseudo_prompt[,data_dir][,name]) or JSON list of concepts of "
                             "your own, erased jointly with any --concept presets (docs/multi.md).")
    return parser


def config_of(args: argparse.Namespace) -> EraseConfig:
    """The config of parsed flags: a ``--concepts_file``'s rows become ``--concepts`` (recorded in
    train_config.json, so a resumed run compares the concepts themselves, not a path)."""
    if args.concepts_file:
        rows = [json.dumps(row) for row in read_concepts_file(args.concepts_file)]
        args = argparse.Namespace(**{**vars(args), "concepts": list(args.concepts or []) + rows})
    return config_from_args(EraseConfig, args)


def parse_args(argv=None) -> EraseConfig:
    """The config of the command line; a bad value raises ``ValueError`` naming the flag."""
    return config_of(erase_parser().parse_args(argv))


def main(argv=None) -> int:
    """Run an erasure. Exit codes: 0 done; 2 a user mistake (bad flag value, unusable folder, output in use or
    already there) or a diverged run (non-finite loss, gradient or weight), one line on stderr; 1 out of memory;
    130 interrupted."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = erase_parser().parse_args(argv)
    return run_main(PROG, lambda: _run(config_of(args)), debug=args.debug,
                    resume_hint=RESUME_HINT, oom_advice=OOM_ADVICE)


def _run(config: EraseConfig) -> int:
    result = erase_module.erase(config)
    spec = config.concept_spec()
    bundled = config.pretrained_model_name_or_path in (None, *BUNDLED_MODELS)  # the digit worlds, judged
    if spec.kind == "digit" and bundled and result.erasure_path \
            and config.verdict_images > 0:
        # the bundled digit model has a judge: say how well the digit (each digit) was erased and the others kept
        digits = spec.target_class if len(spec.concepts) == 1 else list(spec.target_classes)
        verdict = digit_verdict(families.load_erasure_base(config), result.pipeline, digits, config.verdict_images)
        result.metrics.update({"verdict": verdict["line"], "verdict_seconds": verdict["seconds"]})
        write_json(os.path.join(config.output_dir, "verdict.json"), verdict)
    print(summarize_erasure(config, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
