"""Human-readable summary of an erasure run (printed by train_erase.py)."""

from __future__ import annotations

import logging
import os
import time
from typing import Optional, Sequence, Union

from .digits import BUNDLED_WORLDS, SHIPPED_VERDICT_SUFFIX, DigitJudge, digit_sampling, judge_accuracy, shipped_asset
from .utils import pipeline_fingerprint, read_json_or_none, user_cache_dir, write_json

logger = logging.getLogger(__name__)


def summarize_erasure(config, result) -> str:
    """What train_erase.py prints after an erasure: the concept and folder, mask share, phase times, outputs."""
    m = result.metrics
    spec = config.concept_spec()
    what = (f"concept {spec.name!r}" if len(spec.concepts) == 1 else
            f"concepts {', '.join(repr(c.name) for c in spec.concepts)} (jointly)")
    lines = [f"erased {what} -> {result.output_dir}",
             f"  mask: {m['mask_density']:.1%} of "
             f"{'text-encoder' if m.get('component') == 'text_encoder' else 'U-Net'} weights"
             + (f" (--method {m['method']}, {m['method_preset']} preset)" if m.get("method") else ""),
             f"  time: data {m['data_seconds']:.1f}s, saliency {m['saliency_seconds']:.1f}s"
             + (f", training {m['train_seconds']:.1f}s ({m['seconds_per_step']:.3f}s/step)" if "train_seconds" in m
                else "")
             + (f", verdict {m['verdict_seconds']:.1f}s" if "verdict_seconds" in m else "")]
    if result.erasure_path:
        lines.append(f"  erasure: {result.erasure_path} ({m.get('num_changed_weights', 0):,} weights)")
    if result.unet_dir:
        net = {"transformer": "transformer", "text_encoder": "text encoder"}.get(
            os.path.basename(result.unet_dir.rstrip("/")), "U-Net")
        lines.append(f"  merged {net}: {result.unet_dir}")
    if result.unet_dir and os.path.isfile(os.path.join(result.output_dir, "model_index.json")):
        lines.append(f"  pipeline: DiffusionPipeline.from_pretrained({result.output_dir!r})")
    if m.get("lora"):
        lines.append(f"  LoRA: rank {m['lora']['rank']}, {m['lora']['energy_kept']:.1%} of the delta's energy "
                     "(pytorch_lora_weights.safetensors" + (f", kohya layout {m['lora']['kohya_file']}"
                                                            if m["lora"].get("kohya_file") else "") + ")")
    if m.get("single_file"):
        lines.append(f"  single file for Automatic1111 / ComfyUI: "
                     f"{os.path.join(result.output_dir, m['single_file']['file'])} ({m['single_file']['dtype']})")
    if m.get("hub_url"):
        lines.append(f"  pushed to {m['hub_url']}")
    if "verdict" in m:
        lines.append(f"  verdict: {m['verdict']}")
    return "\n".join(lines)


EVAL_SEED = 10_000_000  # evaluation seeds never overlap the seeds of generated training data
# Sampling steps of train_erase.py's verdict (benchmarks judge at the bundled model's recommended 20). Measured on the
# digit world, 50 images per digit: the base model's per-digit accuracies at 10 DDIM steps equal those at 20 (digit 1:
# 96%, the rest 100%), and so do a digit-four erasure's (4: 0%, 1: 96%, 2: 98%, 5: 88%, 7: 98%, the rest 100%), in
# half the time (8.6 s vs 16.1 s, 1 thread).
VERDICT_STEPS = 10


def digit_scores(pipe, judge, digit: Union[int, Sequence[int]], n_per_digit: int = 50, seed: int = EVAL_SEED,
                 num_inference_steps: Optional[int] = None) -> dict:
    """Judge a digit pipeline after erasing ``digit`` (sampling: ``DIGIT_SAMPLING``, steps overridable).

    ``unlearning_accuracy`` (UA): share of images for the erased digit's prompt the judge does NOT call that digit;
    ``retained_accuracy``: judge accuracy on the other nine digits' prompts.
    """
    sampling = {} if num_inference_steps is None else {"num_inference_steps": num_inference_steps}
    acc = judge_accuracy(pipe, judge, range(10), n_per_digit=n_per_digit, seed=seed, **sampling)["per_digit"]
    return {**erasure_scores(acc, digit), "per_digit_accuracy": acc, "n_per_digit": n_per_digit}


def erasure_scores(per_digit_accuracy, digits) -> dict:
    """UA and retained accuracy of erasing ``digits`` (one digit or several) from per-digit judge accuracies:
    ``unlearning_accuracy`` the mean over the erased digits (each in ``unlearning_accuracy_per_digit``),
    ``retained_accuracy`` the mean accuracy over the digits not erased."""
    acc = {int(d): float(a) for d, a in per_digit_accuracy.items()}
    erased = [int(digits)] if isinstance(digits, int) else [int(d) for d in digits]
    others = [acc[d] for d in range(10) if d not in erased]
    ua = {d: 1.0 - acc[d] for d in erased}
    return {"unlearning_accuracy": sum(ua.values()) / len(ua), "unlearning_accuracy_per_digit": ua,
            "retained_accuracy": sum(others) / len(others) if others else float("nan")}


BASE_VERDICTS_ASSET = "digit" + SHIPPED_VERDICT_SUFFIX  # the U-Net world's base scores, shipped (each world has one)


def _verdict_key(pipe, judge, n_per_digit: int, seed: int, num_inference_steps: Optional[int] = None) -> str:
    sampling = {**digit_sampling(pipe),
                **({} if num_inference_steps is None else {"num_inference_steps": num_inference_steps})}
    return pipeline_fingerprint(pipe, judge, sampling, {"n_per_digit": n_per_digit, "seed": seed, "v": 1})


def _valid_scores(entry, key: str, n_per_digit: int):
    """The cached scores in ``entry`` if it is well formed and made for ``key``; else None (never trusted blindly)."""
    if not entry or entry.get("key") != key:
        return None
    scores = entry.get("scores")
    try:
        per_digit = {int(d): float(a) for d, a in scores["per_digit_accuracy"].items()}
        ok = (sorted(per_digit) == list(range(10)) and int(scores["n_per_digit"]) == n_per_digit
              and all(0.0 <= a <= 1.0 for a in per_digit.values()))
        scores = {**scores, "per_digit_accuracy": per_digit, "unlearning_accuracy": float(scores["unlearning_accuracy"]),
                  "retained_accuracy": float(scores["retained_accuracy"])}
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return scores if ok else None


def base_verdict_entry(base_pipe, judge, digit: Union[int, Sequence[int]] = 7, n_per_digit: int = 50,
                       seed: int = EVAL_SEED, num_inference_steps: Optional[int] = None) -> dict:
    """The base model's :func:`digit_scores`, judged now, with their key: ``{"key", "scores"}``, what
    :func:`base_digit_scores` caches and scripts/build_digit_data.py ships."""
    return {"key": _verdict_key(base_pipe, judge, n_per_digit, seed, num_inference_steps),
            "scores": digit_scores(base_pipe, judge, digit, n_per_digit, seed, num_inference_steps)}


def base_digit_scores(base_pipe, judge, digit: Union[int, Sequence[int]], n_per_digit: int = 50, seed: int = EVAL_SEED,
                      cache_dir: Optional[str] = None, num_inference_steps: Optional[int] = None) -> dict:
    """:func:`digit_scores` of the base model, cached: keyed by a fingerprint of the pipeline's weights and
    scheduler, the judge's weights, the sampling settings, ``n_per_digit`` and ``seed``. Looked up in ``cache_dir``
    (default: the user cache, ``verdicts/``), then in the package assets (each bundled world's scores, shipped; a
    damaged one is ignored with a warning); computed and written (atomically) on a miss or a corrupt entry. The
    per-digit accuracies do not depend on which digit is erased, so one entry serves all ten."""
    key = _verdict_key(base_pipe, judge, n_per_digit, seed, num_inference_steps)
    path = os.path.join(cache_dir or user_cache_dir("verdicts"), f"{key[:32]}.json")

    for source in (path, *(shipped_asset(world, SHIPPED_VERDICT_SUFFIX) for world in BUNDLED_WORLDS)):
        entry = read_json_or_none(source)
        scores = _valid_scores(entry, key, n_per_digit)
        if scores is not None:
            logger.info("base-model verdict read from %s", source)
            break
        if source != path and os.path.isfile(source) and (not isinstance(entry, dict) or entry.get("key") == key):
            logger.warning("ignoring %s: not a valid verdict file; judging the base model instead", source)
    else:
        entry = base_verdict_entry(base_pipe, judge, digit, n_per_digit, seed, num_inference_steps)
        scores = entry["scores"]
        try:
            write_json(path, entry)
        except OSError as exc:  # a read-only cache is no reason to fail the run
            logger.warning("could not cache the base-model verdict in %s (%s)", path, exc)
    return {**scores, **erasure_scores(scores["per_digit_accuracy"], digit)}


def digit_verdict(base_pipe, erased_pipe, digit: Union[int, Sequence[int]], n_per_digit: int = 50, cache_dir: Optional[str] = None,
                  num_inference_steps: int = VERDICT_STEPS) -> dict:
    """Before/after judge scores of a digit erasure, with a one-line verdict (the base model's scores cached)."""
    start = time.perf_counter()
    judge = DigitJudge.from_pretrained()
    before = base_digit_scores(base_pipe, judge, digit, n_per_digit, cache_dir=cache_dir,
                               num_inference_steps=num_inference_steps)
    after = digit_scores(erased_pipe, judge, digit, n_per_digit, num_inference_steps=num_inference_steps)
    drop = before["retained_accuracy"] - after["retained_accuracy"]
    if isinstance(digit, int):
        ua = f"UA {after['unlearning_accuracy']:.1%} (before {before['unlearning_accuracy']:.1%})"
    else:  # several digits erased: each one's UA
        ua_after, ua_before = after["unlearning_accuracy_per_digit"], before["unlearning_accuracy_per_digit"]
        ua = (f"UA {', '.join(f'{d}: {ua_after[d]:.0%}' for d in digit)} "
              f"(before {', '.join(f'{ua_before[d]:.0%}' for d in digit)})")
    line = (f"{ua}; retained accuracy "
            f"{after['retained_accuracy']:.1%} (before {before['retained_accuracy']:.1%}, drop {drop * 100:+.1f} "
            f"points); judged on {n_per_digit} images per digit ({num_inference_steps} sampling steps)")
    return {"before": before, "after": after, "retained_drop": drop, "line": line,
            "seconds": time.perf_counter() - start}
