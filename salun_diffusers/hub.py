"""Where models are: the bundled digit model's id, base-model resolution to a local folder, and pushing an output
folder to the Hugging Face Hub. On the core layer (tests/test_layers.py), so every layer above it may use it."""

from __future__ import annotations

import logging
import os
from typing import Optional

from huggingface_hub import HfApi, snapshot_download

from .digits import DIGIT_PIPELINE_DIR, DIGIT_SD3_PIPELINE_DIR

logger = logging.getLogger(__name__)

BUNDLED_DIGIT_MODEL = "salun-diffusers/digit-sd"
BUNDLED_DIGIT_SD3_MODEL = "salun-diffusers/digit-sd3"  # the flow-matching (SD3-format) digit world
BUNDLED_MODELS = {BUNDLED_DIGIT_MODEL: DIGIT_PIPELINE_DIR, BUNDLED_DIGIT_SD3_MODEL: DIGIT_SD3_PIPELINE_DIR}
# What an output folder never uploads: the generated-data cache, training checkpoints, tracker logs, temp files.
HUB_IGNORE_PATTERNS = ["data/**", "checkpoint-*/**", "logs/**", "validation/**", ".tmp-*", "**/.tmp-*", ".old-*"]


def is_hub_id(name: str) -> bool:
    """``owner/name`` as the Hub spells repositories (not a path: no leading ./ ~ /, no file suffix)."""
    parts = name.split("/")
    return (len(parts) == 2 and all(parts) and not name.startswith((".", "~"))
            and not name.endswith((".safetensors", ".bin", ".pt")))


def resolve_base_model(name_or_path: str) -> str:
    """Map a bundled digit model's id to its folder inside the package; anything else is returned as is."""
    return BUNDLED_MODELS.get(name_or_path, name_or_path)


def local_model_dir(name_or_path: str, revision: Optional[str] = None) -> str:
    """The local folder holding a base model's files: the folder itself, the bundled model's folder, or a hub id's
    snapshot in the Hugging Face cache (never downloaded here: the base was loaded, so its files are cached)."""
    path = resolve_base_model(name_or_path)
    if os.path.isdir(path):
        return os.path.abspath(path)
    try:
        return snapshot_download(path, revision=revision, local_files_only=True)
    except Exception as exc:  # noqa: BLE001  (huggingface_hub raises several kinds for "not cached")
        raise FileNotFoundError(f"no local copy of the base model {name_or_path!r} in the Hugging Face cache "
                                f"({type(exc).__name__}); pass --save_pipeline none, or a local folder as "
                                "--pretrained_model_name_or_path") from None


def push_to_hub(folder: str, repo_id: str, token: Optional[str] = None, private: Optional[bool] = None,
                commit_message: str = "SalUn erasure (salun-diffusers)") -> str:
    """Create ``repo_id`` (if needed) and upload ``folder`` without its data cache, checkpoints and logs (symlinked
    pipeline components are uploaded as the files they point to). Returns the repo URL."""
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model", commit_message=commit_message,
                      ignore_patterns=HUB_IGNORE_PATTERNS)
    logger.info("pushed %s to %s", folder, url)
    return str(url)
