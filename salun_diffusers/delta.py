"""The erasure file: only the weights SalUn changed, in one safetensors file.

Layout of ``erasure.safetensors``:

* ``<param>.mask``   uint8, the parameter's mask as packed bits (numpy ``packbits`` order);
* ``<param>.values`` the erased values of the masked entries, in row-major order of the True positions;
* header metadata: ``format`` ("salun-erasure"), ``format_version``, ``fingerprint`` (sha256 of the U-Net's parameter
  names and shapes), ``shapes`` (JSON), ``config`` (JSON: base model id/revision, concept, hyperparameters).

``erasure_config.json`` beside it repeats the metadata for people and tools that do not read safetensors headers.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

import torch

from .masking import pack_mask, unpack_mask

DELTA_FORMAT = "salun-erasure"
DELTA_FORMAT_VERSION = 1
WEIGHTS_NAME = "erasure.safetensors"
CONFIG_NAME = "erasure_config.json"
MASK_NAME = "mask.safetensors"


def model_fingerprint(model_or_shapes) -> str:
    """sha256 over sorted ``name:shape`` lines of a module's parameters (or a name -> shape mapping)."""
    if isinstance(model_or_shapes, torch.nn.Module):
        shapes = {n: tuple(p.shape) for n, p in model_or_shapes.named_parameters()}
    else:
        shapes = {n: tuple(s) for n, s in model_or_shapes.items()}
    text = "\n".join(f"{n}:{list(shapes[n])}" for n in sorted(shapes))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class ErasureDelta:
    """Parsed, validated erasure: per-parameter boolean masks and the masked entries' erased values."""

    mask: Dict[str, torch.Tensor]
    values: Dict[str, torch.Tensor]
    metadata: Dict[str, object]

    @property
    def config(self) -> dict:
        return self.metadata.get("config", {})

    def num_changed(self) -> int:
        return sum(v.numel() for v in self.values.values())


def build_delta(model: torch.nn.Module, mask: Mapping[str, torch.Tensor], config: Optional[dict] = None,
                dtype: torch.dtype = torch.float32) -> ErasureDelta:
    """Collect the masked entries of ``model``'s (erased) parameters."""
    params = dict(model.named_parameters())
    values, kept = {}, {}
    for name, m in mask.items():
        if not bool(m.any()):
            continue
        p = params[name].detach()
        m = m.to(p.device)
        kept[name] = m.cpu()
        values[name] = p[m].to(dtype).cpu().contiguous()
    meta = {"format": DELTA_FORMAT, "format_version": DELTA_FORMAT_VERSION, "fingerprint": model_fingerprint(model),
            "config": config or {}}
    return ErasureDelta(kept, values, meta)


def save_delta(delta: ErasureDelta, directory: str) -> str:
    """Write ``erasure.safetensors`` and ``erasure_config.json`` into ``directory`` (atomically). Returns the file."""
    from safetensors.torch import save_file

    from .utils import atomic_path, write_json

    tensors = {}
    packed = pack_mask(delta.mask)
    for name in delta.values:
        tensors[f"{name}.mask"] = packed[name]
        tensors[f"{name}.values"] = delta.values[name]
    header = {
        "format": DELTA_FORMAT,
        "format_version": str(DELTA_FORMAT_VERSION),
        "fingerprint": str(delta.metadata["fingerprint"]),
        "shapes": json.dumps({n: list(m.shape) for n, m in delta.mask.items()}),
        "config": json.dumps(delta.metadata.get("config", {}), sort_keys=True),
    }
    path = os.path.join(directory, WEIGHTS_NAME)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=header)
    summary = dict(delta.metadata)
    summary.update({"num_changed": delta.num_changed(), "num_tensors": len(delta.values)})
    write_json(os.path.join(directory, CONFIG_NAME), summary)
    return path


def _resolve_file(source: str, revision: Optional[str] = None, subfolder: Optional[str] = None,
                  cache_dir: Optional[str] = None) -> str:
    if os.path.isfile(source):
        return source
    if os.path.isdir(source):
        path = os.path.join(source, subfolder or "", WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {source!r}; pass the --output_dir of train_erase.py or "
                                    "the .safetensors file itself")
        return path
    looks_like_hub_id = source.count("/") <= 1 and not source.startswith((".", "/", "~"))
    if source.endswith(".safetensors") or not looks_like_hub_id:
        raise FileNotFoundError(f"erasure {source!r} does not exist (not a file, folder or hub id)")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(source, WEIGHTS_NAME, subfolder=subfolder, revision=revision, cache_dir=cache_dir)
    except Exception as exc:
        raise FileNotFoundError(f"could not find erasure {source!r} locally or on the hub ({exc.__class__.__name__}: "
                                f"{exc}); pass a local folder or file") from exc


def read_delta(source, *, metadata: Optional[Mapping] = None, revision: Optional[str] = None,
               subfolder: Optional[str] = None, cache_dir: Optional[str] = None):
    """Raw ``(tensors, metadata)`` from a folder, file, hub id, or an in-memory dict of tensors."""
    if isinstance(source, Mapping):
        tensors = dict(source)
        meta = dict(metadata or {})
    else:
        from safetensors import safe_open

        path = _resolve_file(str(source), revision, subfolder, cache_dir)
        try:
            with safe_open(path, framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise ValueError(f"{path!r} is not a readable erasure file ({exc}); it may be truncated or corrupt: "
                             "re-copy it or re-run train_erase.py") from exc
        if meta.get("format") != DELTA_FORMAT:
            raise ValueError(f"{path!r} is not a SalUn erasure (format={meta.get('format')!r}); a mask file? "
                             f"load the {WEIGHTS_NAME} written by train_erase.py")
    for key in ("shapes", "config"):
        if isinstance(meta.get(key), str):
            meta[key] = json.loads(meta[key])
    if "format_version" in meta:
        meta["format_version"] = int(meta["format_version"])
    return tensors, meta


def parse_delta(tensors: Mapping[str, torch.Tensor], meta: Mapping, model: torch.nn.Module,
                check_fingerprint: bool = True) -> ErasureDelta:
    """Validate raw tensors against ``model`` (strict keys, shapes, counts, fingerprint) and unpack them.

    Raises ``ValueError`` naming the problem; nothing is modified.
    """
    version = meta.get("format_version", DELTA_FORMAT_VERSION)
    if version > DELTA_FORMAT_VERSION:
        raise ValueError(f"erasure format version {version} is newer than this salun-diffusers understands "
                         f"({DELTA_FORMAT_VERSION}); upgrade: pip install -U salun-diffusers")
    fingerprint = meta.get("fingerprint")
    if check_fingerprint and fingerprint and fingerprint != model_fingerprint(model):
        base = meta.get("config", {}).get("pretrained_model_name_or_path")
        raise ValueError("this erasure was made for a different U-Net (parameter names/shapes differ): load it into "
                         f"the base model it was trained from ({base!r})")
    params = dict(model.named_parameters())
    names = set()
    for key in tensors:
        name, _, suffix = key.rpartition(".")
        if suffix not in ("mask", "values") or not name:
            raise ValueError(f"unexpected key {key!r} in erasure: keys must be '<parameter>.mask' or "
                             "'<parameter>.values'")
        if name not in params:
            raise ValueError(f"erasure key {key!r} names no parameter of this U-Net; wrong base model?")
        names.add(name)
    shapes = {n: tuple(s) for n, s in (meta.get("shapes") or {}).items()}
    packed, values = {}, {}
    for name in sorted(names):
        if f"{name}.mask" not in tensors or f"{name}.values" not in tensors:
            raise ValueError(f"erasure entry {name!r} lacks its .mask or .values tensor; the file is corrupt")
        shape = shapes.get(name, tuple(params[name].shape))
        if shape != tuple(params[name].shape):
            raise ValueError(f"erasure entry {name!r} has shape {shape}, the U-Net has {tuple(params[name].shape)}")
        packed[name] = tensors[f"{name}.mask"]
        values[name] = tensors[f"{name}.values"]
        if not values[name].is_floating_point():
            raise ValueError(f"erasure values for {name!r} are {values[name].dtype}, expected a float dtype")
    mask = unpack_mask(packed, {n: tuple(params[n].shape) for n in names})
    for name in names:
        if int(mask[name].sum()) != values[name].numel():
            raise ValueError(f"erasure entry {name!r}: mask selects {int(mask[name].sum())} weights but "
                             f"{values[name].numel()} values are stored; the file is corrupt")
    return ErasureDelta(mask, values, dict(meta))
