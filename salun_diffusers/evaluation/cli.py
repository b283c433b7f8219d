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

import sys
from typing import Optional, Sequence

from ..cli_args import argv_or_sys, build_parser, config_from_args, run_main, setup_logging
from .audit import audit_summary_lines, check_audit_inputs, run_audit
from .config import AuditConfig

RESUME_HINT = "rerun the same command to resume (images drawn are kept)"


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = "salun-audit", description: Optional[str] = None):
    """The parsed flags (``AuditConfig``'s fields, ``--debug`` among them); a malformed flag exits 2 with one line."""
    # dash aliases (--output-dir): salun-audit's flags as HfArgumentParser made them before
    parser = build_parser(prog, description or __doc__.split("\n\n")[0], AuditConfig, dash_aliases=True)
    return parser.parse_args(argv_or_sys(argv))


def main(argv: Optional[Sequence[str]] = None, prog: str = "salun-audit", description: Optional[str] = None) -> int:
    """Exit codes: 0 done; 2 a user mistake (bad flag value, missing file, a folder holding other settings), one line
    on stderr; 1 out of memory; 130 interrupted."""
    setup_logging()
    args = parse_args(argv, prog, description)
    return run_main(prog, lambda: _run(args), debug=args.debug, resume_hint=RESUME_HINT)


def _run(args) -> int:
    config = config_from_args(AuditConfig, args)
    check_audit_inputs(config)
    results = run_audit(config)
    if "num_images" in results:  # main process
        print("\n".join(audit_summary_lines(results)))
    return 0


def run_protocol(prog: str, description: str, defaults: dict, argv: Optional[Sequence[str]] = None) -> int:
    """``salun-audit`` with an evaluation protocol's defaults (the top-level ``evaluation/`` scripts): each
    ``{"--flag": value}`` is used unless the command line gives the flag; ``None`` values are left out."""
    argv = argv_or_sys(argv)
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    preset = [str(x) for flag, value in defaults.items() if value is not None and flag not in given
              for x in (flag, value)]
    shown = " ".join(f"{k} {v}" for k, v in defaults.items() if v is not None)
    return main(preset + argv, prog=prog, description=f"{description} Defaults: {shown or 'none'}.")


if __name__ == "__main__":
    sys.exit(main())
