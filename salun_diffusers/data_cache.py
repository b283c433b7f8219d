"""Keys of the generated-data cache: the folder of one prompt's generated images (keyed by everything that changes
them) and the key and checksum of the shipped digit data (:class:`salun_diffusers.digits.ShippedData`)."""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

from .utils import pipeline_fingerprint


def slug(text: str) -> str:
    """A file-name-safe short form of a prompt (lower case, runs of other characters as ``-``, at most 60)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "prompt"


def model_signature(source: str) -> list:
    """What identifies a base model's weights for the data cache: for a local folder its files' sizes and
    modification times (a folder rewritten in place gets new data), for a hub id nothing more (the revision is in
    the key)."""
    if not os.path.isdir(source):
        return []
    sig = []
    for root, _, files in sorted(os.walk(source)):
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            sig.append([os.path.relpath(os.path.join(root, name), source), st.st_size, int(st.st_mtime)])
    return sig


def generation_dir(cache_dir: str, model_id: str, revision, prompt: str, steps: int, guidance: float,
                   size: int, extra=()) -> str:
    """Cache folder of one prompt's generated images, keyed by everything that changes the images (``extra``: the
    model's signature, the variant and generation precision)."""
    key = json.dumps([model_id, revision, prompt, steps, guidance, size, *extra])
    return os.path.join(cache_dir, f"{slug(prompt)}-{hashlib.sha256(key.encode()).hexdigest()[:10]}")


def shipped_data_key(pipe, steps: int, guidance: float, size: int, variant=None, precision: str = "no",
                     sampling=None) -> str:
    """The key the shipped digit data is stored under: the pipeline's fingerprint and the generation settings
    (``sampling``: further pipeline-call settings, e.g. an SD3 world's T5 length; none for a U-Net)."""
    return pipeline_fingerprint(pipe, {"steps": steps, "guidance": guidance, "size": size, "variant": variant,
                                       "precision": precision, "v": 1, **(sampling or {})})


def shipped_arrays_sha256(arrays) -> str:
    """sha256 over the shipped image arrays (names, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def shipped_array_name(prompt: str, first_seed: int) -> str:
    return f"{slug(prompt)}_{int(first_seed)}"
