#!/usr/bin/env python
"""Erase a concept from a Stable Diffusion model with SalUn.

    accelerate launch train_erase.py --concept nudity \
        --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 --output_dir out/sd14-no-nudity
    python train_erase.py --concept seven          # the bundled digit model, on CPU in about a minute

Flags mirror the fields of ``salun_diffusers.config.EraseConfig`` (``--help`` lists them all).
"""

import argparse
import logging
import os
import sys

from salun_diffusers.cli_args import add_dataclass_arguments
from salun_diffusers.config import EraseConfig

logger = logging.getLogger("train_erase")


def parse_args(argv=None) -> EraseConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_dataclass_arguments(parser, EraseConfig)
    args = vars(parser.parse_args(argv))
    try:
        return EraseConfig(**args)
    except ValueError as exc:
        parser.error(str(exc))


def main(argv=None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    config = parse_args(argv)
    from salun_diffusers.erase import erase
    from salun_diffusers.reporting import summarize

    try:
        result = erase(config)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    spec = config.concept_spec()
    if spec.kind == "digit" and config.pretrained_model_name_or_path is None and result.erasure_path \
            and config.verdict_images > 0:
        # the bundled digit model has a judge: say how well the digit was erased and the others kept
        from salun_diffusers.erase import load_pipeline
        from salun_diffusers.reporting import digit_verdict
        from salun_diffusers.utils import write_json

        verdict = digit_verdict(load_pipeline(config), result.pipeline, spec.target_class, config.verdict_images)
        result.metrics.update({"verdict": verdict["line"], "verdict_seconds": verdict["seconds"]})
        write_json(os.path.join(config.output_dir, "verdict.json"), verdict)
    print(summarize(config, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
