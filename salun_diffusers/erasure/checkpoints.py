"""Erasure checkpoints: ``checkpoint-N`` folders in ``output_dir``: SalUn's hold accelerate's save_state (read back
with load_state); a peer method's (``--method esd-* | advunlearn``) hold its loop state in one file,
``peer_state.pt`` (:func:`save_peer_checkpoint` / :func:`load_peer_checkpoint`); a sharded SalUn run's
(``--shard_weights``, an FSDP config) one ``rank-R.pt`` per process: its part of the masked values and of the optimizer
state (:func:`save_sharded_checkpoint` / :func:`load_sharded_checkpoint`; resumed by as many processes). All are
written, sealed, resumed and pruned by the same functions below.

Crash-safe: a checkpoint is written into ``.tmp-checkpoint-N``, its run record (``salun_checkpoint.json``: the run's
config, and the sha256 of every other file of the checkpoint: its seal) written last, and only then renamed to
``checkpoint-N``; old checkpoints are pruned after that. A kill at any moment leaves every ``checkpoint-N`` complete,
and ``--resume_from_checkpoint latest`` skips anything else. Resuming verifies the seal (a flipped byte in the
optimizer state would otherwise resume silently into another erasure) and refuses a damaged checkpoint, naming the
file; it never falls back to an older checkpoint on its own. Resuming with settings that change the result (another
concept, learning rate, ...) is refused, naming the fields.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from dataclasses import fields
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from ..config import EraseConfig
from ..utils import follow_umask, write_json

logger = logging.getLogger(__name__)

RECORD_NAME = "salun_checkpoint.json"
PEER_STATE_NAME = "peer_state.pt"  # a peer method's loop state (salun_diffusers.methods.esd.loop_state)
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


def _read_record_file(path: str) -> Optional[dict]:
    record = os.path.join(path, RECORD_NAME)
    if not os.path.isfile(record):
        return None
    try:
        with open(record) as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise ValueError("no config")
    except (OSError, ValueError) as exc:
        raise ValueError(f"checkpoint {path!r} is damaged: its {RECORD_NAME} cannot be read ({exc}); "
                         f"{_damaged_fix(path)}") from None
    return data


def read_record(path: str) -> Optional[dict]:
    data = _read_record_file(path)
    return None if data is None else data["config"]


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checkpoint_files(path: str) -> dict:
    """``{relative path: sha256}`` of every file in a checkpoint folder except its run record (the seal's content)."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), path)
            if rel != RECORD_NAME:
                out[rel] = _file_sha256(os.path.join(root, name))
    return dict(sorted(out.items()))


def _damaged_fix(path: str) -> str:
    folder, name = os.path.split(os.path.normpath(path))
    step = int(name.split("-")[1]) if re.fullmatch(r"checkpoint-\d+", name) else None
    older = [c for c in list_checkpoints(folder) if step is not None and int(c.split("-")[1]) < step]
    then = (f"--resume_from_checkpoint latest then resumes from {older[-1]}" if older else
            "with no older checkpoint, --resume_from_checkpoint latest then starts afresh")
    return f"delete the folder {path!r} and rerun ({then})"


def verify_checkpoint(path: str) -> None:
    """Check a checkpoint's seal: every file's sha256 against its run record. ``ValueError`` naming the first file
    that was changed, added or removed, and the fix; a checkpoint from before seals is resumed with a warning."""
    data = _read_record_file(path)
    sealed = None if data is None else data.get("sha256")
    if sealed is None:
        logger.warning("%s has no seal (written by an older version): damage to its files cannot be detected", path)
        return
    found = checkpoint_files(path)
    problem = None
    if sorted(found) != sorted(sealed):
        added, lacking = sorted(set(found) - set(sealed)), sorted(set(sealed) - set(found))
        problem = (f"{lacking[0]} is missing" if lacking else f"{added[0]} was added")
    else:
        bad = next((f for f in found if found[f] != sealed[f]), None)
        if bad is not None:
            problem = f"{bad} changed since it was written (sha256 mismatch)"
    if problem:
        raise ValueError(f"checkpoint {path!r} is damaged: {problem}; {_damaged_fix(path)}")


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
    verify_checkpoint(path)
    return path


def prune_checkpoints(output_dir: str, keep: Optional[int]) -> None:
    """Keep the newest ``keep`` complete checkpoints (called once a new one is complete)."""
    if not keep:
        return
    found = list_checkpoints(output_dir)
    for name in found[: max(0, len(found) - keep)]:
        logger.info("removing old checkpoint %s (checkpoints_total_limit=%d)", name, keep)
        shutil.rmtree(os.path.join(output_dir, name))


def _begin(config: EraseConfig, step: int) -> str:
    """An empty ``.tmp-checkpoint-<step>`` folder in ``output_dir`` (one a killed run left is cleared)."""
    tmp = os.path.join(config.output_dir, f".tmp-checkpoint-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _seal(config: EraseConfig, step: int, tmp: str) -> None:
    """Write the run record (the seal: every file's sha256) into the filled ``tmp``, rename it ``checkpoint-<step>``,
    then prune to ``checkpoints_total_limit``."""
    final = os.path.join(config.output_dir, f"checkpoint-{step}")
    write_json(os.path.join(tmp, RECORD_NAME), {"step": step, "config": config.to_dict(),
                                                "sha256": checkpoint_files(tmp)})
    follow_umask(tmp)
    if os.path.isdir(final):  # a rerun past the same step: the new one replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune_checkpoints(config.output_dir, config.checkpoints_total_limit)


def write_checkpoint(config: EraseConfig, step: int, write: Callable[[str], None]) -> None:
    """``write(folder)`` fills ``<output_dir>/checkpoint-<step>``: the folder is written under a temporary name, its
    run record (the seal) last, and renamed when complete; then at most ``checkpoints_total_limit`` are kept."""
    tmp = _begin(config, step)
    write(tmp)
    _seal(config, step, tmp)


def save_checkpoint(accelerator, config: EraseConfig, step: int) -> None:
    """SalUn: ``accelerator.save_state`` into ``<output_dir>/checkpoint-<step>`` (main process), crash-safe
    (:func:`write_checkpoint`)."""
    if accelerator.is_main_process:
        write_checkpoint(config, step, accelerator.save_state)


def save_peer_checkpoint(config: EraseConfig, step: int, state: dict) -> None:
    """A peer method's loop state after ``step`` steps (tensors, numbers, lists: see
    :func:`salun_diffusers.methods.esd.loop_state`) as ``checkpoint-<step>/peer_state.pt``, crash-safe
    (:func:`write_checkpoint`)."""
    write_checkpoint(config, step, lambda folder: torch.save(state, os.path.join(folder, PEER_STATE_NAME)))


def load_peer_checkpoint(path: str) -> dict:
    """The loop state a peer method saved in checkpoint ``path`` (already checked by :func:`resolve_resume`). Read with
    ``weights_only``: tensors, numbers and containers only, nothing in the file is executed."""
    file = os.path.join(path, PEER_STATE_NAME)
    step = int(os.path.basename(os.path.normpath(path)).split("-")[1])
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("step") != step:
            raise ValueError(f"it is not the state after step {step}")
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise ValueError(f"checkpoint {path!r} holds no readable {PEER_STATE_NAME} ({str(exc).splitlines()[0]}); "
                         f"{_damaged_fix(path)}") from None
    return state


def rank_file(rank: int) -> str:
    """A sharded run's checkpoint file of process ``rank``."""
    return f"rank-{rank}.pt"


def _rank_files(path: str) -> List[str]:
    return [f for f in os.listdir(path) if re.fullmatch(r"rank-\d+\.pt", f)]


def check_resume_layout(path: Optional[str], sharded: bool, num_processes: int) -> None:
    """Refuse (in one line, alike in every process: each reads the same folder) a checkpoint this run cannot
    continue: a sharded run's (``rank-R.pt`` files) without sharding or the other way round, or a sharded run's
    written by another number of processes (each holds its part of the masked values and optimizer state)."""
    if path is None:
        return
    found = len(_rank_files(path))
    how = "--shard_weights (or an FSDP accelerate config)"
    if sharded and not found:
        raise ValueError(f"checkpoint {path!r} was written by a run without sharding: resume it without {how}, or "
                         "start afresh in another --output_dir")
    if not sharded and found:
        raise ValueError(f"checkpoint {path!r} was written by a sharded run: resume it with {how}, or start afresh "
                         "in another --output_dir")
    if sharded and found != num_processes:
        raise ValueError(f"checkpoint {path!r} was written by {found} sharded processes and this run has "
                         f"{num_processes}: resume it with {found} (accelerate launch --num_processes {found}, or "
                         f"torchrun --nproc_per_node {found}), or start afresh in another --output_dir")


def _together(accelerator, work: Callable[[], None], others: Callable[[int], Exception]) -> None:
    """Run ``work`` in every process, then all learn whether it failed in any (one all-reduce, also a barrier): the
    process it failed in raises its error, every other one ``others(first failing process)``, so none is left
    waiting in a collective."""
    error = None
    try:
        work()
    except Exception as exc:  # noqa: BLE001 (any failure: the other processes must learn of it)
        error = exc
    failed = torch.zeros(accelerator.num_processes, device=accelerator.device)
    failed[accelerator.process_index] = float(error is not None)
    dist.all_reduce(failed)
    if error is not None:
        raise error
    if bool(failed.any()):
        raise others(int(failed.nonzero()[0, 0]))


def save_sharded_checkpoint(accelerator, config: EraseConfig, step: int, state: dict) -> None:
    """A sharded run's checkpoint after ``step`` steps: each process writes its ``state`` (tensors and plain data:
    its masked values, optimizer and lr scheduler state) as ``rank-<R>.pt`` into the same temporary folder, then the
    main process seals and renames it, with :func:`write_checkpoint`'s guarantees. Every process calls it; a failure
    in any stops all of them, earlier checkpoints kept."""
    tmp = os.path.join(config.output_dir, f".tmp-checkpoint-{step}")
    main, rank = accelerator.is_main_process, accelerator.process_index

    def failed(k: int) -> Exception:
        return OSError(f"checkpoint-{step} was not written: process {k} failed writing it (its error is in its "
                       "output); earlier checkpoints are kept")

    _together(accelerator, lambda: main and _begin(config, step), failed)
    state = dict(state, step=step, rank=rank, world_size=accelerator.num_processes)
    _together(accelerator, lambda: torch.save(state, os.path.join(tmp, rank_file(rank))), failed)
    _together(accelerator, lambda: main and _seal(config, step, tmp), lambda k: OSError(
        f"process {k} failed sealing checkpoint-{step} or pruning older checkpoints (its error is in its output): "
        f"check {config.output_dir!r} (space, permissions) before resuming from its latest complete checkpoint"))


def load_sharded_checkpoint(accelerator, path: str, restore: Callable[[dict], None]) -> None:
    """``restore(state)`` with this process's state in sharded checkpoint ``path`` (already verified by
    :func:`resolve_resume` and :func:`check_resume_layout`), read with ``weights_only``. Every process calls it; one
    that cannot read or restore its state stops all of them, each in one line."""
    rank = accelerator.process_index
    step = int(os.path.basename(os.path.normpath(path)).split("-")[1])

    def load():
        try:
            state = torch.load(os.path.join(path, rank_file(rank)), map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or (state.get("step"), state.get("rank"), state.get("world_size")) != \
                    (step, rank, accelerator.num_processes):
                raise ValueError(f"it is not process {rank}'s state after step {step}")
            restore(state)
        except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as exc:
            raise ValueError(f"checkpoint {path!r}: {rank_file(rank)} cannot be resumed from "
                             f"({str(exc).splitlines()[0]}); {_damaged_fix(path)}") from None

    _together(accelerator, load, lambda k: ValueError(
        f"checkpoint {path!r}: {rank_file(k)} cannot be resumed from (process {k} says why); {_damaged_fix(path)}"))
