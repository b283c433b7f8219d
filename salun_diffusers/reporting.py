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
