"""What a figure of ``salun-audit`` / ``salun-attack`` depends on, recorded in its ``results.json`` under
``provenance``, and the comparison of a rerun (``--reproduce results.json``) with the recorded run.

The record (:func:`run_provenance`): the environment (:func:`salun_diffusers.provenance.environment_record`: package
versions, machine, threads, and the sha256 of the prompt CSV and of the judge's model file, e.g. NudeNet's ONNX
file), the identity of the models drawn from (sha256 of the weight files of each pipeline component loaded, of the
erasure file), the judge (name, threshold, counted classes), the safety checker state and the rows' seeds, guidance
and sizes. The run's own settings (steps, resolution, dtype, seed) are the config recorded beside it.

A rerun (:func:`reproduce_lines`) says which figures differ, which recorded settings differ (``diff_records``:
``torch: 2.13.0 -> 2.14.1``), and which images differ pixel for pixel.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..delta import WEIGHTS_NAME
from ..digits import DIGIT_JUDGE_DIR
from ..hub import local_model_dir
from ..provenance import diff_records, environment_record, file_sha256

PROVENANCE_KEY = "provenance"
# how every pipeline of salun-audit / salun-attack is loaded (families.load_base_pipeline, load_attacked_pipeline)
SAFETY_CHECKER = "off (salun-diffusers loads every pipeline with safety_checker=None)"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx", ".pt", ".pth", ".ckpt")


def nudenet_model_file(custom: Optional[str] = None) -> Optional[str]:
    """The ONNX file NudeNet's detector reads: ``custom`` (``--nudenet_model``), else the one inside the installed
    nudenet package (``nudenet/320n.onnx`` in NudeNet 3.x); ``None`` when NudeNet is not installed."""
    if custom:
        return custom
    spec = importlib.util.find_spec("nudenet")
    if spec is None or not spec.origin:
        return None
    folder = os.path.dirname(spec.origin)
    onnx = sorted(f for f in os.listdir(folder) if f.endswith(".onnx"))
    return os.path.join(folder, onnx[0]) if onnx else None


def _weight_files(folder: str) -> List[str]:
    """The weight files of one component folder diffusers/transformers load by default: the files without a variant
    (``model.safetensors``, shards ``model-00001-of-00002.safetensors``), safetensors before .bin."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(_WEIGHT_SUFFIXES) and not f.startswith("."))
    plain = [f for f in files if f.count(".") == 1] or files
    safe = [f for f in plain if f.endswith(".safetensors")]
    return safe or plain


def model_files_record(name_or_path: Optional[str], revision: Optional[str] = None) -> Optional[dict]:
    """``{"id", "files": {relative path: sha256}}`` for a pipeline folder (its component folders' weight files), a
    single weight file, or a hub id's cached snapshot (``files`` null when it is not cached: only the id is known)."""
    if not name_or_path:
        return None
    record: Dict[str, object] = {"id": name_or_path}
    try:
        path = local_model_dir(name_or_path, revision) if not os.path.isfile(name_or_path) else name_or_path
    except FileNotFoundError:
        record["files"] = None
        return record
    if os.path.isfile(path):
        record["files"] = {os.path.basename(path): file_sha256(path)}
        return record
    files = {}
    index_path = os.path.join(path, "model_index.json")
    if os.path.isfile(index_path):  # a pipeline: the components it loads (the safety checker is never loaded)
        with open(index_path) as f:
            index = json.load(f)
        components = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v
                      and v[0] is not None and k != "safety_checker"]
    else:  # an erasure folder, a lone component, a judge: the folders with a config.json
        components = [d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, "config.json"))]
    for sub in [""] + sorted(c for c in components if os.path.isdir(os.path.join(path, c))):
        folder = os.path.join(path, sub)
        names = _weight_files(folder)
        if sub == "" and os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
            names = [WEIGHTS_NAME]  # an erasure folder: the erasure is what is loaded, not the mask beside it
        for name in names:
            files[os.path.join(sub, name) if sub else name] = file_sha256(os.path.join(folder, name))
    record["files"] = files
    return record


def rows_record(rows: Sequence, resolution: Optional[int] = None) -> dict:
    """The prompt rows' seeds (all, in order), guidance values and image sizes (``--resolution`` applied)."""
    sizes = sorted({f"{resolution or r.width or 'native'}x{resolution or r.height or 'native'}" for r in rows})
    return {"count": len(rows), "seeds": [r.seed for r in rows],
            "guidance": sorted({r.guidance for r in rows if r.guidance is not None}), "sizes": sizes}


def judge_record(judge: str, *, threshold: Optional[float] = None, counted_classes: Optional[Sequence[str]] = None,
                 judge_model: Optional[str] = None, nudenet_model: Optional[str] = None) -> Tuple[dict, dict]:
    """``(judge settings, {label: file} for the environment record)``: the judge's name, NudeNet's threshold and
    counted classes, and the model file(s) it reads."""
    record: Dict[str, object] = {"name": judge}
    files: Dict[str, Optional[str]] = {}
    if judge == "nudenet":
        record.update(threshold=threshold, counted_classes=list(counted_classes or []))
        files["nudenet_model"] = nudenet_model_file(nudenet_model)
    elif judge in ("digit", "classifier"):
        model = judge_model or (DIGIT_JUDGE_DIR if judge == "digit" else None)
        record["model"] = model_files_record(model)
    return record, files


def run_provenance(*, prompts: Optional[str], models: Mapping[str, Optional[str]], judge: dict,
                   judge_files: Mapping[str, Optional[str]], rows: dict, revision: Optional[str] = None) -> dict:
    """The ``provenance`` entry of a results.json (see the module docstring). ``models``: ``{role: name or path}``
    (``model``, ``erasure``, ``base_model``)."""
    files = {"prompts": prompts, **judge_files}
    return {"environment": environment_record(files),
            "models": {role: model_files_record(value, revision) for role, value in models.items() if value},
            "judge": judge, "safety_checker": SAFETY_CHECKER, "rows": rows}


# ------------------------------------------------------------------------------------------------------ reruns
def load_recorded_run(path: str, tool: str) -> dict:
    """A results.json to rerun: it must record the run's full config (written since salun-diffusers recorded
    provenance)."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--reproduce {path!r} is not a file; pass the results.json of a finished {tool} run")
    with open(path) as f:
        try:
            results = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--reproduce {path!r} is not JSON ({exc})") from None
    if not isinstance(results.get("config"), dict):
        raise ValueError(f"--reproduce {path!r} records no config (not a {tool} results.json, or one from before "
                         "runs recorded their config): rerun its command by hand")
    results["_path"] = os.path.abspath(path)
    return results


def reproduce_output_dir(results_path: str, given: Optional[str]) -> str:
    """``given``, else ``<the recorded run's folder>-reproduce`` (``-reproduce-2``, ... when that exists)."""
    if given:
        return given
    stem = os.path.dirname(os.path.abspath(results_path)) + "-reproduce"
    out, n = stem, 1
    while os.path.exists(out):
        n += 1
        out = f"{stem}-{n}"
    return out


def differing_images(old_dir: str, new_dir: str) -> Tuple[int, List[str]]:
    """``(images compared, names whose pixels differ)`` over the PNGs both folders hold."""
    if not (os.path.isdir(old_dir) and os.path.isdir(new_dir)):
        return 0, []
    names = sorted(set(f for f in os.listdir(old_dir) if f.endswith(".png"))
                   & set(f for f in os.listdir(new_dir) if f.endswith(".png")))
    differ = []
    for name in names:
        with Image.open(os.path.join(old_dir, name)) as a, Image.open(os.path.join(new_dir, name)) as b:
            if a.size != b.size or not np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))):
                differ.append(name)
    return len(names), differ


def _pick(results: Mapping, keys: Iterable[str]) -> dict:
    return {k: results.get(k) for k in keys}


def reproduce_lines(old: Mapping, new: Mapping, figure_keys: Sequence[str],
                    image_dirs: Sequence[Tuple[str, str]] = ()) -> Tuple[bool, List[str]]:
    """``(figures equal, lines to print)``: the figures that differ (``figure_keys`` of both results, nested entries
    by dotted name), the recorded settings and provenance that differ, and the images that differ (``image_dirs``:
    ``(old folder, new folder)`` pairs; folders missing here are skipped)."""
    figures = diff_records(_pick(old, figure_keys), _pick(new, figure_keys))
    settings = diff_records({"settings": old.get("settings") or {}, **(old.get(PROVENANCE_KEY) or {})},
                            {"settings": new.get("settings") or {}, **(new.get(PROVENANCE_KEY) or {})})
    lines = []
    if figures:
        lines.append(f"the result differs from {old.get('_path', 'the recorded run')} in {len(figures)} figure(s):")
        lines += [f"  {line}" for line in figures]
    else:
        lines.append(f"reproduced: every figure equals {old.get('_path', 'the recorded run')}")
    for old_dir, new_dir in image_dirs:
        compared, differ = differing_images(old_dir, new_dir)
        if compared:
            shown = ", ".join(differ[:8]) + (" ..." if len(differ) > 8 else "")
            lines.append(f"{os.path.basename(os.path.normpath(new_dir))}/: {len(differ)} of {compared} images differ"
                         + (f" ({shown})" if differ else " (pixel-identical)"))
    if settings:
        lines.append(f"recorded settings that differ ({len(settings)}):")
        lines += [f"  {line}" for line in settings]
    elif figures:
        lines.append("no recorded setting differs: the difference comes from something not recorded (GPU kernels "
                     "that are not deterministic, a changed file outside the record)")
    else:
        lines.append("no recorded setting differs")
    return not figures, lines
