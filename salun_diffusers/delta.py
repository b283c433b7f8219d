"""The erasure file: only the weights SalUn changed, in one safetensors file (format described in
docs/erasure-format.md).

Layout of ``erasure.safetensors`` (format version 2):

* ``<param>.mask``   uint8, the parameter's mask as packed bits (numpy ``packbits`` order);
* ``<param>.values`` the erased values of the masked entries, in row-major order of the True positions;
* header metadata: ``format`` ("salun-erasure"), ``format_version``, ``fingerprint`` (sha256 of the U-Net's parameter
  names and shapes), ``base_sha256`` (JSON: per dtype, sha256 of the *base* U-Net's values at the masked positions),
  ``shapes`` (JSON), ``config`` (JSON: base model id/revision, concept, hyperparameters) and ``sha256`` (JSON: sha256
  of every tensor's bytes and of the other header fields), all verified on load.

``erasure_config.json`` beside it repeats the metadata for people and tools that do not read safetensors headers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

import torch
from huggingface_hub import hf_hub_download
from safetensors import safe_open
from safetensors.torch import save_file

from .masking import pack_mask, unpack_mask
from .utils import SEAL_KEY, atomic_path, check_seal, seal_header, write_json

logger = logging.getLogger(__name__)

DELTA_FORMAT = "salun-erasure"
DELTA_FORMAT_VERSION = 2
BASE_KEY = "base_sha256"
# the renderings of the base values whose hashes an erasure records (pipelines are loaded in any of these)
BASE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_FIX = "re-copy it, or re-run train_erase.py"
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


@torch.no_grad()
def base_values_digest(model: torch.nn.Module, mask: Mapping[str, torch.Tensor], dtypes=tuple(BASE_DTYPES),
                       values: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, str]:
    """Fingerprint of a U-Net's *values* where ``mask`` is True: per dtype name, sha256 over the masked entries
    (parameters in name order, entries in row-major order) rendered in that dtype. Computed from the base U-Net before
    training; on load it tells the base the erasure was made from from another base of the same shapes. ``values``:
    the masked entries already gathered (name -> ``param[mask]``), to skip gathering them again."""
    params = dict(model.named_parameters())
    hashes = {d: hashlib.sha256() for d in dtypes}
    for name in sorted(mask):
        if values is not None:
            entries = values[name]
        else:
            p = params[name].detach()
            entries = p[mask[name].to(p.device)]
        for d, h in hashes.items():
            h.update(entries.to(BASE_DTYPES[d]).cpu().contiguous().view(torch.uint8).numpy())
    return {d: h.hexdigest() for d, h in hashes.items()}


def _base_renderings(model: torch.nn.Module, names) -> list:
    """The dtype names to compare the base fingerprint in: the U-Net's own precision first, then narrower ones (an
    fp32 U-Net loaded from an fp16 copy of the right base matches at fp16)."""
    params = dict(model.named_parameters())
    present = {params[n].dtype for n in names}
    if present <= {torch.float32, torch.float64}:
        return ["float32", "float16", "bfloat16"]
    narrow = present - {torch.float32, torch.float64}
    if len(narrow) == 1 and next(iter(narrow)) in (torch.float16, torch.bfloat16):
        return [str(next(iter(narrow))).replace("torch.", "")]
    return []


def check_base_values(meta: Mapping, model: torch.nn.Module, mask: Mapping[str, torch.Tensor],
                      values: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Refuse a U-Net whose values at the masked positions (``values``, if already gathered) differ from the base the
    erasure was made from."""
    recorded = meta.get(BASE_KEY)
    if not recorded:
        if int(meta.get("format_version", 0) or 0) >= 2:
            logger.warning("this erasure records no fingerprint of its base values, so loading it onto another base "
                           "of the same architecture cannot be detected")
        return
    recorded = json.loads(recorded) if isinstance(recorded, str) else dict(recorded)
    order = [d for d in _base_renderings(model, mask) if d in recorded]
    if not order:
        raise ValueError("cannot check this erasure's base: the U-Net mixes float16 and bfloat16 weights; cast it to "
                         "one dtype, or pass check_base=False to apply the erasure without the check")
    for d in order:
        if base_values_digest(model, mask, (d,), values)[d] == recorded[d]:
            if d != order[0]:
                logger.info("erasure base matches at %s precision (the U-Net is %s)", d, order[0])
            return
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    base = cfg.get("base_model") or cfg.get("pretrained_model_name_or_path")
    raise ValueError(f"this erasure was made from other base weights (base model {base!r}): the U-Net has the right "
                     "shapes but different values where the erasure applies (e.g. SD1.5 instead of SD1.4); load the "
                     "base it was made from, or pass check_base=False (salun-audit: --no_erasure_check_base) to apply it "
                     "anyway")


def erasure_id(metadata: Mapping) -> Optional[str]:
    """A short identity of an erasure file: sha256 of its seal (which covers every tensor and header field)."""
    seal = metadata.get(SEAL_KEY)
    if not seal:
        return None
    text = seal if isinstance(seal, str) else json.dumps(seal, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
                dtype: torch.dtype = torch.float32, base_digest: Optional[Mapping[str, str]] = None) -> ErasureDelta:
    """Collect the masked entries of ``model``'s (erased) parameters. ``base_digest``: :func:`base_values_digest` of
    the base U-Net (taken before training), so loaders refuse another base; without it the file cannot say."""
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
    if base_digest:
        meta[BASE_KEY] = dict(base_digest)
    return ErasureDelta(kept, values, meta)


def save_delta(delta: ErasureDelta, directory: str) -> str:
    """Write ``erasure.safetensors`` and ``erasure_config.json`` into ``directory`` (atomically). Returns the file."""
    tensors = {}
    packed = pack_mask(delta.mask)
    for name in delta.values:
        tensors[f"{name}.mask"] = packed[name]
        tensors[f"{name}.values"] = delta.values[name]
    header = {
        "format": DELTA_FORMAT,
        "format_version": str(DELTA_FORMAT_VERSION),
        "fingerprint": str(delta.metadata["fingerprint"]),
        "shapes": json.dumps({n: list(m.shape) for n, m in delta.mask.items()}, sort_keys=True),
        "config": json.dumps(delta.metadata.get("config", {}), sort_keys=True),
    }
    if delta.metadata.get(BASE_KEY):
        header[BASE_KEY] = json.dumps(dict(delta.metadata[BASE_KEY]), sort_keys=True)
    header = seal_header(tensors, header)
    path = os.path.join(directory, WEIGHTS_NAME)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=header)
    summary = {k: v for k, v in delta.metadata.items() if k != SEAL_KEY}
    summary.update({"format_version": DELTA_FORMAT_VERSION, "num_changed": delta.num_changed(),
                    "num_tensors": len(delta.values)})
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

    try:
        return hf_hub_download(source, WEIGHTS_NAME, subfolder=subfolder, revision=revision, cache_dir=cache_dir)
    except Exception as exc:
        raise FileNotFoundError(f"could not find erasure {source!r} locally or on the hub ({exc.__class__.__name__}: "
                                f"{exc}); pass a local folder or file") from exc


def read_delta(source, *, metadata: Optional[Mapping] = None, revision: Optional[str] = None,
               subfolder: Optional[str] = None, cache_dir: Optional[str] = None):
    """Raw ``(tensors, metadata)`` from a folder, file, hub id, or an in-memory dict of tensors.

    The file's integrity seal (sha256 of every tensor and of the header) is verified here, before anything is parsed;
    a format-1 file (no seal) is read with a warning. An in-memory dict is verified when ``metadata`` carries a seal.
    """
    if isinstance(source, Mapping):
        tensors = dict(source)
        meta = dict(metadata or {})
        what = "the erasure passed in memory"
    else:
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
        what = f"erasure file {path!r}"
    version = meta.get("format_version")
    try:
        version = None if version is None else int(version)
    except ValueError:
        raise ValueError(f"{what} has format_version {version!r}, not a number; the file is corrupt: {_FIX}") from None
    if SEAL_KEY in meta:
        check_seal(tensors, meta, what, _FIX)
    elif version is not None and version >= 2:
        raise ValueError(f"{what} claims format version {version} but has no {SEAL_KEY} seal; the file is corrupt: "
                         f"{_FIX}")
    elif version is not None:
        logger.warning("%s is format version %s: it has no integrity seal and no fingerprint of its base values, so "
                       "corruption or a wrong base cannot be detected; re-save it as version %d (see "
                       "docs/erasure-format.md)", what, version, DELTA_FORMAT_VERSION)
    for key in ("shapes", "config", BASE_KEY):
        if isinstance(meta.get(key), str):
            try:
                meta[key] = json.loads(meta[key])
            except ValueError:
                raise ValueError(f"{what}: header field {key!r} is not valid JSON; the file is corrupt: {_FIX}") \
                    from None
    if version is not None:
        meta["format_version"] = version
    return tensors, meta


def parse_delta(tensors: Mapping[str, torch.Tensor], meta: Mapping, model: torch.nn.Module,
                check_fingerprint: bool = True, check_base: bool = True) -> ErasureDelta:
    """Validate raw tensors against ``model`` (strict keys, shapes, counts, finite values, fingerprint of names and
    shapes, and with ``check_base`` the fingerprint of the base values) and unpack them.

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
        if not bool(torch.isfinite(values[name]).all()):
            raise ValueError(f"erasure values for {name!r} hold NaN or infinity: the erasure is broken (its training "
                             "diverged); re-run train_erase.py, e.g. with a lower --learning_rate")
    mask = unpack_mask(packed, {n: tuple(params[n].shape) for n in names})
    for name in names:
        if int(mask[name].sum()) != values[name].numel():
            raise ValueError(f"erasure entry {name!r}: mask selects {int(mask[name].sum())} weights but "
                             f"{values[name].numel()} values are stored; the file is corrupt")
    if check_base:
        check_base_values(meta, model, mask)
    return ErasureDelta(mask, values, dict(meta))
