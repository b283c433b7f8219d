"""Erasure checkpoints: ``checkpoint-N`` folders in ``output_dir`` (accelerate's save_state / load_state).

Crash-safe: a checkpoint is written into ``.tmp-checkpoint-N``, its run record (``salun_checkpoint.json``: the run's
config) written last, and only then renamed to ``checkpoint-N``; old checkpoints are pruned after that. A kill at any
moment leaves every ``checkpoint-N`` complete, and ``--resume_from_checkpoint latest`` skips anything else. Resuming
with settings that change the result (another concept, learning rate, ...) is refused, naming the fields.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import fields
from typing import List, Optional

from ..config import EraseConfig
from ..utils import follow_umask, write_json

logger = logging.getLogger(__name__)

RECORD_NAME = "salun_checkpoint.json"
_LEGACY_LAST_FILE = "random_states_0.pkl"  # accelerate writes it last: a complete checkpoint from before the record
# fields that do not change the erasure: they may differ between a run and its resumption
BOOKKEEPING_FIELDS = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "report_to", "logging_dir", "checkpointing_steps",
    "checkpoints_total_limit", "cache_dir", "verdict_images", "save_merged_unet", "save_mask_only", "threads",
    "gradient_checkpointing", "save_pipeline", "export_lora_rank", "push_to_hub", "hub_model_id", "hub_token",
    "validation_prompts", "validation_steps", "num_validation_images",
    "save_single_file", "single_file_dtype",
})


def _is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, RECORD_NAME)) or os.path.isfile(os.path.join(path, _LEGACY_LAST_FILE))


def list_checkpoints(output_dir: str, complete_only: bool = True) -> List[str]:
    """Names of the ``checkpoint-N`` folders in ``output_dir``, oldest first (complete ones only by default)."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", d)
             and os.path.isdir(os.path.join(output_dir, d))
             and (not complete_only or _is_complete(os.path.join(output_dir, d)))]
    return sorted(names, key=lambda d: int(d.split("-")[1]))


def config_differences(recorded: dict, config: EraseConfig) -> List[str]:
    """``field: recorded (now current)`` for every field that changes the result and differs. A field missing from
    ``recorded`` (written by an older version) counts as its default."""
    out = []
    current = config.to_dict()
    for f in fields(config):
        if f.name in BOOKKEEPING_FIELDS:
            continue
        default = f.default_factory() if callable(f.default_factory) else f.default
        before = recorded.get(f.name, default)
        if before != current[f.name]:
            out.append(f"{f.name} {before!r} (now {current[f.name]!r})")
    return out


def check_same_run(recorded: dict, config: EraseConfig, what: str) -> None:
    """Refuse to continue ``what`` (a checkpoint, an output folder) under settings that change the result."""
    diffs = config_differences(recorded, config)
    if diffs:
        raise ValueError(f"{what} was made with other settings: {'; '.join(diffs)}. Rerun with the same settings, or "
                         "choose another --output_dir (or pass --overwrite_output_dir to start afresh)")


def read_record(path: str) -> Optional[dict]:
    record = os.path.join(path, RECORD_NAME)
    if not os.path.isfile(record):
        return None
    with open(record) as f:
        return json.load(f)["config"]


def resolve_resume(config: EraseConfig) -> Optional[str]:
    """The checkpoint to resume from (``None``: start afresh), checked against ``config``."""
    if not config.resume_from_checkpoint:
        return None
    if config.resume_from_checkpoint == "latest":
        found = list_checkpoints(config.output_dir)
        skipped = sorted(set(list_checkpoints(config.output_dir, complete_only=False)) - set(found))
        if skipped:
            logger.warning("skipping incomplete checkpoint(s) %s in %s", ", ".join(skipped), config.output_dir)
        if not found:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting a new run",
                           config.output_dir)
            return None
        path = os.path.join(config.output_dir, found[-1])
    else:
        path = config.resume_from_checkpoint
        if not os.path.isdir(path):
            path = os.path.join(config.output_dir, path)
        if not os.path.isdir(path) or not re.fullmatch(r"checkpoint-\d+", os.path.basename(path.rstrip("/"))):
            raise ValueError(f"checkpoint {config.resume_from_checkpoint!r} not found; pass 'latest' or a "
                             f"checkpoint-N folder in {config.output_dir!r}")
        if not _is_complete(path):
            raise ValueError(f"checkpoint {path!r} is incomplete (the run stopped while writing it); pass 'latest' "
                             "to resume from the last complete one")
    recorded = read_record(path)
    if recorded is None:
        logger.warning("%s has no run record (older version): its settings cannot be checked", path)
    else:
        check_same_run(recorded, config, f"checkpoint {path!r}")
    return path


def prune_checkpoints(output_dir: str, keep: Optional[int]) -> None:
    """Keep the newest ``keep`` complete checkpoints (called once a new one is complete)."""
    if not keep:
        return
    found = list_checkpoints(output_dir)
    for name in found[: max(0, len(found) - keep)]:
        logger.info("removing old checkpoint %s (checkpoints_total_limit=%d)", name, keep)
        shutil.rmtree(os.path.join(output_dir, name))


def save_checkpoint(accelerator, config: EraseConfig, step: int) -> None:
    """``accelerator.save_state`` into ``<output_dir>/checkpoint-<step>`` (main process): written to a temporary
    folder, the run record last, renamed when complete; then at most ``checkpoints_total_limit`` are kept."""
    if not accelerator.is_main_process:
        return
    final = os.path.join(config.output_dir, f"checkpoint-{step}")
    tmp = os.path.join(config.output_dir, f".tmp-checkpoint-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    accelerator.save_state(tmp)
    write_json(os.path.join(tmp, RECORD_NAME), {"step": step, "config": config.to_dict()})
    follow_umask(tmp)
    if os.path.isdir(final):  # a rerun past the same step: the new one replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune_checkpoints(config.output_dir, config.checkpoints_total_limit)
