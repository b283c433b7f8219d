"""Small shared helpers: atomic writes, JSON files, torch dtypes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

import torch


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it over ``path`` (never a half-written file)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        yield tmp
        # after the writer: mkstemp makes 0600 files, and writers that replace the file (safetensors' save_file)
        # make their own 0600 file; the final file follows the umask like any ordinary file
        follow_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def follow_umask(path: str) -> None:
    """Give ``path`` (and, for a folder, everything in it) the permissions ``open``/``mkdir`` would: 0666 / 0777
    less the umask (temp files and folders, and safetensors' files, are created 0600 / 0700)."""
    umask = _umask()
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (an existing ``path`` is moved
    aside first and removed once the new folder is in place), so ``path`` is never a half-written folder."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(path)}-", dir=parent)
    try:
        yield tmp
        follow_umask(tmp)
        old = None
        if os.path.lexists(path):
            old = tempfile.mkdtemp(prefix=f".old-{os.path.basename(path)}-", dir=parent)
            os.replace(path, os.path.join(old, "x"))
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str, obj: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown precision {name!r}; use one of {sorted(DTYPES)}") from None


class JsonConfigMixin:
    """JSON round trip for dataclass configs (peft style): unknown keys are refused, not silently dropped."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_json_file(self, path: str) -> None:
        write_text(path, self.to_json_string() + "\n")

    @classmethod
    def from_dict(cls, data):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys: {sorted(names)}")
        return cls(**dict(data))

    @classmethod
    def from_json_string(cls, text: str):
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_json_file(cls, path: str):
        with open(path) as f:
            return cls.from_dict(json.load(f))
