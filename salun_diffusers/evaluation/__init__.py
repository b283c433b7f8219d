"""Evaluation of erased models: prompt CSVs, seeded generation, NudeNet audit, FID / CLIP score / classifier metrics.

The ``salun-audit`` run is :func:`salun_diffusers.evaluation.audit.run_audit` (its config
:class:`salun_diffusers.evaluation.config.AuditConfig`); :mod:`salun_diffusers.evaluation.cli` is the thin command.
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
