"""Generate one image per prompt row: seeded per row, batched, resumable, sharded across processes.

Each row's latents come from its own ``torch.Generator(generator_device).manual_seed(row.seed)`` (a list of
generators is passed to the pipeline), so an image does not depend on which rows share its batch, on the batch size,
or on how many processes split the work. Images already on disk are never redrawn: a killed run continues where it
stopped.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from ..families import native_size
from ..utils import atomic_path
from .prompts import PromptRow, shard_rows

logger = logging.getLogger(__name__)


def image_path(output_dir: str, row: PromptRow) -> str:
    return os.path.join(output_dir, f"{row.case_number}.png")


def default_size(pipe) -> Tuple[int, int]:
    """(height, width) the pipeline draws when none is asked for."""
    size = native_size(pipe)
    return size, size


def row_size(pipe, row: PromptRow, resolution=None) -> Tuple[int, int]:
    """(height, width) for a row: ``resolution`` overrides the CSV, which overrides the pipeline default."""
    if resolution:
        return resolution, resolution
    h, w = default_size(pipe)
    return row.height or h, row.width or w


def plan_batches(rows: Sequence[PromptRow], batch_size: int, size_of) -> List[List[PromptRow]]:
    """Group rows by (guidance, height, width) in order of first appearance, then cut groups into batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: "OrderedDict[tuple, List[PromptRow]]" = OrderedDict()
    for row in rows:
        groups.setdefault((row.guidance, *size_of(row)), []).append(row)
    return [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


@torch.no_grad()
def generate_images(
    pipe,
    rows: Sequence[PromptRow],
    output_dir: str,
    batch_size: int = 4,
    num_inference_steps: int = 50,
    resolution=None,
    generator_device: str = "cpu",
    process_index: int = 0,
    num_processes: int = 1,
    show_progress: bool = True,
    **pipe_kwargs,
) -> Dict[str, int]:
    """Draw ``{case_number}.png`` into ``output_dir`` for this process's share of ``rows``.

    Args:
        pipe: a loaded ``StableDiffusionPipeline`` (already on its device).
        rows: all rows of the run; process ``process_index`` of ``num_processes`` takes every
            ``num_processes``-th row, so the processes together cover every row exactly once.
        resolution: draw every image at ``resolution`` x ``resolution`` instead of the CSV's size.
        generator_device: where the per-row generators live. ``"cpu"`` (default) gives the same initial noise on
            every machine, as the ESD/SalUn reference scripts do; ``"cuda"`` is the diffusers-docs alternative.
        pipe_kwargs: passed to the pipeline call (e.g. ``negative_prompt``, ``eta``).

    Returns: ``{"generated": n, "skipped": m}`` for this process (skipped: already on disk).
    """
    os.makedirs(output_dir, exist_ok=True)
    mine = shard_rows(rows, process_index, num_processes)
    todo = [row for row in mine if not os.path.exists(image_path(output_dir, row))]
    skipped = len(mine) - len(todo)
    if skipped:
        logger.info("process %d: %d of %d images already in %s, skipped", process_index, skipped, len(mine),
                    output_dir)
    multiple = pipe.vae_scale_factor

    def size_of(row):
        h, w = row_size(pipe, row, resolution)
        if h % multiple or w % multiple:
            raise ValueError(f"case {row.case_number}: size {w}x{h} is not a multiple of {multiple}; "
                             "fix the CSV or pass --resolution")
        return h, w

    pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=len(todo), desc=f"generate [{process_index}]", disable=not show_progress, unit="img")
    for batch in plan_batches(todo, batch_size, size_of):
        height, width = size_of(batch[0])
        generators = [torch.Generator(generator_device).manual_seed(row.seed) for row in batch]
        images = pipe(
            [row.prompt for row in batch], height=height, width=width, guidance_scale=batch[0].guidance,
            num_inference_steps=num_inference_steps, generator=generators, output_type="pil", **pipe_kwargs,
        ).images
        for row, image in zip(batch, images):
            with atomic_path(image_path(output_dir, row)) as tmp:
                image.save(tmp, format="PNG")
        bar.update(len(batch))
    bar.close()
    return {"generated": len(todo), "skipped": skipped}


def missing_images(rows: Sequence[PromptRow], output_dir: str) -> List[str]:
    """Case numbers of ``rows`` with no image in ``output_dir`` (the merge check after all shards finish)."""
    return [row.case_number for row in rows if not os.path.exists(image_path(output_dir, row))]
