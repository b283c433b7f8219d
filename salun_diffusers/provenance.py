"""What a figure depends on besides its command: package versions, machine, threads and the sha256 of the files it
read (the NudeNet model, a prompt file), recorded beside results, and the settings two records disagree on.

:func:`environment_record` is a JSON-able dict; :func:`diff_records` compares two such dicts (or any nested
settings: seeds, guidance, steps) and names every entry that differs, e.g. ``torch: 2.13.0 -> 2.14.1``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
from typing import Any, Dict, List, Mapping, Optional

import torch

PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "nudenet", "onnxruntime")
_ABSENT = object()


def package_version(name: str) -> Optional[str]:
    """The installed distribution's version, ``None`` when it is not installed (nothing is imported)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cpu_name() -> Optional[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _gpus() -> Optional[List[str]]:
    if not torch.cuda.is_available():
        return None
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def environment_record(extra_files: Optional[Mapping[str, Optional[str]]] = None) -> Dict[str, Any]:
    """Versions, machine and thread settings that can change a figure, and ``{"files": {label: {"path",
    "sha256"}}}`` for ``extra_files`` (``{label: path}``; a ``None`` path is recorded as absent, a path that does not
    exist is an error). Packages that are not installed are ``None``."""
    record: Dict[str, Any] = {"python": platform.python_version()}
    record.update({name: package_version(name) for name in PACKAGES})
    record.update({
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "gpu": _gpus(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    })
    files = {}
    for label, path in (extra_files or {}).items():
        if path is None:
            files[label] = None
            continue
        if not os.path.isfile(path):
            raise FileNotFoundError(f"cannot record {label!r}: no file at {path!r}")
        files[label] = {"path": os.path.abspath(path), "sha256": file_sha256(path)}
    record["files"] = files
    return record


def _flatten(record: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(not recorded)"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "..."  # a sha256: the first 12 digits tell two files apart
    if isinstance(value, list):
        return ", ".join(map(str, value)) if value else "[]"
    return str(value)


def diff_records(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
    """One line per setting that differs between two records (nested entries by dotted name, in ``old``'s order
    then ``new``'s), e.g. ``"torch: 2.13.0 -> 2.14.1"`` or ``"files.prompts.sha256: 3f2a... -> 9c1b..."``; an empty
    list when they agree."""
    a, b = _flatten(old), _flatten(new)
    lines = []
    for key in list(a) + [k for k in b if k not in a]:
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if va != vb or isinstance(va, bool) != isinstance(vb, bool):  # True == 1, but a flag is not a count
            lines.append(f"{key}: {_show(va)} -> {_show(vb)}")
    return lines
