"""One way to be a command-line tool, for every entry point (``train_erase.py``, ``salun-audit``, ``salun-attack``,
``salun-classifier``).

* :func:`build_parser`: an argparse parser whose flags come from dataclass configs (flag names = field names, help
  from field metadata), with ``--debug``, and argparse errors on one line naming ``--help``.
* :func:`run_main`: runs the tool; a user mistake (:data:`USER_ERRORS`) becomes ``prog: error: <message> (--debug
  shows the traceback)`` on one line of stderr and exit code 2, as does a diverged run (``FloatingPointError``: a
  non-finite loss, gradient or weight); running out of memory exits 1 with one line; Ctrl-C exits 130 (with how to
  resume, where the tool resumes). ``--debug`` re-raises errors (not Ctrl-C).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .utils import flag_field  # noqa: F401  (the dataclass field of a flag: kept here for the CLI modules)

# User mistakes: bad values or files (missing, unreadable, not UTF-8, not writable, an output folder in use), and a
# missing optional dependency (its ImportError says what to install). Anything else is a bug: traceback.
USER_ERRORS = (ValueError, OSError, ImportError)
# What an out-of-memory error advises, unless the tool says more.
OOM_ADVICE = "Use a smaller --batch_size or --mixed_precision bf16"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5: only the cuda one


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage (40 lines) before an error: one line is enough."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


class _BoolFlag(argparse.Action):
    """``--flag``, ``--flag true|false``, ``--no_flag`` and ``--no-flag`` (what both argparse's BooleanOptionalAction
    and transformers' HfArgumentParser accept; with dash aliases also ``--no-the-flag``)."""

    def __init__(self, option_strings, dest, **kwargs):
        names = [s[2:] for s in option_strings]
        negatives = [f"--no_{names[0]}", *(f"--no-{n}" for n in names)]
        super().__init__([*option_strings, *negatives], dest, nargs="?", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        text = "true" if values is None else str(values).lower()
        if text not in ("yes", "true", "t", "y", "1", "no", "false", "f", "n", "0"):
            raise argparse.ArgumentError(self, f"expected true or false, got {values!r}")
        value = text in ("yes", "true", "t", "y", "1")
        setattr(namespace, self.dest, not value if option_string.startswith("--no") else value)

    def format_usage(self):
        return " | ".join(self.option_strings[:2])


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, typing.List):
        return _base_type(typing.get_args(tp)[0])
    return tp


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls,
                            dash_aliases: bool = False) -> argparse.ArgumentParser:
    """A ``--name`` flag per field of the dataclass ``cls`` (and ``--the-name`` for ``the_name`` with
    ``dash_aliases``, as transformers' HfArgumentParser spells them); a field without a default is a required flag."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flags = [f"--{f.name}"]
        if dash_aliases and "_" in f.name:
            flags.append(f"--{f.name.replace('_', '-')}")
        meta = dict(f.metadata)
        kwargs = {"help": meta.pop("help", None), "dest": f.name}
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default, kwargs["required"] = None, True
        tp = _base_type(hints[f.name])
        if tp is bool:
            parser.add_argument(*flags, action=_BoolFlag, default=default, **kwargs)
            continue
        kwargs.update(type=tp, default=default, **meta)
        parser.add_argument(*flags, **kwargs)
    return parser


def build_parser(prog: str, description: Optional[str] = None, *configs, epilog: Optional[str] = None,
                 dash_aliases: bool = False) -> OneLineParser:
    """The parser of an entry point: one flag per field of each dataclass in ``configs`` (see
    :func:`add_dataclass_arguments`), plus ``--debug`` unless a config has that field; more flags may be added by the
    caller. Its errors are one line (exit code 2)."""
    parser = OneLineParser(prog=prog, description=description, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    for cls in configs:
        add_dataclass_arguments(parser, cls, dash_aliases)
    if "debug" not in {f.name for cls in configs for f in dataclasses.fields(cls)}:
        parser.add_argument("--debug", action="store_true",
                            help="On an error, show the full Python traceback instead of one line.")
    return parser


def config_from_args(cls, args: argparse.Namespace):
    """The dataclass ``cls`` from the parsed flags of its fields (others, such as ``--debug``, are left out)."""
    values = vars(args)
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


def argv_or_sys(argv: Optional[Sequence[str]]) -> list:
    return list(sys.argv[1:] if argv is None else argv)


def setup_logging(level=logging.INFO) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format=LOG_FORMAT)


def _one_line(prog: str, exc: BaseException, tail: str = "(--debug shows the traceback)") -> None:
    for bar in list(getattr(tqdm, "_instances", ())):  # a progress bar left open by the error: end its line first
        bar.close()
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"{prog}: error: {message} {tail}".rstrip(), file=sys.stderr)


def run_main(prog: str, fn: Callable[[], int], debug: bool = False, resume_hint: Optional[str] = None,
             oom_advice: str = OOM_ADVICE) -> int:
    """``fn()``'s exit code. One line on stderr and: 2 for a user mistake (:data:`USER_ERRORS`) or a diverged run
    (``FloatingPointError``: the fix is a setting, named in the message); 1 for ``torch.OutOfMemoryError`` (with
    ``oom_advice``); 130 on Ctrl-C (with
    ``resume_hint``, how to continue, where the tool resumes). With ``debug`` an error is re-raised (traceback).
    A process group still open when ``fn`` ends (an error in a multi-process run) is left before the process exits."""
    try:
        return _main(prog, fn, debug, resume_hint, oom_advice)
    finally:
        leave_process_group()


def leave_process_group() -> None:
    """Destroy this process's ``torch.distributed`` group if one is open. A gloo process that exited with its group
    still open aborted now and then at exit (SIGABRT, "terminate called without an active exception", after its
    one-line error: 5 of 20 two-process runs of a script that all-reduces and exits 2; 0 of 60 with this)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _main(prog: str, fn: Callable[[], int], debug: bool, resume_hint: Optional[str], oom_advice: str) -> int:
    try:
        return fn()
    except FloatingPointError as exc:
        if debug:
            raise
        _one_line(prog, exc)
        return 2
    except OutOfMemoryError as exc:  # a setting to change, not a bug (a RuntimeError, not an OSError)
        if debug:
            raise
        _one_line(prog, RuntimeError(f"{str(exc).splitlines()[0] if str(exc) else 'out of memory.'} {oom_advice}"))
        return 1
    except USER_ERRORS as exc:
        if debug:
            raise
        _one_line(prog, exc)
        return 2
    except KeyboardInterrupt:  # not an error: no traceback, even with debug
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
        print(f"{prog}: interrupted" + (f"; {resume_hint}" if resume_hint else ""), file=sys.stderr)
        return 130
