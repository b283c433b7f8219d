"""Small shared helpers: atomic writes, JSON files, torch dtypes, sha256 seals of safetensors files."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Dict, Iterator, Mapping

import torch

__version__ = "0.1.0"  # the package's version (pyproject.toml says the same); salun_diffusers.__version__ is this

# Third-party modules the package imports inside functions, where they are used (the one exception to "imports at
# module top", enforced by tests/test_layers.py): optional extras (nudenet, torchvision, bitsandbytes, wandb), the
# POSIX-only fcntl, and heavy libraries that only a report or a metric needs (matplotlib, scipy, scikit-learn).
OPTIONAL_DEPENDENCIES = ("bitsandbytes", "fcntl", "matplotlib", "nudenet", "scipy", "sklearn", "torchvision", "wandb")


def flag_field(default, help: str, **kw):
    """A dataclass field whose metadata carries its flag's help text (and extra argparse keywords: choices, nargs)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


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
    less the umask (temp files and folders, and safetensors' files, are created 0600 / 0700). Symbolic links are
    left alone (chmod would change their targets)."""
    umask = _umask()
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)
    for root, dirs, files in os.walk(path):
        for name, mode in [(d, 0o777) for d in dirs] + [(f, 0o666) for f in files]:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), mode & ~umask)


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


def user_cache_dir(*parts: str) -> str:
    """The user cache of salun-diffusers (generated data, base-model verdicts): ``$SALUN_DIFFUSERS_CACHE``, else
    ``$XDG_CACHE_HOME/salun_diffusers``, else ``~/.cache/salun_diffusers``; ``parts`` are joined below it."""
    root = os.environ.get("SALUN_DIFFUSERS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "salun_diffusers")
    return os.path.join(root, *parts)


def read_json_or_none(path: str):
    """The JSON object in ``path``, or None when the file is missing or unreadable (a corrupt cache entry is
    ignored, and the caller rewrites it)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def content_fingerprint(*parts) -> str:
    """sha256 of modules' weights (names, dtypes, shapes, bytes) and of JSON-able settings, in order: a key for
    caches of results that depend on exactly these weights."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.nn.Module):
            for name, t in sorted(part.state_dict().items()):
                t = t.detach().cpu().contiguous()
                h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


def pipeline_fingerprint(pipe, *settings) -> str:
    """:func:`content_fingerprint` of a diffusion pipeline's weights (U-Net, VAE, text encoder) and scheduler (class
    and config), then ``settings``: the key of caches of what the pipeline draws."""
    if getattr(pipe, "transformer", None) is not None:  # SD3 / FLUX: the transformer and every text encoder
        encoders = [getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")]
        return content_fingerprint(pipe.transformer, pipe.vae, *[e for e in encoders if e is not None],
                                   dict(pipe.scheduler.config), type(pipe.scheduler).__name__, *settings)
    return content_fingerprint(pipe.unet, pipe.vae, pipe.text_encoder, dict(pipe.scheduler.config),
                               type(pipe.scheduler).__name__, *settings)


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


def cast_module(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module.to(dtype)`` without the warning diffusers (0.42) prints on every dtype cast of a model even when it
    keeps no module in float32 (it lists an empty ``[]``); a model that does keep some still gets its own ``.to()``,
    warning included."""
    if getattr(module, "_keep_in_fp32_modules", None):
        return module.to(dtype=dtype)
    return torch.nn.Module.to(module, dtype=dtype)


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


# ----------------------------------------------------------------------------------------------- CPU threads

# Below this many parameters a model runs on one torch thread. Measured on the 2-core machine (issue 12): one digit
# U-Net (1.0M parameters) forward+backward at batch 16 takes 34 ms on one thread and 6.7 s with two threads when
# another process keeps one core busy (intra-op threads wait on each other at every op); a small model gains
# little from a second thread even on an idle machine, so it gets one. ResNet-18 (11M) and SD U-Nets get every core.
SMALL_MODEL_PARAMETERS = 5_000_000
_threads_state = {"requested": None, "logged": None}


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def configure_threads(num_parameters: int, threads=None) -> int:
    """Set torch's intra-op thread count for a model of ``num_parameters`` and return it.

    ``threads`` (a ``--threads`` flag; remembered for later calls in the process) wins, then the user's
    ``OMP_NUM_THREADS`` (torch already honours it), then the policy: one thread for a small model
    (< ``SMALL_MODEL_PARAMETERS``), otherwise every core the process may use. Logged once (again only if it changes).
    """
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        _threads_state["requested"] = int(threads)
    if _threads_state["requested"]:
        n, why = _threads_state["requested"], "--threads"
    elif os.environ.get("OMP_NUM_THREADS", "").strip():
        n, why = torch.get_num_threads(), "OMP_NUM_THREADS"
    else:
        cores = available_cores()
        small = num_parameters < SMALL_MODEL_PARAMETERS
        n = 1 if small else cores
        why = f"{num_parameters / 1e6:.1f}M parameters ({'small' if small else 'large'} model), {cores} cores usable"
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if _threads_state["logged"] != n:
        logging.getLogger(__name__).info("torch threads: %d (%s; override with --threads or OMP_NUM_THREADS)", n, why)
        _threads_state["logged"] = n
    return n
