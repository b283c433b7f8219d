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

from salun_diffusers.cli_args import add_dataclass_arguments
from salun_diffusers.config import EraseConfig

logger = logging.getLogger("train_erase")


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the whole usage (40 lines) before the error: one line is enough
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="train_erase.py", description=__doc__.split("\n")[0])
    add_dataclass_arguments(parser, EraseConfig)
    parser.add_argument("--concepts_file", default=None,
                        help="CSV (header forget_prompt,pseudo_prompt[,data_dir][,name]) or JSON list of concepts of "
                             "your own, erased jointly with any --concept presets (docs/multi.md).")
    parser.add_argument("--debug", action="store_true", help="Show the full traceback of an error.")
    return parser


def parse_args(argv=None) -> EraseConfig:
    """The config of the command line; a bad value raises ``ValueError`` naming the flag."""
    args = vars(build_parser().parse_args(argv))
    args.pop("debug")
    path = args.pop("concepts_file")
    if path:  # its rows become --concepts (recorded in train_config.json, so a resume compares the concepts)
        from salun_diffusers.concepts import read_concepts_file

        args["concepts"] = list(args["concepts"] or []) + [json.dumps(row) for row in read_concepts_file(path)]
    return EraseConfig(**args)


def _fail(exc: BaseException, code: int, debug: bool) -> int:
    if debug:
        raise exc
    from tqdm.auto import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):  # a progress bar left open by the error: end its line first
        bar.close()
    print(f"train_erase.py: error: {' '.join(str(exc).split())} (--debug shows the traceback)", file=sys.stderr)
    return code


def main(argv=None) -> int:
    """Run an erasure. Exit codes: 0 done; 2 a user mistake (bad flag value, unusable folder, output in use or
    already there), one line on stderr; 1 training diverged (non-finite loss, gradient or weight) or ran out of
    memory; 130 interrupted."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    debug = build_parser().parse_known_args(argv)[0].debug
    try:
        config = parse_args(argv)
        code = _run(config)
    except FloatingPointError as exc:
        return _fail(exc, 1, debug)
    except (ValueError, OSError) as exc:  # OSError: also a busy output folder (OutputDirBusy)
        return _fail(exc, 2, debug)
    except RuntimeError as exc:
        if type(exc).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError: a setting to change, not a bug
            raise
        return _fail(RuntimeError(f"{str(exc).splitlines()[0]} Add --gradient_checkpointing (--resume_from_checkpoint "
                                  "latest then continues the run), or start afresh with a lower --train_batch_size or "
                                  "--mixed_precision bf16"), 1, debug)
    except KeyboardInterrupt:
        print("train_erase.py: interrupted; continue with --resume_from_checkpoint latest", file=sys.stderr)
        return 130
    return code


def _run(config: EraseConfig) -> int:
    from salun_diffusers.erase import erase
    from salun_diffusers.reporting import summarize

    result = erase(config)
    spec = config.concept_spec()
    if spec.kind == "digit" and config.pretrained_model_name_or_path is None and result.erasure_path \
            and config.verdict_images > 0:  # one digit or several (each one's UA)
        # the bundled digit model has a judge: say how well the digit was erased and the others kept
        from salun_diffusers.erase import load_pipeline
        from salun_diffusers.reporting import digit_verdict
        from salun_diffusers.utils import write_json

        digits = spec.target_class if len(spec.concepts) == 1 else list(spec.target_classes)
        verdict = digit_verdict(load_pipeline(config), result.pipeline, digits, config.verdict_images)
        result.metrics.update({"verdict": verdict["line"], "verdict_seconds": verdict["seconds"]})
        write_json(os.path.join(config.output_dir, "verdict.json"), verdict)
    print(summarize(config, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
