"""One row of a paper table from an audit's results: what the top-level ``evaluation/`` scripts print after the audit
summary, in the columns of the SalUn paper's tables (docs/reproduce.md maps each table to its command).

- ``nudity``: NudeNet exposed-part counts per body part (the paper's nudity figure, I2P) and the nudity rate;
- ``objects``: unlearning accuracy of the erased class, accuracy on the others and per class (the Imagenette table's
  UA; its FID comes from ``fid_clip_coco.py`` or ``--fid_reference``), with FID when the audit measured it;
- ``coco``: FID and CLIP score (image quality);
- ``digits``: the digit world's UA, retained accuracy and per-digit accuracy (the bundled judge).
"""

from __future__ import annotations

import os
from typing import List, Mapping, Optional, Sequence

from .nudenet import EXPOSED_CLASSES

TABLES = ("nudity", "objects", "coco", "digits")
NUDITY_HEADERS = {"armpits": "armpits", "belly": "belly", "buttocks": "buttocks", "feet": "feet",
                  "female_breast": "breasts (F)", "female_genitalia": "genitalia (F)", "male_breast": "breasts (M)",
                  "male_genitalia": "genitalia (M)", "anus": "anus"}


def _row(cells: Sequence) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _num(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.4f}"


def _model(results: Mapping) -> str:
    return str(results.get("label") or "model")


def _prompt_set(results: Mapping) -> str:
    prompts = (results.get("config") or {}).get("prompts")
    return os.path.basename(prompts) if prompts else "-"


def nudity_table(results: Mapping) -> List[str]:
    nud = results.get("nudity")
    if not nud:
        return ["(no NudeNet results: the nudity table needs --judge nudenet)"]
    counts = nud.get("class_counts") or {}
    parts = [NUDITY_HEADERS[c] for c in EXPOSED_CLASSES]
    return [_row(["model", "prompts", "images", *parts, "total parts", "nude images", "nudity rate %"]),
            _row(["---"] * (6 + len(parts))),
            _row([_model(results), _prompt_set(results), nud["num_images"], *(counts.get(c, 0) for c in EXPOSED_CLASSES),
                  sum(counts.get(c, 0) for c in EXPOSED_CLASSES), nud["nude_images"], _pct(nud["nudity_rate"])])]


def class_table(results: Mapping, what: str = "class") -> List[str]:
    cls = results.get("classes")
    if not cls:
        return ["(no class-judge results: this table needs --judge classifier or --judge digit)"]
    names = cls["class_names"]
    per_class = sorted(cls["per_class_accuracy"].items(), key=lambda kv: int(kv[0]))
    target = cls.get("target_class")
    erased = names.get(str(target), "-") if target is not None else "-"
    header = ["model", f"erased {what}", "UA %", "accuracy on the others %",
              *(f"{names[str(c)]} %" for c, _ in per_class)]
    row = [_model(results), erased, _pct(cls.get("unlearning_accuracy")), _pct(cls.get("retain_accuracy")),
           *(_pct(a) for _, a in per_class)]
    if results.get("fid") is not None:
        header.append("FID")
        row.append(_num(results["fid"]))
    return [_row(header), _row(["---"] * len(header)), _row(row)]


def coco_table(results: Mapping) -> List[str]:
    if results.get("fid") is None and results.get("clip_score") is None:
        return ["(no FID or CLIP score: pass --fid_reference and/or --clip_model)"]
    return [_row(["model", "prompts", "images", "FID", "CLIP score"]), _row(["---"] * 5),
            _row([_model(results), _prompt_set(results), results.get("num_images"), _num(results.get("fid")),
                  _num(results.get("clip_score"))])]


def table_lines(results: Mapping, table: str) -> List[str]:
    """The paper-table row (markdown, header included) of an audit's results for ``table`` (one of ``TABLES``)."""
    if table == "nudity":
        return nudity_table(results)
    if table == "objects":
        return class_table(results, "class")
    if table == "digits":
        return class_table(results, "digit")
    if table == "coco":
        return coco_table(results)
    raise ValueError(f"unknown table {table!r}; choose one of {TABLES}")
