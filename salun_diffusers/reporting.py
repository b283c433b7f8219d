"""Human-readable summary of an erasure run (printed by train_erase.py)."""

from __future__ import annotations


def summarize(config, result) -> str:
    m = result.metrics
    lines = [f"erased concept {config.concept_spec().name!r} -> {result.output_dir}",
             f"  mask: {m['mask_density']:.1%} of U-Net weights",
             f"  time: data {m['data_seconds']:.1f}s, saliency {m['saliency_seconds']:.1f}s"
             + (f", training {m['train_seconds']:.1f}s ({m['seconds_per_step']:.3f}s/step)" if "train_seconds" in m
                else "")]
    if result.erasure_path:
        lines.append(f"  erasure: {result.erasure_path} ({m.get('num_changed_weights', 0):,} weights)")
    if result.unet_dir:
        lines.append(f"  merged U-Net: {result.unet_dir}")
    if "verdict" in m:
        lines.append(f"  verdict: {m['verdict']}")
    return "\n".join(lines)


EVAL_SEED = 10_000_000  # evaluation seeds never overlap the seeds of generated training data


def digit_scores(pipe, judge, digit: int, n_per_digit: int = 50, seed: int = EVAL_SEED) -> dict:
    """Judge a digit pipeline after erasing ``digit``.

    ``unlearning_accuracy`` (UA): share of images for the erased digit's prompt the judge does NOT call that digit;
    ``retained_accuracy``: judge accuracy on the other nine digits' prompts.
    """
    from .digits import judge_accuracy

    acc = judge_accuracy(pipe, judge, range(10), n_per_digit=n_per_digit, seed=seed)["per_digit"]
    others = [acc[d] for d in range(10) if d != digit]
    return {"unlearning_accuracy": 1.0 - acc[digit], "retained_accuracy": sum(others) / len(others),
            "per_digit_accuracy": acc, "n_per_digit": n_per_digit}


def digit_verdict(base_pipe, erased_pipe, digit: int, n_per_digit: int = 50) -> dict:
    """Before/after judge scores of a digit erasure, with a one-line verdict."""
    from .digits import DigitJudge

    judge = DigitJudge.from_pretrained()
    before = digit_scores(base_pipe, judge, digit, n_per_digit)
    after = digit_scores(erased_pipe, judge, digit, n_per_digit)
    drop = before["retained_accuracy"] - after["retained_accuracy"]
    line = (f"UA {after['unlearning_accuracy']:.1%} (before {before['unlearning_accuracy']:.1%}); retained accuracy "
            f"{after['retained_accuracy']:.1%} (before {before['retained_accuracy']:.1%}, drop {drop * 100:+.1f} "
            f"points); judged on {n_per_digit} images per digit")
    return {"before": before, "after": after, "retained_drop": drop, "line": line}
