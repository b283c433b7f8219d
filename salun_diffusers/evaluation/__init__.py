"""Evaluation of erased models: prompt CSVs, seeded generation, NudeNet audit, FID / CLIP score / classifier metrics.

The ``salun-audit`` command lives in :mod:`salun_diffusers.evaluation.cli` (``AuditConfig``, ``run_audit``).
"""

from .generate import generate_images, image_path, missing_images
from .metrics import (ClipScorer, classifier_metrics, compute_fid, fid_from_features, frechet_distance,
                      image_features, load_inception)
from .nudenet import EXPOSED_CLASSES, NudeNetDetector, detect_images, exposed_parts, nudity_summary
from .prompts import PromptRow, read_prompts, shard_rows
from .report import load_results, plot_class_counts, write_report

__all__ = [
    "generate_images", "image_path", "missing_images",
    "ClipScorer", "classifier_metrics", "compute_fid", "fid_from_features", "frechet_distance", "image_features",
    "load_inception",
    "EXPOSED_CLASSES", "NudeNetDetector", "detect_images", "exposed_parts", "nudity_summary",
    "PromptRow", "read_prompts", "shard_rows",
    "load_results", "plot_class_counts", "write_report",
]
