"""``salun-attack``: attack an erased (or any) Stable Diffusion model prompt by prompt; report the attack success rate.

    salun-attack --model out/sd14-no-nudity --prompts ../shared/data/prompts/i2p_nudity_142.csv \\
        --attack token --judge nudenet --output_dir attacks/nudity-token
    salun-attack --model out/no-seven --digit 7 --attack conditioning --output_dir attacks/seven   # digit world
    salun-attack --model salun-diffusers/digit-sd --digit 7 --from_prompt "a handwritten digit" \\
        --attack token --output_dir attacks/base-neutral                                           # base, neutral word

For each prompt row, as UnlearnDiffAtk does: the base model draws a target image of the concept (``target_prompt``
column, default the row's prompt; same seed), the attacked model draws the row's prompt (*before*), the attack
optimises against the attacked model's own denoising loss on the target, and the attacked model draws again with the
adversarial conditioning (*after*, same seed). One judge (as in the audit) calls each image; a row is a success when
*before* or *after* shows the concept (a prompt that already breaks through counts, as in UnlearnDiffAtk).

The output folder holds ``targets/``, ``before/``, ``after/`` (PNG per case), ``rows/{case}.json`` (one finished
row each), ``settings.json``, ``results.json``, ``report.md`` and ``asr.png``. Every file is written atomically; a
killed run resumes with the rows it has, and a rerun with more prompts (``--limit``) reuses the finished ones.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Optional, Sequence

from ..cli_args import argv_or_sys, build_parser, config_from_args, run_main, setup_logging
from ..evaluation.cli import REPRODUCE_FILE, REPRODUCE_HELP, reproduce_parser, wants_reproduce
from ..evaluation.reproduce import load_recorded_run, reproduce_lines, reproduce_output_dir
from ..utils import write_json
from .config import AttackConfig
from .probes import ProbeSettings, ProbeTarget, probe_summary, probe_target
from .report import REPORT_FILE, RESULTS_FILE, attack_summary_line
from .runner import run_attack

PROG, PROBE_PROG = "salun-attack", "salun-probe"
RESUME_HINT = "rerun the same command to resume (finished rows are kept)"
ATTACK_FIGURES = ("num_prompts", "target_rate", "before_rate", "after_rate", "asr", "asr_where_target_hit",
                  "num_target_hit", "mean_loss_start", "mean_loss_final")
PROBE_DOC = """Knowledge probes (context inpainting, SDEdit, relearning, a strong conditioning attack) on a model, into a
resumable folder (see salun_diffusers.attacks.probes).

    salun-probe --model out/no-seven --digit 7 --output_dir probes/no-seven                # digit world
    salun-probe --model out/sd14-no-nudity --images my-nude-photos --concept_prompt nudity \\
        --neutral_prompts "a photo of a person" "" --output_dir probes/nudity              # SD path, NudeNet"""


def parse_args(argv: Optional[Sequence[str]] = None):
    """The parsed flags (``AttackConfig``'s fields and ``--debug``); a malformed flag exits 2 with one line."""
    return build_parser(PROG, __doc__.split("\n\n")[0], AttackConfig,
                        epilog=REPRODUCE_HELP.replace("audit", "attack")).parse_args(argv_or_sys(argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit codes: 0 done; 2 a user mistake (bad flag value, missing file, a folder holding other settings), one line
    on stderr; 1 out of memory; 130 interrupted."""
    setup_logging()
    if wants_reproduce(argv_or_sys(argv)):
        args = reproduce_parser(PROG).parse_args(argv_or_sys(argv))
        return run_main(PROG, lambda: reproduce_attack(args.reproduce, args.output_dir), debug=args.debug,
                        resume_hint=RESUME_HINT)
    args = parse_args(argv)
    return run_main(PROG, lambda: _run(args), debug=args.debug, resume_hint=RESUME_HINT)


def _run(args) -> int:
    config = config_from_args(AttackConfig, args)
    results = run_attack(config)
    print(f"{attack_summary_line(results)}; report: {os.path.join(config.output_dir, REPORT_FILE)}")
    return 0


def reproduce_attack(results_json: str, output_dir: Optional[str] = None) -> int:
    """Rerun a recorded attack with its recorded config into ``output_dir``; print its summary and where it differs
    (also written to ``reproduce.json``). Returns 0 when every figure is equal, else 1."""
    old = load_recorded_run(results_json, PROG)
    out = reproduce_output_dir(old["_path"], output_dir)
    if os.path.isfile(os.path.join(out, RESULTS_FILE)):
        raise ValueError(f"{out!r} already holds a finished attack; --reproduce attacks afresh: pass a new "
                         "--output_dir")
    names = {f.name for f in dataclasses.fields(AttackConfig)}
    config = AttackConfig(**{**{k: v for k, v in old["config"].items() if k in names}, "output_dir": out})
    new = run_attack(config)
    print(f"{attack_summary_line(new)}; report: {os.path.join(out, REPORT_FILE)}")
    old_dir = os.path.dirname(old["_path"])
    equal, lines = reproduce_lines(old, new, ATTACK_FIGURES, [(os.path.join(old_dir, d), os.path.join(out, d))
                                                              for d in ("targets", "before", "after")])
    print("\n".join(lines))
    write_json(os.path.join(out, REPRODUCE_FILE), {"reproduces": old["_path"], "equal": equal, "lines": lines})
    return 0 if equal else 1


def probe_main(argv: Optional[Sequence[str]] = None) -> int:
    """``salun-probe``; exit codes as :func:`main` (a rerun reuses the finished probes)."""
    setup_logging()
    args = build_parser(PROBE_PROG, PROBE_DOC, ProbeSettings, ProbeTarget).parse_args(argv_or_sys(argv))
    return run_main(PROBE_PROG, lambda: _run_probes(args), debug=args.debug,
                    resume_hint="rerun the same command to resume (finished probes are kept)")


def _run_probes(args) -> int:
    results = probe_target(config_from_args(ProbeSettings, args), config_from_args(ProbeTarget, args))
    for key, value in probe_summary(results).items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
