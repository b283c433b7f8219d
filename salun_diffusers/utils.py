"""Small shared helpers: atomic writes, JSON files, torch dtypes, sha256 seals of safetensors files."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Any, Dict, Iterator, Mapping

import torch


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it over ``path`` (never a half-written file)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the final file ordinary permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def ensure_writable_dir(path: str, flag: str = "--output_dir") -> None:
    """Create ``path`` if needed and prove a file can be written in it, before any work (one-line ``ValueError``)."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise ValueError(f"{flag} {path!r} cannot be created or written ({exc.strerror or exc}); choose a folder you "
                         "can write to") from None


def write_json(path: str, obj: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as safetensors stores them (row-major, little-endian)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()


SEAL_KEY = "sha256"


def _header_text(header: Mapping[str, Any]) -> str:
    """The header fields other than the seal, canonical: strings as written, anything else as sorted JSON."""
    fields = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in header.items()
              if k != SEAL_KEY}
    return json.dumps(fields, sort_keys=True)


def seal_header(tensors: Mapping[str, torch.Tensor], header: Mapping[str, str]) -> Dict[str, str]:
    """``header`` plus a ``sha256`` field: JSON ``{"tensors": {key: sha256 of its bytes}, "header": sha256 of the
    other header fields}``, so a changed byte anywhere in the payload or metadata is detected on load."""
    seal = {"tensors": {k: tensor_sha256(t) for k, t in sorted(tensors.items())},
            "header": hashlib.sha256(_header_text(header).encode()).hexdigest()}
    return {**header, SEAL_KEY: json.dumps(seal, sort_keys=True)}


def check_seal(tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any], what: str, fix: str) -> None:
    """Verify the ``sha256`` field written by :func:`seal_header`; ``ValueError`` naming the first mismatch."""
    seal = header.get(SEAL_KEY)
    try:
        seal = json.loads(seal) if isinstance(seal, str) else dict(seal)
        recorded, header_digest = dict(seal["tensors"]), str(seal["header"])
    except (TypeError, ValueError, KeyError):
        raise ValueError(f"{what} has an unreadable {SEAL_KEY} field; the file is corrupt: {fix}") from None
    problem = None
    if hashlib.sha256(_header_text(header).encode()).hexdigest() != header_digest:
        problem = "its metadata (header) changed"
    elif sorted(recorded) != sorted(tensors):
        extra, lacking = sorted(set(tensors) - set(recorded)), sorted(set(recorded) - set(tensors))
        problem = f"tensors were added {extra[:3]} or removed {lacking[:3]}"
    else:
        bad = next((k for k in sorted(tensors) if tensor_sha256(tensors[k]) != recorded[k]), None)
        if bad is not None:
            problem = f"the bytes of tensor {bad!r} changed"
    if problem:
        raise ValueError(f"{what} fails its integrity check: {problem} since it was written (sha256 mismatch); "
                         f"it was modified or corrupted: {fix}")


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
