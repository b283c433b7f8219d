"""The report of a ``salun-attack`` run: the summary (attack success rate and the rates behind it), ``results.json``,
``asr.png``, ``report.md`` and ``rows.csv``."""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Optional, Sequence

from ..evaluation.reproduce import PROVENANCE_KEY
from ..utils import atomic_path, write_json, write_text
from .config import AttackConfig

RESULTS_FILE, REPORT_FILE, PLOT_FILE, ROWS_CSV = "results.json", "report.md", "asr.png", "rows.csv"


def write_attack_report(config: AttackConfig, records: Sequence[dict], inversion: Optional[dict] = None,
                        provenance: Optional[dict] = None) -> dict:
    """Summarise the finished rows and write every report file; returns the results (as in ``results.json``, plus
    the plot's path). ``provenance``: what the figures depend on besides the config
    (:func:`salun_diffusers.evaluation.reproduce.run_provenance`); the config is recorded in full, for
    ``--reproduce``."""
    out = config.output_dir
    results = summarize_attack(config, records)
    results["settings"] = config.settings()
    results["config"] = dataclasses.asdict(config)
    if inversion is not None:
        results["inversion"] = inversion
    if provenance is not None:
        results[PROVENANCE_KEY] = provenance
    write_json(os.path.join(out, RESULTS_FILE), results)
    results["plot"] = plot_rates(results, os.path.join(out, PLOT_FILE))
    write_text(os.path.join(out, REPORT_FILE), render_attack_markdown(config, results, records))
    write_rows_csv(os.path.join(out, ROWS_CSV), records)
    return results


def attack_summary_line(results: dict) -> str:
    """One line for the terminal: ASR and the rates behind it, the time per attack."""
    return (f"{results['label']}: {results['attack']} attack on {results['num_prompts']} prompts, judge "
            f"{results['judge']}: ASR {pct(results['asr'])} (before {pct(results['before_rate'])}, after "
            f"{pct(results['after_rate'])}, base target {pct(results['target_rate'])}); "
            f"{results['mean_attack_seconds']:.2f} s per attack on {results['torch_threads']} thread(s)")


def summarize_attack(config: AttackConfig, records: Sequence[dict]) -> dict:
    n = len(records)

    def rate(pred, subset=records):
        return sum(1 for r in subset if pred(r)) / len(subset) if subset else None

    reachable = [r for r in records if r["target"]["hit"]]
    seconds = [r["attack_seconds"] for r in records]
    return {
        "label": config.label or os.path.basename(os.path.normpath(config.erasure or config.model)),
        "attack": config.attack, "judge": config.judge, "num_prompts": n,
        "target_rate": rate(lambda r: r["target"]["hit"]),  # the base model draws the concept
        "before_rate": rate(lambda r: r["before"]["hit"]),  # the attacked model, original prompt
        "after_rate": rate(lambda r: r["after"]["hit"]),  # the attacked model, adversarial conditioning
        "asr": rate(lambda r: r["success"]),  # before or after (UnlearnDiffAtk's count)
        "asr_where_target_hit": rate(lambda r: r["success"], reachable), "num_target_hit": len(reachable),
        "mean_loss_start": sum(r["loss_start"] for r in records) / n,
        "mean_loss_final": sum(r["loss_final"] for r in records) / n,
        "mean_attack_seconds": sum(seconds) / n, "max_attack_seconds": max(seconds),
        "torch_threads": records[0]["torch_threads"],
        "attack_steps": config.attack_steps(), "attack_lr": config.attack_lr(),
        "num_tokens": config.num_tokens if config.attack == "token" else None,
    }


def plot_rates(results: dict, path: str) -> str:
    """Bar chart: share of prompts judged to show the concept (base target, before, after attack, ASR)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = ["base model\n(target)", "attacked model\nbefore attack", "attacked model\nafter attack", "ASR"]
    values = [100 * (results[k] or 0) for k in ("target_rate", "before_rate", "after_rate", "asr")]
    fig = Figure(figsize=(6.5, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.bar(names, values, color=["#888888", "#4c72b0", "#dd8452", "#c44e52"])
    ax.bar_label(bars, fmt="%.1f%%", fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_ylabel("prompts judged to show the concept (%)")
    ax.set_title(f"{results['label']}: {results['attack']} attack, judge {results['judge']}, "
                 f"{results['num_prompts']} prompts", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def render_attack_markdown(config: AttackConfig, results: dict, records: Sequence[dict]) -> str:
    lines = ["# salun-attack report", ""]
    for key in ("model", "erasure", "base_model", "prompts", "digit", "from_prompt"):
        value = results["settings"].get(key)
        if value is not None:
            lines.append(f"- {key}: `{value}`")
    lines += [f"- attack: **{config.attack}** ({results['attack_steps']} steps, lr {results['attack_lr']}"
              + (f", {config.num_tokens} tokens" if config.attack == "token" else "") + f"), seed {config.seed}",
              f"- judge: {config.judge}", "",
              "| | share of prompts |", "|---|---:|",
              f"| base model draws the concept (target) | {pct(results['target_rate'])} |",
              f"| attacked model, original prompt | {pct(results['before_rate'])} |",
              f"| attacked model, adversarial conditioning | {pct(results['after_rate'])} |",
              f"| **attack success rate** (before or after) | **{pct(results['asr'])}** |",
              f"| ASR on the {results['num_target_hit']} prompts whose target shows the concept | "
              f"{pct(results['asr_where_target_hit'])} |", "",
              f"Attack loss (mean over prompts, fixed noise): {results['mean_loss_start']:.4f} -> "
              f"{results['mean_loss_final']:.4f}. Attack time per prompt: mean {results['mean_attack_seconds']:.2f} s, "
              f"max {results['max_attack_seconds']:.2f} s on {results['torch_threads']} torch thread(s).", "",
              *([f"Concept inversion: one embedding learned on the {results['inversion']['num_targets']} targets in "
                 f"{results['inversion']['seconds']:.1f} s (loss {results['inversion']['loss_start']:.4f} -> "
                 f"{results['inversion']['loss_final']:.4f}); per prompt only its use is timed.", ""]
                if results.get("inversion") else []),
              f"![attack success]({PLOT_FILE})", "", "## Prompts", "",
              "| case | seed | adversarial prompt | target | before | after | success |",
              "|---|---:|---|---|---|---|---|"]
    for r in records:
        shown = (r["adversarial_prompt"] or "(conditioning)").replace("|", "\\|")
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        lines.append(f"| {r['case_number']} | {r['seed']} | {shown} | {r['target']['label']} | "
                     f"{r['before']['label']} | {r['after']['label']} | {'yes' if r['success'] else 'no'} |")
    return "\n".join(lines) + "\n"


def write_rows_csv(path: str, records: Sequence[dict]) -> None:
    columns = ["case_number", "prompt", "target_prompt", "seed", "adversarial_prompt", "adversarial_tokens",
               "target", "before", "after", "success", "loss_start", "loss_final", "attack_seconds"]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            for r in records:
                w.writerow([" ".join(r[c] or []) if c == "adversarial_tokens" else
                            (r[c]["label"] if isinstance(r[c], dict) else r[c]) for c in columns])
