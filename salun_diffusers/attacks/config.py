"""``AttackConfig``: what ``salun-attack`` attacks, with which attack, judge and budget (one flag per field), and
:func:`resolve_models`: which model is attacked and which draws the targets."""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from typing import Optional

from ..hub import BUNDLED_DIGIT_MODEL, is_hub_id
from ..loaders import read_erasure_dir_config
from ..utils import DTYPES, flag_field, resolve_dtype
from .core import CONDITIONING_DEFAULTS, DEFAULT_LR, DEFAULT_STEPS

ATTACKS = ("token", "inversion", "conditioning")  # the runner's ATTACK_RUNNERS has one entry per name

# Fields that do not change a row's result (they may differ between a run and its resumption).
_RUN_ONLY = {"output_dir", "limit", "batch_size", "label"}


_f = flag_field


@dataclass
class AttackConfig:
    model: Optional[str] = _f(None, "Model under attack: an erasure folder written by salun-erase (its base is read "
                                    "from it), a diffusers folder or hub id (with --erasure), or "
                                    "salun-diffusers/digit-sd (the bundled digit world).")
    output_dir: Optional[str] = _f(None, "Folder for images, per-prompt rows, results, report and plot.")
    prompts: Optional[str] = _f(None, "Prompt CSV like the audit's (prompt, evaluation_seed, ...; optional "
                                      "target_prompt column), e.g. ../shared/data/prompts/i2p_nudity_142.csv.")
    erasure: Optional[str] = _f(None, "Erasure (folder or .safetensors) applied to --model.")
    base_model: Optional[str] = _f(None, "Model that draws the target images (default: the erasure's recorded base, "
                                         "or --model itself when nothing is erased).")
    attack: str = _f("token", "token (UnlearnDiffAtk: adversarial words prepended), inversion (one learned token "
                              "embedding) or conditioning (the whole text conditioning, white-box).", choices=ATTACKS)
    judge: Optional[str] = _f(None, "Image judge: nudenet, digit or classifier (default: digit with --digit, else "
                                    "nudenet).", choices=["nudenet", "digit", "classifier"])
    judge_model: Optional[str] = _f(None, "--judge classifier: a transformers image classifier (hub id or folder, e.g. "
                                          "microsoft/resnet-50); --judge digit: a DigitJudge folder (default: the "
                                          "bundled one).")
    target_class: Optional[str] = _f(None, "--judge classifier: the class a success must show (name or index).")
    digit: Optional[int] = _f(None, "Digit world: the digit (0-9) the digit judge looks for; without --prompts, "
                                    "--num_prompts rows are made for it.")
    from_prompt: Optional[str] = _f(None, "With --digit and no --prompts: the prompt attacked (e.g. the neutral "
                                          "'a handwritten digit'); the target is always the digit's own prompt.")
    num_prompts: int = _f(20, "With --digit and no --prompts: how many rows (seeds seed, seed+1, ...).")
    steps: Optional[int] = _f(None, "Attack optimisation steps (default: token "
                                    f"{DEFAULT_STEPS['token']}, inversion {DEFAULT_STEPS['inversion']}, "
                                    f"conditioning {DEFAULT_STEPS['conditioning']}).")
    lr: Optional[float] = _f(None, "Attack learning rate (default: token {token}, inversion {inversion}, "
                                   "conditioning {conditioning}).".format(**DEFAULT_LR))
    draws: int = _f(CONDITIONING_DEFAULTS["draws"], "Conditioning attack: noise draws per target and step (batched; "
                                                  "more: a steadier gradient, a stronger attack).")
    min_timestep: int = _f(CONDITIONING_DEFAULTS["min_timestep"], "Conditioning attack: draw timesteps from here to "
                                                                 "the noisiest (where what an image shows is decided).")
    num_tokens: int = _f(5, "Token attack: adversarial tokens prepended to the prompt.")
    init_word: Optional[str] = _f(None, "Inversion: the word the learned embedding starts from (default: digit for "
                                        "the digit judge, person for nudenet).")
    placeholder: str = _f("<adv>", "Inversion: how the learned token is written in the report's prompts.")
    limit: Optional[int] = _f(None, "Attack only the first N prompts.")
    categories: Optional[str] = _f(None, "Keep only prompts of these comma-separated I2P categories.")
    seed: int = _f(0, "Attack seed; also row i's image seed (seed + i) for CSVs without evaluation_seed.")
    num_inference_steps: Optional[int] = _f(None, "Sampling steps (default: 20 on the digit world, else 50).")
    guidance_scale: Optional[float] = _f(None, "Guidance for every row (default: the CSV's evaluation_guidance, "
                                               "4.0 for --digit rows, else 7.5).")
    resolution: Optional[int] = _f(None, "Draw every image at this size instead of the CSV's.")
    threshold: float = _f(0.6, "NudeNet score a part needs to count.")
    nudenet_model: Optional[str] = _f(None, "Custom NudeNet ONNX file.")
    mixed_precision: str = _f("no", "Pipeline weights dtype.", choices=sorted(DTYPES))
    batch_size: int = _f(4, "Images per pipeline call when drawing targets and before-images.")
    label: Optional[str] = _f(None, "Name of the attacked model in the report.")

    def __post_init__(self):
        for name in ("model", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        if self.prompts is None and self.digit is None:
            raise ValueError("pass --prompts CSV, or --digit D to attack the digit world's prompts")
        if self.prompts is not None and not os.path.isfile(self.prompts):
            raise FileNotFoundError(f"--prompts {self.prompts!r} is not a file; pass a prompt CSV")
        if self.digit is not None and not 0 <= self.digit <= 9:
            raise ValueError(f"--digit must be in 0..9, got {self.digit}")
        if self.judge is None:
            self.judge = "digit" if self.digit is not None else "nudenet"
        if self.judge == "digit" and self.digit is None:
            raise ValueError("--judge digit needs --digit D (the digit a success must show)")
        if self.judge == "classifier" and (self.judge_model is None or self.target_class is None):
            raise ValueError("--judge classifier needs --judge_model (an image classifier) and --target_class (the "
                             "class a success must show)")
        if self.attack not in ATTACKS:
            raise ValueError(f"--attack must be one of {ATTACKS}, got {self.attack!r}")
        for name in ("num_prompts", "num_tokens", "batch_size", "draws"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.min_timestep < 0:
            raise ValueError(f"--min_timestep must be >= 0, got {self.min_timestep}")
        for name in ("limit", "num_inference_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 0:
            raise ValueError(f"--steps must be >= 0, got {self.steps}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"--threshold must be in (0, 1], got {self.threshold}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        resolve_dtype(self.mixed_precision)
        for name in ("model", "erasure", "base_model"):
            value = getattr(self, name)
            if value and value != BUNDLED_DIGIT_MODEL and not os.path.exists(value) and not is_hub_id(value):
                raise FileNotFoundError(f"--{name} {value!r} does not exist; pass a folder, a .safetensors erasure "
                                        "or a hub id")

    # ------------------------------------------------------------------------------------------- derived settings
    @property
    def digit_world(self) -> bool:
        return self.judge == "digit"

    def attack_steps(self) -> int:
        return DEFAULT_STEPS[self.attack] if self.steps is None else self.steps

    def attack_lr(self) -> float:
        return DEFAULT_LR[self.attack] if self.lr is None else self.lr

    def sampling_steps(self) -> int:
        return self.num_inference_steps or (20 if self.digit_world else 50)

    def settings(self) -> dict:
        """Everything a row's result depends on: a resumed run must match it."""
        # the inversion embedding is learned on every row's target: for it the prompt set (--limit) matters
        run_only = _RUN_ONLY - {"limit"} if self.attack == "inversion" else _RUN_ONLY
        settings = {k: v for k, v in asdict(self).items() if k not in run_only}
        for key in ("model", "erasure", "base_model", "prompts"):
            if settings[key] and os.path.exists(settings[key]):
                settings[key] = os.path.abspath(settings[key])
        if self.prompts:
            with open(self.prompts, "rb") as f:
                settings["prompts_sha256"] = hashlib.sha256(f.read()).hexdigest()
        settings.update(steps=self.attack_steps(), lr=self.attack_lr(), num_inference_steps=self.sampling_steps(),
                        base_model=resolve_models(self)[2])
        return settings


def resolve_models(config: AttackConfig):
    """``(model, erasure, base_model)``: what to load as the attacked pipeline, and where targets come from."""
    model, erasure, base = config.model, config.erasure, config.base_model
    meta = read_erasure_dir_config(model)
    if meta is not None and erasure is None:  # an erasure folder: its base model is recorded in it
        recorded = meta.get("config", {}).get("base_model")
        if not recorded:
            raise ValueError(f"--model {model!r} records no base model; pass the base as --model and this folder "
                             "as --erasure")
        model, erasure = recorded, config.model
    return model, erasure, base or model


