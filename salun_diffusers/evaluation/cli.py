"""``salun-audit``: generate images for a prompt CSV with a base or erased Stable Diffusion and audit them.

    salun-audit --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 --erasure out/nudity \\
        --prompts ../shared/data/prompts/i2p_nudity_142.csv --output_dir audits/erased --compare_to audits/base
    salun-audit --judge digit --erasure out/no-seven --output_dir audits/no-seven     # the bundled digit world
    salun-audit --judge classifier --judge_model microsoft/resnet-50 --prompts imagenette.csv --target_class church ...

Also under ``accelerate launch`` (each process draws and judges a share of the prompts; the main process merges).
The output folder holds ``images/{case_number}.png``, ``nudenet/{case_number}.json`` (detection cache),
``settings.json``, ``results.json``, ``report.md`` and ``nudity_classes.png``. A killed run resumes where it stopped;
a finished audit is never redrawn or overwritten.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Optional, Sequence

from ..cli_args import OneLineParser, argv_or_sys, build_parser, config_from_args, run_main, setup_logging
from ..utils import write_json
from .audit import audit_summary_lines, check_audit_inputs, run_audit
from .config import AuditConfig
from .report import RESULTS_FILE
from .reproduce import load_recorded_run, reproduce_lines, reproduce_output_dir
from .tables import table_lines

RESUME_HINT = "rerun the same command to resume (images drawn are kept)"
REPRODUCE_HELP = ("--reproduce RESULTS_JSON [--output_dir DIR]: rerun the audit a results.json records (into DIR, "
                  "default <its folder>-reproduce) and say which figures, images and recorded settings differ; exit "
                  "0 when every figure is equal, 1 when one differs.")
AUDIT_FIGURES = ("num_images", "nudity", "classes", "clip_score", "fid")
REPRODUCE_FILE = "reproduce.json"


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = "salun-audit", description: Optional[str] = None):
    """The parsed flags (``AuditConfig``'s fields, ``--debug`` among them); a malformed flag exits 2 with one line."""
    # dash aliases (--output-dir): salun-audit's flags as HfArgumentParser made them before
    parser = build_parser(prog, description or __doc__.split("\n\n")[0], AuditConfig, dash_aliases=True,
                          epilog=REPRODUCE_HELP)
    return parser.parse_args(argv_or_sys(argv))


def main(argv: Optional[Sequence[str]] = None, prog: str = "salun-audit", description: Optional[str] = None,
         table: Optional[str] = None) -> int:
    """Exit codes: 0 done; 2 a user mistake (bad flag value, missing file, a folder holding other settings), one line
    on stderr; 1 out of memory; 130 interrupted."""
    setup_logging()
    if wants_reproduce(argv_or_sys(argv)):
        args = reproduce_parser(prog).parse_args(argv_or_sys(argv))
        return run_main(prog, lambda: reproduce_audit(args.reproduce, args.output_dir, args.debug, table),
                        debug=args.debug, resume_hint=RESUME_HINT)
    args = parse_args(argv, prog, description)
    return run_main(prog, lambda: _run(args, table), debug=args.debug, resume_hint=RESUME_HINT)


def wants_reproduce(argv: Sequence[str]) -> bool:
    return any(a == "--reproduce" or a.startswith("--reproduce=") for a in argv)


def reproduce_parser(prog: str) -> OneLineParser:
    """``--reproduce RESULTS_JSON [--output_dir DIR] [--debug]``: every other setting comes from the record."""
    parser = OneLineParser(prog=f"{prog} --reproduce", description=REPRODUCE_HELP)
    parser.add_argument("--reproduce", required=True, help="results.json of the run to repeat (or its folder).")
    parser.add_argument("--output_dir", "--output-dir", default=None, help="Folder of the rerun (default: "
                        "<the recorded run's folder>-reproduce).")
    parser.add_argument("--debug", action="store_true", help="On an error, show the full traceback.")
    return parser


def reproduce_audit(results_json: str, output_dir: Optional[str] = None, debug: bool = False,
                    table: Optional[str] = None) -> int:
    """Rerun a recorded audit with its recorded config into ``output_dir``; print its summary and where it differs
    (also written to ``reproduce.json``). Returns 0 when every figure is equal, else 1."""
    old = load_recorded_run(results_json, "salun-audit")
    out = reproduce_output_dir(old["_path"], output_dir)
    if os.path.isfile(os.path.join(out, RESULTS_FILE)):
        raise ValueError(f"{out!r} already holds a finished audit; --reproduce draws afresh: pass a new --output_dir")
    names = {f.name for f in dataclasses.fields(AuditConfig)}
    recorded = {k: v for k, v in old["config"].items() if k in names}
    recorded.update(output_dir=out, debug=debug)
    if recorded.get("compare_to") and not os.path.isdir(recorded["compare_to"]):
        recorded["compare_to"] = None  # only the report's side-by-side; not a figure
    config = AuditConfig(**recorded)
    check_audit_inputs(config)
    new = run_audit(config)
    if "num_images" not in new:  # not the main process
        return 0
    print("\n".join(audit_summary_lines(new) + (table_lines(new, table) if table else [])))
    old_images = os.path.join(os.path.dirname(old["_path"]), "images")
    equal, lines = reproduce_lines(old, new, AUDIT_FIGURES, [(old_images, os.path.join(out, "images"))])
    print("\n".join(lines))
    write_json(os.path.join(out, REPRODUCE_FILE), {"reproduces": old["_path"], "equal": equal, "lines": lines})
    return 0 if equal else 1


def _run(args, table: Optional[str] = None) -> int:
    config = config_from_args(AuditConfig, args)
    check_audit_inputs(config)
    results = run_audit(config)
    if "num_images" in results:  # main process
        print("\n".join(audit_summary_lines(results) + (table_lines(results, table) if table else [])))
    return 0


def run_protocol(prog: str, description: str, defaults: dict, argv: Optional[Sequence[str]] = None,
                 table: Optional[str] = None) -> int:
    """``salun-audit`` with an evaluation protocol's defaults (the top-level ``evaluation/`` scripts): each
    ``{"--flag": value}`` is used unless the command line gives the flag; ``None`` values are left out. After the
    summary it prints the row of the paper's ``table`` (:mod:`salun_diffusers.evaluation.tables`)."""
    argv = argv_or_sys(argv)
    if wants_reproduce(argv):  # the recorded config holds every setting, the protocol's included
        return main(argv, prog=prog, description=description, table=table)
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    preset = [str(x) for flag, value in defaults.items() if value is not None and flag not in given
              for x in (flag, value)]
    shown = " ".join(f"{k} {v}" for k, v in defaults.items() if v is not None)
    return main(preset + argv, prog=prog, description=f"{description} Defaults: {shown or 'none'}.", table=table)


if __name__ == "__main__":
    sys.exit(main())
