"""The ``salun-attack`` run: for each prompt row a target image drawn by the base model, a *before* image drawn by the
attacked model, the attack (one entry of :data:`ATTACK_RUNNERS` per attack name), an *after* image drawn with the
adversarial conditioning, and the judge's verdict on all three; then the summary and report
(:mod:`salun_diffusers.attacks.report`).

Every file is written atomically; a killed run resumes with the rows it has (``rows/{case}.json``), and a rerun with
more prompts (``--limit``) reuses the finished ones.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..digits import DIGIT_SAMPLING, digit_prompt
from ..families import (FLOW_CLASSES, FLUX, PromptCond, denoiser, encode_images, load_base_pipeline,
                        model_class_name, pipeline_class_name, pipeline_family, training_scheduler)
from ..evaluation.generate import generate_images, image_path, row_size
from ..evaluation.judges import make_judge
from ..evaluation.nudenet import EXPOSED_CLASSES
from ..evaluation.prompts import PromptRow, read_prompts
from ..evaluation.reproduce import judge_record, rows_record, run_provenance
from ..hub import resolve_base_model
from ..loaders import load_erasure
from ..pipelines import StableDiffusionErasedPipeline
from ..runs import check_resume_settings
from ..utils import atomic_path, resolve_dtype, write_json
from .config import ATTACKS, AttackConfig, resolve_models
from .core import (InversionResult, check_attack_fits, conditioning_attack, encode_prompt, evaluate_loss,
                   inversion_attack, token_attack)
from .report import write_attack_report

logger = logging.getLogger(__name__)

ROWS_DIR, INVERSION_FILE = "rows", "inversion.safetensors"


def load_attacked_pipeline(model: str, erasure: Optional[str], mixed_precision: str, device=None):
    """The pipeline ``model`` (with ``erasure`` loaded) on ``device`` (default: cuda where there is one). SD3 / FLUX
    models load as the class their ``model_index.json`` names, the erasure on ``pipe.transformer``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        if model_class_name(model) in FLOW_CLASSES:
            pipe = load_base_pipeline(resolve_base_model(model), torch_dtype=resolve_dtype(mixed_precision))
            if erasure:
                load_erasure(pipe, erasure)
        else:
            pipe = StableDiffusionErasedPipeline.from_pretrained(model, erasure=erasure, safety_checker=None,
                                                                 requires_safety_checker=False,
                                                                 torch_dtype=resolve_dtype(mixed_precision))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


# ------------------------------------------------------------------------------------------------------ prompts
def digit_rows(config: AttackConfig) -> List[PromptRow]:
    """Rows for ``--digit`` without a CSV: ``num_prompts`` seeds of ``from_prompt`` (default the digit's prompt)."""
    target = digit_prompt(config.digit)
    prompt = target if config.from_prompt is None else config.from_prompt
    guidance = config.guidance_scale or DIGIT_SAMPLING["guidance_scale"]
    return [PromptRow(str(i), prompt, config.seed + i, guidance, extra={"target_prompt": target})
            for i in range(config.num_prompts)]


def read_attack_rows(config: AttackConfig) -> List[PromptRow]:
    """The rows the run attacks (the CSV's, or the digit world's), after ``--categories`` and ``--limit``."""
    if config.prompts is None:
        rows = digit_rows(config)
    else:
        rows = read_prompts(config.prompts, categories=config.categories.split(",") if config.categories else None,
                            default_seed=config.seed)
        if config.guidance_scale is not None:
            rows = [type(r)(r.case_number, r.prompt, r.seed, config.guidance_scale, r.width, r.height, r.categories,
                            r.extra) for r in rows]
    rows = rows[:config.limit] if config.limit else rows
    if not rows:
        raise ValueError(f"no prompts to attack in {config.prompts} (categories={config.categories!r})")
    return rows


def target_rows(rows) -> List[PromptRow]:
    """The rows the base model draws: the ``target_prompt`` column where there is one, else the prompt."""
    return [PromptRow(r.case_number, (r.extra.get("target_prompt") or "").strip() or r.prompt, r.seed, r.guidance,
                      r.width, r.height, r.categories) for r in rows]


def row_file(out: str, case: str) -> str:
    return os.path.join(out, ROWS_DIR, f"{case}.json")


# ------------------------------------------------------------------------------------------------------ images
def sampling_kwargs(pipe) -> dict:
    """Pipeline-call settings the model must be sampled with besides the row's (the SD3 digit world's T5 length);
    the row's guidance is the pipeline's ``guidance_scale`` for every family."""
    return {k: v for k, v in pipeline_family(pipe).sampling_kwargs().items() if k != "guidance_scale"}


def conditioning_kwargs(pipe, embeds) -> dict:
    """The pipeline-call arguments that draw from a conditioning: ``prompt_embeds`` and the empty prompt's
    ``negative_prompt_embeds`` (SD3: with the pooled embeddings of both; FLUX: no negative, as its pipeline draws a
    prompt)."""
    model = denoiser(pipe)
    if not isinstance(embeds, PromptCond):
        negative = encode_prompt(pipe, "").to(model.device, model.dtype)
        return {"prompt_embeds": embeds.to(model.device, model.dtype), "negative_prompt_embeds": negative}
    embeds = embeds.to(model.device, model.dtype)
    kwargs = {"prompt_embeds": embeds.embeds, "pooled_prompt_embeds": embeds.added["pooled_projections"]}
    if pipeline_class_name(pipe) != FLUX:
        negative = encode_prompt(pipe, "").to(model.device, model.dtype)
        kwargs.update(negative_prompt_embeds=negative.embeds,
                      negative_pooled_prompt_embeds=negative.added["pooled_projections"])
    return kwargs


@torch.no_grad()
def draw_conditioned(pipe, row, embeds, path: str, num_inference_steps: int, resolution=None) -> None:
    """Draw one image of ``row`` (its seed, guidance and size) with the pipeline's own sampling from a conditioning
    ``[1, 77, D]`` (SD3 / FLUX: a batch-1 PromptCond with the pooled embeddings); save atomically."""
    height, width = row_size(pipe, row, resolution)
    image = pipe(**conditioning_kwargs(pipe, embeds), **sampling_kwargs(pipe),
                 generator=torch.Generator("cpu").manual_seed(row.seed), guidance_scale=row.guidance,
                 num_inference_steps=num_inference_steps, height=height, width=width, output_type="pil").images[0]
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def target_latents(pipe, path: str, row, resolution) -> torch.Tensor:
    """The VAE latents of a target image (square images only)."""
    height, width = row_size(pipe, row, resolution)
    if height != width:
        raise ValueError(f"case {row.case_number}: the attack needs square images, got {width}x{height}; "
                         "pass --resolution")
    return encode_images(pipe.vae, [path], height).to(denoiser(pipe).device)


# ------------------------------------------------------------------------------------------------------ attacks
def inversion_template(config: AttackConfig, row) -> str:
    return f"{config.placeholder} {row.prompt}".strip()


def learn_inversion(pipe, config: AttackConfig, rows, targets, targets_dir: str) -> InversionResult:
    """Concept inversion once over every row's target (cached in ``inversion.safetensors``)."""
    path = os.path.join(config.output_dir, INVERSION_FILE)
    init_word = config.init_word or ("digit" if config.digit_world else "person")
    if os.path.isfile(path):
        saved = load_file(path)
        return InversionResult(saved["embedding"], config.placeholder, init_word, float(saved["loss_start"]),
                               float(saved["loss_final"]), pipe=pipe)
    t0 = time.perf_counter()
    latents = torch.cat([target_latents(pipe, image_path(targets_dir, t), t, config.resolution) for t in targets])
    result = inversion_attack(pipe, latents, steps=config.attack_steps(), lr=config.attack_lr(),
                              placeholder=config.placeholder, init_word=init_word,
                              templates=[inversion_template(config, r) for r in rows],
                              generator=torch.Generator().manual_seed(config.seed), show_progress=True)
    with atomic_path(path) as tmp:
        save_file({"embedding": result.embedding.contiguous(), "loss_start": torch.tensor(result.loss_start),
                   "loss_final": torch.tensor(result.loss_final),
                   "seconds": torch.tensor(time.perf_counter() - t0, dtype=torch.float64)}, tmp)
    return result


def _run_token(pipe, config: AttackConfig, row, target, gen, inversion) -> dict:
    result = token_attack(pipe, target, row.prompt, num_tokens=config.num_tokens, steps=config.attack_steps(),
                          lr=config.attack_lr(), generator=gen)
    return {"embeds": result.embeds, "adversarial_prompt": result.prompt, "adversarial_tokens": result.tokens,
            "loss_start": result.loss_start, "loss_final": result.loss_final}


def _run_inversion(pipe, config: AttackConfig, row, target, gen, inversion) -> dict:
    template = inversion_template(config, row)
    embeds = inversion.prompt_embeds(template, pipe)
    sched = training_scheduler(pipe)
    return {"embeds": embeds, "adversarial_prompt": template, "adversarial_tokens": [config.placeholder],
            "loss_start": evaluate_loss(pipe.unet, sched, target, encode_prompt(pipe, row.prompt)),
            "loss_final": evaluate_loss(pipe.unet, sched, target, embeds)}


def _run_conditioning(pipe, config: AttackConfig, row, target, gen, inversion) -> dict:
    # the family's own loss: a DDPM scheduler for the U-Nets, the FlowFamily (sigmas, velocity, pooled) for SD3/FLUX
    family = pipeline_family(pipe)
    sched = family if family.flow else training_scheduler(pipe)
    model = denoiser(pipe)
    init = encode_prompt(pipe, row.prompt, sched)
    embeds = conditioning_attack(model, sched, target, init, steps=config.attack_steps(), lr=config.attack_lr(),
                                 draws=config.draws, min_timestep=config.min_timestep, generator=gen)
    return {"embeds": embeds, "adversarial_prompt": None, "adversarial_tokens": None,
            "loss_start": evaluate_loss(model, sched, target, init),
            "loss_final": evaluate_loss(model, sched, target, embeds)}


# attack name -> (pipe, config, row, target latents, generator, learned inversion or None) -> {"embeds",
# "adversarial_prompt", "adversarial_tokens", "loss_start", "loss_final"}
ATTACK_RUNNERS: Dict[str, Callable[..., dict]] = {"token": _run_token, "inversion": _run_inversion,
                                                  "conditioning": _run_conditioning}
assert set(ATTACK_RUNNERS) == set(ATTACKS)


def attack_row(pipe, config: AttackConfig, row, target: torch.Tensor, inversion=None) -> dict:
    """Run the configured attack on one row (seeded by ``--seed`` and the row's seed)."""
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + row.seed % 1_000_003)
    return ATTACK_RUNNERS[config.attack](pipe, config, row, target, gen, inversion)


def make_attack_judge(config: AttackConfig):
    """The concept judge the config names (digit, classifier or nudenet) with its options."""
    if config.judge == "digit":
        return make_judge("digit", digit=config.digit, judge_dir=config.judge_model)
    if config.judge == "classifier":
        return make_judge("classifier", target=config.target_class, model=config.judge_model)
    return make_judge("nudenet", threshold=config.threshold, model_path=config.nudenet_model)


# ------------------------------------------------------------------------------------------------------ the run
def run_attack(config: AttackConfig, judge=None, base_pipe=None, pipe=None) -> dict:
    """Targets, before-images, attacks, after-images, judging, report. ``judge``/``base_pipe``/``pipe`` replace the
    ones the config names (e.g. in tests). Returns the results dict (also in ``results.json``)."""
    out = config.output_dir
    rows = read_attack_rows(config)
    os.makedirs(out, exist_ok=True)
    check_resume_settings(out, config.settings(), holds="an attack run", kept="finished rows are never redone or mixed")
    model, erasure, base_model = resolve_models(config)
    check_attack_fits(model_class_name(model) if pipe is None else pipeline_class_name(pipe), config.attack)
    judge = judge or make_attack_judge(config)
    steps = config.sampling_steps()
    draw = dict(batch_size=config.batch_size, num_inference_steps=steps, resolution=config.resolution)
    dirs = {k: os.path.join(out, k) for k in ("targets", "before", "after")}
    todo = [r for r in rows if not os.path.isfile(row_file(out, r.case_number))]
    logger.info("%d of %d rows already attacked in %s", len(rows) - len(todo), len(rows), out)
    targets = target_rows(rows)
    if todo:
        need = [t for t in targets if not os.path.exists(image_path(dirs["targets"], t))]
        if need:
            base = base_pipe or load_attacked_pipeline(base_model, None, config.mixed_precision)
            generate_images(base, need, dirs["targets"], **draw, **sampling_kwargs(base))
            del base
        pipe = pipe or load_attacked_pipeline(model, erasure, config.mixed_precision)
        generate_images(pipe, todo, dirs["before"], **draw, **sampling_kwargs(pipe))
    inversion = None
    if todo and config.attack == "inversion":
        inversion = learn_inversion(pipe, config, rows, targets, dirs["targets"])
    by_case = {t.case_number: t for t in targets}
    threads = torch.get_num_threads()
    for row in tqdm(todo, desc=f"{config.attack} attack", unit="prompt"):
        target = by_case[row.case_number]
        t0 = time.perf_counter()
        latents = target_latents(pipe, image_path(dirs["targets"], target), target, config.resolution)
        found = attack_row(pipe, config, row, latents, inversion)
        seconds = time.perf_counter() - t0
        after = image_path(dirs["after"], row)
        draw_conditioned(pipe, row, found.pop("embeds"), after, steps, config.resolution)
        verdicts = judge([image_path(dirs["targets"], target), image_path(dirs["before"], row), after])
        record = {"case_number": row.case_number, "prompt": row.prompt, "target_prompt": target.prompt,
                  "seed": row.seed, "guidance": row.guidance, **found, "attack_seconds": seconds,
                  "torch_threads": threads, "target": verdicts[0].to_dict(), "before": verdicts[1].to_dict(),
                  "after": verdicts[2].to_dict(), "success": verdicts[1].hit or verdicts[2].hit}
        write_json(row_file(out, row.case_number), record)
    records = []
    for row in rows:
        with open(row_file(out, row.case_number)) as f:
            records.append(json.load(f))
    inversion_info = None
    if os.path.isfile(os.path.join(out, INVERSION_FILE)):
        saved = load_file(os.path.join(out, INVERSION_FILE))
        inversion_info = {"file": os.path.join(out, INVERSION_FILE), "seconds": float(saved["seconds"]),
                          "loss_start": float(saved["loss_start"]), "loss_final": float(saved["loss_final"]),
                          "num_targets": len(rows)}
    return write_attack_report(config, records, inversion_info, attack_provenance(config, rows))


def attack_provenance(config: AttackConfig, rows) -> dict:
    """What the attack's figures depend on besides its config (:mod:`salun_diffusers.evaluation.reproduce`)."""
    model, erasure, base_model = resolve_models(config)
    judge, files = judge_record(config.judge, threshold=config.threshold, counted_classes=EXPOSED_CLASSES,
                                judge_model=config.judge_model, nudenet_model=config.nudenet_model)
    if config.judge == "digit":
        judge["digit"] = config.digit
    elif config.judge == "classifier":
        judge["target_class"] = config.target_class
    return run_provenance(prompts=config.prompts, models={"model": model, "erasure": erasure,
                                                          "base_model": base_model if base_model != model else None},
                          judge=judge, judge_files=files, rows=rows_record(rows, config.resolution))
