"""Erasure checkpoints: ``checkpoint-N`` folders in ``output_dir`` (accelerate's save_state / load_state)."""

from __future__ import annotations

import logging
import os
import re
import shutil
from typing import List, Optional

from ..config import EraseConfig

logger = logging.getLogger(__name__)


def list_checkpoints(output_dir: str) -> List[str]:
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", d)]
    return sorted(names, key=lambda d: int(d.split("-")[1]))


def resolve_resume(config: EraseConfig) -> Optional[str]:
    if not config.resume_from_checkpoint:
        return None
    if config.resume_from_checkpoint == "latest":
        found = list_checkpoints(config.output_dir)
        if not found:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting a new run",
                           config.output_dir)
            return None
        return os.path.join(config.output_dir, found[-1])
    path = config.resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(config.output_dir, path)
    if not os.path.isdir(path) or not re.fullmatch(r"checkpoint-\d+", os.path.basename(path.rstrip("/"))):
        raise ValueError(f"checkpoint {config.resume_from_checkpoint!r} not found; pass 'latest' or a "
                         f"checkpoint-N folder in {config.output_dir!r}")
    return path


def prune_checkpoints(output_dir: str, keep: Optional[int]) -> None:
    if not keep:
        return
    found = list_checkpoints(output_dir)
    for name in found[: max(0, len(found) - keep + 1)]:
        logger.info("removing old checkpoint %s (checkpoints_total_limit=%d)", name, keep)
        shutil.rmtree(os.path.join(output_dir, name))


def save_checkpoint(accelerator, config: EraseConfig, step: int) -> None:
    """``accelerator.save_state`` into ``<output_dir>/checkpoint-<step>`` (main process), keeping at most
    ``checkpoints_total_limit`` checkpoints."""
    if accelerator.is_main_process:
        prune_checkpoints(config.output_dir, config.checkpoints_total_limit)
        accelerator.save_state(os.path.join(config.output_dir, f"checkpoint-{step}"))
