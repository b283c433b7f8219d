"""Command-line helpers: an argparse parser from a dataclass config (flag names = field names, help from field
metadata), and one-line errors for user mistakes (exit code 2; the traceback only with ``--debug``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Callable

# User mistakes: bad values or files (missing, unreadable, not UTF-8, not writable). Anything else is a bug: traceback.
USER_ERRORS = (ValueError, OSError)


def flag_field(default, help: str, **kw):
    """A dataclass field whose metadata carries its flag's help text (and extra argparse keywords: choices, nargs)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def add_debug_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--debug", action="store_true", help="on an error, show the full Python traceback instead "
                        "of one line")
    return parser


def run_main(prog: str, fn: Callable[[], int], debug: bool = False) -> int:
    """``fn()``; a user mistake (:data:`USER_ERRORS`) becomes ``prog: error: <message>`` on one line of stderr and
    exit code 2 (re-raised with ``debug``)."""
    try:
        return fn()
    except USER_ERRORS as exc:
        if debug:
            raise
        from tqdm.auto import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):  # a progress bar left open by the error: end its line
            bar.close()
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{prog}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, typing.List):
        return _base_type(typing.get_args(tp)[0])
    return tp


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls) -> argparse.ArgumentParser:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        kwargs = {"help": meta.pop("help", None), "dest": f.name}
        default = f.default if f.default is not dataclasses.MISSING else None
        tp = _base_type(hints[f.name])
        if tp is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default, **kwargs)
            continue
        kwargs.update(type=tp, default=default, **meta)
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser
