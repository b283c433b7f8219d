"""Image-quality and classifier-judged metrics: FID, CLIP score, unlearning accuracy.

Feature extractors and judges are injectable callables, so every metric runs with tiny config-built models in
tests and with real weights (Inception, CLIP, a class judge) when the user has them.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPProcessor

logger = logging.getLogger(__name__)

ImageLike = Union[str, Image.Image]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]  # float [B, 3, H, W] in [0, 1] -> [B, D]


def _open(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as im:
        return im.convert("RGB")


def _batches(items: Sequence, batch_size: int) -> Iterable[Sequence]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i in range(0, len(items), batch_size):
        yield items[i:i + batch_size]


# ----------------------------------------------------------------------------------------------------------- FID
def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between two Gaussians: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature statistics disagree in shape: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product: nudge the diagonals (as pytorch-fid does)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return float(max(value, 0.0))


def fid_from_features(features1, features2) -> float:
    """FID between two feature sets ``[N, D]`` (numpy arrays or tensors), each with N >= 2."""
    f1 = np.asarray(torch.as_tensor(features1).double().cpu())
    f2 = np.asarray(torch.as_tensor(features2).double().cpu())
    if f1.ndim != 2 or f2.ndim != 2 or len(f1) < 2 or len(f2) < 2:
        raise ValueError(f"FID needs two [N, D] feature sets with N >= 2, got {f1.shape} and {f2.shape}")
    return frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))


@torch.no_grad()
def image_features(images: Sequence[ImageLike], extractor: FeatureExtractor, batch_size: int = 32,
                   device: Union[str, torch.device] = "cpu", show_progress: bool = False) -> torch.Tensor:
    """Features ``[N, D]`` of images (paths or PIL) from ``extractor`` (float [B, 3, H, W] in [0, 1] -> [B, D]).

    Consecutive images of one size share a batch; the extractor resizes as it needs.
    """
    out = []
    for chunk in tqdm(list(_batches(list(images), batch_size)), desc="features", disable=not show_progress):
        arrays = [np.asarray(_open(im)) for im in chunk]
        start = 0
        for end in range(1, len(arrays) + 1):
            if end == len(arrays) or arrays[end].shape != arrays[start].shape:
                x = torch.from_numpy(np.stack(arrays[start:end])).permute(0, 3, 1, 2).float().div(255).to(device)
                out.append(torch.as_tensor(extractor(x)).float().flatten(1).cpu())
                start = end
    if not out:
        raise ValueError("no images to compute features of")
    return torch.cat(out)


def compute_fid(images1: Sequence[ImageLike], images2: Sequence[ImageLike], extractor: FeatureExtractor,
                batch_size: int = 32, device="cpu", show_progress: bool = False) -> float:
    """FID between two image sets with the given feature extractor (e.g. :func:`load_inception`)."""
    f1 = image_features(images1, extractor, batch_size, device, show_progress)
    f2 = image_features(images2, extractor, batch_size, device, show_progress)
    return fid_from_features(f1, f2)


class _TorchScriptInception(torch.nn.Module):
    """The TorchScript Inception of StyleGAN2-ADA / clean-fid (``inception-2015-12-05.pt``): uint8 NCHW in."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model((x * 255).round().clamp(0, 255).to(torch.uint8), return_features=True)


class _TorchvisionInception(torch.nn.Module):
    """torchvision's Inception-v3 pool features (2048-d). Close to, but not the same network as, TF-FID's."""

    def __init__(self, state_dict_path: Optional[str] = None):
        super().__init__()
        from torchvision.models import inception_v3

        if state_dict_path:
            net = inception_v3(weights=None, aux_logits=True, init_weights=False)
            net.load_state_dict(torch.load(state_dict_path, map_location="cpu"))
        else:
            net = inception_v3(weights="IMAGENET1K_V1")
        net.fc = torch.nn.Identity()
        self.net = net.eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x):
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net((x - self.mean) / self.std)


def load_inception(path: Optional[str] = None, device="cpu") -> torch.nn.Module:
    """An Inception feature extractor for FID.

    ``path`` may be a TorchScript file in the StyleGAN2-ADA / clean-fid format (``inception-2015-12-05.pt``,
    called as ``model(uint8 images, return_features=True)``: the standard FID network) or a torchvision
    Inception-v3 state dict; ``None`` uses torchvision's ImageNet weights (downloaded into the torch hub cache).
    """
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Inception weights {path!r} not found; pass an existing --fid_model file")
        try:
            model = _TorchScriptInception(torch.jit.load(path, map_location="cpu"))
        except RuntimeError:
            model = None
        if model is not None:
            return model.eval().to(device)
    try:
        return _TorchvisionInception(path).eval().to(device)
    except ImportError as exc:
        raise ImportError("FID needs Inception features: pass --fid_model with a TorchScript Inception "
                          "(e.g. clean-fid's inception-2015-12-05.pt), or pip install torchvision") from exc


# ------------------------------------------------------------------------------------------------------ CLIP score
class ClipScorer:
    """CLIP score: 100 * max(cos(image embedding, text embedding), 0), per image.

    Give a model path / hub id (``openai/clip-vit-large-patch14``), or a ``CLIPModel`` and ``CLIPProcessor``.
    """

    def __init__(self, model_name_or_path: Optional[str] = None, model=None, processor=None, device="cpu"):
        if model is None or processor is None:
            if not model_name_or_path:
                raise ValueError("ClipScorer needs model_name_or_path, or both model and processor")
            model = model or CLIPModel.from_pretrained(model_name_or_path)
            processor = processor or CLIPProcessor.from_pretrained(model_name_or_path)
        self.model = model.eval().to(device)
        self.processor = processor
        self.device = torch.device(device)
        # long prompts (I2P's run past 77 tokens) are cut to what the text encoder takes
        self.max_length = min(getattr(processor.tokenizer, "model_max_length", 77),
                              model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def scores(self, images: Sequence[ImageLike], prompts: Sequence[str], batch_size: int = 32,
               show_progress: bool = False) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"CLIP score needs one prompt per image: {len(images)} images, {len(prompts)} prompts")
        out = []
        pairs = list(zip(images, prompts))
        for chunk in tqdm(list(_batches(pairs, batch_size)), desc="clip score", disable=not show_progress):
            inputs = self.processor(text=[p for _, p in chunk], images=[_open(im) for im, _ in chunk],
                                    return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            result = self.model(**inputs)
            img = torch.nn.functional.normalize(result.image_embeds.float(), dim=-1)
            txt = torch.nn.functional.normalize(result.text_embeds.float(), dim=-1)
            out.append(100.0 * (img * txt).sum(-1).clamp(min=0).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def __call__(self, images, prompts, batch_size: int = 32) -> float:
        """Mean CLIP score over image/prompt pairs."""
        return float(self.scores(images, prompts, batch_size).mean())


# -------------------------------------------------------------------------------------------- classifier-judged
def judge_predictions(judge, images: Sequence, batch_size: int = 64) -> torch.Tensor:
    """Class indices from a judge: an object with ``.predict(images)`` or a callable ``images -> LongTensor``.

    Image files (paths ending in an image suffix) are opened as PIL images first.
    """
    predict = judge.predict if hasattr(judge, "predict") else judge

    def load(chunk):
        return [_open(im) if isinstance(im, str) and im.lower().endswith(IMAGE_SUFFIXES) else im for im in chunk]

    preds: List[torch.Tensor] = [torch.as_tensor(predict(load(chunk))).long().flatten().cpu()
                                 for chunk in _batches(list(images), batch_size)]
    preds_all = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    if len(preds_all) != len(images):
        raise ValueError(f"judge returned {len(preds_all)} predictions for {len(images)} images")
    return preds_all


def classifier_metrics(images: Sequence, labels: Sequence[int], judge, target_class: int,
                       batch_size: int = 64) -> Dict[str, object]:
    """Judge images of an erased class (and of other classes) with a classifier.

    Args:
        images: generated images (whatever the judge accepts: PIL images, tensors, paths).
        labels: the class each image was prompted for.
        judge: ``.predict(images) -> LongTensor`` or a callable doing the same (e.g. ``DigitJudge``).
        target_class: the erased class.

    Returns ``unlearning_accuracy`` (share of target-class images NOT classified as the target; higher = better
    erased), ``retain_accuracy`` (share of other-class images classified as their class; higher = better kept),
    ``per_class_accuracy`` and the counts. A side with no images gives ``None``.
    """
    labels_t = torch.as_tensor(list(labels), dtype=torch.long)
    if len(labels_t) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels_t)} labels")
    preds = judge_predictions(judge, images, batch_size)
    forget = labels_t == target_class
    retain = ~forget
    per_class = {int(c): float((preds[labels_t == c] == c).float().mean()) for c in labels_t.unique().tolist()}
    return {
        "target_class": int(target_class),
        "num_forget": int(forget.sum()),
        "num_retain": int(retain.sum()),
        "unlearning_accuracy": float((preds[forget] != target_class).float().mean()) if forget.any() else None,
        "retain_accuracy": float((preds[retain] == labels_t[retain]).float().mean()) if retain.any() else None,
        "per_class_accuracy": per_class,
    }
