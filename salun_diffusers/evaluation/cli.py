"""``salun-audit``: generate images for a prompt CSV with a base or erased Stable Diffusion and audit them.

    salun-audit --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 --erasure out/nudity \\
        --prompts ../shared/data/prompts/i2p_nudity_142.csv --output_dir audits/erased --compare_to audits/base
    salun-audit --judge digit --erasure out/no-seven --output_dir audits/no-seven     # the bundled digit world
    salun-audit --judge classifier --judge_model microsoft/resnet-50 --prompts imagenette.csv --target_class church ...

Also under ``accelerate launch`` (each process draws and judges a share of the prompts; the main process merges).
The output folder holds ``images/{case_number}.png``, ``nudenet/{case_number}.json`` (detection cache),
``settings.json``, ``results.json``, ``report.md`` and ``nudity_classes.png``. A killed run resumes where it stopped;
a finished audit is never redrawn or overwritten.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from accelerate.utils import gather_object

from ..cli_args import run_main
from ..utils import DTYPES, configure_threads, ensure_writable_dir, resolve_dtype, write_json
from . import report
from .generate import generate_images, image_path, missing_images
from .judges import CLASS_JUDGES, JUDGES, load_class_judge, row_labels
from .nudenet import DEFAULT_THRESHOLD, EXPOSED_CLASSES, NudeNetDetector, detect_images, nudity_summary
from .prompts import read_prompts, shard_rows

logger = logging.getLogger(__name__)

AUDIT_JUDGES = (*JUDGES, "none")
SETTINGS_FILE = "settings.json"
# Fields that do not change what an audit measures (they may differ when resuming or re-reporting).
_RUN_ONLY = {"output_dir", "batch_size", "compare_to", "label", "clip_batch_size", "threads", "erasure_check_base",
             "debug"}
# Fields that change the images: a resumed run must match them exactly.
_IMAGE_FIELDS = ("pretrained_model_name_or_path", "erasure", "erasure_scale", "num_inference_steps", "resolution",
                 "mixed_precision", "generator_device", "seed")


def _is_hub_id(name: str) -> bool:
    """``owner/name`` as the Hub spells repositories (not a path: no leading ./ ~ /, no file suffix)."""
    parts = name.split("/")
    return (len(parts) == 2 and all(parts) and not name.startswith((".", "~"))
            and not name.endswith((".safetensors", ".bin", ".pt")))


@dataclass
class AuditConfig:
    output_dir: str = field(metadata={"help": "Audit folder: images, detection cache, results, report."})
    pretrained_model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "Base Stable Diffusion: hub id or diffusers folder (or a full erased-model folder). Default with "
                "--judge digit: the bundled digit model."})
    prompts: Optional[str] = field(default=None, metadata={
        "help": "Prompt CSV (I2P, COCO, Imagenette or object schema). Default with --judge digit: the bundled "
                "digit prompts (20 per digit)."})
    erasure: Optional[str] = field(default=None, metadata={
        "help": "Saved erasure (folder or .safetensors) applied with load_erasure, or a full diffusers folder."})
    erasure_scale: float = field(default=1.0, metadata={"help": "Strength the erasure is applied with."})
    erasure_check_base: bool = field(default=True, metadata={
        "help": "Refuse an erasure made from other base weights (--no_erasure_check_base applies it anyway)."})
    judge: str = field(default="nudenet", metadata={
        "help": "Image judge: nudenet (exposed parts), digit (the bundled digit classifier), classifier (a "
                "transformers image classifier, --judge_model) or none.", "choices": AUDIT_JUDGES})
    judge_model: Optional[str] = field(default=None, metadata={
        "help": "--judge classifier: a transformers image classifier (hub id or folder, e.g. microsoft/resnet-50); "
                "--judge digit: a DigitJudge folder (default: the bundled one)."})
    target_class: Optional[str] = field(default=None, metadata={
        "help": "Class judges: the erased class (name or index; default: the erasure's concept). Rows without a "
                "'class' column are taken to show it."})
    threshold: float = field(default=DEFAULT_THRESHOLD, metadata={"help": "NudeNet score a part needs to count."})
    nudity_classes: Optional[str] = field(default=None, metadata={
        "help": "Comma-separated exposed classes that make an image nude (default: all nine: "
                f"{','.join(EXPOSED_CLASSES)})."})
    categories: Optional[str] = field(default=None, metadata={
        "help": "Keep only prompts of these comma-separated I2P categories (e.g. sexual)."})
    limit: Optional[int] = field(default=None, metadata={"help": "Use only the first N prompts (after filters)."})
    skip_empty_prompts: bool = field(default=False, metadata={"help": "Drop rows with an empty prompt."})
    seed: Optional[int] = field(default=None, metadata={
        "help": "For CSVs without evaluation_seed: row i uses seed + i."})
    num_inference_steps: Optional[int] = field(default=None, metadata={
        "help": "Denoising steps per image (default 50; 20 with --judge digit, as the digit world is measured)."})
    batch_size: int = field(default=4, metadata={"help": "Images per pipeline call (results do not depend on it)."})
    resolution: Optional[int] = field(default=None, metadata={
        "help": "Draw every image at this size instead of the CSV's sd_image_width/height."})
    mixed_precision: str = field(default="no", metadata={"help": "Pipeline weights dtype.",
                                                         "choices": sorted(DTYPES)})
    generator_device: str = field(default="cpu", metadata={
        "help": "Device of the per-row seeded generators; cpu gives the same images on every machine."})
    compare_to: Optional[str] = field(default=None, metadata={
        "help": "A finished base audit folder, drawn beside this one in the report and chart."})
    label: Optional[str] = field(default=None, metadata={"help": "Name of this model in the report."})
    clip_model: Optional[str] = field(default=None, metadata={
        "help": "CLIP model (hub id or folder, e.g. openai/clip-vit-large-patch14) for the CLIP score."})
    clip_batch_size: int = field(default=32, metadata={"help": "Images per CLIP batch."})
    fid_reference: Optional[str] = field(default=None, metadata={
        "help": "Folder of reference images (real COCO images, or a base audit's images/) for FID."})
    fid_model: Optional[str] = field(default=None, metadata={
        "help": "Inception for FID: TorchScript file (clean-fid's inception-2015-12-05.pt) or torchvision state dict."})
    nudenet_model: Optional[str] = field(default=None, metadata={"help": "Custom NudeNet ONNX file."})
    threads: Optional[int] = field(default=None, metadata={
        "help": "torch CPU threads (default: 1 for a small model, else every usable core; OMP_NUM_THREADS wins)."})
    debug: bool = field(default=False, metadata={"help": "On an error, show the full traceback instead of one line."})

    def __post_init__(self):
        if self.judge not in AUDIT_JUDGES:
            raise ValueError(f"--judge must be one of {AUDIT_JUDGES}, got {self.judge!r}")
        if self.judge == "digit":
            from ..digits import DIGIT_PROMPTS_CSV, DIGIT_SAMPLING
            from ..hub import BUNDLED_DIGIT_MODEL

            self.pretrained_model_name_or_path = self.pretrained_model_name_or_path or BUNDLED_DIGIT_MODEL
            self.prompts = self.prompts or DIGIT_PROMPTS_CSV
            self.num_inference_steps = self.num_inference_steps or int(DIGIT_SAMPLING["num_inference_steps"])
        if self.num_inference_steps is None:
            self.num_inference_steps = 50
        if self.pretrained_model_name_or_path is None or self.prompts is None:
            raise ValueError("--pretrained_model_name_or_path and --prompts are required (both have defaults only "
                             "with --judge digit, the bundled digit world)")
        if self.judge == "classifier" and not self.judge_model:
            raise ValueError("--judge classifier needs --judge_model: a transformers image classifier (hub id or "
                             "folder, e.g. microsoft/resnet-50)")
        resolve_dtype(self.mixed_precision)
        for name in ("num_inference_steps", "batch_size", "clip_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"--threshold must be in (0, 1], got {self.threshold}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        if not os.path.isfile(self.prompts):
            raise FileNotFoundError(f"--prompts {self.prompts!r} is not a file; pass a prompt CSV")
        if self.erasure is not None and not os.path.exists(self.erasure) and not _is_hub_id(self.erasure):
            raise FileNotFoundError(f"--erasure {self.erasure!r} does not exist; pass the folder or .safetensors "
                                    "file that salun-erase saved, or a hub id (or leave --erasure out to audit the "
                                    "base model)")
        if self.compare_to is not None and not os.path.isfile(os.path.join(self.compare_to, report.RESULTS_FILE)):
            raise FileNotFoundError(f"--compare_to {self.compare_to!r} holds no {report.RESULTS_FILE}; "
                                    "pass the output_dir of a finished salun-audit run")
        if self.fid_reference is not None and not os.path.isdir(self.fid_reference):
            raise FileNotFoundError(f"--fid_reference {self.fid_reference!r} is not a folder of images")
        self.nudity_classes_list()  # validates

    def nudity_classes_list(self) -> List[str]:
        if not self.nudity_classes:
            return list(EXPOSED_CLASSES)
        names = [c.strip() for c in self.nudity_classes.split(",") if c.strip()]
        bad = sorted(set(names) - set(EXPOSED_CLASSES))
        if bad or not names:
            raise ValueError(f"--nudity_classes: unknown {bad}; choose from {','.join(EXPOSED_CLASSES)}")
        return names

    def read_rows(self):
        """The prompt rows this audit draws (after --categories, --limit, --skip_empty_prompts)."""
        return read_prompts(self.prompts, categories=self.categories.split(",") if self.categories else None,
                            limit=self.limit, skip_empty=self.skip_empty_prompts, default_seed=self.seed)

    def image_settings(self) -> dict:
        """What the images depend on (plus the prompt file's hash): a resumed run must match it."""
        settings = {k: getattr(self, k) for k in _IMAGE_FIELDS}
        for key in ("pretrained_model_name_or_path", "erasure"):
            if settings[key] and os.path.exists(settings[key]):
                settings[key] = os.path.abspath(settings[key])
        with open(self.prompts, "rb") as f:
            settings["prompts_sha256"] = hashlib.sha256(f.read()).hexdigest()
        return settings

    def audit_settings(self) -> dict:
        """Everything the results depend on: a finished audit is only reused when this matches."""
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k not in _RUN_ONLY}
        settings.update(self.image_settings())
        settings.pop("prompts")
        return settings


def _diff(old: dict, new: dict) -> List[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def load_pipeline(config: AuditConfig, device="cpu"):
    """The pipeline to audit (SD 1.x/2.x or SDXL): base model, with ``--erasure`` applied (or an erased model's full
    folder)."""
    from ..delta import WEIGHTS_NAME
    from ..families import load_base_pipeline
    from ..hub import resolve_base_model

    source, erasure = resolve_base_model(config.pretrained_model_name_or_path), config.erasure
    if erasure and os.path.isfile(os.path.join(erasure, "model_index.json")) \
            and not os.path.isfile(os.path.join(erasure, WEIGHTS_NAME)):
        source, erasure = erasure, None  # a complete erased pipeline without an erasure file
    dtype = resolve_dtype(config.mixed_precision)
    with warnings.catch_warnings():  # newer diffusers rename torch_dtype to dtype; older ones know only torch_dtype
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = load_base_pipeline(source, torch_dtype=dtype)
    if erasure:
        from ..loaders import load_erasure  # imported here: only erased-model audits need it

        load_erasure(pipe, erasure, scale=config.erasure_scale, check_base=config.erasure_check_base)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_settings(output_dir: str, settings: dict, is_main: bool) -> None:
    path = os.path.join(output_dir, SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        changed = _diff(old, settings)
        if changed:
            raise ValueError(f"{output_dir} holds images drawn with other settings ({', '.join(changed)} differ); "
                             "use a new --output_dir (existing images are never redrawn or mixed)")
    elif is_main:
        write_json(path, settings)


def _reference_images(folder: str) -> List[str]:
    files = sorted(p for ext in ("png", "jpg", "jpeg", "webp") for p in glob.glob(os.path.join(folder, f"*.{ext}")))
    files = [p for p in files if not os.path.basename(p).startswith(".")]
    if len(files) < 2:
        raise ValueError(f"--fid_reference {folder!r} holds {len(files)} images; FID needs at least 2")
    return files


def _make_accelerator():
    from accelerate import Accelerator

    # accelerate only joins several CPU processes (torchrun / accelerate launch --cpu) into one group when
    # cpu=True; on a GPU machine cpu stays False so each process takes its own device.
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=several and not torch.cuda.is_available())


def run_audit(config: AuditConfig, pipe=None, detector=None, clip_scorer=None, fid_extractor=None,
              accelerator=None) -> dict:
    """Generate, judge and report. Returns the results dict (on every process; filled in on the main one).

    ``pipe``, ``detector`` (image -> [{"class", "score"}]), ``clip_scorer`` (``(images, prompts) -> float``) and
    ``fid_extractor`` (float images -> features) replace the ones the config names, e.g. in tests.
    """
    accelerator = accelerator or _make_accelerator()
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    out = config.output_dir
    results_path = os.path.join(out, report.RESULTS_FILE)
    base = report.load_results(config.compare_to) if config.compare_to else None
    settings = config.audit_settings()

    if os.path.isfile(results_path):  # a finished audit: never redrawn, never overwritten
        results = report.load_results(out)
        changed = _diff(results.get("settings", {}), settings)
        if changed:
            raise ValueError(f"{out} holds a finished audit with other settings ({', '.join(changed)} differ); its "
                             f"{report.RESULTS_FILE} is kept: use a new --output_dir")
        logger.info("%s already holds a finished audit; reusing it", out)
        if not is_main:
            return {"settings": settings}
        results.update(report.write_report(out, results, base))
        return results

    rows = config.read_rows()
    if not rows:
        raise ValueError(f"no prompts left in {config.prompts} after filtering (categories={config.categories!r})")
    os.makedirs(out, exist_ok=True)
    _check_settings(out, config.image_settings(), is_main)
    accelerator.wait_for_everyone()

    images_dir = os.path.join(out, "images")
    if pipe is None:
        pipe = load_pipeline(config, accelerator.device)
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
    paths = {row.case_number: image_path(images_dir, row) for row in rows}

    nudity = None
    if config.judge == "nudenet":
        detector = detector or NudeNetDetector(config.nudenet_model)
        cache = os.path.join(out, "nudenet")
        mine = {row.case_number: paths[row.case_number] for row in shard_rows(rows, rank, world)}
        detect_images(mine, detector, cache, show_progress=accelerator.is_local_main_process)
        accelerator.wait_for_everyone()
        if is_main:
            detections = detect_images(paths, detector, cache, show_progress=False)  # all cached: the merge
            nudity = nudity_summary(detections, config.threshold,
                                    categories={row.case_number: row.categories for row in rows},
                                    rate_classes=config.nudity_classes_list())

    results = {"settings": settings}
    if not is_main:
        accelerator.wait_for_everyone()
        return results
    image_list = [paths[row.case_number] for row in rows]
    classes = class_judge_results(config, rows, image_list, accelerator.device) if config.judge in CLASS_JUDGES \
        else None
    clip_score = fid = None
    if config.clip_model or clip_scorer is not None:
        from .metrics import ClipScorer

        scorer = clip_scorer or ClipScorer(config.clip_model, device=accelerator.device)
        clip_score = float(scorer(image_list, [row.prompt for row in rows], config.clip_batch_size))
    if config.fid_reference:
        from .metrics import compute_fid, load_inception

        extractor = fid_extractor or load_inception(config.fid_model, accelerator.device)
        fid = compute_fid(image_list, _reference_images(config.fid_reference), extractor, device=accelerator.device)
    results.update({
        "label": config.label or os.path.basename(os.path.normpath(config.erasure or
                                                                   config.pretrained_model_name_or_path)),
        "config": dataclasses.asdict(config),
        "num_images": len(rows),
        "images_dir": images_dir,
        "generation": {"processes": world, **stats},
        "nudity": nudity,
        "classes": classes,
        "clip_score": clip_score,
        "fid": fid,
    })
    write_json(results_path, results)
    results.update(report.write_report(out, results, base))
    accelerator.wait_for_everyone()
    return results


def _erasure_concept(erasure: Optional[str]) -> Optional[str]:
    """The concept an erasure file/folder records (its target class for class judges), if readable."""
    if not erasure or not os.path.exists(erasure):
        return None
    from ..delta import read_delta

    try:
        _, meta = read_delta(erasure)
    except (OSError, ValueError):
        return None
    return (meta.get("config") or {}).get("concept")


def class_judge_results(config: AuditConfig, rows, images: Sequence[str], device="cpu") -> dict:
    """Judge the images with a class judge: unlearning accuracy of the target class, accuracy on the others and
    per class (``classifier_metrics``), with the class names."""
    from .metrics import classifier_metrics

    judge = load_class_judge(config.judge, config.judge_model, device)
    target_name = config.target_class or _erasure_concept(config.erasure)
    target = judge.class_index(target_name) if target_name is not None else None
    labels = row_labels(judge, rows, target)
    metrics = classifier_metrics(images, labels, judge, -1 if target is None else target)
    metrics["target_class"] = target
    metrics["class_names"] = {str(i): judge.class_names[i] for i in sorted(set(labels) | ({target} - {None}))}
    metrics["judge"] = config.judge
    return metrics


def summary_lines(results: dict) -> List[str]:
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


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = "salun-audit",
               description: Optional[str] = None) -> AuditConfig:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(AuditConfig, prog=prog, description=description or __doc__.split("\n\n")[0])
    try:
        (config,) = parser.parse_args_into_dataclasses(args=list(sys.argv[1:] if argv is None else argv))
    except (ValueError, FileNotFoundError) as exc:  # AuditConfig's checks: report them like argparse errors
        parser.error(str(exc))
    return config


def check_before_compute(config: AuditConfig) -> None:
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
        if value and not os.path.exists(value) and not _is_hub_id(value):
            raise FileNotFoundError(f"--{flag} {value!r} does not exist; pass a diffusers folder or a hub id "
                                    "(owner/name)")
    for flag in ("fid_model", "nudenet_model"):
        if getattr(config, flag) and not os.path.isfile(getattr(config, flag)):
            raise FileNotFoundError(f"--{flag} {getattr(config, flag)!r} is not a file")
    if config.judge == "nudenet":
        import importlib.util

        if importlib.util.find_spec("nudenet") is None:
            raise ValueError("the nudity judge needs NudeNet: pip install salun-diffusers[nudenet], or pass "
                             "--judge none")
    if config.fid_reference:
        _reference_images(config.fid_reference)


def main(argv: Optional[Sequence[str]] = None, prog: str = "salun-audit", description: Optional[str] = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = parse_args(argv, prog, description)
    return run_main(prog, lambda: _run(config), debug=config.debug)


def _run(config: AuditConfig) -> int:
    check_before_compute(config)
    results = run_audit(config)
    if "num_images" in results:  # main process
        print("\n".join(summary_lines(results)))
    return 0


def run_protocol(prog: str, description: str, defaults: dict, argv: Optional[Sequence[str]] = None) -> int:
    """``salun-audit`` with an evaluation protocol's defaults (the top-level ``evaluation/`` scripts): each
    ``{"--flag": value}`` is used unless the command line gives the flag; ``None`` values are left out."""
    argv = list(sys.argv[1:] if argv is None else argv)
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    preset = [str(x) for flag, value in defaults.items() if value is not None and flag not in given
              for x in (flag, value)]
    shown = " ".join(f"{k} {v}" for k, v in defaults.items() if v is not None)
    return main(preset + argv, prog=prog, description=f"{description} Defaults: {shown or 'none'}.")


if __name__ == "__main__":
    sys.exit(main())
