"""Evaluation of erased models: prompt CSVs, seeded generation, NudeNet audit, FID / CLIP score / classifier metrics.

The ``salun-audit`` command lives in :mod:`salun_diffusers.evaluation.cli` (``AuditConfig``, ``run_audit``).
"""

from .generate import generate_images, image_path, missing_images  # noqa: F401
from .metrics import (ClipScorer, classifier_metrics, compute_fid, fid_from_features, frechet_distance,  # noqa: F401
                      image_features, load_inception)
from .nudenet import EXPOSED_CLASSES, NudeNetDetector, detect_images, exposed_parts, nudity_summary  # noqa: F401
from .prompts import PromptRow, read_prompts, shard_rows  # noqa: F401
from .report import load_results, plot_class_counts, write_report  # noqa: F401
