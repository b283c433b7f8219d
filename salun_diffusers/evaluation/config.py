"""``AuditConfig``: what ``salun-audit`` draws and how it judges it (one flag per field), and the settings a resumed
or reused audit must match."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from typing import List, Optional

from ..digits import DIGIT_PROMPTS_CSV, DIGIT_SAMPLING
from ..hub import BUNDLED_DIGIT_MODEL, is_hub_id
from ..utils import DTYPES, resolve_dtype
from .judges import JUDGES
from .nudenet import DEFAULT_THRESHOLD, EXPOSED_CLASSES
from .prompts import read_prompts
from .report import RESULTS_FILE

AUDIT_JUDGES = (*JUDGES, "none")
# Fields that do not change what an audit measures (they may differ when resuming or re-reporting).
_RUN_ONLY = {"output_dir", "batch_size", "compare_to", "label", "clip_batch_size", "threads", "erasure_check_base",
             "debug"}
# Fields that change the images: a resumed run must match them exactly.
_IMAGE_FIELDS = ("pretrained_model_name_or_path", "erasure", "erasure_scale", "num_inference_steps", "resolution",
                 "mixed_precision", "generator_device", "seed")


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
        if self.erasure is not None and not os.path.exists(self.erasure) and not is_hub_id(self.erasure):
            raise FileNotFoundError(f"--erasure {self.erasure!r} does not exist; pass the folder or .safetensors "
                                    "file that salun-erase saved, or a hub id (or leave --erasure out to audit the "
                                    "base model)")
        if self.compare_to is not None and not os.path.isfile(os.path.join(self.compare_to, RESULTS_FILE)):
            raise FileNotFoundError(f"--compare_to {self.compare_to!r} holds no {RESULTS_FILE}; "
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
