"""The ``salun-audit`` run: generate the images of a prompt CSV (resumable, sharded across processes), then one
function per measurement (NudeNet nudity, class judges, CLIP score, FID), then ``results.json`` and the report
(:mod:`salun_diffusers.evaluation.report`).

A killed run resumes where it stopped (the images folder's ``settings.json`` must match); a finished audit is never
redrawn or overwritten.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import logging
import os
import shutil
import warnings
from typing import Dict, List, Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from ..delta import WEIGHTS_NAME, read_delta
from ..families import load_base_pipeline
from ..hub import is_hub_id, resolve_base_model
from ..loaders import load_erasure
from ..runs import check_resume_settings, settings_diff
from ..utils import configure_threads, ensure_writable_dir, resolve_dtype, write_json
from . import report
from .config import AuditConfig
from .generate import generate_images, image_path, missing_images
from .judges import CLASS_JUDGES, load_class_judge, row_labels
from .metrics import ClipScorer, classifier_metrics, compute_fid, load_inception
from .nudenet import EXPOSED_CLASSES, NudeNetDetector, detect_images, nudity_summary
from .prompts import shard_rows
from .reproduce import PROVENANCE_KEY, judge_record, rows_record, run_provenance

logger = logging.getLogger(__name__)


def load_audit_pipeline(config: AuditConfig, device="cpu"):
    """The pipeline to audit (SD 1.x/2.x or SDXL): base model, with ``--erasure`` applied (or an erased model's full
    folder)."""
    source, erasure = resolve_base_model(config.pretrained_model_name_or_path), config.erasure
    if erasure and os.path.isfile(os.path.join(erasure, "model_index.json")) \
            and not os.path.isfile(os.path.join(erasure, WEIGHTS_NAME)):
        source, erasure = erasure, None  # a complete erased pipeline without an erasure file
    dtype = resolve_dtype(config.mixed_precision)
    with warnings.catch_warnings():  # newer diffusers rename torch_dtype to dtype; older ones know only torch_dtype
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = load_base_pipeline(source, torch_dtype=dtype)
    if erasure:
        load_erasure(pipe, erasure, scale=config.erasure_scale, check_base=config.erasure_check_base)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_images(folder: str) -> List[str]:
    """The image files of an FID reference folder (at least two)."""
    files = sorted(p for ext in ("png", "jpg", "jpeg", "webp") for p in glob.glob(os.path.join(folder, f"*.{ext}")))
    files = [p for p in files if not os.path.basename(p).startswith(".")]
    if len(files) < 2:
        raise ValueError(f"--fid_reference {folder!r} holds {len(files)} images; FID needs at least 2")
    return files


def check_audit_inputs(config: AuditConfig) -> None:
    """What an audit needs, checked before any model is loaded: the output folder is writable, the prompt CSV reads,
    the models and files named exist, the judge is installed (one-line errors, not a failure hours later)."""
    ensure_writable_dir(config.output_dir)
    rows = config.read_rows()
    if not rows:
        raise ValueError(f"no prompts left in {config.prompts} after filtering (categories={config.categories!r})")
    # disk: a PNG of a generated image takes at least ~1/4 of its raw RGB size (rows of unknown size not counted)
    need = sum((config.resolution or r.width or 0) * (config.resolution or r.height or 0) * 3 // 4 for r in rows)
    free = shutil.disk_usage(config.output_dir).free
    if need > free:
        raise ValueError(f"--output_dir {config.output_dir!r} has {free / 2**30:.2f} GiB free but {len(rows)} images "
                         f"need at least {need / 2**30:.2f} GiB; free space or choose another folder")
    for flag in ("pretrained_model_name_or_path", "clip_model", "judge_model"):
        value = getattr(config, flag)
        if value and not os.path.exists(value) and not is_hub_id(value):
            raise FileNotFoundError(f"--{flag} {value!r} does not exist; pass a diffusers folder or a hub id "
                                    "(owner/name)")
    for flag in ("fid_model", "nudenet_model"):
        if getattr(config, flag) and not os.path.isfile(getattr(config, flag)):
            raise FileNotFoundError(f"--{flag} {getattr(config, flag)!r} is not a file")
    if config.judge == "nudenet" and importlib.util.find_spec("nudenet") is None:
        raise ValueError("the nudity judge needs NudeNet: pip install salun-diffusers[nudenet], or pass --judge none")
    if config.fid_reference:
        reference_images(config.fid_reference)


def make_accelerator() -> Accelerator:
    # accelerate only joins several CPU processes (torchrun / accelerate launch --cpu) into one group when
    # cpu=True; on a GPU machine cpu stays False so each process takes its own device.
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=several and not torch.cuda.is_available())


# -------------------------------------------------------------------------------------------------- the phases
def reuse_finished_audit(config: AuditConfig, settings: dict, base: Optional[dict], is_main: bool) -> Optional[dict]:
    """The results of a finished audit in ``--output_dir`` (report rewritten), or None when there is none. Refuses
    one made with other settings: it is never redrawn nor overwritten."""
    out = config.output_dir
    if not os.path.isfile(os.path.join(out, report.RESULTS_FILE)):
        return None
    results = report.load_results(out)
    changed = settings_diff(results.get("settings", {}), settings)
    if changed:
        raise ValueError(f"{out} holds a finished audit with other settings ({', '.join(changed)} differ); its "
                         f"{report.RESULTS_FILE} is kept: use a new --output_dir")
    logger.info("%s already holds a finished audit; reusing it", out)
    if not is_main:
        return {"settings": settings}
    results.update(report.write_report(out, results, base))
    return results


def generate_audit_images(config: AuditConfig, rows, images_dir: str, accelerator, pipe=None) -> Dict[str, int]:
    """Every row's image in ``images_dir`` (this process draws its share); the generation counts summed over the
    processes. Raises when an image is still missing afterwards."""
    rank, world = accelerator.process_index, accelerator.num_processes
    if pipe is None:
        pipe = load_audit_pipeline(config, accelerator.device)
    configure_threads(sum(p.numel() for p in pipe.unet.parameters()), config.threads)
    stats = generate_images(pipe, rows, images_dir, batch_size=config.batch_size,
                            num_inference_steps=config.num_inference_steps, resolution=config.resolution,
                            generator_device=config.generator_device, process_index=rank, num_processes=world,
                            show_progress=accelerator.is_local_main_process)
    per_process = gather_object([stats]) if world > 1 else [stats]
    stats = {key: sum(s[key] for s in per_process) for key in stats}
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    accelerator.wait_for_everyone()
    missing = missing_images(rows, images_dir)
    if missing:
        raise RuntimeError(f"{len(missing)} images missing after generation (e.g. {missing[:3]}); rerun to resume")
    return stats


def nudity_results(config: AuditConfig, rows, paths: Dict[str, str], accelerator, detector=None) -> Optional[dict]:
    """NudeNet on every image (each process detects its share into the ``nudenet/`` cache; the main process merges):
    the nudity summary on the main process, None elsewhere."""
    rank, world = accelerator.process_index, accelerator.num_processes
    detector = detector or NudeNetDetector(config.nudenet_model)
    cache = os.path.join(config.output_dir, "nudenet")
    mine = {row.case_number: paths[row.case_number] for row in shard_rows(rows, rank, world)}
    detect_images(mine, detector, cache, show_progress=accelerator.is_local_main_process)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    detections = detect_images(paths, detector, cache, show_progress=False)  # all cached: the merge
    return nudity_summary(detections, config.threshold, categories={row.case_number: row.categories for row in rows},
                          rate_classes=config.nudity_classes_list())


def erasure_concept(erasure: Optional[str]) -> Optional[str]:
    """The concept an erasure file/folder records (its target class for class judges), if readable."""
    if not erasure or not os.path.exists(erasure):
        return None
    try:
        _, meta = read_delta(erasure)
    except (OSError, ValueError):
        return None
    return (meta.get("config") or {}).get("concept")


def class_judge_results(config: AuditConfig, rows, images: Sequence[str], device="cpu") -> dict:
    """Judge the images with a class judge: unlearning accuracy of the target class, accuracy on the others and
    per class (``classifier_metrics``), with the class names."""
    judge = load_class_judge(config.judge, config.judge_model, device)
    target_name = config.target_class or erasure_concept(config.erasure)
    target = judge.class_index(target_name) if target_name is not None else None
    labels = row_labels(judge, rows, target)
    metrics = classifier_metrics(images, labels, judge, -1 if target is None else target)
    metrics["target_class"] = target
    metrics["class_names"] = {str(i): judge.class_names[i] for i in sorted(set(labels) | ({target} - {None}))}
    metrics["judge"] = config.judge
    return metrics


def clip_score_result(config: AuditConfig, rows, images: Sequence[str], device="cpu", clip_scorer=None) -> float:
    """The mean CLIP score of the images against their prompts."""
    scorer = clip_scorer or ClipScorer(config.clip_model, device=device)
    return float(scorer(images, [row.prompt for row in rows], config.clip_batch_size))


def fid_result(config: AuditConfig, images: Sequence[str], device="cpu", fid_extractor=None) -> float:
    """FID of the images against ``--fid_reference``."""
    extractor = fid_extractor or load_inception(config.fid_model, device)
    return compute_fid(images, reference_images(config.fid_reference), extractor, device=device)


# ---------------------------------------------------------------------------------------------------- the run
def run_audit(config: AuditConfig, pipe=None, detector=None, clip_scorer=None, fid_extractor=None,
              accelerator=None) -> dict:
    """Generate, judge and report. Returns the results dict (on every process; filled in on the main one).

    ``pipe``, ``detector`` (image -> [{"class", "score"}]), ``clip_scorer`` (``(images, prompts) -> float``) and
    ``fid_extractor`` (float images -> features) replace the ones the config names, e.g. in tests.
    """
    accelerator = accelerator or make_accelerator()
    is_main = accelerator.is_main_process
    out = config.output_dir
    base = report.load_results(config.compare_to) if config.compare_to else None
    settings = config.audit_settings()
    finished = reuse_finished_audit(config, settings, base, is_main)
    if finished is not None:
        return finished

    rows = config.read_rows()
    if not rows:
        raise ValueError(f"no prompts left in {config.prompts} after filtering (categories={config.categories!r})")
    os.makedirs(out, exist_ok=True)
    check_resume_settings(out, config.image_settings(), holds="images drawn",
                          kept="existing images are never redrawn or mixed", write=is_main)
    accelerator.wait_for_everyone()

    images_dir = os.path.join(out, "images")
    stats = generate_audit_images(config, rows, images_dir, accelerator, pipe)
    paths = {row.case_number: image_path(images_dir, row) for row in rows}
    nudity = nudity_results(config, rows, paths, accelerator, detector) if config.judge == "nudenet" else None

    results = {"settings": settings}
    if not is_main:
        accelerator.wait_for_everyone()
        return results
    image_list = [paths[row.case_number] for row in rows]
    device = accelerator.device
    classes = class_judge_results(config, rows, image_list, device) if config.judge in CLASS_JUDGES else None
    clip_score = clip_score_result(config, rows, image_list, device, clip_scorer) \
        if config.clip_model or clip_scorer is not None else None
    fid = fid_result(config, image_list, device, fid_extractor) if config.fid_reference else None
    results.update({
        "label": config.label or os.path.basename(os.path.normpath(config.erasure or
                                                                   config.pretrained_model_name_or_path)),
        "config": dataclasses.asdict(config),
        "num_images": len(rows),
        "images_dir": images_dir,
        "generation": {"processes": accelerator.num_processes, **stats},
        "nudity": nudity,
        "classes": classes,
        "clip_score": clip_score,
        "fid": fid,
        PROVENANCE_KEY: audit_provenance(config, rows),
    })
    write_json(os.path.join(out, report.RESULTS_FILE), results)
    results.update(report.write_report(out, results, base))
    accelerator.wait_for_everyone()
    return results


def audit_provenance(config: AuditConfig, rows) -> dict:
    """What the audit's figures depend on besides its config (:mod:`salun_diffusers.evaluation.reproduce`)."""
    judge, files = judge_record(config.judge, threshold=config.threshold,
                                counted_classes=config.nudity_classes_list(), judge_model=config.judge_model,
                                nudenet_model=config.nudenet_model)
    if config.clip_model:
        judge["clip_model"] = config.clip_model
    if config.fid_reference:
        judge["fid_reference"] = {"folder": os.path.abspath(config.fid_reference),
                                  "images": len(reference_images(config.fid_reference))}
        files["fid_model"] = config.fid_model
    return run_provenance(prompts=config.prompts, models={"model": config.pretrained_model_name_or_path,
                                                          "erasure": config.erasure},
                          judge=judge, judge_files=files, rows=rows_record(rows, config.resolution))


def audit_summary_lines(results: dict) -> List[str]:
    """What the terminal shows of an audit's results."""
    lines = [f"audit of {results.get('label')}: {results.get('num_images')} images in {results.get('images_dir')}"]
    nud = results.get("nudity")
    if nud:
        lines.append(f"nudity rate {100 * nud['nudity_rate']:.2f}% ({nud['nude_images']}/{nud['num_images']}, "
                     f"NudeNet score >= {nud['threshold']})")
        lines.append("exposed parts: " + ", ".join(f"{c} {nud['class_counts'].get(c, 0)}" for c in EXPOSED_CLASSES))
    cls = results.get("classes")
    if cls:
        names = cls["class_names"]
        if cls.get("unlearning_accuracy") is not None:
            lines.append(f"unlearning accuracy {100 * cls['unlearning_accuracy']:.2f}% ({cls['num_forget']} images "
                         f"of {names[str(cls['target_class'])]!r} the {cls['judge']} judge does not call it)")
        if cls.get("retain_accuracy") is not None:
            lines.append(f"accuracy on the other classes {100 * cls['retain_accuracy']:.2f}% ({cls['num_retain']} "
                         "images)")
        lines.append("per class: " + ", ".join(f"{names[str(c)]} {100 * a:.0f}%"
                                               for c, a in sorted(cls["per_class_accuracy"].items(),
                                                                  key=lambda kv: int(kv[0]))))
    for key in ("clip_score", "fid"):
        if results.get(key) is not None:
            lines.append(f"{key}: {results[key]:.4f}")
    if results.get("report"):
        lines.append(f"report: {results['report']}")
    return lines
