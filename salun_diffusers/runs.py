"""The resume guard shared by the tools that resume a run in its output folder (``salun-audit``, ``salun-attack``):
the folder's ``settings.json`` records what its results depend on, and a rerun with other settings is refused."""

from __future__ import annotations

import json
import os
from typing import List

from .utils import write_json

SETTINGS_FILE = "settings.json"


def settings_diff(old: dict, new: dict) -> List[str]:
    """The keys whose values differ between two settings dicts (sorted)."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def check_resume_settings(output_dir: str, settings: dict, holds: str = "a run",
                          kept: str = "finished results are never redone or mixed", write: bool = True) -> None:
    """Refuse (``ValueError``) to resume in ``output_dir`` when its ``settings.json`` differs from ``settings``; record
    them when there is none yet (only where ``write``: the main process of a multi-process run). ``holds`` names what
    the folder holds and ``kept`` why a new folder is needed, for the one-line error."""
    path = os.path.join(output_dir, SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        changed = settings_diff(old, settings)
        if changed:
            raise ValueError(f"{output_dir} holds {holds} with other settings ({', '.join(changed)} differ); use a "
                             f"new --output_dir ({kept})")
    elif write:
        write_json(path, settings)
