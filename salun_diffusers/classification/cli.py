"""``salun-classifier``: SalUn and baselines on an image classifier, scored like the SalUn paper.

Example::

    salun-classifier --dataset mnist --scenario random --forget_ratio 0.1 \\
        --methods retrain,ft,rl,ga,l1,salun --seeds 0,1,2 --output_dir out/cls

Per-method hyperparameters override the defaults field by field, from JSON text or a JSON file::

    --hparams '{"salun": {"lr": 0.02, "mask_ratio": 0.3}, "ga": {"lr": 1e-4}}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import List, Optional

from ..cli_args import build_parser, run_main
from ..utils import configure_threads, ensure_writable_dir
from .data import load_dataset
from .experiment import ExperimentConfig, check_results_dir, run_experiment, write_results

PROG = "salun-classifier"
FLAGS = ("dataset", "data_dir", "model", "scenario", "forget_ratio", "forget_class", "methods", "seeds",
         "mnist_source", "train_size", "split_seed", "mia", "device")


def _json_arg(value: str, name: str) -> dict:
    try:
        if os.path.isfile(value):
            with open(value) as f:
                return json.load(f)
        return json.loads(value)
    except ValueError as exc:  # JSONDecodeError, or a file that is not UTF-8 text
        raise ValueError(f"--{name}: not valid JSON nor a JSON file ({exc})") from None


def classifier_parser() -> argparse.ArgumentParser:
    parser = build_parser(PROG, __doc__.split("\n")[0])
    fields = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
    for name in FLAGS:
        f = fields[name]
        kind = {"forget_ratio": float, "forget_class": int, "train_size": int, "split_seed": int}.get(name, str)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if isinstance(default, list):
            default = ",".join(map(str, default))
        parser.add_argument(f"--{name}", type=kind, default=None, help=f"{f.metadata['help']} (default: {default})")
    parser.add_argument("--config", default=None, help="JSON file of an ExperimentConfig (flags given override it)")
    parser.add_argument("--train", default=None, help="JSON overrides of the original model's training config")
    parser.add_argument("--hparams", default=None, help="JSON text or file: {method: {field: value}} overrides")
    parser.add_argument("--no_original", action="store_true", help="do not score the original model")
    parser.add_argument("--output_dir", required=True, help="where results.json and results.md are written")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --output_dir")
    parser.add_argument("--threads", "--num_threads", dest="threads", type=int, default=None,
                        help="torch CPU threads (default: 1 for a small model such as the MNIST CNN, "
                             "else every usable core; OMP_NUM_THREADS also wins)")
    parser.add_argument("--log_level", default="INFO", help="logging level")
    return parser


def experiment_config(args: argparse.Namespace) -> ExperimentConfig:
    data = {}
    if args.config:
        data = _json_arg(args.config, "config")
    for name in FLAGS:
        value = getattr(args, name)
        if value is not None:
            data[name] = value
    if args.train:
        data["train"] = _json_arg(args.train, "train")
    if args.hparams:
        data["hparams"] = _json_arg(args.hparams, "hparams")
    if args.no_original:
        data["include_original"] = False
    return ExperimentConfig.from_dict(data)


def main(argv: Optional[List[str]] = None) -> int:
    args = classifier_parser().parse_args(argv)
    return run_main(PROG, lambda: _run(args), debug=args.debug)


def _run(args: argparse.Namespace) -> int:
    level = logging.getLevelName(args.log_level.upper())
    if not isinstance(level, int):
        raise ValueError(f"--log_level {args.log_level!r}: unknown level; use DEBUG, INFO, WARNING or ERROR")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = experiment_config(args)
    if args.threads is not None:
        configure_threads(0, args.threads)  # checks >= 1; remembered: run_experiment's policy call keeps it
    # check before compute: results can be written, the data can be read
    check_results_dir(args.output_dir, args.overwrite)
    ensure_writable_dir(args.output_dir)
    data = load_dataset(config.dataset, config.data_dir, mnist_source=config.mnist_source,
                        train_size=config.train_size, split_seed=config.split_seed)
    results = run_experiment(config, data=data)
    write_results(results, args.output_dir, overwrite=args.overwrite)
    print(results["markdown"])
    print(f"wrote {os.path.join(args.output_dir, 'results.json')} and results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
