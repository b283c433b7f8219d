"""Audit reports: ``results.json`` (the data), ``report.md`` and bar charts: exposed-part counts (NudeNet) or
per-class accuracy (class judges: digit, classifier).

The chart compares this audit with a base audit (``--compare_to``), like the SalUn paper's nudity figure.
Markdown and chart are derived from the JSON and may be rewritten; ``results.json`` of a finished audit is not.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, Mapping, Optional

from ..utils import atomic_path, write_text
from .nudenet import EXPOSED_CLASSES

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
PLOT_FILE = "nudity_classes.png"
CLASS_PLOT_FILE = "class_accuracy.png"


def load_results(audit_dir: str) -> dict:
    path = os.path.join(audit_dir, RESULTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --compare_to must name a finished salun-audit output_dir")
    with open(path) as f:
        return json.load(f)


def plot_class_counts(counts: Mapping[str, Mapping[str, int]], path: str, title: str = "") -> str:
    """Grouped bar chart: one group per exposed class, one bar per model (``{model label: {class: count}}``)."""
    return plot_grouped_bars(counts, list(EXPOSED_CLASSES), path, title, "images with the part exposed")


def plot_grouped_bars(series: Mapping[str, Mapping[str, float]], classes, path: str, title: str = "",
                      ylabel: str = "", integer: bool = True) -> str:
    """Grouped bar chart: one group per class, one bar per model (``{model label: {class: value}}``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    counts = series
    fig = Figure(figsize=(9, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(counts), 1)
    for i, (label, per_class) in enumerate(counts.items()):
        xs = [k + (i - (len(counts) - 1) / 2) * width for k in range(len(classes))]
        bars = ax.bar(xs, [per_class.get(c, 0) for c in classes], width, label=label)
        ax.bar_label(bars, fontsize=7, fmt="%g" if integer else "%.2f")
    ax.set_xticks(range(len(classes)))
    ax.set_xticklabels([c.replace("_", "\n") for c in classes], fontsize=8)
    top = max([v for per_class in counts.values() for v in per_class.values()] + [1])
    ax.set_ylim(0, top * 1.3)
    ax.yaxis.set_major_locator(MaxNLocator(integer=integer))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper right", ncol=max(1, len(counts)), fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


def _pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def render_markdown(results: dict, base: Optional[dict] = None) -> str:
    cfg = results.get("config", {})
    lines = ["# salun-audit report", ""]
    for key in ("pretrained_model_name_or_path", "erasure", "prompts", "num_inference_steps"):
        if cfg.get(key) is not None:
            lines.append(f"- {key}: `{cfg[key]}`")
    lines.append(f"- images: {results.get('num_images', 0)}")
    if base:
        lines.append(f"- compared to: `{base.get('config', {}).get('output_dir', '?')}`")
    nud = results.get("nudity")
    if nud:
        base_nud = (base or {}).get("nudity")
        lines += ["", f"## Nudity (NudeNet, score >= {nud['threshold']})", "",
                  f"Nudity rate: **{_pct(nud['nudity_rate'])}** ({nud['nude_images']} of {nud['num_images']} "
                  "images show an exposed part)" + (f"; base: {_pct(base_nud['nudity_rate'])}" if base_nud else ""),
                  ""]
        head = "| class | images | base |" if base_nud else "| class | images |"
        lines += [head, "|---|---:|---:|" if base_nud else "|---|---:|"]
        for c in EXPOSED_CLASSES:
            row = f"| {c} | {nud['class_counts'].get(c, 0)} |"
            lines.append(row + (f" {base_nud['class_counts'].get(c, 0)} |" if base_nud else ""))
        if nud.get("per_category"):
            lines += ["", "### Per I2P category", "", "| category | images | nude | rate |", "|---|---:|---:|---:|"]
            for cat, e in nud["per_category"].items():
                lines.append(f"| {cat} | {e['images']} | {e['nude_images']} | {_pct(e['nudity_rate'])} |")
        if os.path.basename(results.get("plot") or ""):
            lines += ["", f"![exposed parts]({os.path.basename(results['plot'])})"]
    cls = results.get("classes")
    if cls:
        lines += ["", *_class_lines(cls, (base or {}).get("classes"))]
        if os.path.basename(results.get("class_plot") or ""):
            lines += ["", f"![per-class accuracy]({os.path.basename(results['class_plot'])})"]
    for key, title in (("clip_score", "CLIP score"), ("fid", "FID")):
        if results.get(key) is not None:
            lines += ["", f"## {title}", "", f"{results[key]:.4f}"]
    return "\n".join(lines) + "\n"


def _class_lines(cls: dict, base_cls: Optional[dict]) -> list:
    names = {**(base_cls or {}).get("class_names", {}), **cls["class_names"]}
    lines = [f"## Classifier judge ({cls['judge']})", ""]
    if cls.get("unlearning_accuracy") is not None:
        ua = f"Unlearning accuracy (images of **{names[str(cls['target_class'])]}** the judge does not call it): " \
             f"**{_pct(cls['unlearning_accuracy'])}** of {cls['num_forget']}"
        if base_cls and base_cls.get("unlearning_accuracy") is not None:
            ua += f"; base: {_pct(base_cls['unlearning_accuracy'])}"
        lines.append(ua)
    if cls.get("retain_accuracy") is not None:
        ra = f"Accuracy on the other classes: **{_pct(cls['retain_accuracy'])}** of {cls['num_retain']}"
        if base_cls and base_cls.get("retain_accuracy") is not None:
            ra += f"; base: {_pct(base_cls['retain_accuracy'])}"
        lines += ["", ra]
    base_acc = (base_cls or {}).get("per_class_accuracy", {})
    lines += ["", "| class | accuracy | base |" if base_cls else "| class | accuracy |",
              "|---|---:|---:|" if base_cls else "|---|---:|"]
    for c, acc in sorted(cls["per_class_accuracy"].items(), key=lambda kv: int(kv[0])):
        row = f"| {names.get(str(c), c)} | {_pct(acc)} |"
        lines.append(row + (f" {_pct(base_acc.get(str(c), base_acc.get(c)))} |" if base_cls else ""))
    return lines


def _labels(results: dict, base: Optional[dict]):
    label = results.get("label") or "this model"
    base_label = (base or {}).get("label") or "base"
    if base_label == label:
        base_label, label = f"{base_label} (base)", f"{label} (this audit)"
    return label, base_label


def write_report(output_dir: str, results: dict, base: Optional[dict] = None) -> Dict[str, str]:
    """Write ``report.md`` (and the chart, where there are nudity counts) into ``output_dir``; return their paths."""
    paths = {}
    label, base_label = _labels(results, base)
    if results.get("nudity"):
        counts = {}
        if base and base.get("nudity"):
            counts[base_label] = base["nudity"]["class_counts"]
        counts[label] = results["nudity"]["class_counts"]
        paths["plot"] = plot_class_counts(counts, os.path.join(output_dir, PLOT_FILE),
                                          title=f"NudeNet exposed parts (score >= {results['nudity']['threshold']})")
        results = {**results, "plot": paths["plot"]}
    cls = results.get("classes")
    if cls:
        names = {**((base or {}).get("classes") or {}).get("class_names", {}), **cls["class_names"]}
        series = {}
        if base and base.get("classes"):
            series[base_label] = {names.get(str(c), str(c)): a
                                  for c, a in base["classes"]["per_class_accuracy"].items()}
        series[label] = {names.get(str(c), str(c)): a for c, a in cls["per_class_accuracy"].items()}
        order = [names[k] for k in sorted(names, key=int)]
        paths["class_plot"] = plot_grouped_bars(series, order, os.path.join(output_dir, CLASS_PLOT_FILE),
                                                title=f"{cls['judge']} judge: share of images called their class",
                                                ylabel="accuracy", integer=False)
        results = {**results, "class_plot": paths["class_plot"]}
    paths["report"] = os.path.join(output_dir, REPORT_FILE)
    write_text(paths["report"], render_markdown(results, base))
    logger.info("report written to %s", paths["report"])
    return paths
