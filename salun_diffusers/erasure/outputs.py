"""Erasure phase 4, outputs: what ``output_dir`` receives (checked before any work, written at the end):
``erasure.safetensors`` + ``erasure_config.json``, the merged ``unet/``, ``metrics.json`` and the model card; with
``--save_pipeline link|copy`` also ``model_index.json`` and the base's other components, so the folder is a diffusers
pipeline; optionally a LoRA (``--export_lora_rank``, diffusers and kohya layouts), one single-file checkpoint for the
UIs (``--save_single_file``) and an upload to the Hub (``--push_to_hub``)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from typing import Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

from ..concepts import AnySpec
from ..config import TEXT_ENCODER_METHODS, EraseConfig
from ..delta import CONFIG_NAME, MASK_NAME, WEIGHTS_NAME, build_delta, model_fingerprint, save_delta
from ..export import KOHYA_LORA_NAME, save_kohya_lora, save_single_file, single_file_family, unet_prefix_map
from ..families import base_model_id, denoiser_folder
from ..hub import BUNDLED_DIGIT_MODEL, local_model_dir, push_to_hub, resolve_base_model
from ..lora import delta_to_lora, save_lora
from ..masking import Mask, load_mask, save_mask
from ..provenance import environment_record
from ..utils import (__version__, ensure_writable_dir, follow_umask, resolve_dtype, user_cache_dir, write_json,
                     write_text)
from .checkpoints import check_same_run
from .data import read_image_folder

logger = logging.getLogger(__name__)

PIPELINE_INDEX = "model_index.json"
LORA_NAME = "pytorch_lora_weights.safetensors"


LOCK_NAME = ".salun-erase.lock"
FINAL_OUTPUTS = (WEIGHTS_NAME, MASK_NAME, "unet", "transformer", "text_encoder", "README.md")  # what a run would replace in --output_dir


class OutputDirBusy(OSError):
    """Another run holds the output folder's lock."""


@contextlib.contextmanager
def output_lock(output_dir: str, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<output_dir>/.salun-erase.lock`` for the whole run: one writer per output
    folder. The OS releases it when the process ends in any way (kill -9 included), so it is never stale; the file
    records the holder (pid, host, start time) for the refusal message."""
    if not enabled:
        yield
        return
    import fcntl

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with open(path) as f:
                holder = f.read().strip() or "a run that is starting"
            raise OutputDirBusy(f"{output_dir!r} is in use by another run ({holder}); wait for it to finish or "
                                "choose another --output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


# what a killed run leaves: a checkpoint's temp folder, temp folders of the pipeline's components (mkdtemp:
# ".tmp-<name>-" + 8 characters), folders moved aside (".old-" + 8), temp files of atomic writes (".tmp-" + 8 + name)
PARTIAL_OUTPUT = re.compile(r"\.tmp-checkpoint-\d+|\.old-[a-z0-9_]{8}|\.tmp-[a-z0-9_]{8}\S+|\.tmp-\S+-[a-z0-9_]{8}")


def remove_partial_outputs(output_dir: str) -> None:
    """Remove the temporary files and folders a killed run left in ``output_dir`` (call while holding its lock)."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if PARTIAL_OUTPUT.fullmatch(name):
            logger.info("removing %s (left by a run that did not finish)", name)
            path = os.path.join(output_dir, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def _data_folders(config: EraseConfig) -> List[Tuple[str, str]]:
    """``(flag, folder)`` of every image folder the run reads (a concept row's ``data_dir`` among them)."""
    out = [(f"--{flag}", getattr(config, flag)) for flag in ("forget_data_dir", "retain_data_dir")
           if getattr(config, flag)]
    return out + [("--concepts data_dir", row["data_dir"]) for row in config.concept_rows() if row.get("data_dir")]


def _check_readable(config: EraseConfig) -> None:
    if config.forget_data_dir and len(config.concept_spec().concepts) > 1:
        raise ValueError("--forget_data_dir holds one concept's images; with several concepts give each its own "
                         "data_dir in a concepts file (--concepts_file), or drop --forget_data_dir to generate them")
    for flag, path in _data_folders(config) + ([("--mask_path", config.mask_path)] if config.mask_path else []):
        if not os.path.exists(path):
            raise ValueError(f"{flag} {path!r} does not exist")
    for flag, folder in _data_folders(config):
        flag = flag.lstrip("-")
        try:
            os.listdir(folder)
        except OSError as exc:
            raise ValueError(f"--{flag} {folder!r} cannot be read ({exc.strerror or exc}); pass a folder of "
                             "images") from None
        read_image_folder(folder, "")  # images there, metadata.jsonl readable: before any work
    if config.mask_path:
        load_mask(config.mask_path)  # a mask file is small: read it all now rather than after hours of data


def estimate_output_bytes(config: EraseConfig) -> Optional[int]:
    """Rough disk need of a run (merged component, checkpoints with Adam state, erasure), from the file size of the
    component it changes (the U-Net, or the text encoder for AdvUnlearn); ``None`` when the base model is not a local
    folder. A peer's mask is not known before it runs: counted whole."""
    unet_dir = os.path.join(resolve_base_model(base_model_id(config)), component_name(config))
    if not os.path.isdir(unet_dir):
        return None
    weights = [f for f in os.listdir(unet_dir) if f.endswith((".safetensors", ".bin"))
               and (f".{config.variant}." in f) == bool(config.variant)]
    size = max((os.path.getsize(os.path.join(unet_dir, f)) for f in weights), default=0)
    fp32 = size * (2 if config.variant in ("fp16", "bf16") else 1)
    kept = 0
    if config.checkpointing_steps:
        kept = config.max_train_steps // config.checkpointing_steps
        if config.checkpoints_total_limit:
            kept = min(kept, config.checkpoints_total_limit + 1)  # the new one is complete before the oldest goes
    share = config.mask_ratio if config.method == "salun" else 1.0
    return int(fp32 * (3 * kept + int(config.save_merged_unet) + share))


def _folders_read(config: EraseConfig) -> List[Tuple[str, str]]:
    """``(flag, path)`` of every file or folder the run reads: the base model's folder (and, for an erasure's output
    folder, the folders its linked components live in), data folders, the mask, a resumed checkpoint's run, the cache."""
    out = []
    base = resolve_base_model(base_model_id(config))
    if os.path.isdir(base):
        out.append(("--pretrained_model_name_or_path", base))
        for entry in sorted(os.listdir(base)):  # an erased model's components are links into its own base
            folder = os.path.join(base, entry)
            files = sorted(os.listdir(folder)) if os.path.isdir(folder) and not os.path.islink(folder) else []
            if files and os.path.islink(os.path.join(folder, files[0])):
                out.append(("--pretrained_model_name_or_path (its linked base)",
                            os.path.dirname(os.path.dirname(os.path.realpath(os.path.join(folder, files[0]))))))
    out += _data_folders(config) + ([("--mask_path", config.mask_path)] if config.mask_path else [])
    resume = config.resume_from_checkpoint
    if resume and resume != "latest" and os.path.isdir(resume):  # another run's checkpoint: that run's folder
        out.append(("--resume_from_checkpoint (its run)", os.path.dirname(os.path.abspath(resume.rstrip("/")))))
    out.append(("--cache_dir", config.cache_dir or user_cache_dir("data")))
    return out


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_apart(config: EraseConfig) -> None:
    """Refuse an ``--output_dir`` that resolves to, lies inside or contains anything the run reads (symbolic links
    followed), before anything is created: ``--overwrite_output_dir`` would otherwise replace the base model's files."""
    out = os.path.realpath(config.output_dir)
    own_mask = os.path.join(out, MASK_NAME)
    for flag, path in _folders_read(config):
        real = os.path.realpath(path)
        if flag == "--mask_path" and real == own_mask:
            continue  # the mask a run saved in its own folder, reused (read, never rewritten)
        if flag == "--resume_from_checkpoint (its run)" and real == out:
            continue  # resuming the run in this folder
        if _within(out, real) or _within(real, out):
            how = "is" if out == real else "lies inside" if _within(out, real) else "contains"
            raise ValueError(f"--output_dir {config.output_dir!r} {how} {flag} {path!r}, which the run reads; "
                             "choose an --output_dir outside it (nothing was written)")


def check_before_compute(config: EraseConfig) -> None:
    """Before any work: the output folder is apart from every input, the input folders and mask exist and are
    readable, the output (and cache) folder is writable, and the disk has room. (The config itself never touches the
    disk: a saved ``train_config.json`` loads anywhere.)"""
    check_output_apart(config)
    _check_readable(config)
    check_single_file_export(config)
    ensure_writable_dir(config.output_dir, "--output_dir")
    if config.cache_dir:
        ensure_writable_dir(config.cache_dir, "--cache_dir")
    need = estimate_output_bytes(config)
    if need:
        free = shutil.disk_usage(config.output_dir).free
        if free < need:
            raise ValueError(f"--output_dir {config.output_dir!r} has {free / 2**30:.2f} GiB free but the run needs "
                             f"about {need / 2**30:.2f} GiB (merged U-Net, checkpoints, erasure); free space, choose "
                             "another --output_dir, or keep fewer checkpoints (--checkpoints_total_limit) or no merged "
                             "U-Net (--no-save_merged_unet)")


def check_output_dir(config: EraseConfig) -> None:
    """Refuse to overwrite an existing erasure unless asked (or resuming the same run), before any work is done."""
    _check_final_outputs(config)
    _check_pipeline_targets(config, _pipeline_names(config, folder=component_name(config)))
    _check_single_file_target(config)


def _check_final_outputs(config: EraseConfig) -> None:
    out = config.output_dir
    existing = [n for n in FINAL_OUTPUTS if os.path.lexists(os.path.join(out, n))]
    if config.mask_path and os.path.abspath(config.mask_path) == os.path.abspath(os.path.join(out, MASK_NAME)):
        existing.remove(MASK_NAME)  # the input mask of this run, not overwritten
    if not existing or config.overwrite_output_dir:
        return
    if not config.resume_from_checkpoint:
        raise FileExistsError(f"{out!r} already holds {', '.join(existing)}; choose another --output_dir, or pass "
                              "--overwrite_output_dir to replace it (--resume_from_checkpoint latest to finish the "
                              "run that wrote it)")
    record = os.path.join(out, "train_config.json")
    if not os.path.isfile(record):
        raise FileExistsError(f"{out!r} already holds {', '.join(existing)} but no train_config.json, so resuming "
                              "cannot tell whether it is the same run; choose another --output_dir, or pass "
                              "--overwrite_output_dir to replace it")
    with open(record) as f:
        check_same_run(json.load(f), config, f"the run in {out!r}")


def write_outputs(config: EraseConfig, spec: AnySpec, unet, mask: Mapping[str, torch.Tensor],
                  metrics: dict, base_digest: Optional[Mapping[str, str]] = None,
                  stacked_on: Sequence[dict] = (), component: Optional[str] = None,
                  method: Optional[Mapping] = None) -> Tuple[str, Optional[str]]:
    """Write the erasure, the merged U-Net (if asked), metrics and model card. Returns ``(erasure path, unet dir)``.
    ``base_digest``: :func:`~salun_diffusers.delta.base_values_digest` of the base U-Net, taken before training;
    ``stacked_on``: the erasures the base model already held (:mod:`~salun_diffusers.erasure.stacking`).
    ``component``: the pipeline folder of ``unet``, the module the erasure changed (default: its denoiser folder,
    ``unet`` or ``transformer``; a peer method's may be ``text_encoder``); ``method``: a peer method's record
    (:func:`~salun_diffusers.erasure.peers.resolve_method`), kept in the erasure's metadata."""
    component = component or denoiser_folder(unet)
    if stacked_on:
        metrics["stacked_on"] = list(stacked_on)
    meta = erasure_metadata(config, spec, stacked_on, component, method)
    delta = build_delta(unet, mask, meta, dtype=resolve_dtype(config.delta_dtype), base_digest=base_digest)
    erasure_path = save_delta(delta, config.output_dir)
    unet_dir = save_pipeline_folder(config, unet, component) if config.save_merged_unet else None
    metrics["num_changed_weights"] = delta.num_changed()
    if config.export_lora_rank:
        metrics["lora"] = export_lora(config, unet)
    if config.save_single_file:
        metrics["single_file"] = export_single_file(config, unet, component)
    metrics["environment"] = environment_record()
    write_json(os.path.join(config.output_dir, "metrics.json"), metrics)
    write_text(os.path.join(config.output_dir, "README.md"), model_card(config, spec, metrics))
    if config.push_to_hub:
        metrics["hub_url"] = push_to_hub(config.output_dir, hub_repo_id(config), token=config.hub_token)
    return erasure_path, unet_dir


def save_peer_mask(config: EraseConfig, module, mask: Mask, component: str) -> str:
    """A peer method's mask of the weights it may change, as ``mask.safetensors`` (a SalUn run's saliency mask's
    place and format). Returns its path."""
    path = os.path.join(config.output_dir, MASK_NAME)
    save_mask(mask, path, {"fingerprint": model_fingerprint(module), "method": config.method, "component": component,
                           "concept": config.concept_spec().name, "base_model": base_model_id(config)})
    return path


# ------------------------------------------------------------------------------------ the output folder as a pipeline
def component_name(config: EraseConfig) -> str:
    """The pipeline folder the run changes: ``text_encoder`` for AdvUnlearn, else the denoiser's."""
    return "text_encoder" if config.method in TEXT_ENCODER_METHODS else _denoiser_name(config)


def _denoiser_name(config: EraseConfig) -> str:
    """``"transformer"`` when the base model is a local folder whose pipeline has one (SD3, FLUX), else ``"unet"``."""
    index = os.path.join(resolve_base_model(base_model_id(config)), PIPELINE_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            if (json.load(f).get("transformer") or [None])[0] is not None:
                return "transformer"
    return "unet"


def _pipeline_names(config: EraseConfig, base_dir: Optional[str] = None, folder: str = "unet") -> List[str]:
    """What the pipeline part of the output folder consists of: the denoiser's ``folder`` (``unet`` or
    ``transformer``; + the base's other component folders and ``model_index.json`` with ``--save_pipeline
    link|copy``)."""
    if not config.save_merged_unet:
        return []
    if config.save_pipeline == "none":
        return [folder]
    names = [folder, PIPELINE_INDEX]
    if base_dir is not None:
        names[1:1] = [k for k in _base_index(base_dir) if os.path.isdir(os.path.join(base_dir, k)) and k != folder]
    return names


def _check_pipeline_targets(config: EraseConfig, names: List[str]) -> None:
    if config.overwrite_output_dir or config.resume_from_checkpoint:
        return
    clash = [n for n in names if os.path.lexists(os.path.join(config.output_dir, n))]
    if clash:
        raise FileExistsError(f"{config.output_dir} already holds {', '.join(clash)}; choose another --output_dir, "
                              "or pass --overwrite_output_dir to replace them")


def _base_index(base_dir: str) -> dict:
    """The base's model_index.json, components whose folder is not available locally set to null."""
    path = os.path.join(base_dir, PIPELINE_INDEX)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the base model folder {base_dir} has no {PIPELINE_INDEX}, so the output cannot be "
                                "made a pipeline folder; pass --save_pipeline none")
    with open(path) as f:
        index = json.load(f)
    for key, value in index.items():
        if not key.startswith("_") and isinstance(value, list) and value and value[0] is not None \
                and not os.path.isdir(os.path.join(base_dir, key)):
            logger.info("the base's %s is not available locally (not loaded); the output pipeline has none", key)
            index[key] = [None, None]
    return index


def _temp_dir(parent: str, name: str) -> str:
    return tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent)


def _install_dir(tmp: str, dest: str) -> None:
    """Rename a finished temp folder onto ``dest``; an existing ``dest`` is moved aside first, deleted after.
    Its folders and files follow the umask (mkdtemp makes 0700 folders, safetensors 0600 files)."""
    follow_umask(tmp)
    aside = None
    if os.path.lexists(dest):
        aside = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(dest))
        os.replace(dest, os.path.join(aside, "old"))
    os.replace(tmp, dest)
    if aside:
        shutil.rmtree(aside)


def _fill_component(src: str, dst: str, mode: str) -> None:
    """Symlink (per file, to the resolved file: a cache blob for hub models) or copy a base component folder."""
    for root, dirs, files in os.walk(src):
        rel = os.path.relpath(root, src)
        for d in dirs:
            os.makedirs(os.path.join(dst, rel, d), exist_ok=True)
        for f in files:
            source, target = os.path.realpath(os.path.join(root, f)), os.path.normpath(os.path.join(dst, rel, f))
            if mode == "link":
                os.symlink(source, target)
            else:
                shutil.copyfile(source, target)


def save_pipeline_folder(config: EraseConfig, unet, folder: Optional[str] = None) -> str:
    """Write the merged ``unet/`` (``transformer/`` for SD3 / FLUX) and, with ``--save_pipeline link|copy``, the
    base's other components and ``model_index.json`` into the output folder. Every folder is built under a temp name
    and renamed into place; ``model_index.json`` comes last, so a folder is never a half-written pipeline. Returns
    the denoiser folder's path. ``folder``: the pipeline folder of ``unet`` (default: its denoiser folder;
    ``text_encoder`` for a text-encoder erasure, the base's U-Net then linked or copied)."""
    out = config.output_dir
    folder = folder or denoiser_folder(unet)
    base_dir = index = None
    if config.save_pipeline != "none":
        base_dir = local_model_dir(base_model_id(config), config.revision)
        index = _base_index(base_dir)
    names = _pipeline_names(config, base_dir, folder)
    _check_pipeline_targets(config, names)
    staged = []
    try:
        tmp = _temp_dir(out, folder)
        staged.append((tmp, folder))
        unet.save_pretrained(tmp, safe_serialization=True)
        for name in names:
            if name not in (folder, PIPELINE_INDEX):
                tmp = _temp_dir(out, name)
                staged.append((tmp, name))
                _fill_component(os.path.join(base_dir, name), tmp, config.save_pipeline)
        for tmp, name in staged:
            _install_dir(tmp, os.path.join(out, name))
    finally:
        for tmp, _ in staged:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp)
    if index is not None:
        write_json(os.path.join(out, PIPELINE_INDEX), index)
        logger.info("%s is a diffusers pipeline (components %s from %s)", out,
                    "linked" if config.save_pipeline == "link" else "copied", base_dir)
    return os.path.join(out, folder)


def export_lora(config: EraseConfig, unet) -> dict:
    """Write ``pytorch_lora_weights.safetensors`` (rank ``--export_lora_rank``) beside the delta; return its stats."""
    folder = denoiser_folder(unet)
    base = type(unet).from_pretrained(resolve_base_model(base_model_id(config)), subfolder=folder,
                                      revision=config.revision, variant=config.variant)
    state, stats = delta_to_lora(base, unet, config.export_lora_rank)
    tmp = _temp_dir(config.output_dir, "lora")
    try:
        save_lora(state, tmp, weight_name=LORA_NAME, component=folder)
        follow_umask(tmp)
        os.replace(os.path.join(tmp, LORA_NAME), os.path.join(config.output_dir, LORA_NAME))
    finally:
        shutil.rmtree(tmp)
    # the same LoRA in kohya's key layout, for Automatic1111's models/Lora and ComfyUI's models/loras
    save_kohya_lora(os.path.join(config.output_dir, LORA_NAME), base.config, overwrite=True)
    stats["file"], stats["kohya_file"] = LORA_NAME, KOHYA_LORA_NAME
    logger.info("LoRA rank %d: %d layers, %.1f%% of the delta's energy", stats["rank"], stats["layers"],
                100 * stats["energy_kept"])
    return stats


# ------------------------------------------------------------------------------------ the single file for the UIs
SINGLE_FILE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def single_file_path(config: EraseConfig) -> str:
    """``<output_dir>/<name of output_dir>.safetensors`` (``<name>-single-file.safetensors`` where that would be one
    of the folder's other files, e.g. ``--output_dir out/erasure``)."""
    out = os.path.normpath(os.path.abspath(config.output_dir))
    name = os.path.basename(out)
    if f"{name}.safetensors" in (WEIGHTS_NAME, MASK_NAME, LORA_NAME, KOHYA_LORA_NAME):
        name += "-single-file"
    return os.path.join(out, f"{name}.safetensors")


def check_single_file_export(config: EraseConfig) -> None:
    """Before any work: ``--save_single_file`` needs an erased model (not ``--save_mask_only``) of a family with an
    original single-file layout (SD 1.x/2.x, SDXL) and a standard U-Net, read from the base's ``model_index.json`` and
    ``unet/config.json`` (folder, hub cache or hub; where they cannot be read, the export checks the loaded pipeline
    at the end)."""
    if not config.save_single_file:
        return
    if config.save_mask_only:
        raise ValueError("--save_single_file needs the erased model, which --save_mask_only does not make: drop one "
                         "of the two")
    base = resolve_base_model(base_model_id(config))
    try:  # two small JSON files: from the folder, the hub cache, or the hub (the run downloads the base anyway)
        index = DiffusionPipeline.load_config(base, revision=config.revision)
    except (OSError, ValueError):
        logger.info("--save_single_file: the base's model_index.json cannot be read yet; checked at the end")
        return
    cls = index.get("_class_name")
    if cls not in SINGLE_FILE_CLASSES:
        raise ValueError(f"--save_single_file: the base is a {cls}, which has no original single-file layout "
                         f"(supported: {', '.join(SINGLE_FILE_CLASSES)}); drop --save_single_file and use the "
                         "diffusers folder")
    try:
        unet_config = UNet2DConditionModel.load_config(base, subfolder="unet", revision=config.revision)
    except (OSError, ValueError):
        logger.info("--save_single_file: the base's unet/config.json cannot be read yet; checked at the end")
        return
    try:
        unet_prefix_map(unet_config, [])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"--save_single_file: {exc}") from None


def _check_single_file_target(config: EraseConfig) -> None:
    path = single_file_path(config)
    if config.save_single_file and os.path.lexists(path) and not (config.overwrite_output_dir
                                                                   or config.resume_from_checkpoint):
        raise FileExistsError(f"{path!r} already exists; choose another --output_dir, or pass --overwrite_output_dir "
                              "to replace it")


def export_single_file(config: EraseConfig, unet, component: str = "unet") -> dict:
    """Write the erased model (``unet`` with the base's VAE and text encoder(s); ``component``: the pipeline
    component ``unet`` is, e.g. ``text_encoder``) as one checkpoint in the original layout
    (:func:`salun_diffusers.export.save_single_file`, atomic); return what metrics.json records of it."""
    base_dir = local_model_dir(base_model_id(config), config.revision)
    kwargs = {component: unet, "variant": config.variant}
    if "safety_checker" in DiffusionPipeline.load_config(base_dir):
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = DiffusionPipeline.from_pretrained(base_dir, **kwargs)  # the erased U-Net itself, not a copy
    path = single_file_path(config)
    save_single_file(pipe, path, half=config.single_file_dtype == "float16", overwrite=True)
    return {"file": os.path.basename(path), "family": single_file_family(pipe), "dtype": config.single_file_dtype,
            "bytes": os.path.getsize(path)}


def _card_exports(config: EraseConfig, metrics: dict) -> str:
    """The model card's sections on the UI exports (single file, kohya LoRA) and the training environment."""
    parts = []
    single, lora = metrics.get("single_file"), metrics.get("lora")
    if single or lora:
        parts.append("## Use in Automatic1111 or ComfyUI\n")
    if single:
        parts.append(f"`{single['file']}` is the whole erased model ({single['family']}, {single['dtype']}) in the "
                     "original Stable Diffusion single-file layout: copy it to Automatic1111's "
                     "`models/Stable-diffusion/` or ComfyUI's `models/checkpoints/` (Load Checkpoint node); "
                     f"diffusers reads it with `from_single_file(\"{single['file']}\", config=\"path/to/this/folder\")`"
                     f"{'' if config.save_pipeline != 'none' else ' (config: the base model)'}.\n")
    if lora:
        parts.append(f"`{lora.get('kohya_file', KOHYA_LORA_NAME)}` is the rank-{config.export_lora_rank} LoRA in "
                     "kohya's key layout: Automatic1111 `models/Lora/` + `<lora:name:1>` in the prompt; ComfyUI "
                     "`models/loras/` + LoraLoaderModelOnly. It approximates the erasure "
                     f"({lora['energy_kept']:.0%} of the delta's energy); the single file is exact.\n")
    env = metrics.get("environment")
    if env:
        versions = ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "diffusers", "transformers", "accelerate",
                                                        "peft") if env.get(k))
        parts.append(f"## Environment\n\nTrained with {versions}; {env.get('cpu_count')} CPU cores, "
                     f"{env.get('torch_threads')} torch thread(s), GPU: {', '.join(env.get('gpu') or []) or 'none'} "
                     f"(CUDA {env.get('cuda') or '-'}). The full record is `environment` in metrics.json.\n")
    return "\n".join(parts)


def hub_repo_id(config: EraseConfig) -> str:
    return config.hub_model_id or os.path.basename(os.path.normpath(os.path.abspath(config.output_dir)))


def erasure_metadata(config: EraseConfig, spec: AnySpec, stacked_on: Sequence[dict] = (),
                     component: Optional[str] = None, method: Optional[Mapping] = None) -> dict:
    """The erasure's ``config`` metadata: the run's settings, base model, concepts; ``component`` (the pipeline
    folder of the changed module, read by the loaders) and a peer ``method``'s preset and resolved config."""
    cfg = {k: v for k, v in config.to_dict().items() if k not in ("output_dir", "cache_dir", "resume_from_checkpoint",
                                                                   "overwrite_output_dir", "logging_dir", "report_to",
                                                                   "threads", "data_batch_size")}
    members = spec.concepts
    cfg.update({"base_model": base_model_id(config), "concept": spec.name, "retain_prompts": list(spec.retain_prompts),
                "salun_diffusers_version": __version__,
                "erased_concepts": [{"name": c.name, "forget_prompt": c.forget_prompt,
                                     "pseudo_prompts": list(c.pseudo_prompts), "target_class": c.target_class,
                                     **({"data_dir": c.forget_data_dir} if c.forget_data_dir else {})}
                                    for c in members]})
    if len(members) == 1:
        cfg.update({"forget_prompt": members[0].forget_prompt, "pseudo_prompts": list(members[0].pseudo_prompts)})
    if stacked_on:
        cfg["stacked_on"] = [dict(p) for p in stacked_on]
    if component:
        cfg["component"] = component
    if method:
        cfg.update({"method_preset": method["preset"], "method_config": dict(method["config"])})
    return cfg


def _card_concepts(spec) -> str:
    """The model card's forget / pseudo prompt rows: one pair per erased concept."""
    rows = []
    for c in spec.concepts:
        pseudo = "; ".join(c.pseudo_prompts[:4]) + (" ..." if len(c.pseudo_prompts) > 4 else "")
        what = f" ({c.name})" if len(spec.concepts) > 1 else ""
        rows.append(f"| forget prompt{what} | {c.forget_prompt} |\n| pseudo prompt(s) c'{what} | {pseudo} |\n")
    return "".join(rows)


def _card_stacking(stacked_on) -> str:
    if not stacked_on:
        return ""
    names = ", ".join(f"**{p.get('concept')}** (erasure id `{p.get('id')}`, from `{p.get('base_model')}`)"
                      for p in stacked_on)
    return (f"\nThe base model is itself erased: it holds the erasure(s) of {names}. This erasure was made on top of "
            "them: as a delta over the original base, load those erasures first, in this order, then this one "
            "(`load_erasure` stacks them exactly; see docs/erasure-format.md).\n")


CARD_FAMILIES = {"StableDiffusionPipeline": "U-Net, Stable Diffusion 1.x/2.x", "StableDiffusionXLPipeline": "U-Net, SDXL",
            "StableDiffusion3Pipeline": "flow-matching transformer, Stable Diffusion 3",
            "FluxPipeline": "flow-matching transformer, FLUX"}


def card_front_matter(base: str, method_tag: str) -> str:
    """The model card's YAML header (the Hub reads it): diffusers, the base model, the method's tag."""
    return f"""---
library_name: diffusers
base_model: {base}
tags:
- stable-diffusion
- concept-erasure
- machine-unlearning
- {method_tag}
- salun-diffusers
---
"""


PEER_NAMES = {"esd-x": ("ESD-x", "https://arxiv.org/abs/2303.07345", "cross-attention weights of the U-Net"),
              "esd-u": ("ESD-u", "https://arxiv.org/abs/2303.07345",
                        "U-Net weights outside cross-attention, the time embedding and the output head"),
              "esd-full": ("ESD (full)", "https://arxiv.org/abs/2303.07345", "U-Net weights"),
              "uce": ("UCE", "https://arxiv.org/abs/2308.14761", "cross-attention key and value projections"),
              "advunlearn": ("AdvUnlearn", "https://arxiv.org/abs/2405.15234",
                             "text-encoder weights (transformer layers and final layer norm)")}


def peer_model_card(config: EraseConfig, spec: AnySpec, metrics: dict) -> str:
    """The model card of a peer method's erasure (``--method esd-* | uce | advunlearn``)."""
    base = base_model_id(config)
    name, paper, what = PEER_NAMES[config.method]
    component = metrics.get("component", "unet")
    rows = "".join(f"| {k} | {v} |\n" for k, v in sorted((metrics.get("method_config") or {}).items()))
    erased = ", ".join(f"**{c.name}** (`{c.forget_prompt}`)" for c in spec.concepts)
    pipeline_use = (f"""This folder is a diffusers pipeline with the erased `{component}/`:

```python
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("path/to/this/folder")
```

""" if config.save_merged_unet and config.save_pipeline != "none" else "")
    return card_front_matter(base, config.method) + f"""
# {name} erasure of "{spec.name}" from `{base}`

This folder holds a [{name}]({paper}) erasure of {erased} from `{base}`, made with salun-diffusers {__version__}
(`train_erase.py --method {config.method}`). Only the {what} ({metrics.get('num_changed_weights', 0):,} weights,
{metrics.get('mask_density', 0):.1%} of the `{component}`) may have changed; every other weight is bit-identical to
the base model.
{_card_stacking(metrics.get("stacked_on"))}
## Use

{pipeline_use}The erasure as a delta over the base model (`set_erasure_scale` / `unload_erasure` work on it):

```python
from diffusers import StableDiffusionPipeline
from salun_diffusers import load_erasure

pipe = StableDiffusionPipeline.from_pretrained("{base}")
load_erasure(pipe, "path/to/this/folder")   # onto pipe.{component}
```

## Training

Recipe: the `{metrics.get('method_preset')}` preset of {name}, under the flags given:

| setting | value |
|---|---|
{rows}| retain / preserved prompt(s) | {'; '.join(spec.retain_prompts[:4])}{' ...' if len(spec.retain_prompts) > 4 else ''} |
| seed | {config.seed} |
| wall time | {metrics.get('total_seconds', 0):.1f} s |

Files: `{WEIGHTS_NAME}` (changed values + packed mask), `{CONFIG_NAME}`, `{MASK_NAME}`, `train_config.json`,
`metrics.json`{f", `{component}/`" if config.save_merged_unet else ""}.
{_card_exports(config, metrics)}
## Limitations

Erasure reduces, but does not guarantee the absence of, the concept; adversarial prompts can recover erased
concepts. Audit the model before relying on it.
"""


def model_card(config: EraseConfig, spec: AnySpec, metrics: dict) -> str:
    if config.method != "salun":
        return peer_model_card(config, spec, metrics)
    base = base_model_id(config)
    pipeline_class = metrics.get("pipeline_class", "StableDiffusionPipeline")
    net = "transformer" if pipeline_class in ("StableDiffusion3Pipeline", "FluxPipeline") else "U-Net"
    return card_front_matter(base, "salun") + f"""
# SalUn erasure of "{spec.name}" from `{base}`

This folder holds a [SalUn](https://arxiv.org/abs/2310.12508) (saliency unlearning) erasure of the concept{
"s " + ", ".join(f"**{c.name}**" for c in spec.concepts) + " (erased jointly, one mask)" if len(spec.concepts) > 1
else f" **{spec.name}**"} from the {net} of `{base}`, made with salun-diffusers {__version__}.
Model family: {CARD_FAMILIES.get(pipeline_class, pipeline_class)} (`{pipeline_class}`).
Only the {metrics.get('mask_density', 0):.1%} most salient {net} weights ({metrics.get('num_changed_weights', 0):,})
were changed; every other weight is bit-identical to the base model.
{_card_stacking(metrics.get("stacked_on"))}
## Use

{_card_usage(config, base, pipeline_class)}
## Training

| setting | value |
|---|---|
{_card_concepts(spec)}| retain prompt(s) | {'; '.join(spec.retain_prompts[:4])}{' ...' if len(spec.retain_prompts) > 4 else ''} |
| forget / retain images | {config.num_forget_images} / {config.num_retain_images} |
| mask | {config.mask_scope} top {config.mask_ratio:g} of gradient saliency{
f" (concepts combined: {config.saliency_combine})" if len(spec.concepts) > 1 else ""} |
| steps, batch, lr, alpha | {config.max_train_steps}, {config.train_batch_size}, {config.learning_rate:g}, {config.alpha:g} |
| seed | {config.seed} |
| wall time | {metrics.get('total_seconds', 0):.1f} s |

Files: `{WEIGHTS_NAME}` (masked values + packed mask), `{CONFIG_NAME}`, `{MASK_NAME}`, `train_config.json`,
`metrics.json`{f", `{'transformer' if net == 'transformer' else 'unet'}/`" if config.save_merged_unet else ""}{", `model_index.json` and the base's other components ("
 + {"link": "linked", "copy": "copied"}.get(config.save_pipeline, "") + ")" if config.save_merged_unet and config.save_pipeline != "none" else ""}{
 f", `{LORA_NAME}` (rank {config.export_lora_rank}, {metrics['lora']['energy_kept']:.0%} of the delta's energy)"
 if metrics.get("lora") else ""}.
{_card_exports(config, metrics)}
## Limitations

Erasure reduces, but does not guarantee the absence of, the concept; adversarial prompts can recover erased
concepts. Audit the model (e.g. `salun-audit` with NudeNet over I2P) before relying on it.
"""


def _card_usage(config: EraseConfig, base: str, pipeline_class: str) -> str:
    """The model card's "Use" section: the ways this folder loads (``pipeline_class``: the base's)."""
    erased_class = pipeline_class.replace("Pipeline", "ErasedPipeline")
    flow = pipeline_class in ("StableDiffusion3Pipeline", "FluxPipeline")
    parts = []
    if config.save_merged_unet and config.save_pipeline != "none":
        parts.append(f"""This folder is a diffusers pipeline with the erased {'transformer' if flow else 'U-Net'}:

```python
from diffusers import {pipeline_class}

pipe = {pipeline_class}.from_pretrained("path/to/this/folder")
```
""")
    if base == BUNDLED_DIGIT_MODEL:  # the bundled models are folders inside the package
        load_base = "from salun_diffusers.digits import load_digit_pipeline\n\npipe = load_digit_pipeline()"
    elif base != resolve_base_model(base):
        load_base = (f"from diffusers import {pipeline_class}\nfrom salun_diffusers.hub import resolve_base_model\n\n"
                     f"pipe = {pipeline_class}.from_pretrained(resolve_base_model(\"{base}\"))")
    else:
        load_base = f"from diffusers import {pipeline_class}\n\npipe = {pipeline_class}.from_pretrained(\"{base}\")"
    parts.append(f"""The erasure as a delta over the base model (`set_erasure_scale` / `unload_erasure` work on it):

```python
from salun_diffusers import load_erasure
{load_base}
load_erasure(pipe, "path/to/this/folder")   # onto pipe.{'transformer' if flow else 'unet'}
```
""")
    if not flow:
        parts.append(f"""```python
from salun_diffusers.pipelines import {erased_class}

pipe = {erased_class}.from_pretrained("path/to/this/folder")   # base read from the erasure
```
""")
    if config.save_merged_unet:
        parts.append("The erased transformer alone: `{0}.from_pretrained(folder, subfolder='transformer')`.\n".format(
            "SD3Transformer2DModel" if pipeline_class == "StableDiffusion3Pipeline" else "FluxTransformer2DModel")
            if flow else
            "The erased U-Net alone: `UNet2DConditionModel.from_pretrained(folder, subfolder='unet')`.\n")
    if config.export_lora_rank:
        parts.append(f"As a LoRA (an SVD approximation): `pipe.load_lora_weights(folder, weight_name='{LORA_NAME}')`.\n")
    return "\n".join(parts)
