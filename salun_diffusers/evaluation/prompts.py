"""Read evaluation prompt CSVs: I2P, COCO, Imagenette and object prompt lists.

One schema for all of them. ``prompt`` is required; ``evaluation_seed`` too unless a ``default_seed`` is given.
Missing columns get defaults: guidance 7.5, image size from the pipeline (``None``), ``case_number`` = row index,
no categories. Other columns (``class``, ``classidx``, ...) are kept in ``PromptRow.extra``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

DEFAULT_GUIDANCE = 7.5


@dataclass(frozen=True)
class PromptRow:
    """One evaluation prompt: the image for it is saved as ``{case_number}.png``."""

    case_number: str
    prompt: str
    seed: int
    guidance: float = DEFAULT_GUIDANCE
    width: Optional[int] = None  # None: the pipeline's default size
    height: Optional[int] = None
    categories: Tuple[str, ...] = ()
    extra: Dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def label(self) -> Optional[str]:
        """The class name of class-wise prompt lists (Imagenette's ``class`` column), if any."""
        return self.extra.get("class")


def _number(text: str, column: str, line: int, path: str, kind=float):
    try:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError
        return kind(value) if kind is float else int(value)
    except ValueError:
        raise ValueError(f"{path}, line {line}: column {column!r} must be a number, got {text!r}") from None


def read_prompts(
    path: str,
    categories: Optional[Iterable[str]] = None,
    limit: Optional[int] = None,
    skip_empty: bool = False,
    default_seed: Optional[int] = None,
    default_guidance: float = DEFAULT_GUIDANCE,
) -> List[PromptRow]:
    """Read a prompt CSV into :class:`PromptRow` s, in file order.

    Args:
        path: the CSV file (a UTF-8 BOM, as in ``imagenette.csv``, is accepted).
        categories: keep only rows whose comma-separated ``categories`` cell names one of these (I2P: ``sexual``,
            ``violence``, ...). Needs a ``categories`` column.
        limit: keep the first ``limit`` rows after filtering.
        skip_empty: drop rows whose prompt is empty (I2P has one, case 2260). By default they are kept: the
            pipeline then draws an unconditional image, so I2P keeps its 4703 cases.
        default_seed: where the file has no ``evaluation_seed`` column, row ``i`` uses ``default_seed + i``.
        default_guidance: guidance scale where the file has no ``evaluation_guidance`` column or the cell is empty.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt CSV {path!r} not found; pass an existing file with --prompts")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    wanted = {c.strip().lower() for c in categories} if categories else None
    try:
        with open(path, "rb") as f:
            content = f.read().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (byte {exc.start}: a binary file, or another encoding?); pass a "
                         "prompt CSV saved as UTF-8") from None
    if "\x00" in content:
        raise ValueError(f"{path} holds NUL bytes: a binary file, not a prompt CSV; pass a CSV with a 'prompt' column")
    reader = csv.DictReader(io.StringIO(content, newline=""))
    try:
        records = list(reader)
    except csv.Error as exc:
        raise ValueError(f"{path} is not a readable CSV ({exc}); pass a CSV with a 'prompt' column") from None
    columns = set(reader.fieldnames or ())
    if "prompt" not in columns:
        raise ValueError(f"{path} has no 'prompt' column (columns: {sorted(columns)}); "
                         "an evaluation CSV needs at least 'prompt' and 'evaluation_seed'")
    if "evaluation_seed" not in columns and default_seed is None:
        raise ValueError(f"{path} has no 'evaluation_seed' column; add one, or pass a default seed "
                         "(--seed N: row i then uses seed N + i)")
    if wanted is not None and "categories" not in columns:
        raise ValueError(f"{path} has no 'categories' column, so it cannot be filtered by category; "
                         "drop --categories or use an I2P-style CSV")
    rows: List[PromptRow] = []
    seen = set()
    fallbacks = 0  # rows seeded from default_seed
    known = {"prompt", "evaluation_seed", "evaluation_guidance", "sd_image_width", "sd_image_height",
             "case_number", "categories"}
    for index, raw in enumerate(records):
        line = index + 2
        prompt = (raw.get("prompt") or "").strip()
        if not prompt and skip_empty:
            continue
        cats = tuple(c.strip().lower() for c in (raw.get("categories") or "").split(",") if c.strip())
        if wanted is not None and not wanted.intersection(cats):
            continue
        case = (raw.get("case_number") or "").strip() or str(index)
        if case in seen:
            raise ValueError(f"{path}, line {line}: case_number {case!r} repeats; each row needs its own "
                             "case_number (it names the image file)")
        if os.sep in case or case.startswith("."):
            raise ValueError(f"{path}, line {line}: case_number {case!r} cannot be used as a file name")
        seen.add(case)
        seed_text = (raw.get("evaluation_seed") or "").strip()
        if seed_text:
            seed = _number(seed_text, "evaluation_seed", line, path, int)
        elif default_seed is not None:
            seed = default_seed + index
            fallbacks += 1
        else:
            raise ValueError(f"{path}, line {line}: empty evaluation_seed; fill it in or pass --seed")
        guidance_text = (raw.get("evaluation_guidance") or "").strip()
        guidance = _number(guidance_text, "evaluation_guidance", line, path) if guidance_text else default_guidance
        size = []
        for column in ("sd_image_width", "sd_image_height"):
            text = (raw.get(column) or "").strip()
            size.append(_number(text, column, line, path, int) if text else None)
        if not prompt:
            logger.warning("%s: case %s has an empty prompt (an unconditional image will be drawn)", path, case)
        extra = {k: v for k, v in raw.items() if k and k not in known and v is not None}
        rows.append(PromptRow(case, prompt, seed, guidance, size[0], size[1], cats, extra))
        if limit is not None and len(rows) >= limit:
            break
    if default_seed is not None and rows and not fallbacks:  # said, not silently dropped
        logger.warning("--seed %d is not used: every row of %s has its own evaluation_seed (drop the column, or use "
                       "another CSV, to draw other images)", default_seed, path)
    logger.info("read %d prompts from %s", len(rows), path)
    return rows


def shard_rows(rows: Sequence[PromptRow], process_index: int, num_processes: int) -> List[PromptRow]:
    """The rows process ``process_index`` of ``num_processes`` handles: every ``num_processes``-th row."""
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"bad shard {process_index} of {num_processes}")
    return list(rows[process_index::num_processes])
