"""Erasure phase 1, data: the base pipeline (SD 1.x/2.x or SDXL), forget / retain images (generated and cached, or
read from folders), their latents and the prompts' U-Net conditioning."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..concepts import ConceptSpec
from ..config import EraseConfig
from ..families import PromptCond, encode_prompts, load_base_pipeline
from ..hub import BUNDLED_DIGIT_MODEL, resolve_base_model
from ..utils import SMALL_MODEL_PARAMETERS, user_cache_dir

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class ConceptData:
    """Latents of forget and retain images with the prompt index of each (into ``list(embeds)``), and the
    conditioning of every prompt; ``embeds[""]`` is the pipeline's unconditional (classifier-free guidance) one."""

    forget_latents: torch.Tensor
    retain_latents: Optional[torch.Tensor]
    retain_prompt_ids: Optional[torch.Tensor]
    embeds: Dict[str, PromptCond] = field(default_factory=dict)
    # several concepts: the index (into ``spec.concepts``) of each forget latent's concept; None: one concept
    forget_concept_ids: Optional[torch.Tensor] = None

    def concept_ids(self) -> torch.Tensor:
        """The concept index of every forget latent (all 0 for one concept)."""
        if self.forget_concept_ids is not None:
            return self.forget_concept_ids
        return torch.zeros(self.forget_latents.shape[0], dtype=torch.long)


def base_model_id(config: EraseConfig) -> str:
    return config.pretrained_model_name_or_path or BUNDLED_DIGIT_MODEL


def load_pipeline(config: EraseConfig):
    """The base pipeline, StableDiffusionPipeline or StableDiffusionXLPipeline as its folder says (safety checker off:
    the forget data is, by design, the unsafe concept)."""
    return load_base_pipeline(resolve_base_model(base_model_id(config)), revision=config.revision,
                              variant=config.variant)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "prompt"


def model_signature(source: str) -> list:
    """What identifies a base model's weights for the data cache: for a local folder its files' sizes and
    modification times (a folder rewritten in place gets new data), for a hub id nothing more (the revision is in
    the key)."""
    if not os.path.isdir(source):
        return []
    sig = []
    for root, _, files in sorted(os.walk(source)):
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            sig.append([os.path.relpath(os.path.join(root, name), source), st.st_size, int(st.st_mtime)])
    return sig


def generation_dir(cache_dir: str, model_id: str, revision, prompt: str, steps: int, guidance: float,
                   size: int, extra=()) -> str:
    """Cache folder of one prompt's generated images, keyed by everything that changes the images (``extra``: the
    model's signature, the variant and generation precision)."""
    key = json.dumps([model_id, revision, prompt, steps, guidance, size, *extra])
    return os.path.join(cache_dir, f"{_slug(prompt)}-{hashlib.sha256(key.encode()).hexdigest()[:10]}")


def generate_images(pipe, prompt: str, seeds: Sequence[int], out_dir: str, *, num_inference_steps: int,
                    guidance_scale: float, size: int, batch_size: int = 8, accelerator=None) -> List[str]:
    """One PNG per seed (``{seed}.png``) in ``out_dir``, drawn by the evaluation generator (one seeded generator per
    image, atomic writes, existing files kept, process ``r`` of ``N`` draws every N-th image). Returns the paths."""
    from ..evaluation.generate import generate_images as draw
    from ..evaluation.prompts import PromptRow

    rows = [PromptRow(str(s), prompt, int(s), guidance_scale, size, size) for s in seeds]
    main = accelerator.is_local_main_process if accelerator else True
    draw(pipe, rows, out_dir, batch_size=batch_size, num_inference_steps=num_inference_steps,
         process_index=accelerator.process_index if accelerator else 0,
         num_processes=accelerator.num_processes if accelerator else 1, show_progress=main)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return [os.path.join(out_dir, f"{s}.png") for s in seeds]


# The bundled digit model's generated forget/retain images at the digit presets' settings (seed 0), shipped like its
# base verdict: they never change, and drawing them (352 images, 20 steps) was a fifth of the README command's time.
# Built by scripts/build_digit_data.py; used only when its key (a fingerprint of the pipeline's weights, scheduler
# and the generation settings) matches, and copied into the ordinary cache folder, so every later step is the same.
SHIPPED_DATA_ASSET = "digit-data.npz"


def shipped_data_key(pipe, steps: int, guidance: float, size: int, variant=None, precision: str = "no") -> str:
    from ..utils import pipeline_fingerprint

    return pipeline_fingerprint(pipe, {"steps": steps, "guidance": guidance, "size": size, "variant": variant,
                                       "precision": precision, "v": 1})


def shipped_arrays_sha256(arrays) -> str:
    """sha256 over the shipped image arrays (names, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def shipped_array_name(prompt: str, first_seed: int) -> str:
    return f"{_slug(prompt)}_{int(first_seed)}"


class ShippedData:
    """The shipped images of the bundled model (empty for any other model or setting): :meth:`fill` writes the
    PNGs it has for a prompt's seeds into a cache folder, leaving files already there alone."""

    def __init__(self, pipe, model_source: str, steps: int, guidance: float, size: int, variant=None,
                 precision: str = "no"):
        from ..digits import ASSETS_DIR, DIGIT_PIPELINE_DIR

        self.arrays = {}
        path = os.path.join(ASSETS_DIR, SHIPPED_DATA_ASSET)
        if (not os.path.isfile(path) or not os.path.isdir(model_source)
                or os.path.realpath(model_source) != os.path.realpath(DIGIT_PIPELINE_DIR)):
            return
        import zipfile

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
        if key == shipped_data_key(pipe, steps, guidance, size, variant, precision):
            self.arrays = arrays

    def fill(self, prompt: str, seeds: Sequence[int], out_dir: str) -> int:
        """Write ``{seed}.png`` for the seeds the asset holds (a run of consecutive seeds from its first); returns
        how many images came from the asset."""
        from ..utils import atomic_path

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


def _read_captions(meta: str, default_prompt: str) -> dict:
    """``{file_name: text}`` of diffusers' ``metadata.jsonl``; a bad line is a ``ValueError`` naming file, line, fix."""
    fix = ("fix or delete it: it must be UTF-8 text with one JSON object per line, "
           '{"file_name": "0.png", "text": "a caption"}')
    with open(meta, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ValueError(f"{meta!r} is not UTF-8 text (line {line}, byte {exc.start}: "
                         f"{exc.reason}); {fix}") from None
    captions = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions[str(row["file_name"])] = row.get("text") or default_prompt
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            what = f"no 'file_name' ({exc})" if isinstance(exc, KeyError) else str(exc)
            raise ValueError(f"{meta!r} line {number} is not a caption row ({what}); {fix}") from None
    return captions


def read_image_folder(folder: str, default_prompt: str) -> List[tuple]:
    """``(path, prompt)`` pairs from a folder; captions from diffusers' ``metadata.jsonl`` (file_name, text)."""
    captions = {}
    meta = os.path.join(folder, "metadata.jsonl")
    if os.path.isfile(meta):
        captions = _read_captions(meta, default_prompt)
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder!r}; put the images there (captions "
                         "in its metadata.jsonl) or pass another folder")
    return [(os.path.join(folder, f), captions.get(f, default_prompt)) for f in files]


def _load_pixels(paths: Sequence[str], size: int) -> torch.Tensor:
    arrays = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # truncated, not an image
            raise ValueError(f"image {p!r} cannot be read ({exc}); replace or remove it (a generated image in the "
                             "cache is drawn again once removed)") from None
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def encode_images(vae, paths: Sequence[str], size: int, batch_size: int = 16, desc: str = "encode") -> torch.Tensor:
    """Latents (distribution mode, times the VAE scaling factor) of image files, in float32 on the VAE's device."""
    out = []
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    for start in tqdm(range(0, len(paths), batch_size), desc=desc, disable=len(paths) <= batch_size):
        pixels = _load_pixels(paths[start:start + batch_size], size).to(vae.device, vae.dtype)
        latents = vae.encode(pixels).latent_dist.mode()
        out.append(((latents - shift) * scale).float())
    return torch.cat(out)


def data_batch_size(config: EraseConfig, unet) -> int:
    """``--data_batch_size``, else 64 for a small model (fewer, larger ops: measured 20% faster per image than batch
    16 on the digit U-Net, CPU), else ``--train_batch_size`` (what fits beside training on an accelerator)."""
    if config.data_batch_size:
        return config.data_batch_size
    small = sum(p.numel() for p in unet.parameters()) < SMALL_MODEL_PARAMETERS
    return 64 if small else config.train_batch_size


def prepare_data(pipe, config: EraseConfig, spec: ConceptSpec, accelerator=None) -> ConceptData:
    """Forget and retain latents + prompt embeddings (generating and caching images where no folder is given)."""
    size = config.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    cache = config.cache_dir or user_cache_dir("data")
    gen = dict(num_inference_steps=config.data_num_inference_steps, guidance_scale=config.data_guidance_scale,
               size=size, batch_size=data_batch_size(config, pipe.unet), accelerator=accelerator)
    model_id = base_model_id(config)
    precision = accelerator.mixed_precision if accelerator is not None else "no"
    extra = [config.variant, precision, model_signature(resolve_base_model(model_id))]

    shipped = []  # built on first use

    def generated(prompt: str, n: int, seed_base: int, role: str) -> List[str]:
        folder = generation_dir(cache, model_id, config.revision, prompt, config.data_num_inference_steps,
                                config.data_guidance_scale, size, extra)
        seeds = [seed_base + i for i in range(n)]
        source = ""
        main = accelerator is None or accelerator.is_local_main_process
        if main and not all(os.path.exists(os.path.join(folder, f"{s}.png")) for s in seeds):
            if not shipped:
                shipped.append(ShippedData(pipe, resolve_base_model(model_id), config.data_num_inference_steps,
                                           config.data_guidance_scale, size, config.variant, precision))
            if shipped[0].fill(prompt, seeds, folder):
                source = " (copied from the images shipped with the package)"
        if accelerator is not None:  # every process waits, whatever it found on disk
            accelerator.wait_for_everyone()
        logger.info("%s data: %d images of %r in %s%s", role, n, prompt, folder, source)
        return generate_images(pipe, prompt, seeds, folder, **gen)

    members = spec.concepts
    forget, forget_ids = [], []
    for k, concept in enumerate(members):  # each concept's own forget images: a folder, or generated
        folder = concept.forget_data_dir or (config.forget_data_dir if len(members) == 1 else None)
        if folder:
            paths = [p for p, _ in read_image_folder(folder, concept.forget_prompt)]
        else:
            paths = generated(concept.forget_prompt, config.num_forget_images, config.seed * 100_000, "forget")
        forget += paths
        forget_ids += [k] * len(paths)
    retain: List[tuple] = []
    if config.retain_data_dir:
        retain = read_image_folder(config.retain_data_dir, spec.retain_prompts[0])
    elif config.num_retain_images > 0:
        k = len(spec.retain_prompts)
        for j, prompt in enumerate(spec.retain_prompts):
            n = config.num_retain_images // k + (1 if j < config.num_retain_images % k else 0)
            retain += [(p, prompt) for p in generated(prompt, n, config.seed * 100_000 + 50_000, "retain")]
    prompts = [*[c.forget_prompt for c in members], *[p for c in members for p in c.pseudo_prompts],
               *[p for _, p in retain]]
    embeds = encode_prompts(pipe, prompts, size)  # + "": the unconditional branch of the guided saliency loss
    forget_latents = encode_images(pipe.vae, forget, size, desc="encode forget")
    retain_latents = retain_ids = None
    if retain:
        retain_latents = encode_images(pipe.vae, [p for p, _ in retain], size, desc="encode retain")
        order = list(embeds)
        retain_ids = torch.tensor([order.index(p) for _, p in retain])
    ids = torch.tensor(forget_ids) if len(members) > 1 else None
    return ConceptData(forget_latents, retain_latents, retain_ids, embeds, ids)
