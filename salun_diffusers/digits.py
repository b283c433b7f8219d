"""The "digit world": a tiny real text-to-image Stable Diffusion pipeline trained on MNIST, and a digit judge.

Both are bundled in the package (``salun_diffusers/assets/``) and rebuilt by ``scripts/train_digit_world.py``.

* ``digit-sd/`` is an ordinary :class:`~diffusers.StableDiffusionPipeline` folder (CLIP tokenizer + text encoder,
  ``UNet2DConditionModel``, ``AutoencoderKL``, ``DDIMScheduler``) that draws 32x32 RGB handwritten digits for prompts
  ``"a handwritten digit seven"``. It is small enough to erase concepts from and evaluate on CPU in about a minute.
* ``digit-judge/`` is a small CNN (:class:`DigitJudge`) trained on real MNIST digits; it tells which digit an image
  shows, so erasure can be measured ("is the erased digit still drawn? are the others?").
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from typing import Dict, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .concepts import DIGIT_WORDS, digit_prompt
from .data_cache import shipped_array_name, shipped_arrays_sha256, shipped_data_key
from .utils import atomic_path, cast_module

__all__ = ["DIGIT_JUDGE_DIR", "DIGIT_PIPELINE_DIR", "DIGIT_SAMPLING", "DIGIT_SD3_PIPELINE_DIR", "SD3_DIGIT_SAMPLING",
           "digit_sampling", "flow_sampling_defaults", "DIGIT_WORDS", "DigitJudge", "digit_prompt",
           "BUNDLED_WORLDS", "ShippedData", "bundled_world", "generate_digits", "judge_accuracy", "judge_split",
           "load_digit_pipeline", "mnist_images", "shipped_asset"]

logger = logging.getLogger(__name__)

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DIGIT_PIPELINE_DIR = os.path.join(ASSETS_DIR, "digit-sd")
DIGIT_SD3_PIPELINE_DIR = os.path.join(ASSETS_DIR, "digit-sd3")  # the flow-matching digit world (SD3 format)
DIGIT_JUDGE_DIR = os.path.join(ASSETS_DIR, "digit-judge")
DIGIT_PROMPTS_CSV = os.path.join(ASSETS_DIR, "digit_prompts.csv")  # salun-audit --judge digit's default prompts
IMAGE_SIZE = 32
# Recommended sampling settings for the bundled pipeline (the quality figures in assets/README.md use these).
DIGIT_SAMPLING: Dict[str, float] = {"num_inference_steps": 20, "guidance_scale": 4.0, "height": IMAGE_SIZE,
                                    "width": IMAGE_SIZE}
# The SD3 world was trained with T5 length 8 (zero T5 tokens, no T5 encoder): sampled at the pipeline's default 256 its
# digits are judged right only 66% of the time (100% at 8; scripts/train_flow_digit_world.py)
SD3_MAX_SEQUENCE_LENGTH = 8
SD3_DIGIT_SAMPLING: Dict[str, float] = {**DIGIT_SAMPLING, "max_sequence_length": SD3_MAX_SEQUENCE_LENGTH}


def flow_sampling_defaults(model_source: str) -> dict:
    """Pipeline-call settings a bundled flow world needs whatever else is asked (its T5 length); ``{}`` for any
    other model."""
    return {"max_sequence_length": SD3_MAX_SEQUENCE_LENGTH} if bundled_world(model_source) == "digit-sd3" else {}


def digit_sampling(pipe) -> dict:
    """The sampling settings of a digit pipeline: :data:`DIGIT_SAMPLING`, with the SD3 world's T5 length for an SD3
    pipeline (the only SD3 digit world is the bundled one)."""
    return SD3_DIGIT_SAMPLING if hasattr(pipe, "transformer") and hasattr(pipe, "text_encoder_3") else DIGIT_SAMPLING


_TRAIN_HINT = "rebuild it with `python scripts/train_digit_world.py --output_dir salun_diffusers/assets --seed 0`"


def mnist_images(images_uint8) -> torch.Tensor:
    """MNIST uint8 ``[N, 28, 28]`` (numpy or torch) -> float ``[N, 3, 32, 32]`` in [-1, 1], padded by 2, grey as RGB."""
    x = images_uint8
    if not isinstance(x, torch.Tensor):
        x = torch.from_numpy(np.array(x))
    if x.ndim != 3 or x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images [N, H, W] as load_mnist gives, got {tuple(x.shape)} {x.dtype}")
    pad = (IMAGE_SIZE - x.shape[-1]) // 2
    x = x.float().div(127.5).sub(1.0)
    x = F.pad(x, (pad, pad, pad, pad), value=-1.0) if pad > 0 else x
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def judge_split(n: int, seed: int = 0, n_train: int = 8000):
    """Seeded split of ``n`` MNIST indices into (judge training indices, held-out indices), both sorted."""
    if not 0 < n_train < n:
        raise ValueError(f"n_train must be between 1 and {n - 1}, got {n_train}")
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    return perm[:n_train].sort().values, perm[n_train:].sort().values


def load_digit_pipeline(device="cpu", torch_dtype=torch.float32):
    """The bundled digit :class:`~diffusers.StableDiffusionPipeline` (progress bar disabled)."""
    if not os.path.isfile(os.path.join(DIGIT_PIPELINE_DIR, "model_index.json")):
        raise FileNotFoundError(f"bundled digit pipeline missing at {DIGIT_PIPELINE_DIR}; {_TRAIN_HINT}")
    pipe = StableDiffusionPipeline.from_pretrained(DIGIT_PIPELINE_DIR, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):  # a 5 MB model: cast after loading (any diffusers version)
        if module.dtype != torch_dtype:
            cast_module(module, torch_dtype)
    return pipe


class DigitJudge(nn.Module):
    """Small CNN classifying a digit image (white on black, as MNIST and the digit pipeline draw them) into 0..9.

    Accepts what a diffusers pipeline returns: a list of PIL images, numpy ``[N, H, W, 3]`` in [0, 1]
    (``output_type="np"``), or torch ``[N, 3, H, W]`` in [0, 1] (``output_type="pt"``); 1-channel inputs too.
    Colour is averaged to grey and images are resized to 32x32.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64), num_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        self.config = {"channels": list(channels), "num_classes": num_classes, "dropout": dropout,
                       "image_size": IMAGE_SIZE}
        layers, c_in = [], 1
        for c in channels:  # 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(c_in, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for grey images ``[N, 1, 32, 32]`` in [0, 1]."""
        return self.head(self.features(x * 2.0 - 1.0))

    # ----------------------------------------------------------------------------------------------- input handling
    def prepare(self, images) -> torch.Tensor:
        """Any accepted image format -> float ``[N, 1, 32, 32]`` in [0, 1] on the judge's device."""
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("DigitJudge got an empty list of images")
            images = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
        if isinstance(images, np.ndarray):
            if images.ndim == 3:  # [N, H, W] grey
                images = images[..., None]
            if images.ndim != 4 or images.shape[-1] not in (1, 3):
                raise ValueError(f"DigitJudge expects numpy images [N, H, W, 3] (channels last, as output_type='np' "
                                 f"gives), got shape {images.shape}")
            scale = 255.0 if images.dtype == np.uint8 else 1.0
            x = torch.from_numpy(np.ascontiguousarray(images)).float().div(scale).permute(0, 3, 1, 2)
        elif isinstance(images, torch.Tensor):
            x = images.detach().float()
            if x.ndim != 4 or x.shape[1] not in (1, 3):
                raise ValueError(f"DigitJudge expects torch images [N, 3, H, W] (channels first, as output_type='pt' "
                                 f"gives), got shape {tuple(x.shape)}")
        else:
            raise TypeError(f"DigitJudge expects PIL images, numpy [N, H, W, 3] or torch [N, 3, H, W]; got "
                            f"{type(images).__name__}")
        if x.numel() and float(x.min()) < -0.02:
            raise ValueError(f"DigitJudge expects pixel values in [0, 1], got min {float(x.min()):.3f}; for "
                             "[-1, 1] images pass (x + 1) / 2")
        x = x.mean(dim=1, keepdim=True).to(self.head[-1].weight.device)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return x.clamp(0.0, 1.0)

    @torch.no_grad()
    def predict_proba(self, images, batch_size: int = 512) -> torch.Tensor:
        """Class probabilities, float ``[N, 10]`` (on CPU)."""
        was_training = self.training
        self.eval()
        x = self.prepare(images)
        probs = torch.cat([self(x[i:i + batch_size]).softmax(-1).cpu() for i in range(0, len(x), batch_size)])
        self.train(was_training)
        return probs

    def predict(self, images, batch_size: int = 512) -> torch.Tensor:
        """Predicted digits, long ``[N]`` (on CPU)."""
        return self.predict_proba(images, batch_size=batch_size).argmax(-1)

    # ------------------------------------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``path`` (each atomically)."""
        os.makedirs(path, exist_ok=True)
        with atomic_path(os.path.join(path, "config.json")) as tmp:
            with open(tmp, "w") as f:
                json.dump({"model_type": "digit-judge", **self.config}, f, indent=2)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(os.path.join(path, "model.safetensors")) as tmp:
            save_file(state, tmp)
        for name in ("config.json", "model.safetensors"):
            os.chmod(os.path.join(path, name), 0o644)  # temp files are created 0600

    @classmethod
    def from_pretrained(cls, path: Optional[str] = None, device="cpu") -> "DigitJudge":
        """Load a judge written by :meth:`save_pretrained` (default: the bundled one), in eval mode."""
        path = path or DIGIT_JUDGE_DIR
        cfg_file, weights = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
        if not (os.path.isfile(cfg_file) and os.path.isfile(weights)):
            hint = _TRAIN_HINT if path == DIGIT_JUDGE_DIR else "pass a folder written by DigitJudge.save_pretrained"
            raise FileNotFoundError(f"no digit judge (config.json + model.safetensors) in {path}; {hint}")
        with open(cfg_file) as f:
            cfg = json.load(f)
        judge = cls(channels=cfg["channels"], num_classes=cfg["num_classes"], dropout=cfg.get("dropout", 0.0))
        judge.config.update({k: v for k, v in cfg.items() if k not in judge.config and k != "model_type"})
        judge.load_state_dict(load_file(weights))
        return judge.to(device).eval()


def generate_digits(pipe, digit: int, n: int, seed: int = 0, batch_size: int = 64, **sampling) -> np.ndarray:
    """``n`` images for ``digit_prompt(digit)`` as numpy ``[n, H, W, 3]`` in [0, 1]; image ``i`` uses seed ``seed + i``.

    Per-image generators make every image independent of the batch size. ``sampling`` overrides ``DIGIT_SAMPLING``.
    """
    kwargs = {**digit_sampling(pipe), **sampling}
    device = getattr(pipe, "_execution_device", pipe.device)
    gen_device = "cpu" if torch.device(device).type == "mps" else device
    out = []
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        gens = [torch.Generator(gen_device).manual_seed(seed + start + i) for i in range(count)]
        out.append(pipe([digit_prompt(digit)] * count, generator=gens, output_type="np", **kwargs).images)
    return np.concatenate(out)


def judge_accuracy(pipe, judge: DigitJudge, digits: Iterable[int] = range(10), n_per_digit: int = 50, seed: int = 0,
                   batch_size: int = 64, **sampling) -> dict:
    """How often ``judge`` calls the pipeline's images of each digit correctly.

    Image ``i`` of digit ``d`` is drawn with seed ``seed + 1000 * d + i`` (so results do not depend on batch size or
    on which digits are asked for). Returns ``{"per_digit": {d: accuracy}, "mean": float, "min": float,
    "n_per_digit": int}``; ``sampling`` overrides ``DIGIT_SAMPLING`` (e.g. ``guidance_scale=...``).
    """
    if not 0 < n_per_digit <= 1000:
        raise ValueError(f"n_per_digit must be in 1..1000 (seeds of different digits would overlap), got {n_per_digit}")
    per_digit = {}
    for d in tqdm(list(digits), desc="judging digits", leave=False):
        images = generate_digits(pipe, d, n_per_digit, seed=seed + 1000 * int(d), batch_size=batch_size, **sampling)
        per_digit[int(d)] = float((judge.predict(images) == int(d)).float().mean())
    values = list(per_digit.values())
    result = {"per_digit": per_digit, "mean": float(np.mean(values)), "min": float(np.min(values)),
              "n_per_digit": int(n_per_digit)}
    logger.info("judge accuracy on generated digits: mean %.3f, min %.3f", result["mean"], result["min"])
    return result


# Each bundled digit world ships what never changes for it, named after it (``BUNDLED_WORLDS``), both built by
# scripts/build_digit_data.py and both used only when their key (a fingerprint of the pipeline's weights and scheduler
# and of the settings) matches:
# * ``<world>-verdict-base.json``: the judge's scores of the base model (reporting.base_digit_scores), so a first
#   run's verdict draws only the erased model;
# * ``<world>-data.npz``: its generated forget/retain images at the digit presets' settings (seed 0), copied into the
#   ordinary cache folder (ShippedData), so a first digit erasure draws none (on the U-Net world drawing them was a
#   fifth of the README command's time) and every later step is the same.
BUNDLED_WORLDS: Dict[str, str] = {"digit": DIGIT_PIPELINE_DIR, "digit-sd3": DIGIT_SD3_PIPELINE_DIR}
SHIPPED_DATA_SUFFIX = "-data.npz"
SHIPPED_VERDICT_SUFFIX = "-verdict-base.json"
SHIPPED_DATA_ASSET = "digit" + SHIPPED_DATA_SUFFIX  # the U-Net world's


def bundled_world(model_source) -> Optional[str]:
    """The name of the bundled digit world (a key of :data:`BUNDLED_WORLDS`) in folder ``model_source``, else None."""
    if not isinstance(model_source, str) or not os.path.isdir(model_source):
        return None
    real = os.path.realpath(model_source)
    return next((w for w, folder in BUNDLED_WORLDS.items() if os.path.realpath(folder) == real), None)


def shipped_asset(world: str, suffix: str) -> str:
    """Path of a bundled world's shipped file (``suffix``: :data:`SHIPPED_DATA_SUFFIX` or
    :data:`SHIPPED_VERDICT_SUFFIX`)."""
    return os.path.join(ASSETS_DIR, world + suffix)


class ShippedData:
    """The shipped images of a bundled world (empty for any other model or setting): :meth:`fill` writes the
    PNGs it has for a prompt's seeds into a cache folder, leaving files already there alone. ``sampling``: the
    pipeline-call settings the images are drawn with beyond steps, guidance and size (default: the world's own,
    :func:`flow_sampling_defaults`)."""

    def __init__(self, pipe, model_source: str, steps: int, guidance: float, size: int, variant=None,
                 precision: str = "no", sampling: Optional[dict] = None):
        self.arrays = {}
        world = bundled_world(model_source)
        path = shipped_asset(world, SHIPPED_DATA_SUFFIX) if world else None
        if path is None or not os.path.isfile(path):
            return
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            key, digest = str(arrays.pop("key")), str(arrays.pop("sha256"))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:  # damaged: generate, as for any model
            logger.warning("ignoring %s (%s); generating the data instead", path, exc)
            return
        if digest != shipped_arrays_sha256(arrays):
            logger.warning("ignoring %s: its images do not match its checksum; generating the data instead", path)
            return
        sampling = flow_sampling_defaults(model_source) if sampling is None else sampling
        if key == shipped_data_key(pipe, steps, guidance, size, variant, precision, sampling):
            self.arrays = arrays

    def fill(self, prompt: str, seeds: Sequence[int], out_dir: str) -> int:
        """Write ``{seed}.png`` for the seeds the asset holds (a run of consecutive seeds from its first); returns
        how many images came from the asset."""
        if not seeds:
            return 0
        images = self.arrays.get(shipped_array_name(prompt, seeds[0]))
        if images is None or list(seeds) != list(range(seeds[0], seeds[0] + len(seeds))) or len(seeds) > len(images):
            return 0
        os.makedirs(out_dir, exist_ok=True)
        for i, seed in enumerate(seeds):
            path = os.path.join(out_dir, f"{seed}.png")
            if not os.path.exists(path):
                with atomic_path(path) as tmp:
                    Image.fromarray(images[i]).save(tmp, format="PNG")
        return len(seeds)
