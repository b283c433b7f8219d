"""Build an argparse parser from a dataclass config (flag names = field names, help from field metadata)."""

from __future__ import annotations

import argparse
import dataclasses
import typing


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
